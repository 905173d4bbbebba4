//! `pdserve kvbench`: two processes, one-sided writes from this one into a target
//! process it starts, per backend and size; every write's notification awaited at the
//! target and the bytes of the last one verified there against a pattern.
//!
//! Timing matches NIXL's own benchmark and `shared/tools/nixl_anchor.py`: from posting
//! a write to its local completion. Preparing the write (descriptor lists, key lookup)
//! happens once per size and is reported on its own.
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::ValueEnum;
use kv_transfer::bench::{Layout, ReadBack, TargetProcess, pattern_fill};
use kv_transfer::{Agent, BackendKind, HostBuffer, Memory, TransferConfig};
use serde::Serialize;

use crate::units::{human, parse_sizes, quantile};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mem {
    Dram,
    Vram,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Backends to measure, comma-separated: nixl, ucx, tcp.
    #[arg(long, default_value = "nixl,ucx,tcp", value_delimiter = ',')]
    pub backend: Vec<BackendKind>,
    /// Host memory (dram) or GPU memory (vram, needs a `cuda` build).
    #[arg(long, value_enum, default_value = "dram")]
    pub mem: Mem,
    /// GPU of the initiator (vram).
    #[arg(long, default_value_t = 0)]
    pub device: u32,
    /// GPU of the target process (vram).
    #[arg(long, default_value_t = 0)]
    pub target_device: u32,
    /// Write sizes, comma-separated (4KiB, 1MiB, 1GiB, ...).
    #[arg(long, default_value = "4KiB,1MiB,16MiB,64MiB,256MiB")]
    pub sizes: String,
    /// Timed writes per size.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Untimed writes per size before timing.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Blocks per write: each write is this many equal pieces, scattered at the target
    /// with a gap after each (a paged KV cache's shape).
    #[arg(long, default_value_t = 1)]
    pub segments: u64,
    /// Deadline for any wait, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub deadline_ms: u64,
    /// Post each size's writes one right after another, as UCX's and NIXL's own
    /// benchmarks do; the target confirms them all at the end and checks the last.
    /// Without it the target confirms each write before the next is posted.
    #[arg(long)]
    pub back_to_back: bool,
    /// Write every measurement here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct TargetArgs {
    #[arg(long)]
    pub backend: BackendKind,
    #[arg(long, value_enum)]
    pub mem: Mem,
    #[arg(long)]
    pub bytes: u64,
    #[arg(long, default_value_t = 0)]
    pub device: u32,
    #[arg(long, default_value_t = 60_000)]
    pub deadline_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub backend: BackendKind,
    pub mem: Mem,
    pub bytes: u64,
    pub segments: u64,
    pub iters: usize,
    pub median_ms: f64,
    pub mean_ms: f64,
    pub p99_ms: f64,
    pub gb_per_s: f64,
    pub prepare_us: f64,
    pub verified: bool,
}

/// Source or target memory of either kind.
enum Buf {
    Host(Arc<HostBuffer>),
    #[cfg(feature = "cuda")]
    Gpu(Arc<kv_transfer::cuda::CudaBuffer>),
}

impl Buf {
    fn new(mem: Mem, device: u32, len: usize) -> anyhow::Result<Buf> {
        match mem {
            Mem::Dram => Ok(Buf::Host(Arc::new(HostBuffer::new(len)))),
            #[cfg(feature = "cuda")]
            Mem::Vram => Ok(Buf::Gpu(kv_transfer::cuda::CudaBuffer::new(device, len)?)),
            #[cfg(not(feature = "cuda"))]
            Mem::Vram => {
                let _ = device;
                bail!("--mem vram needs pdserve built with `--features cuda` (see scripts/build-cuda.sh)")
            }
        }
    }
    fn memory(&self) -> Memory {
        match self {
            Buf::Host(b) => Memory::host(b.clone()),
            #[cfg(feature = "cuda")]
            Buf::Gpu(b) => b.memory(),
        }
    }
    fn write_at(&self, offset: usize, data: &[u8]) -> anyhow::Result<()> {
        match self {
            Buf::Host(b) => b.write_at(offset, data),
            #[cfg(feature = "cuda")]
            Buf::Gpu(b) => b.write_at(offset, data)?,
        }
        Ok(())
    }
    fn readback(&self) -> Arc<dyn ReadBack> {
        match self {
            Buf::Host(b) => b.clone(),
            #[cfg(feature = "cuda")]
            Buf::Gpu(b) => b.clone(),
        }
    }
}

