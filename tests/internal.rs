//! The internal plane, attacked: every method of every daemon without its credential,
//! forged sessions, another host's data-plane address in a Handshake, a restarted
//! prefill-server between two decode-servers, raw bytes at the tcp data plane, bad
//! requests at every entry point, and foreign clients (Python grpcio, reflection).
//! Real daemons from config files, real sockets. After every attack: nothing written
//! (all KV blocks free) and the victim's tokens still equal the one-process run.
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::{Daemon, free_port, reference_engine, start_daemon};
use kv_transfer::{Agent, BackendKind, HostBuffer, Memory, TransferConfig};
use proto::v1 as pb;
use proto::v1::decode_admin_client::DecodeAdminClient;
use proto::v1::generation_client::GenerationClient;
use proto::v1::prefill_client::PrefillClient;
use tonic::Code;
use tonic::transport::Channel;

const CLIENT: &str = "client-secret";
const INTERNAL: &str = "internal-secret";

/// A deployment: prefill-servers, decode-servers (each with a fixed tcp data-plane
/// port), and a router, all with both tokens.
struct Cluster {
    dir: tempfile::TempDir,
    prefill: Vec<u16>,
    decode: Vec<u16>,
    data: Vec<u16>,
    router: u16,
    daemons: Vec<(String, Daemon)>,
}

fn engine_section(tcp_port: u16) -> String {
    format!(
        "[engine]\nmodel = {:?}\nkv_cache_mib = 32\n\n[transfer]\nbackend = \"tcp\"\ndeadline_ms = 4000\ntcp_bind = \"127.0.0.1:{tcp_port}\"\n",
        e2e::model().display().to_string()
    )
}

fn prefill_config(port: u16) -> String {
    format!(
        "listen = \"127.0.0.1:{port}\"\ninternal_token = \"{INTERNAL}\"\n{}",
        engine_section(0)
    )
}

