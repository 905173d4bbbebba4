//! `pdserve model import`: a GGUF file (llama.cpp's format) into a Hugging Face model
//! directory the engine loads: `model.safetensors` (dequantized, renamed, q/k rows put
//! back in Hugging Face's RoPE order), `config.json`, `generation_config.json`,
//! `tokenizer.json` and `tokenizer_config.json`.
//!
//! Everything is written into a temporary folder next to the output and renamed into
//! place at the end, so a failure leaves no half-written model behind.
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device};
use serde_json::{Value as Json, json};

use crate::error::{ModelsError, Result};
use crate::meta::Meta;
use crate::names::{hf_name, permuted_heads, unpermute_rows};
use crate::tokenizer::{self, GgufVocab};

/// The dtype the weights are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "f16" | "float16" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            _ => Err(format!("unknown dtype {s:?} (f32, f16, bf16)")),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        })
    }
}

impl Dtype {
    /// `torch_dtype` in config.json, which the engine reads as the stored dtype.
    fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::Bf16 => "bfloat16",
        }
    }

    fn safetensors(self) -> safetensors::Dtype {
        match self {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::F16 => safetensors::Dtype::F16,
            Dtype::Bf16 => safetensors::Dtype::BF16,
        }
    }

    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.size());
        match self {
            Dtype::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Dtype::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            Dtype::Bf16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        }
        out
    }
}

/// What an import did, for the command to print.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub out: PathBuf,
    pub architecture: String,
    /// `general.name`, when the file has one.
    pub name: Option<String>,
    pub layers: usize,
    pub tensors: usize,
    pub parameters: u64,
    /// Total size of the files written.
    pub bytes: u64,
    pub seconds: f64,
}

/// The model's shape, from `{arch}.*` metadata.
struct Hparams {
    arch: &'static str,
    layers: usize,
    hidden: usize,
    inter: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    theta: f64,
    context: usize,
    vocab: usize,
}

/// One tensor to write.
struct Planned {
    gguf: String,
    hf: String,
    shape: Vec<usize>,
    /// Undo llama.cpp's RoPE row permutation with this many heads.
    unpermute: Option<usize>,
}

/// Fails unless `out` is absent or an empty directory.
pub(crate) fn check_out(out: &Path) -> Result<()> {
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ModelsError::file(out, format!("cannot inspect: {e}"))),
        Ok(m) if m.is_dir() => {
            let mut entries = std::fs::read_dir(out).map_err(|e| ModelsError::file(out, format!("cannot list: {e}")))?;
            if entries.next().is_none() {
                Ok(())
            } else {
                Err(ModelsError::OutputExists { path: out.to_path_buf() })
            }
        }
        Ok(_) => Err(ModelsError::OutputExists { path: out.to_path_buf() }),
    }
}

/// A temporary folder beside the output, renamed onto it by [`Staging::commit`] and
/// removed (with whatever was written) if dropped before.
struct Staging {
    dir: Option<tempfile::TempDir>,
    out: PathBuf,
}

impl Staging {
    fn new(out: &Path) -> Result<Staging> {
        let name = out
            .file_name()
            .ok_or_else(|| ModelsError::file(out, "is not a directory name to create"))?
            .to_string_lossy()
            .into_owned();
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| ModelsError::file(&parent, format!("cannot create: {e}")))?;
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{name}.importing-"))
            .tempdir_in(&parent)
            .map_err(|e| ModelsError::file(&parent, format!("cannot create a temporary folder: {e}")))?;
        Ok(Staging {
            dir: Some(dir),
            out: out.to_path_buf(),
        })
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().expect("staging folder present until commit").path()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    fn write_json(&self, name: &str, value: &Json) -> Result<()> {
        let path = self.file(name);
        let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
        std::fs::write(&path, text + "\n").map_err(|e| ModelsError::file(&path, format!("cannot write: {e}")))
    }

    /// Total bytes written so far.
    fn bytes(&self) -> Result<u64> {
        let dir = self.path();
        let mut total = 0;
        for e in std::fs::read_dir(dir).map_err(|e| ModelsError::file(dir, format!("cannot list: {e}")))? {
            let e = e.map_err(|e| ModelsError::file(dir, format!("cannot list: {e}")))?;
            total += e
                .metadata()
                .map_err(|err| ModelsError::file(e.path(), format!("cannot stat: {err}")))?
                .len();
        }
        Ok(total)
    }

