//! Bad input is refused with the right error kind, before anything is posted, and
//! registrations do not leak. Two agents in one process are enough here: the byte
//! paths are covered across processes in `cross_process.rs`.
use std::sync::Arc;
use std::time::Duration;

use kv_transfer::{Agent, BackendKind, HostBuffer, Memory, RegionId, Segment, TransferConfig, TransferError};

fn config(backend: BackendKind) -> TransferConfig {
    TransferConfig {
        backend,
        deadline_ms: 5_000,
        ..Default::default()
    }
}

struct Pair {
    a: Agent,
    b: Agent,
    a_reg: kv_transfer::Registration,
    b_reg: kv_transfer::Registration,
    peer: kv_transfer::PeerId,
}

async fn pair(backend: BackendKind) -> Pair {
    let a = Agent::start(&config(backend)).await.unwrap();
    let b = Agent::start(&config(backend)).await.unwrap();
    let a_reg = a.register(Memory::host(Arc::new(HostBuffer::new(1 << 20)))).unwrap();
    let b_reg = b.register(Memory::host(Arc::new(HostBuffer::new(1 << 20)))).unwrap();
    let peer = a.connect(&b.local_metadata().await.unwrap(), &b.issue_key()).await.unwrap();
    Pair { a, b, a_reg, b_reg, peer }
}

fn seg(local: RegionId, local_offset: u64, remote: u32, remote_offset: u64, len: u64) -> Segment {
    Segment {
        local,
        local_offset,
        remote,
        remote_offset,
        len,
    }
}

