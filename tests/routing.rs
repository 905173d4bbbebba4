//! KV-aware routing with real daemons: the router follows every worker's KV events,
//! sends each conversation's next turn to the prefill-server holding its history, and
//! its view of the workers' caches follows their evictions and restarts.
use std::time::Duration;

use e2e::workload::until;
use e2e::*;
use engine::SamplingParams;
use kv_transfer::BackendKind;
use proto::v1 as pb;
use proto::v1::generate_request::Input;

/// The deployment's metrics ports: the router's, each decode-server's, each prefill-server's.
struct Ports {
    router: u16,
    prefill: Vec<u16>,
}

async fn deploy_kv_aware(prefill: usize, decode: usize, kv_cache_mib: u64) -> (pdserve::up::Deployment, tempfile::TempDir, Ports) {
    deploy_routed("kv_aware", prefill, decode, kv_cache_mib).await
}

async fn deploy_routed(
    routing: &str,
    prefill: usize,
    decode: usize,
    kv_cache_mib: u64,
) -> (pdserve::up::Deployment, tempfile::TempDir, Ports) {
    let port = free_port_run(1 + (prefill + decode) as u16);
    let (dep, work) = deploy_args(pdserve::up::Args {
        metrics_port: Some(port),
        routing: routing.into(),
        ..args(BackendKind::Tcp, prefill, decode, kv_cache_mib)
    })
    .await;
    let ports = Ports {
        router: port,
        prefill: (0..prefill).map(|i| port + 1 + (decode + i) as u16).collect(),
    };
    (dep, work, ports)
}

/// The router's view of prefill-server `i`'s cache (blocks indexed).
fn router_view(ports: &Ports, dep: &pdserve::up::Deployment, i: usize) -> Option<f64> {
    let url = format!("worker=\"{}\"", dep.prefill[i]);
    sample(&scrape(ports.router), "pdserve_router_kv_index_blocks", &["role=\"prefill\"", &url])
}

/// The router's view of prefill-server `i`'s cache, and the server's own count.
fn views(ports: &Ports, dep: &pdserve::up::Deployment, i: usize) -> (Option<f64>, Option<f64>) {
    let worker = sample(&scrape(ports.prefill[i]), "pdserve_kv_blocks_cached", &[]);
    (router_view(ports, dep, i), worker)
}

/// Sends `sig` to the deployment's daemon `name`.
fn signal(dep: &mut pdserve::up::Deployment, name: &str, sig: i32) {
    let pid = dep.child_mut(name).unwrap().id().unwrap() as i32;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, sig) };
}

/// Rewrites the router's config file with `edit`, sends SIGHUP, and waits until its log
/// says `logged` once more than before.
async fn reload_router(dep: &mut pdserve::up::Deployment, work: &std::path::Path, edit: impl FnOnce(String) -> String, logged: &str) {
    let (path, log) = (work.join("router.toml"), work.join("router.log"));
    let said = || std::fs::read_to_string(&log).unwrap_or_default().matches(logged).count();
    let before = said();
    std::fs::write(&path, edit(std::fs::read_to_string(&path).unwrap())).unwrap();
    signal(dep, "router", libc::SIGHUP);
    until(&format!("the router logs {logged:?}"), Duration::from_secs(10), || async {
        said() > before
    })
    .await;
}

/// Waits until the router's index holds exactly what each prefill-server caches.
async fn views_agree(ports: &Ports, dep: &pdserve::up::Deployment, what: &str) {
    until(what, Duration::from_secs(10), || async {
        (0..dep.prefill.len()).all(|i| {
            let (r, w) = views(ports, dep, i);
            r.is_some() && r == w.or(Some(0.0))
        })
    })
    .await;
}

fn ids(tokens: &[u32]) -> Input {
    Input::TokenIds(pb::TokenIds { ids: tokens.to_vec() })
}