    fn commit(mut self) -> Result<()> {
        // The output may have appeared while we worked: check again, right before.
        check_out(&self.out)?;
        let tmp = self.dir.take().expect("staging folder present until commit");
        #[cfg(unix)]
        {
            // TempDir makes its folder private (0700); a model directory is read by the
            // daemons' service user too.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
                .map_err(|e| ModelsError::file(tmp.path(), format!("cannot set permissions: {e}")))?;
        }
        if self.out.is_dir() {
            std::fs::remove_dir(&self.out).map_err(|e| ModelsError::file(&self.out, format!("cannot replace the empty directory: {e}")))?;
        }
        let path = tmp.keep();
        std::fs::rename(&path, &self.out).map_err(|e| {
            let _ = std::fs::remove_dir_all(&path);
            ModelsError::file(
                &self.out,
                format!("cannot move the imported model into place from {}: {e}", path.display()),
            )
        })
    }
}

/// Imports `gguf` into the new directory `out`, weights in `dtype`.
pub fn import_gguf(gguf: &Path, out: &Path, dtype: Dtype) -> Result<ImportReport> {
    let t0 = Instant::now();
    check_out(out)?;
    let bad = |problem: String| ModelsError::file(gguf, problem);
    let file = File::open(gguf).map_err(|e| bad(format!("cannot open: {e}")))?;
    let file_len = file.metadata().map_err(|e| bad(format!("cannot stat: {e}")))?.len();
    let mut reader = BufReader::new(file);
    let mut magic = [0u8; 4];
    if reader.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
        return Err(bad(format!(
            "not a GGUF file: it starts with {:?}, not \"GGUF\"",
            String::from_utf8_lossy(&magic[..file_len.min(4) as usize])
        )));
    }
    reader.seek(SeekFrom::Start(0)).map_err(|e| bad(format!("cannot seek: {e}")))?;
    let content = Content::read(&mut reader).map_err(|e| bad(format!("cannot read the GGUF header (truncated or corrupt): {e}")))?;
    let meta = Meta {
        path: gguf,
        map: &content.metadata,
    };
    let arch = match meta.str("general.architecture")? {
        "llama" => "llama",
        "qwen2" => "qwen2",
        other => {
            return Err(ModelsError::UnsupportedArchitecture {
                path: gguf.to_path_buf(),
                arch: other.to_string(),
            });
        }
    };
    let tk_model = meta.str("tokenizer.ggml.model")?;
    if tk_model != "gpt2" {
        return Err(ModelsError::UnsupportedTokenizer {
            path: gguf.to_path_buf(),
            model: tk_model.to_string(),
        });
    }
    check_tensor_data(&content, file_len).map_err(bad)?;

    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let hp = hparams(&meta, arch, tokens.len())?;
    let rope_scaling = rope_scaling(&meta, &content, &mut reader, &hp)?;
    let (plan, has_output, has_bias) = plan(&content, &hp).map_err(bad)?;

    let bos = meta.opt_u32("tokenizer.ggml.bos_token_id")?;
    let eos = meta.opt_u32("tokenizer.ggml.eos_token_id")?;
    let mut eos_ids: Vec<u32> = Vec::new();
    for key in ["eos", "eot", "eom"] {
        if let Some(id) = meta.opt_u32(&format!("tokenizer.ggml.{key}_token_id"))?
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
    }
    let add_bos = meta.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = meta.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let token_types = meta.opt_ints("tokenizer.ggml.token_type")?.unwrap_or_default();
    let vocab = GgufVocab {
        tokens: tokens.clone(),
        token_types,
        merges,
        pre: meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default"),
        add_bos,
        add_eos,
        bos,
        eos,
    };
    let tk = tokenizer::build(&vocab).map_err(|e| bad(format!("tokenizer: {e}")))?;

    let stage = Staging::new(out)?;
    let token_str = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).map(|s| s.to_string());
    let one_or_many = |ids: &[u32]| if ids.len() == 1 { json!(ids[0]) } else { json!(ids) };
    let mut config = json!({
        "architectures": [if arch == "llama" { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }],
        "model_type": arch,
        "hidden_size": hp.hidden,
        "intermediate_size": hp.inter,
        "num_hidden_layers": hp.layers,
        "num_attention_heads": hp.heads,
        "num_key_value_heads": hp.kv_heads,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": hp.context,
        "rms_norm_eps": hp.eps,
        "rope_theta": hp.theta,
        "rope_scaling": rope_scaling,
        "vocab_size": hp.vocab,
        "tie_word_embeddings": !has_output,
        "bos_token_id": bos,
        "eos_token_id": one_or_many(&eos_ids),
        "torch_dtype": dtype.torch_name(),
        "pdserve_import": {
            "source": gguf.file_name().map(|n| n.to_string_lossy().into_owned()),
            "general.name": meta.opt_str("general.name")?,
            "general.file_type": meta.opt_usize("general.file_type")?,
        },
    });
    if arch == "llama" {
        config["attention_bias"] = json!(has_bias);
        config["mlp_bias"] = json!(false);
    } else {
        config["use_sliding_window"] = json!(false);
        config["sliding_window"] = json!(hp.context);
        config["max_window_layers"] = json!(hp.layers);
    }
    stage.write_json("config.json", &config)?;
    let mut generation = json!({ "bos_token_id": bos, "eos_token_id": eos_ids });
    if let Some(pad) = meta.opt_u32("tokenizer.ggml.padding_token_id")? {
        generation["pad_token_id"] = json!(pad);
    }
    stage.write_json("generation_config.json", &generation)?;
    let tk_path = stage.file("tokenizer.json");
    tk.save(&tk_path, false)
        .map_err(|e| ModelsError::file(&tk_path, format!("cannot write: {e}")))?;
    let mut tk_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": token_str(bos),
        "eos_token": token_str(eos),
        "unk_token": token_str(meta.opt_u32("tokenizer.ggml.unknown_token_id")?),
        "pad_token": token_str(meta.opt_u32("tokenizer.ggml.padding_token_id")?),
        "model_max_length": hp.context,
        "clean_up_tokenization_spaces": false,
    });
    if let Some(t) = meta.opt_str("tokenizer.chat_template")? {
        tk_config["chat_template"] = json!(t);
    }
    stage.write_json("tokenizer_config.json", &tk_config)?;

    let parameters = plan.iter().map(|p| p.shape.iter().product::<usize>() as u64).sum();
    write_weights(gguf, &content, reader, &plan, dtype, &stage.file("model.safetensors"))?;
    let bytes = stage.bytes()?;
    stage.commit()?;
    Ok(ImportReport {
        out: out.to_path_buf(),
        architecture: arch.to_string(),
        name: meta.opt_str("general.name")?.map(str::to_string),
        layers: hp.layers,
        tensors: plan.len(),
        parameters,
        bytes,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Every tensor's bytes must lie inside the file: a cut download fails here, before
/// anything is written, rather than halfway through the weights.
fn check_tensor_data(content: &Content, file_len: u64) -> std::result::Result<(), String> {
    for (name, info) in &content.tensor_infos {
        let Some(elems) = info.shape.dims().iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
            return Err(format!("tensor {name}: shape {:?} overflows", info.shape.dims()));
        };
        let block = info.ggml_dtype.block_size();
        if !elems.is_multiple_of(block) {
            return Err(format!("tensor {name}: {elems} values are not whole blocks of {block}"));
        }
        // Offsets and shapes are the file's word: checked sums, so a forged offset near
        // u64::MAX is an error, not an overflow that skips this check.
        let end = (elems / block)
            .checked_mul(info.ggml_dtype.type_size())
            .and_then(|bytes| content.tensor_data_offset.checked_add(info.offset)?.checked_add(bytes as u64));
        if end.is_none_or(|e| e > file_len) {
            return Err(format!(
                "truncated: tensor {name} ({:?} of {:?}) reaches past the file's {file_len} bytes",
                info.shape.dims(),
                info.ggml_dtype
            ));
        }
    }
    Ok(())
}

/// Bounds on a file's model shape.
const MAX_LAYERS: usize = 1024;
const MAX_HEADS: usize = 1024;
const MAX_HEAD_DIM: usize = 1024;
const MAX_WIDTH: usize = 1 << 20;

fn hparams(meta: &Meta<'_>, arch: &'static str, vocab: usize) -> Result<Hparams> {
    let k = |key: &str| format!("{arch}.{key}");
    let heads = meta.usize(&k("attention.head_count"))?;
    let hidden = meta.usize(&k("embedding_length"))?;
    if heads == 0 {
        return Err(ModelsError::file(meta.path, format!("{} is 0", k("attention.head_count"))));
    }
    let head_dim = match meta.opt_usize(&k("attention.key_length"))? {
        Some(d) => d,
        None if hidden.is_multiple_of(heads) => hidden / heads,
        None => {
            return Err(ModelsError::file(
                meta.path,
                format!("embedding_length {hidden} does not split into {heads} heads"),
            ));
        }
    };
    if let Some(rot) = meta.opt_usize(&k("rope.dimension_count"))?
        && rot != head_dim
    {
        return Err(ModelsError::file(
            meta.path,
            format!("RoPE on {rot} of {head_dim} head dimensions (partial rotary) is not supported"),
        ));
    }
    if let Some(kind) = meta.opt_str(&k("rope.scaling.type"))?
        && kind != "none"
    {
        return Err(ModelsError::file(
            meta.path,
            format!("RoPE scaling {kind:?} ({}) is not supported", k("rope.scaling.type")),
        ));
    }
    let kv_heads = meta.opt_usize(&k("attention.head_count_kv"))?.unwrap_or(heads);
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(ModelsError::file(
            meta.path,
            format!("{heads} attention heads are not a multiple of {kv_heads} key/value heads"),
        ));
    }
    let (layers, inter) = (meta.usize(&k("block_count"))?, meta.usize(&k("feed_forward_length"))?);
    // The shape is the file's word: bounded before any loop or product uses it (the
    // largest open models are far inside these).
    for (what, v, max) in [
        ("block_count", layers, MAX_LAYERS),
        ("attention.head_count", heads, MAX_HEADS),
        ("attention.key_length", head_dim, MAX_HEAD_DIM),
        ("embedding_length", hidden, MAX_WIDTH),
        ("feed_forward_length", inter, MAX_WIDTH),
    ] {
        if v == 0 || v > max {
            return Err(ModelsError::file(meta.path, format!("{} = {v} is outside 1..={max}", k(what))));
        }
    }
    Ok(Hparams {
        arch,
        layers,
        hidden,
        inter,
        heads,
        kv_heads,
        head_dim,
        eps: meta
            .opt_f64(&k("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| ModelsError::file(meta.path, format!("metadata {} is missing", k("attention.layer_norm_rms_epsilon"))))?,
        theta: meta.opt_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0),
        context: meta.usize(&k("context_length"))?,
        vocab,
    })
}

/// Llama 3.x files carry their RoPE scaling as a `rope_freqs` tensor (the divisor of
/// each frequency) instead of its parameters; the engine and transformers want the
/// parameters. Recover them when the tensor is Llama 3's formula with the usual
/// (low 1, high 4, original context 8192), and refuse anything else.
fn rope_scaling<R: Read + Seek>(meta: &Meta<'_>, content: &Content, reader: &mut R, hp: &Hparams) -> Result<Json> {
    if !content.tensor_infos.contains_key("rope_freqs.weight") {
        return Ok(Json::Null);
    }
    let mut read = || -> candle_core::Result<Vec<f32>> {
        content
            .tensor(reader, "rope_freqs.weight", &Device::Cpu)?
            .dequantize(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()
    };
    let divisors = read().map_err(|e| ModelsError::file(meta.path, format!("cannot read tensor rope_freqs.weight: {e}")))?;
    fit_llama3_rope(&divisors, hp.theta, hp.head_dim).ok_or_else(|| {
        ModelsError::file(
            meta.path,
            "tensor rope_freqs.weight is not Llama 3 RoPE scaling with (low 1, high 4, original context 8192); not supported",
        )
    })
}

/// The `rope_scaling` of config.json whose llama.cpp `rope_freqs` is `divisors`, if any.
pub(crate) fn fit_llama3_rope(divisors: &[f32], theta: f64, head_dim: usize) -> Option<Json> {
    if divisors.len() * 2 != head_dim || divisors.is_empty() {
        return None;
    }
    let factor = divisors.iter().fold(0f32, |m, &d| m.max(d)) as f64;
    let (low, high, orig) = (1.0f64, 4.0f64, 8192.0f64);
    let (low_wavelen, high_wavelen) = (orig / low, orig / high);
    for (i, &d) in divisors.iter().enumerate() {
        let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
        let wavelen = 2.0 * std::f64::consts::PI / freq;
        let want = if wavelen < high_wavelen {
            1.0
        } else if wavelen > low_wavelen {
            factor
        } else {
            let smooth = (orig / wavelen - low) / (high - low);
            1.0 / ((1.0 - smooth) / factor + smooth)
        };
        if (d as f64 - want).abs() > 1e-3 * want.max(1.0) {
            return None;
        }
    }
    Some(json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig as usize,
    }))
}

