//! The OpenAI-compatible HTTP API, with clients that are not ours: the official
//! `openai` Python client (completions and chat, streaming and not, usage, stop
//! strings, seeds, every error status) and curl (SSE), against the router of a real
//! deployment; and a decode-server serving it alone, for a one-node setup.
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{args, deploy_args, free_port, reference_engine, start_daemon};
use kv_transfer::BackendKind;

const KEY: &str = "sk-test";

fn reference_text(prompt: &[u32], max_tokens: u32) -> String {
    let e = reference_engine();
    let g = engine::generate_local(
        e,
        prompt,
        &engine::SamplingParams {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        },
    )
    .unwrap();
    e.detokenize(&g.tokens).unwrap()
}

/// `curl` with the key; returns (HTTP status, body).
fn curl(url: &str, key: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-sN", "--max-time", "60", "-w", "\n%{http_code}", url]);
    if let Some(k) = key {
        c.args(["-H", &format!("Authorization: Bearer {k}")]);
    }
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    let out = c.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_and_curl_against_the_router() {
    // A small KV pool (128 blocks of 16 tokens): a request for 3000 tokens can never fit (400).
    let (mut dep, _work) = deploy_args(pdserve::up::Args {
        auth_token: Some(KEY.into()),
        ..args(BackendKind::Tcp, 1, 1, 1)
    })
    .await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("python3")
        .arg(root.join("tests/openai_check.py"))
        .args([&dep.openai, &dep.model_name, KEY, "3000"])
        .env("PYTHONPATH", root.join(".deps/py"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the openai client's checks failed (run scripts/setup.sh):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["greedy_text"], reference_text(&(1..20).collect::<Vec<_>>(), 8));

    // curl: SSE lines, each `data: ...`, the last `[DONE]`.
    let url = format!("{}/completions", dep.openai);
    let body = format!(
        r#"{{"model": "{}", "prompt": "hi", "max_tokens": 3, "stream": true}}"#,
        dep.model_name
    );
    let (code, sse) = curl(&url, Some(KEY), Some(&body));
    assert_eq!(code, 200, "{sse}");
    let events: Vec<&str> = sse.lines().filter(|l| !l.is_empty()).collect();
    assert!(events.iter().all(|l| l.starts_with("data: ")), "{sse}");
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    assert!(events.iter().any(|l| l.contains("\"finish_reason\":\"length\"")), "{sse}");
    let (code, err) = curl(&url, None, Some(&body));
    assert_eq!(code, 401, "{err}");
    let e: serde_json::Value = serde_json::from_str(&err).unwrap();
    assert_eq!(e["error"]["type"], "authentication_error");
    let (code, err) = curl(&url, Some(KEY), Some("{not json"));
    assert_eq!(code, 400, "{err}");
    assert_eq!(curl(&format!("{}/health", dep.openai.trim_end_matches("/v1")), None, None).0, 200);

    // Every decode-server gone: 503, in OpenAI's shape.
    dep.child_mut("decode-0").unwrap().start_kill().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, err) = curl(&url, Some(KEY), Some(&body.replace("true", "false")));
        if code == 503 {
            let e: serde_json::Value = serde_json::from_str(&err).unwrap();
            assert_eq!(e["error"]["type"], "service_unavailable", "{err}");
            break;
        }
        assert!(Instant::now() < deadline, "still {code}: {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(curl(&format!("{}/health", dep.openai.trim_end_matches("/v1")), None, None).0, 503);
}

/// One node: a decode-server that prefills locally and serves the HTTP API itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_server_alone_serves_the_openai_api() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (free_port(), free_port());
    let cfg = format!(
        "listen = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\nserved_model_name = \"tiny\"\nprefill_servers = []\n[engine]\nmodel = {:?}\nkv_cache_mib = 16\n",
        e2e::model().display().to_string()
    );
    let _d = start_daemon("decode-server", dir.path(), "decode", &cfg);
    let base = format!("http://127.0.0.1:{http}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while curl(&format!("{base}/health"), None, None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(dir.path().join("decode.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = curl(
        &format!("{base}/v1/completions"),
        None,
        Some(r#"{"model": "tiny", "prompt": [1,2,3,4,5,6,7,8,9], "max_tokens": 6, "temperature": 0, "ignore_eos": true}"#),
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["text"], reference_text(&(1..10).collect::<Vec<_>>(), 6));
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert_eq!(v["pdserve"]["prefill_server"], "local");
    let (code, body) = curl(&format!("{base}/v1/models"), None, None);
    assert_eq!(code, 200);
    assert!(body.contains("\"id\":\"tiny\""), "{body}");
}
