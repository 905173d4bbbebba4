//! `pdserve bench` and `pdserve bench compare` as a user runs them: the real binary
//! starting real deployments on loopback, its JSON read back.
use std::process::Command;

use e2e::model;

fn pdserve() -> Command {
    Command::new(pdserve::up::binary("pdserve").unwrap())
}

/// Runs `cmd` with `--json FILE`: it must succeed; its stdout and the JSON it wrote.
/// The summary of `target`'s (first) level in a `bench compare --json` document.
fn level_summary(doc: &serde_json::Value, target: &str) -> serde_json::Value {
    doc["levels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["target"] == target)
        .unwrap_or_else(|| panic!("{target} missing"))["summary"]
        .clone()
}

fn run_json(mut cmd: Command, dir: &tempfile::TempDir) -> (String, serde_json::Value) {
    let json = dir.path().join("out.json");
    let out = cmd.arg("--json").arg(&json).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    (stdout, serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap())
}

/// Every row of the compare table is filled from measurements, the JSON parses, and
/// the disaggregated rows moved the KV bytes the model's shape says they must.
#[test]
fn bench_compare_fills_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("compare.json");
    let plot = dir.path().join("compare.svg");
    let out = pdserve()
        .args(["bench", "compare", "--local", "colocated,tcp,nixl,ucx", "--requests", "4"])
        .args(["--input-len", "24,40", "--output-len", "5", "--concurrency", "1,2", "--quiet"])
        .args(["--vocab", "500", "--kvbench", "tcp,ucx"])
        .arg("--model")
        .arg(model())
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&plot)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for method in [
        "Colocated (one daemon)",
        "Disaggregated + TCP",
        "Disaggregated + NIXL",
        "Disaggregated + UCX",
    ] {
        assert!(stdout.contains(&format!("| {method} | 24 |")), "{method} missing:\n{stdout}");
    }
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = doc["rows"].as_array().unwrap();
    // Four deployments by two prompt lengths; load levels beyond the first are in `levels`.
    assert_eq!(rows.len(), 8);
    assert_eq!(doc["levels"].as_array().unwrap().len(), 16);
    // The tiny model: 2 layers x (K and V) x 2 KV heads x 16 dims x 4 bytes = 256 bytes a
    // token, moved in whole 16-token blocks.
    let per_token = 2 * 2 * 2 * 16 * 4;
    for r in rows {
        assert_eq!(r["requests"], 4);
        assert_eq!(r["failed"], 0, "{r}");
        assert!(
            r["prefill_ms"].as_f64().unwrap() > 0.0 && r["total_ms"].as_f64().unwrap() > 0.0,
            "{r}"
        );
        assert!(r["decode_ms"].as_f64().unwrap() > 0.0, "{r}");
        let input: u64 = r["input_len"].as_str().unwrap().parse().unwrap();
        let expect_kv = if r["method"] == "colocated" {
            0
        } else {
            input.div_ceil(16) * 16 * per_token
        };
        assert_eq!(r["kv_bytes"].as_f64().unwrap() as u64, expect_kv, "{r}");
        if r["method"] == "colocated" {
            assert!(r["vs_colocated"].is_null());
        } else {
            assert!(r["transfer_ms"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["vs_colocated"].is_f64(), "{r}");
        }
    }
    let kv = doc["kvbench"].as_array().unwrap();
    assert_eq!(kv.len(), 4, "tcp and ucx at two KV sizes");
    assert!(kv.iter().all(|r| r["verified"] == true));
    assert!(std::fs::read_to_string(&plot).unwrap().contains("nixl, input 40"));
}

