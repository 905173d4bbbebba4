//! The TCP backend: the path disaggregation replaces, done well so the comparison is
//! honest. The target listens; a write is one frame on a pooled connection:
//!
//! ```text
//! -> magic u32 | tag u64 | nseg u32 | nseg x (region u32, offset u64, len u64) | payload
//! <- status u8 (0 ok, 1 refused) | msg_len u16 | msg
//! ```
//!
//! The sender writes straight from registered host memory and the receiver reads
//! straight into it (no staging copy, no per-message allocation beyond the pooled
//! header buffer). GPU regions (feature `cuda`) go through a pinned host buffer per
//! connection, chunk by chunk: GPU -> host -> socket -> host -> GPU, the path the
//! RDMA backends replace. The tag is delivered to the target's waiters once the
//! payload is in place, then acknowledged.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::error::{Result, TransferError};
use crate::metadata::Metadata;
use crate::notify::NotifyHub;
use crate::{BackendKind, MemKind, RegionTable, Resolved, TransferConfig};

const MAGIC: u32 = 0x5044_4b57; // "PDKW"
const SEG_BYTES: usize = 20;
/// Most segments one frame may carry (a 32-layer x 2 x 4096-block write is 262144).
const MAX_SEGMENTS: u32 = 1 << 22;
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

pub(crate) struct Tcp {
    advertise: String,
    regions: Arc<RegionTable>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

/// Connections to one peer, reused across writes.
pub(crate) struct TcpPeer {
    addr: String,
    idle: Mutex<Vec<Conn>>,
}

struct Conn {
    stream: TcpStream,
    header: Vec<u8>,
    #[cfg(feature = "cuda")]
    stage: Option<crate::cuda::Pinned>,
}

impl Tcp {
    pub(crate) async fn start(cfg: &TransferConfig, regions: Arc<RegionTable>, notify: Arc<NotifyHub>) -> Result<Tcp> {
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
        let accept = tokio::spawn(accept_loop(listener, regions.clone(), notify));
        Ok(Tcp {
            advertise,
            regions,
            accept: Mutex::new(Some(accept)),
        })
    }

    pub(crate) fn info(&self) -> String {
        format!("tokio TCP, listening on {}", self.advertise)
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

    pub(crate) fn connect(&self, md: &Metadata) -> Result<Arc<TcpPeer>> {
        let addr = String::from_utf8(md.conn.clone()).map_err(|_| TransferError::BadMetadata("tcp address is not UTF-8".into()))?;
        if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
            return Err(TransferError::BadMetadata(format!("tcp address {addr:?} is not host:port")));
        }
        Ok(Arc::new(TcpPeer {
            addr,
            idle: Mutex::new(Vec::new()),
        }))
    }

    pub(crate) async fn write(&self, peer: &TcpPeer, segs: &[Resolved], tag: u64, deadline: Duration) -> Result<()> {
        let taken = peer.idle.lock().unwrap().pop();
        let mut conn = match taken {
            Some(c) => c,
            None => {
                let stream = tokio::time::timeout(deadline, TcpStream::connect(&peer.addr))
                    .await
                    .map_err(|_| TransferError::Timeout {
                        what: "tcp connect",
                        after: deadline,
                    })?
                    .map_err(|e| lost(&peer.addr, e))?;
                stream.set_nodelay(true).map_err(|e| lost(&peer.addr, e))?;
                Conn {
                    stream,
                    header: Vec::new(),
                    #[cfg(feature = "cuda")]
                    stage: None,
                }
            }
        };
        // A connection that failed or timed out mid-frame is dropped, not pooled.
        let r = tokio::time::timeout(deadline, self.send_frame(&mut conn, &peer.addr, segs, tag))
            .await
            .unwrap_or(Err(TransferError::Timeout {
                what: "tcp write",
                after: deadline,
            }));
        if r.is_ok() {
            peer.idle.lock().unwrap().push(conn);
        }
        r
    }

