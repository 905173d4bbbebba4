//! `pdserve enginebench`: the engine alone, in this process: prefill tokens/s at given
//! prompt lengths and decode tokens/s at given batch sizes (the greedy pick included,
//! through `Engine::decode_pick` as the decode-server does per step), to compare with
//! `scripts/hf_reference.py --bench` on the same weights.
use std::path::PathBuf;
use std::time::Instant;

use engine::model::argmax;
use engine::{DecodeInput, Engine, EngineConfig, Pick, SamplingParams};
use serde::Serialize;

use crate::roofline::{Limits, decode_bytes, prefill_flops};
use crate::units::parse_sizes;

/// The engine as the in-process commands (`enginebench`, `numerics`) load it.
#[derive(clap::Args, Debug)]
pub struct EngineArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// auto (f32 on CPU, bf16 on GPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// `auto` (fused CUDA kernels where they serve) or `reference` (candle's ops).
    #[arg(long, default_value = "auto")]
    pub kernels: String,
    /// `f32` (the fused path's residual stream and logits in f32) or `model`.
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Decode batches up to this size run as CUDA graphs; 0: none.
    #[arg(long, default_value_t = EngineConfig::default().cuda_graph_max_batch)]
    pub cuda_graph_max_batch: usize,
}

impl EngineArgs {
    /// The engine config with these settings, `kernels` as given, and `kv_cache_mib`.
    pub fn config(&self, kernels: &str, kv_cache_mib: u64) -> EngineConfig {
        EngineConfig {
            model: self.model.clone(),
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            kernels: kernels.into(),
            precision: self.precision.clone(),
            kv_cache_mib,
            cuda_graph_max_batch: self.cuda_graph_max_batch,
            ..Default::default()
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Prompt lengths for prefill, comma-separated.
    #[arg(long, default_value = "512,2048")]
    pub prefill: String,
    /// Batch sizes for batched prefill (several prompts of `--prefill-batch-len` tokens
    /// in one forward pass), comma-separated; empty: none.
    #[arg(long, default_value = "")]
    pub prefill_batch: String,
    #[arg(long, default_value_t = 512)]
    pub prefill_batch_len: usize,
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
    /// Instead of timing: compare `--kernels`' logits with `reference` on the same
    /// device (prefill at block boundaries, a prefix continued, a mixed decode batch);
    /// exit 1 when a greedy token differs or the error exceeds --tolerance.
    #[arg(long)]
    pub check: bool,
    /// Largest allowed |a - b| / max|b| of a logits vector in --check.
    #[arg(long, default_value_t = 2e-2)]
    pub tolerance: f32,
    /// In --check, a greedy token may differ from the reference's where the reference
    /// scores it within this share of its largest |logit| of its own pick (a near tie).
    #[arg(long, default_value_t = 2e-3)]
    pub tie: f32,
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The GPU's memory bandwidth in GB/s for the roofline column (0: from the table of
    /// known GPUs, by the name nvidia-smi reports).
    #[arg(long, default_value_t = 0.0)]
    pub hbm_gbps: f64,
    /// The GPU's dense bf16 tensor-core peak in TFLOP/s (0: from the table).
    #[arg(long, default_value_t = 0.0)]
    pub peak_tflops: f64,
}

#[derive(Serialize, Debug)]
pub struct Row {
    pub what: String,
    pub tokens_per_s: f64,
    pub ms: f64,
    /// Bytes a decode step must read and write at least, or FLOPs of a prefill.
    pub work: f64,
    /// Share of the roofline reached: decode work / time / memory bandwidth, prefill
    /// FLOPs / time / tensor-core peak (None: the GPU's figures are unknown).
    pub roofline: Option<f64>,
}

/// The report `enginebench --json` writes.
#[derive(Serialize, Debug)]
struct Report<'a> {
    limits: Option<&'a Limits>,
    rows: &'a [Row],
}

fn tokens(n: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| 3 + ((i * 7919 + salt * 104_729) % (vocab - 3)) as u32).collect()
}

/// Each prompt whole, in its blocks, for one batched prefill pass.
fn whole_prompts<'a>(prompts: &'a [Vec<u32>], tables: &'a [Vec<u32>], params: &'a SamplingParams) -> Vec<engine::PrefillPart<'a>> {
    prompts
        .iter()
        .zip(tables)
        .map(|(p, bl)| engine::PrefillPart {
            prompt: p,
            from: 0,
            to: p.len(),
            blocks: bl,
            params,
        })
        .collect()
}

