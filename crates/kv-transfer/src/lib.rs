//! pdserve's KV-cache data plane.
//!
//! One [`Agent`] per process moves bytes from its registered memory into a peer's
//! registered memory with one-sided writes, then notifies the peer with a tag:
//!
//! 1. both sides [`Agent::register`] their memory once (host or GPU);
//! 2. each exports [`Agent::local_metadata`] (opaque bytes the daemons carry over gRPC),
//!    and the target [`Agent::issue_key`]s a key for the initiator (carried likewise);
//! 3. the initiator [`Agent::connect`]s to the target's metadata with that key;
//! 4. the initiator [`Agent::write`]s a list of [`Segment`]s with a tag drawn by
//!    [`random_tag`] (or [`Agent::prepare`]s once and [`Agent::post`]s many times); the
//!    target [`Agent::wait_notification_from`]s the initiator for the tag, after which
//!    the bytes are there.
//!
//! Backends: `nixl` (NVIDIA NIXL, through nixl-sys, loaded at run time), `ucx` (UCX
//! directly, through our `ucx-sys`), `tcp` (tokio sockets: the baseline). Every wait has
//! a deadline; bad input is refused before anything is posted.
//!
//! The TCP target serves only connections that authenticate with a key it issued
//! ([`Agent::revoke_key`] closes them). UCX and NIXL have no such hook: their keys are
//! kept but unused, and those backends rely on the network they run on being private.
#![deny(unsafe_op_in_unsafe_fn)]

mod auth;
pub mod bench;
mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
mod driver;
mod error;
mod memory;
mod metadata;
mod nixl;
mod notify;
mod tcp;
mod ucx;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use auth::random_tag;
pub use config::TransferConfig;
pub use error::{LANDING_GRACE, Result, TransferError};
pub use memory::{HostBuffer, MemKind, Memory};
pub use metadata::{METADATA_VERSION, Metadata, RegionInfo};
pub use nixl::{exit_now, load_library as load_nixl_library};
pub use ucx::{library_dirs as ucx_library_dirs, process_defaults};

/// Which library moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum BackendKind {
    Nixl,
    Ucx,
    #[default]
    Tcp,
}

impl BackendKind {
    pub const ALL: [BackendKind; 3] = [BackendKind::Nixl, BackendKind::Ucx, BackendKind::Tcp];
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Nixl => "nixl",
            BackendKind::Ucx => "ucx",
            BackendKind::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "nixl" => Ok(BackendKind::Nixl),
            "ucx" => Ok(BackendKind::Ucx),
            "tcp" => Ok(BackendKind::Tcp),
            other => Err(format!("unknown backend {other:?} (expected nixl, ucx or tcp)")),
        }
    }
}

/// A local registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RegionId(pub u32);

/// A connected peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerId(u64);

impl PeerId {
    /// A peer id from its number, for tables of peers in other crates' tests: writes
    /// to an id no `connect` returned fail with `UnknownPeer`.
    pub fn from_raw(n: u64) -> PeerId {
        PeerId(n)
    }
}

/// One contiguous piece of a write: `len` bytes from a local region to a remote one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub local: RegionId,
    pub local_offset: u64,
    /// The region id as the peer's metadata lists it.
    pub remote: u32,
    pub remote_offset: u64,
    pub len: u64,
}

/// A segment resolved to addresses, after validation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resolved {
    pub local: u32,
    pub local_offset: u64,
    pub local_addr: u64,
    pub local_kind: MemKind,
    pub remote: u32,
    pub remote_offset: u64,
    pub remote_addr: u64,
    pub remote_kind: MemKind,
    pub len: u64,
}

/// The local regions, shared with the backends (the TCP target writes into them).
#[derive(Default)]
pub(crate) struct RegionTable {
    map: Mutex<HashMap<u32, Memory>>,
}

