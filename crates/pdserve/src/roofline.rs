//! The hardware's limits for `pdserve enginebench`: a decode step reads every weight
//! once and the batch's KV, so its time is at least those bytes over the GPU's memory
//! bandwidth; a prefill is at least its FLOPs over the tensor cores' peak. The figures
//! are the vendors' datasheet ones (dense bf16, no sparsity), or given on the command
//! line for GPUs not in the table.
use engine::ModelConfig;
use serde::Serialize;

/// One GPU's limits.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Limits {
    pub gpu: String,
    /// Memory bandwidth, GB/s (10^9 bytes).
    pub hbm_gbps: f64,
    /// Dense bf16 tensor-core peak, TFLOP/s.
    pub peak_tflops: f64,
}

/// Datasheet figures by a substring of the name the driver reports, most specific first.
const GPUS: [(&str, f64, f64); 12] = [
    ("H200", 4800.0, 989.0),
    ("H100 NVL", 3900.0, 835.0),
    ("H100 PCIe", 2000.0, 756.0),
    ("H100", 3350.0, 989.0),
    ("GH200", 4000.0, 989.0),
    ("B200", 8000.0, 2250.0),
    ("A100-SXM4-80GB", 2039.0, 312.0),
    ("A100 80GB PCIe", 1935.0, 312.0),
    ("A100", 1555.0, 312.0),
    ("L40S", 864.0, 362.0),
    ("L40", 864.0, 181.0),
    ("L4", 300.0, 121.0),
];

impl Limits {
    /// The limits of the GPU named `name` (as `nvidia-smi` reports it), each overridden
    /// by a nonzero flag; None when neither names both figures.
    pub fn of(name: &str, hbm_gbps: f64, peak_tflops: f64) -> Option<Limits> {
        // "GH200" contains "H200": the table's longer names come first where it matters.
        let known = GPUS
            .iter()
            .filter(|(n, ..)| name.contains(n))
            .max_by_key(|(n, ..)| n.len())
            .map(|&(_, b, f)| (b, f));
        let hbm = if hbm_gbps > 0.0 { hbm_gbps } else { known?.0 };
        let peak = if peak_tflops > 0.0 { peak_tflops } else { known?.1 };
        Some(Limits {
            gpu: name.to_string(),
            hbm_gbps: hbm,
            peak_tflops: peak,
        })
    }

    /// The name of GPU `index` (as CUDA numbers it, with CUDA_VISIBLE_DEVICES unset),
    /// from `nvidia-smi`.
    pub fn gpu_name(index: u32) -> Option<String> {
        let out = std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=name", "--format=csv,noheader", &format!("--id={index}")])
            .output()
            .ok()?;
        let name = String::from_utf8_lossy(&out.stdout).lines().next()?.trim().to_string();
        (!name.is_empty()).then_some(name)
    }

    /// Share of the bandwidth a decode step of `seconds` reaching `bytes` uses.
    pub fn decode_fraction(&self, bytes: f64, seconds: f64) -> f64 {
        bytes / seconds / (self.hbm_gbps * 1e9)
    }

    /// Share of the tensor cores' peak a prefill of `flops` in `seconds` uses.
    pub fn prefill_fraction(&self, flops: f64, seconds: f64) -> f64 {
        flops / seconds / (self.peak_tflops * 1e12)
    }
}

/// Weights of one decoder layer's matmuls and norms (elements).
fn layer_weights(c: &ModelConfig) -> f64 {
    let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let q = (c.num_heads * c.head_dim) as f64;
    let kv = (c.num_kv_heads * c.head_dim) as f64;
    let bias = if c.qkv_bias { q + 2.0 * kv } else { 0.0 };
    h * (q + 2.0 * kv) + bias + q * h + 3.0 * h * i + 2.0 * h
}

/// Bytes one decode step must move at least: every layer's weights, the final norm and
/// the LM head once, each sequence's embedding row, the K/V of its context read and of
/// its new token written. `contexts`: each sequence's length before the step.
pub fn decode_bytes(c: &ModelConfig, dtype_bytes: usize, contexts: &[usize]) -> f64 {
    let d = dtype_bytes as f64;
    let (h, v) = (c.hidden_size as f64, c.vocab_size as f64);
    let weights = c.num_layers as f64 * layer_weights(c) + h + v * h;
    let kv_token = (c.num_layers * 2 * c.num_kv_heads * c.head_dim) as f64;
    let tokens: f64 = contexts.iter().map(|&n| (n + 1) as f64).sum();
    (weights + contexts.len() as f64 * h + kv_token * tokens) * d
}

