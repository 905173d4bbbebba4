//! Real two-process transfers through every backend: the test binary re-executes
//! itself as the target (`target_child`), which checks the bytes that arrived.
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_transfer::bench::{Layout, TargetProcess, pattern_fill};
use kv_transfer::{Agent, BackendKind, HostBuffer, LANDING_GRACE, Memory, TransferConfig, TransferError};

const REGION: usize = (256 << 20) + (1 << 20);

fn config(backend: BackendKind, deadline_ms: u64) -> TransferConfig {
    TransferConfig {
        backend,
        deadline_ms,
        ..Default::default()
    }
}

/// Not a test of its own: the body of the child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_child() {
    let Ok(backend) = std::env::var("PDKV_TARGET") else { return };
    let deadline: u64 = std::env::var("PDKV_DEADLINE_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let mut cfg = config(backend.parse().unwrap(), deadline);
    // Over TCP, as between two hosts without RDMA: a stopped target stops the bytes
    // (shared-memory transports would write into it regardless).
    cfg.ucx_peer_error_handling = std::env::var_os("PDKV_PEER_ERRORS").is_some();
    let agent = Agent::start(&cfg).await.expect("target agent");
    kv_transfer::bench::serve_host_target(&agent, REGION, Duration::from_millis(deadline))
        .await
        .expect("serve");
    agent.shutdown();
    kv_transfer::exit_now(0);
}

async fn spawn_target(backend: BackendKind, deadline_ms: u64) -> TargetProcess {
    spawn_target_with(backend, deadline_ms, false).await
}

