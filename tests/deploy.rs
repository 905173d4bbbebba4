//! What ships in deploy/ and configs/: every systemd unit passes `systemd-analyze
//! verify`, `scripts/install.sh` lays files out and removes them, and the units'
//! ExecStart lines, run as systemd would (shipped configs, working directory, an
//! environment file's overrides, NOTIFY_SOCKET), bring up a deployment that answers.
use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{Daemon, free_port, sample, scrape};
use proto::v1 as pb;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn units() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    v.sort();
    v
}

/// The folder of the built binaries, with each installed name (pdserve-router) linked in.
fn bin_dir(tmp: &Path) -> PathBuf {
    let built = pdserve::up::binary("prefill-server").unwrap().parent().unwrap().to_path_buf();
    let dir = tmp.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    for (installed, built_name) in [
        ("prefill-server", "prefill-server"),
        ("decode-server", "decode-server"),
        ("pdserve-router", "router"),
        ("pdserve", "pdserve"),
    ] {
        std::os::unix::fs::symlink(built.join(built_name), dir.join(installed)).unwrap();
    }
    dir
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let names: Vec<String> = units()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "pdserve-prefill.service",
        "pdserve-decode.service",
        "pdserve-router.service",
        "pdserve-prefill@.service",
        "pdserve-decode@.service",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from deploy/systemd");
    }
    let tmp = tempfile::tempdir().unwrap();
    let bins = bin_dir(tmp.path());
    for unit in units() {
        let text = std::fs::read_to_string(&unit).unwrap();
        for key in [
            "Type=notify",
            "LimitNOFILE=",
            "Restart=on-failure",
            "User=pdserve",
            "EnvironmentFile=-/etc/pdserve/",
        ] {
            assert!(text.contains(key), "{}: no {key}", unit.display());
        }
        if !text.contains("pdserve-router") {
            assert!(
                text.contains("LimitMEMLOCK=infinity"),
                "{}: GPU/RDMA daemons need LimitMEMLOCK=infinity",
                unit.display()
            );
        }
        // Verify against the built binaries (the unit's paths exist only once installed).
        let staged = tmp.path().join(unit.file_name().unwrap());
        std::fs::write(&staged, text.replace("/usr/local/bin/", &format!("{}/", bins.display()))).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&staged)
            .output()
            .expect("systemd-analyze (apt install systemd)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Users and groups exist only on an installed node; anything else is a defect.
        let problems: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("Failed to resolve user") && !l.contains("Failed to resolve group"))
            .collect();
        assert!(out.status.success() && problems.is_empty(), "{}:\n{stderr}", unit.display());
    }
}

#[test]
fn install_script_lays_out_and_removes_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let built = pdserve::up::binary("pdserve").unwrap().parent().unwrap().to_path_buf();
    let run = |args: &[&str]| {
        let out = Command::new("bash")
            .arg(repo().join("scripts/install.sh"))
            .args(args)
            .env("DESTDIR", &root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["--bin-dir", built.to_str().unwrap(), "--strip"]);
    for f in [
        "usr/local/bin/prefill-server",
        "usr/local/bin/decode-server",
        "usr/local/bin/pdserve-router",
        "usr/local/bin/pdserve",
        "etc/systemd/system/pdserve-prefill@.service",
        "etc/pdserve/decode.toml",
        "var/lib/pdserve/models/tiny/config.json",
        "usr/lib/pdserve/nixl/libnixl_capi.so",
        "usr/lib/pdserve/ucx/libucp.so.0",
    ] {
        assert!(root.join(f).exists(), "{f} not installed");
    }
    // The installed binaries work with the installed NIXL and UCX libraries.
    let out = Command::new(root.join("usr/local/bin/pdserve"))
        .args([
            "kvbench",
            "--backend",
            "nixl,ucx",
            "--sizes",
            "64KiB",
            "--iters",
            "2",
            "--warmup",
            "1",
        ])
        .env("PDSERVE_NIXL_LIB_DIR", root.join("usr/lib/pdserve/nixl"))
        .env("PDSERVE_UCX_LIB_DIR", root.join("usr/lib/pdserve/ucx"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.matches("| yes |").count() == 2,
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An operator's edited config survives a re-install.
    std::fs::write(root.join("etc/pdserve/decode.toml"), "listen = \"0.0.0.0:9\"\n").unwrap();
    run(&["--bin-dir", built.to_str().unwrap(), "--strip"]);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/pdserve/decode.toml")).unwrap(),
        "listen = \"0.0.0.0:9\"\n"
    );
    run(&["--uninstall"]);
    assert!(!root.join("usr/local/bin/decode-server").exists() && !root.join("etc/systemd/system/pdserve-decode.service").exists());
    assert!(!root.join("usr/lib/pdserve").exists());
    assert!(root.join("etc/pdserve/decode.toml").exists(), "--uninstall keeps configs");
    run(&["--purge"]);
    assert!(!root.join("etc/pdserve").exists() && !root.join("var/lib/pdserve").exists());
}

/// `ExecStart=` of a unit, split into words.
fn exec_start(unit: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).unwrap();
    let line = text.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    line.split_whitespace().map(String::from).collect()
}