    async fn send_frame(&self, conn: &mut Conn, addr: &str, segs: &[Resolved], tag: u64) -> Result<()> {
        let h = &mut conn.header;
        h.clear();
        h.extend_from_slice(&MAGIC.to_le_bytes());
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
                    if conn.stage.is_none() {
                        conn.stage = Some(crate::cuda::Pinned::new(device, STAGE)?);
                    }
                    let stage = conn.stage.as_mut().expect("staging buffer");
                    let mut done = 0u64;
                    while done < s.len {
                        let n = (s.len - done).min(STAGE as u64) as usize;
                        let bytes = stage.load(device, s.local_addr + done, n)?;
                        conn.stream.write_all(bytes).await.map_err(|e| lost(addr, e))?;
                        done += n as u64;
                    }
                }
                #[cfg(not(feature = "cuda"))]
                MemKind::Vram { .. } => unreachable!("registration refuses GPU memory without `cuda`"),
            }
        }
        let mut status = [0u8; 3];
        conn.stream.read_exact(&mut status).await.map_err(|e| lost(addr, e))?;
        if status[0] == STATUS_OK {
            return Ok(());
        }
        let mut msg = vec![0; u16::from_le_bytes([status[1], status[2]]) as usize];
        conn.stream.read_exact(&mut msg).await.map_err(|e| lost(addr, e))?;
        Err(TransferError::Invalid(format!(
            "peer refused the write: {}",
            String::from_utf8_lossy(&msg)
        )))
    }

    pub(crate) fn shutdown(&self) {
        if let Some(h) = self.accept.lock().unwrap().take() {
            h.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, regions: Arc<RegionTable>, notify: Arc<NotifyHub>) {
    // Dropping this task (on shutdown) drops the set, which aborts every connection.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    let _ = stream.set_nodelay(true);
                    let (regions, notify) = (regions.clone(), notify.clone());
                    conns.spawn(async move {
                        if let Err(e) = serve_conn(stream, &regions, &notify).await {
                            tracing::debug!(%from, error = %e, "tcp data-plane connection ended");
                        }
                    });
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

/// Receives frames until the peer closes. A refused frame closes the connection,
/// since its payload was not read.
async fn serve_conn(mut stream: TcpStream, regions: &RegionTable, notify: &NotifyHub) -> std::io::Result<()> {
    let mut fixed = [0u8; 16];
    let mut descs = Vec::new();
    let mut targets = Vec::new();
    #[cfg(feature = "cuda")]
    let mut stage: Option<crate::cuda::Pinned> = None;
    loop {
        match stream.read_exact(&mut fixed).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let magic = u32::from_le_bytes(fixed[0..4].try_into().unwrap());
        let tag = u64::from_le_bytes(fixed[4..12].try_into().unwrap());
        let nseg = u32::from_le_bytes(fixed[12..16].try_into().unwrap());
        if magic != MAGIC || nseg == 0 || nseg > MAX_SEGMENTS {
            return refuse(&mut stream, &format!("bad frame (magic {magic:#x}, {nseg} segments)")).await;
        }
        descs.resize(nseg as usize * SEG_BYTES, 0);
        stream.read_exact(&mut descs).await?;
        targets.clear();
        for d in descs.chunks_exact(SEG_BYTES) {
            let region = u32::from_le_bytes(d[0..4].try_into().unwrap());
            let offset = u64::from_le_bytes(d[4..12].try_into().unwrap());
            let len = u64::from_le_bytes(d[12..20].try_into().unwrap());
            let Some(mem) = regions.get(region) else {
                return refuse(&mut stream, &format!("region {region} is not registered here")).await;
            };
            if len == 0 || offset.checked_add(len).is_none_or(|end| end > mem.len() as u64) {
                return refuse(&mut stream, &format!("segment {offset}+{len} outside region {region}")).await;
            }
            targets.push((mem, offset as usize, len as usize));
        }
        for (mem, offset, len) in &targets {
            match mem.kind() {
                MemKind::Dram => {
                    // SAFETY: bounds checked above against a registered host region, kept
                    // alive by `mem`; the write protocol gives these bytes to this write alone.
                    let dst = unsafe { mem.host_slice_mut(*offset, *len) };
                    stream.read_exact(dst).await?;
                }
                #[cfg(feature = "cuda")]
                MemKind::Vram { device } => {
                    if stage.is_none() {
                        stage = Some(crate::cuda::Pinned::new(device, STAGE).map_err(std::io::Error::other)?);
                    }
                    let buf = stage.as_mut().expect("staging buffer");
                    let mut done = 0usize;
                    while done < *len {
                        let n = (*len - done).min(STAGE);
                        stream.read_exact(&mut buf.as_mut_slice()[..n]).await?;
                        buf.store(device, (mem.addr() + offset + done) as u64, n)
                            .map_err(std::io::Error::other)?;
                        done += n;
                    }
                }
                #[cfg(not(feature = "cuda"))]
                MemKind::Vram { .. } => unreachable!("registration refuses GPU memory without `cuda`"),
            }
        }
        notify.deliver(tag);
        stream.write_all(&[STATUS_OK, 0, 0]).await?;
    }
}

async fn refuse(stream: &mut TcpStream, msg: &str) -> std::io::Result<()> {
    tracing::warn!(reason = msg, "refusing tcp data-plane write");
    let msg = &msg.as_bytes()[..msg.len().min(1024)];
    let mut out = vec![STATUS_REFUSED];
    out.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await?;
    stream.shutdown().await
}
