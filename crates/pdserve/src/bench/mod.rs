//! `pdserve bench`: a load generator against a running router (closed or open loop,
//! streaming), and `pdserve bench compare`: the same workload against several
//! deployments, with the transfer's share of inference time.
pub mod compare;
pub mod http;
pub mod load;
pub mod overload;
pub mod plot;
pub mod stats;
pub mod workload;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use load::{Load, Shot, Target};
use stats::{Record, Slo, Summary};
use workload::WorkloadArgs;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Sub>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Run one workload against several deployments and print the transfer's share of
    /// inference time for each, next to a colocated run.
    Compare(compare::Args),
    /// Hold a deployment at multiples of its measured capacity (open loop) and check
    /// that it sheds the excess at once instead of collapsing: goodput, refusals'
    /// latency, daemons' memory.
    Overload(overload::Args),
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The router (or a decode-server) to load: its gRPC URL, or with `--api openai`
    /// the HTTP API's (`http://host:port` or `http://host:port/v1`).
    #[arg(long, default_value = "http://127.0.0.1:50050")]
    pub router: String,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub client: crate::client::ClientArgs,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Api {
    #[default]
    Grpc,
    Openai,
}

/// Which API the requests use.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ApiArgs {
    /// `grpc` (pdserve's streaming Generate) or `openai` (streaming `/v1/completions`,
    /// `/v1/chat/completions` for chat prompts: pdserve's HTTP API or any other
    /// OpenAI-compatible server's, for figures that compare).
    #[arg(long, value_enum, default_value_t = Api::Grpc)]
    pub api: Api,
    /// The model name to send with `--api openai` (default: the first `/v1/models` lists).
    #[arg(long)]
    pub model_name: Option<String>,
}