fn load(a: &Args, kernels: &str) -> anyhow::Result<Engine> {
    Ok(tokio::task::block_in_place(|| {
        Engine::load(&a.engine.config(kernels, a.kv_cache_mib))
    })?)
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    if a.check {
        return check(&a);
    }
    let e = load(&a, &a.engine.kernels)?;
    let vocab = e.config().vocab_size;
    let cfg = e.config().clone();
    let dtype_bytes = e.layout().dtype_size();
    // The tensor-core peak is bf16/f16's: an f32 model's prefill is measured against it too.
    let limits = match a.engine.device.strip_prefix("cuda") {
        Some(n) => {
            let index = n.trim_start_matches(':').parse().unwrap_or(0);
            Limits::of(&Limits::gpu_name(index).unwrap_or_default(), a.hbm_gbps, a.peak_tflops)
        }
        None => None,
    };
    let prefill_row = |what: String, prompts: usize, tokens: usize, seconds: f64| {
        let work = prefill_flops(&cfg, tokens, prompts);
        Row {
            what,
            tokens_per_s: tokens as f64 / seconds,
            ms: seconds * 1e3,
            work,
            roofline: limits.as_ref().map(|l| l.prefill_fraction(work, seconds)),
        }
    };
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
            rows.push(prefill_row(format!("prefill {n} tokens"), 1, n, best));
        }
        let batches = if a.prefill_batch.is_empty() {
            Vec::new()
        } else {
            parse_sizes(&a.prefill_batch).map_err(anyhow::Error::msg)?
        };
        for b in batches {
            let (b, n) = (b as usize, a.prefill_batch_len.max(1));
            let prompts: Vec<Vec<u32>> = (0..b).map(|s| tokens(n, 300 + s, vocab)).collect();
            let greedy = SamplingParams::default();
            let mut best = f64::MAX;
            for rep in 0..4 {
                let seqs: Vec<u64> = (0..b).map(|_| e.next_sequence_id()).collect();
                let tables = seqs.iter().map(|&s| e.admit(s, n)).collect::<engine::Result<Vec<_>>>()?;
                let parts = whole_prompts(&prompts, &tables, &greedy);
                let t = Instant::now();
                e.prefill_batch_pick(&parts)?;
                let dt = t.elapsed().as_secs_f64();
                for s in seqs {
                    e.release(s);
                }
                if rep > 0 {
                    best = best.min(dt);
                }
            }
            rows.push(prefill_row(format!("prefill batch {b} x {n} tokens"), b, b * n, best));
        }
        for b in parse_sizes(&a.batch).map_err(anyhow::Error::msg)? {
            let b = b as usize;
            let mut seqs = Vec::new();
            for s in 0..b {
                let seq = e.next_sequence_id();
                let blocks = e.admit(seq, a.context + a.steps + 8)?;
                let p = tokens(a.context, 100 + s, vocab);
                let logits = e.prefill(&p, 0, &blocks)?;
                seqs.push((seq, blocks, argmax(&logits), a.context));
            }
            let greedy = SamplingParams::default();
            let step = |seqs: &mut Vec<(u64, Vec<u32>, u32, usize)>| -> anyhow::Result<()> {
                let batch: Vec<DecodeInput> = seqs
                    .iter()
                    .map(|(_, bl, t, pos)| DecodeInput {
                        token: *t,
                        pos: *pos,
                        blocks: bl,
                    })
                    .collect();
                let picks = vec![
                    Pick {
                        params: &greedy,
                        history: &[],
                        step: 0,
                    };
                    batch.len()
                ];
                let next = e.decode_pick(&batch, &picks)?;
                drop(batch);
                for (s, t) in seqs.iter_mut().zip(next) {
                    s.2 = t;
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
            // The step in the middle of the timed ones: its contexts are the average.
            let contexts = vec![a.context + a.steps / 2; b];
            let work = decode_bytes(&cfg, dtype_bytes, &contexts);
            let step_s = dt / a.steps as f64;
            rows.push(Row {
                what: format!("decode batch {b}"),
                tokens_per_s: (b * a.steps) as f64 / dt,
                ms: step_s * 1e3,
                work,
                roofline: limits.as_ref().map(|l| l.decode_fraction(work, step_s)),
            });
        }
        Ok(())
    })?;
    match &limits {
        Some(l) => println!(
            "roofline: {} at {} GB/s and {} TFLOP/s (decode: bytes a step must move / step time / bandwidth; prefill: FLOPs / time / peak)\n",
            l.gpu, l.hbm_gbps, l.peak_tflops
        ),
        None if a.engine.device.starts_with("cuda") => {
            println!("roofline: GPU not in the table; give --hbm-gbps and --peak-tflops\n")
        }
        None => {}
    }
    println!("| measurement | tokens/s | ms (per prefill / per step) | of roofline |\n|---|---|---|---|");
    for r in &rows {
        let roof = r.roofline.map(|f| format!("{:.1}%", f * 100.0)).unwrap_or_else(|| "n/a".into());
        println!("| {} | {:.0} | {:.2} | {roof} |", r.what, r.tokens_per_s, r.ms);
    }
    if let Some(p) = &a.json {
        let report = Report {
            limits: limits.as_ref(),
            rows: &rows,
        };
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(0)
}

/// Whether `a` picks the greedy token `b` does, or one the reference `b` scores within
/// `tie` (relative to its largest |logit|) of its own best: two bf16 implementations
/// may order a near tie either way.
fn same_pick(a: &[f32], b: &[f32], tie: f32) -> bool {
    let (pa, pb) = (argmax(a) as usize, argmax(b) as usize);
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(f32::MIN_POSITIVE);
    pa == pb || (b[pb] - b[pa]) <= tie * scale
}

