//! `pdserve doctor`: can this node serve, and how fast can it move KV caches? RDMA
//! devices and links, GPUDirect RDMA, GPUs and driver, the NIXL and UCX libraries and
//! their transports, the memlock limit, and a real write through each data-plane
//! backend. Each check is ok, warning or missing, with the fix.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_transfer::{Agent, BackendKind, HostBuffer, Memory, Segment, TransferConfig};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
    /// Exit 1 unless these are present (comma-separated): rdma, gpu, gpudirect, nixl, ucx.
    #[arg(long, value_delimiter = ',')]
    pub require: Vec<Need>,
    /// Backends to try a real write through (two agents in this process).
    #[arg(long, value_delimiter = ',', default_value = "nixl,ucx,tcp")]
    pub backend: Vec<BackendKind>,
    /// Where /sys and /proc are (for checking another root; tests).
    #[arg(long, default_value = "/", hide = true)]
    pub root: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Need {
    Rdma,
    Gpu,
    Gpudirect,
    Nixl,
    Ucx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warning,
    Missing,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn check(name: &'static str, status: Status, detail: impl Into<String>, fix: Option<&str>) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        fix: fix.map(String::from),
    }
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn entries(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(p)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// RDMA devices from sysfs (what libibverbs lists), with each port's state and link.
pub fn rdma(root: &Path) -> Check {
    let fix = "install the NIC driver and rdma-core (mlx5_core/mlx5_ib, `apt install rdma-core ibverbs-utils`); \
               without RDMA, KV caches cross nodes over TCP (NIXL/UCX tcp transport or the tcp backend)";
    let devices = entries(&root.join("sys/class/infiniband"));
    if devices.is_empty() {
        return check(
            "RDMA devices",
            Status::Missing,
            "none (/sys/class/infiniband is empty or absent)",
            Some(fix),
        );
    }
    let mut ports = Vec::new();
    let mut active = 0;
    for d in &devices {
        let name = d.file_name().unwrap_or_default().to_string_lossy().into_owned();
        for p in entries(&d.join("ports")) {
            let state = read(&p.join("state")).unwrap_or_default();
            let link = read(&p.join("link_layer")).unwrap_or_else(|| "?".into());
            let rate = read(&p.join("rate")).unwrap_or_default();
            if state.contains("ACTIVE") {
                active += 1;
            }
            let port = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
            ports.push(format!(
                "{name}:{port} {} ({link}, {rate})",
                state.split(':').next_back().unwrap_or("").trim()
            ));
        }
    }
    let uverbs = entries(&root.join("dev/infiniband"))
        .iter()
        .filter(|p| p.to_string_lossy().contains("uverbs"))
        .count();
    let detail = format!("{}; {uverbs} uverbs device file(s)", ports.join(", "));
    if active == 0 {
        check(
            "RDMA devices",
            Status::Warning,
            detail,
            Some("no port is ACTIVE: check the cable, the switch and `ibstat`"),
        )
    } else if uverbs == 0 {
        check(
            "RDMA devices",
            Status::Warning,
            detail,
            Some("no /dev/infiniband/uverbs*: `modprobe ib_uverbs`"),
        )
    } else {
        check("RDMA devices", Status::Ok, detail, None)
    }
}

/// The NVIDIA driver and its GPUs, from procfs.
pub fn gpus(root: &Path) -> Check {
    let Some(version) = read(&root.join("proc/driver/nvidia/version")) else {
        return check(
            "GPUs and driver",
            Status::Missing,
            "no NVIDIA driver (/proc/driver/nvidia/version absent)",
            Some("install the NVIDIA driver (535 or newer; CUDA 13 needs 580); CPU-only serving still works"),
        );
    };
    let driver = version.lines().next().unwrap_or("").to_string();
    let models: Vec<String> = entries(&root.join("proc/driver/nvidia/gpus"))
        .iter()
        .filter_map(|g| read(&g.join("information")))
        .filter_map(|info| info.lines().find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string())))
        .collect();
    let built = if cfg!(feature = "cuda") {
        "this build has CUDA"
    } else {
        "this build is CPU-only (scripts/build-cuda.sh for GPUs)"
    };
    let status = if models.is_empty() { Status::Warning } else { Status::Ok };
    check(
        "GPUs and driver",
        status,
        format!("{} GPU(s) [{}]; {driver}; {built}", models.len(), models.join(", ")),
        None,
    )
}

