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
    /// Each request at its own time (a trace's `Prompt::at_s`).
    Trace,
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Closed(c) => write!(f, "concurrency {c}"),
            Load::Open(r) => write!(f, "rate {r}/s"),
            Load::Trace => write!(f, "trace arrivals"),
        }
    }
}

/// Where a run's requests go: pdserve's gRPC API, or an OpenAI-compatible HTTP API
/// (pdserve's or another server's).
#[derive(Clone)]
pub enum Target {
    Grpc(pb::generation_client::GenerationClient<Channel>),
    OpenAi(Box<super::http::OpenAiClient>),
}

/// What every request of a run shares.
#[derive(Clone)]
pub struct Shot {
    pub target: Target,
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
            // Each worker takes the next conversation (a request and the turns that
            // follow it, in order; a single request without multi-turn).
            // A start is every prompt that does not continue the one before it, so each
            // runs exactly once.
            let starts: Arc<Vec<usize>> = Arc::new(
                (0..prompts.len())
                    .filter(|&i| prompts[i].follows.is_none_or(|f| Some(f) != i.checked_sub(1)))
                    .collect(),
            );
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..c.max(1) {
                let (shot, prompts, bar, next, starts) = (shot.clone(), prompts.clone(), bar.clone(), next.clone(), starts.clone());
                tasks.spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let Some(&first) = starts.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return out;
                        };
                        let mut i = first;
                        loop {
                            out.push(one(&shot, i, &prompts[i], start).await);
                            bar.inc(1);
                            if prompts.get(i + 1).is_none_or(|p| p.follows != Some(i)) {
                                break;
                            }
                            i += 1;
                        }
                    }
                });
            }
        }
        Load::Open(_) | Load::Trace => {
            anyhow::ensure!(
                prompts.iter().all(|p| p.follows.is_none()),
                "multi-turn conversations run in a closed loop (--concurrency), not at a rate"
            );
            // Each request's send time, seconds from the start.
            let times: Vec<f64> = match load {
                Load::Open(rate) => {
                    anyhow::ensure!(rate > 0.0, "the request rate must be above 0");
                    let mut rng = ChaCha8Rng::seed_from_u64(shot.seed ^ 0x9e37_79b9_7f4a_7c15);
                    let mut at = 0.0f64;
                    (0..prompts.len())
                        .map(|_| {
                            let now = at;
                            // Exponential gaps: a Poisson process of `rate` per second.
                            let u: f64 = rng.random_range(f64::EPSILON..1.0);
                            at += -u.ln() / rate;
                            now
                        })
                        .collect()
                }
                _ => prompts.iter().map(|p| p.at_s.unwrap_or(0.0)).collect(),
            };
            for (i, at) in times.into_iter().enumerate() {
                tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
                let (shot, prompts, bar) = (shot.clone(), prompts.clone(), bar.clone());
                tasks.spawn(async move {
                    let r = one(&shot, i, &prompts[i], start).await;
                    bar.inc(1);
                    vec![r]
                });
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
    let mut rec = Record {
        index,
        request_id: format!("bench-{}-{index}", shot.seed),
        input_tokens: p.input_tokens.unwrap_or(0),
        ..Default::default()
    };
    let t0 = Instant::now();
    rec.sent_s = (t0 - start).as_secs_f64();
    let outcome = match &shot.target {
        Target::Grpc(client) => tokio::time::timeout(shot.timeout, grpc(shot, client.clone(), index, p, &mut rec, t0)).await,
        Target::OpenAi(client) => tokio::time::timeout(shot.timeout, openai(shot, client, index, p, &mut rec, t0)).await,
    };
    match outcome {
        Ok(Ok(())) => {
            rec.e2e_ms = ms_since(t0);
            if rec.output_tokens > 1 {
                rec.tpot_ms = (rec.e2e_ms - rec.ttft_ms) / (rec.output_tokens - 1) as f64;
            }
        }
        Ok(Err(e)) => rec.error = Some(e),
        Err(_) => rec.error = Some(format!("no answer within {:?}", shot.timeout)),
    }
    if rec.error.is_some() {
        // How long the failure took to come (a refusal under load must come at once).
        rec.e2e_ms = ms_since(t0);
    }
    rec
}

fn ms_since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

/// Client-side token timing: the first arrival is the time to first token; later ones
/// spread their gap over the `n` tokens (or text deltas) they brought.
struct Arrivals {
    t0: Instant,
    last: Option<Instant>,
}

impl Arrivals {
    fn seen(&mut self, rec: &mut Record, now: Instant, n: usize) {
        match self.last {
            None => rec.ttft_ms = (now - self.t0).as_secs_f64() * 1e3,
            Some(prev) => {
                let gap = (now - prev).as_secs_f64() * 1e3 / n as f64;
                rec.itl_ms.extend(std::iter::repeat_n(gap, n));
            }
        }
        self.last = Some(now);
    }
}

async fn grpc(
    shot: &Shot,
    mut client: pb::generation_client::GenerationClient<Channel>,
    index: usize,
    p: &Prompt,
    rec: &mut Record,
    t0: Instant,
) -> Result<(), String> {
    let req = pb::GenerateRequest {
        request_id: rec.request_id.clone(),
        input: Some(p.input.clone()),
        sampling: Some(pb::SamplingParameters {
            temperature: Some(shot.temperature),
            seed: Some(shot.seed.wrapping_add(index as u64)),
            max_tokens: Some(p.output_len as u32),
            ignore_eos: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let mut s = client.generate(shot.client_args.request(req)).await.map_err(status)?.into_inner();
    let mut arrivals = Arrivals { t0, last: None };
    while let Some(msg) = s.next().await {
        match msg.map_err(status)?.kind {
            Some(pb::generate_response::Kind::Chunk(c)) if !c.token_ids.is_empty() => {
                arrivals.seen(rec, Instant::now(), c.token_ids.len());
            }
            Some(pb::generate_response::Kind::Result(r)) => {
                rec.output_tokens = r.completion_tokens as usize;
                rec.input_tokens = r.prompt_tokens as usize;
                rec.cached_tokens = r.cached_tokens as usize;
                rec.decode_cached_tokens = r.decode_cached_tokens as usize;
                rec.preemptions = r.preemptions;
                let t = r.timings.unwrap_or_default();
                rec.queue_ms = t.queue_ms;
                rec.prefill_ms = t.prefill_ms;
                rec.kv_transfer_ms = t.kv_transfer_ms;
                rec.kv_bytes = t.kv_bytes;
                rec.server_first_token_ms = t.first_token_ms;
                rec.server_total_ms = t.total_ms;
                rec.prefill_server = r.prefill_server;
                rec.kv_backend = r.kv_backend;
                return Ok(());
            }
            _ => {}
        }
    }
    Err("the stream ended without a result".into())
}

/// Over the OpenAI API: a server-sent event per text delta (as `vllm bench serve`
/// times them); counts from `usage`; pdserve's figures from its extension object when
/// the server is pdserve.
async fn openai(
    shot: &Shot,
    client: &super::http::OpenAiClient,
    index: usize,
    p: &Prompt,
    rec: &mut Record,
    t0: Instant,
) -> Result<(), String> {
    let mut arrivals = Arrivals { t0, last: None };
    let mut seen = Vec::new();
    let a = client
        .stream(
            &rec.request_id,
            &p.input,
            p.output_len,
            shot.temperature,
            shot.seed.wrapping_add(index as u64),
            |now| seen.push(now),
        )
        .await?;
    if seen.is_empty() {
        return Err("the answer carried no text".into());
    }
    let events = seen.len();
    for now in seen {
        arrivals.seen(rec, now, 1);
    }
    // Counts from `usage`; a server that sends none: its text events, and the prompt
    // length the workload knows.
    match a.usage {
        Some((prompt, completion)) => (rec.input_tokens, rec.output_tokens) = (prompt, completion),
        None => rec.output_tokens = events,
    }
    rec.cached_tokens = a.cached_tokens;
    if let Some(x) = a.pdserve {
        let f = |k: &str| x[k].as_f64().unwrap_or(0.0);
        rec.queue_ms = f("queue_ms");
        rec.prefill_ms = f("prefill_ms");
        rec.kv_transfer_ms = f("kv_transfer_ms");
        rec.kv_bytes = x["kv_bytes"].as_u64().unwrap_or(0);
        rec.server_first_token_ms = f("first_token_ms");
        rec.server_total_ms = f("total_ms");
        rec.prefill_server = x["prefill_server"].as_str().unwrap_or_default().to_string();
        rec.kv_backend = x["kv_backend"].as_str().unwrap_or_default().to_string();
    }
    Ok(())
}