/// Four conversations of four turns, interleaved (turn 1 of each, then turn 2 of each,
/// ...), each turn its history, the answer it got and a new question. Every turn after
/// the first goes to the prefill-server of the conversation's first turn and finds its
/// whole history's full blocks cached; tokens equal the colocated run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_turn_goes_where_its_conversation_lives() {
    let (dep, _work, ports) = deploy_kv_aware(2, 2, 64).await;
    let mut c = client(&dep.router).await;
    let params = SamplingParams {
        max_tokens: 6,
        ignore_eos: true,
        ..Default::default()
    };
    let mut history: Vec<Vec<u32>> = (0..4u32).map(|c| (0..40).map(|j| 3 + (j * 13 + c * 101) % 480).collect()).collect();
    let mut home: Vec<Option<String>> = vec![None; 4];
    let bs = 16;
    views_agree(&ports, &dep, "the router follows every prefill-server").await;
    for turn in 0..4u32 {
        for conv in 0..4 {
            let prompt = history[conv].clone();
            let want = engine::generate_local(reference_engine(), &prompt, &params).unwrap().tokens;
            let (_, r) = stream(&mut c, request(ids(&prompt), &params)).await.unwrap();
            assert_eq!(
                r.token_ids, want,
                "conversation {conv} turn {turn}: tokens differ from the colocated run"
            );
            match &home[conv] {
                None => home[conv] = Some(r.prefill_server.clone()),
                Some(h) => {
                    assert_eq!(&r.prefill_server, h, "conversation {conv} turn {turn} left its prefill-server");
                    // The last turn's prompt, in whole blocks, was cached there.
                    let last_len = prompt.len() - 6 - 9;
                    assert_eq!(
                        r.cached_tokens as usize,
                        last_len / bs * bs,
                        "conversation {conv} turn {turn}: cached tokens"
                    );
                }
            }
            history[conv].extend(&r.token_ids);
            history[conv].extend((0..9).map(|j| 3 + (j * 7 + turn * 31 + conv as u32) % 480));
            views_agree(&ports, &dep, "the router's index equals the prefill-servers' caches").await;
        }
    }
    // The first turns spread over both prefill-servers (no overlap anywhere: by load).
    home.sort();
    home.dedup();
    assert_eq!(home.len(), 2, "{home:?}");
    let m = scrape(ports.router);
    let hit = sample(&m, "pdserve_router_kv_hit_rate", &[]).unwrap();
    assert!(hit > 0.5 && hit < 1.0, "router hit rate {hit}");
    assert!(sample(&m, "pdserve_router_overlap_blocks_total", &[]).unwrap() >= 12.0 * 3.0);
    // Text and chat prompts: the router tokenizes them with the model's tokenizer and
    // template (as the decode-server will), so a repeated one finds its home too.
    let text = Input::Text("the router reads this prompt with the model's own tokenizer, ".repeat(4));
    let chat = Input::Chat(pb::Chat {
        messages: vec![pb::ChatMessage {
            role: "user".into(),
            content: "a conversation the router renders with the chat template, ".repeat(4),
        }],
    });
    for input in [text, chat] {
        let (_, first) = stream(&mut c, request(input.clone(), &params)).await.unwrap();
        views_agree(&ports, &dep, "the router's index has the prompt").await;
        let (_, again) = stream(&mut c, request(input, &params)).await.unwrap();
        assert_eq!(
            again.prefill_server, first.prefill_server,
            "a repeated prompt left its prefill-server"
        );
        assert!(again.cached_tokens >= 16 && again.token_ids == first.token_ids, "{again:?}");
    }
    for d in &dep.decode {
        assert_all_blocks_free(d).await;
    }
    stop_cleanly(dep).await;
}