/// GPUDirect RDMA: nvidia_peermem, or dma-buf with the open kernel modules on Linux 5.12+.
pub fn gpudirect(root: &Path) -> Check {
    let fix = "`modprobe nvidia_peermem` (and add it to /etc/modules-load.d), or use the open GPU kernel modules for dma-buf";
    if !root.join("proc/driver/nvidia").exists() {
        return check("GPUDirect RDMA", Status::Missing, "no NVIDIA driver", Some(fix));
    }
    if root.join("sys/module/nvidia_peermem").exists() {
        return check("GPUDirect RDMA", Status::Ok, "nvidia_peermem loaded", None);
    }
    let open = read(&root.join("proc/driver/nvidia/version")).is_some_and(|v| v.contains("Open Kernel Module"));
    let kernel = read(&root.join("proc/sys/kernel/osrelease")).unwrap_or_default();
    let mut nums = kernel.split(['.', '-']).filter_map(|x| x.parse::<u32>().ok());
    let (major, minor) = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    if open && (major, minor) >= (5, 12) {
        return check(
            "GPUDirect RDMA",
            Status::Ok,
            format!("dma-buf (open kernel modules, Linux {kernel})"),
            None,
        );
    }
    check(
        "GPUDirect RDMA",
        Status::Warning,
        format!("neither nvidia_peermem nor dma-buf (open modules: {open}, Linux {kernel}); RDMA would stage GPU memory through the host"),
        Some(fix),
    )
}

/// The memlock limit, from /proc/self/limits (registration pins memory).
pub fn memlock(limits: &str) -> Check {
    let fix =
        "LimitMEMLOCK=infinity in the unit (the shipped units have it), or `ulimit -l unlimited` / memlock in /etc/security/limits.conf";
    let line = limits.lines().find(|l| l.starts_with("Max locked memory")).unwrap_or("");
    let soft = line.split_whitespace().nth(3).unwrap_or("?");
    match soft {
        "unlimited" => check("memlock limit", Status::Ok, "unlimited", None),
        n => match n.parse::<u64>() {
            Ok(b) if b >= 64 << 30 => check("memlock limit", Status::Ok, format!("{} GiB", b >> 30), None),
            Ok(b) => check(
                "memlock limit",
                Status::Warning,
                format!(
                    "{} KiB: RDMA registration of host memory (the tcp backend's staging, NIXL/UCX DRAM) may fail",
                    b >> 10
                ),
                Some(fix),
            ),
            Err(_) => check("memlock limit", Status::Warning, format!("unreadable ({line:?})"), Some(fix)),
        },
    }
}

/// UCX transport modules in a UCX library folder's `ucx/` plugins.
fn ucx_transports(libdir: &Path) -> Vec<String> {
    let mut names: Vec<String> = entries(&libdir.join("ucx"))
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(String::from))
        .filter_map(|f| f.strip_prefix("libuct_").and_then(|f| f.split('.').next()).map(String::from))
        .flat_map(|m| match m.as_str() {
            "ib" => vec!["rc".into(), "dc".into(), "ud".into()],
            "ib_efa" => vec!["srd (EFA)".into()],
            "cuda" => vec!["cuda_copy".into(), "cuda_ipc".into()],
            "rdmacm" => vec!["rdmacm".into()],
            _ => vec![m],
        })
        .collect();
    names.extend(["tcp".to_string(), "shm (posix/sysv)".into()]);
    names.sort();
    names.dedup();
    names
}

fn nixl() -> Check {
    match kv_transfer::load_nixl_library(None) {
        Ok(dir) => {
            let wheel = dir.parent().map(Path::to_path_buf).unwrap_or_default();
            let version = entries(&wheel)
                .iter()
                .filter_map(|p| p.file_name()?.to_str().map(String::from))
                .find_map(|f| {
                    f.strip_suffix(".dist-info")
                        .and_then(|f| f.split_once('-'))
                        .map(|(_, v)| v.to_string())
                })
                .unwrap_or_else(|| "version unknown".into());
            let plugins: Vec<String> = entries(&dir.join("plugins"))
                .iter()
                .filter_map(|p| {
                    p.file_name()?
                        .to_str()?
                        .strip_prefix("libplugin_")?
                        .strip_suffix(".so")
                        .map(String::from)
                })
                .collect();
            // The UCX inside the NIXL wheel (the one with verbs) has its plugins next to it.
            let bundled = entries(&wheel)
                .into_iter()
                .find(|p| p.to_string_lossy().ends_with(".libs") && p.join("ucx").is_dir());
            let transports = bundled.map(|b| ucx_transports(&b).join(", ")).unwrap_or_else(|| "?".into());
            check(
                "NIXL",
                Status::Ok,
                format!(
                    "{version} from {}; plugins {}; its UCX transports: {transports}",
                    dir.display(),
                    plugins.join(",")
                ),
                None,
            )
        }
        Err(e) => check("NIXL", Status::Missing, e, Some("scripts/setup.sh (or PDSERVE_NIXL_LIB_DIR)")),
    }
}

