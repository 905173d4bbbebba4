//! The TCP backend: the path disaggregation replaces, done well so the comparison is
//! honest. The target listens; the initiator opens pooled connections, proves on each
//! that it holds a key the target issued, then sends each write as one frame:
//!
//! ```text
//! on connect:
//! <- nonce [32]                                          (fresh random, per connection)
//! -> AUTH: magic u32 "PDKA" | key id [8] | name_len u16 (1..=256) | name | mac [32]
//!          mac = HMAC-SHA256(secret, nonce || key id || name)
//! <- status u8 (0 ok, 1 refused) | msg_len u16 | msg
//! per write:
//! -> magic u32 "PDKW" | tag u64 | nseg u32 | nseg x (region u32, offset u64, len u64) | payload
//! <- status u8 (0 ok, 1 refused) | msg_len u16 | msg
//! ```
//!
//! All integers are little-endian. A connection that does not authenticate within
//! [`AUTH_DEADLINE`] (wrong magic, unknown or revoked key id, bad MAC, a name too long
//! or not UTF-8, or a key bound to another name) is closed before any region byte is
//! read or written or any tag delivered. The authenticated name is the sender of the
//! connection's notifications; revoking the key closes the connection.
//!
//! The target reads a frame's descriptors in bounded chunks, each validated as it
//! comes, so nothing is allocated from a peer-sent count; a frame claiming more
//! segments or bytes than could be meant for this agent is refused. The rest of a
//! frame after its header must arrive within the agent's deadline, and a connection
//! idle for [`IDLE_TIMEOUT`] is closed (the initiator stops reusing a connection well
//! before that).
//!
//! The sender writes straight from registered host memory and the receiver reads
//! straight into it (no staging copy, no per-message allocation beyond the pooled
//! header buffer). GPU regions (feature `cuda`) go through a pinned host buffer per
//! connection, chunk by chunk: GPU -> host -> socket -> host -> GPU, the path the
//! RDMA backends replace. The tag is delivered to the target's waiters once the
//! payload is in place, then acknowledged.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::hmac;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::auth::{self, KEY_ID_LEN, KeyId, KeyTable, MAX_NAME_LEN, PeerKey};
use crate::error::{Result, TransferError};
use crate::metadata::Metadata;
use crate::notify::NotifyHub;
use crate::{BackendKind, MemKind, Memory, RegionTable, Resolved, TransferConfig};

const FRAME_MAGIC: u32 = 0x5044_4b57; // "PDKW"
const AUTH_MAGIC: u32 = 0x5044_4b41; // "PDKA"
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
/// magic, key id, name length.
const AUTH_FIXED: usize = 4 + KEY_ID_LEN + 2;
const SEG_BYTES: usize = 20;
/// Segments one frame may carry per region registered here. A write has at most one
/// segment per region per KV block (a run of contiguous blocks is one segment), and a
/// KV pool has far fewer blocks than this; a frame claiming more is not a KV write.
const SEGMENTS_PER_REGION: u64 = 1 << 16;
/// Descriptors read (and validated) at a time: the target's buffer for them is at
/// most this many, whatever count the frame header claims.
const DESC_CHUNK: usize = 4096;
/// How long a new connection has to send its AUTH frame.
pub(crate) const AUTH_DEADLINE: Duration = Duration::from_secs(5);
/// A connection with no frame for this long is closed by the target.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The initiator reuses a pooled connection only if it was used this recently, so the
/// target's idle close can never race a write.
const POOL_MAX_IDLE: Duration = Duration::from_secs(IDLE_TIMEOUT.as_secs() / 2);
const STATUS_OK: u8 = 0;
const STATUS_REFUSED: u8 = 1;
/// Staging chunk for GPU regions.
#[cfg(feature = "cuda")]
const STAGE: usize = 8 << 20;

