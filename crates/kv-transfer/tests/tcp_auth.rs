//! The TCP target serves only peers that hold a key it issued, caps what a frame may
//! claim, and times out what does not arrive; notifications are scoped by sender on
//! every backend. Real sockets throughout: raw `std::net::TcpStream`s play the
//! misbehaving peers, speaking the wire format of `src/tcp.rs` by hand.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_transfer::{Agent, BackendKind, HostBuffer, Memory, Registration, Segment, TransferConfig, TransferError, random_tag};
use ring::hmac;

const POISON: u8 = 0xA5;
const REGION: usize = 1 << 20;
const AUTH_MAGIC: u32 = 0x5044_4b41;
const FRAME_MAGIC: u32 = 0x5044_4b57;
/// How long a refused connection may take to close (generous: CI machines are slow).
const CLOSE_WITHIN: Duration = Duration::from_secs(3);

fn config(backend: BackendKind, deadline_ms: u64) -> TransferConfig {
    TransferConfig {
        backend,
        deadline_ms,
        ..Default::default()
    }
}

/// A TCP target with one poisoned 1 MiB host region.
struct Target {
    agent: Agent,
    buf: Arc<HostBuffer>,
    reg: Registration,
    addr: String,
}

async fn target(deadline_ms: u64) -> Target {
    let agent = Agent::start(&config(BackendKind::Tcp, deadline_ms)).await.unwrap();
    let buf = Arc::new(HostBuffer::new(REGION));
    buf.fill(POISON);
    let reg = agent.register(Memory::host(buf.clone())).unwrap();
    let addr = agent.tcp_listen_addr().expect("tcp agent listens");
    Target { agent, buf, reg, addr }
}

impl Target {
    fn region(&self) -> u32 {
        self.reg.id().0
    }

    fn assert_untouched(&self, what: &str) {
        let got = self.buf.to_vec(0, REGION);
        let at = got.iter().position(|b| *b != POISON);
        assert!(at.is_none(), "{what}: region byte {} was written", at.unwrap_or(0));
    }

    async fn assert_no_notification(&self, tag: u64, what: &str) {
        let r = self.agent.wait_notification(tag, Duration::from_millis(300)).await;
        assert!(matches!(r, Err(TransferError::Timeout { .. })), "{what}: notification {tag}: {r:?}");
    }
}

/// A key's wire form: magic (4) | key id (8) | secret (32).
fn key_parts(key: &[u8]) -> ([u8; 8], Vec<u8>) {
    assert_eq!(key.len(), 44, "key wire form");
    let mut id = [0u8; 8];
    id.copy_from_slice(&key[4..12]);
    (id, key[12..].to_vec())
}

/// Connects and reads the target's nonce.
fn open_raw(addr: &str) -> (TcpStream, [u8; 32]) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(CLOSE_WITHIN)).unwrap();
    let mut nonce = [0u8; 32];
    s.read_exact(&mut nonce).expect("the target sends a nonce first");
    (s, nonce)
}

fn auth_frame(nonce: &[u8; 32], id: &[u8; 8], secret: &[u8], name: &[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let msg = [&nonce[..], id, name].concat();
    let mac = hmac::sign(&key, &msg);
    let mut f = Vec::new();
    f.extend_from_slice(&AUTH_MAGIC.to_le_bytes());
    f.extend_from_slice(id);
    f.extend_from_slice(&(name.len() as u16).to_le_bytes());
    f.extend_from_slice(name);
    f.extend_from_slice(mac.as_ref());
    f
}

/// Connects and authenticates with `key` as `name`; panics unless the target accepts.
fn authed_raw(addr: &str, key: &[u8], name: &str) -> TcpStream {
    let (mut s, nonce) = open_raw(addr);
    let (id, secret) = key_parts(key);
    s.write_all(&auth_frame(&nonce, &id, &secret, name.as_bytes())).unwrap();
    let mut status = [0u8; 3];
    s.read_exact(&mut status).unwrap();
    assert_eq!(status, [0, 0, 0], "authentication accepted");
    s
}

/// A write frame's header: tag, segment count, descriptors (region, offset, len).
fn frame_header(tag: u64, nseg: u32, descs: &[(u32, u64, u64)]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    f.extend_from_slice(&tag.to_le_bytes());
    f.extend_from_slice(&nseg.to_le_bytes());
    for (r, o, l) in descs {
        f.extend_from_slice(&r.to_le_bytes());
        f.extend_from_slice(&o.to_le_bytes());
        f.extend_from_slice(&l.to_le_bytes());
    }
    f
}

/// A complete, well-formed one-segment write of `len` bytes of 0x11 at offset 0.
fn write_frame(tag: u64, region: u32, len: usize) -> Vec<u8> {
    let mut f = frame_header(tag, 1, &[(region, 0, len as u64)]);
    f.extend(std::iter::repeat_n(0x11u8, len));
    f
}

/// Reads until the target closes the connection (EOF or reset) and returns what it
/// sent; panics if it is still open after `within`.
fn expect_closed(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let until = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "connection still open after {within:?}");
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) => {
                return got;
            }
            Err(e) => panic!("connection still open after {within:?}: {e}"),
        }
    }
}