fn ucx(dirs: &[PathBuf]) -> Check {
    for d in dirs {
        if let Ok(ucp) = ucx_sys::Ucp::load(Some(d)) {
            let (a, b, c) = ucp.version();
            return check(
                "UCX",
                Status::Ok,
                format!("{a}.{b}.{c} from {}; transports: {}", d.display(), ucx_transports(d).join(", ")),
                None,
            );
        }
    }
    check(
        "UCX",
        Status::Missing,
        "libucp.so not found",
        Some("scripts/setup.sh (or PDSERVE_UCX_LIB_DIR)"),
    )
}

/// A real write through `backend`: two agents in this process, 1 MiB of host memory,
/// notification awaited and bytes compared.
async fn backend_write(backend: BackendKind) -> Check {
    let name = match backend {
        BackendKind::Nixl => "write through nixl",
        BackendKind::Ucx => "write through ucx",
        BackendKind::Tcp => "write through tcp",
    };
    let run = async {
        let cfg = TransferConfig {
            backend,
            deadline_ms: 10_000,
            ..Default::default()
        };
        let (a, b) = (Agent::start(&cfg).await?, Agent::start(&cfg).await?);
        let len = 1usize << 20;
        let src = Arc::new(HostBuffer::new(len));
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        src.write_at(0, &data);
        let dst = Arc::new(HostBuffer::new(len));
        let (ra, rb) = (a.register(Memory::host(src))?, b.register(Memory::host(dst.clone()))?);
        let peer = a.connect(&b.local_metadata().await?, &b.issue_key()).await?;
        let seg = Segment {
            local: ra.id(),
            local_offset: 0,
            remote: rb.id().0,
            remote_offset: 0,
            len: len as u64,
        };
        let t = Instant::now();
        let tag = kv_transfer::random_tag();
        a.write(peer, &[seg], tag).await?;
        b.wait_notification_from(a.name(), tag, Duration::from_secs(10)).await?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        let got = dst.to_vec(0, len);
        let info = a.backend_info();
        drop((ra, rb));
        a.shutdown();
        b.shutdown();
        anyhow::ensure!(got == data, "the bytes that arrived differ from those sent");
        anyhow::Ok(format!("1 MiB host to host in {us:.0} µs, bytes verified ({info})"))
    };
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Ok(d)) => check(name, Status::Ok, d, None),
        Ok(Err(e)) => check(name, Status::Missing, format!("{e:#}"), Some("see the NIXL/UCX lines above")),
        Err(_) => check(
            name,
            Status::Missing,
            "no completion within 30 s",
            Some("see the NIXL/UCX lines above"),
        ),
    }
}

