//! Test helpers: a GGUF written the way llama.cpp's converter writes one, from a
//! Hugging Face directory (engine::synth's), so an import can be checked against the
//! weights it started from.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What to put in the GGUF beyond the directory's own contents.
pub struct Options {
    pub arch: &'static str,
    pub tokenizer_model: &'static str,
    pub pre: &'static str,
    /// Permute q/k rows like convert_hf_to_gguf.py does for Llama.
    pub permute: bool,
    pub quant: GgmlDType,
    /// Metadata values that replace the model's (a forged file's).
    pub forge: Vec<(&'static str, u32)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            arch: "llama",
            tokenizer_model: "gpt2",
            pre: "gpt2",
            permute: true,
            quant: GgmlDType::F32,
            forge: Vec::new(),
        }
    }
}

/// llama.cpp's tensor name for a Hugging Face one (written out independently of the
/// crate's mapping, so the test checks it).
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let table = [
        ("self_attn.q_proj.", "attn_q."),
        ("self_attn.k_proj.", "attn_k."),
        ("self_attn.v_proj.", "attn_v."),
        ("self_attn.o_proj.", "attn_output."),
        ("mlp.gate_proj.", "ffn_gate."),
        ("mlp.up_proj.", "ffn_up."),
        ("mlp.down_proj.", "ffn_down."),
        ("input_layernorm.", "attn_norm."),
        ("post_attention_layernorm.", "ffn_norm."),
    ];
    for (h, g) in table {
        if let Some(kind) = rest.strip_prefix(h) {
            return format!("blk.{layer}.{g}{kind}");
        }
    }
    panic!("no GGUF name for {hf}");
}

/// convert_hf_to_gguf.py's `permute`, on a candle tensor: rows reshaped to
/// (heads, 2, d/2, ...) with axes 1 and 2 swapped.
fn permute(t: &Tensor, heads: usize) -> Tensor {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let cols = dims.get(1).copied().unwrap_or(1);
    t.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape(dims)
        .unwrap()
}

/// All tensors of a directory's safetensors files, as f32 tensors.
pub fn read_safetensors(dir: &Path) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            for (name, t) in candle_core::safetensors::load(&p, &Device::Cpu).unwrap() {
                out.insert(name, t.to_dtype(candle_core::DType::F32).unwrap());
            }
        }
    }
    out
}

/// The tokenizer.json's vocabulary by id, token types and merges, as a GGUF stores them.
fn vocab(dir: &Path) -> (Vec<String>, Vec<i32>, Vec<String>) {
    let tk: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    let mut by_id: Vec<Option<(String, i32)>> = Vec::new();
    let mut put = |id: usize, s: &str, ty: i32| {
        if by_id.len() <= id {
            by_id.resize(id + 1, None);
        }
        by_id[id] = Some((s.to_string(), ty));
    };
    for (s, id) in tk["model"]["vocab"].as_object().unwrap() {
        put(id.as_u64().unwrap() as usize, s, 1);
    }
    for a in tk["added_tokens"].as_array().unwrap() {
        let ty = if a["special"].as_bool().unwrap() { 3 } else { 4 };
        put(a["id"].as_u64().unwrap() as usize, a["content"].as_str().unwrap(), ty);
    }
    let (tokens, types) = by_id.into_iter().map(|e| e.expect("dense ids")).unzip();
    let merges = tk["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(p) => format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
            _ => panic!("merge {m}"),
        })
        .collect();
    (tokens, types, merges)
}

/// Writes `dest` as llama.cpp would convert the Hugging Face directory `dir`.
pub fn write_gguf(dir: &Path, dest: &Path, o: &Options) {
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let u = |k: &str| Value::U32(cfg[k].as_u64().unwrap() as u32);
    let heads = cfg["num_attention_heads"].as_u64().unwrap() as usize;
    let kv_heads = cfg["num_key_value_heads"].as_u64().unwrap() as usize;
    let (tokens, types, merges) = vocab(dir);
    let a = o.arch;
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String("synthetic".into())),
        (format!("{a}.block_count"), u("num_hidden_layers")),
        (format!("{a}.context_length"), u("max_position_embeddings")),
        (format!("{a}.embedding_length"), u("hidden_size")),
        (format!("{a}.feed_forward_length"), u("intermediate_size")),
        (format!("{a}.attention.head_count"), u("num_attention_heads")),
        (format!("{a}.attention.head_count_kv"), u("num_key_value_heads")),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(cfg["rope_theta"].as_f64().unwrap() as f32),
        ),
        (format!("{a}.rope.dimension_count"), u("head_dim")),
        ("tokenizer.ggml.model".into(), Value::String(o.tokenizer_model.into())),
        ("tokenizer.ggml.pre".into(), Value::String(o.pre.into())),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strings(&merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        (
            "tokenizer.chat_template".into(),
            Value::String("{% for m in messages %}{{ m['content'] }}{% endfor %}".into()),
        ),
    ];
    let mut meta = meta;
    for (key, v) in &o.forge {
        let key = format!("{a}.{key}");
        meta.retain(|(k, _)| *k != key);
        meta.push((key, Value::U32(*v)));
    }
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<(String, Tensor)> = read_safetensors(dir).into_iter().collect();
    names.sort_by(|x, y| x.0.cmp(&y.0));
    for (hf, t) in names {
        let g = gguf_name(&hf);
        let t = if o.permute && g.contains(".attn_q.") {
            permute(&t, heads)
        } else if o.permute && g.contains(".attn_k.") {
            permute(&t, kv_heads)
        } else {
            t
        };
        // Norms and biases stay f32, as llama.cpp keeps 1-D tensors; rows that are not
        // whole quantization blocks too (llama.cpp falls back the same way).
        let whole = t.dims().last().is_some_and(|n| n % o.quant.block_size() == 0);
        let q = if t.rank() == 1 || !whole { GgmlDType::F32 } else { o.quant };
        tensors.push((g, QTensor::quantize(&t, q).unwrap()));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(dest).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

/// Entries of `dir` whose names start with `prefix` (leftover staging folders).
pub fn leftovers(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}