/// Prefill-servers with 128 blocks each: distinct prompts evict each other, and the
/// router's index follows (equal to each server's cached blocks). One prefill-server
/// killed: it counts as cold at once, the other serves everything; restarted, it is
/// followed again from its (empty) snapshot, and what it caches then is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routers_view_follows_evictions_and_restarts() {
    let (mut dep, work, ports) = deploy_kv_aware(2, 1, 1).await;
    let mut c = client(&dep.router).await;
    let params = SamplingParams {
        max_tokens: 2,
        ignore_eos: true,
        ..Default::default()
    };
    let prompt = |i: u32| -> Vec<u32> { (0..160).map(|j| 3 + (j * 29 + i * 53) % 480).collect() };
    views_agree(&ports, &dep, "the router follows every prefill-server").await;
    // 40 prompts of 10 blocks: 400 blocks over two pools of 128, so both evict.
    for i in 0..40 {
        let want = engine::generate_local(reference_engine(), &prompt(i), &params).unwrap().tokens;
        let (_, r) = stream(&mut c, request(ids(&prompt(i)), &params)).await.unwrap();
        assert_eq!(r.token_ids, want, "prompt {i}");
    }
    views_agree(&ports, &dep, "the router's index equals the caches after evictions").await;
    let evicted = (0..2).map(|i| views(&ports, &dep, i).1.unwrap_or(0.0)).sum::<f64>();
    assert!(evicted < 400.0, "nothing was evicted ({evicted} blocks cached)");

    // The last prompt again: it goes where it is cached.
    let (_, again) = stream(&mut c, request(ids(&prompt(39)), &params)).await.unwrap();
    assert_eq!(again.cached_tokens, 144);
    let victim = dep.prefill.iter().position(|p| *p == again.prefill_server).unwrap();
    let survivor = 1 - victim;
    let name = format!("prefill-{victim}");
    signal(&mut dep, &name, libc::SIGKILL);
    let _ = dep.child_mut(&name).unwrap().wait().await;
    until("the killed prefill-server counts as cold", Duration::from_secs(10), || async {
        router_view(&ports, &dep, victim) == Some(0.0)
    })
    .await;
    // Its prompt still answers exactly, computed on the other one.
    let want = engine::generate_local(reference_engine(), &prompt(39), &params).unwrap().tokens;
    let (_, r) = stream(&mut c, request(ids(&prompt(39)), &params)).await.unwrap();
    assert_eq!(
        (r.token_ids.clone(), r.prefill_server.clone()),
        (want.clone(), dep.prefill[survivor].clone())
    );

    let _restarted = tokio::process::Command::new(pdserve::up::binary("prefill-server").unwrap())
        .arg("--config")
        .arg(work.path().join(format!("{name}.toml")))
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    until(
        "the restarted prefill-server serves its metrics",
        Duration::from_secs(30),
        || async { std::net::TcpStream::connect(("127.0.0.1", ports.prefill[victim])).is_ok() },
    )
    .await;
    until(
        "the decode-server uses the restarted prefill-server again",
        Duration::from_secs(30),
        || async { stats(&dep.decode[0]).await.healthy_prefill_servers == 2 },
    )
    .await;
    // New prompts land on both again (the restarted one is the less loaded for
    // uncached prompts half the time), and the views agree.
    let mut served = std::collections::HashSet::new();
    for i in 100..108 {
        let (_, r) = stream(&mut c, request(ids(&prompt(i)), &params)).await.unwrap();
        served.insert(r.prefill_server);
    }
    assert!(
        served.contains(&dep.prefill[victim]),
        "the restarted prefill-server took no request: {served:?}"
    );
    views_agree(&ports, &dep, "the router's index equals the caches after the restart").await;
    stop_cleanly_except(dep, &name).await;
}