/// The protocol lines UCX printed (`UCX_PROTO_INFO=y`) for puts from GPU memory:
/// `(range, protocol, transport)` per line.
pub fn gpu_put_protocols(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut in_table = false;
    for line in text.lines() {
        // UCX prefixes each line with its log header; the table starts at the first '|'.
        let Some(start) = line.find('|') else { continue };
        let row = &line[start..];
        // A table's title is one or two rows: "ucp_context_N ..." then the operation.
        if row.contains("ucp_context") {
            in_table = false;
        }
        if row.contains("remote memory") || row.contains("ucp_") {
            in_table = row.contains("remote memory write by ucp_put") && row.contains("from cuda");
            continue;
        }
        let cells: Vec<&str> = row.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        if in_table && cells.len() >= 3 && cells[0].contains("..") {
            out.push((cells[0].to_string(), cells[1].to_string(), cells[cells.len() - 1].to_string()));
        }
    }
    out
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
/// Which transport carries a write from GPU memory to GPU memory: a `kvbench --mem vram`
/// child with `UCX_PROTO_INFO=y`. GPU to GPU means cuda_ipc (one node) or an RDMA
/// transport (rc/dc) zero-copy; cuda_copy or a copy protocol means a host bounce.
async fn gpu_path(backend: BackendKind) -> Check {
    let name = match backend {
        BackendKind::Nixl => "GPU-to-GPU via nixl",
        _ => "GPU-to-GPU via ucx",
    };
    let exe = match crate::up::binary("pdserve") {
        Ok(e) => e,
        Err(e) => return check(name, Status::Missing, e.to_string(), None),
    };
    let child = tokio::process::Command::new(exe)
        .args([
            "kvbench",
            "--mem",
            "vram",
            "--backend",
            backend.as_str(),
            "--sizes",
            "16MiB",
            "--iters",
            "2",
            "--warmup",
            "1",
        ])
        .env("UCX_PROTO_INFO", "y")
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(Duration::from_secs(60), child).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return check(name, Status::Missing, e.to_string(), None),
        Err(_) => return check(name, Status::Missing, "kvbench --mem vram did not finish within 60 s", None),
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let protos = gpu_put_protocols(&text);
    if !out.status.success() || !text.contains("| yes |") {
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        return check(name, Status::Missing, format!("the VRAM write failed: {}", tail.join(" / ")), None);
    }
    let shown: Vec<String> = protos.iter().map(|(r, p, t)| format!("{r}: {p} {t}")).collect();
    let direct = !protos.is_empty()
        && protos
            .iter()
            .all(|(_, p, t)| p.contains("zero-copy") && (t.contains("cuda_ipc") || t.starts_with("rc") || t.starts_with("dc")));
    if direct {
        check(
            name,
            Status::Ok,
            format!("16 MiB VRAM to VRAM, bytes verified; {}", shown.join("; ")),
            None,
        )
    } else {
        check(
            name,
            Status::Warning,
            format!(
                "16 MiB VRAM to VRAM, bytes verified, but not zero-copy GPU to GPU: {}",
                if shown.is_empty() {
                    "UCX printed no protocol".into()
                } else {
                    shown.join("; ")
                }
            ),
            Some("for one node: CUDA IPC between the processes (same GPU or NVLink/P2P); across nodes: GPUDirect RDMA (see above)"),
        )
    }
}

pub async fn checks(a: &Args) -> Vec<Check> {
    let limits = std::fs::read_to_string(a.root.join("proc/self/limits")).unwrap_or_default();
    let mut out = vec![rdma(&a.root), gpus(&a.root), gpudirect(&a.root), memlock(&limits), nixl()];
    out.push(ucx(&kv_transfer::ucx_library_dirs(None)));
    for &b in &a.backend {
        out.push(backend_write(b).await);
    }
    #[cfg(feature = "cuda")]
    if kv_transfer::cuda::device_count() > 0 {
        for &b in a.backend.iter().filter(|b| **b != BackendKind::Tcp) {
            out.push(gpu_path(b).await);
        }
    }
    out
}

fn required(need: Need, checks: &[Check]) -> bool {
    let name = match need {
        Need::Rdma => "RDMA devices",
        Need::Gpu => "GPUs and driver",
        Need::Gpudirect => "GPUDirect RDMA",
        Need::Nixl => "NIXL",
        Need::Ucx => "UCX",
    };
    checks.iter().any(|c| c.name == name && c.status == Status::Ok)
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let checks = checks(&a).await;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let tag = match c.status {
                Status::Ok => "ok     ",
                Status::Warning => "warning",
                Status::Missing => "missing",
            };
            println!("{tag}  {:<20} {}", c.name, c.detail);
            if let Some(f) = &c.fix {
                println!("         {:<20} fix: {f}", "");
            }
        }
    }
    let unmet: Vec<String> = a
        .require
        .iter()
        .filter(|n| !required(**n, &checks))
        .map(|n| format!("{n:?}").to_lowercase())
        .collect();
    if !unmet.is_empty() {
        eprintln!("doctor: required but not ready: {}", unmet.join(", "));
        return Ok(1);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn rdma_ports_and_their_states() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(rdma(t.path()).status, Status::Missing);
        write(t.path(), "sys/class/infiniband/mlx5_0/ports/1/state", "1: DOWN\n");
        write(t.path(), "sys/class/infiniband/mlx5_0/ports/1/link_layer", "InfiniBand\n");
        write(t.path(), "sys/class/infiniband/mlx5_0/ports/1/rate", "400 Gb/sec (4X NDR)\n");
        let c = rdma(t.path());
        assert_eq!(c.status, Status::Warning);
        assert!(c.detail.contains("mlx5_0:1 DOWN (InfiniBand, 400 Gb/sec (4X NDR))"), "{}", c.detail);
        write(t.path(), "sys/class/infiniband/mlx5_0/ports/1/state", "4: ACTIVE\n");
        assert!(rdma(t.path()).fix.unwrap().contains("uverbs"));
        write(t.path(), "dev/infiniband/uverbs0", "");
        assert_eq!(rdma(t.path()).status, Status::Ok);
    }

    #[test]
    fn gpudirect_through_peermem_or_dmabuf() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(gpudirect(t.path()).status, Status::Missing);
        write(
            t.path(),
            "proc/driver/nvidia/version",
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65\n",
        );
        write(t.path(), "proc/sys/kernel/osrelease", "6.1.0-18-amd64\n");
        let c = gpudirect(t.path());
        assert_eq!(c.status, Status::Warning);
        assert!(c.fix.unwrap().contains("modprobe nvidia_peermem"));
        write(
            t.path(),
            "proc/driver/nvidia/version",
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65\n",
        );
        assert!(gpudirect(t.path()).detail.contains("dma-buf"));
        write(t.path(), "sys/module/nvidia_peermem/refcnt", "0");
        assert_eq!(gpudirect(t.path()).detail, "nvidia_peermem loaded");
        write(
            t.path(),
            "proc/driver/nvidia/gpus/0000:01:00.0/information",
            "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ: 1\n",
        );
        assert!(gpus(t.path()).detail.starts_with("1 GPU(s) [NVIDIA H100 80GB HBM3]"));
    }

    #[test]
    fn gpu_put_protocol_lines() {
        // As UCX 1.22 prints it with UCX_PROTO_INFO=y (the log prefix included).
        let text = "\
[17.03] [vm:36 :0]   +--------+-------------+-----------------------------------+
[17.03] [vm:36 :0]   | ucp_context_0 intra-node cfg#0                           |
[17.03] [vm:36 :0]   | remote memory write by ucp_put* from host memory to host |
[17.03] [vm:36 :0]   +--------+-------------+-----------------------------------+
[17.03] [vm:36 :0]   | Range  | Description |              Config               |
[17.03] [vm:36 :0]   | 0..inf | zero-copy   | cma/memory                        |
[17.03] [vm:36 :0]   +--------+-------------+-----------------------------------+
[17.04] [vm:36 :0]   | ucp_context_0 intra-node cfg#1                                 |
[17.04] [vm:36 :0]   | remote memory write by ucp_put* from cuda/GPU0 to cuda/dev[0]  |
[17.04] [vm:36 :0]   +--------+-------------+-----------------------------------------+
[17.04] [vm:36 :0]   | Range  | Description |              Config                     |
[17.04] [vm:36 :0]   | 0..inf | zero-copy   | cuda_ipc/cuda                           |
[17.04] [vm:36 :0]   +--------+-------------+-----------------------------------------+
[17.05] [vm:36 :0]   | ucp_context_0 intra-node cfg#2                                 |
[17.05] [vm:36 :0]   | active message by ucp_am_send* from host memory                |
[17.05] [vm:36 :0]   | 0..8K  | short       | sysv/memory                             |
| nixl | Vram | 16 MiB | 1 | 0.03 | 0.2 | 565 | 77 | yes |
";
        assert_eq!(
            gpu_put_protocols(text),
            vec![("0..inf".into(), "zero-copy".into(), "cuda_ipc/cuda".into())]
        );
        assert!(gpu_put_protocols("nothing here").is_empty());
    }

    #[test]
    fn memlock_from_limits() {
        let l = |v: &str| {
            format!(
                "Limit                     Soft Limit           Hard Limit           Units\nMax locked memory         {v}            {v}            bytes\n"
            )
        };
        assert_eq!(memlock(&l("unlimited")).status, Status::Ok);
        let c = memlock(&l("8388608"));
        assert_eq!(c.status, Status::Warning);
        assert!(c.detail.starts_with("8192 KiB"));
        assert_eq!(memlock(&l("137438953472")).status, Status::Ok);
    }
}