fn lost(peer: &str, e: impl std::fmt::Display) -> TransferError {
    TransferError::PeerLost {
        peer: peer.to_string(),
        detail: e.to_string(),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub(crate) struct Tcp {
    advertise: String,
    /// This agent's name, sent in AUTH frames.
    name: String,
    regions: Arc<RegionTable>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

/// Connections to one peer, reused across writes, and the key they authenticate with.
pub(crate) struct TcpPeer {
    addr: String,
    key: PeerKey,
    /// Ordered by last use, most recent last.
    idle: Mutex<Vec<Conn>>,
}

impl TcpPeer {
    /// The most recently used pooled connection, unless it has idled long enough that
    /// the target may be closing it (then every pooled one has: all are dropped).
    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap();
        let c = idle.pop()?;
        if c.last_used.elapsed() < POOL_MAX_IDLE {
            return Some(c);
        }
        idle.clear();
        None
    }
}

struct Conn {
    stream: TcpStream,
    header: Vec<u8>,
    last_used: Instant,
    #[cfg(feature = "cuda")]
    stage: Option<crate::cuda::Pinned>,
}

/// What the accept loop's connections share.
struct Target {
    regions: Arc<RegionTable>,
    notify: Arc<NotifyHub>,
    keys: Arc<KeyTable>,
    deadline: Duration,
}

/// Reads a status reply: Ok(Err(msg)) when the peer refused.
async fn read_status(stream: &mut TcpStream, addr: &str) -> Result<std::result::Result<(), String>> {
    let mut status = [0u8; 3];
    stream.read_exact(&mut status).await.map_err(|e| lost(addr, e))?;
    if status[0] == STATUS_OK {
        return Ok(Ok(()));
    }
    let mut msg = vec![0; u16::from_le_bytes([status[1], status[2]]) as usize];
    stream.read_exact(&mut msg).await.map_err(|e| lost(addr, e))?;
    Ok(Err(String::from_utf8_lossy(&msg).into_owned()))
}

impl Tcp {
    pub(crate) async fn start(
        cfg: &TransferConfig,
        name: &str,
        regions: Arc<RegionTable>,
        notify: Arc<NotifyHub>,
        keys: Arc<KeyTable>,
    ) -> Result<Tcp> {
        let listener = TcpListener::bind(&cfg.tcp_bind).await.map_err(|e| TransferError::Unavailable {
            backend: BackendKind::Tcp,
            detail: format!("cannot listen on {}: {e}", cfg.tcp_bind),
        })?;
        let local = listener.local_addr().map_err(|e| TransferError::Unavailable {
            backend: BackendKind::Tcp,
            detail: e.to_string(),
        })?;
        let host = cfg.tcp_advertise_host.clone().unwrap_or_else(|| local.ip().to_string());
        let advertise = if host.contains(':') {
            format!("[{host}]:{}", local.port())
        } else {
            format!("{host}:{}", local.port())
        };
        let target = Arc::new(Target {
            regions: regions.clone(),
            notify,
            keys,
            deadline: cfg.deadline(),
        });
        let accept = tokio::spawn(accept_loop(listener, target));
        Ok(Tcp {
            advertise,
            name: name.to_string(),
            regions,
            accept: Mutex::new(Some(accept)),
        })
    }

    pub(crate) fn info(&self) -> String {
        format!("tokio TCP, listening on {}", self.advertise)
    }

    /// The address peers connect to (as the metadata advertises it).
    pub(crate) fn listen_addr(&self) -> &str {
        &self.advertise
    }

    pub(crate) fn register(&self, mem: &crate::Memory) -> Result<Vec<u8>> {
        if mem.kind() != MemKind::Dram && !cfg!(feature = "cuda") {
            return Err(TransferError::Invalid("GPU memory needs a build with the `cuda` feature".into()));
        }
        Ok(Vec::new())
    }

    pub(crate) fn conn_info(&self) -> Vec<u8> {
        self.advertise.clone().into_bytes()
    }

    pub(crate) fn connect(&self, md: &Metadata, key: PeerKey) -> Result<Arc<TcpPeer>> {
        let addr = String::from_utf8(md.conn.clone()).map_err(|_| TransferError::BadMetadata("tcp address is not UTF-8".into()))?;
        if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
            return Err(TransferError::BadMetadata(format!("tcp address {addr:?} is not host:port")));
        }
        Ok(Arc::new(TcpPeer {
            addr,
            key,
            idle: Mutex::new(Vec::new()),
        }))
    }

    pub(crate) async fn write(&self, peer: &TcpPeer, segs: &[Resolved], tag: u64, deadline: Duration) -> Result<()> {
        let mut conn = match peer.take_idle() {
            Some(c) => c,
            None => tokio::time::timeout(deadline, self.open(peer))
                .await
                .map_err(|_| TransferError::Timeout {
                    what: "tcp connect",
                    after: deadline,
                })??,
        };
        // A connection that failed or timed out mid-frame is dropped (closed), not
        // pooled: the target stops applying the frame at the end of what its socket
        // already holds.
        let r = tokio::time::timeout(deadline, self.send_frame(&mut conn, &peer.addr, segs, tag))
            .await
            .unwrap_or(Err(TransferError::Timeout {
                what: "tcp write",
                after: deadline,
            }));
        match r {
            Ok(()) => {
                conn.last_used = Instant::now();
                peer.idle.lock().unwrap().push(conn);
                Ok(())
            }
            // The target refuses a frame before it writes any of it.
            Err(e @ TransferError::Invalid(_)) => Err(e),
            Err(e) => {
                // Reset, not closed: the kernel discards what the socket still holds
                // instead of delivering it later (after a partition heals, say).
                let _ = conn.stream.set_zero_linger();
                drop(conn);
                Err(TransferError::abandoned(crate::BackendKind::Tcp, &e))
            }
        }
    }

    /// Opens a connection and authenticates it with the peer's key.
    async fn open(&self, peer: &TcpPeer) -> Result<Conn> {
        let addr = &peer.addr;
        let mut stream = TcpStream::connect(addr).await.map_err(|e| lost(addr, e))?;
        stream.set_nodelay(true).map_err(|e| lost(addr, e))?;
        let mut nonce = [0u8; NONCE_LEN];
        stream.read_exact(&mut nonce).await.map_err(|e| lost(addr, e))?;
        let name = self.name.as_bytes();
        let mac = hmac::sign(&peer.key.hmac, &auth::auth_message(&nonce, &peer.key.id, name));
        let mut frame = Vec::with_capacity(AUTH_FIXED + name.len() + MAC_LEN);
        frame.extend_from_slice(&AUTH_MAGIC.to_le_bytes());
        frame.extend_from_slice(&peer.key.id);
        // Agent::start refuses names longer than MAX_NAME_LEN, so this fits in a u16.
        frame.extend_from_slice(&(name.len() as u16).to_le_bytes());
        frame.extend_from_slice(name);
        frame.extend_from_slice(mac.as_ref());
        stream.write_all(&frame).await.map_err(|e| lost(addr, e))?;
        if let Err(msg) = read_status(&mut stream, addr).await? {
            return Err(TransferError::PeerLost {
                peer: addr.clone(),
                detail: format!(
                    "refused our data-plane key ({msg}): unknown, revoked or bound to another agent; a new handshake issues a new one"
                ),
            });
        }
        Ok(Conn {
            stream,
            header: Vec::new(),
            last_used: Instant::now(),
            #[cfg(feature = "cuda")]
            stage: None,
        })
    }

    async fn send_frame(&self, conn: &mut Conn, addr: &str, segs: &[Resolved], tag: u64) -> Result<()> {
        let h = &mut conn.header;
        h.clear();
        h.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        h.extend_from_slice(&tag.to_le_bytes());
        h.extend_from_slice(&(segs.len() as u32).to_le_bytes());
        for s in segs {
            h.extend_from_slice(&s.remote.to_le_bytes());
            h.extend_from_slice(&s.remote_offset.to_le_bytes());
            h.extend_from_slice(&s.len.to_le_bytes());
        }
        conn.stream.write_all(h).await.map_err(|e| lost(addr, e))?;
        for s in segs {
            let mem = self.regions.get(s.local).ok_or(TransferError::UnknownLocalRegion(s.local))?;
            match mem.kind() {
                MemKind::Dram => {
                    // SAFETY: `resolve` checked the range against this host region,
                    // which stays alive through `mem`.
                    let bytes = unsafe { mem.host_slice(s.local_offset as usize, s.len as usize) };
                    conn.stream.write_all(bytes).await.map_err(|e| lost(addr, e))?;
                }
                #[cfg(feature = "cuda")]
                MemKind::Vram { device } => {
                    // A staging buffer (and its stream) per device: a stream serves its context only.
                    if conn.stage.as_ref().is_none_or(|p| p.device() != device) {
                        conn.stage = Some(crate::cuda::Pinned::new(device, STAGE)?);
                    }
                    let stage = conn.stage.as_mut().expect("staging buffer");
                    let mut done = 0u64;
                    while done < s.len {
                        let n = (s.len - done).min(STAGE as u64) as usize;
                        let bytes = stage.load(s.local_addr + done, n)?;
                        conn.stream.write_all(bytes).await.map_err(|e| lost(addr, e))?;
                        done += n as u64;
                    }
                }
                #[cfg(not(feature = "cuda"))]
                MemKind::Vram { .. } => unreachable!("registration refuses GPU memory without `cuda`"),
            }
        }
        read_status(&mut conn.stream, addr)
            .await?
            .map_err(|msg| TransferError::Invalid(format!("peer refused the write: {msg}")))
    }

    pub(crate) fn shutdown(&self) {
        if let Some(h) = self.accept.lock().unwrap().take() {
            h.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, target: Arc<Target>) {
    // Dropping this task (on shutdown) drops the set, which aborts every connection.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(serve_conn(stream, from, target.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "tcp data-plane accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// An authenticated connection's identity.
struct Authed {
    name: String,
    revoked: tokio::sync::watch::Receiver<()>,
}

/// Authenticates a connection, then receives frames until the peer closes, the key is
/// revoked, the connection idles out or a frame is refused.
async fn serve_conn(mut stream: TcpStream, from: SocketAddr, t: Arc<Target>) {
    let auth = match tokio::time::timeout(AUTH_DEADLINE, authenticate(&mut stream, &t.keys)).await {
        Err(_) => {
            tracing::warn!(%from, "tcp data-plane connection sent no AUTH frame within {AUTH_DEADLINE:?}: closed");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(%from, error = %e, "tcp data-plane connection lost during authentication");
            return;
        }
        Ok(Ok(Err(reason))) => {
            tracing::warn!(%from, %reason, "tcp data-plane connection failed authentication: closed");
            // Tell an honest peer that its key was refused, not which check failed.
            let _ = tokio::time::timeout(Duration::from_secs(1), refuse(&mut stream, "authentication failed")).await;
            return;
        }
        Ok(Ok(Ok(a))) => a,
    };
    let Authed { name, mut revoked } = auth;
    tracing::debug!(%from, peer = %name, "tcp data-plane connection authenticated");
    let r = tokio::select! {
        // Revocation first: once a key is revoked no further frame of its connections
        // is served (a frame in progress is cut off, unacknowledged and unnotified).
        biased;
        _ = revoked.changed() => {
            tracing::debug!(%from, peer = %name, "data-plane key revoked: connection closed");
            Ok(())
        }
        r = serve_frames(&mut stream, from, &t, &name) => r,
    };
    if let Err(e) = r {
        tracing::debug!(%from, peer = %name, error = %e, "tcp data-plane connection ended");
    }
}

/// The target's side of AUTH: Ok(Err(reason)) for a connection to refuse.
async fn authenticate(stream: &mut TcpStream, keys: &KeyTable) -> std::io::Result<std::result::Result<Authed, String>> {
    let nonce = auth::nonce();
    stream.write_all(&nonce).await?;
    let mut fixed = [0u8; AUTH_FIXED];
    stream.read_exact(&mut fixed).await?;
    let magic = u32_at(&fixed, 0);
    if magic != AUTH_MAGIC {
        return Ok(Err(format!("first frame is not AUTH (magic {magic:#x})")));
    }
    let mut id: KeyId = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&fixed[4..4 + KEY_ID_LEN]);
    let name_len = u16::from_le_bytes([fixed[AUTH_FIXED - 2], fixed[AUTH_FIXED - 1]]) as usize;
    // Checked before reading on: the buffer below is fixed, whatever the peer claims.
    if name_len == 0 || name_len > MAX_NAME_LEN {
        return Ok(Err(format!("agent name of {name_len} bytes (1 to {MAX_NAME_LEN} allowed)")));
    }
    let mut rest = [0u8; MAX_NAME_LEN + MAC_LEN];
    let rest = &mut rest[..name_len + MAC_LEN];
    stream.read_exact(rest).await?;
    let (name, mac) = rest.split_at(name_len);
    let Some(granted) = keys.lookup(&id) else {
        return Ok(Err("unknown or revoked key id".into()));
    };
    // Constant time in the MAC's bytes (ring).
    if hmac::verify(&granted.hmac, &auth::auth_message(&nonce, &id, name), mac).is_err() {
        return Ok(Err("bad MAC".into()));
    }
    let Ok(name) = std::str::from_utf8(name) else {
        return Ok(Err("agent name is not UTF-8".into()));
    };
    if let Some(bound) = &granted.bound_name
        && bound != name
    {
        return Ok(Err(format!("key issued to {bound:?} used by {name:?}")));
    }
    stream.write_all(&[STATUS_OK, 0, 0]).await?;
    Ok(Ok(Authed {
        name: name.to_string(),
        revoked: granted.revoked,
    }))
}

/// Buffers one connection reuses across frames.
#[derive(Default)]
struct FrameBufs {
    /// Up to DESC_CHUNK raw descriptors.
    descs: Vec<u8>,
    /// The frame's validated segments: (region, offset, len). Grows only with
    /// descriptors actually received (24 bytes per 20 read), within the frame caps.
    targets: Vec<(u32, usize, usize)>,
    #[cfg(feature = "cuda")]
    stage: Option<crate::cuda::Pinned>,
}

enum Next {
    More,
    Refuse(String),
}

async fn serve_frames(stream: &mut TcpStream, from: SocketAddr, t: &Target, sender: &str) -> std::io::Result<()> {
    let mut fixed = [0u8; 16];
    let mut bufs = FrameBufs::default();
    loop {
        match tokio::time::timeout(IDLE_TIMEOUT, stream.read_exact(&mut fixed)).await {
            Err(_) => {
                tracing::debug!(%from, peer = %sender, "tcp data-plane connection idle for {IDLE_TIMEOUT:?}: closed");
                return Ok(());
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(_)) => {}
        }
        let next = match tokio::time::timeout(t.deadline, serve_frame(stream, t, sender, &fixed, &mut bufs)).await {
            Ok(r) => r?,
            Err(_) => {
                tracing::warn!(%from, peer = %sender, deadline = ?t.deadline, "tcp data-plane frame not complete within the deadline: connection closed");
                return Ok(());
            }
        };
        if let Next::Refuse(msg) = next {
            tracing::warn!(%from, peer = %sender, reason = %msg, "refusing tcp data-plane write");
            // The frame's payload was not read: the connection cannot go on.
            let _ = tokio::time::timeout(Duration::from_secs(1), refuse(stream, &msg)).await;
            return Ok(());
        }
    }
}

/// One frame after its 16-byte header: descriptors, payload, notification, status.
async fn serve_frame(stream: &mut TcpStream, t: &Target, sender: &str, header: &[u8; 16], bufs: &mut FrameBufs) -> std::io::Result<Next> {
    let magic = u32_at(header, 0);
    let tag = u64_at(header, 4);
    let nseg = u32_at(header, 12);
    if magic != FRAME_MAGIC || nseg == 0 {
        return Ok(Next::Refuse(format!("bad frame (magic {magic:#x}, {nseg} segments)")));
    }
    // The regions as they are now, kept alive (through their owners) for this frame.
    let regions: HashMap<u32, Memory> = t.regions.snapshot();
    let registered: u64 = regions.values().map(|m| m.len() as u64).sum();
    let max_segs = regions.len() as u64 * SEGMENTS_PER_REGION;
    if u64::from(nseg) > max_segs {
        return Ok(Next::Refuse(format!(
            "{nseg} segments in one frame ({} regions registered here allow {max_segs})",
            regions.len()
        )));
    }
    bufs.targets.clear();
    let mut total = 0u64;
    let mut left = nseg as usize;
    while left > 0 {
        let n = left.min(DESC_CHUNK);
        left -= n;
        if bufs.descs.len() < n * SEG_BYTES {
            bufs.descs.resize(n * SEG_BYTES, 0);
        }
        let chunk = &mut bufs.descs[..n * SEG_BYTES];
        stream.read_exact(chunk).await?;
        for d in chunk.chunks_exact(SEG_BYTES) {
            let (region, offset, len) = (u32_at(d, 0), u64_at(d, 4), u64_at(d, 12));
            let Some(mem) = regions.get(&region) else {
                return Ok(Next::Refuse(format!("region {region} is not registered here")));
            };
            if len == 0 || offset.checked_add(len).is_none_or(|end| end > mem.len() as u64) {
                return Ok(Next::Refuse(format!("segment {offset}+{len} outside region {region}")));
            }
            total = total.saturating_add(len);
            if total > registered {
                return Ok(Next::Refuse(format!(
                    "frame carries more than the {registered} bytes registered here"
                )));
            }
            bufs.targets.push((region, offset as usize, len as usize));
        }
    }
    for &(region, offset, len) in &bufs.targets {
        let Some(mem) = regions.get(&region) else {
            // Every target was checked against this snapshot above.
            return Ok(Next::Refuse(format!("region {region} is not registered here")));
        };
        match mem.kind() {
            MemKind::Dram => {
                // SAFETY: bounds checked above against a registered host region, kept
                // alive by the snapshot; the write protocol gives these bytes to this
                // write alone.
                let dst = unsafe { mem.host_slice_mut(offset, len) };
                stream.read_exact(dst).await?;
            }
            #[cfg(feature = "cuda")]
            MemKind::Vram { device } => {
                if bufs.stage.as_ref().is_none_or(|p| p.device() != device) {
                    bufs.stage = Some(crate::cuda::Pinned::new(device, STAGE).map_err(std::io::Error::other)?);
                }
                let buf = bufs.stage.as_mut().expect("staging buffer");
                let mut done = 0usize;
                while done < len {
                    let n = (len - done).min(STAGE);
                    stream.read_exact(&mut buf.as_mut_slice()[..n]).await?;
                    buf.store((mem.addr() + offset + done) as u64, n).map_err(std::io::Error::other)?;
                    done += n;
                }
            }
            #[cfg(not(feature = "cuda"))]
            MemKind::Vram { .. } => unreachable!("registration refuses GPU memory without `cuda`"),
        }
    }
    t.notify.deliver(sender, tag);
    stream.write_all(&[STATUS_OK, 0, 0]).await?;
    Ok(Next::More)
}

async fn refuse(stream: &mut TcpStream, msg: &str) -> std::io::Result<()> {
    let msg = &msg.as_bytes()[..msg.len().min(1024)];
    let mut out = vec![STATUS_REFUSED];
    out.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pooled connection idle past half the target's idle timeout is dropped, not
    /// written on (the target may be closing it right then), with every older one.
    #[tokio::test]
    async fn stale_pooled_connections_are_not_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conn = |age: Duration| async move {
            Conn {
                stream: TcpStream::connect(addr).await.unwrap(),
                header: Vec::new(),
                last_used: Instant::now().checked_sub(age).expect("uptime above a minute"),
                #[cfg(feature = "cuda")]
                stage: None,
            }
        };
        let peer = TcpPeer {
            addr: addr.to_string(),
            key: PeerKey::decode(&KeyTable::default().issue(None)).unwrap(),
            idle: Mutex::new(Vec::new()),
        };
        let pooled = [
            conn(IDLE_TIMEOUT).await,
            conn(POOL_MAX_IDLE + Duration::from_secs(1)).await,
            conn(Duration::ZERO).await,
        ];
        peer.idle.lock().unwrap().extend(pooled);
        assert!(peer.take_idle().is_some(), "the fresh one is reused");
        assert!(peer.take_idle().is_none(), "the next is stale");
        assert!(peer.idle.lock().unwrap().is_empty(), "and so is every older one: all dropped");
        assert!(POOL_MAX_IDLE < IDLE_TIMEOUT);
    }
}