/// Starts a unit's ExecStart as systemd would: `/usr/local/bin` -> the built binaries,
/// `/etc/pdserve` -> the shipped configs/, working directory /var/lib/pdserve -> `state`,
/// `env` as from its EnvironmentFile, and NOTIFY_SOCKET.
fn start_unit(unit: &str, bins: &Path, state: &Path, env: &HashMap<&str, String>, notify: &Path) -> Daemon {
    let words = exec_start(unit);
    let exe = bins.join(Path::new(&words[0]).file_name().unwrap());
    let args: Vec<String> = words[1..]
        .iter()
        .map(|w| w.replace("/etc/pdserve/", &format!("{}/configs/", repo().display())))
        .collect();
    let log = std::fs::File::create(state.join(format!("{unit}.log"))).unwrap();
    Daemon(
        Command::new(exe)
            .args(&args)
            .current_dir(state)
            .envs(env)
            .env("NOTIFY_SOCKET", notify)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

#[test]
fn units_exec_start_with_shipped_configs_serves_a_request() {
    units_serve_a_request(false);
}

/// The same units with discovery from their environment files alone: no peer lists
/// (the shipped defaults are dropped under discovery), an etcd and the internal token.
#[test]
fn units_find_each_other_through_etcd() {
    units_serve_a_request(true);
}

fn units_serve_a_request(discovery: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = discovery.then(|| {
        let run = e2e::free_port_run(2);
        rt.block_on(discovery::EmbeddedEtcd::start(&tmp.path().join("etcd"), "127.0.0.1", run, run + 1))
            .expect("etcd starts (apt install etcd-server)")
    });
    let bins = bin_dir(tmp.path());
    let state = tmp.path().join("var-lib-pdserve");
    // The shipped configs name models/tiny under the working directory, as install.sh makes it.
    engine::synth::synthesize(engine::Arch::Llama, engine::synth::Preset::Tiny, 0, &state.join("models/tiny")).unwrap();
    let (p, d, r) = (free_port(), free_port(), free_port());
    let (pm, dm, rm) = (free_port(), free_port(), free_port());
    let mut prefill_env = HashMap::from([
        ("PDSERVE_LISTEN", format!("127.0.0.1:{p}")),
        ("PDSERVE_METRICS_LISTEN", format!("127.0.0.1:{pm}")),
    ]);
    let mut decode_env = HashMap::from([
        ("PDSERVE_LISTEN", format!("127.0.0.1:{d}")),
        ("PDSERVE_METRICS_LISTEN", format!("127.0.0.1:{dm}")),
    ]);
    let mut router_env = HashMap::from([
        ("PDSERVE_LISTEN", format!("127.0.0.1:{r}")),
        ("PDSERVE_METRICS_LISTEN", format!("127.0.0.1:{rm}")),
        // Not the shipped 8000: the two unit tests run at once.
        ("PDSERVE_HTTP_LISTEN", format!("127.0.0.1:{}", free_port())),
    ]);
    match &etcd {
        None => {
            decode_env.insert("PDSERVE_PREFILL_SERVERS", format!("http://127.0.0.1:{p}"));
            router_env.insert("PDSERVE_DECODE_SERVERS", format!("http://127.0.0.1:{d}"));
        }
        Some(etcd) => {
            for env in [&mut prefill_env, &mut decode_env, &mut router_env] {
                env.insert("PDSERVE_DISCOVERY__ETCD", etcd.url.clone());
                env.insert("PDSERVE_INTERNAL_TOKEN", "units-discovery-token".into());
                env.insert("PDSERVE_DISCOVERY__DEREGISTER_GRACE_MS", "200".into());
            }
        }
    }
    let mut daemons = Vec::new();
    for (unit, env) in [
        ("pdserve-prefill.service", &prefill_env),
        ("pdserve-decode.service", &decode_env),
        ("pdserve-router.service", &router_env),
    ] {
        // systemd's side of Type=notify: a datagram socket the daemon reports to.
        let sock_path = tmp.path().join(format!("{unit}.notify"));
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let started = Instant::now();
        let daemon = start_unit(unit, &bins, &state, env, &sock_path);
        let mut buf = [0u8; 512];
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{unit}: no READY=1 within 60 s: {e}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(msg.contains("READY=1"), "{unit} sent {msg:?}");
        eprintln!("{unit}: READY=1 after {:?}", started.elapsed());
        daemons.push((unit, daemon, sock));
    }
    rt.block_on(async {
        let router = format!("http://127.0.0.1:{r}");
        let mut last = String::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let result = loop {
            let attempt = async {
                let mut c = pb::generation_client::GenerationClient::connect(router.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                let req = pb::GenerateRequest {
                    request_id: "deploy-test".into(),
                    input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds { ids: (1..40).collect() })),
                    sampling: Some(pb::SamplingParameters {
                        max_tokens: Some(8),
                        ignore_eos: Some(true),
                        temperature: Some(0.0),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                c.generate_once(req)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
            };
            match attempt.await {
                Ok(r) => break r,
                Err(e) if Instant::now() < deadline => {
                    last = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no answer through the units' deployment: {e} (before: {last})"),
            }
        };
        let engine = engine::Engine::load(&engine::EngineConfig {
            model: state.join("models/tiny"),
            kv_cache_mib: 16,
            ..Default::default()
        })
        .unwrap();
        let want = engine::generate_local(
            &engine,
            &(1..40).collect::<Vec<u32>>(),
            &engine::SamplingParams {
                max_tokens: 8,
                ignore_eos: true,
                temperature: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(result.token_ids, want.tokens, "the units' deployment equals the colocated run");
        assert_eq!(result.kv_backend, "tcp", "the shipped configs use the tcp backend");
        let kv_bytes = result.timings.unwrap().kv_bytes;
        // What an operator scrapes, after that one request.
        let decode = scrape(dm);
        assert_eq!(
            sample(&decode, "pdserve_time_to_first_token_seconds_count", &[]),
            Some(1.0),
            "{decode}"
        );
        assert_eq!(sample(&decode, "pdserve_inter_token_latency_seconds_count", &[]), Some(7.0));
        assert_eq!(sample(&decode, "pdserve_requests_total", &["outcome=\"ok\""]), Some(1.0));
        assert_eq!(sample(&decode, "pdserve_generation_tokens_total", &[]), Some(8.0));
        assert_eq!(
            sample(&decode, "pdserve_kv_blocks_free", &[]),
            sample(&decode, "pdserve_kv_blocks_total", &[])
        );
        assert_eq!(sample(&decode, "pdserve_num_requests_waiting", &[]), Some(0.0));
        let prefill = scrape(pm);
        assert_eq!(
            sample(&prefill, "pdserve_kv_transfer_bytes_total", &["backend=\"tcp\""]),
            Some(kv_bytes as f64),
            "{prefill}"
        );
        assert_eq!(
            sample(&prefill, "pdserve_kv_transfer_duration_seconds_count", &["backend=\"tcp\""]),
            Some(1.0)
        );
        assert_eq!(
            sample(&prefill, "pdserve_kv_registered_regions", &[]),
            Some(4.0),
            "K and V of the tiny model's 2 layers"
        );
        let router = scrape(rm);
        assert_eq!(
            sample(&router, "pdserve_requests_total", &["outcome=\"ok\"", "daemon=\"router\""]),
            Some(1.0),
            "{router}"
        );
    });
    // SIGTERM, as `systemctl stop` sends: each exits 0 and says STOPPING=1 first.
    for (unit, mut d, sock) in daemons.into_iter().rev() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(d.0.id() as i32, libc::SIGTERM) };
        let mut buf = [0u8; 512];
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{unit}: no STOPPING=1 after SIGTERM: {e}"));
        assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"), "{unit}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = d.0.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "no exit within 60 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(0), "{unit} exits 0 after SIGTERM");
    }
}

/// `pdserve doctor` on this machine: every backend's real write succeeds and is
/// reported; a missing requirement is exit code 1 with its name; JSON parses.
#[test]
fn doctor_reports_backends_and_enforces_requirements() {
    let exe = pdserve::up::binary("pdserve").unwrap();
    let out = Command::new(&exe).args(["doctor", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let by_name = |n: &str| {
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("no {n} check"))
    };
    for b in ["nixl", "ucx", "tcp"] {
        let c = by_name(&format!("write through {b}"));
        assert_eq!(c["status"], "ok", "{c}");
        assert!(c["detail"].as_str().unwrap().contains("bytes verified"));
    }
    assert_eq!(by_name("NIXL")["status"], "ok");
    assert!(
        by_name("UCX")["detail"].as_str().unwrap().contains("cuda_ipc"),
        "the libucx-cu13 wheel has CUDA transports"
    );
    for name in ["RDMA devices", "GPUDirect RDMA", "memlock limit", "GPUs and driver"] {
        by_name(name);
    }
    // This CI machine has no RDMA NIC: requiring one fails and says so.
    if by_name("RDMA devices")["status"] != "ok" {
        let out = Command::new(&exe)
            .args(["doctor", "--require", "rdma", "--backend", "tcp"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("required but not ready: rdma"));
    }
}
