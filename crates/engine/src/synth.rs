//! `pdserve model synth`: a complete model directory (config, tokenizer, safetensors)
//! with deterministic random weights, in the shapes of real models. No model hub is
//! reachable from our machines, so this is the default model of the main command, the
//! tests and the benchmarks; real weights load through the same path.
use std::collections::HashMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::config::Arch;
use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// 2 layers, hidden 64: tests and the CPU main command.
    Tiny,
    /// 4 layers, hidden 256.
    Small,
    /// Llama-3.2-1B dimensions (16 layers, hidden 2048, GQA 32/8, vocab 128256), bf16.
    OneB,
    /// Llama-3-8B dimensions (32 layers, hidden 4096, GQA 32/8, vocab 128256), bf16.
    EightB,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            "1b" => Ok(Preset::OneB),
            "8b" => Ok(Preset::EightB),
            _ => Err(format!("unknown preset {s:?} (tiny, small, 1b, 8b)")),
        }
    }
}

struct Shape {
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    trained_vocab: usize,
    max_pos: usize,
    bf16: bool,
    shards: usize,
    llama3_rope: bool,
}

fn shape(p: Preset) -> Shape {
    match p {
        Preset::Tiny => Shape {
            hidden: 64,
            inter: 176,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 512,
            trained_vocab: 512,
            max_pos: 4096,
            bf16: false,
            shards: 1,
            llama3_rope: false,
        },
        Preset::Small => Shape {
            hidden: 256,
            inter: 688,
            layers: 4,
            heads: 8,
            kv_heads: 4,
            vocab: 2048,
            trained_vocab: 1024,
            max_pos: 8192,
            bf16: false,
            shards: 2,
            llama3_rope: true,
        },
        Preset::OneB => Shape {
            hidden: 2048,
            inter: 8192,
            layers: 16,
            heads: 32,
            kv_heads: 8,
            vocab: 128_256,
            trained_vocab: 1024,
            max_pos: 131_072,
            bf16: true,
            shards: 2,
            llama3_rope: true,
        },
        Preset::EightB => Shape {
            hidden: 4096,
            inter: 14_336,
            layers: 32,
            heads: 32,
            kv_heads: 8,
            vocab: 128_256,
            trained_vocab: 1024,
            max_pos: 131_072,
            bf16: true,
            shards: 4,
            llama3_rope: true,
        },
    }
}

/// Text the synthetic tokenizer is trained on: several scripts, so multilingual
/// prompts tokenize into real merges as well as byte fallbacks.
const CORPUS: &str = "The quick brown fox jumps over the lazy dog. Disaggregated serving splits prefill and decode across machines; \
the KV cache moves between GPUs with one-sided RDMA writes. Large language models generate one token at a time. \
Le renard brun rapide saute par-dessus le chien paresseux. La mémoire du cache est transférée entre les machines. \
Der schnelle braune Fuchs springt über den faulen Hund. Die Übertragung läuft direkt von GPU zu GPU. \
El rápido zorro marrón salta sobre el perro perezoso. ¿Dónde está la biblioteca? Mañana será otro día. \
Быстрая коричневая лиса прыгает через ленивую собаку. Модель генерирует текст по одному токену. \
敏捷的棕色狐狸跳过了懒狗。大型语言模型一次生成一个词元。预填充和解码分开运行。 \
素早い茶色の狐がのろまな犬を飛び越える。言語モデルはトークンを一つずつ生成する。 \
الثعلب البني السريع يقفز فوق الكلب الكسول. النموذج يولد النص كلمة بكلمة. \
fn main() { let x = vec![1, 2, 3]; println!(\"{:?}\", x.iter().sum::<i32>()); } def f(x): return x * 2 \
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2026. Emoji: 🚀✨🙂. Punctuation: (a), [b], {c}, <d>, \"e\", 'f'.";