/// The tensors to write, checked against the shapes the config implies (so a file the
/// engine cannot load fails here, naming the tensor); whether there is an `output`
/// (untied lm_head) and q/k/v biases.
fn plan(content: &Content, hp: &Hparams) -> std::result::Result<(Vec<Planned>, bool, bool), String> {
    let (h, q, kv) = (hp.hidden, hp.heads * hp.head_dim, hp.kv_heads * hp.head_dim);
    // name -> (shape, required)
    let mut expected: BTreeMap<String, (Vec<usize>, bool)> = BTreeMap::new();
    expected.insert("model.embed_tokens.weight".into(), (vec![hp.vocab, h], true));
    expected.insert("model.norm.weight".into(), (vec![h], true));
    expected.insert("lm_head.weight".into(), (vec![hp.vocab, h], false));
    for i in 0..hp.layers {
        let p = format!("model.layers.{i}");
        for (n, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![hp.inter, h]),
            ("mlp.up_proj.weight", vec![hp.inter, h]),
            ("mlp.down_proj.weight", vec![h, hp.inter]),
        ] {
            expected.insert(format!("{p}.{n}"), (shape, true));
        }
        for (n, len) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            expected.insert(format!("{p}.self_attn.{n}.bias"), (vec![len], false));
        }
    }
    let llama = hp.arch == "llama";
    let mut plan = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        if name == "rope_freqs.weight" {
            continue; // read into config.json's rope_scaling
        }
        let hf = hf_name(name).ok_or_else(|| format!("tensor {name} is not part of a llama/qwen2 decoder this import knows"))?;
        let shape = info.shape.dims().to_vec();
        match expected.get(&hf) {
            None => return Err(format!("tensor {name} ({hf}) is outside the model's {} layers", hp.layers)),
            Some((want, _)) if *want != shape => {
                return Err(format!("tensor {name} has shape {shape:?}, the metadata implies {want:?}"));
            }
            Some(_) => {}
        }
        plan.push(Planned {
            unpermute: permuted_heads(name, llama, hp.heads, hp.kv_heads),
            gguf: name.clone(),
            hf,
            shape,
        });
    }
    plan.sort_by(|a, b| a.hf.cmp(&b.hf));
    let have: std::collections::HashSet<&str> = plan.iter().map(|p| p.hf.as_str()).collect();
    if let Some((missing, _)) = expected.iter().find(|(n, (_, required))| *required && !have.contains(n.as_str())) {
        return Err(format!("tensor {missing} (Hugging Face name) is missing"));
    }
    let biases = plan.iter().filter(|p| p.hf.ends_with(".bias")).count();
    let has_bias = biases > 0;
    if has_bias && biases != 3 * hp.layers {
        return Err(format!(
            "{biases} q/k/v bias tensors for {} layers: the engine needs all or none",
            hp.layers
        ));
    }
    if !llama && !has_bias {
        return Err("a qwen2 model without q/k/v biases".into());
    }
    let has_output = have.contains("lm_head.weight");
    drop(have);
    Ok((plan, has_output, has_bias))
}

