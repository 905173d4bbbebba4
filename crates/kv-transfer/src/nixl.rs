//! The NIXL backend, through `nixl-sys` built with `stub-api` (its functions resolve
//! from `libnixl_capi.so` at run time). The stub would `dlopen` the bare name and
//! abort if that failed, so we open the library by full path first: a missing
//! library becomes an error at start, and the stub's own `dlopen` then finds the
//! already-loaded library by its SONAME.
//!
//! A write is one NIXL WRITE request, created once per prepared write and re-posted
//! with the tag as its notification message (`pdkv:<tag>`); completion is polled on
//! the driver thread, as are the target's notifications.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nixl_sys as nx;
use tokio::sync::oneshot;

use crate::driver::{Driver, Wait, Work};
use crate::error::{Result, TransferError};
use crate::metadata::Metadata;
use crate::notify::NotifyHub;
use crate::{BackendKind, MemKind, Memory, Resolved, TransferConfig};

const SETUP_DEADLINE: Duration = Duration::from_secs(10);
/// How often an idle target looks for notifications.
const IDLE_NOTIF_POLL: Duration = Duration::from_millis(1);
const NOTIF_PREFIX: &str = "pdkv:";
const LIB: &str = "libnixl_capi.so";
/// Where `scripts/setup.sh` unpacks the nixl-cu13 wheel's libraries.
const BUILD_TREE_DEFAULT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.deps/nixl/.nixl_cu13.mesonpy.libs");

fn backend_err(op: &'static str, e: impl std::fmt::Display) -> TransferError {
    TransferError::Backend {
        backend: BackendKind::Nixl,
        op,
        detail: e.to_string(),
    }
}

/// The folder `libnixl_capi.so` was loaded from, once per process.
static LOADED: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();

/// Loads `libnixl_capi.so` from the first candidate folder that has it.
pub fn load_library(explicit: Option<&PathBuf>) -> std::result::Result<PathBuf, String> {
    LOADED
        .get_or_init(|| {
            let dirs = crate::config::lib_dir(explicit, "PDSERVE_NIXL_LIB_DIR", "/usr/lib/pdserve/nixl", Some(BUILD_TREE_DEFAULT));
            let mut tried = Vec::new();
            for d in dirs {
                let path = d.join(LIB);
                if !path.exists() {
                    tried.push(format!("{}: not found", path.display()));
                    continue;
                }
                match dlopen(&path) {
                    Ok(()) => return Ok(d.canonicalize().unwrap_or(d)),
                    Err(e) => tried.push(format!("{}: {e}", path.display())),
                }
            }
            Err(format!(
                "cannot load {LIB} ({}); set PDSERVE_NIXL_LIB_DIR or nixl_lib_dir, or run scripts/setup.sh",
                tried.join("; ")
            ))
        })
        .clone()
}

fn dlopen(path: &Path) -> std::result::Result<(), String> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated path; the handle is kept for the life of the process
    // (never dlclose'd), as NIXL's own stub expects.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a thread-local C string after a failed dlopen.
        let msg = unsafe { std::ffi::CStr::from_ptr(libc::dlerror()) };
        return Err(msg.to_string_lossy().into_owned());
    }
    Ok(())
}

/// Ends the process at once with `code`, skipping exit-time destructors.
///
/// The nixl-cu13 wheel bundles a libnl whose exit-time clean-up sometimes crashes
/// after all work is done; the daemons call this after an orderly shutdown.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: fflush(NULL) flushes every C stdio stream (UCX and NIXL print through
    // them, fully buffered when stdout is a pipe); _exit then ends the process without
    // running atexit handlers or destructors: everything that matters is released.
    unsafe {
        libc::fflush(std::ptr::null_mut());
        libc::_exit(code)
    }
}

fn mem_type(kind: MemKind) -> nx::MemType {
    match kind {
        MemKind::Dram => nx::MemType::Dram,
        MemKind::Vram { .. } => nx::MemType::Vram,
    }
}