/// Largest |a - b| relative to the largest |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(f32::MIN_POSITIVE);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// `--check`: the engine under test against `reference` kernels, on one device.
fn check(a: &Args) -> anyhow::Result<i32> {
    let (test, refe) = (load(a, &a.engine.kernels)?, load(a, "reference")?);
    let vocab = test.config().vocab_size;
    let bs = test.layout().block_size;
    let mut rows: Vec<(String, f32, bool)> = Vec::new();
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        let lens = [1, bs - 1, bs, bs + 1, 100, 2 * bs + 3, 515];
        let mut seqs = Vec::new();
        for (i, &n) in lens.iter().enumerate() {
            let p = tokens(n, i, vocab);
            let run = |e: &Engine, split: usize| -> anyhow::Result<(u64, Vec<u32>, Vec<f32>)> {
                let seq = e.next_sequence_id();
                let blocks = e.admit(seq, n + 16)?;
                if split > 0 {
                    e.prefill(&p[..split], 0, &blocks)?;
                }
                let l = e.prefill(&p[split..], split, &blocks)?;
                Ok((seq, blocks, l))
            };
            let (ts, tb, tl) = run(&test, 0)?;
            let (rs, rb, rl) = run(&refe, 0)?;
            rows.push((format!("prefill {n}"), rel_err(&tl, &rl), same_pick(&tl, &rl, a.tie)));
            if n > bs {
                // A cached prefix continued: the second part attends to the first's K/V.
                let (s2, _, l2) = run(&test, n / 2)?;
                rows.push((
                    format!("prefill {n} as {} + {}", n / 2, n - n / 2),
                    rel_err(&l2, &rl),
                    same_pick(&l2, &rl, a.tie),
                ));
                test.release(s2);
            }
            seqs.push((ts, tb, rs, rb, argmax(&rl), n));
        }
        // The same prompts in one batched prefill pass (a varlen batch: each its own
        // tiles, table and causal context): each prompt's first greedy token as its
        // own pass on the reference gave it.
        let prompts: Vec<Vec<u32>> = lens.iter().enumerate().map(|(i, &n)| tokens(n, i, vocab)).collect();
        let greedy = SamplingParams::default();
        let seqs_b: Vec<u64> = prompts.iter().map(|_| test.next_sequence_id()).collect();
        let tables = seqs_b
            .iter()
            .zip(&prompts)
            .map(|(&s, p)| test.admit(s, p.len()))
            .collect::<engine::Result<Vec<_>>>()?;
        let parts = whole_prompts(&prompts, &tables, &greedy);
        let picked = test.prefill_batch_pick(&parts)?;
        let expected: Vec<Option<u32>> = seqs.iter().map(|s| Some(s.4)).collect();
        rows.push((
            format!("prefill batch of {} prompts: first tokens", prompts.len()),
            0.0,
            picked == expected,
        ));
        for s in seqs_b {
            test.release(s);
        }
        // A continuous batch of all the lengths, decoded greedily in both.
        for step in 0..8 {
            let batch = |test_side: bool| -> Vec<DecodeInput<'_>> {
                seqs.iter()
                    .map(|(_, tb, _, rb, tok, pos)| DecodeInput {
                        token: *tok,
                        pos: *pos,
                        blocks: if test_side { tb } else { rb },
                    })
                    .collect()
            };
            let tl = test.decode(&batch(true))?;
            let rl = refe.decode(&batch(false))?;
            let err = tl.iter().zip(&rl).map(|(x, y)| rel_err(x, y)).fold(0f32, f32::max);
            let same = tl.iter().zip(&rl).all(|(x, y)| same_pick(x, y, a.tie));
            rows.push((format!("decode step {step}, batch {}", seqs.len()), err, same));
            // The same step picked on the device: ids equal the host's argmax of its logits.
            let greedy = SamplingParams::default();
            let picks = vec![
                Pick {
                    params: &greedy,
                    history: &[],
                    step: 0,
                };
                seqs.len()
            ];
            let picked = test.decode_pick(&batch(true), &picks)?;
            let host: Vec<u32> = tl.iter().map(|l| argmax(l)).collect();
            rows.push((format!("decode step {step}: device pick == host argmax"), 0.0, picked == host));
            for (s, l) in seqs.iter_mut().zip(&rl) {
                s.4 = argmax(l);
                s.5 += 1;
            }
        }
        for (ts, _, rs, ..) in &seqs {
            test.release(*ts);
            refe.release(*rs);
        }
        Ok(())
    })?;
    println!("| case | max rel. error of logits | same greedy token (or a near tie, --tie) |\n|---|---|---|");
    let mut ok = true;
    for (what, err, same) in &rows {
        ok &= *same && *err <= a.tolerance;
        println!("| {what} | {err:.2e} | {same} |");
    }
    println!("\nkernels {} vs reference: {}", a.engine.kernels, if ok { "PASS" } else { "FAIL" });
    Ok(if ok { 0 } else { 1 })
}