/// Dequantizes, un-permutes and converts one tensor.
struct Source<'a, R> {
    path: &'a Path,
    content: &'a Content,
    reader: RefCell<R>,
    dtype: Dtype,
    /// The first failure: `View::data` cannot return an error, so it lands here and the
    /// import fails after the write (and the staging folder goes away).
    failed: RefCell<Option<ModelsError>>,
}

impl<R: Read + Seek> Source<'_, R> {
    fn load(&self, p: &Planned) -> Result<Vec<u8>> {
        let bad = |problem: String| ModelsError::file(self.path, format!("tensor {}: {problem}", p.gguf));
        let values: Vec<f32> = (|| -> candle_core::Result<Vec<f32>> {
            let q = self.content.tensor(&mut *self.reader.borrow_mut(), &p.gguf, &Device::Cpu)?;
            q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
        })()
        .map_err(|e| bad(format!("cannot read and dequantize: {e}")))?;
        let values = match p.unpermute {
            None => values,
            Some(heads) => {
                let rows = p.shape[0];
                let cols = p.shape.get(1).copied().unwrap_or(1);
                unpermute_rows(&values, rows, cols, heads).map_err(bad)?
            }
        };
        Ok(self.dtype.encode(&values))
    }
}

/// A tensor whose bytes are made when the safetensors writer asks for them, so the
/// import holds one tensor in memory at a time, not the whole model.
struct Lazy<'a, R> {
    src: &'a Source<'a, R>,
    plan: &'a Planned,
}

