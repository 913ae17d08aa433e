//! Generates the test service's messages, client and server trait.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    pagerpc_build::configure()
        .build_async(true)
        .compile(&["proto/lab.proto", "proto/blobs.proto"], &["proto"])?;
    Ok(())
}