fn layout_for(bytes: u64, segments: u64) -> anyhow::Result<Layout> {
    if segments == 0 || !bytes.is_multiple_of(segments) {
        bail!("size {} does not split into {segments} equal segments", human(bytes));
    }
    let seg_len = bytes / segments;
    // Scattered blocks leave a gap of one block at the target.
    let dst_stride = if segments > 1 { 2 * seg_len } else { seg_len };
    Ok(Layout {
        segments,
        seg_len,
        dst_stride,
    })
}

/// Fills the source with the pattern for `seed`, in chunks.
fn fill_source(src: &Buf, seed: u64, len: u64) -> anyhow::Result<()> {
    let mut chunk = vec![0u8; (len.min(64 << 20)) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        pattern_fill(seed, done, &mut chunk[..n]);
        src.write_at(done as usize, &chunk[..n])?;
        done += n as u64;
    }
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let rows = measure(&args).await?;
    print!("{}", table(&rows));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if rows.iter().all(|r| r.verified) { 0 } else { 1 })
}

/// Every backend at every size.
pub async fn measure(args: &Args) -> anyhow::Result<Vec<Row>> {
    let sizes = parse_sizes(&args.sizes).map_err(anyhow::Error::msg)?;
    if sizes.is_empty() || args.iters == 0 {
        bail!("need at least one size and one iteration");
    }
    let layouts: Vec<Layout> = sizes.iter().map(|&s| layout_for(s, args.segments)).collect::<anyhow::Result<_>>()?;
    let src_len = layouts.iter().map(|l| l.src_span()).max().unwrap_or(0);
    let dst_len = layouts.iter().map(|l| l.dst_span()).max().unwrap_or(0);
    let src = Buf::new(args.mem, args.device, src_len as usize)?;
    let mut rows = Vec::new();
    for &backend in &args.backend {
        rows.extend(
            bench_backend(args, backend, &src, &layouts, dst_len)
                .await
                .with_context(|| format!("{backend} backend"))?,
        );
    }
    Ok(rows)
}

