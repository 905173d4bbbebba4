//! `pdserve bench overload`: holds a deployment at multiples of its measured capacity
//! (open loop, Poisson arrivals, `--duration-s` each) and checks that it sheds the
//! excess instead of collapsing, as DistServe-style goodput measurements do:
//!
//! - goodput (requests within the SLO per second) at every level above 1x stays at
//!   least `--min-goodput-share` of the best level's;
//! - every request ends: answered, or refused (RESOURCE_EXHAUSTED / HTTP 429) within
//!   `--max-reject-ms`; no other error, no hang;
//! - the daemons' resident memory (sampled every second from /proc, by process name)
//!   stays flat: at the end of each level at most 25% + 64 MiB above the end of the
//!   first.
//!
//! Prints a Markdown table, writes it (`--markdown`) and every figure (`--json`), and
//! exits 1 when a check fails.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::load::{self, Load};
use super::stats::{Dist, Record, Slo, Summary};
use super::workload::WorkloadArgs;
use super::{ApiArgs, shot, warm_up};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The router's gRPC URL (or, with `--api openai`, its HTTP API's).
    #[arg(long, default_value = "http://127.0.0.1:50050")]
    pub router: String,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub client: crate::client::ClientArgs,
    /// `--requests` is the size of the capacity measurement; the load levels send as
    /// many as their rate and duration ask for.
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// The deployment's capacity in requests per second (default: measured first, in a
    /// closed loop at `--capacity-concurrency`).
    #[arg(long)]
    pub capacity: Option<f64>,
    #[arg(long, default_value_t = 32)]
    pub capacity_concurrency: usize,
    /// Load levels, as multiples of the capacity.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub multiples: Vec<f64>,
    /// How long each level sends requests, seconds.
    #[arg(long, default_value_t = 60)]
    pub duration_s: u64,
    /// Goodput counts requests whose time to first token is at most this.
    #[arg(long, default_value_t = 2000.0)]
    pub slo_ttft_ms: f64,
    /// Goodput counts requests whose time per output token is at most this.
    #[arg(long)]
    pub slo_tpot_ms: Option<f64>,
    /// Every level above 1x must keep at least this share of the best goodput.
    #[arg(long, default_value_t = 0.8)]
    pub min_goodput_share: f64,
    /// A refusal must come within this, milliseconds (p99).
    #[arg(long, default_value_t = 100.0)]
    pub max_reject_ms: f64,
    /// Processes (by name) whose resident memory is sampled; empty: none.
    #[arg(long, value_delimiter = ',', default_value = "router,decode-server,prefill-server")]
    pub watch: Vec<String>,
    /// A request with no answer by then counts as hung, seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// Write every figure here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the table here as Markdown.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// One load level's figures.
#[derive(Debug, Serialize)]
pub struct Level {
    pub multiple: f64,
    pub rate: f64,
    pub sent: usize,
    pub answered: usize,
    pub refused: usize,
    /// How long refusals took to come, ms.
    pub refused_ms: Dist,
    /// Failures other than a refusal (hangs included).
    pub other_errors: Vec<String>,
    pub goodput: f64,
    pub goodput_share: f64,
    /// Resident memory per watched process name, MiB: at the end of the level, and the
    /// most seen during it.
    pub rss_end_mib: BTreeMap<String, f64>,
    pub rss_max_mib: BTreeMap<String, f64>,
    pub summary: Summary,
    pub failed_checks: Vec<String>,
}