async fn refuses_bad_input(backend: BackendKind) {
    let p = pair(backend).await;
    let (l, r) = (p.a_reg.id(), p.b_reg.id().0);
    let mb = 1u64 << 20;
    let expect_invalid = |res: Result<kv_transfer::PreparedWrite, TransferError>, what: &str| match res {
        Err(TransferError::Invalid(msg)) => eprintln!("{backend} {what}: {msg}"),
        Err(e) => panic!("{backend} {what}: wrong error {e}"),
        Ok(_) => panic!("{backend} {what}: accepted"),
    };
    expect_invalid(p.a.prepare(p.peer, &[]).await, "empty list");
    expect_invalid(p.a.prepare(p.peer, &[seg(l, 0, r, 0, 0)]).await, "zero-length segment");
    expect_invalid(p.a.prepare(p.peer, &[seg(l, mb - 10, r, 0, 11)]).await, "local overrun");
    expect_invalid(p.a.prepare(p.peer, &[seg(l, 0, r, mb, 1)]).await, "remote overrun");
    expect_invalid(p.a.prepare(p.peer, &[seg(l, u64::MAX, r, 0, 2)]).await, "offset overflow");
    assert!(matches!(
        p.a.prepare(p.peer, &[seg(RegionId(999), 0, r, 0, 1)]).await,
        Err(TransferError::UnknownLocalRegion(999))
    ));
    assert!(matches!(
        p.a.prepare(p.peer, &[seg(l, 0, 999, 0, 1)]).await,
        Err(TransferError::UnknownRemoteRegion { region: 999, .. })
    ));

    // Garbage, truncated and foreign metadata.
    let key = p.b.issue_key();
    assert!(matches!(p.a.connect(b"hello", &key).await, Err(TransferError::BadMetadata(_))));
    assert!(matches!(p.a.connect(&[], &key).await, Err(TransferError::BadMetadata(_))));
    let md = p.b.local_metadata().await.unwrap();
    assert!(matches!(
        p.a.connect(&md[..md.len() / 2], &key).await,
        Err(TransferError::BadMetadata(_))
    ));
    let mut flipped = md.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    flipped.push(0);
    assert!(matches!(p.a.connect(&flipped, &key).await, Err(TransferError::BadMetadata(_))));
    // Malformed keys, with good metadata: refused by every backend.
    for bad in [&b""[..], b"hello", &key[..key.len() - 1], &[key.as_slice(), b"x"].concat()] {
        assert!(
            matches!(p.a.connect(&md, bad).await, Err(TransferError::BadMetadata(_))),
            "{backend}: key of {} bytes accepted",
            bad.len()
        );
    }
    let mut wrong_magic = key.clone();
    wrong_magic[0] ^= 0xff;
    assert!(matches!(p.a.connect(&md, &wrong_magic).await, Err(TransferError::BadMetadata(_))));
    let other = if backend == BackendKind::Tcp {
        BackendKind::Ucx
    } else {
        BackendKind::Tcp
    };
    let foreign = Agent::start(&config(other)).await.unwrap();
    assert!(matches!(
        p.a.connect(&foreign.local_metadata().await.unwrap(), &foreign.issue_key()).await,
        Err(TransferError::Incompatible(_))
    ));

    // A freed local region: refused at prepare, and at post for a write prepared before.
    let extra = p.a.register(Memory::host(Arc::new(HostBuffer::new(4096)))).unwrap();
    let w = p.a.prepare(p.peer, &[seg(extra.id(), 0, r, 0, 4096)]).await.unwrap();
    let freed = extra.id();
    drop(extra);
    assert!(
        matches!(p.a.post(&w, 1).await, Err(TransferError::UnknownLocalRegion(_))),
        "{backend}: post after free"
    );
    assert!(matches!(
        p.a.prepare(p.peer, &[seg(freed, 0, r, 0, 1)]).await,
        Err(TransferError::UnknownLocalRegion(_))
    ));

    // Unknown and disconnected peers.
    let good = p.a.prepare(p.peer, &[seg(l, 0, r, 0, 4096)]).await.unwrap();
    p.a.disconnect(p.peer);
    assert!(matches!(p.a.post(&good, 2).await, Err(TransferError::UnknownPeer(_))));
    assert!(matches!(
        p.a.prepare(p.peer, &[seg(l, 0, r, 0, 1)]).await,
        Err(TransferError::UnknownPeer(_))
    ));

    // A notification that never comes ends at its deadline.
    let t = std::time::Instant::now();
    assert!(matches!(
        p.b.wait_notification(77, Duration::from_millis(300)).await,
        Err(TransferError::Timeout { .. })
    ));
    assert!(t.elapsed() < Duration::from_secs(2));
    // Nothing registered beyond what the test holds.
    assert_eq!(p.a.registered_regions(), 1);
    assert!(matches!(
        p.a.register(Memory::host(Arc::new(HostBuffer::new(0)))),
        Err(TransferError::Invalid(_))
    ));
    drop(p.a_reg);
    assert_eq!(p.a.registered_regions(), 0);
    drop(p.b_reg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_tcp() {
    refuses_bad_input(BackendKind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_ucx() {
    refuses_bad_input(BackendKind::Ucx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_nixl() {
    refuses_bad_input(BackendKind::Nixl).await;
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// 1,000 register/free cycles of 1 MiB regions: the process does not grow and no
/// registration remains.
async fn no_leak(backend: BackendKind) {
    let agent = Agent::start(&config(backend)).await.unwrap();
    async fn cycle(agent: &Agent, n: usize) {
        for _ in 0..n {
            let buf = Arc::new(HostBuffer::new(1 << 20));
            buf.fill(1); // touch the pages, so a leaked buffer would show in RSS
            let reg = agent.register(Memory::host(buf)).unwrap();
            let _ = agent.local_metadata().await.unwrap();
            // Synchronous: the region is deregistered when this returns.
            drop(reg);
            assert_eq!(agent.registered_regions(), 0);
        }
    }
    cycle(&agent, 100).await; // warm-up: allocator and library caches settle
    let before = rss_kib();
    cycle(&agent, 1000).await;
    let grown = rss_kib().saturating_sub(before);
    assert_eq!(agent.registered_regions(), 0);
    // 1,000 leaked MiB would show as ~1 GiB; allow allocator noise.
    assert!(
        grown < 64 * 1024,
        "{backend}: RSS grew by {grown} KiB over 1000 register/free cycles"
    );
    agent.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_leak_tcp() {
    no_leak(BackendKind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_leak_ucx() {
    no_leak(BackendKind::Ucx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_leak_nixl() {
    no_leak(BackendKind::Nixl).await;
}

/// A decode-server that handshakes again connects a second time to the same agent, and
/// then ends its first connection: the second must keep writing (NIXL has one
/// connection per agent name, which the first's end must not take down).
async fn second_connection_outlives_the_first(backend: BackendKind) {
    let p = pair(backend).await;
    let (l, r) = (p.a_reg.id(), p.b_reg.id().0);
    let md = p.b.local_metadata().await.unwrap();
    let second = p.a.connect(&md, &p.b.issue_key()).await.unwrap();
    p.a.disconnect(p.peer);
    for tag in [11u64, 12] {
        let w = p.a.prepare(second, &[seg(l, 0, r, 0, 4096)]).await.unwrap();
        p.a.post(&w, tag)
            .await
            .unwrap_or_else(|e| panic!("{backend}: write on the second connection: {e}"));
        p.b.wait_notification(tag, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{backend}: notification {tag}: {e}"));
    }
    p.a.disconnect(second);
    assert!(matches!(
        p.a.prepare(second, &[seg(l, 0, r, 0, 1)]).await,
        Err(TransferError::UnknownPeer(_))
    ));
    // And a third connection after both ended works again.
    let third = p.a.connect(&md, &p.b.issue_key()).await.unwrap();
    let w = p.a.prepare(third, &[seg(l, 0, r, 0, 4096)]).await.unwrap();
    p.a.post(&w, 13).await.unwrap();
    p.b.wait_notification(13, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_tcp() {
    second_connection_outlives_the_first(BackendKind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_ucx() {
    second_connection_outlives_the_first(BackendKind::Ucx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_nixl() {
    second_connection_outlives_the_first(BackendKind::Nixl).await;
}
