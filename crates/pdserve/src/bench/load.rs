//! Sends a workload to a router under a closed loop (a fixed number of requests in
//! flight) or an open loop (Poisson arrivals at a rate), streaming every answer.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use proto::v1 as pb;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::stats::Record;
use super::workload::Prompt;

/// How requests arrive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// `n` requests in flight; each finished one is replaced at once.
    Closed(usize),
    /// Poisson arrivals at this many requests per second, however many are in flight.
    Open(f64),
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Closed(c) => write!(f, "concurrency {c}"),
            Load::Open(r) => write!(f, "rate {r}/s"),
        }
    }
}

/// What every request of a run shares.
#[derive(Clone)]
pub struct Shot {
    pub client: pb::generation_client::GenerationClient<Channel>,
    pub seed: u64,
    pub temperature: f32,
    pub timeout: Duration,
    pub label: String,
    pub client_args: crate::client::ClientArgs,
}

/// Runs the prompts under `load`; returns every request's record (in workload order) and
/// the run's duration in seconds.
pub async fn run(shot: &Shot, prompts: &[Prompt], load: Load, progress: bool) -> anyhow::Result<(Vec<Record>, f64)> {
    let bar = if progress {
        ProgressBar::new(prompts.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}").expect("valid template"));
    bar.set_prefix(format!("{} {load}", shot.label));
    let start = Instant::now();
    let prompts: Arc<Vec<Prompt>> = Arc::new(prompts.to_vec());
    let mut records = Vec::with_capacity(prompts.len());
    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Closed(c) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..c.max(1) {
                let (shot, prompts, bar, next) = (shot.clone(), prompts.clone(), bar.clone(), next.clone());
                tasks.spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= prompts.len() {
                            return out;
                        }
                        out.push(one(&shot, i, &prompts[i], start).await);
                        bar.inc(1);
                    }
                });
            }
        }
        Load::Open(rate) => {
            anyhow::ensure!(rate > 0.0, "the request rate must be above 0");
            let mut rng = ChaCha8Rng::seed_from_u64(shot.seed ^ 0x9e37_79b9_7f4a_7c15);
            let mut at = 0.0f64;
            for i in 0..prompts.len() {
                tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
                let (shot, prompts, bar) = (shot.clone(), prompts.clone(), bar.clone());
                tasks.spawn(async move {
                    let r = one(&shot, i, &prompts[i], start).await;
                    bar.inc(1);
                    vec![r]
                });
                // Exponential gaps: a Poisson process of `rate` per second.
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                at += -u.ln() / rate;
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        records.extend(r?);
    }
    let duration = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    records.sort_by_key(|r| r.index);
    Ok((records, duration))
}

/// Sends one request and streams its answer, timing it on the client's clock.
async fn one(shot: &Shot, index: usize, p: &Prompt, start: Instant) -> Record {
    let (mut client, seed, temperature, timeout) = (shot.client.clone(), shot.seed, shot.temperature, shot.timeout);
    let mut rec = Record {
        index,
        request_id: format!("bench-{seed}-{index}"),
        input_tokens: p.input_tokens.unwrap_or(0),
        ..Default::default()
    };
    let req = pb::GenerateRequest {
        request_id: rec.request_id.clone(),
        input: Some(p.input.clone()),
        sampling: Some(pb::SamplingParameters {
            temperature: Some(temperature),
            seed: Some(seed.wrapping_add(index as u64)),
            max_tokens: Some(p.output_len as u32),
            ignore_eos: Some(true),
            ..Default::default()
        }),
    };
    let t0 = Instant::now();
    rec.sent_s = (t0 - start).as_secs_f64();
    let ms = |t: Instant| (t - t0).as_secs_f64() * 1e3;
    let body = async {
        let mut s = client.generate(shot.client_args.request(req)).await?.into_inner();
        let mut last: Option<Instant> = None;
        while let Some(msg) = s.next().await {
            match msg?.kind {
                Some(pb::generate_response::Kind::Chunk(c)) if !c.token_ids.is_empty() => {
                    let now = Instant::now();
                    match last {
                        None => rec.ttft_ms = ms(now),
                        Some(prev) => {
                            let gap = (now - prev).as_secs_f64() * 1e3 / c.token_ids.len() as f64;
                            rec.itl_ms.extend(std::iter::repeat_n(gap, c.token_ids.len()));
                        }
                    }
                    last = Some(now);
                }
                Some(pb::generate_response::Kind::Result(r)) => return Ok(r),
                _ => {}
            }
        }
        Err(tonic::Status::internal("the stream ended without a result"))
    };
    match tokio::time::timeout(timeout, body).await {
        Ok(Ok(r)) => {
            rec.e2e_ms = ms(Instant::now());
            rec.output_tokens = r.completion_tokens as usize;
            rec.input_tokens = r.prompt_tokens as usize;
            if rec.output_tokens > 1 {
                rec.tpot_ms = (rec.e2e_ms - rec.ttft_ms) / (rec.output_tokens - 1) as f64;
            }
            let t = r.timings.unwrap_or_default();
            rec.queue_ms = t.queue_ms;
            rec.prefill_ms = t.prefill_ms;
            rec.kv_transfer_ms = t.kv_transfer_ms;
            rec.kv_bytes = t.kv_bytes;
            rec.server_first_token_ms = t.first_token_ms;
            rec.server_total_ms = t.total_ms;
            rec.prefill_server = r.prefill_server;
            rec.kv_backend = r.kv_backend;
        }
        Ok(Err(s)) => rec.error = Some(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => rec.error = Some(format!("no answer within {:?}", timeout)),
    }
    rec
}