/// FLOPs of a causal prefill of `tokens` positions (no cached prefix) in `prompts`
/// prompts: the matmuls (2 per weight and token), attention (q.k and p.v over each
/// position's causal context) and the LM head for each prompt's last position.
pub fn prefill_flops(c: &ModelConfig, tokens: usize, prompts: usize) -> f64 {
    let per_prompt = (tokens / prompts.max(1)) as f64;
    let matmuls = 2.0 * c.num_layers as f64 * layer_weights(c) * tokens as f64;
    // Query i attends i + 1 keys: per head and layer 2 * d * (i + 1) FLOPs for q.k and
    // as many for p.v, summed over i.
    let pairs = per_prompt * (per_prompt + 1.0) / 2.0 * prompts as f64;
    let attention = 4.0 * (c.num_layers * c.num_heads * c.head_dim) as f64 * pairs;
    let head = 2.0 * (c.vocab_size * c.hidden_size) as f64 * prompts as f64;
    matmuls + attention + head
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama-3.2-1B's shape (`pdserve model synth --preset 1b`).
    fn llama_1b() -> ModelConfig {
        ModelConfig {
            arch: engine::Arch::Llama,
            hidden_size: 2048,
            intermediate_size: 8192,
            vocab_size: 128_256,
            num_layers: 16,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: None,
            max_position_embeddings: 131_072,
            tie_word_embeddings: true,
            qkv_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            stored_dtype: "bfloat16".into(),
        }
    }

    #[test]
    fn gpus_are_found_by_the_most_specific_name_and_flags_override() {
        assert_eq!(Limits::of("NVIDIA H200", 0.0, 0.0).unwrap().hbm_gbps, 4800.0);
        assert_eq!(Limits::of("NVIDIA GH200 480GB", 0.0, 0.0).unwrap().hbm_gbps, 4000.0);
        assert_eq!(Limits::of("NVIDIA H100 80GB HBM3", 0.0, 0.0).unwrap().hbm_gbps, 3350.0);
        assert_eq!(Limits::of("NVIDIA H100 PCIe", 0.0, 0.0).unwrap().peak_tflops, 756.0);
        assert_eq!(Limits::of("NVIDIA A100-SXM4-80GB", 0.0, 0.0).unwrap().hbm_gbps, 2039.0);
        assert_eq!(Limits::of("NVIDIA L40", 0.0, 0.0).unwrap().peak_tflops, 181.0);
        assert_eq!(Limits::of("NVIDIA L40S", 0.0, 0.0).unwrap().peak_tflops, 362.0);
        assert!(Limits::of("Some GPU", 0.0, 0.0).is_none());
        assert!(Limits::of("Some GPU", 1000.0, 0.0).is_none());
        let given = Limits::of("Some GPU", 1000.0, 200.0).unwrap();
        assert_eq!((given.hbm_gbps, given.peak_tflops), (1000.0, 200.0));
        assert_eq!(Limits::of("NVIDIA H200", 4000.0, 0.0).unwrap().hbm_gbps, 4000.0);
    }

    #[test]
    fn the_1b_shape_reads_its_weights_once_a_step() {
        let c = llama_1b();
        // Llama-3.2-1B: 1.236e9 parameters with the embedding counted once (tied); a
        // decode step reads them in bf16 (~2.47 GB) and, at batch 1 with a context of
        // 128, 129 tokens of K/V (32 KiB each).
        let bytes = decode_bytes(&c, 2, &[128]);
        let kv = 129.0 * 16.0 * 2.0 * 8.0 * 64.0 * 2.0;
        assert!((bytes - kv - 2.0 * 1.2358e9).abs() < 2.0 * 0.001e9, "{bytes}");
        // H200: 0.515 ms at the roofline.
        let l = Limits::of("NVIDIA H200", 0.0, 0.0).unwrap();
        let at_roofline = bytes / 4.8e12;
        assert!((l.decode_fraction(bytes, at_roofline) - 1.0).abs() < 1e-9);
        assert!((at_roofline - 0.515e-3).abs() < 0.005e-3, "{at_roofline}");
    }

    #[test]
    fn prefill_flops_count_matmuls_causal_attention_and_the_head() {
        let c = llama_1b();
        let layers = 16.0 * layer_weights(&c);
        let one = prefill_flops(&c, 1, 1);
        assert!((one - (2.0 * layers + 4.0 * 16.0 * 2048.0 + 2.0 * 128_256.0 * 2048.0)).abs() < 1.0);
        // Two prompts of n cost twice one prompt of n, less than one prompt of 2n.
        let (two, long) = (prefill_flops(&c, 2048, 2), prefill_flops(&c, 2048, 1));
        assert!((two - 2.0 * prefill_flops(&c, 1024, 1)).abs() < 1.0);
        assert!(two < long);
    }
}
