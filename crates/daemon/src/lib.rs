//! What the daemons share: config loading, logging, shutdown signals, health and
//! reflection services, request ids, and the one mapping from domain errors to gRPC
//! status codes (the service edge).
pub mod auth;
pub mod config;
pub mod convert;
pub mod kv_events;
pub mod membership;
pub mod metrics;
pub mod status;
pub mod systemd;
pub mod tasks;
pub mod tls;
pub mod validate;

use std::time::Duration;

pub use config::{ConfigError, load_config};

/// A daemon's whole `main`: parse `--config`, set up logging, load the config (exit
/// 64 with the key and reason if it is bad), serve until SIGTERM/SIGINT, and end the
/// process with `_exit` (see `kv_transfer::exit_now`): 0 after a clean shutdown.
pub fn main<C, F, Fut>(name: &str, serve: F) -> !
where
    C: serde::de::DeserializeOwned + serde::Serialize + Default + config::Validate,
    F: FnOnce(C, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    kv_transfer::process_defaults();
    let mut args = std::env::args().skip(1);
    let mut path = std::env::var_os("PDSERVE_CONFIG").map(std::path::PathBuf::from);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => path = args.next().map(Into::into),
            "--version" | "-V" => {
                println!("{name} {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0)
            }
            "--help" | "-h" => {
                println!(
                    "{name} [--config FILE]\n\nTOML config (see configs/); PDSERVE_* environment variables override it (configs/README.md)."
                );
                std::process::exit(0)
            }
            other => {
                eprintln!("{name}: unknown argument {other:?} (try --help)");
                std::process::exit(64)
            }
        }
    }
    init_tracing();
    let _ = CONFIG_PATH.set(path.clone());
    let cfg: C = match load_config(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::exit(64)
        }
    };
    let code = match tokio::runtime::Runtime::new() {
        Ok(rt) => {
            let code = match rt.block_on(serve(cfg, Box::pin(shutdown_signal()))) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("{name}: {e:#}");
                    1
                }
            };
            drop(rt);
            code
        }
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            1
        }
    };
    kv_transfer::exit_now(code)
}

static CONFIG_PATH: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

/// The config file [`main`] loaded (None: defaults and environment only), for a reload.
pub fn config_path() -> Option<std::path::PathBuf> {
    CONFIG_PATH.get().cloned().flatten()
}

/// Logs to stderr; `RUST_LOG` filters (default `info`). Colours only on a terminal:
/// journald and log files get plain text.
pub fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Resolves on SIGTERM or SIGINT, and from then on a second one ends the process at
/// once (exit code 130), drain or not: an operator who asks twice means it.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining (a second signal exits at once)"),
        _ = int.recv() => tracing::info!("SIGINT: draining (a second signal exits at once)"),
    }
    systemd::stopping();
    // Not tracked: the drain must not wait for this one.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now");
        kv_transfer::exit_now(130)
    });
}

/// How long a stopping daemon waits for its background tasks (prefills' writes,
/// quarantines) before it releases the data plane under them.
pub const DRAIN_TASKS: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits (up to [`DRAIN_TASKS`]) for the tasks spawned through [`tasks::spawn`].
pub async fn drain_tasks(name: &str) {
    let left = tasks::drain(DRAIN_TASKS).await;
    if left > 0 {
        tracing::warn!(
            tasks = left,
            "{name}: background tasks still running after {DRAIN_TASKS:?}; stopping anyway"
        );
    }
}

/// A request id for requests that came without one.
pub fn new_request_id() -> String {
    format!("req-{:016x}", rand::random::<u64>())
}

/// Server reflection, v1 and v1alpha (Python's `grpcio-reflection` still speaks only
/// v1alpha), so `grpcurl` and other clients work without the .proto files. It lists
/// the daemon's own `services` (full names, e.g. `pdserve.v1.Prefill`), health and
/// reflection, and nothing the daemon does not serve.
pub fn reflection(
    services: &[&str],
) -> (
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
) {
    let build = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
        for name in services.iter().copied().chain(OPEN_SERVICES) {
            b = b.with_service_name(name);
        }
        b
    };
    let v1 = build().build_v1().expect("descriptor sets are valid");
    let v1alpha = build().build_v1alpha().expect("descriptor sets are valid");
    (v1, v1alpha)
}