fn dev_id(kind: MemKind) -> u64 {
    match kind {
        MemKind::Dram => 0,
        MemKind::Vram { device } => device as u64,
    }
}

/// A region as NIXL's registration API wants to see it.
#[derive(Debug)]
struct Region {
    addr: usize,
    len: usize,
    kind: MemKind,
}

impl nx::MemoryRegion for Region {
    unsafe fn as_ptr(&self) -> *const u8 {
        self.addr as *const u8
    }
    fn size(&self) -> usize {
        self.len
    }
}

impl nx::NixlDescriptor for Region {
    fn mem_type(&self) -> nx::MemType {
        mem_type(self.kind)
    }
    fn device_id(&self) -> u64 {
        dev_id(self.kind)
    }
}

enum Cmd {
    Register {
        id: u32,
        addr: usize,
        len: usize,
        kind: MemKind,
        reply: SyncSender<Result<Vec<u8>>>,
    },
    Deregister {
        id: u32,
    },
    Metadata {
        reply: SyncSender<Result<Vec<u8>>>,
    },
    Connect {
        md: Vec<u8>,
        reply: SyncSender<Result<String>>,
    },
    Disconnect {
        name: String,
    },
    Prepare {
        peer: String,
        segs: Vec<Resolved>,
        reply: SyncSender<Result<u64>>,
    },
    Release {
        id: u64,
    },
    Post {
        id: u64,
        tag: u64,
        deadline: Instant,
        reply: oneshot::Sender<Result<()>>,
    },
}

pub(crate) struct Nixl {
    driver: Driver<NixlWork>,
    info: String,
}

impl Nixl {
    pub(crate) fn start(cfg: &TransferConfig, name: &str, notify: Arc<NotifyHub>) -> Result<Nixl> {
        let dir = load_library(cfg.nixl_lib_dir.as_ref()).map_err(|detail| TransferError::Unavailable {
            backend: BackendKind::Nixl,
            detail,
        })?;
        let name = name.to_string();
        let hub = notify.clone();
        let (peer_errors, extra) = (cfg.ucx_peer_error_handling, cfg.nixl_ucx_params.clone());
        let (info_tx, info_rx) = std::sync::mpsc::sync_channel(1);
        let driver = Driver::spawn(
            BackendKind::Nixl,
            move || {
                let w = NixlWork::new(&name, hub, peer_errors, &extra)?;
                let _ = info_tx.send(w.plugins.clone());
                Ok(w)
            },
            notify,
            cfg.hot_spin(),
        )?;
        let plugins = info_rx.recv().map_err(|_| TransferError::Closed)?;
        Ok(Nixl {
            driver,
            info: format!("NIXL from {} (UCX backend; plugins: {plugins})", dir.display()),
        })
    }

    pub(crate) fn info(&self) -> String {
        self.info.clone()
    }

    pub(crate) fn register(&self, id: u32, mem: &Memory) -> Result<Vec<u8>> {
        let (addr, len, kind) = (mem.addr(), mem.len(), mem.kind());
        self.driver.call(SETUP_DEADLINE, |reply| Cmd::Register {
            id,
            addr,
            len,
            kind,
            reply,
        })?
    }

    pub(crate) fn deregister(&self, id: u32) {
        let _ = self.driver.send(Cmd::Deregister { id });
    }

    pub(crate) fn conn_info(&self) -> Result<Vec<u8>> {
        self.driver.call(SETUP_DEADLINE, |reply| Cmd::Metadata { reply })?
    }

    pub(crate) fn connect(&self, md: &Metadata) -> Result<String> {
        let bytes = md.conn.clone();
        let name = self.driver.call(SETUP_DEADLINE, |reply| Cmd::Connect { md: bytes, reply })??;
        if name != md.agent {
            return Err(TransferError::BadMetadata(format!(
                "NIXL metadata names agent {name:?}, envelope says {:?}",
                md.agent
            )));
        }
        Ok(name)
    }

