//! `pdserve up`: a local deployment on loopback from the real daemon binaries, each
//! a child process with its own config file. Prints the router's address once every
//! daemon reports healthy; Ctrl-C or SIGTERM stops them all.
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use kv_transfer::BackendKind;
use tokio::process::{Child, Command};

/// What every daemon of a local deployment loads, and where.
#[derive(clap::Args, Debug, Clone)]
pub struct Placement {
    /// Model directory; without it, a synthetic tiny model is made and used.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Device for every daemon: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Device for the prefill-servers, when it differs (e.g. prefill on cuda:0, decode on cuda:1).
    #[arg(long)]
    pub prefill_device: Option<String>,
    /// KV cache memory per daemon, MiB.
    #[arg(long, default_value_t = 256)]
    pub kv_cache_mib: u64,
    /// Weights and activations: auto (f32 on CPU, bf16 on GPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Turn prefix caching off on every daemon (engine `prefix_caching`), e.g. to
    /// measure what it saves.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Turn only the decode-servers' prefix caching off (every block travels).
    #[arg(long)]
    pub no_decode_prefix_caching: bool,
}

impl Placement {
    pub fn cpu(model: Option<PathBuf>, kv_cache_mib: u64) -> Placement {
        Placement {
            model,
            device: "cpu".into(),
            prefill_device: None,
            kv_cache_mib,
            dtype: "auto".into(),
            no_prefix_caching: false,
            no_decode_prefix_caching: false,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub placement: Placement,
    #[arg(long, default_value = "tcp")]
    pub backend: BackendKind,
    /// Number of prefill-servers.
    #[arg(long, default_value_t = 1)]
    pub prefill: usize,
    /// Number of decode-servers.
    #[arg(long, default_value_t = 1)]
    pub decode: usize,
    /// Router address (default: a free port on 127.0.0.1).
    #[arg(long)]
    pub router_addr: Option<String>,
    /// The router's OpenAI-compatible HTTP address (default: a free port on 127.0.0.1).
    #[arg(long)]
    pub http_addr: Option<String>,
    /// Prompts shorter than this are prefilled on the decode-server (0: never).
    #[arg(long, default_value_t = 0)]
    pub local_prefill_below: usize,
    /// How long a request may wait for KV blocks on a decode-server, ms.
    #[arg(long, default_value_t = 30_000)]
    pub queue_deadline_ms: u64,
    /// The decode-servers' `kv_allocation`: `on_demand` (blocks taken as sequences grow,
    /// the newest preempted when the pool runs out) or `reserve` (prompt + max_tokens
    /// at admission).
    #[arg(long, default_value = "on_demand", value_parser = ["on_demand", "reserve"])]
    pub kv_allocation: String,
    /// The decode-servers' `resume_chunk_tokens`: most positions of a preempted
    /// sequence's KV recomputed between two decode steps.
    #[arg(long, default_value_t = 512)]
    pub resume_chunk_tokens: usize,
    /// The prefill-servers' `max_batch_tokens`: most prompt tokens in one forward pass.
    #[arg(long, default_value_t = 8192)]
    pub max_batch_tokens: usize,
    /// The prefill-servers' `max_batch_prompts` (1 with a large `--chunk-tokens`: one
    /// prompt at a time, whole, as before batched prefill).
    #[arg(long, default_value_t = 64)]
    pub max_batch_prompts: usize,
    /// The prefill-servers' `chunk_tokens`: longest piece of a prompt in one pass.
    #[arg(long, default_value_t = 2048)]
    pub chunk_tokens: usize,
    /// Most requests waiting for KV blocks on a decode-server; past it they are refused at once.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// The router refuses new requests while even its fastest first tokens take longer
    /// than this, ms (router `shed_ttft_ms`; 0: off).
    #[arg(long, default_value_t = 0)]
    pub shed_ttft_ms: u64,
    /// Deadline of one prefill call on the decode-servers, ms.
    #[arg(long, default_value_t = 60_000)]
    pub prefill_deadline_ms: u64,
    /// Deadline of one KV write (and notification wait) in every daemon, ms.
    #[arg(long, default_value_t = 30_000)]
    pub transfer_deadline_ms: u64,
    /// The router does not start prompts on the prefill-servers early: each
    /// decode-server asks one itself (the router's choice under `--routing kv_aware`,
    /// its own round-robin otherwise).
    #[arg(long)]
    pub no_early_prefill: bool,
    /// How the router picks workers: `round_robin`, `least_outstanding`, or `kv_aware`
    /// (the prefill-server holding most of the prompt's KV blocks, against its load).
    #[arg(long, default_value = "round_robin", value_parser = ["round_robin", "least_outstanding", "kv_aware"])]
    pub routing: String,
    /// Where configs, logs and the synthetic model go (default: a temporary folder).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// How long to wait for every daemon to become healthy, seconds.
    #[arg(long, default_value_t = 120)]
    pub ready_timeout: u64,
    /// Serve Prometheus metrics from this port on: the router here, then each
    /// decode-server, then each prefill-server on the following ports.
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// Credentials for the whole deployment: the client token (`auth_token`) of the
    /// router and decode-servers, and the internal token of every daemon.
    #[arg(long, env = "PDSERVE_UP_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// How the daemons find each other: `static` (peer lists in their configs) or
    /// `etcd` (each registers in etcd; the router and decode-servers follow the
    /// members). `etcd` without `--etcd` starts an etcd of its own (Debian's etcd-server).
    #[arg(long, default_value = "static", value_parser = ["static", "etcd"])]
    pub discovery: String,
    /// An etcd to register in (implies `--discovery etcd`), e.g. http://127.0.0.1:2379.
    #[arg(long)]
    pub etcd: Option<String>,
    /// The cluster name under etcd (`discovery.cluster`).
    #[arg(long, default_value = "default")]
    pub cluster: String,
}

impl Args {
    fn discovers(&self) -> bool {
        self.discovery == "etcd" || self.etcd.is_some()
    }
}

impl Default for Args {
    /// `pdserve up` without flags: the defaults above, in one place.
    fn default() -> Args {
        #[derive(clap::Parser)]
        struct Up {
            #[command(flatten)]
            args: Args,
        }
        <Up as clap::Parser>::parse_from(["up"]).args
    }
}

fn free_port() -> anyhow::Result<u16> {
    free_port_run(1)
}

const LOW: u16 = 20_000;
const SPAN: u16 = 10_000;

/// The first port of the run of `n` at counter `step` of a process starting at
/// `spread`, or None for a run that would cross the span's end. One modulus for every
/// run length: the runs one process hands out never overlap until its counter has gone
/// round the whole span (a modulus of SPAN - n made runs of different lengths collide
/// right after the wrap: a daemon then failed with "Address already in use").
fn run_base(spread: u32, step: u32, n: u16) -> Option<u16> {
    let base = LOW + (spread.wrapping_add(step) % u32::from(SPAN)) as u16;
    (base + n <= LOW + SPAN).then_some(base)
}

/// The first of `n` consecutive free loopback ports. Looked for below the kernel's
/// ephemeral range (32768 up): a port found free there by binding port 0 can be taken,
/// between the check and the daemon's own bind, by any outgoing connection or
/// data-plane listener (CI saw a router fail with "Address already in use" that way).
/// Ports handed out are not handed out again by this process, and processes start
/// at different offsets.
pub fn free_port_run(n: u16) -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let spread = (std::process::id() % 400) * 25;
    for _ in 0..SPAN / n.max(1) {
        let step = NEXT.fetch_add(u32::from(n), Ordering::Relaxed);
        let Some(base) = run_base(spread, step, n) else { continue };
        let held: Vec<_> = (base..base + n)
            .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == n as usize {
            return Ok(base);
        }
    }
    bail!("no run of {n} free loopback ports in {LOW}-{}", LOW + SPAN)
}

/// The daemon binaries sit next to `pdserve` (same cargo target folder or install prefix).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("pdserve has no folder")?;
    for cand in [dir.join(name), dir.parent().map(|p| p.join(name)).unwrap_or_default()] {
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "{name} not found next to {} (build the workspace: cargo build --workspace)",
        exe.display()
    )
}

