//! `pdserve bench compare`: one workload against a colocated deployment and the
//! disaggregated ones (per KV backend), in turn; the table of where the time goes and
//! what share of it the KV transfer takes, then `kvbench` at the workload's KV sizes.

use anyhow::{Context, bail};
use kv_transfer::BackendKind;
use serde::Serialize;

use super::workload::WorkloadArgs;
use super::{Level, LoadArgs, measure, sweep_table};
use crate::{kvbench, up};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A running deployment to measure, as NAME=ROUTER_URL (e.g. nixl=http://10.0.0.5:8000);
    /// repeat it. A NAME of `colocated` is the baseline of the last column.
    #[arg(long = "target", value_parser = parse_target)]
    pub targets: Vec<(String, String)>,
    /// Or start these deployments on this machine, one at a time (daemons on loopback):
    /// colocated, tcp, nixl, ucx; a `-late` suffix (nixl-late) turns the router's early
    /// prefill off, so that the decode-server alone asks the prefill-server.
    #[arg(long, value_delimiter = ',')]
    pub local: Vec<String>,
    /// Prefill-servers in each disaggregated `--local` deployment.
    #[arg(long, default_value_t = 1)]
    pub prefill: usize,
    /// Run each disaggregated `--local` deployment once per router policy (named
    /// `tcp@kv_aware`, ...), and add a table of prefix hit rate and prompt tokens computed.
    #[arg(long, value_delimiter = ',', value_parser = ["round_robin", "least_outstanding", "kv_aware"])]
    pub routing: Vec<String>,
    /// Run each `--local` deployment once per serving core (named `tcp#before`, ...):
    /// `current` (the defaults: batched, chunked prefill, on-demand KV blocks with
    /// preemption, prefix caches on both daemons) and `before` (one prompt at a time,
    /// whole; blocks for prompt + max_tokens reserved at admission; no decode-side
    /// prefix cache), and add a table comparing them.
    #[arg(long, value_delimiter = ',', value_parser = ["before", "current"])]
    pub core: Vec<String>,
    /// The prefill-servers' `max_batch_tokens` in the `--local` deployments (but the
    /// `before` core's).
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// The prefill-servers' `chunk_tokens` in the `--local` deployments (but the
    /// `before` core's).
    #[arg(long)]
    pub chunk_tokens: Option<usize>,
    /// Model, devices and KV memory of the `--local` deployments.
    #[command(flatten)]
    pub placement: up::Placement,
    #[command(flatten)]
    pub client: crate::client::ClientArgs,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    /// After the table: `pdserve kvbench` at the workload's KV sizes, for these backends.
    #[arg(long, value_delimiter = ',', default_value = "nixl,ucx,tcp")]
    pub kvbench: Vec<BackendKind>,
    /// Skip that kvbench.
    #[arg(long)]
    pub no_kvbench: bool,
    /// Host (dram) or GPU (vram) memory for that kvbench; default: vram for a cuda device.
    #[arg(long, value_enum)]
    pub kvbench_mem: Option<kvbench::Mem>,
    #[command(flatten)]
    pub output: super::OutputArgs,
}

fn parse_target(s: &str) -> Result<(String, String), String> {
    let (name, url) = s.split_once('=').ok_or_else(|| format!("{s:?}: want NAME=URL"))?;
    if name.is_empty() || url.is_empty() {
        return Err(format!("{s:?}: want NAME=URL"));
    }
    Ok((name.to_string(), url.to_string()))
}

/// A line of the table: one deployment at one prompt length, means over its requests.
#[derive(Debug, Serialize)]
pub struct Row {
    pub method: String,
    pub input_len: String,
    pub requests: usize,
    pub failed: usize,
    pub prefill_ms: f64,
    pub transfer_ms: f64,
    pub decode_ms: f64,
    pub total_ms: f64,
    pub ttft_ms: f64,
    pub kv_bytes: f64,
    /// Transfer time over server total time.
    pub transfer_share: f64,
    /// Transfer time over time to first token.
    pub ttft_share: f64,
    /// Total time against the colocated run at the same prompt length (+0.05 = 5% slower).
    pub vs_colocated: Option<f64>,
    pub ttft_vs_colocated: Option<f64>,
}