    pub(crate) fn disconnect(&self, name: &str) {
        let _ = self.driver.send(Cmd::Disconnect { name: name.to_string() });
    }

    pub(crate) fn prepare(&self, peer: &str, segs: &[Resolved]) -> Result<u64> {
        let (peer, segs) = (peer.to_string(), segs.to_vec());
        self.driver.call(SETUP_DEADLINE, |reply| Cmd::Prepare { peer, segs, reply })?
    }

    pub(crate) fn release(&self, id: u64) {
        let _ = self.driver.send(Cmd::Release { id });
    }

    pub(crate) async fn post(&self, id: u64, tag: u64, deadline: Duration, wait: Wait) -> Result<()> {
        let deadline = Instant::now() + deadline;
        self.driver.ask(wait, |reply| Cmd::Post { id, tag, deadline, reply }).await
    }

    pub(crate) fn shutdown(&self) {
        self.driver.shutdown();
    }
}

struct Prepared {
    peer: String,
    regions: Vec<u32>,
    req: nx::XferRequest,
}

struct Pending {
    id: u64,
    deadline: Instant,
    reply: oneshot::Sender<Result<()>>,
}

struct NixlWork {
    agent: nx::Agent,
    plugins: String,
    regions: HashMap<u32, nx::RegistrationHandle>,
    peers: HashSet<String>,
    prepared: HashMap<u64, Prepared>,
    pending: Vec<Pending>,
    next_id: u64,
    notifs: nx::NotificationMap,
    last_notif_poll: Instant,
    hub: Arc<NotifyHub>,
}

impl NixlWork {
    fn new(name: &str, hub: Arc<NotifyHub>, peer_errors: bool, extra: &BTreeMap<String, String>) -> Result<NixlWork> {
        let unavailable = |op: &str, e: nx::NixlError| TransferError::Unavailable {
            backend: BackendKind::Nixl,
            detail: format!("{op}: {e}"),
        };
        // The driver progresses UCX itself; its lock serializes every use of the agent.
        let cfg = nx::AgentConfig {
            enable_prog_thread: false,
            ..Default::default()
        };
        let agent = nx::Agent::new_configured(name, &cfg).map_err(|e| unavailable("create agent", e))?;
        let plugins = agent
            .get_available_plugins()
            .map(|l| l.iter().filter_map(|p| p.ok().map(str::to_string)).collect::<Vec<_>>().join(","))
            .unwrap_or_default();
        let (_mems, mut params) = agent
            .get_plugin_params("UCX")
            .map_err(|e| unavailable("UCX plugin (NIXL_PLUGIN_DIR?)", e))?;
        // Same trade-off as the ucx backend's `ucx_peer_error_handling`: NIXL's default
        // (peer) sends notifications over tcp/lo on one host instead of shared memory.
        let mode = if peer_errors { "peer" } else { "none" };
        params
            .set("ucx_error_handling_mode", mode)
            .map_err(|e| unavailable("UCX plugin parameter", e))?;
        for (k, v) in extra {
            params.set(k, v).map_err(|e| unavailable("UCX plugin parameter", e))?;
        }
        if let Ok(it) = params.iter() {
            let all: Vec<String> = it.flatten().map(|(k, v)| format!("{k}={v}")).collect();
            tracing::debug!(params = %all.join(" "), "NIXL UCX backend parameters");
        }
        agent
            .create_backend("UCX", &params)
            .map_err(|e| unavailable("create UCX backend", e))?;
        let notifs = nx::NotificationMap::new().map_err(|e| unavailable("notification map", e))?;
        Ok(NixlWork {
            agent,
            plugins,
            regions: HashMap::new(),
            peers: HashSet::new(),
            prepared: HashMap::new(),
            pending: Vec::new(),
            next_id: 1,
            notifs,
            last_notif_poll: Instant::now(),
            hub,
        })
    }