/// `bench compare --routing`: one deployment of two prefill-servers per router policy,
/// the multi-turn workload on each; `kv_aware` keeps each conversation where its
/// history is, so its prefix hit rate is (nearly) the workload's whole history and it
/// computes fewer prompt tokens than round-robin; the routing table says so.
#[test]
fn bench_compare_routing_policies() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = pdserve();
    cmd.args([
        "bench",
        "compare",
        "--local",
        "tcp",
        "--prefill",
        "2",
        "--routing",
        "kv_aware,round_robin",
    ])
    .args([
        "--multi-turn",
        "4",
        "--input-len",
        "40",
        "--output-len",
        "4",
        "--requests",
        "24",
        "--concurrency",
        "3",
    ])
    .args(["--vocab", "500", "--no-kvbench", "--quiet", "--model"])
    .arg(model());
    let (stdout, doc) = run_json(cmd, &dir);
    assert!(stdout.contains("| Disaggregated + TCP, kv_aware | 40 |"), "{stdout}");
    let summary = |target: &str| level_summary(&doc, target);
    let (kv, rr) = (summary("tcp@kv_aware"), summary("tcp@round_robin"));
    for s in [&kv, &rr] {
        assert_eq!(s["failed"], 0, "{s}");
    }
    // Turn k (k >= 2) of a conversation finds turn k-1's whole blocks: 40 + 44 (k - 2)
    // tokens rounded down to 16, over prompts of 40 + 44 (k - 1) tokens.
    let turns = |k: u64| 40 + 44 * (k - 1);
    let ideal = (2..=4).map(|k| turns(k - 1) / 16 * 16).sum::<u64>() as f64 / (1..=4).map(turns).sum::<u64>() as f64;
    let hit = |s: &serde_json::Value| s["prefix_hit_rate"].as_f64().unwrap();
    // Not always all of it: a turn whose home is busy with another prompt may go to the
    // idle server (the load term), as it should.
    assert!(
        hit(&kv) <= ideal + 1e-9 && hit(&kv) >= 0.8 * ideal,
        "kv_aware hit rate {} (ideal {ideal})",
        hit(&kv)
    );
    assert!(hit(&kv) > hit(&rr), "kv_aware {kv}\nround_robin {rr}");
    let computed = |s: &serde_json::Value| s["prefill_tokens_computed"].as_u64().unwrap();
    assert!(computed(&kv) < computed(&rr), "kv_aware {kv}\nround_robin {rr}");
}

/// `bench compare --core before,current` on shared prefixes (2 system prompts of 512
/// tokens, each request 16 tokens more): under both cores the prefill-servers find over
/// 80% of the prompt tokens cached and compute only the rest; under the current core
/// the decode-server holds those blocks too, so they do not travel (KV bytes a request
/// under a quarter of the before core's); nothing fails; the table names both.
#[test]
fn bench_compare_serving_cores() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = pdserve();
    cmd.args(["bench", "compare", "--local", "tcp", "--core", "before,current"])
        .args(["--shared-prefix", "2:512", "--input-len", "16", "--output-len", "4"])
        .args(["--requests", "32", "--concurrency", "4"])
        .args(["--vocab", "500", "--no-kvbench", "--quiet", "--model"])
        .arg(model());
    let (stdout, doc) = run_json(cmd, &dir);
    assert!(
        stdout.contains("| Disaggregated + TCP, current core | 16 | concurrency 4 |"),
        "{stdout}"
    );
    let summary = |target: &str| level_summary(&doc, target);
    let (before, current) = (summary("tcp#before"), summary("tcp#current"));
    let f = |s: &serde_json::Value, k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{k} in {s}"));
    for s in [&before, &current] {
        assert_eq!(s["failed"], 0, "{s}");
        assert_eq!(s["preemptions"], 0, "{s}");
        assert!(f(s, "prefix_hit_rate") > 0.8, "{s}");
        // 32 prompts of 528 tokens: what was not found was computed.
        let computed = f(s, "prefill_tokens_computed");
        assert!((computed - 32.0 * 528.0 * (1.0 - f(s, "prefix_hit_rate"))).abs() < 1.0, "{s}");
    }
    assert_eq!(f(&before, "decode_hit_rate"), 0.0);
    assert!(f(&current, "decode_hit_rate") > 0.8, "{current}");
    assert!(
        f(&current, "mean_kv_bytes") < 0.25 * f(&before, "mean_kv_bytes"),
        "current {current}\nbefore {before}"
    );
}