impl RegionTable {
    pub(crate) fn get(&self, id: u32) -> Option<Memory> {
        self.map.lock().unwrap().get(&id).cloned()
    }
    /// Every region now, each kept alive by its clone (the TCP target, once per frame).
    pub(crate) fn snapshot(&self) -> HashMap<u32, Memory> {
        self.map.lock().unwrap().clone()
    }
    fn contains(&self, id: u32) -> bool {
        self.map.lock().unwrap().contains_key(&id)
    }
}

pub(crate) enum Backend {
    Tcp(tcp::Tcp),
    Ucx(ucx::Ucx),
    Nixl(nixl::Nixl),
}

/// The backend's handle on a connected peer.
pub(crate) enum BackendPeer {
    Tcp(Arc<tcp::TcpPeer>),
    Ucx(u64),
    /// NIXL: this connection's id (NIXL itself has one connection per agent).
    Nixl(u64),
}

struct Peer {
    name: String,
    regions: HashMap<u32, RegionInfo>,
    conn: BackendPeer,
}

struct Inner {
    name: String,
    kind: BackendKind,
    deadline: Duration,
    regions: Arc<RegionTable>,
    /// Backend key material per region, for the metadata.
    keys: Mutex<HashMap<u32, Vec<u8>>>,
    /// Data-plane keys issued to peers (checked by the TCP target).
    peer_keys: Arc<auth::KeyTable>,
    peers: Mutex<HashMap<u64, Arc<Peer>>>,
    notify: Arc<notify::NotifyHub>,
    next_region: AtomicU32,
    next_peer: AtomicU64,
    backend: Backend,
}

/// The data-plane agent of one process. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

/// A registered region; deregistered when dropped (before its memory can be freed,
/// since it holds the memory's owner).
pub struct Registration {
    agent: std::sync::Weak<Inner>,
    id: RegionId,
    len: u64,
}

impl Registration {
    pub fn id(&self) -> RegionId {
        self.id
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(inner) = self.agent.upgrade() {
            inner.deregister(self.id.0);
        }
    }
}

/// A write validated and resolved once, to be posted any number of times (one post
/// at a time).
pub struct PreparedWrite {
    agent: std::sync::Weak<Inner>,
    peer: u64,
    peer_name: String,
    segs: Vec<Resolved>,
    bytes: u64,
    /// How `post` waits for this write (decided once, from its size and memory).
    wait: driver::Wait,
    backend: PreparedBackend,
    busy: tokio::sync::Mutex<()>,
}

pub(crate) enum PreparedBackend {
    Tcp(Arc<tcp::TcpPeer>),
    /// An id held by the driver thread (UCX/NIXL), released on drop.
    Driver(u64),
}

impl PreparedWrite {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn segments(&self) -> usize {
        self.segs.len()
    }
    pub fn peer(&self) -> &str {
        &self.peer_name
    }
}

impl Drop for PreparedWrite {
    fn drop(&mut self) {
        if let (PreparedBackend::Driver(id), Some(inner)) = (&self.backend, self.agent.upgrade()) {
            match &inner.backend {
                Backend::Ucx(u) => u.release(*id),
                Backend::Nixl(n) => n.release(*id),
                Backend::Tcp(_) => {}
            }
        }
    }
}

/// How long the blocks of a write whose backend never answered are held.
const UNCONFIRMED_HOLD: Duration = Duration::from_secs(60);

/// Appends a short random suffix so that agent names are unique among peers.
fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{:06x}", std::process::id(), nanos & 0xff_ffff)
}

