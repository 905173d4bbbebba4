//! Prometheus metrics: what an operator watches, named as vLLM and TGI name theirs.
//! Each daemon serves them at `http://<metrics_listen>/metrics` (off when empty), with
//! a `daemon` label. The `metrics` facade records; `metrics-exporter-prometheus` serves.
use std::net::SocketAddr;

use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub const REQUESTS: &str = "pdserve_requests_total";
pub const TTFT: &str = "pdserve_time_to_first_token_seconds";
pub const ITL: &str = "pdserve_inter_token_latency_seconds";
pub const E2E: &str = "pdserve_e2e_request_latency_seconds";
pub const QUEUE_TIME: &str = "pdserve_request_queue_time_seconds";
pub const PREFILL_TIME: &str = "pdserve_request_prefill_time_seconds";
pub const GENERATED_TOKENS: &str = "pdserve_generation_tokens_total";
pub const PROMPT_TOKENS: &str = "pdserve_prompt_tokens_total";
pub const QUEUE_DEPTH: &str = "pdserve_num_requests_waiting";
pub const RUNNING: &str = "pdserve_num_requests_running";
pub const BATCH_SIZE: &str = "pdserve_batch_size";
pub const BLOCKS_FREE: &str = "pdserve_kv_blocks_free";
pub const BLOCKS_TOTAL: &str = "pdserve_kv_blocks_total";
pub const REGIONS: &str = "pdserve_kv_registered_regions";
pub const KV_BYTES: &str = "pdserve_kv_transfer_bytes_total";
pub const KV_TIME: &str = "pdserve_kv_transfer_duration_seconds";
pub const KV_BANDWIDTH: &str = "pdserve_kv_transfer_bandwidth_bytes_per_second";
pub const OUTSTANDING: &str = "pdserve_router_outstanding_requests";
pub const EARLY_PREFILLS: &str = "pdserve_early_prefills_total";
pub const REQUESTS_CANCELLED: &str = "pdserve_requests_cancelled_total";
pub const REQUESTS_REJECTED: &str = "pdserve_requests_rejected_total";
pub const BLOCKS_QUARANTINED: &str = "pdserve_kv_blocks_quarantined";
pub const KV_WRITES_ABANDONED: &str = "pdserve_kv_writes_abandoned_total";
pub const PREFIX_QUERIES: &str = "pdserve_prefix_cache_queries_total";
pub const PREFIX_HITS: &str = "pdserve_prefix_cache_hits_total";
pub const BLOCKS_CACHED: &str = "pdserve_kv_blocks_cached";
pub const PREFILL_BATCH_TOKENS: &str = "pdserve_prefill_batch_tokens";
pub const PREFILL_BATCH_PROMPTS: &str = "pdserve_prefill_batch_prompts";
pub const PREEMPTIONS: &str = "pdserve_num_preemptions_total";
pub const PREEMPTED: &str = "pdserve_sequences_preempted";
pub const ROUTER_INDEX_BLOCKS: &str = "pdserve_router_kv_index_blocks";
pub const ROUTER_KV_HIT_RATE: &str = "pdserve_router_kv_hit_rate";
pub const ROUTER_OVERLAP_BLOCKS: &str = "pdserve_router_overlap_blocks_total";

const SECONDS: [f64; 20] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
];
const BANDWIDTH: [f64; 12] = [1e7, 1e8, 5e8, 1e9, 2.5e9, 5e9, 1e10, 2.5e10, 5e10, 1e11, 2.5e11, 1e12];
const TOKENS: [f64; 12] = [
    16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0,
];
const BATCH: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics_listen: {0:?} is not host:port")]
    Address(String),
    #[error("cannot serve metrics on {0}: {1}")]
    Serve(String, String),
}

/// Starts the `/metrics` endpoint on `listen` (nothing when empty). Call inside the runtime.
pub fn install(listen: &str, daemon: &str) -> Result<(), MetricsError> {
    if listen.is_empty() {
        return Ok(());
    }
    let addr: SocketAddr = listen.parse().map_err(|_| MetricsError::Address(listen.to_string()))?;
    let serve_err = |e: &dyn std::fmt::Display| MetricsError::Serve(listen.to_string(), e.to_string());
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .add_global_label("daemon", daemon)
        .set_buckets(&SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(KV_BANDWIDTH.into()), &BANDWIDTH))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &BATCH))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(PREFILL_BATCH_PROMPTS.into()), &BATCH))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(PREFILL_BATCH_TOKENS.into()), &TOKENS))
        .map_err(|e| serve_err(&e))?
        .install()
        .map_err(|e| serve_err(&e))?;
    describe();
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(())
}