    fn register(&mut self, id: u32, addr: usize, len: usize, kind: MemKind) -> Result<Vec<u8>> {
        // GPU pointers are used from this thread: bind the device's context to it.
        #[cfg(feature = "cuda")]
        if let MemKind::Vram { device } = kind {
            crate::cuda::bind_thread(device)?;
        }
        let h = self
            .agent
            .register_memory(&Region { addr, len, kind }, None)
            .map_err(|e| backend_err("register_memory", e))?;
        self.regions.insert(id, h);
        Ok(Vec::new())
    }

    fn deregister(&mut self, id: u32) {
        let busy: HashSet<u64> = self.pending.iter().map(|p| p.id).collect();
        self.prepared.retain(|pid, p| busy.contains(pid) || !p.regions.contains(&id));
        if let Some(mut h) = self.regions.remove(&id)
            && let Err(e) = h.deregister()
        {
            tracing::warn!(region = id, error = %e, "NIXL deregistration failed");
        }
    }

    fn connect(&mut self, md: &[u8]) -> Result<String> {
        let name = self
            .agent
            .load_remote_md(md)
            .map_err(|e| TransferError::BadMetadata(format!("NIXL refused the peer's metadata: {e}")))?;
        self.peers.insert(name.clone());
        Ok(name)
    }

    fn prepare(&mut self, peer: &str, segs: &[Resolved]) -> Result<u64> {
        if !self.peers.contains(peer) {
            return Err(TransferError::UnknownPeer(peer.to_string()));
        }
        let (lk, rk) = (segs[0].local_kind, segs[0].remote_kind);
        if segs.iter().any(|s| s.local_kind != lk || s.remote_kind != rk) {
            return Err(TransferError::Invalid("one NIXL write cannot mix memory kinds".into()));
        }
        let mut local = nx::XferDescList::new(mem_type(lk)).map_err(|e| backend_err("xfer list", e))?;
        let mut remote = nx::XferDescList::new(mem_type(rk)).map_err(|e| backend_err("xfer list", e))?;
        let mut regions = Vec::new();
        for s in segs {
            if !self.regions.contains_key(&s.local) {
                return Err(TransferError::UnknownLocalRegion(s.local));
            }
            if !regions.contains(&s.local) {
                regions.push(s.local);
            }
            local.add_desc(s.local_addr as usize, s.len as usize, dev_id(lk));
            remote.add_desc(s.remote_addr as usize, s.len as usize, dev_id(rk));
        }
        let req = self
            .agent
            .create_xfer_req(nx::XferOp::Write, &local, &remote, peer, None)
            .map_err(|e| backend_err("create_xfer_req", e))?;
        let id = self.next_id;
        self.next_id += 1;
        self.prepared.insert(
            id,
            Prepared {
                peer: peer.to_string(),
                regions,
                req,
            },
        );
        Ok(id)
    }