/// The load generator alone: an open loop against a running router; a bad argument is
/// a clear error, not a run.
#[test]
fn bench_open_loop_counts_every_request() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (dep, _work) = rt.block_on(e2e::deploy(kv_transfer::BackendKind::Ucx, 1, 1, 64));
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = pdserve();
    cmd.args(["bench", "--router", &dep.router, "--rate", "50", "--requests", "12", "--quiet"])
        .args([
            "--input-len",
            "8:30",
            "--output-len",
            "3:6",
            "--slo-ttft-ms",
            "60000",
            "--slo-tpot-ms",
            "60000",
        ]);
    let (stdout, doc) = run_json(cmd, &dir);
    assert!(stdout.contains("| TTFT ms |"), "{stdout}");
    let level = &doc["levels"][0];
    let reqs = level["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 12);
    for r in reqs {
        assert!(r["error"].is_null(), "{r}");
        let n = r["output_tokens"].as_u64().unwrap();
        assert!((3..=6).contains(&n), "{r}");
        assert_eq!(r["itl_ms"].as_array().unwrap().len() as u64, n - 1);
        assert!(r["ttft_ms"].as_f64().unwrap() <= r["e2e_ms"].as_f64().unwrap());
        assert_eq!(r["kv_backend"], "ucx");
    }
    // Arrivals are spread over time, not sent at once.
    assert!(reqs[11]["sent_s"].as_f64().unwrap() > 0.0);
    assert_eq!(level["summary"]["completed"], 12);
    assert_eq!(level["summary"]["slo_attainment"], 1.0);

    // A trace (Mooncake's format) replayed at its own times: lengths as the trace says,
    // and sent no earlier than its timestamps (400 ms apart).
    let trace = dir.path().join("trace.jsonl");
    std::fs::write(
        &trace,
        (0..4)
            .map(|i| {
                format!(
                    "{{\"timestamp\": {}, \"input_length\": {}, \"output_length\": {}, \"hash_ids\": [1, {}]}}\n",
                    5000 + 400 * i,
                    10 + i,
                    2 + i,
                    i + 2
                )
            })
            .collect::<String>(),
    )
    .unwrap();
    let mut cmd = pdserve();
    cmd.args(["bench", "--router", &dep.router, "--trace"]).arg(&trace).args([
        "--trace-block",
        "8",
        "--vocab",
        "400",
        "--warmup",
        "0",
        "--quiet",
    ]);
    let (_, doc) = run_json(cmd, &dir);
    assert_eq!(doc["levels"][0]["load"], "trace arrivals");
    let reqs = doc["levels"][0]["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 4);
    for (i, r) in reqs.iter().enumerate() {
        assert!(r["error"].is_null(), "{r}");
        assert_eq!(r["input_tokens"].as_u64().unwrap(), 10 + i as u64, "{r}");
        assert_eq!(r["output_tokens"].as_u64().unwrap(), 2 + i as u64, "{r}");
        let sent = r["sent_s"].as_f64().unwrap();
        assert!(sent >= 0.4 * i as f64 - 0.01 && sent < 0.4 * i as f64 + 0.5, "{r}");
    }

    // Multi-turn chats (3 turns) in a closed loop of 2: each turn's prompt is longer than
    // the last, and a turn is sent only after the one before it ended.
    let mut cmd = pdserve();
    cmd.args([
        "bench",
        "--router",
        &dep.router,
        "--multi-turn",
        "3",
        "--requests",
        "6",
        "--concurrency",
        "2",
    ])
    .args(["--input-len", "4:8", "--output-len", "2", "--warmup", "1", "--quiet"]);
    let (_, doc) = run_json(cmd, &dir);
    let reqs = doc["levels"][0]["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 6);
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    assert!(reqs.iter().all(|r| r["error"].is_null()), "{reqs:?}");
    for i in [1, 2, 4, 5] {
        let (prev, this) = (&reqs[i - 1], &reqs[i]);
        assert!(f(this, "input_tokens") >= f(prev, "input_tokens") + 2.0 + 4.0, "{prev}\n{this}");
        assert!(
            f(this, "sent_s") >= f(prev, "sent_s") + f(prev, "e2e_ms") / 1000.0 - 1e-6,
            "{prev}\n{this}"
        );
    }
    let at_a_rate = pdserve()
        .args(["bench", "--router", &dep.router, "--multi-turn", "2", "--rate", "5"])
        .output()
        .unwrap();
    assert!(!at_a_rate.status.success());
    assert!(String::from_utf8_lossy(&at_a_rate.stderr).contains("closed loop"));

    let bad = pdserve()
        .args(["bench", "--router", &dep.router, "--input-len", "9:2"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("MIN <= MAX"));
    rt.block_on(async {
        for (name, code) in dep.stop().await {
            assert_eq!(code, Some(0), "{name} exits 0");
        }
    });
}

/// `pdserve bench --api openai`: the same load through the OpenAI HTTP API (streaming
/// `/v1/completions`, token-id prompts, the bearer token), pdserve's own figures read
/// from its extension object; a wrong token is a clear error before any run.
#[test]
fn bench_over_the_openai_api_counts_every_request() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (dep, _work) = rt.block_on(e2e::deploy_args(pdserve::up::Args {
        auth_token: Some("bench-secret".into()),
        ..e2e::args(kv_transfer::BackendKind::Tcp, 1, 1, 64)
    }));
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = pdserve()
        .args(["bench", "--api", "openai", "--router", &dep.openai, "--token", "bench-secret"])
        .args(["--concurrency", "2", "--requests", "6", "--input-len", "8:20", "--output-len", "4"])
        .args(["--vocab", "500", "--quiet", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let level = &doc["levels"][0];
    let reqs = level["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 6);
    for r in reqs {
        assert!(r["error"].is_null(), "{r}");
        assert_eq!(r["output_tokens"], 4, "{r}");
        let input = r["input_tokens"].as_u64().unwrap();
        assert!((8..=20).contains(&input), "usage counts the prompt: {r}");
        let (ttft, e2e) = (r["ttft_ms"].as_f64().unwrap(), r["e2e_ms"].as_f64().unwrap());
        assert!(ttft > 0.0 && ttft <= e2e, "{r}");
        assert_eq!(r["kv_backend"], "tcp", "pdserve's extension object is read: {r}");
        assert!(r["prefill_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_eq!(level["summary"]["completed"], 6);

    let bad = pdserve()
        .args(["bench", "--api", "openai", "--router", &dep.openai, "--token", "wrong"])
        .args(["--requests", "1", "--quiet"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("401") && err.contains("wrong API key"), "{err}");
    rt.block_on(async {
        for (name, code) in dep.stop().await {
            assert_eq!(code, Some(0), "{name} exits 0");
        }
    });
}

/// `pdserve kvbench --back-to-back`: each backend's writes go out one after another, the
/// target confirms every notification at the end, and the last write's bytes arrive
/// intact (the table's `verified`), single and multi-segment.
#[test]
fn kvbench_back_to_back_writes_are_all_confirmed_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("kv.json");
    for (segments, sizes) in [("1", "1B,4KiB,64KiB"), ("4", "4KiB,64KiB,1MiB")] {
        let out = pdserve()
            .args([
                "kvbench",
                "--backend",
                "nixl,ucx,tcp",
                "--sizes",
                sizes,
                "--iters",
                "20",
                "--warmup",
                "2",
            ])
            .args(["--segments", segments, "--back-to-back", "--json"])
            .arg(&json)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(rows.len(), 9, "{stdout}");
        for r in &rows {
            assert_eq!(r["verified"], true, "{r}");
            assert_eq!(r["iters"], 20, "{r}");
        }
    }
}

/// `pdserve numerics` as `scripts/numerics_gpu.py` reads it: per prompt, the greedy
/// tokens of the colocated run, the logits (vocabulary f32 values, the first token
/// their argmax), and with `--layers` one f32 residual stream per layer over the prompt.
#[test]
fn numerics_dumps_what_the_reference_comparison_reads() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = [vec![5u32, 9, 200, 31, 7], (0..40).map(|i| 3 + i * 11).collect()];
    let file = dir.path().join("prompts.json");
    std::fs::write(&file, serde_json::to_string(&prompts).unwrap()).unwrap();
    let out_dir = dir.path().join("out");
    let numerics = |extra: &[&str]| {
        pdserve()
            .arg("numerics")
            .args(extra)
            .arg("--model")
            .arg(model())
            .arg("--prompts")
            .arg(&file)
            .arg("--out")
            .arg(&out_dir)
            .output()
            .unwrap()
    };
    let out = numerics(&["--tokens", "6", "--layers"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e = e2e::reference_engine();
    let (layers, hidden, vocab) = (e.config().num_layers, e.config().hidden_size, e.config().vocab_size);
    let summary: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(out_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary.len(), prompts.len());
    let f32s = |name: &str| -> Vec<f32> {
        std::fs::read(out_dir.join(name))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    for (p, s) in prompts.iter().zip(&summary) {
        let params = engine::SamplingParams {
            max_tokens: 6,
            ignore_eos: true,
            ..Default::default()
        };
        let want = engine::generate_local(e, p, &params).unwrap().tokens;
        let tokens: Vec<u32> = serde_json::from_value(s["tokens"].clone()).unwrap();
        assert_eq!(tokens, want);
        let logits = f32s(s["logits"].as_str().unwrap());
        assert_eq!(logits.len(), vocab);
        assert_eq!(engine::model::argmax(&logits), want[0]);
        let (name, shape): (String, [usize; 3]) = serde_json::from_value(s["layers"].clone()).unwrap();
        assert_eq!(shape, [layers, p.len(), hidden]);
        assert_eq!(f32s(&name).len(), layers * p.len() * hidden);
    }
    // A prompt file that is not a list of token-id lists is refused with the reason.
    std::fs::write(&file, "[\"text\"]").unwrap();
    let out = numerics(&[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a JSON list of token-id lists"));
}
