//! Helpers for the end-to-end tests: a synthetic model made once, deployments of the
//! real daemon binaries (built by `cargo build --workspace`), clients, references.
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use engine::{Engine, EngineConfig, SamplingParams};
use kv_transfer::BackendKind;
use pdserve::up::{Args, Deployment, start};
use proto::v1 as pb;
use proto::v1::generation_client::GenerationClient;
use tonic::transport::Channel;

pub fn model() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("pdserve-e2e-model-").tempdir().unwrap().keep();
        engine::synth::synthesize(engine::Arch::Llama, engine::synth::Preset::Tiny, 11, &dir).unwrap();
        dir
    })
    .clone()
}

/// The colocated reference, in this process.
pub fn reference_engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        Engine::load(&EngineConfig {
            model: model(),
            kv_cache_mib: 64,
            ..Default::default()
        })
        .unwrap()
    })
}

pub async fn deploy(backend: BackendKind, prefill: usize, decode: usize, kv_cache_mib: u64) -> (Deployment, tempfile::TempDir) {
    deploy_with(backend, prefill, decode, kv_cache_mib, 30_000).await
}

pub async fn deploy_with(
    backend: BackendKind,
    prefill: usize,
    decode: usize,
    kv_cache_mib: u64,
    queue_deadline_ms: u64,
) -> (Deployment, tempfile::TempDir) {
    deploy_full(backend, prefill, decode, kv_cache_mib, queue_deadline_ms, 0).await
}

pub async fn deploy_full(
    backend: BackendKind,
    prefill: usize,
    decode: usize,
    kv_cache_mib: u64,
    queue_deadline_ms: u64,
    local_prefill_below: usize,
) -> (Deployment, tempfile::TempDir) {
    deploy_args(Args {
        local_prefill_below,
        queue_deadline_ms,
        ..args(backend, prefill, decode, kv_cache_mib)
    })
    .await
}

/// The tests' deployment: one-process-per-daemon on loopback, the test model. The
/// transfer deadline is short so that a failed prefill's blocks (held for a write
/// that might still land) come back within a test's patience.
pub fn args(backend: BackendKind, prefill: usize, decode: usize, kv_cache_mib: u64) -> Args {
    Args {
        placement: pdserve::up::Placement::cpu(Some(model()), kv_cache_mib),
        backend,
        prefill,
        decode,
        transfer_deadline_ms: TEST_TRANSFER_DEADLINE_MS,
        ready_timeout: 60,
        ..Default::default()
    }
}

pub const TEST_TRANSFER_DEADLINE_MS: u64 = 4_000;

pub async fn deploy_args(mut args: Args) -> (Deployment, tempfile::TempDir) {
    let work = tempfile::tempdir().unwrap();
    args.workdir = Some(work.path().to_path_buf());
    let dep = start(&args, work.path())
        .await
        .unwrap_or_else(|e| panic!("deployment failed: {e:#}"));
    (dep, work)
}

pub async fn client(url: &str) -> GenerationClient<Channel> {
    GenerationClient::connect(url.to_string()).await.unwrap()
}

pub fn request(input: pb::generate_request::Input, p: &SamplingParams) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: String::new(),
        input: Some(input),
        sampling: Some(daemon::convert::sampling_to_wire(p)),
    }
}

/// Streams a request; returns the tokens seen in chunks and the final result.
pub async fn stream(c: &mut GenerationClient<Channel>, req: pb::GenerateRequest) -> Result<(Vec<u32>, pb::GenerateResult), tonic::Status> {
    use tokio_stream::StreamExt;
    let mut s = c.generate(req).await?.into_inner();
    let mut chunks = Vec::new();
    while let Some(item) = s.next().await {
        match item?.kind {
            Some(pb::generate_response::Kind::Chunk(ch)) => chunks.extend(ch.token_ids),
            Some(pb::generate_response::Kind::Result(r)) => return Ok((chunks, r)),
            None => {}
        }
    }
    Err(tonic::Status::internal("stream ended without a result"))
}

pub async fn stats(decode_url: &str) -> pb::StatsResponse {
    let mut c = pb::decode_admin_client::DecodeAdminClient::connect(decode_url.to_string())
        .await
        .unwrap();
    c.stats(pb::StatsRequest {}).await.unwrap().into_inner()
}

/// Waits until the decode-server holds no blocks (release happens on its batch thread,
/// or, for a failed prefill, once no write of it can land: up to the transfer deadline
/// and a second).
pub async fn assert_all_blocks_free(decode_url: &str) {
    for _ in 0..(TEST_TRANSFER_DEADLINE_MS / 50 + 60) {
        let s = stats(decode_url).await;
        if s.free_blocks == s.total_blocks && s.sequences == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = stats(decode_url).await;
    panic!(
        "KV blocks leaked: {} free of {}, {} sequences",
        s.free_blocks, s.total_blocks, s.sequences
    );
}

pub async fn stop_cleanly(dep: Deployment) {
    for (name, code) in dep.stop().await {
        assert_eq!(code, Some(0), "{name} did not exit 0 after SIGTERM");
    }
}

/// GET /metrics on 127.0.0.1:`port`.
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// The value of the first sample of `name` whose labels include every one of `labels`.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A free TCP port on loopback (for daemons started from config files).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The first of `n` consecutive free loopback ports (`pdserve up --metrics-port` takes
/// a run). Looked for below the kernel's ephemeral range (32768 up): there, the ports
/// after a free one are often taken by other tests' client connections.
pub fn free_port_run(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let spread = (std::process::id() % 400) as u16 * 25;
    for _ in 0..400 {
        let base = 20_000 + (spread + NEXT.fetch_add(n, Ordering::Relaxed)) % 10_000;
        let held: Vec<_> = (base..base + n)
            .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == n as usize {
            return base;
        }
    }
    panic!("no run of {n} free ports in 20000-30000");
}

/// A daemon process started by a test; killed and reaped when dropped.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