pub struct Deployment {
    pub router: String,
    /// The OpenAI API's base URL (`http://host:port/v1`).
    pub openai: String,
    /// The model name it serves.
    pub model_name: String,
    pub decode: Vec<String>,
    pub prefill: Vec<String>,
    /// Under discovery: the etcd every daemon registers in, and the one `up` started
    /// (None when given `--etcd`).
    pub etcd_url: Option<String>,
    pub etcd: Option<discovery::EmbeddedEtcd>,
    children: Vec<(String, Child)>,
}

impl Deployment {
    /// Sends SIGTERM to every daemon and waits for them (then SIGKILL after a deadline).
    pub async fn stop(mut self) -> Vec<(String, Option<i32>)> {
        let mut codes = Vec::new();
        for (_, c) in &self.children {
            if let Some(pid) = c.id() {
                // SAFETY: signalling our own child process by pid.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        for (name, c) in &mut self.children {
            let code = match tokio::time::timeout(Duration::from_secs(20), c.wait()).await {
                Ok(Ok(s)) => s.code(),
                _ => {
                    let _ = c.kill().await;
                    None
                }
            };
            codes.push((name.clone(), code));
        }
        codes
    }

    /// Children still running (a test kills some on purpose).
    pub fn child_mut(&mut self, name: &str) -> Option<&mut Child> {
        self.children.iter_mut().find(|(n, _)| n == name).map(|(_, c)| c)
    }
}

fn toml_str(s: &str) -> String {
    format!("{s:?}")
}

/// Starts the daemons and waits until the router serves.
pub async fn start(a: &Args, workdir: &Path) -> anyhow::Result<Deployment> {
    std::fs::create_dir_all(workdir)?;
    let p = &a.placement;
    let model = match &p.model {
        Some(m) => m.clone(),
        None => {
            let dir = workdir.join("model-tiny");
            if !dir.join("config.json").exists() {
                engine::synth::synthesize(engine::Arch::Llama, engine::synth::Preset::Tiny, 0, &dir)?;
            }
            dir
        }
    };
    let model = model.canonicalize().with_context(|| format!("model {}", model.display()))?;
    let engine = |device: &str, caching: bool| {
        format!(
            "[engine]\nmodel = {}\ndevice = {}\ndtype = {}\nkv_cache_mib = {}\nprefix_caching = {}\n\n[transfer]\nbackend = \"{}\"\ndeadline_ms = {}\n",
            toml_str(&model.display().to_string()),
            toml_str(device),
            toml_str(&p.dtype),
            p.kv_cache_mib,
            caching,
            a.backend,
            a.transfer_deadline_ms
        )
    };
    // Every daemon gets the internal token; the client API's two the client token.
    // Under discovery the records are sealed with the internal token: without one
    // given, the deployment gets a random one (clients need none).
    let internal_token = match (&a.auth_token, a.discovers()) {
        (Some(t), _) => Some(t.clone()),
        (None, true) => Some(format!("{:032x}", rand::random::<u128>())),
        (None, false) => None,
    };
    let (internal, client) = match (&internal_token, &a.auth_token) {
        (Some(t), Some(_)) => (
            format!("internal_token = {}\n", toml_str(t)),
            format!("internal_token = {0}\nauth_token = {0}\n", toml_str(t)),
        ),
        (Some(t), None) => (
            format!("internal_token = {}\n", toml_str(t)),
            format!("internal_token = {}\n", toml_str(t)),
        ),
        _ => (String::new(), String::new()),
    };
    // Under discovery: the etcd (given, or started here), and every daemon's section.
    let etcd = match (&a.etcd, a.discovers()) {
        (None, true) => {
            let run = free_port_run(2)?;
            Some(discovery::EmbeddedEtcd::start(&workdir.join("etcd"), "127.0.0.1", run, run + 1).await?)
        }
        _ => None,
    };
    let etcd_url = a.etcd.clone().or_else(|| etcd.as_ref().map(|e| e.url.clone()));
    let discovery_section = match &etcd_url {
        Some(u) => format!(
            "\n[discovery]\netcd = [{}]\ncluster = {}\nlease_ttl_s = 3\ntimeout_ms = 1000\nderegister_grace_ms = 500\n",
            toml_str(u),
            toml_str(&a.cluster)
        ),
        None => String::new(),
    };
    let engine_section = engine(&p.device, !p.no_prefix_caching && !p.no_decode_prefix_caching);
    let prefill_section = engine(p.prefill_device.as_deref().unwrap_or(&p.device), !p.no_prefix_caching);
    let mut children = Vec::new();
    let spawn = |name: &str, bin: &str, cfg: String| -> anyhow::Result<(String, Child)> {
        let path = workdir.join(format!("{name}.toml"));
        std::fs::write(&path, cfg)?;
        let log = std::fs::File::create(workdir.join(format!("{name}.log")))?;
        let child = Command::new(binary(bin)?)
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        Ok((name.to_string(), child))
    };
    let metrics = |offset: usize| match a.metrics_port {
        Some(p) => format!("metrics_listen = \"127.0.0.1:{}\"\n", p as usize + offset),
        None => String::new(),
    };
    let mut prefill = Vec::new();
    for i in 0..a.prefill {
        let addr = format!("127.0.0.1:{}", free_port()?);
        children.push(spawn(
            &format!("prefill-{i}"),
            "prefill-server",
            format!(
                "listen = \"{addr}\"\n{}{internal}max_batch_tokens = {}\nmax_batch_prompts = {}\nchunk_tokens = {}\n\n{prefill_section}{discovery_section}",
                metrics(1 + a.decode + i),
                a.max_batch_tokens,
                a.max_batch_prompts,
                a.chunk_tokens
            ),
        )?);
        prefill.push(format!("http://{addr}"));
    }
    let mut decode = Vec::new();
    // Under discovery the peers come from etcd, not from the configs.
    let listed = |urls: &[String]| match etcd_url {
        Some(_) => String::new(),
        None => urls.iter().map(|p| toml_str(p)).collect::<Vec<_>>().join(", "),
    };
    let peers = listed(&prefill);
    for i in 0..a.decode {
        let addr = format!("127.0.0.1:{}", free_port()?);
        children.push(spawn(
            &format!("decode-{i}"),
            "decode-server",
            format!(
                "listen = \"{addr}\"\n{}{client}prefill_servers = [{peers}]\nlocal_prefill_below = {}\nkv_allocation = {}\nresume_chunk_tokens = {}\nqueue_deadline_ms = {}\nmax_waiting = {}\nprefill_deadline_ms = {}\n\n{engine_section}{discovery_section}",
                metrics(1 + i),
                a.local_prefill_below,
                toml_str(&a.kv_allocation),
                a.resume_chunk_tokens,
                a.queue_deadline_ms,
                a.max_waiting,
                a.prefill_deadline_ms
            ),
        )?);
        decode.push(format!("http://{addr}"));
    }
    let router_addr = match &a.router_addr {
        Some(r) => r.clone(),
        None => format!("127.0.0.1:{}", free_port()?),
    };
    let ds = listed(&decode);
    // kv_aware needs the prefill-servers named even without early starts (it names
    // its choice to the decode-server); the other policies leave that to it.
    let kv_aware = a.routing == "kv_aware";
    let early = if a.no_early_prefill && !kv_aware { "" } else { peers.as_str() };
    let routing = format!(
        "policy = \"{}\"\nearly_prefill = {}\n{}",
        a.routing,
        !a.no_early_prefill,
        if kv_aware {
            format!("model = {}\n", toml_str(&model.display().to_string()))
        } else {
            String::new()
        }
    );
    let http_addr = match &a.http_addr {
        Some(h) => h.clone(),
        None => format!("127.0.0.1:{}", free_port()?),
    };
    let model_name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "default".into());
    children.push(spawn(
        "router",
        "router",
        format!(
            "listen = \"{router_addr}\"\nhttp_listen = \"{http_addr}\"\nserved_model_name = {}\n{}{client}decode_servers = [{ds}]\nprefill_servers = [{early}]\nshed_ttft_ms = {}\n{routing}{discovery_section}",
            toml_str(&model_name),
            metrics(0),
            a.shed_ttft_ms
        ),
    )?);
    let mut dep = Deployment {
        router: format!("http://{router_addr}"),
        openai: format!("http://{http_addr}/v1"),
        model_name,
        decode,
        prefill,
        etcd_url,
        etcd,
        children,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.ready_timeout);
    let targets: Vec<(String, &str)> = dep
        .decode
        .iter()
        .map(|d| (d.clone(), "pdserve.v1.Generation"))
        .chain(std::iter::once((dep.router.clone(), "pdserve.v1.Generation")))
        .collect();
    for (url, svc) in targets {
        loop {
            if serving(&url, svc).await {
                break;
            }
            for (name, c) in &mut dep.children {
                if let Ok(Some(status)) = c.try_wait() {
                    let log = std::fs::read_to_string(workdir.join(format!("{name}.log"))).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    bail!(
                        "{name} exited ({status}) before becoming ready:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{url} not healthy after {}s (logs in {})", a.ready_timeout, workdir.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A decode-server serves once one prefill-server is handshaken; a deployment is up when all are.
    for url in &dep.decode {
        loop {
            if stats(url, internal_token.as_deref())
                .await
                .map(|s| s.healthy_prefill_servers as usize)
                == Some(dep.prefill.len())
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{url} has not handshaken all prefill-servers after {}s (logs in {})",
                    a.ready_timeout,
                    workdir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(dep)
}

/// The decode-server's Stats (DecodeAdmin, with the internal token if one is set).
pub async fn stats(url: &str, internal_token: Option<&str>) -> Option<proto::v1::StatsResponse> {
    let mut c = proto::v1::decode_admin_client::DecodeAdminClient::connect(url.to_string())
        .await
        .ok()?;
    let mut req = tonic::Request::new(proto::v1::StatsRequest {});
    daemon::auth::BearerToken::new(internal_token.unwrap_or("")).attach(&mut req);
    let r = tokio::time::timeout(Duration::from_secs(1), c.stats(req)).await.ok()?.ok()?;
    Some(r.into_inner())
}

/// Whether `url` answers its gRPC health check with SERVING for `service`.
pub async fn serving(url: &str, service: &str) -> bool {
    let Ok(ep) = tonic::transport::Endpoint::from_shared(url.to_string()) else {
        return false;
    };
    let Ok(Ok(ch)) = tokio::time::timeout(Duration::from_secs(1), ep.connect()).await else {
        return false;
    };
    let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
    let req = tonic_health::pb::HealthCheckRequest { service: service.into() };
    matches!(tokio::time::timeout(Duration::from_secs(1), c.check(req)).await, Ok(Ok(r)) if r.get_ref().status == 1)
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let workdir = a
        .workdir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("pdserve-up-{}", std::process::id())));
    let dep = start(&a, &workdir).await?;
    println!("{}", dep.router);
    println!("openai: {}", dep.openai);
    eprintln!(
        "pdserve up: router {} -> {} decode-server(s) -> {} prefill-server(s), backend {}; logs and configs in {}; Ctrl-C stops",
        dep.router,
        dep.decode.len(),
        dep.prefill.len(),
        a.backend,
        workdir.display()
    );
    daemon::shutdown_signal().await;
    let codes = dep.stop().await;
    let bad: Vec<String> = codes
        .iter()
        .filter(|(_, c)| *c != Some(0))
        .map(|(n, c)| format!("{n}: {c:?}"))
        .collect();
    if bad.is_empty() {
        eprintln!("pdserve up: all daemons stopped cleanly");
        Ok(0)
    } else {
        eprintln!("pdserve up: daemons exited badly: {}", bad.join(", "));
        Ok(1)
    }
}

#[cfg(test)]
mod port_tests {
    use super::*;

    #[test]
    fn port_runs_of_mixed_lengths_never_overlap_across_the_wrap() {
        // A process starting near the span's end: its counter wraps early.
        let spread = 399 * 25;
        let (mut step, mut taken) = (0u32, std::collections::HashSet::new());
        for i in 0..2000 {
            let n = [1u16, 3, 1, 5, 2][i % 5];
            let base = loop {
                let s = step;
                step += u32::from(n);
                if let Some(b) = run_base(spread, s, n) {
                    break b;
                }
            };
            for p in base..base + n {
                assert!((LOW..LOW + SPAN).contains(&p));
                assert!(taken.insert(p), "port {p} handed out twice (run {i} of {n})");
            }
        }
    }
}
