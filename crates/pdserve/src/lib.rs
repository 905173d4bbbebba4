//! The `pdserve` command line's commands, one module each.
pub mod bench;
pub mod client;
pub mod cluster;
pub mod doctor;
pub mod enginebench;
pub mod generate;
pub mod kvbench;
pub mod model;
pub mod numerics;
pub mod roofline;
pub mod units;
pub mod up;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "pdserve",
    version,
    about = "Disaggregated LLM serving: prefill and decode on separate GPUs, KV cache over RDMA"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a local deployment: prefill-server(s), decode-server(s) and a router on loopback.
    Up(up::Args),
    /// A cluster's members as registered in etcd (`cluster ls`).
    #[command(subcommand)]
    Cluster(cluster::Command),
    /// Make or inspect model directories.
    #[command(subcommand)]
    Model(model::Command),
    /// Generate text: from a running router (`--router`), or in this process (`--local`).
    Generate(generate::Args),
    /// Check this node: RDMA devices, GPUDirect, GPUs, NIXL/UCX and their transports,
    /// memlock, and a real write through each data-plane backend.
    Doctor(doctor::Args),
    /// Measure the engine alone: prefill and decode throughput.
    Enginebench(enginebench::Args),
    /// Dump a prompt's per-layer hidden states, first-step logits and greedy tokens, for
    /// comparing the engine's numerics with a reference (scripts/numerics_gpu.py).
    Numerics(numerics::Args),
    /// Load a running router (closed or open loop) and report TTFT, TPOT, ITL, end to end,
    /// throughput and goodput; `bench compare` puts deployments side by side.
    Bench(Box<bench::Args>),
    /// Measure KV-transfer bandwidth and latency between two processes, per backend.
    Kvbench(kvbench::Args),
    /// The target process that `kvbench` starts (internal).
    #[command(hide = true)]
    KvbenchTarget(kvbench::TargetArgs),
}

/// Runs a command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Up(a) => up::run(a).await,
        Command::Model(c) => model::run(c),
        Command::Cluster(c) => cluster::run(c).await,
        Command::Generate(a) => generate::run(a).await,
        Command::Kvbench(a) => kvbench::run(a).await,
        Command::Bench(a) => bench::run(*a).await,
        Command::Doctor(a) => doctor::run(a).await,
        Command::Enginebench(a) => enginebench::run(a).await,
        Command::Numerics(a) => numerics::run(a).await,
        Command::KvbenchTarget(a) => kvbench::run_target(a).await,
    }
}
