//! The serving core end to end: on-demand KV blocks with preemption on the
//! decode-server, and its prefix cache (only the blocks it lacks travel).
use std::time::Duration;

use e2e::*;
use engine::SamplingParams;
use kv_transfer::BackendKind;
use proto::v1 as pb;
use tonic::Code;

fn prompt(i: u64, len: usize) -> Vec<u32> {
    (0..len as u32).map(|j| 3 + (j * 53 + i as u32 * 29) % 450).collect()
}

fn ask(ids: &[u32], p: &SamplingParams, salt: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        cache_salt: salt.into(),
        ..request(workload::input(ids), p)
    }
}

fn reference(ids: &[u32], p: &SamplingParams) -> Vec<u32> {
    engine::generate_local(reference_engine(), ids, p).unwrap().tokens
}

/// `n` requests at once: prompt i of 40 tokens, 300 tokens out (greedy, or seeded
/// sampling for odd i); each one's outcome.
async fn load(url: &str, n: u64) -> Vec<(Vec<u32>, SamplingParams, Result<(Vec<u32>, pb::GenerateResult), tonic::Status>)> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let ids = prompt(i, 40);
            let p = SamplingParams {
                max_tokens: 300,
                ignore_eos: true,
                temperature: if i % 2 == 1 { 0.8 } else { 0.0 },
                seed: i,
                ..Default::default()
            };
            let mut c = client(&url).await;
            let r = stream(&mut c, ask(&ids, &p, "")).await;
            (ids, p, r)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// A pool too small for every request's reservation (1 MiB: 128 blocks of 16 tokens;
/// 8 requests of 40 + 300 tokens need 176): reserved, the late requests run out of
/// queue time; on demand, every stream completes with the colocated run's tokens,
/// some after a preemption, and every block comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_blocks_preempt_instead_of_failing() {
    let deploy_mode = |mode: &str| {
        deploy_args(pdserve::up::Args {
            queue_deadline_ms: 200,
            kv_allocation: mode.into(),
            // Resumed sequences' KV recomputed over several steps.
            resume_chunk_tokens: 48,
            ..args(BackendKind::Tcp, 1, 1, 1)
        })
    };
    let (dep, _work) = deploy_mode("reserve").await;
    let out = load(&dep.router, 8).await;
    let refused = out
        .iter()
        .filter(|(_, _, r)| matches!(r, Err(s) if s.code() == Code::ResourceExhausted))
        .count();
    assert!(refused > 0, "reserved blocks: some requests must run out of queue time");
    for (ids, p, r) in &out {
        if let Ok((chunks, r)) = r {
            assert_eq!(&r.token_ids, &reference(ids, p));
            assert_eq!(chunks, &r.token_ids);
            assert_eq!(r.preemptions, 0);
        }
    }
    assert_eq!(stats(&dep.decode[0]).await.preemptions, 0);
    assert_all_blocks_free(&dep.decode[0]).await;
    stop_cleanly(dep).await;

    let (dep, _work) = deploy_mode("on_demand").await;
    let out = load(&dep.router, 8).await;
    let mut preempted = 0;
    for (ids, p, r) in &out {
        let (chunks, r) = r.as_ref().unwrap_or_else(|s| panic!("on demand, request failed: {s:?}"));
        assert_eq!(&r.token_ids, &reference(ids, p), "tokens after {} preemptions", r.preemptions);
        assert_eq!(chunks, &r.token_ids);
        preempted += r.preemptions;
    }
    let s = stats(&dep.decode[0]).await;
    assert!(preempted > 0, "the pool could not hold every sequence: some were preempted");
    assert_eq!(s.preemptions, u64::from(preempted));
    assert_eq!(s.preempted, 0);
    assert_all_blocks_free(&dep.decode[0]).await;
    stop_cleanly(dep).await;
}