impl<R: Read + Seek> safetensors::View for Lazy<'_, R> {
    fn dtype(&self) -> safetensors::Dtype {
        self.src.dtype.safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.plan.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        if self.src.failed.borrow().is_some() {
            return Cow::Owned(vec![]);
        }
        match self.src.load(self.plan) {
            Ok(bytes) => Cow::Owned(bytes),
            Err(e) => {
                *self.src.failed.borrow_mut() = Some(e);
                Cow::Owned(vec![])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.plan.shape.iter().product::<usize>() * self.src.dtype.size()
    }
}

fn write_weights<R: Read + Seek>(gguf: &Path, content: &Content, reader: R, plan: &[Planned], dtype: Dtype, dest: &Path) -> Result<()> {
    let src = Source {
        path: gguf,
        content,
        reader: RefCell::new(reader),
        dtype,
        failed: RefCell::new(None),
    };
    let views: Vec<(String, Lazy<'_, R>)> = plan.iter().map(|p| (p.hf.clone(), Lazy { src: &src, plan: p })).collect();
    let info = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(info), dest).map_err(|e| ModelsError::file(dest, format!("cannot write: {e}")))?;
    match src.failed.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// convert_hf_to_gguf.py's rope_freqs for Llama 3 scaling.
    fn llama_cpp_rope_freqs(theta: f64, dim: usize, factor: f64, low: f64, high: f64, orig: f64) -> Vec<f32> {
        (0..dim)
            .step_by(2)
            .map(|i| {
                let freq = 1.0 / theta.powf(i as f64 / dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < orig / high {
                    1.0
                } else if wavelen > orig / low {
                    factor as f32
                } else {
                    let smooth = (orig / wavelen - low) / (high - low);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect()
    }

    #[test]
    fn llama3_rope_scaling_is_recovered() {
        for factor in [8.0, 32.0] {
            let f = llama_cpp_rope_freqs(500_000.0, 64, factor, 1.0, 4.0, 8192.0);
            let s = fit_llama3_rope(&f, 500_000.0, 64).expect("fits");
            assert_eq!(s["factor"], json!(factor));
            assert_eq!(s["rope_type"], "llama3");
            assert_eq!(s["original_max_position_embeddings"], 8192);
        }
        // Another original context is not guessed.
        let f = llama_cpp_rope_freqs(500_000.0, 64, 8.0, 1.0, 4.0, 4096.0);
        assert!(fit_llama3_rope(&f, 500_000.0, 64).is_none());
    }

    #[test]
    fn dtype_parses_and_encodes() {
        assert_eq!("bf16".parse::<Dtype>().unwrap(), Dtype::Bf16);
        assert!("int8".parse::<Dtype>().is_err());
        assert_eq!(Dtype::F32.encode(&[1.0]), 1.0f32.to_le_bytes());
        assert_eq!(Dtype::Bf16.encode(&[1.0]), [0x80, 0x3f]);
        assert_eq!(Dtype::F16.encode(&[1.0]), [0x00, 0x3c]);
    }
}
