//! `router`: load config, build the service, serve until SIGTERM.
use clap::Parser;

#[derive(Parser)]
#[command(version, about = "pdserve router")]
struct Args {
    /// TOML config (see configs/router.toml); PDSERVE_* variables override it.
    #[arg(long, env = "PDSERVE_CONFIG")]
    config: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    daemon::init_tracing();
    let cfg: router::RouterConfig = match daemon::load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("router: {e}");
            std::process::exit(64);
        }
    };
    let rt = tokio::runtime::Runtime::new()?;
    let code = match rt.block_on(router::serve(cfg, daemon::shutdown_signal())) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("router: {e:#}");
            1
        }
    };
    drop(rt);
    std::process::exit(code)
}