/// The policy switched at run time: a router started round-robin keeps no index; its
/// config file edited to `kv_aware` and SIGHUP sent, it follows the workers and keeps
/// a conversation on one prefill-server. A reload with a bad value changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_switches_the_policy() {
    let (mut dep, work, ports) = deploy_routed("round_robin", 2, 1, 64).await;
    let mut c = client(&dep.router).await;
    let params = SamplingParams {
        max_tokens: 3,
        ignore_eos: true,
        ..Default::default()
    };
    let conversation = |turn: usize| -> Vec<u32> { (0..40 + 20 * turn as u32).map(|j| 3 + (j * 17) % 480).collect() };
    let mut servers = Vec::new();
    for turn in 0..4 {
        servers.push(
            stream(&mut c, request(ids(&conversation(turn)), &params))
                .await
                .unwrap()
                .1
                .prefill_server,
        );
    }
    assert_ne!(servers[0], servers[1], "round-robin alternates");
    assert_eq!(sample(&scrape(ports.router), "pdserve_router_kv_index_blocks", &[]), None);
    let switch = |cfg: String| {
        assert!(cfg.contains("policy = \"round_robin\""), "{cfg}");
        cfg.replace("policy = \"round_robin\"", "policy = \"kv_aware\"")
    };
    reload_router(&mut dep, work.path(), switch, "config reloaded").await;
    views_agree(&ports, &dep, "after the reload the router follows every prefill-server").await;
    // A bad value: refused, kv_aware stays.
    reload_router(
        &mut dep,
        work.path(),
        |kv| format!("{kv}overlap_weight = -1\n"),
        "config reload refused",
    )
    .await;
    let mut home = None;
    for turn in 4..8 {
        let r = stream(&mut c, request(ids(&conversation(turn)), &params)).await.unwrap().1;
        if let Some(h) = &home {
            assert_eq!(&r.prefill_server, h, "turn {turn} left its prefill-server");
            assert!(
                r.cached_tokens >= 40 + 20 * (turn as u32 - 1) - 16,
                "turn {turn}: {} cached",
                r.cached_tokens
            );
        }
        home = Some(r.prefill_server);
        views_agree(&ports, &dep, "the router's index equals the prefill-servers' caches").await;
    }
    stop_cleanly(dep).await;
}

/// Stops a deployment one of whose daemons was killed (and replaced outside it).
async fn stop_cleanly_except(dep: pdserve::up::Deployment, killed: &str) {
    for (name, code) in dep.stop().await {
        if name != killed {
            assert_eq!(code, Some(0), "{name} did not exit 0 after SIGTERM");
        }
    }
}

/// Conditional disaggregation: with the router's `local_prefill_below` (set by a
/// reload), a short prompt is prefilled by the decode-server alone, a longer one by a
/// prefill-server; tokens equal the colocated run either way. A client that asks a
/// decode-server directly for a local prefill gets it only up to
/// `max_local_prefill_tokens` tokens not in its prefix cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_prompts_stay_on_the_decode_server() {
    let (mut dep, work, _ports) = deploy_kv_aware(1, 1, 64).await;
    reload_router(
        &mut dep,
        work.path(),
        |cfg| format!("{cfg}local_prefill_below = 30\n"),
        "config reloaded",
    )
    .await;
    let params = SamplingParams {
        max_tokens: 4,
        ignore_eos: true,
        ..Default::default()
    };
    let mut c = client(&dep.router).await;
    for (len, want_server) in [(20u32, "local".to_string()), (60, dep.prefill[0].clone())] {
        let prompt: Vec<u32> = (0..len).map(|j| 3 + (j * 19) % 480).collect();
        let want = engine::generate_local(reference_engine(), &prompt, &params).unwrap().tokens;
        let (_, r) = stream(&mut c, request(ids(&prompt), &params)).await.unwrap();
        assert_eq!((r.token_ids, r.prefill_server), (want, want_server), "a prompt of {len} tokens");
    }
    // Straight to the decode-server with the hint: 1024 uncached tokens local, 1025
    // not; 1025 whose first 1008 the decode-server caches (the 1024 before) local.
    let mut d = client(&dep.decode[0]).await;
    for (len, salt, local) in [(1024u32, 0u32, true), (1025, 1, false), (1025, 0, true)] {
        let prompt: Vec<u32> = (0..len).map(|j| 3 + (j * 23 + salt * 7) % 480).collect();
        let mut req = tonic::Request::new(request(ids(&prompt), &params));
        req.metadata_mut().insert(daemon::PREFILL_HINT, "local".parse().unwrap());
        let mut s = d.generate(req).await.unwrap().into_inner();
        let mut result = None;
        while let Some(m) = s.message().await.unwrap() {
            if let Some(pb::generate_response::Kind::Result(r)) = m.kind {
                result = Some(r);
            }
        }
        assert_eq!(
            result.unwrap().prefill_server == "local",
            local,
            "a hinted prompt of {len} tokens ({salt})"
        );
    }
    stop_cleanly(dep).await;
}
