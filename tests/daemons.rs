//! The product end to end: router -> decode-server -> prefill-server as separate
//! processes on loopback, KV caches moved by each data-plane backend.
use std::time::Duration;

use e2e::*;
use engine::SamplingParams;
use kv_transfer::BackendKind;
use pb::generate_request::Input;
use proto::v1 as pb;
use tonic::Code;

/// 20 prompts: text in several scripts, and token ids from 1 to 300 long.
fn prompts() -> Vec<Input> {
    let texts = [
        "Hello",
        "The quick brown fox jumps over the lazy dog.",
        "Le cache KV passe directement d'un GPU à l'autre, sans copie par le processeur.",
        "Der schnelle braune Fuchs springt über den faulen Hund, und dann noch einmal.",
        "¿Dónde está la biblioteca? Mañana será otro día.",
        "Быстрая коричневая лиса прыгает через ленивую собаку.",
        "敏捷的棕色狐狸跳过了懒狗。大型语言模型一次生成一个词元。",
        "素早い茶色の狐がのろまな犬を飛び越える。",
        "الثعلب البني السريع يقفز فوق الكلب الكسول.",
        "fn main() { println!(\"{}\", 1 + 2); } // 🚀",
    ];
    let mut v: Vec<Input> = texts.iter().map(|t| Input::Text(t.to_string())).collect();
    for (i, len) in [1usize, 2, 15, 16, 17, 33, 64, 100, 200, 300].into_iter().enumerate() {
        let ids = (0..len as u32).map(|j| 3 + (j * 7919 + i as u32 * 31) % 500).collect();
        v.push(Input::TokenIds(pb::TokenIds { ids }));
    }
    v
}

fn prompt_ids(input: &Input) -> Vec<u32> {
    match input {
        Input::Text(t) => reference_engine().tokenize(t).unwrap(),
        Input::TokenIds(ids) => ids.ids.clone(),
        Input::Chat(_) => unreachable!("the prompts here are text or token ids"),
    }
}

fn modes(i: usize) -> [SamplingParams; 2] {
    [
        SamplingParams {
            max_tokens: 12,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.3,
            top_k: 60,
            top_p: 0.95,
            repetition_penalty: 1.1,
            seed: 1000 + i as u64,
            max_tokens: 12,
            ..Default::default()
        },
    ]
}