fn method_name(name: &str) -> String {
    if let Some((base, core)) = name.split_once('#') {
        return format!("{}, {core} core", method_name(base));
    }
    if let Some((base, policy)) = name.split_once('@') {
        return format!("{}, {policy}", method_name(base));
    }
    let (base, late) = split_late(name);
    let method = match base {
        "colocated" => "Colocated (one daemon)".into(),
        "tcp" => "Disaggregated + TCP".into(),
        "nixl" => "Disaggregated + NIXL".into(),
        "ucx" => "Disaggregated + UCX".into(),
        _ => return name.to_string(),
    };
    if late { format!("{method}, no early prefill") } else { method }
}

/// A `--local` name without its `-late` suffix, and whether it had one.
fn split_late(name: &str) -> (&str, bool) {
    name.strip_suffix("-late").map_or((name, false), |b| (b, true))
}

/// The rows at the first load level of each deployment and prompt length.
pub fn rows(levels: &[Level]) -> Vec<Row> {
    let first_load = levels.first().map(|l| l.load.clone()).unwrap_or_default();
    let mut rows: Vec<Row> = levels
        .iter()
        .filter(|l| l.load == first_load)
        .map(|l| {
            let s = &l.summary;
            let share = |x: f64, of: f64| if of > 0.0 { x / of } else { 0.0 };
            Row {
                method: l.target.clone(),
                input_len: l.input_len.clone(),
                requests: s.requests,
                failed: s.failed,
                prefill_ms: s.prefill_ms.mean,
                transfer_ms: s.kv_transfer_ms.mean,
                decode_ms: s.decode_ms.mean,
                total_ms: s.server_total_ms.mean,
                ttft_ms: s.ttft_ms.mean,
                kv_bytes: s.mean_kv_bytes,
                transfer_share: share(s.kv_transfer_ms.mean, s.server_total_ms.mean),
                ttft_share: share(s.kv_transfer_ms.mean, s.ttft_ms.mean),
                vs_colocated: None,
                ttft_vs_colocated: None,
            }
        })
        .collect();
    let base: Vec<(String, f64, f64)> = rows
        .iter()
        .filter(|r| r.method == "colocated")
        .map(|r| (r.input_len.clone(), r.total_ms, r.ttft_ms))
        .collect();
    for r in &mut rows {
        if let Some((_, total, ttft)) = base.iter().find(|b| b.0 == r.input_len)
            && r.method != "colocated"
        {
            r.vs_colocated = Some(r.total_ms / total - 1.0);
            r.ttft_vs_colocated = Some(r.ttft_ms / ttft - 1.0);
        }
    }
    rows
}

/// The seed's words for a transfer share.
pub fn verdict(share: f64) -> &'static str {
    if share < 0.05 {
        "negligible"
    } else if share < 0.15 {
        "acceptable"
    } else {
        "significant"
    }
}

pub fn table(rows: &[Row]) -> String {
    let pct = |v: Option<f64>| v.map(|v| format!("{:+.1}%", v * 100.0)).unwrap_or_else(|| "-".into());
    let mut s = String::from(
        "| Method | Input | Prefill ms | Transfer ms | Decode ms | Total ms | TTFT ms | Transfer share | Transfer / TTFT | vs colocated | TTFT vs colocated |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let colocated = r.method == "colocated";
        let dash_or = |v: String| if colocated { "-".to_string() } else { v };
        s += &format!(
            "| {} | {} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |\n",
            method_name(&r.method),
            r.input_len,
            r.prefill_ms,
            dash_or(format!("{:.3}", r.transfer_ms)),
            r.decode_ms,
            r.total_ms,
            r.ttft_ms,
            dash_or(format!("{:.2}%", r.transfer_share * 100.0)),
            dash_or(format!("{:.2}%", r.ttft_share * 100.0)),
            pct(r.vs_colocated),
            pct(r.ttft_vs_colocated),
        );
    }
    s += "\n";
    for r in rows.iter().filter(|r| r.method != "colocated") {
        s += &format!(
            "- {}, input {}: the KV transfer ({:.0} bytes a request) is {:.2}% of total inference time: {}.\n",
            method_name(&r.method),
            r.input_len,
            r.kv_bytes,
            r.transfer_share * 100.0,
            verdict(r.transfer_share)
        );
    }
    s
}