fn write_tokenizer(path: &Path, trained: usize, vocab: usize) -> Result<()> {
    use tokenizers::models::TrainerWrapper;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, Tokenizer};
    let err = |e: tokenizers::Error| EngineError::model(path, format!("cannot build tokenizer: {e}"));
    let mut tk = Tokenizer::new(BPE::default());
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tk.with_decoder(Some(ByteLevel::default()));
    let specials = ["<unk>", "<s>", "</s>"].map(|s| AddedToken::from(s, true)).to_vec();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(trained)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let lines: Vec<&str> = CORPUS.split(". ").collect();
    tk.train(&mut trainer, lines.iter().map(|s| s.to_string())).map_err(err)?;
    tk.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("<s> $A")
            .map_err(|e| EngineError::model(path, e))?
            .special_tokens(vec![("<s>", 1)])
            .build()
            .map_err(|e| EngineError::model(path, e.to_string()))?,
    ));
    // Fill the rest of the model's vocabulary, so every id the model can emit decodes.
    let have = tk.get_vocab_size(true);
    let filler: Vec<AddedToken> = (have..vocab).map(|i| AddedToken::from(format!("<|t{i}|>"), false)).collect();
    tk.add_tokens(&filler);
    tk.save(path, false).map_err(err)
}

/// Writes a model directory for `arch` and `preset` with weights drawn from `seed`.
pub fn synthesize(arch: Arch, preset: Preset, seed: u64, out: &Path) -> Result<()> {
    let s = shape(preset);
    std::fs::create_dir_all(out).map_err(|e| EngineError::model(out, format!("cannot create: {e}")))?;
    let head_dim = s.hidden / s.heads;
    let mut config = json!({
        "architectures": [if arch == Arch::Qwen2 { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": if arch == Arch::Qwen2 { "qwen2" } else { "llama" },
        "hidden_size": s.hidden,
        "intermediate_size": s.inter,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": head_dim,
        "vocab_size": s.vocab,
        "max_position_embeddings": s.max_pos,
        "rms_norm_eps": 1e-5,
        "rope_theta": if arch == Arch::Qwen2 { 1_000_000.0 } else if s.llama3_rope { 500_000.0 } else { 10_000.0 },
        "hidden_act": "silu",
        "tie_word_embeddings": true,
        "attention_bias": arch == Arch::Qwen2,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": if s.bf16 { "bfloat16" } else { "float32" },
        "pdserve_synthetic": { "preset": format!("{preset:?}"), "seed": seed },
    });
    if arch == Arch::Qwen2 {
        config["sliding_window"] = json!(s.max_pos);
        config["max_window_layers"] = json!(s.layers);
        config["use_sliding_window"] = json!(false);
    }
    if s.llama3_rope && arch == Arch::Llama {
        config["rope_scaling"] = json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    }
    let cfg_path = out.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&config).unwrap()).map_err(|e| EngineError::model(&cfg_path, e.to_string()))?;
    write_tokenizer(&out.join("tokenizer.json"), s.trained_vocab, s.vocab)?;
    // A ChatML template, so chat requests run on synthetic models too.
    let tc_path = out.join("tokenizer_config.json");
    let tc = json!({
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "bos_token": "<s>",
        "eos_token": "</s>",
    });
    std::fs::write(&tc_path, serde_json::to_string_pretty(&tc).unwrap()).map_err(|e| EngineError::model(&tc_path, e.to_string()))?;

    // (name, shape, init): init is the uniform half-range, or a norm weight.
    enum Init {
        Uniform(f32),
        Norm,
    }
    let (h, kv) = (s.hidden, s.kv_heads * head_dim);
    let lin = |fan_in: usize| Init::Uniform((3.0f32).sqrt() / (fan_in as f32).sqrt());
    let resid = |fan_in: usize| Init::Uniform((3.0f32).sqrt() / (fan_in as f32).sqrt() / (2.0 * s.layers as f32).sqrt());
    let mut tensors: Vec<(String, Vec<usize>, Init)> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![s.vocab, h],
            Init::Uniform(4.0 * (3.0f32).sqrt() / (h as f32).sqrt()),
        ),
        ("model.norm.weight".into(), vec![h], Init::Norm),
    ];
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        tensors.push((format!("{p}.input_layernorm.weight"), vec![h], Init::Norm));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![h], Init::Norm));
        tensors.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h], lin(h)));
        tensors.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h], lin(h)));
        tensors.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h], lin(h)));
        tensors.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h], resid(h)));
        if arch == Arch::Qwen2 {
            tensors.push((format!("{p}.self_attn.q_proj.bias"), vec![h], Init::Uniform(0.1)));
            tensors.push((format!("{p}.self_attn.k_proj.bias"), vec![kv], Init::Uniform(0.1)));
            tensors.push((format!("{p}.self_attn.v_proj.bias"), vec![kv], Init::Uniform(0.1)));
        }
        tensors.push((format!("{p}.mlp.gate_proj.weight"), vec![s.inter, h], lin(h)));
        tensors.push((format!("{p}.mlp.up_proj.weight"), vec![s.inter, h], lin(h)));
        tensors.push((format!("{p}.mlp.down_proj.weight"), vec![h, s.inter], resid(s.inter)));
    }
    let total: usize = tensors.iter().map(|(_, sh, _)| sh.iter().product::<usize>()).sum();
    let per_shard = total.div_ceil(s.shards);
    let elem = if s.bf16 { 2 } else { 4 };
    let mut weight_map = HashMap::new();
    let mut shard_items: Vec<Vec<usize>> = vec![vec![]];
    let mut acc = 0;
    for (i, (_, sh, _)) in tensors.iter().enumerate() {
        if acc >= per_shard * shard_items.len() && shard_items.len() < s.shards {
            shard_items.push(vec![]);
        }
        shard_items.last_mut().unwrap().push(i);
        acc += sh.iter().product::<usize>();
    }
    let n_shards = shard_items.len();
    for (si, items) in shard_items.iter().enumerate() {
        let file = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n_shards)
        };
        // Each tensor has its own seeded stream, so drawing them on several threads gives
        // the same bytes as one thread; an 8B model takes seconds instead of minutes.
        let draw = |i: usize| {
            let (name, sh, init) = &tensors[i];
            let n: usize = sh.iter().product();
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv(name));
            let mut bytes = Vec::with_capacity(n * elem);
            for _ in 0..n {
                let v = match init {
                    Init::Uniform(a) => rng.random_range(-*a..*a),
                    Init::Norm => 1.0 + rng.random_range(-0.1f32..0.1),
                };
                if s.bf16 {
                    bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                } else {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
            (name.clone(), sh.clone(), bytes)
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len().max(1));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut drawn: Vec<(usize, Drawn)> = std::thread::scope(|sc| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    sc.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&i) = items.get(k) else { break mine };
                            mine.push((k, draw(i)));
                        }
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().expect("synth worker panicked")).collect()
        });
        drawn.sort_by_key(|(k, _)| *k);
        let data: Vec<Drawn> = drawn.into_iter().map(|(_, t)| t).collect();
        for (name, _, _) in &data {
            weight_map.insert(name.clone(), file.clone());
        }
        let dtype = if s.bf16 {
            safetensors::Dtype::BF16
        } else {
            safetensors::Dtype::F32
        };
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(n, sh, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(dtype, sh.clone(), b).expect("sizes match"),
                )
            })
            .collect();
        let path = out.join(&file);
        safetensors::tensor::serialize_to_file(views, None, &path).map_err(|e| EngineError::model(&path, e.to_string()))?;
    }
    if n_shards > 1 {
        let index = json!({ "metadata": { "total_size": total * elem }, "weight_map": weight_map });
        let p = out.join("model.safetensors.index.json");
        std::fs::write(&p, serde_json::to_string_pretty(&index).unwrap()).map_err(|e| EngineError::model(&p, e.to_string()))?;
    }
    Ok(())
}

/// One tensor's name, shape and little-endian bytes.
type Drawn = (String, Vec<usize>, Vec<u8>);

fn fnv(s: &str) -> u64 {
    s.bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}