impl Cluster {
    async fn start(prefill: usize, decode: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cluster {
            prefill: (0..prefill).map(|_| free_port()).collect(),
            decode: (0..decode).map(|_| free_port()).collect(),
            data: (0..decode).map(|_| free_port()).collect(),
            router: free_port(),
            daemons: Vec::new(),
            dir,
        };
        for (i, &p) in c.prefill.clone().iter().enumerate() {
            c.spawn("prefill-server", &format!("prefill-{i}"), &prefill_config(p));
        }
        let peers = c
            .prefill
            .iter()
            .map(|p| format!("\"http://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        for i in 0..decode {
            let cfg = format!(
                "listen = \"127.0.0.1:{}\"\nauth_token = \"{CLIENT}\"\ninternal_token = \"{INTERNAL}\"\nprefill_servers = [{peers}]\nprefill_deadline_ms = 10000\n{}",
                c.decode[i],
                engine_section(c.data[i])
            );
            c.spawn("decode-server", &format!("decode-{i}"), &cfg);
        }
        let ds = c
            .decode
            .iter()
            .map(|p| format!("\"http://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let cfg = format!(
            "listen = \"127.0.0.1:{}\"\nauth_token = \"{CLIENT}\"\ninternal_token = \"{INTERNAL}\"\ndecode_servers = [{ds}]\nprefill_servers = [{peers}]\n",
            c.router
        );
        c.spawn("router", "router", &cfg);
        for &d in &c.decode {
            c.until_handshaken(d, prefill).await;
        }
        c.until_serving(c.router, "pdserve.v1.Generation").await;
        c
    }

    /// Starts `name`, killing (and reaping) a running one of that name first.
    fn spawn(&mut self, bin: &str, name: &str, cfg: &str) {
        self.daemons.retain(|(n, _)| n != name);
        let d = start_daemon(bin, self.dir.path(), name, cfg);
        self.daemons.push((name.to_string(), d));
    }

    async fn until_serving(&self, port: u16, service: &'static str) {
        self.until(|| async move { pdserve::up::serving(&url(port), service).await }).await;
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    async fn until<F, Fut>(&self, ok: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !ok().await {
            assert!(
                Instant::now() < deadline,
                "deployment not ready; logs:\n{}",
                self.daemons
                    .iter()
                    .map(|(n, _)| format!("== {n}\n{}", self.log(n)))
                    .collect::<String>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn until_handshaken(&self, decode: u16, n: usize) {
        self.until(|| async move { stats(decode).await.is_some_and(|s| s.healthy_prefill_servers as usize == n) })
            .await;
    }
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

async fn channel(port: u16) -> Channel {
    tonic::transport::Endpoint::from_shared(url(port)).unwrap().connect().await.unwrap()
}

fn with<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    daemon::auth::BearerToken::new(token.unwrap_or("")).attach(&mut r);
    r
}

async fn stats(decode: u16) -> Option<pb::StatsResponse> {
    pdserve::up::stats(&url(decode), Some(INTERNAL)).await
}

/// Every block free and no sequence left on the decode-server (waiting out a failed
/// prefill's hold: the transfer deadline and a second).
async fn all_free(decode: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = stats(decode).await.expect("stats");
        if s.free_blocks == s.total_blocks && s.sequences == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "KV blocks held: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const PROMPT: std::ops::Range<u32> = 1..30;

fn request() -> pb::GenerateRequest {
    e2e::request(
        pb::generate_request::Input::TokenIds(pb::TokenIds { ids: PROMPT.collect() }),
        &engine::SamplingParams {
            max_tokens: 6,
            ignore_eos: true,
            ..Default::default()
        },
    )
}

fn reference_tokens() -> Vec<u32> {
    engine::generate_local(
        reference_engine(),
        &PROMPT.collect::<Vec<u32>>(),
        &engine::SamplingParams {
            max_tokens: 6,
            ignore_eos: true,
            ..Default::default()
        },
    )
    .unwrap()
    .tokens
}

/// A generate with the client token at `port` (router or decode-server): its tokens.
async fn generate(port: u16) -> Result<Vec<u32>, tonic::Status> {
    let mut c = GenerationClient::new(channel(port).await);
    Ok(c.generate_once(with(request(), Some(CLIENT))).await?.into_inner().token_ids)
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_needs_its_credential() {
    let c = Cluster::start(1, 1).await;
    let (p, d, r) = (c.prefill[0], c.decode[0], c.router);
    let want = reference_tokens();
    for creds in [None, Some("guess"), Some(CLIENT)] {
        // The prefill-server's four methods take the internal token only.
        let mut pc = PrefillClient::new(channel(p).await);
        assert_eq!(
            code(pc.handshake(with(pb::HandshakeRequest::default(), creds)).await),
            Code::Unauthenticated
        );
        assert_eq!(
            code(pc.prefill(with(pb::PrefillRequest::default(), creds)).await),
            Code::Unauthenticated
        );
        assert_eq!(code(pc.early_prefill(with(request(), creds)).await), Code::Unauthenticated);
        assert_eq!(
            code(pc.drop_early(with(pb::DropEarlyRequest::default(), creds)).await),
            Code::Unauthenticated
        );
        let mut admin = DecodeAdminClient::new(channel(d).await);
        assert_eq!(code(admin.stats(with(pb::StatsRequest {}, creds)).await), Code::Unauthenticated);
        // Both workers' KV events (what the router's KV-aware routing follows) too.
        for port in [p, d] {
            let mut ev = pb::kv_events_client::KvEventsClient::new(channel(port).await);
            let sub = ev.subscribe_kv_events(with(pb::SubscribeKvEventsRequest::default(), creds)).await;
            assert_eq!(code(sub.map(|_| ())), Code::Unauthenticated, "KvEvents on {port}");
        }
    }
    // With the internal token: a snapshot first, with the model's hash parameters.
    for port in [p, d] {
        let mut ev = pb::kv_events_client::KvEventsClient::new(channel(port).await);
        let bad = ev
            .subscribe_kv_events(with(pb::SubscribeKvEventsRequest { heartbeat_ms: 50 }, Some(INTERNAL)))
            .await;
        assert_eq!(code(bad.map(|_| ())), Code::InvalidArgument, "a heartbeat below 100 ms");
        let mut s = ev
            .subscribe_kv_events(with(pb::SubscribeKvEventsRequest::default(), Some(INTERNAL)))
            .await
            .unwrap()
            .into_inner();
        let first = s.message().await.unwrap().unwrap();
        match first.kind {
            Some(pb::kv_events_message::Kind::Snapshot(snap)) => {
                assert!(snap.first && snap.block_size == 16 && snap.model_fingerprint != 0, "{snap:?}")
            }
            other => panic!("the first message is not a snapshot: {other:?}"),
        }
    }
    for creds in [None, Some("guess"), Some(INTERNAL)] {
        // The client API takes the client token only.
        for port in [d, r] {
            let mut g = GenerationClient::new(channel(port).await);
            assert_eq!(code(g.generate(with(request(), creds)).await), Code::Unauthenticated);
            assert_eq!(code(g.generate_once(with(request(), creds)).await), Code::Unauthenticated);
        }
    }
    // Health stays open (load balancers), and the right credentials are served.
    for (port, svc) in [
        (p, "pdserve.v1.Prefill"),
        (d, "pdserve.v1.Generation"),
        (r, "pdserve.v1.Generation"),
    ] {
        assert!(pdserve::up::serving(&url(port), svc).await, "{svc} on {port}");
    }
    assert_eq!(generate(r).await.unwrap(), want);
    assert_eq!(generate(d).await.unwrap(), want);
    all_free(d).await;
    // No early prefill was started by the refused EarlyPrefills: the only ones the
    // prefill-server saw were the router's, with the token.
    assert!(!c.log("prefill-0").contains("early prefill not claimed"), "{}", c.log("prefill-0"));
}

/// A test-process data-plane agent with the tiny model's pool count, as an insider
/// (holding the internal token) would make to impersonate a decode-server.
async fn mallory() -> (Agent, Vec<kv_transfer::Registration>, Vec<u32>) {
    let agent = Agent::start(&TransferConfig {
        backend: BackendKind::Tcp,
        name: "mallory".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let pools = reference_engine().pools().regions().unwrap().len();
    let regs: Vec<_> = (0..pools)
        .map(|_| agent.register(Memory::host(std::sync::Arc::new(HostBuffer::new(1 << 16)))).unwrap())
        .collect();
    let ids = regs.iter().map(|r| r.id().0).collect();
    (agent, regs, ids)
}

fn handshake_request(peer_name: &str, metadata: Vec<u8>, regions: Vec<u32>, key: Vec<u8>) -> pb::HandshakeRequest {
    pb::HandshakeRequest {
        peer_name: peer_name.into(),
        layout: Some(daemon::convert::layout_to_wire(reference_engine().layout())),
        backend: "tcp".into(),
        transfer_metadata: metadata,
        pool_regions: regions,
        data_plane_key: key,
    }
}

fn prefill_request(h: &pb::HandshakeResponse, peer_name: &str) -> pb::PrefillRequest {
    pb::PrefillRequest {
        request_id: "forged".into(),
        session: h.session.clone(),
        boot_id: h.boot_id.clone(),
        peer_name: peer_name.into(),
        token_ids: PROMPT.collect(),
        dst_blocks: vec![0, 1],
        notify_tag: 7,
        sampling: None,
        write_by_ms: 0,
        cache_salt: String::new(),
        dst_cached_blocks: 0,
    }
}

/// Drains a Prefill stream: the status it ends with.
async fn prefill_outcome(pc: &mut PrefillClient<Channel>, req: pb::PrefillRequest) -> Code {
    let mut s = match pc.prefill(with(req, Some(INTERNAL))).await {
        Ok(s) => s.into_inner(),
        Err(e) => return e.code(),
    };
    loop {
        match s.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Code::Ok,
            Err(e) => return e.code(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_sessions_and_foreign_metadata_write_nothing() {
    let c = Cluster::start(1, 1).await;
    let (p, d) = (c.prefill[0], c.decode[0]);
    let want = reference_tokens();
    let mut pc = PrefillClient::new(channel(p).await);

    // A guessed session and boot id.
    let guessed = pb::HandshakeResponse {
        session: vec![1; 16],
        boot_id: vec![2; 16],
        ..Default::default()
    };
    assert_eq!(
        prefill_outcome(&mut pc, prefill_request(&guessed, "mallory")).await,
        Code::FailedPrecondition
    );

    // An insider's own session, used in another decode-server's name.
    let (agent, _regs, regions) = mallory().await;
    let md = agent.local_metadata().await.unwrap();
    let key = agent.issue_key();
    let h = pc
        .handshake(with(
            handshake_request(agent.name(), md.clone(), regions.clone(), key.clone()),
            Some(INTERNAL),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.session.len(), 16);
    assert_eq!(
        prefill_outcome(&mut pc, prefill_request(&h, "decode-someone")).await,
        Code::PermissionDenied
    );

    // A Handshake whose name is not the agent in its metadata.
    let e = pc
        .handshake(with(
            handshake_request("someone-else", md.clone(), regions.clone(), key.clone()),
            Some(INTERNAL),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Another host's data-plane address (the victim decode-server's tcp port) in the
    // metadata, with a key the victim never issued: the prefill-server's write is
    // refused by the victim before a byte lands.
    let mut foreign = kv_transfer::Metadata::decode(&md, BackendKind::Tcp).unwrap();
    foreign.conn = format!("127.0.0.1:{}", c.data[0]).into_bytes();
    let h = pc
        .handshake(with(
            handshake_request(agent.name(), foreign.encode(), regions, key),
            Some(INTERNAL),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prefill_outcome(&mut pc, prefill_request(&h, agent.name())).await, Code::Unavailable);
    let log = c.log("decode-0");
    assert!(
        log.contains("tcp data-plane") || log.contains("refus"),
        "the victim says why:\n{log}"
    );

    all_free(d).await;
    assert_eq!(generate(c.router).await.unwrap(), want, "the victim still serves exactly");
    all_free(d).await;
}

/// Session ids used to count from 1 in every prefill-server process: after a restart,
/// decode-server B's old session 1 named decode-server A's new one, and B's blocks
/// went into A's pools. Now both are refused and handshake again; tokens stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_prefill_server_takes_no_old_session() {
    let mut c = Cluster::start(1, 2).await;
    let want = reference_tokens();
    for &d in &c.decode {
        assert_eq!(generate(d).await.unwrap(), want);
    }
    let p = c.prefill[0];
    c.spawn("prefill-server", "prefill-0", &prefill_config(p)); // the old one is killed first
    c.until_serving(p, "pdserve.v1.Prefill").await;
    for &d in &c.decode {
        assert_eq!(generate(d).await.unwrap(), want, "decode-server {d} after the restart");
    }
    for &d in &c.decode {
        all_free(d).await;
    }
    let log = c.log("prefill-0");
    assert_eq!(log.matches("decode-server handshaken").count(), 2, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_bytes_at_the_tcp_data_plane_write_nothing() {
    use std::io::{Read, Write};
    let c = Cluster::start(1, 1).await;
    let d = c.decode[0];
    let frame = |nseg: u32| {
        let mut f = Vec::new();
        f.extend_from_slice(&0x5044_4b57u32.to_le_bytes()); // the write frame's magic
        f.extend_from_slice(&7u64.to_le_bytes());
        f.extend_from_slice(&nseg.to_le_bytes());
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&0u64.to_le_bytes());
        f.extend_from_slice(&64u64.to_le_bytes());
        f.extend_from_slice(&[0xAB; 64]);
        f
    };
    for nseg in [1, 4_000_000] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", c.data[0])).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&frame(nseg));
        // The target closes the connection (after at most its challenge), without an answer.
        let mut got = Vec::new();
        let t = Instant::now();
        let _ = s.read_to_end(&mut got);
        assert!(t.elapsed() < Duration::from_secs(9), "the connection was left open");
        // The 32-byte challenge, then at most a refusal (status 1), never an OK (0).
        assert!(got.len() >= 32, "no challenge: {got:?}");
        assert!(got.len() == 32 || got[32] == 1, "the frame was not refused: {got:?}");
    }
    all_free(d).await;
    assert_eq!(generate(c.router).await.unwrap(), reference_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_argument_at_every_entry_point() {
    let c = Cluster::start(1, 1).await;
    let (p, d, r) = (c.prefill[0], c.decode[0], c.router);
    let text = |t: String| pb::generate_request::Input::Text(t);
    let ids = |v: Vec<u32>| pb::generate_request::Input::TokenIds(pb::TokenIds { ids: v });
    let sampling = |f: &dyn Fn(&mut pb::SamplingParameters)| {
        let mut s = pb::SamplingParameters {
            max_tokens: Some(4),
            ..Default::default()
        };
        f(&mut s);
        Some(s)
    };
    let base = |input, sampling| pb::GenerateRequest {
        request_id: "bad-1".into(),
        input: Some(input),
        sampling,
        cache_salt: String::new(),
    };
    let cases: Vec<(&str, pb::GenerateRequest)> = vec![
        (
            "request_id",
            pb::GenerateRequest {
                request_id: "x".repeat(200),
                ..base(ids(vec![1, 2]), None)
            },
        ),
        (
            "request_id",
            pb::GenerateRequest {
                request_id: "has space".into(),
                ..base(ids(vec![1, 2]), None)
            },
        ),
        (
            "no prompt",
            pb::GenerateRequest {
                input: None,
                ..base(ids(vec![]), None)
            },
        ),
        ("empty", base(text(String::new()), None)),
        ("empty", base(ids(vec![]), None)),
        ("exceeds the limit", base(text("word ".repeat(1 << 20)), None)),
        ("vocabulary", base(ids(vec![1, u32::MAX]), None)),
        ("stop strings", base(ids(vec![1, 2]), sampling(&|s| s.stop = vec!["s".repeat(300)]))),
        ("stop strings", base(ids(vec![1, 2]), sampling(&|s| s.stop = vec!["s".into(); 17]))),
        ("top_p", base(ids(vec![1, 2]), sampling(&|s| s.top_p = Some(0.0)))),
        ("temperature", base(ids(vec![1, 2]), sampling(&|s| s.temperature = Some(f32::NAN)))),
        ("max_tokens", base(ids(vec![1, 2]), sampling(&|s| s.max_tokens = Some(0)))),
    ];
    for (why, req) in &cases {
        // The router checks what needs no model (not the vocabulary); the decode-server
        // and the prefill-server's EarlyPrefill check everything.
        let mut targets: Vec<(&str, u16, Option<&str>)> = vec![("decode", d, Some(CLIENT)), ("early", p, Some(INTERNAL))];
        if *why != "vocabulary" {
            targets.push(("router", r, Some(CLIENT)));
        }
        for (name, port, token) in targets {
            let status = if name == "early" {
                PrefillClient::new(channel(port).await)
                    .early_prefill(with(req.clone(), token))
                    .await
                    .map(|_| ())
            } else {
                GenerationClient::new(channel(port).await)
                    .generate(with(req.clone(), token))
                    .await
                    .map(|_| ())
            };
            let s = status.expect_err(&format!("{name} took a request with a bad {why}"));
            assert_eq!(s.code(), Code::InvalidArgument, "{name}, {why}: {s:?}");
            assert!(s.message().contains(why), "{name}: {:?} does not say {why:?}", s.message());
        }
    }
    // The prefill-server's Prefill validates its tokens and sampling too (after the
    // session: an insider's own).
    let (agent, _regs, regions) = mallory().await;
    let mut pc = PrefillClient::new(channel(p).await);
    let h = pc
        .handshake(with(
            handshake_request(agent.name(), agent.local_metadata().await.unwrap(), regions, agent.issue_key()),
            Some(INTERNAL),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut bad = prefill_request(&h, agent.name());
    bad.token_ids = vec![1, u32::MAX];
    assert_eq!(prefill_outcome(&mut pc, bad).await, Code::InvalidArgument);
    let mut bad = prefill_request(&h, agent.name());
    bad.sampling = Some(pb::SamplingParameters {
        top_p: Some(2.0),
        ..Default::default()
    });
    assert_eq!(prefill_outcome(&mut pc, bad).await, Code::InvalidArgument);
    let mut bad = prefill_request(&h, agent.name());
    bad.request_id = "\u{7f}".into();
    assert_eq!(prefill_outcome(&mut pc, bad).await, Code::InvalidArgument);
    // Naming every block as held would leave the last one, and the notification, unwritten.
    for held in [2, u32::MAX] {
        let mut bad = prefill_request(&h, agent.name());
        bad.dst_cached_blocks = held;
        assert_eq!(prefill_outcome(&mut pc, bad).await, Code::InvalidArgument, "{held} blocks held");
    }
    all_free(d).await;
    assert_eq!(generate(r).await.unwrap(), reference_tokens());
}

/// A daemon whose internal API would be open to other hosts refuses to start.
#[test]
fn an_exposed_internal_api_needs_credentials_to_start() {
    let dir = tempfile::tempdir().unwrap();
    for (bin, extra) in [("prefill-server", ""), ("decode-server", "prefill_servers = []\n")] {
        let cfg = format!("listen = \"0.0.0.0:{}\"\n{extra}{}", free_port(), engine_section(0));
        let mut d = start_daemon(bin, dir.path(), bin, &cfg);
        let status = d.0.wait().unwrap();
        assert_eq!(status.code(), Some(64), "{bin}");
        let log = std::fs::read_to_string(dir.path().join(format!("{bin}.log"))).unwrap();
        assert!(log.contains("internal_token") && log.contains("allow_insecure_internal"), "{log}");
    }
}

fn python(script: &str, args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("python3")
        .arg(root.join("tests").join(script))
        .args(args)
        .env("PYTHONPATH", root.join(".deps/py"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed (run scripts/setup.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Python's own clients: `grpcio-reflection` (v1alpha) finds exactly the services each
/// daemon serves and calls Generate from the descriptors alone; a prompt that is not
/// UTF-8 is INVALID_ARGUMENT at the router and the decode-server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reflection_and_malformed_requests() {
    let (dep, _work) = e2e::deploy(BackendKind::Tcp, 1, 1, 64).await;
    let out = python("python_reflection.py", &[&dep.router, "hello", "4"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let services: Vec<&str> = v["services"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "pdserve.v1.Generation"
        ]
    );
    let tokens: Vec<u32> = v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let want = engine::generate_local(
        reference_engine(),
        &reference_engine().tokenize("hello").unwrap(),
        &engine::SamplingParams {
            max_tokens: 4,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(tokens, want.tokens);
    let listed = |url: &str| {
        let v: serde_json::Value = serde_json::from_str(&python("python_reflection.py", &[url, "--list", "0"])).unwrap();
        v["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(listed(&dep.decode[0]).contains(&"pdserve.v1.DecodeAdmin".to_string()));
    assert!(!listed(&dep.decode[0]).contains(&"pdserve.v1.Prefill".to_string()));
    let prefill = listed(&dep.prefill[0]);
    assert!(prefill.contains(&"pdserve.v1.Prefill".to_string()) && !prefill.contains(&"pdserve.v1.Generation".to_string()));
    for url in [&dep.router, &dep.decode[0]] {
        let out = python("python_client.py", &[url, "x", "2", "--invalid-utf8"]);
        assert!(out.contains("\"INVALID_ARGUMENT\""), "{url}: {out}");
    }
    e2e::stop_cleanly(dep).await;
}