fn local_args(a: &Args, name: &str, routing: Option<&str>, workdir: &std::path::Path) -> anyhow::Result<up::Args> {
    let (name, core) = name.split_once('#').map_or((name, None), |(n, c)| (n, Some(c)));
    let (name, late) = split_late(name);
    let (backend, prefill) = match name {
        "colocated" => (BackendKind::Tcp, 0),
        other => (
            other
                .parse::<BackendKind>()
                .map_err(|e| anyhow::anyhow!("--local {other}: {e} (want colocated, tcp, nixl or ucx)"))?,
            a.prefill.max(1),
        ),
    };
    let mut args = up::Args {
        placement: a.placement.clone(),
        backend,
        prefill,
        no_early_prefill: late,
        routing: routing.unwrap_or("round_robin").to_string(),
        workdir: Some(workdir.to_path_buf()),
        ready_timeout: 300,
        ..Default::default()
    };
    if let Some(t) = a.max_batch_tokens {
        args.max_batch_tokens = t;
    }
    if let Some(t) = a.chunk_tokens {
        args.chunk_tokens = t;
    }
    if core == Some("before") {
        // The serving core before batched prefill, on-demand blocks and the decode
        // side's prefix cache.
        const WHOLE: usize = 1 << 20;
        args.max_batch_prompts = 1;
        args.chunk_tokens = WHOLE;
        args.max_batch_tokens = WHOLE;
        args.kv_allocation = "reserve".into();
        args.placement.no_decode_prefix_caching = true;
    }
    Ok(args)
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    if a.targets.is_empty() == a.local.is_empty() {
        bail!("give either --target NAME=URL (repeated) or --local colocated,tcp,nixl,ucx");
    }
    let mut levels = Vec::new();
    for (name, url) in &a.targets {
        levels.extend(
            measure(name, url, &super::ApiArgs::default(), &a.client, &a.workload, &a.load)
                .await
                .with_context(|| format!("measuring {name}"))?,
        );
    }
    // Each disaggregated deployment once per policy (colocated has no router choice),
    // each of those once per serving core.
    let runs: Vec<(String, Option<&str>)> = a
        .local
        .iter()
        .flat_map(|name| match (name.as_str(), a.routing.is_empty()) {
            ("colocated", _) | (_, true) => vec![(name.clone(), None)],
            _ => a.routing.iter().map(|p| (format!("{name}@{p}"), Some(p.as_str()))).collect(),
        })
        .flat_map(|(name, routing)| match a.core.is_empty() {
            true => vec![(name, routing)],
            false => a.core.iter().map(|c| (format!("{name}#{c}"), routing)).collect(),
        })
        .collect();
    for (name, routing) in &runs {
        let base = name.split(['@', '#']).next().unwrap_or(name);
        let core = name.split_once('#').map(|(_, c)| c);
        let work = tempfile::Builder::new().prefix(&format!("pdserve-compare-{base}-")).tempdir()?;
        let named = match core {
            Some(c) => format!("{base}#{c}"),
            None => base.to_string(),
        };
        let args = local_args(&a, &named, *routing, work.path())?;
        eprintln!("bench compare: starting {name} (logs in {})", work.path().display());
        let dep = up::start(&args, work.path())
            .await
            .with_context(|| format!("starting the {name} deployment"))?;
        let measured = measure(name, &dep.router, &super::ApiArgs::default(), &a.client, &a.workload, &a.load).await;
        let codes = dep.stop().await;
        let levels_here = measured.with_context(|| format!("measuring {name} (logs in {})", work.path().display()))?;
        if let Some((daemon, code)) = codes.iter().find(|(_, c)| *c != Some(0)) {
            bail!("{name}: {daemon} exited with {code:?} (logs in {})", work.path().display());
        }
        levels.extend(levels_here);
    }
    let rows = rows(&levels);
    println!("## {}, {}\n", a.workload.describe(a.workload.input_lens()[0]), levels[0].load);
    println!("{}", table(&rows));
    if !a.routing.is_empty() {
        println!("{}", routing_table(&levels));
    }
    if !a.core.is_empty() {
        println!("{}", core_table(&levels));
    }
    let by_load = a.load.levels()?.len() > 1;
    if by_load {
        println!("{}", sweep_table(&levels));
    }
    let kv = kv_sizes(&rows);
    let kv_rows = if a.no_kvbench || a.kvbench.is_empty() || kv.is_empty() {
        Vec::new()
    } else {
        let mem = a.kvbench_mem.unwrap_or(if a.placement.device.starts_with("cuda") {
            kvbench::Mem::Vram
        } else {
            kvbench::Mem::Dram
        });
        let kb = kvbench::Args {
            backend: a.kvbench.clone(),
            mem,
            device: 0,
            target_device: 0,
            sizes: kv.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(","),
            iters: 20,
            warmup: 3,
            segments: 1,
            deadline_ms: 60_000,
            back_to_back: false,
            json: None,
        };
        println!("### KV transfer alone (pdserve kvbench, {mem:?}, the workload's KV bytes per request)\n");
        let r = kvbench::measure(&kb).await.context("kvbench at the workload's KV sizes")?;
        println!("{}", kvbench::table(&r));
        r
    };
    let doc = serde_json::json!({ "rows": rows, "levels": levels, "kvbench": kv_rows });
    a.output.write(&doc, &levels)?;
    let failed = rows.iter().any(|r| r.failed > 0) || kv_rows.iter().any(|r| !r.verified);
    Ok(if failed { 1 } else { 0 })
}

