//! TLS, mutual TLS between the daemons, and the client API's bearer token, with the
//! real daemons started from config files as an operator writes them.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::{Daemon, free_port, start_daemon as start};
use proto::v1 as pb;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA, and a certificate it signed for localhost/127.0.0.1 that every daemon uses
    /// as server and as client; and a second, unrelated CA.
    fn new(dir: &Path) -> Pki {
        let write = |name: &str, pem: String| std::fs::write(dir.join(name), pem).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        write("ca.pem", ca_cert.pem());
        let node_key = KeyPair::generate().unwrap();
        let node = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&node_key, &ca_cert, &ca_key)
            .unwrap();
        write("node.pem", node.pem());
        write("node.key", node_key.serialize_pem());
        let other_key = KeyPair::generate().unwrap();
        let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        write("other-ca.pem", other.self_signed(&other_key).unwrap().pem());
        Pki { dir: dir.to_path_buf() }
    }
    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
    /// A `[tls]` section: serve with the node certificate, require client certificates
    /// from our CA when `mutual`, and trust `ca` for the peers this daemon calls.
    fn section(&self, mutual: bool, ca: &str) -> String {
        let mut s = format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
            self.path("node.pem"),
            self.path("node.key"),
            self.path(ca)
        );
        if mutual {
            s += &format!("client_ca = {:?}\n", self.path("ca.pem"));
        }
        s
    }
}

const TOKEN: &str = "s3cret-token";

struct Secured {
    router: u16,
    decode: u16,
    _daemons: Vec<Daemon>,
}

/// prefill <-mTLS- decode <-mTLS- router <-TLS + token- clients, and the router's
/// early prefills over mTLS. `decode_trusts` is the
/// CA the decode-server verifies the prefill-server with.
fn deploy(dir: &Path, pki: &Pki, decode_trusts: &str) -> Secured {
    let engine = format!(
        "[engine]\nmodel = {:?}\nkv_cache_mib = 32\n\n[transfer]\nbackend = \"tcp\"\n",
        e2e::model().display().to_string()
    );
    let (p, d, r) = (free_port(), free_port(), free_port());
    let prefill = start(
        "prefill-server",
        dir,
        "prefill",
        &format!("listen = \"127.0.0.1:{p}\"\n{}\n{engine}", pki.section(true, "ca.pem")),
    );
    let decode = start(
        "decode-server",
        dir,
        "decode",
        &format!(
            "listen = \"127.0.0.1:{d}\"\nprefill_servers = [\"https://127.0.0.1:{p}\"]\nauth_token = \"{TOKEN}\"\n{}\n{engine}",
            pki.section(true, decode_trusts)
        ),
    );
    let router = start(
        "router",
        dir,
        "router",
        &format!(
            "listen = \"127.0.0.1:{r}\"\ndecode_servers = [\"https://127.0.0.1:{d}\"]\nprefill_servers = [\"https://127.0.0.1:{p}\"]\nauth_token = \"{TOKEN}\"\n{}",
            pki.section(false, "ca.pem")
        ),
    );
    Secured {
        router: r,
        decode: d,
        _daemons: vec![prefill, decode, router],
    }
}

fn client(pki: &Pki, token: Option<&str>, ca: &str) -> pdserve::client::ClientArgs {
    pdserve::client::ClientArgs {
        ca: Some(pki.path(ca).into()),
        token: token.map(String::from),
        ..Default::default()
    }
}

