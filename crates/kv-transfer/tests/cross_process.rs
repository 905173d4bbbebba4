//! Real two-process transfers through every backend: the test binary re-executes
//! itself as the target (`target_child`), which checks the bytes that arrived.
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_transfer::bench::{Layout, TargetProcess, pattern_fill};
use kv_transfer::{Agent, BackendKind, HostBuffer, Memory, TransferConfig, TransferError};

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
    let agent = Agent::start(&config(backend.parse().unwrap(), deadline))
        .await
        .expect("target agent");
    kv_transfer::bench::serve_host_target(&agent, REGION, Duration::from_millis(deadline))
        .await
        .expect("serve");
    agent.shutdown();
    kv_transfer::exit_now(0);
}

async fn spawn_target(backend: BackendKind, deadline_ms: u64) -> TargetProcess {
    let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["target_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("PDKV_TARGET", backend.as_str())
        .env("PDKV_DEADLINE_MS", deadline_ms.to_string());
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
    let peer = agent.connect(&target.metadata).unwrap();
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
    let w = agent.prepare(peer, &layout.segments(reg.id(), target.region)).unwrap();
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
    let peer = agent.connect(&target.metadata).unwrap();
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
            TransferError::PeerLost { .. } | TransferError::Timeout { .. } | TransferError::Backend { .. }
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
