//! `pdserve model synth`: write a synthetic model directory.
use std::path::PathBuf;

use engine::Arch;
use engine::synth::{Preset, synthesize};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Write a complete model directory (config, tokenizer, safetensors) with
    /// deterministic random weights in the shape of a real model.
    Synth {
        #[arg(long, default_value = "llama", value_parser = parse_arch)]
        arch: Arch,
        /// tiny, small, 1b (Llama-3.2-1B shape) or 8b (Llama-3-8B shape).
        #[arg(long, default_value = "tiny")]
        preset: Preset,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    match s {
        "llama" => Ok(Arch::Llama),
        "qwen2" => Ok(Arch::Qwen2),
        _ => Err(format!("unknown architecture {s:?} (llama, qwen2)")),
    }
}

pub fn run(cmd: Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Synth { arch, preset, seed, out } => {
            let t = std::time::Instant::now();
            synthesize(arch, preset, seed, &out)?;
            eprintln!(
                "wrote {arch:?} {preset:?} (seed {seed}) to {} in {:.1}s",
                out.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(0)
        }
    }
}