fn request() -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: String::new(),
        input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds { ids: (1..30).collect() })),
        sampling: Some(pb::SamplingParameters {
            max_tokens: Some(6),
            ignore_eos: Some(true),
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn generate(url: &str, c: &pdserve::client::ClientArgs) -> Result<pb::GenerateResult, String> {
    let attempt = async {
        let mut g = c.connect(url).await.map_err(|e| format!("connect: {e:#}"))?;
        g.generate_once(c.request(request()))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    };
    tokio::time::timeout(Duration::from_secs(20), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer within 20 s".into()))
}

/// Retries until the deployment answers (the daemons load the model first).
async fn until_served(url: &str, c: &pdserve::client::ClientArgs) -> pb::GenerateResult {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match generate(url, c).await {
            Ok(r) => return r,
            Err(e) if Instant::now() > deadline => panic!("the TLS deployment never answered: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mutual_tls_and_token_guard_the_deployment() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let dep = deploy(dir.path(), &pki, "ca.pem");
    let router = format!("https://127.0.0.1:{}", dep.router);

    // The right CA and token: served over TLS end to end, tokens as the one-process run.
    let ok = until_served(&router, &client(&pki, Some(TOKEN), "ca.pem")).await;
    let want = engine::generate_local(
        e2e::reference_engine(),
        &(1..30).collect::<Vec<u32>>(),
        &engine::SamplingParams {
            max_tokens: 6,
            ignore_eos: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ok.token_ids, want.tokens);
    let log = std::fs::read_to_string(dir.path().join("prefill.log")).unwrap();
    assert!(log.contains("early=true"), "the router's early prefill came over mTLS:\n{log}");

    // No token, a wrong token: UNAUTHENTICATED, with a message a person understands.
    let e = generate(&router, &client(&pki, None, "ca.pem")).await.unwrap_err();
    assert!(e.starts_with("Unauthenticated") && e.contains("Bearer"), "{e}");
    let e = generate(&router, &client(&pki, Some("guess"), "ca.pem")).await.unwrap_err();
    assert!(e.starts_with("Unauthenticated: wrong bearer token"), "{e}");

    // A client that does not trust the server's CA, and plaintext to the TLS port: refused
    // cleanly, quickly.
    let e = generate(&router, &client(&pki, Some(TOKEN), "other-ca.pem")).await.unwrap_err();
    assert!(!e.contains("within 20 s"), "{e}");
    let t = Instant::now();
    let e = generate(&format!("http://127.0.0.1:{}", dep.router), &pdserve::client::ClientArgs::default())
        .await
        .unwrap_err();
    assert!(!e.contains("within 20 s") && t.elapsed() < Duration::from_secs(10), "{e}");

    // The decode-server wants a client certificate (mutual TLS): the right CA and token
    // without one is not enough; with the node's certificate it serves.
    let decode = format!("https://127.0.0.1:{}", dep.decode);
    let e = generate(&decode, &client(&pki, Some(TOKEN), "ca.pem")).await.unwrap_err();
    assert!(!e.contains("within 20 s"), "{e}");
    let with_cert = pdserve::client::ClientArgs {
        cert: Some(pki.path("node.pem").into()),
        key: Some(pki.path("node.key").into()),
        ..client(&pki, Some(TOKEN), "ca.pem")
    };
    assert_eq!(generate(&decode, &with_cert).await.unwrap().token_ids, want.tokens);
}

/// A prefill-server whose certificate the decode-server does not trust is never
/// handshaken (no KV memory metadata is exchanged): the decode-server says why, never
/// reports SERVING, and the router answers UNAVAILABLE at once, starting nothing on the
/// prefill-server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_prefill_server_is_never_used() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let dep = deploy(dir.path(), &pki, "other-ca.pem");
    let deadline = Instant::now() + Duration::from_secs(60);
    let log = loop {
        let log = std::fs::read_to_string(dir.path().join("decode.log")).unwrap_or_default();
        if log.contains("handshake failed") {
            break log;
        }
        assert!(Instant::now() < deadline, "no handshake failure logged: {log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        log.contains("certificate") || log.contains("tls") || log.contains("transport"),
        "{log}"
    );
    assert!(!log.contains("prefill-server handshaken"), "{log}");
    let t = Instant::now();
    let e = generate(&format!("https://127.0.0.1:{}", dep.router), &client(&pki, Some(TOKEN), "ca.pem"))
        .await
        .unwrap_err();
    assert!(e.starts_with("Unavailable"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // With no decode-server to take the request, the router started nothing early on
    // the prefill-server (an unclaimed start is logged once its 2 s hold ends).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let prefill_log = std::fs::read_to_string(dir.path().join("prefill.log")).unwrap();
    assert!(!prefill_log.contains("early prefill"), "{prefill_log}");
}
