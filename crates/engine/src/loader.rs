//! Finding and checking a model directory: `config.json`, `tokenizer.json`, and one or
//! many `*.safetensors` (with `model.safetensors.index.json`). Every problem is one
//! error naming the file and what is wrong with it.
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

/// Where each tensor lives and its shape, from the files' headers.
pub(crate) struct TensorIndex {
    pub files: Vec<PathBuf>,
    entries: HashMap<String, (usize, Vec<usize>)>,
}

impl TensorIndex {
    /// Checks that `name` exists with `shape`.
    pub(crate) fn expect(&self, name: &str, shape: &[usize]) -> Result<()> {
        match self.entries.get(name) {
            None => Err(EngineError::model(
                self.files.first().cloned().unwrap_or_default(),
                format!("tensor {name} is missing (looked in {} file(s))", self.files.len()),
            )),
            Some((file, found)) if found != shape => Err(EngineError::model(
                &self.files[*file],
                format!("tensor {name} has shape {found:?}, the config implies {shape:?}"),
            )),
            Some(_) => Ok(()),
        }
    }
}

pub struct ModelDir {
    pub root: PathBuf,
    pub config: ModelConfig,
    pub tokenizer: PathBuf,
    pub(crate) index: TensorIndex,
    /// Identifies the weights: peers refuse each other when it differs.
    pub fingerprint: u64,
}

impl ModelDir {
    pub fn open(root: &Path) -> Result<ModelDir> {
        if !root.is_dir() {
            return Err(EngineError::model(root, "is not a directory"));
        }
        let config_path = root.join("config.json");
        if !config_path.exists() {
            return Err(EngineError::model(&config_path, "missing"));
        }
        let mut config = ModelConfig::from_file(&config_path)?;
        config.merge_generation_config(&root.join("generation_config.json"))?;
        let tokenizer = root.join("tokenizer.json");
        if !tokenizer.exists() {
            return Err(EngineError::model(&tokenizer, "missing"));
        }
        let files = weight_files(root)?;
        let index = read_headers(files)?;
        let fingerprint = weights_fingerprint(&config, &index.files)?;
        Ok(ModelDir {
            root: root.to_path_buf(),
            config,
            tokenizer,
            index,
            fingerprint,
        })
    }
}

fn weight_files(root: &Path) -> Result<Vec<PathBuf>> {
    let index_path = root.join("model.safetensors.index.json");
    if index_path.exists() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let text = std::fs::read_to_string(&index_path).map_err(|e| EngineError::model(&index_path, format!("cannot read: {e}")))?;
        let idx: Index =
            serde_json::from_str(&text).map_err(|e| EngineError::model(&index_path, format!("not a safetensors index: {e}")))?;
        let names: BTreeSet<String> = idx.weight_map.into_values().collect();
        let mut files = Vec::new();
        for n in names {
            if n.contains('/') || n.contains("..") {
                return Err(EngineError::model(
                    &index_path,
                    format!("refers to {n:?} outside the model directory"),
                ));
            }
            let p = root.join(&n);
            if !p.exists() {
                return Err(EngineError::model(&p, "listed in model.safetensors.index.json but missing"));
            }
            files.push(p);
        }
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| EngineError::model(root, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EngineError::model(root, "has no *.safetensors weights"));
    }
    Ok(files)
}

/// Reads each file's header only (8-byte length + JSON), and checks that the data the
/// header describes fits in the file: a truncated download is caught here.
fn read_headers(files: Vec<PathBuf>) -> Result<TensorIndex> {
    use std::io::Read;
    #[derive(serde::Deserialize)]
    struct Entry {
        shape: Vec<usize>,
        data_offsets: (u64, u64),
    }
    let mut entries = HashMap::new();
    for (i, path) in files.iter().enumerate() {
        let bad = |problem: String| EngineError::model(path, problem);
        let mut f = std::fs::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        let file_len = f.metadata().map_err(|e| bad(format!("cannot stat: {e}")))?.len();
        let mut len = [0u8; 8];
        f.read_exact(&mut len)
            .map_err(|_| bad("too short to be a safetensors file".into()))?;
        let n = u64::from_le_bytes(len);
        if n > 100 << 20 || 8 + n > file_len {
            return Err(bad(format!(
                "header length {n} does not fit in a file of {file_len} bytes (truncated or not safetensors)"
            )));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(|e| bad(format!("cannot read header: {e}")))?;
        let map: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header is not safetensors JSON: {e}")))?;
        let data_len = file_len - 8 - n;
        for (name, v) in map {
            if name == "__metadata__" {
                continue;
            }
            let e: Entry = serde_json::from_value(v).map_err(|e| bad(format!("header entry {name}: {e}")))?;
            if e.data_offsets.1 > data_len || e.data_offsets.0 > e.data_offsets.1 {
                return Err(bad(format!(
                    "truncated: tensor {name} needs bytes up to {} of the data section, the file has {data_len}",
                    e.data_offsets.1
                )));
            }
            entries.insert(name, (i, e.shape));
        }
    }
    Ok(TensorIndex { files, entries })
}

/// The config's fingerprint mixed with each weight file's size and 64 KiB sampled from
/// its start, middle and end: two checkpoints of one shape (a base model and its
/// fine-tune) differ here, so their daemons refuse to share KV caches.
fn weights_fingerprint(config: &ModelConfig, files: &[PathBuf]) -> Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut h = config.fingerprint();
    let mut mix = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    let mut buf = vec![0u8; 64 << 10];
    for path in files {
        let mut f = std::fs::File::open(path).map_err(|e| EngineError::model(path, format!("cannot open: {e}")))?;
        let len = f
            .metadata()
            .map_err(|e| EngineError::model(path, format!("cannot stat: {e}")))?
            .len();
        mix(&len.to_le_bytes());
        for at in [0, len / 2, len.saturating_sub(buf.len() as u64)] {
            f.seek(SeekFrom::Start(at)).map_err(|e| EngineError::model(path, e.to_string()))?;
            let n = f.read(&mut buf).map_err(|e| EngineError::model(path, e.to_string()))?;
            mix(&buf[..n]);
        }
    }
    Ok(h)
}