/// Where prompts were computed under each router policy, at the first load level: the
/// prefix cache's hit rate, prompt tokens computed (and their share of round-robin's
/// on the same deployment), time to first token and throughput.
pub fn routing_table(levels: &[Level]) -> String {
    let first_load = levels.first().map(|l| l.load.clone()).unwrap_or_default();
    let at_first: Vec<&Level> = levels.iter().filter(|l| l.load == first_load).collect();
    let mut s = String::from(
        "| Deployment | Input | Prefix hit rate | Prompt tokens computed | vs round_robin | TTFT p50 / p90 ms | req/s | Failed |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for l in &at_first {
        let x = &l.summary;
        let base = l.target.split_once('@').map_or(l.target.as_str(), |(b, _)| b);
        let rr = at_first
            .iter()
            .find(|o| o.target == format!("{base}@round_robin") && o.input_len == l.input_len)
            .map(|o| o.summary.prefill_tokens_computed);
        let vs = match rr {
            Some(r) if r > 0 => format!("{:.2}x", x.prefill_tokens_computed as f64 / r as f64),
            _ => "-".into(),
        };
        s += &format!(
            "| {} | {} | {:.1}% | {} | {vs} | {:.1} / {:.1} | {:.2} | {} |\n",
            method_name(&l.target),
            l.input_len,
            x.prefix_hit_rate * 100.0,
            x.prefill_tokens_computed,
            x.ttft_ms.p50,
            x.ttft_ms.p90,
            x.request_throughput,
            x.failed
        );
    }
    s
}