/// The services every daemon serves without credentials.
const OPEN_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Metadata a prefill-server puts on a failed prefill's status: it is done with the
/// request, so no write of it can start any more (one it abandoned may still land for
/// a moment). Without it, the decode-server must assume a write may yet come.
pub const KV_WRITE_OVER: &str = "pdserve-kv-write-over";

/// Metadata a prefill-server puts on a prefill whose KV write it abandoned (timed out,
/// peer failed): for how many more milliseconds bytes of it may land. The
/// decode-server holds the blocks at least that long.
pub const KV_MAY_LAND_MS: &str = "pdserve-kv-may-land-ms";

/// Metadata on the router's Generate to a decode-server: the prefill-server (its URL as
/// both configs name it) that the router started the prompt on early, and that the
/// decode-server should therefore ask first.
pub const PREFILL_HINT: &str = "pdserve-prefill-server";
/// The [`PREFILL_HINT`] that asks the decode-server to prefill the prompt itself (the
/// router's conditional disaggregation), and the `prefill_server` such requests report.
pub const LOCAL_PREFILL: &str = "local";

/// The gRPC limits every daemon applies to incoming messages.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Accepted connections of `listener`, with Nagle off (token streams are small writes).
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Keeps `S`'s gRPC health in step with `ready()`, checked every 100 ms.
pub fn report_readiness<S: tonic::server::NamedService>(
    reporter: tonic_health::server::HealthReporter,
    name: &'static str,
    ready: impl Fn() -> bool + Send + 'static,
) {
    // For the process's life: not tracked (a drain would wait for it in vain).
    tokio::spawn(async move {
        let mut was = false;
        loop {
            let now = ready();
            if now != was {
                if now {
                    reporter.set_serving::<S>().await
                } else {
                    reporter.set_not_serving::<S>().await
                }
                tracing::info!(ready = now, "{name} readiness changed");
                was = now;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Runs `prompt` from position `start` (the K/V of the positions before it already in
/// `blocks`: a cached prefix) through the model into `blocks` and picks its first
/// token (on a blocking thread); returns the token and the time both took in ms. Colocated and
/// disaggregated prefills both come through here, so their figures compare.
pub async fn prefill_first_token(
    engine: &std::sync::Arc<engine::Engine>,
    prompt: &[u32],
    start: usize,
    blocks: &[u32],
    params: &engine::SamplingParams,
) -> Result<(u32, f64), tonic::Status> {
    let t = std::time::Instant::now();
    let (e, p, b, params) = (engine.clone(), prompt.to_vec(), blocks.to_vec(), params.clone());
    let first = tokio::task::spawn_blocking(move || e.prefill_pick(&p, start, &b, &params))
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .map_err(|e| status::from_engine(&e))?;
    Ok((first, t.elapsed().as_secs_f64() * 1e3))
}

/// Registers the engine's KV pools with the data plane: K then V for every layer.
pub fn register_pools(engine: &engine::Engine, agent: &kv_transfer::Agent) -> anyhow::Result<Vec<kv_transfer::Registration>> {
    let pools = engine.pools();
    let mut regs = Vec::new();
    for r in pools.regions()? {
        let kind = match r.device {
            None => kv_transfer::MemKind::Dram,
            Some(d) => kv_transfer::MemKind::Vram { device: d },
        };
        // SAFETY: the range is one KV pool tensor's storage, which lives as long as
        // `pools` (the owner handed over) and is never reallocated.
        let mem = unsafe { kv_transfer::Memory::from_raw(r.addr as usize, r.len as usize, kind, pools.clone()) };
        regs.push(agent.register(mem)?);
    }
    ::metrics::gauge!(metrics::REGIONS).set(agent.registered_regions() as f64);
    ::metrics::gauge!(metrics::BLOCKS_TOTAL).set(engine.total_blocks() as f64);
    ::metrics::gauge!(metrics::BLOCKS_FREE).set(engine.free_blocks() as f64);
    Ok(regs)
}