/// A sequence that fills the whole pool alone (40 + 2,000 tokens: all 128 blocks) runs
/// beside two of 40 + 900 (59 blocks each) sent before it: the pool runs out at about
/// 680 tokens each; it is the newest, so it is the one preempted, and it resumes (its
/// KV recomputed in chunks) once they are done, with nothing running beside it; every
/// one streams the colocated run's tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_as_large_as_the_pool_is_preempted_and_resumes() {
    let (dep, _work) = deploy_args(args(BackendKind::Tcp, 1, 1, 1)).await;
    let mut tasks = Vec::new();
    for (i, max_tokens) in [(1u64, 900u32), (2, 900), (3, 2000)] {
        let url = dep.router.clone();
        tasks.push(tokio::spawn(async move {
            let ids = prompt(i, 40);
            let p = SamplingParams {
                max_tokens,
                ignore_eos: true,
                ..Default::default()
            };
            let r = stream(&mut client(&url).await, ask(&ids, &p, "")).await;
            (ids, p, r)
        }));
        // The big one last: the newest.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        let (ids, p, r) = t.await.unwrap();
        let (_, r) = r.unwrap_or_else(|s| panic!("{} tokens out: {s:?}", p.max_tokens));
        assert_eq!(r.token_ids, reference(&ids, &p), "{} tokens out", p.max_tokens);
    }
    let s = stats(&dep.decode[0]).await;
    assert!(s.preemptions > 0, "the pool cannot hold them all: {s:?}");
    assert_all_blocks_free(&dep.decode[0]).await;
    stop_cleanly(dep).await;
}

/// Clients that go away while their sequences are preempted (or running) free
/// everything, at once: their streams end long before the 300 tokens they asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_clients_of_preempted_sequences_leave_nothing() {
    let metrics_port = pdserve::up::free_port_run(3).unwrap();
    let (dep, _work) = deploy_args(pdserve::up::Args {
        metrics_port: Some(metrics_port),
        ..args(BackendKind::Tcp, 1, 1, 1)
    })
    .await;
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..8 {
        let url = dep.router.clone();
        streams.spawn(async move {
            let p = SamplingParams {
                max_tokens: 300,
                ignore_eos: true,
                ..Default::default()
            };
            stream(&mut client(&url).await, ask(&prompt(i, 40), &p, "")).await
        });
    }
    let decode = dep.decode[0].clone();
    workload::until("a sequence is preempted", Duration::from_secs(60), || async {
        stats(&decode).await.preempted > 0
    })
    .await;
    streams.abort_all();
    while let Some(r) = streams.join_next().await {
        assert!(r.is_err_and(|e| e.is_cancelled()), "the stream was cut, not finished");
    }
    assert_all_blocks_free(&dep.decode[0]).await;
    let s = stats(&dep.decode[0]).await;
    assert_eq!(s.preempted, 0);
    let cancelled = sample(&scrape(metrics_port + 1), "pdserve_requests_cancelled_total", &[]).unwrap_or(0.0);
    assert!(cancelled >= 8.0, "{cancelled} requests cancelled");
    // And it serves the next request exactly.
    let mut c = client(&dep.router).await;
    let p = workload::params(3);
    let (_, r) = stream(&mut c, ask(&workload::prompt(3), &p, "")).await.unwrap();
    assert_eq!(r.token_ids, workload::reference(3));
    stop_cleanly(dep).await;
}

