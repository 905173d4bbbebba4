//! Overload and faults with real daemons: a full line for KV blocks is refused at once
//! (with a retry hint), a client that goes away leaves the line and is counted, a
//! router past `max_inflight` refuses at once, and a hung prefill-server (SIGSTOP)
//! costs its requests nothing but a clear error: after SIGCONT every block is free and
//! the deployment answers correctly.
use std::time::{Duration, Instant};

use e2e::{Daemon, free_port, reference_engine, request, sample, scrape, start_daemon, stream};
use engine::SamplingParams;
use kv_transfer::BackendKind;
use proto::v1 as pb;
use tokio_stream::StreamExt;

fn ids(n: u32, salt: u32) -> pb::generate_request::Input {
    pb::generate_request::Input::TokenIds(pb::TokenIds {
        ids: (0..n).map(|i| 3 + (i * 31 + salt) % 400).collect(),
    })
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

async fn wait_serving(url: &str, d: &mut Daemon) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pdserve::up::serving(url, "pdserve.v1.Generation").await {
        assert!(d.0.try_wait().unwrap().is_none(), "{url} exited");
        assert!(Instant::now() < deadline, "{url} not serving");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metric(port: u16, name: &str, labels: &[&str]) -> f64 {
    sample(&scrape(port), name, labels).unwrap_or(0.0)
}

/// A deployment whose decode-server has 128 blocks of 16 tokens (the tiny model at
/// 1 MiB), reserved at admission, and `max_waiting = 1`, prefilling prompts under 30
/// tokens itself. A, a long
/// prompt, holds 90 blocks while its prefill-server is stopped (SIGSTOP): deterministic,
/// whatever the machine's speed. B (short, 89 blocks) waits in line; C is refused at once;
/// B's client goes away and D takes the line and answers right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_line_is_refused_at_once_and_a_client_that_goes_away_leaves_it() {
    let metrics_port = pdserve::up::free_port_run(3).unwrap();
    let (mut dep, _work) = e2e::deploy_args(pdserve::up::Args {
        metrics_port: Some(metrics_port),
        local_prefill_below: 30,
        max_waiting: 1,
        queue_deadline_ms: 60_000,
        no_early_prefill: true,
        kv_allocation: "reserve".into(),
        ..e2e::args(BackendKind::Tcp, 1, 1, 1)
    })
    .await;
    let metrics = metrics_port + 1;
    let url = dep.decode[0].clone();
    let pid = dep.child_mut("prefill-0").unwrap().id().unwrap() as i32;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let mut c = e2e::client(&url).await;
    let a = c.generate(request(ids(40, 1), &greedy(1400))).await.unwrap().into_inner();
    let deadline = Instant::now() + Duration::from_secs(10);
    while e2e::stats(&url).await.free_blocks > 40 {
        assert!(Instant::now() < deadline, "A never got its blocks");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = c.generate(request(ids(10, 2), &greedy(1400))).await.unwrap().into_inner();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(metrics, "pdserve_num_requests_waiting", &[]) < 2.0 {
        assert!(Instant::now() < deadline, "B never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // C finds the line full: refused at once, with a retry hint.
    let t = Instant::now();
    let mut s = c.generate(request(ids(10, 3), &greedy(1400))).await.unwrap().into_inner();
    let refused = s.next().await.unwrap().unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(t.elapsed() < Duration::from_secs(1), "refused after {:?}", t.elapsed());
    assert!(refused.message().contains("max_waiting"), "{}", refused.message());
    assert_eq!(refused.metadata().get(daemon::metrics::RETRY_AFTER_MS).unwrap(), "1000");
    assert_eq!(metric(metrics, "pdserve_requests_rejected_total", &["queue_full"]), 1.0);
    // Through the router's HTTP API: 429 with the hint as `retry-after` (seconds).
    let body = format!(
        r#"{{"model": "{}", "prompt": [5, 6, 7], "max_tokens": 1400, "ignore_eos": true}}"#,
        dep.model_name
    );
    let out = std::process::Command::new("curl")
        .args(["-s", "-i", "--max-time", "20", "-H", "Content-Type: application/json", "-d", &body])
        .arg(format!("{}/completions", dep.openai))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.starts_with("http/1.1 429"), "{text}");
    assert!(text.contains("retry-after: 1\r\n") && text.contains("max_waiting"), "{text}");
    // B's client goes away: B leaves the line (counted), and D can take its place.
    let gone = Instant::now();
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(2);
    while metric(metrics, "pdserve_requests_cancelled_total", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "the cancellation was not seen within 2 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A figure, not a bound (CI's 2 cores vary): the issue asks for 100 ms.
    eprintln!(
        "a queued request's cancellation counted {:?} after its client went away",
        gone.elapsed()
    );
    let d_prompt: Vec<u32> = (0..12).map(|i| 3 + (i * 31 + 4) % 400).collect();
    let want = engine::generate_local(reference_engine(), &d_prompt, &greedy(40)).unwrap();
    let (tokens, r) = stream(&mut c, request(ids(12, 4), &greedy(40))).await.unwrap();
    assert_eq!((tokens, r.token_ids), (want.tokens.clone(), want.tokens), "D");
    drop(a);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    e2e::assert_all_blocks_free(&url).await;
    for (name, code) in dep.stop().await {
        assert_eq!(code, Some(0), "{name} exits 0");
    }
}

/// Sends `input` until it is no longer refused (within 5 s); it must then be answered.
async fn admitted_again(c: &mut pb::generation_client::GenerationClient<tonic::transport::Channel>, input: pb::generate_request::Input) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match stream(c, request(input.clone(), &greedy(4))).await {
            Ok((t, _)) => {
                assert_eq!(t.len(), 4);
                return;
            }
            Err(s) if s.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("{s:?}"),
        }
    }
}

/// A router with `max_inflight = 1` in front of a deployment: a second request while
/// one streams is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_past_max_inflight_refuses_at_once() {
    let (mut dep, work) = e2e::deploy(BackendKind::Tcp, 1, 1, 64).await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let cfg = format!(
        "listen = \"127.0.0.1:{port}\"\nmax_inflight = 1\ndecode_servers = [{:?}]\n",
        dep.decode[0]
    );
    let mut r = start_daemon("router", work.path(), "router-small", &cfg);
    wait_serving(&url, &mut r).await;
    // The router serves once it has seen the decode-server healthy.
    let mut c = e2e::client(&url).await;
    // The held request hangs in its prefill (the prefill-server is stopped): in flight
    // for as long as the test needs, on any machine.
    let pid = dep.child_mut("prefill-0").unwrap().id().unwrap() as i32;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let held = c.generate(request(ids(10, 5), &greedy(4))).await.unwrap().into_inner();
    let t = Instant::now();
    let refused = c.generate(request(ids(10, 6), &greedy(4))).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("max_inflight"), "{}", refused.message());
    assert!(t.elapsed() < Duration::from_millis(500));
    // A router that sheds on time to first token (100 ms): while requests wait for
    // their first token longer than that and none comes faster, new ones are refused
    // at once; once the line drains, admitted again.
    let shed_port = free_port();
    let shed_url = format!("http://127.0.0.1:{shed_port}");
    let cfg = format!(
        "listen = \"127.0.0.1:{shed_port}\"\nshed_ttft_ms = 100\ndecode_servers = [{:?}]\n",
        dep.decode[0]
    );
    let mut shed_router = start_daemon("router", work.path(), "router-shed", &cfg);
    wait_serving(&shed_url, &mut shed_router).await;
    let mut sc = e2e::client(&shed_url).await;
    // Two wait (a line of one is no queue).
    let waiting = [
        sc.generate(request(ids(10, 8), &greedy(4))).await.unwrap().into_inner(),
        sc.generate(request(ids(10, 11), &greedy(4))).await.unwrap().into_inner(),
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let shed = sc.generate(request(ids(10, 9), &greedy(4))).await.unwrap_err();
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("shed_ttft_ms"), "{}", shed.message());
    assert!(t.elapsed() < Duration::from_millis(500), "shed after {:?}", t.elapsed());
    drop(waiting);
    drop(held);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    // The slot comes back when the stream ends.
    admitted_again(&mut c, ids(10, 7)).await;
    // The shedding router's line drains (its waiting request was dropped): it admits.
    admitted_again(&mut sc, ids(10, 10)).await;
    drop(shed_router);
    drop(r);
    dep.stop().await;
}