    fn post(&mut self, id: u64, tag: u64, deadline: Instant, reply: oneshot::Sender<Result<()>>) {
        let started = (|| {
            let p = self.prepared.get(&id).ok_or_else(|| {
                TransferError::Invalid("prepared write was invalidated (peer disconnected or region deregistered)".into())
            })?;
            let mut args = nx::OptArgs::new().map_err(|e| backend_err("opt args", e))?;
            args.set_notification_message(format!("{NOTIF_PREFIX}{tag}").as_bytes())
                .map_err(|e| backend_err("notification", e))?;
            args.set_has_notification(true).map_err(|e| backend_err("notification", e))?;
            self.agent.post_xfer_req(&p.req, Some(&args)).map_err(|e| TransferError::PeerLost {
                peer: p.peer.clone(),
                detail: format!("post_xfer_req: {e}"),
            })
        })();
        match started {
            Ok(true) => self.pending.push(Pending { id, deadline, reply }),
            Ok(false) => {
                let _ = reply.send(Ok(()));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn poll_notifications(&mut self) {
        if self.agent.get_notifications(&mut self.notifs, None).is_err() {
            return;
        }
        if self.notifs.is_empty().unwrap_or(true) {
            return;
        }
        if let Ok(all) = self.notifs.take_notifs() {
            for msg in all.into_values().flatten() {
                match msg.strip_prefix(NOTIF_PREFIX).and_then(|t| t.parse::<u64>().ok()) {
                    Some(tag) => self.hub.deliver(tag),
                    None => tracing::debug!(%msg, "ignoring foreign NIXL notification"),
                }
            }
        }
    }
}

// SAFETY: with no progress thread and thread sync NONE, NIXL's UCX backend creates its
// worker in UCS_THREAD_MODE_SERIALIZED (any thread, one at a time) and the agent takes
// no locks of its own: every use of the agent and its handles goes through the driver's
// lock, which also orders their memory between threads.
unsafe impl Send for NixlWork {}

impl Work for NixlWork {
    type Cmd = Cmd;

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Register {
                id,
                addr,
                len,
                kind,
                reply,
            } => {
                let _ = reply.send(self.register(id, addr, len, kind));
            }
            Cmd::Deregister { id } => self.deregister(id),
            Cmd::Metadata { reply } => {
                let _ = reply.send(self.agent.get_local_md().map_err(|e| backend_err("get_local_md", e)));
            }
            Cmd::Connect { md, reply } => {
                let _ = reply.send(self.connect(&md));
            }
            Cmd::Disconnect { name } => {
                let busy: HashSet<u64> = self.pending.iter().map(|p| p.id).collect();
                self.prepared.retain(|id, p| busy.contains(id) || p.peer != name);
                if self.peers.remove(&name) {
                    let _ = self.agent.invalidate_remote_md(&name);
                }
            }
            Cmd::Prepare { peer, segs, reply } => {
                let _ = reply.send(self.prepare(&peer, &segs));
            }
            Cmd::Release { id } => {
                if !self.pending.iter().any(|p| p.id == id) {
                    self.prepared.remove(&id);
                }
            }
            Cmd::Post { id, tag, deadline, reply } => self.post(id, tag, deadline, reply),
        }
    }

    fn progress(&mut self) -> bool {
        let now = Instant::now();
        if self.hub.has_waiters() || now.duration_since(self.last_notif_poll) >= IDLE_NOTIF_POLL {
            self.poll_notifications();
            self.last_notif_poll = now;
        }
        let mut i = 0;
        while i < self.pending.len() {
            let id = self.pending[i].id;
            let outcome = match self.prepared.get(&id) {
                None => Err(TransferError::Closed),
                Some(p) => match self.agent.get_xfer_status(&p.req) {
                    Ok(nx::XferStatus::InProgress) if now < self.pending[i].deadline => {
                        i += 1;
                        continue;
                    }
                    Ok(nx::XferStatus::InProgress) => {
                        // Releasing an in-flight request asks NIXL to abort it.
                        self.prepared.remove(&id);
                        Err(TransferError::Timeout {
                            what: "nixl write completion",
                            after: Duration::ZERO,
                        })
                    }
                    Ok(nx::XferStatus::Success) => Ok(()),
                    Err(e) => Err(TransferError::PeerLost {
                        peer: p.peer.clone(),
                        detail: format!("transfer failed: {e}"),
                    }),
                },
            };
            let p = self.pending.swap_remove(i);
            let _ = p.reply.send(outcome);
        }
        !self.pending.is_empty()
    }

    fn finish(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            let _ = p.reply.send(Err(TransferError::Closed));
        }
        // Requests before registrations before peers: the order NIXL releases cleanly.
        self.prepared.clear();
        for (_, mut h) in self.regions.drain() {
            let _ = h.deregister();
        }
        for name in self.peers.drain() {
            let _ = self.agent.invalidate_remote_md(&name);
        }
    }
}
