//! Faults under load, with real daemons. Every request ends with either the colocated
//! run's exact tokens or a clear gRPC error, never wrong tokens; afterwards every KV
//! block is free and the deployment answers a normal request correctly.
use std::sync::Arc;
use std::time::Duration;

use e2e::workload::{clear, input, params, prompt, reference, until};
use e2e::{assert_all_blocks_free, client, request, stream};
use kv_transfer::BackendKind;
use rand::{Rng, SeedableRng};
use tokio_stream::StreamExt;

/// 500 clients that go away at random points (before the first token, mid-stream,
/// after a random delay), eight at a time, through each backend: nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_go_away_at_random_points_leak_nothing() {
    for backend in [BackendKind::Tcp, BackendKind::Ucx] {
        let (dep, _work) = e2e::deploy(backend, 1, 1, 8).await;
        let c = client(&dep.router).await;
        let mut tasks = tokio::task::JoinSet::new();
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for w in 0..8u64 {
            let (mut c, done) = (c.clone(), done.clone());
            tasks.spawn(async move {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(w);
                for k in 0..(500 / 8 + 1) {
                    let i = w * 1000 + k;
                    let req = request(input(&prompt(i)), &params(i));
                    match rng.random_range(0..3) {
                        // Gone before the answer starts, or after a random moment.
                        0 => {
                            let wait = Duration::from_micros(rng.random_range(0..20_000));
                            let _ = tokio::time::timeout(wait, c.generate(req)).await;
                        }
                        // Gone after a few chunks.
                        1 => {
                            let chunks = rng.random_range(0..4);
                            if let Ok(r) = c.generate(req).await {
                                let mut s = r.into_inner();
                                for _ in 0..chunks {
                                    if s.next().await.is_none() {
                                        break;
                                    }
                                }
                            }
                        }
                        // Stays to the end: the answer is exact.
                        _ => {
                            let (tokens, _) = stream(&mut c, req).await.unwrap();
                            assert_eq!(tokens, reference(i), "request {i}");
                        }
                    }
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        assert!(done.load(std::sync::atomic::Ordering::Relaxed) >= 500);
        assert_all_blocks_free(&dep.decode[0]).await;
        let mut c = client(&dep.router).await;
        let (tokens, _) = stream(&mut c, request(input(&prompt(7)), &params(7))).await.unwrap();
        assert_eq!(tokens, reference(7), "{backend:?}: after the storm");
        for (name, code) in dep.stop().await {
            assert_eq!(code, Some(0), "{backend:?}: {name} exits 0");
        }
    }
}

/// Kills `name` (a daemon `pdserve up` started, from `bin`) with SIGKILL at a random
/// moment while four requests run, then starts it again from its config, `rounds`
/// times; `ready` waits until it serves again before each round. Every request ends
/// with the colocated run's exact tokens or a clear error. Returns (exact, failed) and
/// the restarted daemon (killed when dropped).
async fn kill_under_load<F, Fut>(
    dep: &mut pdserve::up::Deployment,
    work: &std::path::Path,
    (name, bin): (&str, &str),
    rounds: u64,
    seed: u64,
    ready: F,
) -> (usize, usize, Option<tokio::process::Child>)
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let c = client(&dep.router).await;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut victim: Option<tokio::process::Child> = None;
    let router_killed = name == "router";
    for round in 0..rounds {
        ready(round).await;
        let mut load = tokio::task::JoinSet::new();
        for j in 0..4u64 {
            let mut c = c.clone();
            let i = round * 10 + j;
            load.spawn(async move {
                match stream(&mut c, request(input(&prompt(i)), &params(i))).await {
                    Ok((tokens, r)) => {
                        assert_eq!(tokens, reference(i), "request {i} got wrong tokens");
                        assert_eq!(r.token_ids, tokens);
                        true
                    }
                    // The router itself killed: the client's own connection breaks
                    // (its transport's status), which is as clear as it gets.
                    Err(s) => {
                        let link_died = router_killed && daemon::status::transport_made(&s);
                        assert!(clear(s.code()) || link_died, "request {i}: {s:?}");
                        false
                    }
                }
            });
        }
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..15_000))).await;
        // The first time, the process `pdserve up` started; then our restarted one.
        let child = match victim.as_mut() {
            Some(c) => c,
            None => dep.child_mut(name).unwrap(),
        };
        let pid = child.id().unwrap() as i32;
        // SAFETY: killing our own child process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = child.wait().await;
        while let Some(r) = load.join_next().await {
            if r.unwrap() {
                ok += 1;
            } else {
                failed += 1;
            }
        }
        victim = Some(
            tokio::process::Command::new(pdserve::up::binary(bin).unwrap())
                .arg("--config")
                .arg(work.join(format!("{name}.toml")))
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
    }
    (ok, failed, victim)
}