async fn bench_backend(args: &Args, backend: BackendKind, src: &Buf, layouts: &[Layout], dst_len: u64) -> anyhow::Result<Vec<Row>> {
    let deadline = Duration::from_millis(args.deadline_ms);
    // `pdserve` itself, also when a test or another command calls this.
    let mut cmd = tokio::process::Command::new(crate::up::binary("pdserve")?);
    cmd.arg("kvbench-target")
        .args(["--backend", backend.as_str()])
        .args(["--mem", if args.mem == Mem::Vram { "vram" } else { "dram" }])
        .args(["--bytes", &dst_len.to_string()])
        .args(["--device", &args.target_device.to_string()])
        .args(["--deadline-ms", &args.deadline_ms.to_string()])
        // UCX prints its protocol tables on stdout, which is the target's line protocol;
        // the initiator (this process) is where the write's protocol is chosen anyway.
        .env_remove("UCX_PROTO_INFO");
    let mut target = TargetProcess::spawn(cmd, deadline).await.context("starting the target process")?;
    let cfg = TransferConfig {
        backend,
        deadline_ms: args.deadline_ms,
        ..Default::default()
    };
    let agent = Agent::start(&cfg).await?;
    eprintln!("kvbench: {backend}: {}", agent.backend_info());
    let reg = agent.register(src.memory())?;
    let peer = agent.connect(&target.metadata, &target.key).await?;
    let mut rows = Vec::new();
    let mut tag = 0u64;
    for layout in layouts {
        target.poison().await?;
        let t = Instant::now();
        let w = agent.prepare(peer, &layout.segments(reg.id(), target.region)).await?;
        let prepare_us = t.elapsed().as_secs_f64() * 1e6;
        let bytes = layout.total();
        fill_source(src, 1, layout.src_span())?;
        let n = args.warmup + args.iters;
        // The last write carries fresh bytes, so verifying it proves that write landed.
        let seed = |last: bool| if last { 2 } else { 1 };
        let mut times = Vec::with_capacity(n);
        let mut verified = false;
        // The target waits for each announced tag in turn (a notification that arrives
        // first is kept), so back to back all are announced before the first write.
        let first_tag = tag + 1;
        if args.back_to_back {
            for i in 0..n {
                let last = i + 1 == n;
                target.expect(first_tag + i as u64, seed(last), layout, last).await?;
            }
        }
        for i in 0..n {
            let last = i + 1 == n;
            let seed = seed(last);
            if last {
                fill_source(src, seed, layout.src_span())?;
            }
            tag += 1;
            if !args.back_to_back {
                target.expect(tag, seed, layout, last).await?;
            }
            let t = Instant::now();
            agent.post(&w, tag).await?;
            times.push(t.elapsed().as_secs_f64());
            if !args.back_to_back {
                verified = confirmed(&mut target, backend, bytes, last).await? && last;
            }
        }
        if args.back_to_back {
            for i in 0..n {
                let last = i + 1 == n;
                verified = confirmed(&mut target, backend, bytes, last).await? && last;
            }
        }
        let mut times = times.split_off(args.warmup);
        times.sort_by(f64::total_cmp);
        let median = quantile(&times, 0.5);
        rows.push(Row {
            backend,
            mem: args.mem,
            bytes,
            segments: layout.segments,
            iters: args.iters,
            median_ms: median * 1e3,
            mean_ms: times.iter().sum::<f64>() / times.len() as f64 * 1e3,
            p99_ms: quantile(&times, 0.99) * 1e3,
            gb_per_s: bytes as f64 / median / 1e9,
            prepare_us,
            verified,
        });
    }
    drop(reg);
    let code = target.exit().await?;
    agent.shutdown();
    if code != Some(0) {
        eprintln!("kvbench: {backend} target exited with {code:?}");
    }
    Ok(rows)
}

/// The target's verdict on the next announced write: whether it arrived intact. A bad
/// last write (the verified one) is reported in the table; any other fails the run.
async fn confirmed(target: &mut TargetProcess, backend: BackendKind, bytes: u64, last: bool) -> anyhow::Result<bool> {
    match target.outcome().await? {
        Ok(()) => Ok(true),
        Err(why) => {
            eprintln!("kvbench: {backend} {}: {why}", human(bytes));
            if !last {
                bail!("target reported {why}");
            }
            Ok(false)
        }
    }
}

/// The Markdown table of the rows.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| backend | mem | size | segments | median ms | p99 ms | GB/s | prepare µs | verified |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {:?} | {} | {} | {:.4} | {:.4} | {:.2} | {:.1} | {} |\n",
            r.backend,
            r.mem,
            human(r.bytes),
            r.segments,
            r.median_ms,
            r.p99_ms,
            r.gb_per_s,
            r.prepare_us,
            if r.verified { "yes" } else { "NO" }
        );
    }
    s
}

pub async fn run_target(a: TargetArgs) -> anyhow::Result<i32> {
    let cfg = TransferConfig {
        backend: a.backend,
        deadline_ms: a.deadline_ms,
        ..Default::default()
    };
    // GPU memory first: UCX decides at start-up whether CUDA is there, and without its
    // allocation hooks (kv_transfer::process_defaults) it does not look again.
    let buf = Buf::new(a.mem, a.device, a.bytes as usize)?;
    let agent = Agent::start(&cfg).await?;
    let mem = buf.readback();
    mem.fill(kv_transfer::bench::POISON);
    let reg = agent.register(buf.memory())?;
    kv_transfer::bench::serve_target(&agent, mem, &reg, Duration::from_millis(a.deadline_ms)).await?;
    drop(reg);
    agent.shutdown();
    Ok(0)
}
