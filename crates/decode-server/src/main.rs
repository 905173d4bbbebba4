//! `decode-server`: load config, build the service, serve until SIGTERM.
use clap::Parser;

#[derive(Parser)]
#[command(version, about = "pdserve decode daemon")]
struct Args {
    /// TOML config (see configs/decode.toml); PDSERVE_* variables override it.
    #[arg(long, env = "PDSERVE_CONFIG")]
    config: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    daemon::init_tracing();
    let cfg: decode_server::DecodeConfig = match daemon::load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("decode-server: {e}");
            std::process::exit(64);
        }
    };
    let rt = tokio::runtime::Runtime::new()?;
    let code = match rt.block_on(decode_server::serve(cfg, daemon::shutdown_signal())) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("decode-server: {e:#}");
            1
        }
    };
    drop(rt);
    kv_transfer::exit_now(code)
}
