//! Generates the gRPC code of tern's router API from proto/tern/v1/router.proto.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tern/v1/router.proto");
    tonic_prost_build::configure().compile_protos(&["proto/tern/v1/router.proto"], &["proto"])?;
    Ok(())
}
