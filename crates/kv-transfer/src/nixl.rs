//! The NIXL backend, through `nixl-sys` built with `stub-api` (its functions resolve
//! from `libnixl_capi.so` at run time). The stub would `dlopen` the bare name and
//! abort if that failed, so we open the library by full path first: a missing
//! library becomes an error at start, and the stub's own `dlopen` then finds the
//! already-loaded library by its SONAME.
//!
//! A write is one NIXL WRITE request, created once per prepared write and re-posted
//! with the tag as its notification message (`pdkv:<tag>`); completion is polled on
//! the driver thread, as are the target's notifications, each delivered with the
//! name of the agent NIXL says sent it.
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
        reply: SyncSender<bool>,
    },
    Metadata {
        reply: oneshot::Sender<Result<Vec<u8>>>,
    },
    Connect {
        md: Vec<u8>,
        /// The agent the envelope names (checked against NIXL's reading of `md`).
        agent: String,
        /// Ends the connection if its lease is dropped unread.
        undo: Option<crate::driver::Handle<Cmd>>,
        reply: oneshot::Sender<Result<crate::driver::Lease<Cmd>>>,
    },
    Disconnect {
        conn: u64,
    },
    Prepare {
        conn: u64,
        segs: Vec<Resolved>,
        reply: oneshot::Sender<Result<u64>>,
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

/// How long an abandoned NIXL write's blocks are held: NIXL cannot abort it (see
/// `NixlWork::zombies`), so this is a generous bound, not a guarantee (README).
const ABANDON_HOLD: Duration = Duration::from_secs(60);

/// How long a deregistration waits for abandoned writes that read the region.
const DEREGISTER_WAIT: Duration = Duration::from_secs(2);

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

    /// Returns once the region is deregistered (writes that use it abandoned first).
    pub(crate) fn deregister(&self, id: u32) -> bool {
        self.driver
            .call(SETUP_DEADLINE, |reply| Cmd::Deregister { id, reply })
            .unwrap_or(false)
    }

    pub(crate) async fn conn_info(&self) -> Result<Vec<u8>> {
        self.driver.call_async(SETUP_DEADLINE, |reply| Cmd::Metadata { reply }).await?
    }

    /// Connects to the agent `md` describes; returns this connection's id. Several
    /// connections to one agent share NIXL's (one per agent name): it is dropped when
    /// the last of them is.
    pub(crate) async fn connect(&self, md: &Metadata) -> Result<u64> {
        let (bytes, agent) = (md.conn.clone(), md.agent.clone());
        self.driver
            .call_leased(SETUP_DEADLINE, |undo, reply| Cmd::Connect {
                md: bytes,
                agent,
                undo,
                reply,
            })
            .await
    }

    pub(crate) fn disconnect(&self, conn: u64) {
        let _ = self.driver.send(Cmd::Disconnect { conn });
    }

    pub(crate) async fn prepare(&self, conn: u64, segs: &[Resolved]) -> Result<u64> {
        let segs = segs.to_vec();
        self.driver
            .call_async(SETUP_DEADLINE, |reply| Cmd::Prepare { conn, segs, reply })
            .await?
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
    peer: String,
    /// The local regions the write reads (a deregistration abandons it first).
    regions: Vec<u32>,
    deadline: Instant,
    reply: oneshot::Sender<Result<()>>,
}

struct NixlWork {
    agent: nx::Agent,
    plugins: String,
    regions: HashMap<u32, nx::RegistrationHandle>,
    /// Live connections (ids handed to callers) and the agent each is to. An agent's
    /// metadata stays loaded while a connection, a write in flight or an abandoned
    /// write uses it: a decode-server that handshakes again gets a second connection
    /// to the same agent, and ending its first must not cut the second.
    conns: HashMap<u64, String>,
    next_conn: u64,
    /// Agents whose metadata NIXL holds, and those metadata.
    loaded: HashMap<String, Vec<u8>>,
    prepared: HashMap<u64, Prepared>,
    pending: Vec<Pending>,
    next_id: u64,
    notifs: nx::NotificationMap,
    last_notif_poll: Instant,
    hub: Arc<NotifyHub>,
    /// Requests of abandoned writes, with their peer's name, kept until NIXL ends them
    /// on its own: releasing an in-flight request (NIXL's abort) or dropping its peer's
    /// metadata under it crashes NIXL 1.5's UCX plugin over TCP (a use-after-free in
    /// UCX's TCP event handler, found by tests/cross_process.rs's stopped target). The
    /// peer's metadata is dropped after its last one ends.
    zombies: Vec<(String, nx::XferRequest, Instant)>,
    /// Writes in flight whose caller released them: their request goes when they end.
    released: HashSet<u64>,
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
        // Never "peer": with it, NIXL 1.5's UCX plugin crashes (in UCX's TCP event
        // handler) when a peer hangs under a write (tests/cross_process.rs, a stopped
        // target). Our own deadlines turn a dead peer into an error without it.
        if peer_errors {
            tracing::warn!("ucx_peer_error_handling is not applied to NIXL: its UCX plugin crashes with it when a peer hangs");
        }
        params
            .set("ucx_error_handling_mode", "none")
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
            conns: HashMap::new(),
            next_conn: 1,
            loaded: HashMap::new(),
            prepared: HashMap::new(),
            pending: Vec::new(),
            next_id: 1,
            notifs,
            last_notif_poll: Instant::now(),
            hub,
            zombies: Vec::new(),
            released: HashSet::new(),
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

    /// Deregisters a region; false (registration kept) while an abandoned write that
    /// may read it still runs: its memory must then not be freed.
    fn deregister(&mut self, id: u32) -> bool {
        // A write in flight that reads this region is abandoned, and its peer's
        // connection closed, before the registration goes.
        let busy: Vec<String> = self
            .pending
            .iter()
            .filter(|p| p.regions.contains(&id))
            .map(|p| p.peer.clone())
            .collect();
        for peer in &busy {
            self.abandon_peer(peer, &TransferError::Invalid(format!("local region {id} deregistered")));
        }
        // Give those writes a moment to end before their memory goes (NIXL cannot
        // abort them safely; see `zombies`).
        let until = Instant::now() + DEREGISTER_WAIT;
        while self.zombies.iter().any(|(p, _, _)| busy.contains(p)) && Instant::now() < until {
            self.reap_zombies();
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.zombies.iter().any(|(p, _, _)| busy.contains(p)) {
            tracing::error!(
                region = id,
                "an abandoned NIXL write may still read this region: it stays registered"
            );
            if let Some(h) = self.regions.remove(&id) {
                std::mem::forget(h);
            }
            return false;
        }
        let mut peers = HashSet::new();
        self.prepared.retain(|_, p| {
            let keep = !p.regions.contains(&id);
            if !keep {
                peers.insert(p.peer.clone());
            }
            keep
        });
        // Agents that only these prepared writes kept loaded go with them.
        for peer in peers {
            self.forget_unless_busy(&peer);
        }
        if let Some(mut h) = self.regions.remove(&id)
            && let Err(e) = h.deregister()
        {
            tracing::warn!(region = id, error = %e, "NIXL deregistration failed");
        }
        true
    }

    fn connect(&mut self, md: &[u8], agent: &str) -> Result<u64> {
        if self.zombies.iter().any(|(p, _, _)| p == agent) {
            // Its abandoned requests still run on the old connection: a new one, of
            // the same name, waits until they ended.
            return Err(TransferError::PeerLost {
                peer: agent.to_string(),
                detail: "an abandoned write to this peer has not ended yet: connect again later".into(),
            });
        }
        // An agent's name is unique to its process (`unique_name`): one that is loaded
        // has one set of metadata, and its connection is shared.
        match self.loaded.get(agent) {
            Some(known) if known.as_slice() == md => {}
            Some(_) => {
                return Err(TransferError::BadMetadata(format!(
                    "metadata for agent {agent:?} differ from those it connected with"
                )));
            }
            None => {
                let name = self
                    .agent
                    .load_remote_md(md)
                    .map_err(|e| TransferError::BadMetadata(format!("NIXL refused the peer's metadata: {e}")))?;
                if name != agent {
                    // Metadata naming another agent than the envelope: refused, and
                    // undone as far as NIXL lets us (it adds descriptors, never replaces
                    // them: a connected agent's own metadata are loaded again over
                    // them, which removes nothing extra; README, security left).
                    match self.loaded.get(&name) {
                        Some(theirs) => {
                            let _ = self.agent.load_remote_md(theirs);
                        }
                        None => {
                            let _ = self.agent.invalidate_remote_md(&name);
                        }
                    }
                    return Err(TransferError::BadMetadata(format!(
                        "NIXL metadata name agent {name:?}, the envelope {agent:?}"
                    )));
                }
                self.loaded.insert(name, md.to_vec());
            }
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(conn, agent.to_string());
        Ok(conn)
    }

    /// Ends connection `conn`; the agent's metadata go with its last user.
    fn disconnect(&mut self, conn: u64) {
        let Some(name) = self.conns.remove(&conn) else { return };
        if self.conns.values().any(|n| *n == name) {
            return;
        }
        let busy: HashSet<u64> = self.pending.iter().map(|p| p.id).collect();
        self.prepared.retain(|id, p| busy.contains(id) || p.peer != name);
        self.forget_unless_busy(&name);
    }

    fn prepare(&mut self, conn: u64, segs: &[Resolved]) -> Result<u64> {
        let peer = self
            .conns
            .get(&conn)
            .cloned()
            .ok_or_else(|| TransferError::UnknownPeer(format!("nixl connection {conn}")))?;
        let peer = peer.as_str();
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
            Ok(true) => {
                let p = &self.prepared[&id];
                let (peer, regions) = (p.peer.clone(), p.regions.clone());
                self.pending.push(Pending {
                    id,
                    peer,
                    regions,
                    deadline,
                    reply,
                })
            }
            Ok(false) => {
                let _ = reply.send(Ok(()));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Abandons every write in flight to `peer` (each answered
    /// [`TransferError::Abandoned`]; releasing its request asks NIXL to abort it) and
    /// drops the peer's metadata, which closes NIXL's connections to it: no new byte
    /// leaves, and the peer must connect again.
    fn abandon_peer(&mut self, peer: &str, cause: &TransferError) {
        let (gone, keep): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending).into_iter().partition(|p| p.peer == peer);
        self.pending = keep;
        for p in gone {
            self.released.remove(&p.id);
            if let Some(w) = self.prepared.remove(&p.id) {
                self.zombies.push((w.peer, w.req, Instant::now() + ABANDON_HOLD));
            }
            let _ = p
                .reply
                .send(Err(TransferError::abandoned_for(BackendKind::Nixl, cause, ABANDON_HOLD)));
        }
        // Idle prepared writes are safe to release.
        self.prepared.retain(|_, p| p.peer != peer);
        let before = self.conns.len();
        self.conns.retain(|_, n| n != peer);
        if self.conns.len() < before {
            tracing::warn!(%peer, %cause, "nixl write abandoned: no new write goes to the peer until it connects again");
        }
        self.forget_unless_busy(peer);
    }

    /// Drops `peer`'s metadata (closing NIXL's connections to it) unless a connection,
    /// a write in flight, a prepared request or an abandoned request still uses it.
    fn forget_unless_busy(&mut self, peer: &str) {
        let used = self.conns.values().any(|n| n == peer)
            || self.pending.iter().any(|p| p.peer == peer)
            || self.prepared.values().any(|p| p.peer == peer)
            || self.zombies.iter().any(|(p, _, _)| p == peer);
        if !used && self.loaded.remove(peer).is_some() {
            let _ = self.agent.invalidate_remote_md(peer);
        }
    }

    /// Releases the abandoned requests NIXL has ended; returns whether any remain.
    fn reap_zombies(&mut self) -> bool {
        let mut ended = Vec::new();
        let now = Instant::now();
        let mut keep = Vec::new();
        for (peer, req, until) in std::mem::take(&mut self.zombies) {
            let running = matches!(self.agent.get_xfer_status(&req), Ok(nx::XferStatus::InProgress));
            if running && now < until {
                keep.push((peer, req, until));
                continue;
            }
            if running {
                // Past its hold (both sides' blocks are free again): the peer must be
                // able to connect again. The request is leaked, never released.
                tracing::warn!(%peer, "an abandoned NIXL write outlived its hold: leaked");
                std::mem::forget(req);
            }
            ended.push(peer);
        }
        self.zombies = keep;
        for peer in ended {
            self.forget_unless_busy(&peer);
        }
        !self.zombies.is_empty()
    }

    fn poll_notifications(&mut self) {
        if self.agent.get_notifications(&mut self.notifs, None).is_err() {
            return;
        }
        if self.notifs.is_empty().unwrap_or(true) {
            return;
        }
        if let Ok(all) = self.notifs.take_notifs() {
            // Keyed by the source agent's name: the sender waits are scoped by.
            for (agent, msgs) in all {
                for msg in msgs {
                    match msg.strip_prefix(NOTIF_PREFIX).and_then(|t| t.parse::<u64>().ok()) {
                        Some(tag) => self.hub.deliver(&agent, tag),
                        None => tracing::debug!(%agent, %msg, "ignoring foreign NIXL notification"),
                    }
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
            Cmd::Deregister { id, reply } => {
                let _ = reply.send(self.deregister(id));
            }
            Cmd::Metadata { reply } => {
                let _ = reply.send(self.agent.get_local_md().map_err(|e| backend_err("get_local_md", e)));
            }
            Cmd::Connect { md, agent, undo, reply } => {
                // A caller gone (cancelled, timed out) leaves no peer behind: its lease,
                // dropped unread here or with its channel, ends the connection.
                let lease = |conn| crate::driver::Lease::new(conn, undo, |conn| Cmd::Disconnect { conn });
                let _ = reply.send(self.connect(&md, &agent).map(lease));
            }
            Cmd::Disconnect { conn } => self.disconnect(conn),
            Cmd::Prepare { conn, segs, reply } => {
                if let Err(Ok(id)) = reply.send(self.prepare(conn, &segs)) {
                    self.prepared.remove(&id);
                }
            }
            Cmd::Release { id } => {
                if self.pending.iter().any(|p| p.id == id) {
                    // Its post was cancelled mid-flight: released once the write ends.
                    self.released.insert(id);
                } else if let Some(p) = self.prepared.remove(&id) {
                    self.forget_unless_busy(&p.peer);
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
        // Peers whose writes failed or ran past their deadline: abandoned below.
        let mut failed: Vec<(String, TransferError)> = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            let (id, peer) = (self.pending[i].id, &self.pending[i].peer);
            let status = match self.prepared.get(&id) {
                None => Err("its request was released".to_string()),
                Some(p) => self.agent.get_xfer_status(&p.req).map_err(|e| e.to_string()),
            };
            match status {
                Ok(nx::XferStatus::InProgress) => {
                    if now >= self.pending[i].deadline && !failed.iter().any(|(f, _)| f == peer) {
                        let cause = TransferError::Timeout {
                            what: "nixl write completion",
                            after: Duration::ZERO,
                        };
                        failed.push((peer.clone(), cause));
                    }
                    i += 1;
                }
                Ok(nx::XferStatus::Success) => {
                    let done = self.pending.swap_remove(i);
                    let _ = done.reply.send(Ok(()));
                    if self.released.remove(&done.id) {
                        self.prepared.remove(&done.id);
                    }
                    // If its connection ended while it ran, the agent may go now.
                    self.forget_unless_busy(&done.peer);
                }
                Err(e) => {
                    let cause = TransferError::PeerLost {
                        peer: peer.clone(),
                        detail: format!("transfer failed: {e}"),
                    };
                    if !failed.iter().any(|(f, _)| f == peer) {
                        failed.push((peer.clone(), cause));
                    }
                    i += 1;
                }
            }
        }
        for (peer, cause) in failed {
            self.abandon_peer(&peer, &cause);
        }
        let zombies = !self.zombies.is_empty() && self.reap_zombies();
        !self.pending.is_empty() || zombies
    }

    fn finish(&mut self) {
        // Writes in flight are abandoned, not aborted (see `zombies`).
        for p in std::mem::take(&mut self.pending) {
            if let Some(w) = self.prepared.remove(&p.id) {
                self.zombies.push((w.peer, w.req, Instant::now() + ABANDON_HOLD));
            }
            let cause = TransferError::Closed;
            let _ = p
                .reply
                .send(Err(TransferError::abandoned_for(BackendKind::Nixl, &cause, ABANDON_HOLD)));
        }
        // Requests before registrations before peers: the order NIXL releases cleanly.
        self.prepared.clear();
        // Abandoned requests still running are left to the process's exit: releasing
        // them, or their peer's metadata, could crash NIXL (see `zombies`).
        let mut busy = HashSet::new();
        for (peer, req, _) in self.zombies.drain(..) {
            busy.insert(peer);
            std::mem::forget(req);
        }
        for (_, mut h) in self.regions.drain() {
            let _ = h.deregister();
        }
        self.conns.clear();
        for name in self.loaded.drain().map(|(name, _)| name) {
            if !busy.contains(&name) {
                let _ = self.agent.invalidate_remote_md(&name);
            }
        }
    }
}
