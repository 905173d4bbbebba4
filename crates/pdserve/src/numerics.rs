//! `pdserve numerics`: what a reference implementation needs to judge the engine's
//! arithmetic, for each prompt (token ids): the residual stream after every layer and
//! the first step's logits (raw little-endian f32 files), and the greedy tokens with
//! EOS not ending the generation (`summary.json`). `scripts/numerics_gpu.py` compares
//! them with transformers in f32 and bf16.
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use engine::{Engine, SamplingParams, generate_local};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub engine: crate::enginebench::EngineArgs,
    /// JSON file: a list of prompts, each a list of token ids.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Greedy tokens per prompt.
    #[arg(long, default_value_t = 32)]
    pub tokens: u32,
    /// Write each prompt's per-layer residual stream too (`layers_N.f32`).
    #[arg(long)]
    pub layers: bool,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1024)]
    pub kv_cache_mib: u64,
}

#[derive(Serialize)]
struct Entry {
    prompt: usize,
    tokens: Vec<u32>,
    logits: String,
    /// `[layers, prompt length, hidden]` in `layers_N.f32`, when written.
    layers: Option<(String, [usize; 3])>,
}

fn write_f32(path: &std::path::Path, rows: &[Vec<f32>]) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| path.display().to_string())?);
    for v in rows.iter().flatten() {
        f.write_all(&v.to_le_bytes())?;
    }
    Ok(f.flush()?)
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(&a.prompts).with_context(|| a.prompts.display().to_string())?;
    let prompts: Vec<Vec<u32>> = serde_json::from_str(&text).context("--prompts: a JSON list of token-id lists")?;
    std::fs::create_dir_all(&a.out)?;
    let entries = tokio::task::block_in_place(|| -> anyhow::Result<Vec<Entry>> {
        let e = Engine::load(&a.engine.config(&a.engine.kernels, a.kv_cache_mib))?;
        let hidden = e.config().hidden_size;
        let params = SamplingParams {
            max_tokens: a.tokens,
            ignore_eos: true,
            ..Default::default()
        };
        let mut entries = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            let (layers, logits) = e.trace_prefill(p, a.layers).with_context(|| format!("prompt {i}"))?;
            let logits_file = format!("logits_{i}.f32");
            write_f32(&a.out.join(&logits_file), &[logits])?;
            let layers = if a.layers {
                let name = format!("layers_{i}.f32");
                write_f32(&a.out.join(&name), &layers)?;
                Some((name, [layers.len(), p.len(), hidden]))
            } else {
                None
            };
            let g = generate_local(&e, p, &params).with_context(|| format!("prompt {i}"))?;
            entries.push(Entry {
                prompt: i,
                tokens: g.tokens,
                logits: logits_file,
                layers,
            });
        }
        Ok(entries)
    })?;
    std::fs::write(a.out.join("summary.json"), serde_json::to_string(&entries)?)?;
    println!("numerics: {} prompts written to {}", entries.len(), a.out.display());
    Ok(0)
}