/// The decode-server's prefix cache: a prompt seen before has its leading full blocks
/// here already, and only the rest travel; a longer prompt sharing them sends only
/// its new blocks; another salt shares nothing. Tokens equal the colocated run's.
async fn only_missing_blocks_travel(backend: BackendKind) {
    let (dep, _work) = deploy(backend, 1, 1, 16).await;
    let c = client(&dep.router).await;
    let p = SamplingParams {
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    let a = prompt(1, 100); // 6 full blocks and 4 tokens
    let run = |ids: Vec<u32>, salt: &'static str| {
        let mut c = c.clone();
        let p = p.clone();
        async move {
            let (chunks, r) = stream(&mut c, ask(&ids, &p, salt)).await.unwrap();
            assert_eq!(r.token_ids, reference(&ids, &p), "{salt:?}, {} tokens", ids.len());
            assert_eq!(chunks, r.token_ids);
            assert_ne!(r.prefill_server, "local");
            r
        }
    };
    let first = run(a.clone(), "").await;
    assert_eq!(first.decode_cached_tokens, 0);
    let bytes = first.timings.as_ref().unwrap().kv_bytes;
    assert!(bytes > 0 && bytes % 7 == 0, "7 blocks travel: {bytes} bytes");
    let block = bytes / 7;
    let again = run(a.clone(), "").await;
    assert_eq!(again.decode_cached_tokens, 96);
    assert_eq!(again.timings.as_ref().unwrap().kv_bytes, block, "only the last block travels");
    let mut longer = a.clone();
    longer.extend(prompt(2, 40)); // 140 tokens: 9 blocks, 6 held
    let more = run(longer, "").await;
    assert_eq!(more.decode_cached_tokens, 96);
    assert_eq!(more.timings.as_ref().unwrap().kv_bytes, 3 * block);
    let other = run(a, "another tenant").await;
    assert_eq!(other.decode_cached_tokens, 0);
    assert_eq!(other.timings.as_ref().unwrap().kv_bytes, bytes);
    let s = stats(&dep.decode[0]).await;
    assert!(s.cached_blocks >= 6 + 2 + 6, "{} blocks cached", s.cached_blocks);
    drop(c);
    assert_all_blocks_free(&dep.decode[0]).await;
    stop_cleanly(dep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_missing_blocks_travel_tcp() {
    only_missing_blocks_travel(BackendKind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_missing_blocks_travel_ucx() {
    only_missing_blocks_travel(BackendKind::Ucx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_missing_blocks_travel_nixl() {
    only_missing_blocks_travel(BackendKind::Nixl).await;
}

/// Without prefix caching every block travels every time; a prompt the decode-server
/// prefills itself computes only what its cache lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caching_off_sends_everything_and_local_prefills_use_the_cache() {
    let p = SamplingParams {
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    let a = prompt(5, 100);
    let want = reference(&a, &p);
    let mut off = args(BackendKind::Tcp, 1, 1, 16);
    off.placement.no_prefix_caching = true;
    let (dep, _work) = deploy_args(off).await;
    let mut c = client(&dep.router).await;
    let mut sizes = Vec::new();
    for _ in 0..2 {
        let (_, r) = stream(&mut c, ask(&a, &p, "")).await.unwrap();
        assert_eq!(r.token_ids, want);
        assert_eq!((r.decode_cached_tokens, r.cached_tokens), (0, 0));
        sizes.push(r.timings.unwrap().kv_bytes);
    }
    assert_eq!(sizes[0], sizes[1]);
    assert_eq!(stats(&dep.decode[0]).await.cached_blocks, 0);
    stop_cleanly(dep).await;

    let (dep, _work) = deploy_full(BackendKind::Tcp, 1, 1, 16, 30_000, 1_000).await;
    let mut c = client(&dep.router).await;
    let mut cached = Vec::new();
    for _ in 0..2 {
        let (_, r) = stream(&mut c, ask(&a, &p, "")).await.unwrap();
        assert_eq!(r.token_ids, want);
        assert_eq!(r.prefill_server, "local");
        cached.push((r.cached_tokens, r.decode_cached_tokens));
    }
    assert_eq!(cached, [(0, 0), (96, 96)]);
    stop_cleanly(dep).await;
}

/// Prompts arriving together share forward passes, long ones cut into chunks: 12
/// requests at once (prompts of 20 to 295 tokens) through passes of at most 256 tokens
/// and chunks of 64 get the colocated run's tokens; the prefill-server's metrics show
/// passes of several prompts, none over the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_are_prefilled_in_shared_chunked_passes() {
    let metrics_port = pdserve::up::free_port_run(3).unwrap();
    let (dep, _work) = deploy_args(pdserve::up::Args {
        metrics_port: Some(metrics_port),
        max_batch_tokens: 256,
        chunk_tokens: 64,
        ..args(BackendKind::Tcp, 1, 1, 16)
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..12u64 {
        let url = dep.router.clone();
        tasks.push(tokio::spawn(async move {
            let ids = prompt(i, 20 + 25 * i as usize);
            let p = SamplingParams {
                max_tokens: 6,
                ignore_eos: true,
                temperature: if i % 3 == 0 { 0.7 } else { 0.0 },
                seed: i,
                ..Default::default()
            };
            let mut c = client(&url).await;
            let (_, r) = stream(&mut c, ask(&ids, &p, "")).await.unwrap();
            assert_eq!(r.token_ids, reference(&ids, &p), "prompt {i} of {} tokens", ids.len());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let text = scrape(metrics_port + 2);
    let passes = sample(&text, "pdserve_prefill_batch_prompts_count", &[]).unwrap();
    let single = sample(&text, "pdserve_prefill_batch_prompts_bucket", &["le=\"1\""]).unwrap();
    let within = sample(&text, "pdserve_prefill_batch_tokens_bucket", &["le=\"256\""]).unwrap();
    let chunks = sample(&text, "pdserve_prefill_batch_prompts_sum", &[]).unwrap();
    assert!(single < passes, "some pass computed several prompts ({single} of {passes} had one)");
    assert_eq!(within, passes, "no pass over max_batch_tokens");
    // 12 prompts of 1,890 tokens in all, in chunks of at most 64: at least 36 chunks.
    assert!(chunks >= 36.0, "{chunks} chunks");
    assert_all_blocks_free(&dep.decode[0]).await;
    stop_cleanly(dep).await;
}