/// A hung prefill-server (SIGSTOP, not dead): a client that gives up cancels its
/// request at the decode-server (counted); the blocks are held only until no write
/// can land; after SIGCONT the deployment answers with the reference's tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_prefill_server_costs_a_clear_error_and_nothing_else() {
    let metrics_port = pdserve::up::free_port_run(3).unwrap();
    let (mut dep, _work) = e2e::deploy_args(pdserve::up::Args {
        metrics_port: Some(metrics_port),
        ..e2e::args(BackendKind::Tcp, 1, 1, 64)
    })
    .await;
    // pdserve up: router at metrics_port, decode-0 at +1, prefill-0 at +2.
    let decode_metrics = metrics_port + 1;
    let pid = dep.child_mut("prefill-0").unwrap().id().unwrap() as i32;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let mut c = e2e::client(&dep.router).await;
    let gave_up = tokio::time::timeout(Duration::from_millis(700), stream(&mut c, request(ids(20, 8), &greedy(8)))).await;
    assert!(gave_up.is_err(), "no answer can come from a stopped prefill-server");
    let deadline = Instant::now() + Duration::from_secs(3);
    while metric(decode_metrics, "pdserve_requests_cancelled_total", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "the decode-server did not see the client go");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A write of that request could still land: its blocks are held, not reused.
    assert!(metric(decode_metrics, "pdserve_kv_blocks_quarantined", &[]) > 0.0);
    let s = e2e::stats(&dep.decode[0]).await;
    assert!(s.free_blocks < s.total_blocks, "the cancelled prefill's blocks were freed at once");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    e2e::assert_all_blocks_free(&dep.decode[0]).await;
    assert_eq!(metric(decode_metrics, "pdserve_kv_blocks_quarantined", &[]), 0.0);
    let want = engine::generate_local(
        reference_engine(),
        &(0..20).map(|i| 3 + (i * 31 + 9) % 400).collect::<Vec<_>>(),
        &greedy(8),
    )
    .unwrap();
    let (tokens, r) = stream(&mut c, request(ids(20, 9), &greedy(8))).await.unwrap();
    assert_eq!((tokens, r.token_ids), (want.tokens.clone(), want.tokens));
    for (name, code) in dep.stop().await {
        assert_eq!(code, Some(0), "{name} exits 0");
    }
}
