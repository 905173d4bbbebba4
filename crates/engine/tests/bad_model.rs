//! A broken model directory gives one clear error naming the file and the problem.
mod common;

use std::path::Path;

use engine::synth::Preset;
use engine::{Arch, Engine, EngineConfig};

fn copy_model() -> tempfile::TempDir {
    let src = common::model_dir(Arch::Llama, Preset::Tiny);
    let dst = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.path().join(p.file_name().unwrap())).unwrap();
    }
    dst
}

fn load_err(dir: &Path) -> String {
    match Engine::load(&EngineConfig {
        model: dir.to_path_buf(),
        kv_cache_mib: 4,
        ..Default::default()
    }) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

#[test]
fn missing_files() {
    let e = load_err(Path::new("/nonexistent/model"));
    assert!(e.contains("/nonexistent/model") && e.contains("not a directory"), "{e}");
    for f in ["config.json", "tokenizer.json"] {
        let d = copy_model();
        std::fs::remove_file(d.path().join(f)).unwrap();
        let e = load_err(d.path());
        assert!(e.contains(f) && e.contains("missing"), "{e}");
    }
    let d = copy_model();
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("no *.safetensors"), "{e}");
}

#[test]
fn unknown_architecture() {
    let d = copy_model();
    edit_config(d.path(), |v| {
        v["model_type"] = "mamba".into();
    });
    let e = load_err(d.path());
    assert!(
        e.contains("config.json") && e.contains("unsupported architecture") && e.contains("mamba"),
        "{e}"
    );
}

#[test]
fn shape_mismatch() {
    let d = copy_model();
    edit_config(d.path(), |v| {
        v["intermediate_size"] = 200.into();
    });
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("gate_proj") && e.contains("[176, 64]") && e.contains("[200, 64]"),
        "{e}"
    );
}

#[test]
fn truncated_and_garbage_weights() {
    let d = copy_model();
    let p = d.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 1000).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    std::fs::write(&p, b"definitely not safetensors").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn index_naming_a_missing_shard() {
    let d = copy_model();
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model-00001-of-00002.safetensors") && e.contains("missing"), "{e}");
}
