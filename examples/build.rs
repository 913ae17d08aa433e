//! Compiles every `.proto` file in `proto/` (the examples' protocols) with
//! protox (pure Rust, no system `protoc`) and prost-build. Package
//! `pagerpc.examples.X` becomes `$OUT_DIR/pagerpc.examples.X.rs`.

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
    let fds = protox::compile(&files, ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