fn describe() {
    describe_counter!(REQUESTS, "Requests finished, by outcome (ok or the gRPC code)");
    describe_histogram!(TTFT, Unit::Seconds, "Time to first token, from receipt of the request");
    describe_histogram!(ITL, Unit::Seconds, "Time between consecutive output tokens");
    describe_histogram!(E2E, Unit::Seconds, "Time from receipt of the request to its last token");
    describe_histogram!(QUEUE_TIME, Unit::Seconds, "Time waiting for KV blocks before prefill");
    describe_histogram!(PREFILL_TIME, Unit::Seconds, "Prefill compute time");
    describe_counter!(GENERATED_TOKENS, "Output tokens generated");
    describe_counter!(PROMPT_TOKENS, "Prompt tokens prefilled");
    describe_gauge!(QUEUE_DEPTH, "Requests waiting for KV blocks or their prefill");
    describe_gauge!(RUNNING, "Sequences in the decode batch");
    describe_histogram!(BATCH_SIZE, "Sequences per decode step");
    describe_gauge!(BLOCKS_FREE, "KV-cache blocks a new request can take (empty, or cached and idle)");
    describe_gauge!(BLOCKS_TOTAL, "KV-cache blocks in the pools");
    describe_counter!(PREFIX_QUERIES, "Prompt tokens looked up in the prefix cache");
    describe_counter!(
        PREFIX_HITS,
        "Prompt tokens found in the prefix cache (prefill-server: not computed; decode-server: not transferred)"
    );
    describe_gauge!(BLOCKS_CACHED, "KV-cache blocks holding a cached prompt block (in use or idle)");
    describe_histogram!(PREFILL_BATCH_TOKENS, "Prompt tokens per prefill forward pass");
    describe_histogram!(PREFILL_BATCH_PROMPTS, "Prompts (chunks) per prefill forward pass");
    describe_counter!(PREEMPTIONS, "Sequences preempted: their KV blocks taken back when the pool ran out");
    describe_gauge!(PREEMPTED, "Preempted sequences waiting for blocks to resume");
    describe_gauge!(REGIONS, "Memory regions registered with the data plane (the KV pools only)");
    describe_counter!(KV_BYTES, Unit::Bytes, "KV-cache bytes written to decode-servers, by backend");
    describe_histogram!(KV_TIME, Unit::Seconds, "Duration of one request's KV write, by backend");
    describe_histogram!(KV_BANDWIDTH, "Bytes per second of one request's KV write, by backend");
    describe_gauge!(OUTSTANDING, "Requests in flight through the router");
    describe_gauge!(
        ROUTER_INDEX_BLOCKS,
        "Cached KV blocks the router's index holds for each worker (its view of their prefix caches), by role and worker"
    );
    describe_gauge!(
        ROUTER_KV_HIT_RATE,
        "Share of routed prompt tokens cached on the chosen prefill-server, as the router's index saw it (kv_aware)"
    );
    describe_counter!(
        ROUTER_OVERLAP_BLOCKS,
        "Cached leading blocks of routed prompts on the chosen prefill-server, as the router's index saw them (kv_aware)"
    );
    describe_counter!(
        REQUESTS_CANCELLED,
        "Requests whose client went away before they finished (their waits ended, their blocks freed)"
    );
    describe_counter!(
        REQUESTS_REJECTED,
        "Requests refused at once under load, by reason (queue_full: max_waiting; router_busy: max_inflight)"
    );
    describe_gauge!(
        BLOCKS_QUARANTINED,
        "KV blocks held back after a failed or cancelled prefill, until no write into them can land"
    );
    describe_counter!(
        KV_WRITES_ABANDONED,
        "KV writes that did not complete (timeout, peer failure) and were force-closed, by backend; their blocks are quarantined on both sides"
    );
    describe_counter!(
        EARLY_PREFILLS,
        "Prompts the router started early, by outcome (used, unclaimed, mismatch, failed, evicted, dropped)"
    );
    describe_gauge!(
        discovery::METRIC_STALE,
        "1 while etcd is unreachable and this daemon serves with the last membership it saw"
    );
    describe_gauge!(discovery::METRIC_MEMBERS, "Cluster members in this daemon's view, by role");
    describe_counter!(discovery::METRIC_RESYNCS, "Times the membership was read anew after etcd came back");
    describe_gauge!(discovery::METRIC_REGISTERED, "1 while this daemon's own key is in etcd");
}

/// gRPC metadata on a RESOURCE_EXHAUSTED refused at once: when to try again, in ms
/// (the HTTP API turns it into `retry-after`).
pub const RETRY_AFTER_MS: &str = "pdserve-retry-after-ms";

/// A refusal under load: RESOURCE_EXHAUSTED with a retry hint, counted by `reason`.
pub fn rejected(reason: &'static str, message: String, retry_after_ms: u64) -> tonic::Status {
    ::metrics::counter!(REQUESTS_REJECTED, "reason" => reason).increment(1);
    let mut s = tonic::Status::resource_exhausted(message);
    s.metadata_mut().insert(RETRY_AFTER_MS, retry_after_ms.into());
    s
}

/// One place in a bounded line: counted in the line's counter while it lives.
pub struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    /// A place in the line `count` holds, unless `max` are there already.
    pub fn enter(count: &'a std::sync::atomic::AtomicUsize, max: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Waiting(count))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Counts a finished request: `ok` or the gRPC code's name.
pub fn request_done(outcome: Result<(), tonic::Code>) {
    let label = match outcome {
        Ok(()) => "ok".to_string(),
        Err(code) => format!("{code:?}").to_lowercase(),
    };
    ::metrics::counter!(REQUESTS, "outcome" => label).increment(1);
}

/// Adds one to a gauge until dropped.
pub struct GaugeGuard(&'static str);

/// Keeps `held` (whatever returns KV blocks to their pool when dropped) out of
/// circulation until `until`, counting its `blocks` in [`BLOCKS_QUARANTINED`]
/// meanwhile: a write into (or out of) them may still land until then.
pub fn quarantine<T: Send + 'static>(held: T, blocks: usize, until: tokio::time::Instant) {
    let n = blocks as f64;
    ::metrics::gauge!(BLOCKS_QUARANTINED).increment(n);
    // Not tracked: a stopping daemon need not wait for its quarantines (the process
    // and its memory go together).
    tokio::spawn(async move {
        tokio::time::sleep_until(until).await;
        drop(held);
        ::metrics::gauge!(BLOCKS_QUARANTINED).decrement(n);
    });
}

impl GaugeGuard {
    pub fn new(name: &'static str) -> GaugeGuard {
        ::metrics::gauge!(name).increment(1.0);
        GaugeGuard(name)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        ::metrics::gauge!(self.0).decrement(1.0);
    }
}