/// Where `bench` and `bench compare` write what they measured, besides stdout.
#[derive(clap::Args, Debug)]
pub struct OutputArgs {
    /// Write every measurement here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw latency against load, a line per deployment and prompt length, into this
    /// file (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

impl OutputArgs {
    fn write(&self, doc: &serde_json::Value, levels: &[Level]) -> anyhow::Result<()> {
        if let Some(path) = &self.json {
            std::fs::write(path, serde_json::to_string_pretty(doc)?).with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = &self.plot {
            plot_levels(path, levels)?;
        }
        Ok(())
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Closed loop: requests in flight; several, comma-separated, are run one after the other.
    #[arg(long, value_delimiter = ',', conflicts_with = "rate")]
    pub concurrency: Vec<usize>,
    /// Open loop: Poisson arrivals at this many requests per second; several, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// Goodput counts requests whose time to first token is at most this.
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    /// Goodput counts requests whose time per output token is at most this.
    #[arg(long)]
    pub slo_tpot_ms: Option<f64>,
    /// Untimed requests before each measured run (connections, caches, GPU kernels).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// A request with no answer by then counts as failed, seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl LoadArgs {
    pub fn levels(&self) -> anyhow::Result<Vec<Load>> {
        if !self.rate.is_empty() {
            if let Some(r) = self.rate.iter().find(|r| !(**r > 0.0 && r.is_finite())) {
                bail!("--rate {r}: must be a positive number of requests per second");
            }
            return Ok(self.rate.iter().map(|&r| Load::Open(r)).collect());
        }
        let c = if self.concurrency.is_empty() {
            vec![1]
        } else {
            self.concurrency.clone()
        };
        if c.contains(&0) {
            bail!("--concurrency must be at least 1");
        }
        Ok(c.into_iter().map(Load::Closed).collect())
    }
    pub fn slo(&self) -> Slo {
        Slo {
            ttft_ms: self.slo_ttft_ms,
            tpot_ms: self.slo_tpot_ms,
        }
    }
}

/// One measured run: a prompt length under one load.
#[derive(Debug, Serialize)]
pub struct Level {
    pub target: String,
    pub workload: String,
    pub input_len: String,
    pub load: String,
    pub summary: Summary,
    pub requests: Vec<Record>,
}

/// Measures `target` (a router URL) under every prompt length and load level.
pub async fn measure(
    target: &str,
    url: &str,
    api: &ApiArgs,
    client: &crate::client::ClientArgs,
    w: &WorkloadArgs,
    l: &LoadArgs,
) -> anyhow::Result<Vec<Level>> {
    let shot = shot(target, url, api, client, w, Duration::from_secs(l.timeout_s)).await?;
    let mut out = Vec::new();
    if w.trace.is_some() && !(l.rate.is_empty() && l.concurrency.is_empty()) {
        bail!("--trace sends each request at its own time: no --rate or --concurrency with it");
    }
    if w.multi_turn.is_some() && !l.rate.is_empty() {
        bail!("multi-turn conversations run in a closed loop (--concurrency), not at a --rate");
    }
    // Each (prompt length, load level) run draws its own prompts.
    let mut run = 0;
    for len in w.input_lens() {
        // A trace sets its own arrivals.
        let levels = if w.trace.is_some() { vec![Load::Trace] } else { l.levels()? };
        for (k, load) in levels.into_iter().enumerate() {
            let prompts = w.for_level(run).build(len)?;
            run += 1;
            if k == 0 {
                warm_up(&shot, &w.warm_up_prompts(&prompts, l.warmup, len)?, l.warmup).await?;
            }
            let (records, secs) = load::run(&shot, &prompts, load, !l.quiet).await?;
            out.push(Level {
                target: target.to_string(),
                workload: w.describe(len),
                input_len: len.to_string(),
                load: load.to_string(),
                summary: Summary::of(&records, secs, l.slo()),
                requests: records,
            });
        }
    }
    Ok(out)
}

/// What every request to `url` shares, connected through `api`.
pub async fn shot(
    target: &str,
    url: &str,
    api: &ApiArgs,
    client: &crate::client::ClientArgs,
    w: &WorkloadArgs,
    timeout: Duration,
) -> anyhow::Result<Shot> {
    let to = if api.api == Api::Openai {
        Target::OpenAi(Box::new(
            http::OpenAiClient::connect(url, client.token.as_deref(), api.model_name.as_deref()).await?,
        ))
    } else {
        Target::Grpc(client.connect(url).await?)
    };
    Ok(Shot {
        target: to,
        client_args: client.clone(),
        seed: w.seed,
        temperature: w.temperature,
        timeout,
        label: target.to_string(),
    })
}

/// Untimed requests (the first `n` prompts), one at a time; any failure is an error.
pub async fn warm_up(shot: &Shot, prompts: &[workload::Prompt], n: usize) -> anyhow::Result<()> {
    if n == 0 {
        return Ok(());
    }
    let warm: Vec<_> = prompts.iter().take(n).cloned().collect();
    let (recs, _) = load::run(shot, &warm, Load::Closed(1), false).await?;
    if let Some(e) = recs.iter().find_map(|r| r.error.as_ref()) {
        bail!("{}: a warm-up request failed: {e}", shot.label);
    }
    Ok(())
}

/// Across load levels: what latency each reached at what throughput.
pub fn sweep_table(levels: &[Level]) -> String {
    let mut s = String::from(
        "| target | input | load | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | e2e p50 ms | failed | goodput req/s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for l in levels {
        let m = &l.summary;
        s += &format!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {:.2} |\n",
            l.target,
            l.input_len,
            l.load,
            m.request_throughput,
            m.output_token_throughput,
            m.ttft_ms.p50,
            m.ttft_ms.p99,
            m.tpot_ms.p50,
            m.e2e_ms.p50,
            m.failed,
            m.goodput
        );
    }
    s
}

/// TTFT and TPOT (p50) against achieved request rate; a line per target and prompt length.
pub fn plot_levels(path: &std::path::Path, levels: &[Level]) -> anyhow::Result<()> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for l in levels {
        let k = (l.target.clone(), l.input_len.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let series = |f: &dyn Fn(&Summary) -> f64| {
        keys.iter()
            .map(|(t, i)| plot::Series {
                name: format!("{t}, input {i}"),
                points: levels
                    .iter()
                    .filter(|l| &l.target == t && &l.input_len == i)
                    .map(|l| (l.summary.request_throughput, f(&l.summary)))
                    .collect(),
            })
            .collect()
    };
    let panels = [
        plot::Panel {
            y_label: "TTFT p50, ms".into(),
            series: series(&|s| s.ttft_ms.p50),
        },
        plot::Panel {
            y_label: "TPOT p50, ms".into(),
            series: series(&|s| s.tpot_ms.p50),
        },
    ];
    plot::draw(path, "pdserve: latency against load", "completed requests per second", &panels)
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    match a.command {
        Some(Sub::Compare(c)) => return compare::run(c).await,
        Some(Sub::Overload(o)) => return overload::run(o).await,
        None => {}
    }
    let r = a.run;
    let levels = measure("router", &r.router, &r.api, &r.client, &r.workload, &r.load).await?;
    for l in &levels {
        println!("### {}, {}\n\n{}", l.workload, l.load, l.summary.markdown());
    }
    if levels.len() > 1 {
        println!("{}", sweep_table(&levels));
    }
    r.output
        .write(&serde_json::json!({ "router": r.router, "levels": levels }), &levels)?;
    Ok(if levels.iter().all(|l| l.summary.failed == 0) { 0 } else { 1 })
}