async fn equals_colocated(backend: BackendKind) {
    let (dep, _work) = deploy(backend, 1, 1, 64).await;
    let mut c = client(&dep.router).await;
    for (i, input) in prompts().into_iter().enumerate() {
        for params in modes(i) {
            let want = engine::generate_local(reference_engine(), &prompt_ids(&input), &params).unwrap();
            let (chunks, got) = stream(&mut c, request(input.clone(), &params))
                .await
                .unwrap_or_else(|s| panic!("{backend} prompt {i}: {s}"));
            assert_eq!(
                got.token_ids, want.tokens,
                "{backend}: prompt {i} ({params:?}) differs from the colocated run"
            );
            assert_eq!(chunks, got.token_ids, "streamed tokens equal the final list");
            assert_eq!(got.prompt_tokens as usize, want.prompt_tokens.len());
            assert_eq!(got.kv_backend, backend.as_str(), "the KV cache went through {backend}");
            let t = got.timings.unwrap();
            assert!(t.kv_bytes > 0 && t.first_token_ms > 0.0 && t.total_ms >= t.first_token_ms);
        }
    }
    // Over at the first token, which goes out before the KV write completes: the result
    // still carries the write's figures, and the blocks come back (checked below).
    let one = SamplingParams {
        max_tokens: 1,
        ignore_eos: true,
        ..Default::default()
    };
    let input = prompts().remove(1);
    let want = engine::generate_local(reference_engine(), &prompt_ids(&input), &one).unwrap();
    let (_, got) = stream(&mut c, request(input, &one)).await.unwrap();
    assert_eq!(got.token_ids, want.tokens);
    let t = got.timings.unwrap();
    assert!(
        t.kv_bytes > 0 && t.kv_transfer_ms > 0.0,
        "{backend}: transfer figures after the first token: {t:?}"
    );
    assert_all_blocks_free(&dep.decode[0]).await;
    stop_cleanly(dep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_equals_colocated_tcp() {
    equals_colocated(BackendKind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_equals_colocated_ucx() {
    equals_colocated(BackendKind::Ucx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_equals_colocated_nixl() {
    equals_colocated(BackendKind::Nixl).await;
}

/// 32 concurrent streams of mixed lengths through 2 decode- and 2 prefill-servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_spread_and_complete() {
    let (dep, _work) = deploy(BackendKind::Nixl, 2, 2, 64).await;
    let all = prompts();
    let mut tasks = Vec::new();
    for i in 0..32 {
        let input = all[i % all.len()].clone();
        let params = SamplingParams {
            max_tokens: 8 + (i as u32 % 5) * 4,
            temperature: 0.7,
            seed: i as u64,
            ..Default::default()
        };
        let router = dep.router.clone();
        tasks.push(tokio::spawn(async move {
            let want = engine::generate_local(reference_engine(), &prompt_ids(&input), &params)
                .unwrap()
                .tokens;
            let mut c = client(&router).await;
            let (_, got) = stream(&mut c, request(input, &params)).await.unwrap();
            assert_eq!(got.token_ids, want, "request {i}");
            got.prefill_server
        }));
    }
    let mut servers = std::collections::HashSet::new();
    for t in tasks {
        servers.insert(t.await.unwrap());
    }
    assert_eq!(servers.len(), 2, "requests spread over both prefill-servers: {servers:?}");
    for d in &dep.decode {
        assert_all_blocks_free(d).await;
    }
    stop_cleanly(dep).await;
}

async fn expect_code(
    c: &mut proto::v1::generation_client::GenerationClient<tonic::transport::Channel>,
    req: pb::GenerateRequest,
    code: Code,
    what: &str,
) {
    match stream(c, req).await {
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            assert!(!s.message().is_empty(), "{what}: a message a person understands");
        }
        Ok(_) => panic!("{what}: accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_the_right_code() {
    let (dep, _work) = deploy(BackendKind::Tcp, 1, 1, 1).await;
    let mut c = client(&dep.router).await;
    let ok = SamplingParams {
        max_tokens: 4,
        ..Default::default()
    };
    expect_code(
        &mut c,
        request(Input::Text(String::new()), &ok),
        Code::InvalidArgument,
        "empty prompt",
    )
    .await;
    expect_code(
        &mut c,
        request(Input::TokenIds(pb::TokenIds { ids: vec![] }), &ok),
        Code::InvalidArgument,
        "empty token ids",
    )
    .await;
    expect_code(
        &mut c,
        pb::GenerateRequest {
            request_id: String::new(),
            input: None,
            sampling: None,
            cache_salt: String::new(),
        },
        Code::InvalidArgument,
        "no input",
    )
    .await;
    expect_code(
        &mut c,
        request(Input::TokenIds(pb::TokenIds { ids: vec![99_999] }), &ok),
        Code::InvalidArgument,
        "token outside the vocabulary",
    )
    .await;
    expect_code(
        &mut c,
        request(Input::TokenIds(pb::TokenIds { ids: vec![5; 5000] }), &ok),
        Code::InvalidArgument,
        "prompt longer than the context",
    )
    .await;
    for (what, p) in [
        (
            "max_tokens 0",
            SamplingParams {
                max_tokens: 0,
                ..ok.clone()
            },
        ),
        (
            "max_tokens huge",
            SamplingParams {
                max_tokens: 1_000_000,
                ..ok.clone()
            },
        ),
        (
            "negative temperature",
            SamplingParams {
                temperature: -0.5,
                ..ok.clone()
            },
        ),
        ("top_p 0", SamplingParams { top_p: 0.0, ..ok.clone() }),
    ] {
        expect_code(&mut c, request(Input::Text("hello".into()), &p), Code::InvalidArgument, what).await;
    }
    // 1 MiB of KV cache is 128 blocks of 16 tokens: 3000 tokens cannot ever fit.
    let big = SamplingParams {
        max_tokens: 2500,
        ignore_eos: true,
        ..Default::default()
    };
    expect_code(
        &mut c,
        request(Input::TokenIds(pb::TokenIds { ids: vec![5; 600] }), &big),
        Code::OutOfRange,
        "more than the pool",
    )
    .await;
    // The non-streaming form refuses the same way, and the daemon keeps serving.
    let e = c.generate_once(request(Input::Text(String::new()), &ok)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let r = c
        .generate_once(request(Input::Text("still serving".into()), &ok))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.completion_tokens, 4);
    assert_all_blocks_free(&dep.decode[0]).await;
    stop_cleanly(dep).await;
}

/// A client that goes away mid-stream: the sequence stops and its blocks are freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_stream_frees_its_blocks() {
    use tokio_stream::StreamExt;
    let (dep, _work) = deploy(BackendKind::Ucx, 1, 1, 64).await;
    let mut c = client(&dep.router).await;
    let p = SamplingParams {
        max_tokens: 3000,
        ignore_eos: true,
        ..Default::default()
    };
    let mut s = c
        .generate(request(Input::Text("a long story".into()), &p))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..5 {
        s.next().await.unwrap().unwrap();
    }
    let busy = stats(&dep.decode[0]).await;
    assert!(busy.free_blocks < busy.total_blocks, "the running sequence holds blocks");
    drop(s);
    drop(c);
    assert_all_blocks_free(&dep.decode[0]).await;
    stop_cleanly(dep).await;
}

fn kill9(child: &mut tokio::process::Child) {
    let pid = child.id().expect("running") as i32;
    // SAFETY: killing our own child process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// A prefill-server killed: requests go to the other one; a decode-server killed:
/// the router sends requests to the other one. Nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_daemons_are_routed_around() {
    let (mut dep, _work) = deploy(BackendKind::Tcp, 2, 2, 64).await;
    let p = SamplingParams {
        max_tokens: 6,
        ..Default::default()
    };
    let mut c = client(&dep.router).await;
    kill9(dep.child_mut("prefill-0").unwrap());
    for i in 0..6 {
        let (_, r) = stream(&mut c, request(Input::Text(format!("after the prefill kill {i}")), &p))
            .await
            .unwrap_or_else(|s| panic!("request {i}: {s}"));
        assert_eq!(r.prefill_server, dep.prefill[1], "only the live prefill-server serves");
    }
    kill9(dep.child_mut("decode-0").unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..6 {
        let (_, r) = stream(&mut c, request(Input::Text(format!("after the decode kill {i}")), &p))
            .await
            .unwrap_or_else(|s| panic!("request {i}: {s}"));
        assert_eq!(r.completion_tokens, 6);
    }
    assert_all_blocks_free(&dep.decode[1]).await;
    let codes = dep.stop().await;
    for (name, code) in codes {
        if name != "prefill-0" && name != "decode-0" {
            assert_eq!(code, Some(0), "{name} exits 0 after SIGTERM");
        }
    }
}

/// A client that is not ours (Python grpcio, stubs generated from proto/) gets the
/// same tokens as the colocated run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_gets_the_same_tokens() {
    let (dep, _work) = deploy(BackendKind::Tcp, 1, 1, 64).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let prompt = "A client that is not ours, 你好";
    let out = tokio::process::Command::new("python3")
        .arg(root.join("tests/python_client.py"))
        .args([dep.router.as_str(), prompt, "10"])
        .env("PYTHONPATH", root.join(".deps/py"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python client failed (run scripts/setup.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split("\"token_ids\": [")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .map(|s| {
            s.split(',')
                .filter(|x| !x.trim().is_empty())
                .map(|x| x.trim().parse().unwrap())
                .collect()
        })
        .expect("token ids in the output");
    let want = engine::generate_local(
        reference_engine(),
        &reference_engine().tokenize(prompt).unwrap(),
        &SamplingParams {
            max_tokens: 10,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(got, want.tokens);
    stop_cleanly(dep).await;
}

/// An incompatible peer is refused at the handshake, with the difference named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompatible_peers_are_refused_at_handshake() {
    let (dep, _work) = deploy(BackendKind::Tcp, 1, 1, 8).await;
    let mut p = pb::prefill_client::PrefillClient::connect(dep.prefill[0].clone()).await.unwrap();
    let layout = engine::Engine::load(&engine::EngineConfig {
        model: model(),
        kv_cache_mib: 8,
        ..Default::default()
    })
    .unwrap()
    .layout()
    .clone();
    let wire = |l: &engine::KvLayout| daemon::convert::layout_to_wire(l);
    let req = |layout: pb::KvLayout, backend: &str, md: Vec<u8>| pb::HandshakeRequest {
        peer_name: "test".into(),
        layout: Some(layout),
        backend: backend.into(),
        transfer_metadata: md,
        pool_regions: (1..=2 * layout_layers()).collect(),
        data_plane_key: vec![],
    };
    let other_model = engine::KvLayout {
        model_fingerprint: layout.model_fingerprint ^ 1,
        ..layout.clone()
    };
    let e = p.handshake(req(wire(&other_model), "tcp", vec![])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("fingerprint"), "{}", e.message());
    let other_blocks = engine::KvLayout {
        block_size: 32,
        ..layout.clone()
    };
    let e = p.handshake(req(wire(&other_blocks), "tcp", vec![])).await.unwrap_err();
    assert!(
        e.code() == Code::FailedPrecondition && e.message().contains("block size 16 vs 32"),
        "{}",
        e.message()
    );
    let e = p.handshake(req(wire(&layout), "ucx", vec![])).await.unwrap_err();
    assert!(
        e.code() == Code::FailedPrecondition && e.message().contains("backend mismatch"),
        "{}",
        e.message()
    );
    let e = p.handshake(req(wire(&layout), "tcp", b"garbage".to_vec())).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    stop_cleanly(dep).await;
}

fn layout_layers() -> u32 {
    2
}

/// More requests than KV blocks (reserved at admission): the late one waits up to the
/// queue deadline, then gets RESOURCE_EXHAUSTED; the running one finishes and the
/// daemon keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_blocks_ends_at_the_queue_deadline() {
    use tokio_stream::StreamExt;
    // 1 MiB: 128 blocks of 16 tokens.
    let (dep, _work) = deploy_args(pdserve::up::Args {
        queue_deadline_ms: 300,
        kv_allocation: "reserve".into(),
        ..args(BackendKind::Tcp, 1, 1, 1)
    })
    .await;
    let mut c = client(&dep.router).await;
    let big = SamplingParams {
        max_tokens: 1900,
        ignore_eos: true,
        ..Default::default()
    };
    let mut a = c
        .generate(request(Input::Text("hold most of the cache".into()), &big))
        .await
        .unwrap()
        .into_inner();
    a.next().await.unwrap().unwrap();
    let t = std::time::Instant::now();
    let small = SamplingParams {
        max_tokens: 200,
        ignore_eos: true,
        ..Default::default()
    };
    let e = stream(&mut c, request(Input::Text("no room for me".into()), &small))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "it waited for blocks first ({:?})",
        t.elapsed()
    );
    let mut n = 1;
    while let Some(item) = a.next().await {
        if let Some(pb::generate_response::Kind::Result(r)) = item.unwrap().kind {
            assert_eq!(r.completion_tokens, 1900);
        }
        n += 1;
    }
    assert!(n > 1900);
    let (_, r) = stream(&mut c, request(Input::Text("now there is room".into()), &small))
        .await
        .unwrap();
    assert_eq!(r.completion_tokens, 200);
    assert_all_blocks_free(&dep.decode[0]).await;
    stop_cleanly(dep).await;
}

/// A message over the size limit is refused by the limit, and the daemon keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused() {
    let (dep, _work) = deploy(BackendKind::Tcp, 1, 1, 8).await;
    let mut c = client(&dep.router).await;
    let p = SamplingParams {
        max_tokens: 2,
        ..Default::default()
    };
    let huge = "x".repeat(20 << 20);
    let e = stream(&mut c, request(Input::Text(huge), &p)).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{:?}: {}",
        e.code(),
        e.message()
    );
    let (_, r) = stream(&mut c, request(Input::Text("small".into()), &p)).await.unwrap();
    assert_eq!(r.completion_tokens, 2);
    stop_cleanly(dep).await;
}

/// Prompts with fewer than `local_prefill_below` tokens the decode-server does not
/// cache are prefilled there (no transfer), with the same tokens; longer ones still go
/// to the prefill-server. The last prompt extends the one before (whose 3 whole blocks
/// the decode-server caches): 19 new tokens, so local.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_prompts_are_prefilled_locally() {
    let (dep, work) = deploy_full(BackendKind::Tcp, 1, 1, 64, 30_000, 20).await;
    let mut c = client(&dep.router).await;
    let p = SamplingParams {
        max_tokens: 8,
        ..Default::default()
    };
    for (len, salt, local) in [(5usize, 0u32, true), (19, 1, true), (20, 2, false), (60, 3, false), (67, 3, true)] {
        let ids: Vec<u32> = (0..len as u32).map(|i| 3 + (i * 13 + salt * 101) % 400).collect();
        let want = engine::generate_local(reference_engine(), &ids, &p).unwrap().tokens;
        let (_, r) = stream(&mut c, request(Input::TokenIds(pb::TokenIds { ids }), &p)).await.unwrap();
        assert_eq!(r.token_ids, want, "prompt {len}");
        assert_eq!(r.prefill_server == "local", local, "prompt {len} prefilled at {}", r.prefill_server);
        assert_eq!(r.timings.unwrap().kv_bytes == 0, local);
    }
    // The router started the local ones on the prefill-server too; the decode-server
    // has them dropped there rather than left for their 2 s hold.
    let log = std::fs::read_to_string(work.path().join("prefill-0.log")).unwrap();
    assert!(log.contains("early prefill dropped"), "{log}");
    stop_cleanly(dep).await;
}

/// A bad config stops a daemon at start, exit code 64, naming the key and the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_fails_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for (bin, text, expect) in [
        ("router", "listen = \"127.0.0.1:1\"\ndecode_servers = []\n", "decode_servers"),
        ("router", "listen = \"nowhere\"\n", "listen"),
        ("decode-server", "max_batch = \"many\"\n", "max_batch"),
        ("prefill-server", "[transfer]\nbackend = \"carrier-pigeon\"\n", "backend"),
        ("prefill-server", "[engine]\nblock_sise = 16\n", "block_sise"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = tokio::process::Command::new(pdserve::up::binary(bin).unwrap())
            .arg("--config")
            .arg(&path)
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bin} with {text:?}: {err}");
        assert!(err.contains(expect), "{bin}: the error names {expect:?}: {err}");
    }
}

/// A prefill-server killed and started again: the decode-server handshakes with it
/// again and requests succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_prefill_server_is_used_again() {
    let (mut dep, work) = deploy(BackendKind::Ucx, 1, 1, 64).await;
    let mut c = client(&dep.router).await;
    let p = SamplingParams {
        max_tokens: 4,
        ..Default::default()
    };
    stream(&mut c, request(Input::Text("before".into()), &p)).await.unwrap();
    kill9(dep.child_mut("prefill-0").unwrap());
    let e = stream(&mut c, request(Input::Text("while it is down".into()), &p))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert_all_blocks_free(&dep.decode[0]).await;
    let mut again = tokio::process::Command::new(pdserve::up::binary("prefill-server").unwrap())
        .arg("--config")
        .arg(work.path().join("prefill-0.toml"))
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut ok = false;
    for _ in 0..100 {
        if let Ok((_, r)) = stream(&mut c, request(Input::Text("after the restart".into()), &p)).await {
            assert_eq!(r.prefill_server, dep.prefill[0]);
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "requests succeed once the prefill-server is back");
    kill9(&mut again);
    let _ = dep.stop().await;
}

/// A request carrying a field the API does not define is refused, not silently trimmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_refused() {
    let (dep, _work) = deploy(BackendKind::Tcp, 1, 1, 8).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tokio::process::Command::new("python3")
        .arg(root.join("tests/python_client.py"))
        .args([dep.router.as_str(), "hello", "2", "--unknown-field"])
        .env("PYTHONPATH", root.join(".deps/py"))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"INVALID_ARGUMENT\"") && text.contains("does not know"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stop_cleanly(dep).await;
}

/// A prefill that outlives the decode-server's deadline: the prefill-server does not
/// start its KV write (the decode-server may have given the blocks away), and the
/// decode-server holds the blocks until no write of it can land, then frees them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_past_its_deadline_writes_nothing_and_frees_its_blocks() {
    let (dep, work) = deploy_args(pdserve::up::Args {
        prefill_deadline_ms: 100,
        ..args(BackendKind::Ucx, 1, 1, 64)
    })
    .await;
    let mut c = client(&dep.router).await;
    let p = SamplingParams {
        max_tokens: 4,
        ..Default::default()
    };
    let ids: Vec<u32> = (0..3000).map(|i| 3 + (i * 7919) % 500).collect();
    let e = stream(&mut c, request(Input::TokenIds(pb::TokenIds { ids }), &p))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(e.message().contains("DeadlineExceeded"), "{}", e.message());
    let held = stats(&dep.decode[0]).await;
    assert!(
        held.free_blocks < held.total_blocks,
        "the failed prefill's blocks are held while a write could land"
    );
    assert_all_blocks_free(&dep.decode[0]).await;
    let log = std::fs::read_to_string(work.path().join("prefill-0.log")).unwrap();
    assert!(log.contains("nothing written"), "the prefill-server skipped the write:\n{log}");
    assert!(!log.contains("prefilled"), "no KV write was made:\n{log}");
    stop_cleanly(dep).await;
}

