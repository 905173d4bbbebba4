//! With the `cuda` feature: compiles `kernels/fused.cu` to PTX with nvcc, for
//! `CUDA_COMPUTE_CAP` (default 80, which the driver JIT-compiles for newer GPUs).
//! Without it: nothing, and the CPU build needs no CUDA toolkit.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=kernels/fused.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("fused.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    // The kernels see it: PTX built below 8.0 has no tensor-core prefill, whatever the GPU.
    println!("cargo::rustc-env=PDSERVE_PTX_COMPUTE_CAP={cap}");
    let root = std::env::var("CUDA_ROOT").ok();
    let nvcc = std::env::var("NVCC")
        .ok()
        .or_else(|| root.as_ref().map(|r| format!("{r}/bin/nvcc")))
        .unwrap_or_else(|| "nvcc".into());
    let mut cmd = Command::new(&nvcc);
    cmd.args(["--ptx", &format!("-arch=compute_{cap}"), "-O3", "-o"])
        .arg(&out)
        .arg("kernels/fused.cu");
    if let Some(r) = &root {
        cmd.arg(format!("-I{r}/include"));
    }
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed ({s}) on kernels/fused.cu"),
        Err(e) => panic!("cannot run {nvcc} for kernels/fused.cu: {e} (set NVCC or CUDA_ROOT, or see scripts/build-cuda.sh)"),
    }
}