/// A refusal under load: the gRPC code, or the HTTP status, that says "come back later".
fn refused(r: &Record) -> bool {
    r.error
        .as_deref()
        .is_some_and(|e| e.starts_with("ResourceExhausted") || e.starts_with("HTTP 429"))
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    anyhow::ensure!(
        a.workload.trace.is_none() && a.workload.multi_turn.is_none(),
        "bench overload sends at multiples of the capacity (an open loop): --trace and --multi-turn do not apply"
    );
    if a.multiples.is_empty() || a.multiples.iter().any(|m| !(*m > 0.0 && m.is_finite())) {
        bail!("--multiples: positive numbers, e.g. 1,2,4");
    }
    if a.duration_s == 0 {
        bail!("--duration-s must be at least 1");
    }
    let len = *a.workload.input_lens().first().context("--input-len")?;
    let shot = shot(
        "router",
        &a.router,
        &a.api,
        &a.client,
        &a.workload,
        Duration::from_secs(a.timeout_s),
    )
    .await?;
    let probe = a.workload.build(len)?;
    warm_up(&shot, &probe, 2).await?;
    let capacity = match a.capacity {
        Some(c) if c > 0.0 && c.is_finite() => c,
        Some(c) => bail!("--capacity {c}: must be a positive rate"),
        None => {
            let (recs, secs) = load::run(&shot, &probe, Load::Closed(a.capacity_concurrency), !a.quiet).await?;
            let ok = recs.iter().filter(|r| r.ok()).count();
            if ok == 0 {
                bail!("measuring capacity: no request was answered ({:?})", recs[0].error);
            }
            ok as f64 / secs
        }
    };
    eprintln!("capacity: {capacity:.2} requests/s");
    let slo = Slo {
        ttft_ms: Some(a.slo_ttft_ms),
        tpot_ms: a.slo_tpot_ms,
    };
    let mut levels = Vec::new();
    for &m in &a.multiples {
        let rate = m * capacity;
        let w = WorkloadArgs {
            requests: ((rate * a.duration_s as f64).ceil() as usize).max(1),
            seed: a.workload.seed.wrapping_add(levels.len() as u64 + 1),
            ..a.workload.clone()
        };
        let prompts = w.build(len)?;
        let sampler = Sampler::start(a.watch.clone());
        let (records, secs) = load::run(&shot, &prompts, Load::Open(rate), !a.quiet).await?;
        let (rss_end_mib, rss_max_mib) = sampler.stop();
        let answered = records.iter().filter(|r| r.ok()).count();
        let refusals: Vec<f64> = records.iter().filter(|r| refused(r)).map(|r| r.e2e_ms).collect();
        let other_errors: Vec<String> = records
            .iter()
            .filter(|r| !r.ok() && !refused(r))
            .filter_map(|r| r.error.clone())
            .collect();
        let summary = Summary::of(&records, secs, slo);
        levels.push(Level {
            multiple: m,
            rate,
            sent: records.len(),
            answered,
            refused: refusals.len(),
            refused_ms: Dist::of(refusals),
            other_errors,
            goodput: summary.goodput,
            goodput_share: 0.0,
            rss_end_mib,
            rss_max_mib,
            summary,
            failed_checks: Vec::new(),
        });
    }
    judge(&mut levels, &a);
    let table = markdown(capacity, &a, &levels);
    println!("{table}");
    if let Some(p) = &a.markdown {
        std::fs::write(p, &table).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.json {
        let doc = serde_json::json!({
            "capacity_rps": capacity,
            "duration_s": a.duration_s,
            "slo_ttft_ms": a.slo_ttft_ms,
            "slo_tpot_ms": a.slo_tpot_ms,
            "levels": levels,
        });
        std::fs::write(p, serde_json::to_string_pretty(&doc)?).with_context(|| format!("writing {}", p.display()))?;
    }
    let failed: Vec<String> = levels
        .iter()
        .flat_map(|l| l.failed_checks.iter().map(move |c| format!("{}x: {c}", l.multiple)))
        .collect();
    if failed.is_empty() {
        Ok(0)
    } else {
        eprintln!("overload checks failed:\n  {}", failed.join("\n  "));
        Ok(1)
    }
}

/// Fills in each level's share of the best goodput and the checks it failed.
fn judge(levels: &mut [Level], a: &Args) {
    let peak = levels.iter().map(|l| l.goodput).fold(0.0, f64::max);
    let base: BTreeMap<String, f64> = levels.first().map(|l| l.rss_end_mib.clone()).unwrap_or_default();
    for l in levels.iter_mut() {
        l.goodput_share = if peak > 0.0 { l.goodput / peak } else { 0.0 };
        if l.multiple > 1.0 && l.goodput_share < a.min_goodput_share {
            l.failed_checks.push(format!(
                "goodput {:.2}/s is {:.0}% of the peak {peak:.2}/s (at least {:.0}% required)",
                l.goodput,
                l.goodput_share * 100.0,
                a.min_goodput_share * 100.0
            ));
        }
        if l.refused > 0 && l.refused_ms.p99 > a.max_reject_ms {
            l.failed_checks.push(format!(
                "refusals took {:.1} ms (p99), more than {} ms",
                l.refused_ms.p99, a.max_reject_ms
            ));
        }
        if let Some(e) = l.other_errors.first() {
            l.failed_checks
                .push(format!("{} requests failed without a refusal, e.g. {e}", l.other_errors.len()));
        }
        for (name, end) in &l.rss_end_mib {
            if let Some(b) = base.get(name)
                && *end > b * 1.25 + 64.0
            {
                l.failed_checks
                    .push(format!("{name}'s memory grew from {b:.0} MiB to {end:.0} MiB"));
            }
        }
    }
}

fn markdown(capacity: f64, a: &Args, levels: &[Level]) -> String {
    let mut s = format!(
        "Capacity {capacity:.2} req/s; each level {} s of Poisson arrivals; SLO: TTFT <= {} ms{}.\n\n\
         | load | offered req/s | sent | answered | refused | refusal p99 ms | other errors | goodput req/s | of peak | TTFT p50 / p99 ms (answered) | memory at end, MiB | checks |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        a.duration_s,
        a.slo_ttft_ms,
        a.slo_tpot_ms.map(|t| format!(", TPOT <= {t} ms")).unwrap_or_default()
    );
    for l in levels {
        let rss: Vec<String> = l.rss_end_mib.iter().map(|(n, v)| format!("{n} {v:.0}")).collect();
        s += &format!(
            "| {}x | {:.2} | {} | {} | {} | {:.1} | {} | {:.2} | {:.0}% | {:.0} / {:.0} | {} | {} |\n",
            l.multiple,
            l.rate,
            l.sent,
            l.answered,
            l.refused,
            l.refused_ms.p99,
            l.other_errors.len(),
            l.goodput,
            l.goodput_share * 100.0,
            l.summary.ttft_ms.p50,
            l.summary.ttft_ms.p99,
            if rss.is_empty() { "-".into() } else { rss.join(", ") },
            if l.failed_checks.is_empty() {
                "pass".into()
            } else {
                l.failed_checks.join("; ")
            }
        );
    }
    s
}

/// Resident memory, MiB, per watched process name.
type Rss = BTreeMap<String, f64>;

/// Samples the resident memory of processes by name every second, on a thread of its
/// own (the load keeps the runtime busy).
struct Sampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// The last sample and the largest seen, MiB per process name.
    seen: Arc<Mutex<(Rss, Rss)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(names: Vec<String>) -> Sampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::new(Mutex::new((BTreeMap::new(), BTreeMap::new())));
        let (s, v) = (stop.clone(), seen.clone());
        let thread = (!names.is_empty()).then(|| {
            std::thread::spawn(move || {
                loop {
                    let now = rss_by_name(&names);
                    {
                        let mut g = v.lock().unwrap();
                        for (n, mib) in &now {
                            let max = g.1.entry(n.clone()).or_insert(0.0);
                            *max = mib.max(*max);
                        }
                        g.0 = now;
                    }
                    if s.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        });
        Sampler { stop, seen, thread }
    }

    /// Stops sampling (after one last sample); the last and the largest figures.
    fn stop(mut self) -> (Rss, Rss) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen.lock().unwrap().clone()
    }
}

/// Resident memory (MiB) summed over the processes with each name, from /proc.
fn rss_by_name(names: &[String]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let path = e.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        let comm = comm.trim();
        // The kernel keeps 15 bytes of a process's name.
        let Some(name) = names
            .iter()
            .find(|n| n.len() >= comm.len() && n.get(..15.min(n.len())) == Some(comm))
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(path.join("status")) else {
            continue;
        };
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        *out.entry(name.clone()).or_insert(0.0) += kib / 1024.0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(error: Option<&str>) -> Record {
        Record {
            error: error.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn refusals_are_told_from_other_failures() {
        assert!(refused(&rec(Some("ResourceExhausted: the queue is full"))));
        assert!(refused(&rec(Some("HTTP 429: too many requests"))));
        assert!(!refused(&rec(Some("Unavailable: no decode-server"))));
        assert!(!refused(&rec(Some("no answer within 120s"))));
        assert!(!refused(&rec(None)));
    }

    #[test]
    fn this_process_is_found_by_name() {
        let me = std::fs::read_to_string("/proc/self/comm").unwrap().trim().to_string();
        let rss = rss_by_name(std::slice::from_ref(&me));
        assert!(rss.get(&me).is_some_and(|m| *m > 1.0), "{rss:?}");
    }
}