/// One router, decode-server and prefill-server with metrics; returns the prefill-server's
/// metrics port and a client of its Prefill service.
async fn deploy_with_metrics(
    a: pdserve::up::Args,
) -> (
    pdserve::up::Deployment,
    tempfile::TempDir,
    u16,
    pb::prefill_client::PrefillClient<tonic::transport::Channel>,
) {
    let port = free_port_run(3);
    let (dep, work) = deploy_args(pdserve::up::Args {
        metrics_port: Some(port),
        ..a
    })
    .await;
    let pc = pb::prefill_client::PrefillClient::connect(dep.prefill[0].clone()).await.unwrap();
    // Router, decode-server, then the prefill-server.
    (dep, work, port + 2, pc)
}

/// The router starts every prompt on the prefill-server early. The decode-server's
/// Prefill takes that computation over only when the request id, tokens and sampling
/// all match; otherwise it computes afresh (tokens still equal the reference). An
/// early start nobody claims gives its blocks back after `early_hold_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_prefills_are_used_only_when_they_match_and_never_leak() {
    let (dep, work, prefill_metrics, mut pc) = deploy_with_metrics(args(BackendKind::Ucx, 1, 1, 64)).await;
    let mut c = client(&dep.router).await;
    let ids = |k: u32| {
        Input::TokenIds(pb::TokenIds {
            ids: (0..40).map(|j| 3 + (j * 7919 + k * 31) % 500).collect(),
        })
    };
    let greedy = SamplingParams {
        max_tokens: 8,
        ..Default::default()
    };
    let sampled = |seed| SamplingParams {
        temperature: 1.2,
        seed,
        max_tokens: 8,
        ..Default::default()
    };
    let check = |input: &Input, p: &SamplingParams, got: &pb::GenerateResult| {
        let want = engine::generate_local(reference_engine(), &prompt_ids(input), p).unwrap();
        assert_eq!(got.token_ids, want.tokens, "{p:?}");
    };

    // Through the router alone: the early start is used (when it reaches the
    // prefill-server before the decode-server's Prefill, as it nearly always does).
    for k in 0..3 {
        let (_, got) = stream(&mut c, request(ids(10 + k), &greedy)).await.unwrap();
        check(&ids(10 + k), &greedy, &got);
    }

    // An early start under the request's id, but of another prompt, then of the same
    // prompt with another seed: the router's own early start finds the id taken, and
    // the decode-server's Prefill must not take the stale result.
    for (id, stale_input, stale_params, input, params) in [
        ("early-other-prompt", ids(3), greedy.clone(), ids(2), greedy.clone()),
        ("early-other-seed", ids(4), sampled(8), ids(4), sampled(7)),
    ] {
        let stale = pb::GenerateRequest {
            request_id: id.into(),
            ..request(stale_input, &stale_params)
        };
        assert!(pc.early_prefill(stale).await.unwrap().into_inner().started);
        let req = pb::GenerateRequest {
            request_id: id.into(),
            ..request(input.clone(), &params)
        };
        let (_, got) = stream(&mut c, req).await.unwrap();
        check(&input, &params, &got);
    }

    // Refused: no request id, an empty prompt, a token outside the vocabulary.
    let no_id = request(ids(5), &greedy);
    let empty = pb::GenerateRequest {
        request_id: "early-empty".into(),
        ..request(Input::TokenIds(pb::TokenIds { ids: vec![] }), &greedy)
    };
    let outside = pb::GenerateRequest {
        request_id: "early-outside".into(),
        ..request(Input::TokenIds(pb::TokenIds { ids: vec![1 << 30] }), &greedy)
    };
    for bad in [no_id, empty, outside] {
        let e = pc.early_prefill(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    }

    // Unclaimed: computed, held, then released.
    let orphan = pb::GenerateRequest {
        request_id: "early-orphan".into(),
        ..request(ids(6), &greedy)
    };
    assert!(pc.early_prefill(orphan).await.unwrap().into_inner().started);
    let early = |outcome: &str| {
        sample(
            &scrape(prefill_metrics),
            "pdserve_early_prefills_total",
            &[&format!("outcome=\"{outcome}\"")],
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while early("unclaimed").is_none() {
        assert!(std::time::Instant::now() < deadline, "the unclaimed early prefill was not released");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = scrape(prefill_metrics);
    assert_eq!(
        sample(&m, "pdserve_kv_blocks_free", &[]),
        sample(&m, "pdserve_kv_blocks_total", &[]),
        "the prefill-server holds no blocks"
    );
    assert_eq!(early("mismatch"), Some(2.0));
    assert!(early("used").is_some_and(|n| n >= 1.0), "the router's early starts were used");
    let log = std::fs::read_to_string(work.path().join("prefill-0.log")).unwrap();
    assert!(log.contains("early=true") && log.contains("early=false"), "{log}");
    assert_all_blocks_free(&dep.decode[0]).await;
    stop_cleanly(dep).await;
}

/// Early starts nobody claims hold the prefill-server's blocks only until a Prefill
/// needs them: short of blocks, it drops them and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclaimed_early_prefills_give_way_to_prefills() {
    // 1 MiB of KV per daemon: 128 blocks of 16 tokens.
    let (dep, _work, prefill_metrics, mut pc) = deploy_with_metrics(args(BackendKind::Tcp, 1, 1, 1)).await;
    let greedy = SamplingParams {
        max_tokens: 4,
        ..Default::default()
    };
    // Prompts that share no block (a shared prefix would be found in the cache instead).
    let prompt = |n: u32, salt: u32| {
        Input::TokenIds(pb::TokenIds {
            ids: (0..n).map(|j| 3 + (j * 7919 + salt) % 500).collect(),
        })
    };
    // 1,500 tokens: 94 of the prefill-server's 128 blocks, held unclaimed.
    let orphan = pb::GenerateRequest {
        request_id: "early-hog".into(),
        ..request(prompt(1500, 1), &greedy)
    };
    assert!(pc.early_prefill(orphan).await.unwrap().into_inner().started);
    let total = sample(&scrape(prefill_metrics), "pdserve_kv_blocks_total", &[]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sample(&scrape(prefill_metrics), "pdserve_kv_blocks_free", &[]) == Some(total) {
        assert!(std::time::Instant::now() < deadline, "the early prefill never took its blocks");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 1,000 tokens need 63 blocks, 34 are free.
    let input = prompt(1000, 0);
    let want = engine::generate_local(reference_engine(), &prompt_ids(&input), &greedy).unwrap();
    let (_, got) = stream(&mut client(&dep.router).await, request(input, &greedy)).await.unwrap();
    assert_eq!(got.token_ids, want.tokens);
    let m = scrape(prefill_metrics);
    assert_eq!(
        sample(&m, "pdserve_early_prefills_total", &["outcome=\"evicted\""]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(sample(&m, "pdserve_kv_blocks_free", &[]), Some(total));
    assert_all_blocks_free(&dep.decode[0]).await;
    stop_cleanly(dep).await;
}

/// Prompts that start the same way reuse the prefill-server's cached blocks: a later
/// prompt computes only what follows the shared whole blocks, says so in
/// `cached_tokens`, and its tokens (greedy, and sampled with a repetition penalty that
/// reads the whole prompt) equal the colocated run; the metrics count the lookups and
/// hits in tokens, and every decode block comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefixes_are_computed_once() {
    let (dep, _work, prefill_metrics, _) = deploy_with_metrics(args(BackendKind::Tcp, 1, 1, 64)).await;
    // Straight to the decode-server: no early prefill from the router, one compute each.
    let mut c = client(&dep.decode[0]).await;
    let prefix: Vec<u32> = (0..48).map(|j| 3 + (j * 7919) % 500).collect();
    let prompt = |tail: u32, len: u32| -> Vec<u32> {
        let mut p = prefix.clone();
        p.extend((0..len).map(|j| 3 + (j * 31 + tail * 17) % 500));
        p
    };
    let sampled = SamplingParams {
        temperature: 1.1,
        repetition_penalty: 1.2,
        seed: 5,
        max_tokens: 8,
        ..Default::default()
    };
    let greedy = SamplingParams {
        max_tokens: 8,
        ..Default::default()
    };
    let cases = [
        (prompt(1, 12), greedy.clone(), 0),
        (prompt(2, 22), sampled.clone(), 48),
        (prompt(1, 12), sampled, 48),
        (prompt(3, 0)[..40].to_vec(), greedy, 32),
    ];
    for (i, (ids, params, cached)) in cases.iter().enumerate() {
        let want = engine::generate_local(reference_engine(), ids, params).unwrap();
        let (_, got) = stream(&mut c, request(Input::TokenIds(pb::TokenIds { ids: ids.clone() }), params))
            .await
            .unwrap();
        assert_eq!(got.token_ids, want.tokens, "case {i}: tokens differ from the colocated run");
        assert_eq!(got.cached_tokens, *cached, "case {i}: cached tokens");
        assert_eq!(got.prefill_server, dep.prefill[0], "case {i} went to the prefill-server");
    }
    // A cache_salt keeps a prompt apart: nothing found under a new salt, its own blocks
    // found again under the same one; a salt too long is refused.
    let (ids, params, _) = &cases[0];
    let salted = |salt: &str| pb::GenerateRequest {
        cache_salt: salt.into(),
        ..request(Input::TokenIds(pb::TokenIds { ids: ids.clone() }), params)
    };
    let want = engine::generate_local(reference_engine(), ids, params).unwrap().tokens;
    for (salt, cached) in [("tenant-a", 0), ("tenant-b", 0), ("tenant-a", 48)] {
        let (_, got) = stream(&mut c, salted(salt)).await.unwrap();
        assert_eq!((got.token_ids.clone(), got.cached_tokens), (want.clone(), cached), "salt {salt}");
    }
    let err = stream(&mut c, salted(&"s".repeat(257))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("cache_salt"), "{err:?}");
    let m = scrape(prefill_metrics);
    let queries: usize = cases.iter().map(|(ids, ..)| ids.len()).sum::<usize>() + 3 * ids.len();
    assert_eq!(sample(&m, "pdserve_prefix_cache_queries_total", &[]), Some(queries as f64));
    assert_eq!(sample(&m, "pdserve_prefix_cache_hits_total", &[]), Some(128.0 + 48.0));
    assert!(sample(&m, "pdserve_kv_blocks_cached", &[]).unwrap_or(0.0) >= 3.0);
    assert_all_blocks_free(&dep.decode[0]).await;
    stop_cleanly(dep).await;
}
