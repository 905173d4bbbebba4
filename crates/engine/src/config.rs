//! A Hugging Face `config.json`, reduced to what the forward pass needs.
use std::path::Path;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
}

/// Llama 3 rope scaling (`rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    #[serde(default)]
    pub original_max_position_embeddings: usize,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Ids {
    One(u32),
    Many(Vec<u32>),
}

/// The fields of `config.json` we read (unknown fields are ignored, as transformers does).
#[derive(Debug, Clone, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    vocab_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<RopeScaling>,
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Ids>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    attention_bias: Option<bool>,
}

/// The model's shape and options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint is stored in (`torch_dtype`).
    pub stored_dtype: String,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::model(path, format!("cannot read: {e}")))?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| EngineError::model(path, format!("not a model config: {e}")))?;
        Self::from_hf(hf).map_err(|problem| EngineError::model(path, problem))
    }

    fn from_hf(hf: HfConfig) -> std::result::Result<Self, String> {
        let kind = hf
            .model_type
            .clone()
            .or_else(|| hf.architectures.first().cloned())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let arch = if kind.starts_with("qwen2") {
            Arch::Qwen2
        } else if kind.starts_with("llama") || kind == "mistral" {
            Arch::Llama
        } else {
            return Err(format!("unsupported architecture {kind:?} (supported: llama, qwen2)"));
        };
        if hf.num_attention_heads == 0 || (!hf.hidden_size.is_multiple_of(hf.num_attention_heads) && hf.head_dim.is_none()) {
            return Err(format!(
                "hidden_size {} does not split into {} heads",
                hf.hidden_size, hf.num_attention_heads
            ));
        }
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if num_kv_heads == 0 || !hf.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(format!(
                "{} attention heads are not a multiple of {num_kv_heads} key/value heads",
                hf.num_attention_heads
            ));
        }
        let rope_scaling = hf.rope_scaling.filter(|r| r.rope_type == "llama3");
        Ok(ModelConfig {
            arch,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            vocab_size: hf.vocab_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads),
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            qkv_bias: hf.attention_bias.unwrap_or(arch == Arch::Qwen2),
            bos_token_id: hf.bos_token_id,
            eos_token_ids: match hf.eos_token_id {
                None => vec![],
                Some(Ids::One(i)) => vec![i],
                Some(Ids::Many(v)) => v,
            },
            stored_dtype: hf.torch_dtype.or(hf.dtype).unwrap_or_else(|| "float32".into()),
        })
    }

    /// Adds the end-of-sequence ids of `generation_config.json` (a list, or one id), as
    /// transformers' generate does: chat models often end turns with a token that
    /// config.json does not name.
    pub fn merge_generation_config(&mut self, path: &Path) -> Result<()> {
        #[derive(Deserialize)]
        struct Gen {
            eos_token_id: Option<Ids>,
        }
        let Ok(text) = std::fs::read_to_string(path) else {
            return Ok(());
        };
        let g: Gen = serde_json::from_str(&text).map_err(|e| EngineError::model(path, format!("not a generation config: {e}")))?;
        let ids = match g.eos_token_id {
            None => vec![],
            Some(Ids::One(i)) => vec![i],
            Some(Ids::Many(v)) => v,
        };
        for id in ids {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        Ok(())
    }

    /// The dtype the checkpoint stores.
    pub fn stored(&self) -> DType {
        match self.stored_dtype.as_str() {
            "bfloat16" => DType::BF16,
            "float16" => DType::F16,
            _ => DType::F32,
        }
    }

    /// A stable hash of everything that shapes the KV cache and its contents; peers
    /// compare it at handshake.
    pub fn fingerprint(&self) -> u64 {
        let text = serde_json::to_string(self).expect("config serialises");
        text.bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
    }

    /// Inverse RoPE frequencies, with Llama 3 scaling when configured.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d).step_by(2).map(|i| 1.0 / self.rope_theta.powf(i as f64 / d as f64)).collect();
        let Some(s) = &self.rope_scaling else {
            return base.into_iter().map(|f| f as f32).collect();
        };
        let orig = s.original_max_position_embeddings as f64;
        let low_wavelen = orig / s.low_freq_factor;
        let high_wavelen = orig / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let scaled = if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                };
                scaled as f32
            })
            .collect()
    }
}
