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

/// Test hosts in network namespaces of their own, as on separate machines: a switch
/// namespace holds a bridge; each node (named by a letter) has a veth port on it at
/// 10.201.N.(2 + its index), and this test process has one too (.1). Everything is
/// removed when dropped.
pub mod netns {
    use std::process::{Child, Command, Stdio};

    fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
        let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    pub struct Net {
        tag: String,
        net: u8,
        nodes: Vec<char>,
    }

    impl Net {
        /// The namespaces for `nodes`, or why they cannot be made here (not root, no `ip`).
        pub fn create(nodes: &[char]) -> Result<Net, String> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return Err("not root: network namespaces need CAP_NET_ADMIN".into());
            }
            let pid = std::process::id();
            let net = Net {
                tag: format!("pd{}", pid % 100_000),
                net: 20 + (pid % 200) as u8,
                nodes: nodes.to_vec(),
            };
            net.build().map(|()| net)
        }

        fn ns(&self, what: &str) -> String {
            format!("{}{what}", self.tag)
        }

        /// The address of host `host` (1: this process).
        pub fn addr(&self, host: u8) -> String {
            format!("10.201.{}.{host}", self.net)
        }

        /// The address of `node`.
        pub fn addr_of(&self, node: char) -> String {
            let i = self.nodes.iter().position(|&n| n == node).expect("a node of this net");
            self.addr(2 + i as u8)
        }

        fn build(&self) -> Result<(), String> {
            let sw = self.ns("sw");
            run("ip", &["netns", "add", &sw])?;
            run("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
            run("ip", &["-n", &sw, "link", "set", "br0", "up"])?;
            for &node in &self.nodes {
                let ns = self.ns(&node.to_string());
                let (inner, port) = (format!("{}x{node}", self.tag), format!("{}s{node}", self.tag));
                run("ip", &["netns", "add", &ns])?;
                run("ip", &["link", "add", &inner, "type", "veth", "peer", "name", &port])?;
                run("ip", &["link", "set", &inner, "netns", &ns])?;
                run("ip", &["-n", &ns, "link", "set", &inner, "name", "eth0"])?;
                run(
                    "ip",
                    &["-n", &ns, "addr", "add", &format!("{}/24", self.addr_of(node)), "dev", "eth0"],
                )?;
                run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
                run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
                run("ip", &["link", "set", &port, "netns", &sw])?;
                run("ip", &["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            }
            // This process's own leg on the switch.
            let (host, port) = (format!("{}h", self.tag), format!("{}sh", self.tag));
            run("ip", &["link", "add", &host, "type", "veth", "peer", "name", &port])?;
            run("ip", &["link", "set", &port, "netns", &sw])?;
            run("ip", &["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            run("ip", &["addr", "add", &format!("{}/24", self.addr(1)), "dev", &host])?;
            run("ip", &["link", "set", &host, "up"])
        }

        /// Cuts (or heals) `node`'s link: its switch port goes down (up).
        pub fn partition(&self, node: char, cut: bool) {
            let port = format!("{}s{node}", self.tag);
            run("ip", &["-n", &self.ns("sw"), "link", "set", &port, if cut { "down" } else { "up" }]).unwrap();
        }

        /// Limits what `node` sends to `rate` (tbf), or lifts the limit.
        pub fn rate_limit(&self, node: char, rate: Option<&str>) {
            let ns = self.ns(&node.to_string());
            match rate {
                Some(r) => run(
                    "tc",
                    &[
                        "-n", &ns, "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", r, "burst", "32kbit", "latency", "400ms",
                    ],
                ),
                None => run("tc", &["-n", &ns, "qdisc", "del", "dev", "eth0", "root"]),
            }
            .unwrap();
        }

        /// Starts daemon `bin` inside `node`'s namespace with `config` (`dir/bin.toml`);
        /// its log goes to `dir/bin.log`.
        pub fn spawn(&self, node: char, bin: &str, dir: &std::path::Path, config: &str) -> Child {
            let cfg = dir.join(format!("{bin}.toml"));
            std::fs::write(&cfg, config).unwrap();
            let config_arg = cfg.display().to_string();
            self.spawn_program(
                node,
                &pdserve::up::binary(bin).unwrap(),
                &["--config", &config_arg],
                &dir.join(format!("{bin}.log")),
            )
        }

        /// Starts `program` with `args` inside `node`'s namespace; stderr to `log`.
        pub fn spawn_program(&self, node: char, program: &std::path::Path, args: &[&str], log: &std::path::Path) -> Child {
            let log = std::fs::File::create(log).unwrap();
            // `ip netns exec` enters the namespace and execs the program: the child is it.
            Command::new("ip")
                .args(["netns", "exec", &self.ns(&node.to_string())])
                .arg(program)
                .args(args)
                // UCX (ours and NIXL's) on the veth only: never loopback, which in another
                // namespace is another host's.
                .env("UCX_NET_DEVICES", "eth0")
                // and over TCP only: shared memory and cma cross network namespaces.
                .env("UCX_TLS", "tcp")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap()
        }
    }

    impl Drop for Net {
        fn drop(&mut self) {
            let _ = run("ip", &["link", "del", &format!("{}h", self.tag)]);
            for n in self.nodes.iter().map(char::to_string).chain(["sw".to_string()]) {
                let _ = run("ip", &["netns", "del", &self.ns(&n)]);
            }
        }
    }
}

/// Whether the server at `url` reports SERVING for the client API.
pub async fn client_ok(url: &str) -> bool {
    pdserve::up::serving(url, "pdserve.v1.Generation").await
}

/// A test's work folder; on a failure, the tails of the named logs (`NAME.log`) in it go
/// to the test's output (CI keeps only that).
pub struct LogsOnPanic(tempfile::TempDir, Vec<&'static str>);

impl LogsOnPanic {
    pub fn new(logs: &[&'static str]) -> LogsOnPanic {
        LogsOnPanic(tempfile::tempdir().unwrap(), logs.to_vec())
    }

    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for name in &self.1 {
            let text = std::fs::read_to_string(self.0.path().join(format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("---- {name}.log (last 60 of {} lines) ----", lines.len());
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{l}");
            }
        }
    }
}
