//! Shared by the engine tests: a synthetic model written once per test binary.
#![allow(dead_code)]
use std::path::PathBuf;
use std::sync::OnceLock;

use engine::synth::{Preset, synthesize};
use engine::{Arch, Engine, EngineConfig};

pub fn model_dir(arch: Arch, preset: Preset) -> PathBuf {
    static DIRS: OnceLock<std::sync::Mutex<std::collections::HashMap<String, PathBuf>>> = OnceLock::new();
    let key = format!("{arch:?}-{preset:?}");
    let mut dirs = DIRS.get_or_init(Default::default).lock().unwrap();
    dirs.entry(key.clone())
        .or_insert_with(|| {
            let dir = tempfile::Builder::new().prefix("pdserve-model-").tempdir().unwrap().keep();
            synthesize(arch, preset, 7, &dir).unwrap();
            dir
        })
        .clone()
}

pub fn engine(arch: Arch, preset: Preset, kv_cache_mib: u64) -> Engine {
    Engine::load(&EngineConfig {
        model: model_dir(arch, preset),
        kv_cache_mib,
        ..Default::default()
    })
    .unwrap()
}

/// Deterministic prompt token ids (skipping the special ids 0..3).
pub fn prompt(len: usize, salt: u32, vocab: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 3 + (i.wrapping_mul(2654435761).wrapping_add(salt * 97) % (vocab as u32 - 3)))
        .collect()
}