async fn spawn_target_with(backend: BackendKind, deadline_ms: u64, peer_errors: bool) -> TargetProcess {
    let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["target_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("PDKV_TARGET", backend.as_str())
        .env("PDKV_DEADLINE_MS", deadline_ms.to_string());
    if peer_errors {
        // TCP only, as between two hosts without RDMA: a transport both sides share,
        // so the initiator's UCX (ours or NIXL's) cannot pick shared memory or cma,
        // which would write into a stopped process regardless.
        cmd.env("PDKV_PEER_ERRORS", "1").env("UCX_TLS", "tcp");
    }
    TargetProcess::spawn(cmd, Duration::from_secs(30)).await.expect("target starts")
}

fn seed() -> u64 {
    let s = rand::random::<u64>();
    eprintln!("pattern seed {s:#x}");
    s
}

async fn byte_exact(backend: BackendKind) {
    let mut target = spawn_target(backend, 20_000).await;
    let agent = Agent::start(&config(backend, 20_000)).await.unwrap();
    let src = Arc::new(HostBuffer::new(REGION));
    let reg = agent.register(Memory::host(src.clone())).unwrap();
    let peer = agent.connect(&target.metadata, &target.key).await.unwrap();
    let base = seed();
    let mut layouts: Vec<Layout> = [1u64, 7, 4096, 65_537, (1 << 20) + 3, 16 << 20, 256 << 20]
        .into_iter()
        .map(Layout::contiguous)
        .collect();
    // Paged shapes: many blocks, scattered with gaps at the target.
    layouts.push(Layout {
        segments: 64,
        seg_len: 64 << 10,
        dst_stride: 128 << 10,
    });
    layouts.push(Layout {
        segments: 1000,
        seg_len: 4096,
        dst_stride: 3 * 4096,
    });
    layouts.push(Layout {
        segments: 3,
        seg_len: 13,
        dst_stride: 100,
    });
    for (i, layout) in layouts.iter().enumerate() {
        let seed = base.wrapping_add(i as u64);
        let mut bytes = vec![0; layout.src_span() as usize];
        pattern_fill(seed, 0, &mut bytes);
        src.write_at(0, &bytes);
        target.poison().await.unwrap();
        let tag = 1000 + i as u64;
        target.expect(tag, seed, layout, true).await.unwrap();
        let segs = layout.segments(reg.id(), target.region);
        agent
            .write(peer, &segs, tag)
            .await
            .unwrap_or_else(|e| panic!("{backend} write {layout:?}: {e}"));
        assert_eq!(target.outcome().await.unwrap(), Ok(()), "{backend} {layout:?}");
    }
    // A prepared write posted repeatedly: each post lands fresh bytes.
    let layout = Layout {
        segments: 16,
        seg_len: 1 << 16,
        dst_stride: 1 << 17,
    };
    let w = agent.prepare(peer, &layout.segments(reg.id(), target.region)).await.unwrap();
    for round in 0..5u64 {
        let seed = base ^ (round << 32);
        let mut bytes = vec![0; layout.src_span() as usize];
        pattern_fill(seed, 0, &mut bytes);
        src.write_at(0, &bytes);
        target.expect(5000 + round, seed, &layout, true).await.unwrap();
        agent.post(&w, 5000 + round).await.unwrap();
        assert_eq!(target.outcome().await.unwrap(), Ok(()), "{backend} repost {round}");
    }
    drop(w);
    drop(reg);
    assert_eq!(target.exit().await.unwrap(), Some(0), "target exits cleanly");
    agent.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_exact_tcp() {
    byte_exact(BackendKind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_exact_ucx() {
    byte_exact(BackendKind::Ucx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_exact_nixl() {
    byte_exact(BackendKind::Nixl).await;
}

/// A target killed before the write: the initiator gets an error within its deadline.
async fn dead_peer(backend: BackendKind) {
    let deadline_ms = 3000;
    let mut target = spawn_target(backend, deadline_ms).await;
    let agent = Agent::start(&config(backend, deadline_ms)).await.unwrap();
    let src = Arc::new(HostBuffer::new(1 << 20));
    let reg = agent.register(Memory::host(src)).unwrap();
    let peer = agent.connect(&target.metadata, &target.key).await.unwrap();
    let layout = Layout::contiguous(1 << 20);
    // One good write first, so connections are up when the peer dies.
    target.expect(1, 0, &layout, false).await.unwrap();
    agent.write(peer, &layout.segments(reg.id(), target.region), 1).await.unwrap();
    target.outcome().await.unwrap().unwrap();
    target.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let mut failed = None;
    // Some transports only see the loss on the second attempt (the first may be
    // buffered by the kernel); every attempt must end within the deadline.
    for tag in 2..5 {
        match agent.write(peer, &layout.segments(reg.id(), target.region), tag).await {
            Ok(()) => {}
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let e = failed.unwrap_or_else(|| panic!("{backend}: writes to a dead peer kept succeeding"));
    assert!(
        matches!(
            e,
            TransferError::PeerLost { .. }
                | TransferError::Timeout { .. }
                | TransferError::Backend { .. }
                | TransferError::Abandoned { .. }
        ),
        "{backend}: unexpected error {e}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(3 * deadline_ms + 3000),
        "{backend}: error took {:?}",
        t.elapsed()
    );
    agent.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peer_tcp() {
    dead_peer(BackendKind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peer_ucx() {
    dead_peer(BackendKind::Ucx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peer_nixl() {
    dead_peer(BackendKind::Nixl).await;
}

fn signal(target: &TargetProcess, sig: &str) {
    let pid = target.pid().expect("target running").to_string();
    let ok = std::process::Command::new("kill").args([sig, &pid]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid}");
}

/// A target that hangs (SIGSTOP) under a large write: the write ends within its
/// deadline as `Abandoned`, naming a time within LANDING_GRACE until which its bytes
/// may land; its connection was force-closed, so the next write on the same peer
/// fails at once, cleanly (UCX, NIXL: the peer must connect again; tcp opens a fresh
/// connection, which the stopped target cannot answer either). The region's
/// deregistration then completes (synchronously) and shutdown is clean.
async fn hung_peer(backend: BackendKind) {
    let deadline = Duration::from_millis(1500);
    let mut target = spawn_target_with(backend, 20_000, true).await;
    let mut cfg = config(backend, deadline.as_millis() as u64);
    cfg.ucx_peer_error_handling = true;
    let agent = Agent::start(&cfg).await.unwrap();
    let src = Arc::new(HostBuffer::new(REGION));
    let reg = agent.register(Memory::host(src)).unwrap();
    let peer = agent.connect(&target.metadata, &target.key).await.unwrap();
    let small = Layout::contiguous(4096);
    target.expect(1, 0, &small, false).await.unwrap();
    agent.write(peer, &small.segments(reg.id(), target.region), 1).await.unwrap();
    target.outcome().await.unwrap().unwrap();

    signal(&target, "-STOP");
    let big = Layout::contiguous(256 << 20);
    let t = Instant::now();
    let e = agent
        .write(peer, &big.segments(reg.id(), target.region), 2)
        .await
        .expect_err("a 256 MiB write into a stopped process completed");
    let (took, now) = (t.elapsed(), Instant::now());
    let until = e
        .may_land_until()
        .unwrap_or_else(|| panic!("{backend}: a posted write that failed must be abandoned, got: {e}"));
    assert!(matches!(e, TransferError::Abandoned { .. }), "{backend}: {e}");
    // NIXL cannot abort a write: its hold is a long bound, not a force-close's grace.
    let grace = if backend == BackendKind::Nixl {
        Duration::from_secs(60)
    } else {
        LANDING_GRACE
    };
    assert!(
        until > now && until <= now + grace,
        "{backend}: may land until {:?} from now",
        until - now
    );
    assert!(took < deadline + Duration::from_secs(2), "{backend}: the write took {took:?}");

    let t = Instant::now();
    let again = agent.write(peer, &small.segments(reg.id(), target.region), 3).await;
    assert!(again.is_err(), "{backend}: a write to the stopped target succeeded");
    if backend != BackendKind::Tcp {
        let e = again.unwrap_err();
        assert!(e.may_land_until().is_none(), "{backend}: nothing was posted, yet: {e}");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{backend}: a closed endpoint took {:?}",
            t.elapsed()
        );
    }
    signal(&target, "-CONT");
    let t = Instant::now();
    drop(reg);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "{backend}: deregistration took {:?}",
        t.elapsed()
    );
    assert_eq!(agent.registered_regions(), 0);
    target.kill().await.unwrap();
    agent.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_peer_tcp() {
    hung_peer(BackendKind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_peer_ucx() {
    hung_peer(BackendKind::Ucx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_peer_nixl() {
    hung_peer(BackendKind::Nixl).await;
}
