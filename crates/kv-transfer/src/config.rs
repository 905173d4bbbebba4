//! The data plane's configuration: a section of each daemon's config file.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::BackendKind;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferConfig {
    /// Which backend moves the bytes: `nixl`, `ucx` or `tcp`.
    pub backend: BackendKind,
    /// Agent name prefix; the process id and a random suffix are appended, since
    /// NIXL needs names unique among connected peers.
    pub name: String,
    /// Deadline for any single wait (a write's completion, a connect), in milliseconds.
    pub deadline_ms: u64,
    /// Folder holding `libnixl_capi.so` (default: `$PDSERVE_NIXL_LIB_DIR`, then
    /// `/usr/lib/pdserve/nixl`, then the build tree's `.deps`).
    pub nixl_lib_dir: Option<PathBuf>,
    /// Folder holding `libucp.so` (default: `$PDSERVE_UCX_LIB_DIR`, then
    /// `/usr/lib/pdserve/ucx`, then the UCX the build used).
    pub ucx_lib_dir: Option<PathBuf>,
    /// UCX: ask for peer-failure detection on endpoints (not applied to NIXL's UCX
    /// plugin, which crashes with it when a peer hangs under a write). UCX then uses only transports
    /// that can detect a dead peer, which excludes every shared-memory transport
    /// (cma, posix, sysv) and falls back to TCP emulation on one host. Off by default:
    /// the deadlines already turn a dead peer into an error. Worth turning on across
    /// nodes, where the RDMA transports support it at no cost.
    pub ucx_peer_error_handling: bool,
    /// NIXL: extra parameters for its UCX backend plugin (e.g. `ucx_devices`,
    /// `num_workers`), applied over NIXL's defaults.
    pub nixl_ucx_params: BTreeMap<String, String>,
    /// UCX/NIXL: how long the progress thread keeps polling after its last activity
    /// before it sleeps, in microseconds. Waking a sleeping thread costs more than a
    /// small write takes; 0 trades that latency for an idle CPU.
    pub hot_spin_us: u64,
    /// TCP backend: where the target listens for writes.
    pub tcp_bind: String,
    /// TCP backend: the host peers should connect to (default: the bind address; set
    /// it when binding 0.0.0.0).
    pub tcp_advertise_host: Option<String>,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            backend: BackendKind::Tcp,
            name: "pdserve".into(),
            deadline_ms: 30_000,
            nixl_lib_dir: None,
            ucx_lib_dir: None,
            ucx_peer_error_handling: false,
            nixl_ucx_params: BTreeMap::new(),
            hot_spin_us: 2_000,
            tcp_bind: "127.0.0.1:0".into(),
            tcp_advertise_host: None,
        }
    }
}

impl TransferConfig {
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }

    pub fn hot_spin(&self) -> Duration {
        Duration::from_micros(self.hot_spin_us)
    }
}

/// Finds a library folder: explicit setting, env var, install path, then build-time default.
pub(crate) fn lib_dir(explicit: Option<&PathBuf>, env: &str, installed: &str, built: Option<&str>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = explicit {
        out.push(p.clone());
        return out;
    }
    if let Some(p) = std::env::var_os(env) {
        out.push(PathBuf::from(p));
        return out;
    }
    out.push(PathBuf::from(installed));
    if let Some(b) = built {
        out.push(PathBuf::from(b));
    }
    out
}
