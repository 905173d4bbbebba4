//! `pdserve enginebench`: the engine alone, in this process: prefill tokens/s at given
//! prompt lengths and decode tokens/s at given batch sizes (logits to the host and a
//! greedy pick included, as the decode-server does per step), to compare with
//! `scripts/hf_reference.py --bench` on the same weights.
use std::path::PathBuf;
use std::time::Instant;

use engine::{DecodeInput, Engine, EngineConfig};
use serde::Serialize;

use crate::units::parse_sizes;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Prompt lengths for prefill, comma-separated.
    #[arg(long, default_value = "512,2048")]
    pub prefill: String,
    /// Batch sizes for decode, comma-separated.
    #[arg(long, default_value = "1,8,32")]
    pub batch: String,
    /// Context each decoding sequence starts with.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    #[arg(long, default_value_t = 8192)]
    pub kv_cache_mib: u64,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize, Debug)]
pub struct Row {
    pub what: String,
    pub tokens_per_s: f64,
    pub ms: f64,
}

fn tokens(n: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| 3 + ((i * 7919 + salt * 104_729) % (vocab - 3)) as u32).collect()
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let e = tokio::task::block_in_place(|| {
        Engine::load(&EngineConfig {
            model: a.model.clone(),
            device: a.device.clone(),
            kv_cache_mib: a.kv_cache_mib,
            ..Default::default()
        })
    })?;
    let vocab = e.config().vocab_size;
    let mut rows = Vec::new();
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        for (i, n) in parse_sizes(&a.prefill).map_err(anyhow::Error::msg)?.into_iter().enumerate() {
            let n = n as usize;
            let p = tokens(n, i, vocab);
            let mut best = f64::MAX;
            for rep in 0..4 {
                let seq = e.next_sequence_id();
                let blocks = e.admit(seq, n)?;
                let t = Instant::now();
                e.prefill(&p, 0, &blocks)?;
                let dt = t.elapsed().as_secs_f64();
                e.release(seq);
                if rep > 0 {
                    best = best.min(dt);
                }
            }
            rows.push(Row {
                what: format!("prefill {n} tokens"),
                tokens_per_s: n as f64 / best,
                ms: best * 1e3,
            });
        }
        for b in parse_sizes(&a.batch).map_err(anyhow::Error::msg)? {
            let b = b as usize;
            let mut seqs = Vec::new();
            for s in 0..b {
                let seq = e.next_sequence_id();
                let blocks = e.admit(seq, a.context + a.steps + 8)?;
                let p = tokens(a.context, 100 + s, vocab);
                let logits = e.prefill(&p, 0, &blocks)?;
                seqs.push((seq, blocks, engine::model::argmax(&logits), a.context));
            }
            let step = |seqs: &mut Vec<(u64, Vec<u32>, u32, usize)>| -> anyhow::Result<()> {
                let batch: Vec<DecodeInput> = seqs
                    .iter()
                    .map(|(_, bl, t, pos)| DecodeInput {
                        token: *t,
                        pos: *pos,
                        blocks: bl,
                    })
                    .collect();
                let out = e.decode(&batch)?;
                for (s, l) in seqs.iter_mut().zip(out) {
                    s.2 = engine::model::argmax(&l);
                    s.3 += 1;
                }
                Ok(())
            };
            step(&mut seqs)?;
            let t = Instant::now();
            for _ in 0..a.steps {
                step(&mut seqs)?;
            }
            let dt = t.elapsed().as_secs_f64();
            for (seq, ..) in &seqs {
                e.release(*seq);
            }
            rows.push(Row {
                what: format!("decode batch {b}"),
                tokens_per_s: (b * a.steps) as f64 / dt,
                ms: dt * 1e3 / a.steps as f64,
            });
        }
        Ok(())
    })?;
    println!("| measurement | tokens/s | ms (per prefill / per step) |\n|---|---|---|");
    for r in &rows {
        println!("| {} | {:.0} | {:.2} |", r.what, r.tokens_per_s, r.ms);
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(0)
}
