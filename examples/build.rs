//! Compiles every `.proto` file in `proto/` (the examples' protocols) with
//! pagerpc-build (protox: pure Rust, no system `protoc`): messages, and for
//! each service a typed client, a server trait and its registration.
//! Package `pagerpc.examples.X` becomes `$OUT_DIR/pagerpc.examples.X.rs`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A directory here makes cargo rerun when any file under it changes,
    // including a newly added .proto.
    println!("cargo:rerun-if-changed=proto");
    let mut files: Vec<PathBuf> = std::fs::read_dir("proto")?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|x| x == "proto"));
    files.sort();
    if files.is_empty() {
        return Err("no .proto files in examples/proto".into());
    }
    pagerpc_build::compile_protos(&files, &["proto"])?;
    Ok(())
}
