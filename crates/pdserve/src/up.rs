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
}

impl Placement {
    pub fn cpu(model: Option<PathBuf>, kv_cache_mib: u64) -> Placement {
        Placement {
            model,
            device: "cpu".into(),
            prefill_device: None,
            kv_cache_mib,
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
    /// Prompts shorter than this are prefilled on the decode-server (0: never).
    #[arg(long, default_value_t = 0)]
    pub local_prefill_below: usize,
    /// How long a request may wait for KV blocks on a decode-server, ms.
    #[arg(long, default_value_t = 30_000)]
    pub queue_deadline_ms: u64,
    /// Deadline of one prefill call on the decode-servers, ms.
    #[arg(long, default_value_t = 60_000)]
    pub prefill_deadline_ms: u64,
    /// Deadline of one KV write (and notification wait) in every daemon, ms.
    #[arg(long, default_value_t = 30_000)]
    pub transfer_deadline_ms: u64,
    /// The router does not start prompts on the prefill-servers early (its
    /// `prefill_servers` stays empty): each decode-server asks one itself.
    #[arg(long)]
    pub no_early_prefill: bool,
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
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
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
    pub decode: Vec<String>,
    pub prefill: Vec<String>,
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
    let engine = |device: &str| {
        format!(
            "[engine]\nmodel = {}\ndevice = {}\nkv_cache_mib = {}\n\n[transfer]\nbackend = \"{}\"\ndeadline_ms = {}\n",
            toml_str(&model.display().to_string()),
            toml_str(device),
            p.kv_cache_mib,
            a.backend,
            a.transfer_deadline_ms
        )
    };
    let engine_section = engine(&p.device);
    let prefill_section = engine(p.prefill_device.as_deref().unwrap_or(&p.device));
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
            format!("listen = \"{addr}\"\n{}\n{prefill_section}", metrics(1 + a.decode + i)),
        )?);
        prefill.push(format!("http://{addr}"));
    }
    let mut decode = Vec::new();
    let peers = prefill.iter().map(|p| toml_str(p)).collect::<Vec<_>>().join(", ");
    for i in 0..a.decode {
        let addr = format!("127.0.0.1:{}", free_port()?);
        children.push(spawn(
            &format!("decode-{i}"),
            "decode-server",
            format!(
                "listen = \"{addr}\"\n{}prefill_servers = [{peers}]\nlocal_prefill_below = {}\nqueue_deadline_ms = {}\nprefill_deadline_ms = {}\n\n{engine_section}",
                metrics(1 + i),
                a.local_prefill_below,
                a.queue_deadline_ms,
                a.prefill_deadline_ms
            ),
        )?);
        decode.push(format!("http://{addr}"));
    }
    let router_addr = match &a.router_addr {
        Some(r) => r.clone(),
        None => format!("127.0.0.1:{}", free_port()?),
    };
    let ds = decode.iter().map(|p| toml_str(p)).collect::<Vec<_>>().join(", ");
    let early = if a.no_early_prefill { "" } else { peers.as_str() };
    children.push(spawn(
        "router",
        "router",
        format!(
            "listen = \"{router_addr}\"\n{}decode_servers = [{ds}]\nprefill_servers = [{early}]\n",
            metrics(0)
        ),
    )?);
    let mut dep = Deployment {
        router: format!("http://{router_addr}"),
        decode,
        prefill,
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
            if handshaken(url).await == Some(dep.prefill.len()) {
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

/// How many prefill-servers the decode-server at `url` has handshaken.
async fn handshaken(url: &str) -> Option<usize> {
    let mut c = proto::v1::decode_admin_client::DecodeAdminClient::connect(url.to_string())
        .await
        .ok()?;
    let r = tokio::time::timeout(Duration::from_secs(1), c.stats(proto::v1::StatsRequest {}))
        .await
        .ok()?
        .ok()?;
    Some(r.into_inner().healthy_prefill_servers as usize)
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
