//! Our forward pass equals candle-transformers' reference implementations on the
//! same synthetic weights: greedy tokens identical, logits within 1e-4 (f32), for
//! prompts at and around block boundaries.
mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use engine::synth::Preset;
use engine::{Arch, DecodeInput, Engine, sample};

const STEPS: usize = 8;
/// Block size 16: lengths around one and two blocks.
const LENGTHS: [usize; 6] = [1, 15, 16, 17, 100, 2 * 16 + 3];

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Runs our engine greedily; returns the logits of every step.
fn ours(engine: &Engine, prompt: &[u32]) -> Vec<Vec<f32>> {
    let seq = engine.next_sequence_id();
    let blocks = engine.admit(seq, prompt.len() + STEPS).unwrap();
    let mut all = vec![engine.prefill(prompt, 0, &blocks).unwrap()];
    let mut tokens = prompt.to_vec();
    for _ in 1..STEPS {
        let next = engine::model::argmax(all.last().unwrap());
        tokens.push(next);
        let step = engine
            .decode(&[DecodeInput {
                token: next,
                pos: tokens.len() - 1,
                blocks: &blocks,
            }])
            .unwrap();
        all.push(step.into_iter().next().unwrap());
    }
    engine.release(seq);
    all
}

fn compare(name: &str, ours: &[Vec<f32>], theirs: &[Vec<f32>]) {
    for (step, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let d = max_diff(a, b);
        assert!(d < 1e-4, "{name}: step {step}: logits differ by {d}");
        assert_eq!(
            engine::model::argmax(a),
            engine::model::argmax(b),
            "{name}: step {step}: greedy tokens differ"
        );
    }
}

/// Runs a reference model greedily for every prompt length and compares with ours.
/// `step(input_ids, position)` returns the reference's last-position logits.
fn against_reference(
    name: &str,
    engine: &Engine,
    salt: u32,
    vocab: usize,
    mut reset: impl FnMut(),
    mut step: impl FnMut(&Tensor, usize) -> Vec<f32>,
) {
    let dev = Device::Cpu;
    for (i, &len) in LENGTHS.iter().enumerate() {
        reset();
        let prompt = common::prompt(len, salt + i as u32, vocab);
        let mut theirs = Vec::new();
        let mut input = Tensor::new(prompt.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
        let mut pos = 0;
        for _ in 0..STEPS {
            let logits = step(&input, pos);
            pos += input.dim(1).unwrap();
            let next = engine::model::argmax(&logits);
            theirs.push(logits);
            input = Tensor::new(&[next], &dev).unwrap().unsqueeze(0).unwrap();
        }
        compare(&format!("{name} prompt {len}"), &ours(engine, &prompt), &theirs);
    }
}

fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}

fn llama_reference(preset: Preset) {
    use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
    let dir = common::model_dir(Arch::Llama, preset);
    let engine = common::engine(Arch::Llama, preset, 64);
    let cfg: LlamaConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let dev = Device::Cpu;
    // SAFETY: test-owned files, not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files(&dir), DType::F32, &dev).unwrap() };
    let model = Llama::load(vb, &cfg).unwrap();
    let cache = std::cell::RefCell::new(Cache::new(true, DType::F32, &cfg, &dev).unwrap());
    against_reference(
        &format!("llama {preset:?}"),
        &engine,
        0,
        cfg.vocab_size,
        || *cache.borrow_mut() = Cache::new(true, DType::F32, &cfg, &dev).unwrap(),
        |input, pos| {
            model
                .forward(input, pos, &mut cache.borrow_mut())
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap()
        },
    );
}

#[test]
fn llama_tiny_matches_candle_transformers() {
    llama_reference(Preset::Tiny);
}

/// Llama 3 rope scaling, GQA 8/4, weights sharded with an index file.
#[test]
fn llama_small_matches_candle_transformers() {
    llama_reference(Preset::Small);
}

#[test]
fn qwen2_tiny_matches_candle_transformers() {
    use candle_transformers::models::qwen2::{Config, ModelForCausalLM};
    let dir = common::model_dir(Arch::Qwen2, Preset::Tiny);
    let engine = common::engine(Arch::Qwen2, Preset::Tiny, 64);
    let cfg: Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let dev = Device::Cpu;
    // SAFETY: test-owned files, not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files(&dir), DType::F32, &dev).unwrap() };
    let model = std::cell::RefCell::new(ModelForCausalLM::new(&cfg, vb).unwrap());
    against_reference(
        "qwen2",
        &engine,
        100,
        cfg.vocab_size,
        || model.borrow_mut().clear_kv_cache(),
        |input, pos| {
            model
                .borrow_mut()
                .forward(input, pos)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap()
        },
    );
}

/// Seeded sampling through the engine repeats exactly.
#[test]
fn seeded_generation_repeats() {
    let engine = common::engine(Arch::Llama, Preset::Tiny, 16);
    let params = engine::SamplingParams {
        temperature: 4.0,
        top_p: 0.98,
        top_k: 200,
        seed: 1234,
        max_tokens: 12,
        ignore_eos: true,
        ..Default::default()
    };
    let prompt = engine.tokenize("Hello, disaggregated world! Привет, 世界").unwrap();
    let a = engine::generate_local(&engine, &prompt, &params).unwrap();
    let b = engine::generate_local(&engine, &prompt, &params).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.tokens.len(), 12);
    let c = engine::generate_local(
        &engine,
        &prompt,
        &engine::SamplingParams {
            seed: 999,
            ..params.clone()
        },
    )
    .unwrap();
    assert_ne!(a.tokens, c.tokens, "another seed, another sample");
    let _ = sample;
}
