//! What the daemons share: config loading, logging, shutdown signals, health and
//! reflection services, request ids, and the one mapping from domain errors to gRPC
//! status codes (the service edge).
pub mod config;
pub mod convert;
pub mod status;

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

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
}

/// A request id for requests that came without one.
pub fn new_request_id() -> String {
    format!("req-{:016x}", rand::random::<u64>())
}

/// Server reflection for `pdserve.v1`, so `grpcurl` works without the .proto files.
pub fn reflection() -> tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor sets are valid")
}

/// The gRPC limits every daemon applies to incoming messages.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Polls `f` until it returns true or `deadline` passes.
pub async fn wait_until(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + deadline;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}
