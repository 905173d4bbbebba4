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

/// The real model, SmolLM2-135M-Instruct as `scripts/models.sh` imports it, or None
/// (with the reason printed) on a machine that has not run the scripts. Under CI
/// (`CI=true`, where scripts/test.sh imports it) a missing model fails the test.
pub fn smollm2() -> Option<PathBuf> {
    let deps = std::env::var_os("PDSERVE_DEPS_DIR")
        .map_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps"), PathBuf::from);
    let dir = deps.join("models/smollm2-135m-instruct");
    if dir.join("config.json").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} is missing under CI (scripts/models.sh did not run)",
        dir.display()
    );
    eprintln!("SKIP: {} is missing; run scripts/setup.sh and scripts/models.sh", dir.display());
    None
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
        ..Default::default()
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
    scrape_at(&format!("127.0.0.1:{port}"))
}

/// GET /metrics on `addr` (host:port).
pub fn scrape_at(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
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
    free_port_run(1)
}

/// The first of `n` consecutive free loopback ports (`pdserve up --metrics-port` takes a run).
pub fn free_port_run(n: u16) -> u16 {
    pdserve::up::free_port_run(n).unwrap()
}

/// A daemon process started by a test; killed and reaped when dropped.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts daemon `bin` with `config` written to `dir/name.toml`; its log goes to `dir/name.log`.
pub fn start_daemon(bin: &str, dir: &std::path::Path, name: &str, config: &str) -> Daemon {
    use std::process::{Command, Stdio};
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Daemon(
        Command::new(pdserve::up::binary(bin).unwrap())
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// The fault tests' workload: request `i`'s prompt and sampling, its colocated
/// reference, and what counts as a clear failure.
pub mod workload {
    use std::time::Duration;

    use engine::SamplingParams;
    use proto::v1 as pb;

    pub fn prompt(i: u64) -> Vec<u32> {
        let n = 8 + (i % 40) as u32;
        (0..n).map(|j| 3 + (j * 37 + i as u32 * 11) % 450).collect()
    }

    pub fn params(i: u64) -> SamplingParams {
        SamplingParams {
            max_tokens: 4 + (i % 12) as u32,
            ignore_eos: true,
            ..Default::default()
        }
    }

    pub fn input(ids: &[u32]) -> pb::generate_request::Input {
        pb::generate_request::Input::TokenIds(pb::TokenIds { ids: ids.to_vec() })
    }

    /// The colocated run's tokens for request `i`.
    pub fn reference(i: u64) -> Vec<u32> {
        engine::generate_local(super::reference_engine(), &prompt(i), &params(i))
            .unwrap()
            .tokens
    }

    /// Codes a request may end with while its daemons are killed under it.
    pub fn clear(code: tonic::Code) -> bool {
        matches!(
            code,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::ResourceExhausted | tonic::Code::Cancelled
        )
    }

    /// Waits until `cond` holds (up to `within`), naming `what` otherwise.
    pub async fn until<Fut: std::future::Future<Output = bool>>(what: &str, within: Duration, cond: impl Fn() -> Fut) {
        let deadline = std::time::Instant::now() + within;
        while !cond().await {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