/// Two prefill-servers; one is killed with SIGKILL at a random moment under load and
/// started again, 50 times. Requests move to the other one; none gets wrong tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_server_killed_mid_write_fifty_times() {
    let (mut dep, work) = e2e::deploy(BackendKind::Tcp, 2, 1, 16).await;
    let decode = dep.decode[0].clone();
    // Both prefill-servers in use again (the restarted one handshaken), so the kill
    // finds work on it.
    let ready = |round| {
        let decode = decode.clone();
        async move {
            let msg = format!("round {round}: prefill-0 never came back");
            until(&msg, Duration::from_secs(20), || async {
                e2e::stats(&decode).await.healthy_prefill_servers >= 2
            })
            .await;
        }
    };
    let (ok, failed, restarted) = kill_under_load(&mut dep, work.path(), ("prefill-0", "prefill-server"), 50, 50, ready).await;
    // The kills landed on requests in flight: the decode-server saw prefills fail (and
    // moved them), not only idle restarts.
    let log = std::fs::read_to_string(work.path().join("decode-0.log")).unwrap();
    let moved = log.matches("prefill-server failed; marking it unhealthy").count();
    eprintln!("{ok} answered exactly, {failed} failed with a clear error; {moved} prefills failed under a kill");
    assert!(moved > 0, "no kill landed on a prefill in flight");
    // Most requests survive by moving to prefill-1 (a failure needs both attempts lost).
    assert!(ok > failed, "{ok} answered, {failed} failed");
    assert_all_blocks_free(&decode).await;
    let mut c = client(&dep.router).await;
    let (tokens, _) = stream(&mut c, request(input(&prompt(3)), &params(3))).await.unwrap();
    assert_eq!(tokens, reference(3), "after fifty kills");
    drop(restarted);
    let _ = dep.stop().await;
}

/// Two decode-servers behind the router; one is SIGKILLed at a random moment under load
/// and started again, 10 times. Its requests end with a clear error (never wrong
/// tokens, never UNKNOWN); the others answer exactly; the restarted one serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_server_killed_under_load_ten_times() {
    let (mut dep, work) = e2e::deploy(BackendKind::Tcp, 1, 2, 16).await;
    let decode0 = dep.decode[0].clone();
    let serving = || async { pdserve::up::serving(&decode0, "pdserve.v1.Generation").await };
    // Both decode-servers serving again before the next kill.
    let ready = |round| async move {
        until(
            &format!("round {round}: decode-0 never came back"),
            Duration::from_secs(30),
            serving,
        )
        .await
    };
    let (ok, failed, restarted) = kill_under_load(&mut dep, work.path(), ("decode-0", "decode-server"), 10, 10, ready).await;
    eprintln!("{ok} answered exactly, {failed} failed with a clear error");
    assert!(ok > 0);
    assert_all_blocks_free(&dep.decode[1]).await;
    until("decode-0 never came back", Duration::from_secs(30), serving).await;
    assert_all_blocks_free(&decode0).await;
    let mut c = client(&dep.router).await;
    for i in 0..4 {
        let (tokens, _) = stream(&mut c, request(input(&prompt(i)), &params(i))).await.unwrap();
        assert_eq!(tokens, reference(i), "after ten kills");
    }
    drop(restarted);
    let _ = dep.stop().await;
}

/// The router SIGKILLed at a random moment under load and started again, 10 times:
/// its requests end with a clear error (never wrong tokens); the decode-server sees
/// their calls go and frees their blocks; the restarted router answers exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_killed_and_restarted_under_load_ten_times() {
    let (mut dep, work) = e2e::deploy(BackendKind::Tcp, 1, 1, 16).await;
    let router = dep.router.clone();
    let serving = || async { pdserve::up::serving(&router, "pdserve.v1.Generation").await };
    let ready = |round| async move {
        until(
            &format!("round {round}: the router never came back"),
            Duration::from_secs(30),
            serving,
        )
        .await
    };
    let (ok, failed, restarted) = kill_under_load(&mut dep, work.path(), ("router", "router"), 10, 20, ready).await;
    eprintln!("{ok} answered exactly, {failed} failed with a clear error");
    assert!(failed > 0, "no kill landed on a request in flight");
    assert_all_blocks_free(&dep.decode[0]).await;
    until("the router never came back", Duration::from_secs(30), serving).await;
    let mut c = client(&dep.router).await;
    for i in 0..4 {
        let (tokens, _) = stream(&mut c, request(input(&prompt(i)), &params(i))).await.unwrap();
        assert_eq!(tokens, reference(i), "after ten router kills");
    }
    drop(restarted);
    let _ = dep.stop().await;
}
