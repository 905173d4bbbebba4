//! Generates the pdserve.v1 client and server code, and the descriptor set that
//! server reflection serves. protoc comes from protoc-bin-vendored: none on PATH needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script compiled for one checkout may be reused by
    // another (same crate, same hash), and `env!` would point it at the first.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    // SAFETY (of intent): build scripts run single-threaded; PROTOC is read by the
    // code generator below.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let files = ["pdserve/v1/generate.proto", "pdserve/v1/internal.proto"].map(|f| root.join(f));
    tonic_prost_build::configure()
        .codec_path("crate::codec::StrictCodec")
        .file_descriptor_set_path(out.join("pdserve_descriptor.bin"))
        .compile_protos(&files, std::slice::from_ref(&root))?;
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    Ok(())
}
