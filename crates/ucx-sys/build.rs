//! Generates UCP bindings from the UCX headers found by `UCX_DIR` (default: the
//! workspace's `.deps/ucx/libucx`, which `scripts/setup.sh` fills from the PyPI
//! wheel `libucx-cu13`), falling back to pkg-config's `ucx` (a system UCX).
//!
//! The bindings are *dynamic*: the functions are resolved from `libucp.so` at run
//! time with `RTLD_LOCAL`, so a process that also loads NIXL (which bundles its own
//! UCX) never mixes the two libraries' symbols, and a missing library is an error
//! at start rather than a link failure.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=UCX_DIR");
    println!("cargo:rerun-if-changed=wrapper.h");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let default_dir = manifest.join("../../.deps/ucx/libucx");
    let ucx_dir = std::env::var_os("UCX_DIR").map(PathBuf::from).unwrap_or(default_dir);

    let (include, libdir) = if ucx_dir.join("include/ucp/api/ucp.h").exists() {
        (ucx_dir.join("include"), ucx_dir.join("lib"))
    } else if let Some(found) = pkg_config("ucx") {
        found
    } else {
        panic!(
            "UCX headers not found: set UCX_DIR to a UCX install (with include/ucp/api/ucp.h), \
             run scripts/setup.sh (installs the libucx-cu13 wheel into .deps/ucx), \
             or install a system UCX visible to pkg-config (tried {})",
            ucx_dir.display()
        );
    };

    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_function("ucp_.*")
        .allowlist_function("ucs_status_string")
        .allowlist_type("ucp_.*|ucs_.*")
        .allowlist_var("UCP_.*|UCS_.*")
        .dynamic_library_name("Ucp")
        .dynamic_link_require_all(true)
        .derive_default(true)
        .prepend_enum_name(false)
        .layout_tests(false)
        .generate()
        .expect("bindgen failed on ucp.h");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    bindings.write_to_file(out.join("bindings.rs")).unwrap();

    // The library directory the headers came from: the run-time default.
    println!("cargo:rustc-env=UCX_SYS_DEFAULT_LIBDIR={}", libdir.display());
    println!("cargo:libdir={}", libdir.display());
}

fn pkg_config(name: &str) -> Option<(PathBuf, PathBuf)> {
    let var = |v: &str| -> Option<PathBuf> {
        let out = Command::new("pkg-config").args([&format!("--variable={v}"), name]).output().ok()?;
        let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !s.is_empty()).then(|| PathBuf::from(s))
    };
    let include = var("includedir")?;
    let lib = var("libdir")?;
    Path::new(&include).join("ucp/api/ucp.h").exists().then_some((include, lib))
}