/// The control for the tests below: the hand-made frames are right, so what they
/// refuse is refused for the reason each test gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_authenticated_write_lands() {
    let t = target(5_000).await;
    let key = t.agent.issue_key();
    let mut s = authed_raw(&t.addr, &key, "raw-peer");
    let tag = random_tag();
    s.write_all(&write_frame(tag, t.region(), 4096)).unwrap();
    let mut status = [0u8; 3];
    s.read_exact(&mut status).unwrap();
    assert_eq!(status, [0, 0, 0]);
    t.agent
        .wait_notification_from("raw-peer", tag, Duration::from_secs(5))
        .await
        .expect("notified, from the authenticated name");
    assert_eq!(t.buf.to_vec(0, 4096), vec![0x11; 4096]);
    assert_eq!(t.buf.to_vec(4096, 1), vec![POISON]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_without_auth_is_dropped() {
    let t = target(5_000).await;
    let _key = t.agent.issue_key();
    let (mut s, _nonce) = open_raw(&t.addr);
    let tag = random_tag();
    // The peer may see the close while still writing.
    let _ = s.write_all(&write_frame(tag, t.region(), 4096));
    expect_closed(&mut s, CLOSE_WITHIN);
    t.assert_untouched("write without AUTH");
    t.assert_no_notification(tag, "write without AUTH").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_mac_is_dropped() {
    let t = target(5_000).await;
    let key = t.agent.issue_key();
    let (id, mut secret) = key_parts(&key);
    secret[0] ^= 1;
    let (mut s, nonce) = open_raw(&t.addr);
    let tag = random_tag();
    let _ = s.write_all(&auth_frame(&nonce, &id, &secret, b"mallory"));
    let _ = s.write_all(&write_frame(tag, t.region(), 4096));
    expect_closed(&mut s, CLOSE_WITHIN);
    t.assert_untouched("wrong MAC");
    t.assert_no_notification(tag, "wrong MAC").await;
    // A MAC over another nonce (a replayed AUTH frame) is just as wrong.
    let (_, secret) = key_parts(&key);
    let (mut s, nonce) = open_raw(&t.addr);
    let mut old = nonce;
    old[0] ^= 1;
    let _ = s.write_all(&auth_frame(&old, &id, &secret, b"mallory"));
    let _ = s.write_all(&write_frame(tag, t.region(), 4096));
    expect_closed(&mut s, CLOSE_WITHIN);
    t.assert_untouched("replayed AUTH");
    t.assert_no_notification(tag, "replayed AUTH").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_id_is_dropped() {
    let t = target(5_000).await;
    let _issued = t.agent.issue_key();
    let (mut s, nonce) = open_raw(&t.addr);
    let tag = random_tag();
    // A self-consistent AUTH frame for a key the target never issued.
    let id = random_tag().to_le_bytes();
    let secret = [7u8; 32];
    let _ = s.write_all(&auth_frame(&nonce, &id, &secret, b"mallory"));
    let _ = s.write_all(&write_frame(tag, t.region(), 4096));
    expect_closed(&mut s, CLOSE_WITHIN);
    t.assert_untouched("unknown key id");
    t.assert_no_notification(tag, "unknown key id").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_name_is_dropped() {
    let t = target(5_000).await;
    let key = t.agent.issue_key();
    let (id, secret) = key_parts(&key);
    let (mut s, nonce) = open_raw(&t.addr);
    let tag = random_tag();
    // A correct MAC over a 257-byte name: refused on the length alone.
    let name = vec![b'n'; 257];
    let _ = s.write_all(&auth_frame(&nonce, &id, &secret, &name));
    let _ = s.write_all(&write_frame(tag, t.region(), 4096));
    expect_closed(&mut s, CLOSE_WITHIN);
    t.assert_untouched("oversized name");
    t.assert_no_notification(tag, "oversized name").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_closed_after_auth_deadline() {
    let t = target(5_000).await;
    let (mut s, _nonce) = open_raw(&t.addr);
    let start = Instant::now();
    // The AUTH deadline is 5 s.
    expect_closed(&mut s, Duration::from_secs(5) + CLOSE_WITHIN);
    eprintln!("silent connection closed after {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_are_refused() {
    let t = target(1_000).await;
    let key = t.agent.issue_key();
    let start = Instant::now();

    // 4,000,000 segments claimed (one region here allows 65,536): refused from the
    // header alone, nothing allocated for them, nothing waited for.
    let mut s = authed_raw(&t.addr, &key, "peer");
    let tag = random_tag();
    let mut f = frame_header(tag, 4_000_000, &[(t.region(), 0, 4096)]);
    f.extend(std::iter::repeat_n(0x11u8, 4096));
    let _ = s.write_all(&f);
    let got = expect_closed(&mut s, CLOSE_WITHIN);
    eprintln!("nseg 4e6: {:?}", String::from_utf8_lossy(&got));
    assert!(got.is_empty() || got[0] == 1, "refused, not acknowledged");
    t.assert_untouched("nseg 4,000,000");
    t.assert_no_notification(tag, "nseg 4,000,000").await;

    // More bytes than are registered here (two whole-region segments).
    let mut s = authed_raw(&t.addr, &key, "peer");
    let tag = random_tag();
    let r = (t.region(), 0, REGION as u64);
    let _ = s.write_all(&frame_header(tag, 2, &[r, r]));
    let _ = s.write_all(&vec![0x11u8; 4096]);
    let got = expect_closed(&mut s, CLOSE_WITHIN);
    assert!(got.is_empty() || got[0] == 1, "refused, not acknowledged");
    t.assert_untouched("frame longer than the registered bytes");
    t.assert_no_notification(tag, "frame longer than the registered bytes").await;

    // A frame whose descriptors stop coming: closed at the agent's deadline (1 s).
    let mut s = authed_raw(&t.addr, &key, "peer");
    let tag = random_tag();
    let _ = s.write_all(&frame_header(tag, 10, &[(t.region(), 0, 4096)]));
    expect_closed(&mut s, Duration::from_secs(1) + CLOSE_WITHIN);
    t.assert_untouched("stalled frame");
    t.assert_no_notification(tag, "stalled frame").await;

    // Nothing above hung: all within a few seconds, not the 5 s AUTH or 60 s idle limits.
    assert!(start.elapsed() < Duration::from_secs(15), "took {:?}", start.elapsed());
}

struct Initiator {
    agent: Agent,
    reg: Registration,
}

async fn initiator(backend: BackendKind) -> Initiator {
    let agent = Agent::start(&config(backend, 5_000)).await.unwrap();
    let buf = Arc::new(HostBuffer::new(64 << 10));
    buf.fill(0x22);
    let reg = agent.register(Memory::host(buf)).unwrap();
    Initiator { agent, reg }
}

impl Initiator {
    fn seg(&self, remote: u32, remote_offset: u64) -> Segment {
        Segment {
            local: self.reg.id(),
            local_offset: 0,
            remote,
            remote_offset,
            len: 4096,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_key_closes_connections_and_refuses_new_ones() {
    let t = target(5_000).await;
    let md = t.agent.local_metadata().await.unwrap();
    let key = t.agent.issue_key();
    let a = initiator(BackendKind::Tcp).await;
    let peer = a.agent.connect(&md, &key).await.unwrap();
    let tag = random_tag();
    a.agent.write(peer, &[a.seg(t.region(), 0)], tag).await.unwrap();
    t.agent
        .wait_notification_from(a.agent.name(), tag, Duration::from_secs(5))
        .await
        .unwrap();
    // A second connection with the key, idle.
    let mut raw = authed_raw(&t.addr, &key, "raw-peer");

    assert_eq!(t.agent.issued_keys(), 1);
    t.agent.revoke_key(&key);
    assert_eq!(t.agent.issued_keys(), 0);
    t.buf.fill(POISON);

    // The existing connections are closed...
    expect_closed(&mut raw, CLOSE_WITHIN);
    // ... so the write on A's pooled one fails,
    let tag = random_tag();
    let e = a.agent.write(peer, &[a.seg(t.region(), 0)], tag).await.unwrap_err();
    // (The writer cannot know how much the target read before it closed: the write
    // counts as abandoned, its bytes possibly landing for a moment. Here none did.)
    assert!(
        matches!(&e, TransferError::Abandoned { detail, .. } if detail.contains("unreachable")),
        "pooled connection: {e}"
    );
    t.assert_untouched("write on a revoked connection");
    t.assert_no_notification(tag, "write on a revoked connection").await;
    // ... and a fresh connection with the key is refused.
    let e = a.agent.write(peer, &[a.seg(t.region(), 0)], tag).await.unwrap_err();
    assert!(
        matches!(&e, TransferError::PeerLost { detail, .. } if detail.contains("refused our data-plane key")),
        "new connection: {e}"
    );
    let c = initiator(BackendKind::Tcp).await;
    let cpeer = c.agent.connect(&md, &key).await.unwrap();
    let e = c.agent.write(cpeer, &[c.seg(t.region(), 0)], tag).await.unwrap_err();
    assert!(matches!(e, TransferError::PeerLost { .. }), "another agent: {e}");
    t.assert_untouched("write with a revoked key");
    t.assert_no_notification(tag, "write with a revoked key").await;

    // A new key works again.
    let peer = a.agent.connect(&md, &t.agent.issue_key()).await.unwrap();
    a.agent.write(peer, &[a.seg(t.region(), 0)], tag).await.unwrap();
    t.agent
        .wait_notification_from(a.agent.name(), tag, Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_bound_key_refuses_other_names() {
    let t = target(5_000).await;
    let md = t.agent.local_metadata().await.unwrap();
    let a = initiator(BackendKind::Tcp).await;
    let tag = random_tag();
    // Issued for another agent: A cannot use it, raw peers claiming A's name with it neither.
    let theirs = t.agent.issue_key_for("someone-else");
    let peer = a.agent.connect(&md, &theirs).await.unwrap();
    let e = a.agent.write(peer, &[a.seg(t.region(), 0)], tag).await.unwrap_err();
    assert!(matches!(e, TransferError::PeerLost { .. }), "{e}");
    let (id, secret) = key_parts(&theirs);
    let (mut s, nonce) = open_raw(&t.addr);
    let _ = s.write_all(&auth_frame(&nonce, &id, &secret, a.agent.name().as_bytes()));
    let _ = s.write_all(&write_frame(tag, t.region(), 4096));
    expect_closed(&mut s, CLOSE_WITHIN);
    t.assert_untouched("key bound to another name");
    t.assert_no_notification(tag, "key bound to another name").await;
    // Issued for A: works.
    let peer = a.agent.connect(&md, &t.agent.issue_key_for(a.agent.name())).await.unwrap();
    a.agent.write(peer, &[a.seg(t.region(), 0)], tag).await.unwrap();
    t.agent
        .wait_notification_from(a.agent.name(), tag, Duration::from_secs(5))
        .await
        .unwrap();
}

/// Two initiators write to one target with the same tag: a wait scoped to A is
/// answered by A's write only; B's is kept as B's.
async fn scoped_notifications(backend: BackendKind) {
    let t = Agent::start(&config(backend, 5_000)).await.unwrap();
    let buf = Arc::new(HostBuffer::new(REGION));
    let treg = t.register(Memory::host(buf)).unwrap();
    let region = treg.id().0;
    let md = t.local_metadata().await.unwrap();
    let (a, b) = (initiator(backend).await, initiator(backend).await);
    assert_ne!(a.agent.name(), b.agent.name());
    let pa = a.agent.connect(&md, &t.issue_key()).await.unwrap();
    let pb = b.agent.connect(&md, &t.issue_key()).await.unwrap();
    let long = Duration::from_secs(10);

    // B's write first: no answer for A, then A's answers.
    let tag = random_tag();
    b.agent.write(pb, &[b.seg(region, 0)], tag).await.unwrap();
    let r = t.wait_notification_from(a.agent.name(), tag, Duration::from_millis(300)).await;
    assert!(
        matches!(r, Err(TransferError::Timeout { .. })),
        "{backend}: B's write answered A's wait: {r:?}"
    );
    a.agent.write(pa, &[a.seg(region, 4096)], tag).await.unwrap();
    t.wait_notification_from(a.agent.name(), tag, long)
        .await
        .unwrap_or_else(|e| panic!("{backend}: A's write: {e}"));
    t.wait_notification_from(b.agent.name(), tag, long)
        .await
        .unwrap_or_else(|e| panic!("{backend}: B's write was kept as B's: {e}"));

    // A waiter already registered for A is not answered by B's write.
    let tag = random_tag();
    let waiter = tokio::spawn({
        let (t, name) = (t.clone(), a.agent.name().to_string());
        async move { t.wait_notification_from(&name, tag, long).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.agent.write(pb, &[b.seg(region, 0)], tag).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "{backend}: B's write answered A's waiter");
    a.agent.write(pa, &[a.seg(region, 4096)], tag).await.unwrap();
    waiter
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{backend}: A's write, waiter first: {e}"));
    t.wait_notification_from(b.agent.name(), tag, long)
        .await
        .unwrap_or_else(|e| panic!("{backend}: B's write, kept: {e}"));
    drop(treg);
    for x in [&a.agent, &b.agent, &t] {
        x.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_notifications_tcp() {
    scoped_notifications(BackendKind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_notifications_ucx() {
    scoped_notifications(BackendKind::Ucx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_notifications_nixl() {
    scoped_notifications(BackendKind::Nixl).await;
}
