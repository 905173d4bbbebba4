//! `pdserve`: the command line. Parses arguments, sets up logging, runs the command.
use clap::Parser;

fn main() -> anyhow::Result<()> {
    kv_transfer::process_defaults();
    let cli = pdserve::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new()?;
    let code = rt.block_on(pdserve::run(cli))?;
    drop(rt);
    // Skips exit-time destructors of the bundled NIXL libraries (see kv_transfer::exit_now).
    kv_transfer::exit_now(code)
}