impl Agent {
    /// Starts an agent with the configured backend. A missing or broken library is an
    /// error here, never later.
    pub async fn start(cfg: &TransferConfig) -> Result<Agent> {
        let name = unique_name(&cfg.name);
        // Peers learn the name from the data plane itself (TCP AUTH frame, UCX
        // notification header), where it is capped.
        if name.len() > auth::MAX_NAME_LEN {
            return Err(TransferError::Invalid(format!(
                "agent name {name:?} is longer than {} bytes",
                auth::MAX_NAME_LEN
            )));
        }
        let regions = Arc::new(RegionTable::default());
        let notify = Arc::new(notify::NotifyHub::default());
        let peer_keys = Arc::new(auth::KeyTable::default());
        let backend = match cfg.backend {
            BackendKind::Tcp => Backend::Tcp(tcp::Tcp::start(cfg, &name, regions.clone(), notify.clone(), peer_keys.clone()).await?),
            BackendKind::Ucx => Backend::Ucx(ucx::Ucx::start(cfg, &name, notify.clone())?),
            BackendKind::Nixl => Backend::Nixl(nixl::Nixl::start(cfg, &name, notify.clone())?),
        };
        tracing::info!(agent = %name, backend = %cfg.backend, "data-plane agent started");
        Ok(Agent {
            inner: Arc::new(Inner {
                name,
                kind: cfg.backend,
                deadline: cfg.deadline(),
                regions,
                keys: Mutex::default(),
                peer_keys,
                peers: Mutex::default(),
                notify,
                next_region: AtomicU32::new(1),
                next_peer: AtomicU64::new(1),
                backend,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn backend(&self) -> BackendKind {
        self.inner.kind
    }

    pub fn deadline(&self) -> Duration {
        self.inner.deadline
    }

    /// A one-line description of the backend's library (version, location).
    pub fn backend_info(&self) -> String {
        match &self.inner.backend {
            Backend::Tcp(t) => t.info(),
            Backend::Ucx(u) => u.info(),
            Backend::Nixl(n) => n.info(),
        }
    }

    /// Number of regions registered now (leak checks).
    pub fn registered_regions(&self) -> usize {
        self.inner.regions.map.lock().unwrap().len()
    }

    /// Registers memory once; the handle deregisters it when dropped. Blocks briefly
    /// (the backend's driver thread does the registration): call it at start-up.
    /// Dropping the handle blocks likewise until the deregistration is done, writes
    /// that read the region abandoned first: its memory may be freed right after.
    pub fn register(&self, mem: Memory) -> Result<Registration> {
        if mem.len == 0 {
            return Err(TransferError::Invalid("cannot register an empty region".into()));
        }
        #[cfg(not(feature = "cuda"))]
        if matches!(mem.kind, MemKind::Vram { .. }) {
            return Err(TransferError::Invalid("GPU memory needs a build with the `cuda` feature".into()));
        }
        let id = self.inner.next_region.fetch_add(1, Ordering::Relaxed);
        let key = match &self.inner.backend {
            Backend::Tcp(t) => t.register(&mem)?,
            Backend::Ucx(u) => u.register(id, &mem)?,
            Backend::Nixl(n) => n.register(id, &mem)?,
        };
        let len = mem.len as u64;
        self.inner.keys.lock().unwrap().insert(id, key);
        self.inner.regions.map.lock().unwrap().insert(id, mem);
        Ok(Registration {
            agent: Arc::downgrade(&self.inner),
            id: RegionId(id),
            len,
        })
    }

    /// This agent's metadata, for a peer's [`Agent::connect`]. Export it again after
    /// registering more regions: peers only know the regions listed when they connected.
    pub async fn local_metadata(&self) -> Result<Vec<u8>> {
        let regions = {
            let map = self.inner.regions.map.lock().unwrap();
            let keys = self.inner.keys.lock().unwrap();
            let mut v: Vec<RegionInfo> = map
                .iter()
                .map(|(id, m)| RegionInfo {
                    id: *id,
                    addr: m.addr as u64,
                    len: m.len as u64,
                    kind: m.kind,
                    key: keys.get(id).cloned().unwrap_or_default(),
                })
                .collect();
            v.sort_by_key(|r| r.id);
            v
        };
        let conn = match &self.inner.backend {
            Backend::Tcp(t) => t.conn_info(),
            Backend::Ucx(u) => u.conn_info(),
            Backend::Nixl(n) => n.conn_info().await?,
        };
        Ok(Metadata::new(self.inner.kind, self.inner.name.clone(), regions, conn).encode())
    }

    /// Issues a fresh random data-plane key for one peer and returns its wire form
    /// (opaque bytes, carried to the peer for its [`Agent::connect`]). The TCP target
    /// serves only connections that prove they hold a key issued here; UCX and NIXL
    /// keep it unused. At most 4096 keys are kept, the oldest evicted past that.
    pub fn issue_key(&self) -> Vec<u8> {
        self.inner.peer_keys.issue(None)
    }

    /// As [`Agent::issue_key`], for the peer agent named `peer_name` only: the TCP
    /// target refuses a connection with this key that claims another name, so the
    /// sender that [`Agent::wait_notification_from`] scopes by cannot be claimed by
    /// another key holder.
    pub fn issue_key_for(&self, peer_name: &str) -> Vec<u8> {
        self.inner.peer_keys.issue(Some(peer_name))
    }

    /// A key that authenticates nobody until [`Agent::bind_key`] names its holder: for a
    /// target that must send the key before it learns the writer's name (the
    /// decode-server's Handshake carries the key; the answer names the prefill-server's
    /// agent). An empty name never authenticates (names are 1 to 256 bytes).
    pub fn issue_pending_key(&self) -> Vec<u8> {
        self.inner.peer_keys.issue(Some(""))
    }

    /// Binds a key issued here to the agent `peer_name`: from now on only a connection
    /// under that name authenticates with it. False if the key is not (or no longer) here.
    pub fn bind_key(&self, key: &[u8], peer_name: &str) -> bool {
        self.inner.peer_keys.bind(key, peer_name)
    }

    /// Revokes a key issued here: new connections with it are refused and the TCP
    /// connections that authenticated with it are closed (a write in flight on one
    /// fails, unnotified). A key that is not (or no longer) here is ignored.
    pub fn revoke_key(&self, key: &[u8]) {
        if self.inner.peer_keys.revoke(key) {
            tracing::debug!(agent = %self.inner.name, "data-plane key revoked");
        }
    }

    /// Keys issued and not revoked (leak checks).
    pub fn issued_keys(&self) -> usize {
        self.inner.peer_keys.len()
    }

    /// Where the TCP backend listens (`host:port`, as its metadata advertises it);
    /// None for the other backends.
    pub fn tcp_listen_addr(&self) -> Option<String> {
        match &self.inner.backend {
            Backend::Tcp(t) => Some(t.listen_addr().to_string()),
            _ => None,
        }
    }

    /// Loads a peer's metadata, with the key that peer issued for us
    /// ([`Agent::issue_key`] on its side); the returned id addresses it in writes.
    /// A malformed key is refused here (every backend), a revoked or foreign one by
    /// the TCP target at the first write.
    pub async fn connect(&self, metadata: &[u8], key: &[u8]) -> Result<PeerId> {
        let key = auth::PeerKey::decode(key)?;
        let md = Metadata::decode(metadata, self.inner.kind)?;
        let conn = match &self.inner.backend {
            Backend::Tcp(t) => BackendPeer::Tcp(t.connect(&md, key)?),
            Backend::Ucx(u) => BackendPeer::Ucx(u.connect(&md).await?),
            Backend::Nixl(n) => BackendPeer::Nixl(n.connect(&md).await?),
        };
        let id = self.inner.next_peer.fetch_add(1, Ordering::Relaxed);
        let peer = Peer {
            name: md.agent.clone(),
            regions: md.regions.into_iter().map(|r| (r.id, r)).collect(),
            conn,
        };
        self.inner.peers.lock().unwrap().insert(id, Arc::new(peer));
        tracing::debug!(agent = %self.inner.name, peer = %md.agent, "connected to peer");
        Ok(PeerId(id))
    }

    /// Forgets a peer; prepared writes to it fail from now on.
    pub fn disconnect(&self, peer: PeerId) {
        let removed = self.inner.peers.lock().unwrap().remove(&peer.0);
        if let Some(p) = removed {
            match (&self.inner.backend, &p.conn) {
                (Backend::Ucx(u), BackendPeer::Ucx(ep)) => u.disconnect(*ep),
                (Backend::Nixl(n), BackendPeer::Nixl(conn)) => n.disconnect(*conn),
                _ => {}
            }
        }
    }

    /// The peer's agent name.
    pub fn peer_name(&self, peer: PeerId) -> Result<String> {
        Ok(self.inner.peer(peer.0)?.name.clone())
    }

    /// Validates and resolves a write once.
    pub async fn prepare(&self, peer: PeerId, segments: &[Segment]) -> Result<PreparedWrite> {
        let p = self.inner.peer(peer.0)?;
        let segs = self.inner.resolve(&p, segments)?;
        let bytes = segs.iter().map(|s| s.len).sum();
        let host = segs.iter().all(|s| s.local_kind == MemKind::Dram && s.remote_kind == MemKind::Dram);
        let backend = match (&self.inner.backend, &p.conn) {
            (Backend::Tcp(_), BackendPeer::Tcp(tp)) => PreparedBackend::Tcp(tp.clone()),
            (Backend::Ucx(u), BackendPeer::Ucx(ep)) => PreparedBackend::Driver(u.prepare(*ep, &segs).await?),
            (Backend::Nixl(n), BackendPeer::Nixl(conn)) => PreparedBackend::Driver(n.prepare(*conn, &segs).await?),
            _ => unreachable!("peer connected through another backend"),
        };
        Ok(PreparedWrite {
            agent: Arc::downgrade(&self.inner),
            peer: peer.0,
            peer_name: p.name.clone(),
            segs,
            bytes,
            wait: driver::Wait::for_write(bytes, host),
            backend,
            busy: tokio::sync::Mutex::new(()),
        })
    }

    /// Posts a prepared write and waits (up to the deadline) for its local completion:
    /// when this returns Ok the bytes are in the peer's memory and the peer has been
    /// (or is being) notified with `tag`. An error is either clean (nothing was
    /// posted: nothing lands) or [`TransferError::Abandoned`]: the write's connection
    /// was force-closed and its bytes may land until the time it names, so neither
    /// side may reuse its blocks before then ([`TransferError::may_land_until`]).
    pub async fn post(&self, w: &PreparedWrite, tag: u64) -> Result<()> {
        let _one_at_a_time = w.busy.lock().await;
        // The peer or a local region may have gone since `prepare`.
        self.inner.peer(w.peer)?;
        for s in &w.segs {
            if !self.inner.regions.contains(s.local) {
                return Err(TransferError::UnknownLocalRegion(s.local));
            }
        }
        let (deadline, wait) = (self.inner.deadline, w.wait);
        let fut = async {
            match (&self.inner.backend, &w.backend) {
                (Backend::Tcp(t), PreparedBackend::Tcp(peer)) => t.write(peer, &w.segs, tag, deadline).await,
                (Backend::Ucx(u), PreparedBackend::Driver(id)) => u.post(*id, tag, deadline, wait).await,
                (Backend::Nixl(n), PreparedBackend::Driver(id)) => n.post(*id, tag, deadline, wait).await,
                _ => unreachable!("prepared by another backend"),
            }
        };
        // A write posted inline is usually done in its first poll: no timer for it.
        let mut fut = std::pin::pin!(fut);
        if let Poll::Ready(r) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
            return r;
        }
        // The backends enforce the deadline themselves; this margin is the last guard.
        match tokio::time::timeout(deadline + Duration::from_secs(1), fut).await {
            Ok(r) => r,
            // The backend did not answer (its driver is stuck): nothing was confirmed
            // closed, so the hold is long.
            Err(_) => Err(TransferError::abandoned_for(
                self.inner.kind,
                &TransferError::Timeout {
                    what: "write completion",
                    after: deadline,
                },
                UNCONFIRMED_HOLD,
            )),
        }
    }

    /// Prepares and posts in one go.
    pub async fn write(&self, peer: PeerId, segments: &[Segment], tag: u64) -> Result<()> {
        let w = self.prepare(peer, segments).await?;
        self.post(&w, tag).await
    }

    /// Waits until a write with notification `tag` by any peer has landed here (tools
    /// and tests; the daemons wait with [`Agent::wait_notification_from`]).
    pub async fn wait_notification(&self, tag: u64, deadline: Duration) -> Result<()> {
        self.inner.notify.wait(None, tag, deadline).await
    }

    /// Waits until a write with notification `tag` by the peer agent named `sender`
    /// ([`Agent::name`] on its side) has landed here. The same tag delivered by another
    /// peer does not answer it (it is kept as that peer's early arrival, bounded). The
    /// sender is the name a TCP connection authenticated with (any name the key holder
    /// chooses, unless the key came from [`Agent::issue_key_for`]), the source agent of
    /// a NIXL notification, the name in a UCX notification (both as the peer's library
    /// states them, unauthenticated).
    pub async fn wait_notification_from(&self, sender: &str, tag: u64, deadline: Duration) -> Result<()> {
        self.inner.notify.wait(Some(sender), tag, deadline).await
    }

    /// Stops the backend (closing endpoints and connections, releasing registrations).
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl Inner {
    /// Idempotent: every backend's shutdown does nothing the second time.
    fn shutdown(&self) {
        match &self.backend {
            Backend::Tcp(t) => t.shutdown(),
            Backend::Ucx(u) => u.shutdown(),
            Backend::Nixl(n) => n.shutdown(),
        }
    }

    fn peer(&self, id: u64) -> Result<Arc<Peer>> {
        self.peers
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .ok_or_else(|| TransferError::UnknownPeer(format!("#{id}")))
    }

    fn deregister(&self, id: u32) {
        let clean = match &self.backend {
            Backend::Tcp(_) => true,
            Backend::Ucx(u) => u.deregister(id),
            Backend::Nixl(n) => n.deregister(id),
        };
        self.keys.lock().unwrap().remove(&id);
        let mem = self.regions.map.lock().unwrap().remove(&id);
        if !clean && let Some(m) = mem {
            // A write that may still read it could not be stopped: the memory stays
            // allocated (leaked) rather than freed under it.
            tracing::error!(region = id, "deregistration incomplete: the region's memory is kept");
            std::mem::forget(m);
        }
    }

    fn resolve(&self, peer: &Peer, segments: &[Segment]) -> Result<Vec<Resolved>> {
        if segments.is_empty() {
            return Err(TransferError::Invalid("a write needs at least one segment".into()));
        }
        let map = self.regions.map.lock().unwrap();
        let mut out = Vec::with_capacity(segments.len());
        for (i, s) in segments.iter().enumerate() {
            if s.len == 0 {
                return Err(TransferError::Invalid(format!("segment {i} has length 0")));
            }
            let local = map.get(&s.local.0).ok_or(TransferError::UnknownLocalRegion(s.local.0))?;
            let remote = peer.regions.get(&s.remote).ok_or_else(|| TransferError::UnknownRemoteRegion {
                peer: peer.name.clone(),
                region: s.remote,
            })?;
            let fits = |off: u64, region_len: u64| off.checked_add(s.len).is_some_and(|end| end <= region_len);
            if !fits(s.local_offset, local.len as u64) {
                return Err(TransferError::Invalid(format!(
                    "segment {i}: local offset {} + length {} runs past region {} of {} bytes",
                    s.local_offset, s.len, s.local.0, local.len
                )));
            }
            if !fits(s.remote_offset, remote.len) {
                return Err(TransferError::Invalid(format!(
                    "segment {i}: remote offset {} + length {} runs past peer region {} of {} bytes",
                    s.remote_offset, s.len, s.remote, remote.len
                )));
            }
            out.push(Resolved {
                local: s.local.0,
                local_offset: s.local_offset,
                local_addr: local.addr as u64 + s.local_offset,
                local_kind: local.kind,
                remote: s.remote,
                remote_offset: s.remote_offset,
                remote_addr: remote.addr + s.remote_offset,
                remote_kind: remote.kind,
                len: s.len,
            });
        }
        Ok(out)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}