/// The serving cores side by side at every load level: throughput and goodput, first
/// token and time per output token, prompt tokens computed, KV bytes moved a request,
/// the decode side's prefix hits, preemptions and failures, and each figure of the
/// current core against the `before` run of the same deployment, prompt length and load.
pub fn core_table(levels: &[Level]) -> String {
    let mut s = String::from(
        "| Deployment | Input | Load | req/s | vs before | goodput req/s | TTFT p50 / p90 ms | TPOT p50 ms | prompt tokens computed | KV KiB / request | decode-side hits | preemptions | failed |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for l in levels {
        let x = &l.summary;
        let before = l.target.split_once('#').and_then(|(base, _)| {
            levels
                .iter()
                .find(|o| o.target == format!("{base}#before") && o.input_len == l.input_len && o.load == l.load)
        });
        let vs = match before.map(|b| b.summary.request_throughput) {
            Some(b) if b > 0.0 && !l.target.ends_with("#before") => format!("{:.2}x", x.request_throughput / b),
            _ => "-".into(),
        };
        s += &format!(
            "| {} | {} | {} | {:.2} | {vs} | {:.2} | {:.1} / {:.1} | {:.2} | {} | {:.1} | {:.1}% | {} | {} |\n",
            method_name(&l.target),
            l.input_len,
            l.load,
            x.request_throughput,
            x.goodput,
            x.ttft_ms.p50,
            x.ttft_ms.p90,
            x.tpot_ms.p50,
            x.prefill_tokens_computed,
            x.mean_kv_bytes / 1024.0,
            x.decode_hit_rate * 100.0,
            x.preemptions,
            x.failed
        );
    }
    s
}

/// The distinct KV sizes the disaggregated runs moved (bytes a request, whole).
fn kv_sizes(rows: &[Row]) -> Vec<u64> {
    let mut v: Vec<u64> = rows
        .iter()
        .filter(|r| r.kv_bytes > 0.0)
        .map(|r| r.kv_bytes.round() as u64)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::{Record, Slo, Summary};

    fn level(target: &str, prefill: f64, transfer: f64, total: f64) -> Level {
        let r = Record {
            input_tokens: 8,
            output_tokens: 4,
            ttft_ms: prefill + transfer + 1.0,
            prefill_ms: prefill,
            kv_transfer_ms: transfer,
            kv_bytes: if transfer > 0.0 { 4096 } else { 0 },
            server_first_token_ms: prefill + transfer + 1.0,
            server_total_ms: total,
            ..Default::default()
        };
        Level {
            target: target.into(),
            workload: String::new(),
            input_len: "8".into(),
            load: "concurrency 1".into(),
            summary: Summary::of(&[r], 1.0, Slo::default()),
            requests: vec![],
        }
    }

    #[test]
    fn rows_compare_with_colocated_and_judge_the_share() {
        let levels = [
            level("colocated", 10.0, 0.0, 100.0),
            level("nixl", 10.0, 1.0, 101.0),
            level("tcp", 10.0, 20.0, 125.0),
        ];
        let rows = rows(&levels);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].vs_colocated, None);
        assert!((rows[1].vs_colocated.unwrap() - 0.01).abs() < 1e-12);
        assert!((rows[1].transfer_share - 1.0 / 101.0).abs() < 1e-12);
        assert!((rows[2].transfer_share - 0.16).abs() < 1e-12);
        assert!((rows[2].ttft_vs_colocated.unwrap() - 20.0 / 11.0).abs() < 1e-12);
        let t = table(&rows);
        assert!(t.contains("| Disaggregated + NIXL | 8 |"), "{t}");
        assert!(t.contains("is 0.99% of total inference time: negligible"), "{t}");
        assert!(t.contains("is 16.00% of total inference time: significant"), "{t}");
        assert_eq!(verdict(0.10), "acceptable");
        assert_eq!(kv_sizes(&rows), vec![4096]);
    }

    #[test]
    fn targets_parse() {
        assert_eq!(parse_target("nixl=http://h:1").unwrap(), ("nixl".into(), "http://h:1".into()));
        assert!(parse_target("http://h:1").is_err());
        assert!(parse_target("=x").is_err());
    }
}
