//! Registration and watching against a real etcd (the system's `etcd` binary, on
//! loopback ports this test picks).
use std::time::{Duration, Instant};

use discovery::{DiscoveryConfig, EmbeddedEtcd, Member, Registration, Role, View};

const SECRET: &str = "cluster-secret";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn etcd(dir: &tempdir::Dir) -> EmbeddedEtcd {
    EmbeddedEtcd::start(dir.path(), "127.0.0.1", free_port(), free_port())
        .await
        .expect("etcd starts (apt install etcd-server)")
}

/// A short lease, so that expiries show within a test's patience.
fn config(etcd: &EmbeddedEtcd, cluster: &str) -> DiscoveryConfig {
    let cfg = DiscoveryConfig {
        etcd: vec![etcd.url.clone()],
        cluster: cluster.into(),
        lease_ttl_s: 2,
        timeout_ms: 600,
        ..Default::default()
    };
    cfg.validate().unwrap();
    cfg
}

fn member(id: &str, role: Role) -> Member {
    Member {
        id: id.into(),
        role,
        url: format!("http://127.0.0.1:1/{id}"),
        http: String::new(),
        metrics: String::new(),
        layout: None,
        backend: "tcp".into(),
        device: "cpu".into(),
        kv_blocks: 8,
        max_batch: 1,
        version: "test".into(),
        started_unix: 0,
        seal: String::new(),
        instance: String::new(),
    }
}

/// Waits up to `within` for the view to satisfy `ok`.
async fn until(rx: &mut tokio::sync::watch::Receiver<View>, within: Duration, ok: impl Fn(&View) -> bool) -> Duration {
    let t = Instant::now();
    let r = tokio::time::timeout(within, rx.wait_for(|v| ok(v))).await.map(|r| r.is_ok());
    assert_eq!(r, Ok(true), "not within {within:?}: {:?}", *rx.borrow());
    t.elapsed()
}

mod tempdir {
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new(name: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("pdserve-discovery-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_come_go_expire_and_survive_an_etcd_outage() {
    let dir = tempdir::Dir::new("life");
    let mut etcd = etcd(&dir).await;
    let cfg = config(&etcd, "t");
    let mut view = discovery::watch(cfg.clone(), SECRET);
    until(&mut view, Duration::from_secs(5), |v| v.synced && v.members.is_empty()).await;

    // Registered: seen at once; deregistered: gone at once.
    let a = Registration::spawn(cfg.clone(), member("a", Role::Prefill), SECRET);
    let seen = until(&mut view, Duration::from_secs(2), |v| v.of(Role::Prefill).len() == 1).await;
    assert!(seen < Duration::from_secs(1), "registration seen after {seen:?}");
    let mut seen = view.borrow().of(Role::Prefill)[0].member.clone();
    assert_eq!(seen.seal.len(), 64, "sealed");
    seen.seal.clear();
    seen.instance.clear();
    assert_eq!(seen, member("a", Role::Prefill));
    let b = Registration::spawn(cfg.clone(), member("b", Role::Decode), SECRET);
    until(&mut view, Duration::from_secs(2), |v| v.of(Role::Decode).len() == 1).await;
    a.deregister().await;
    let gone = until(&mut view, Duration::from_secs(2), |v| v.of(Role::Prefill).is_empty()).await;
    assert!(gone < Duration::from_secs(1), "deregistration seen after {gone:?}");

    // Another cluster's members and records that are not members are not seen.
    let other = DiscoveryConfig {
        cluster: "u".into(),
        ..cfg.clone()
    };
    let _o = Registration::spawn(other.clone(), member("o", Role::Prefill), SECRET);
    // Nor are records that are not members, not under their own id, or not sealed
    // for the key and lease they are found under (a copy of b's sealed record, under
    // another id, or under b's key but no lease).
    let mut c = cfg.connect().await.unwrap();
    c.put("/pdserve/t/prefill/x", "not json", None).await.unwrap();
    c.put("/pdserve/t/decode/y", serde_json::to_vec(&member("z", Role::Decode)).unwrap(), None)
        .await
        .unwrap();
    let b_rec = c.get("/pdserve/t/decode/b", None).await.unwrap().kvs()[0].value().to_vec();
    let mut copied: Member = serde_json::from_slice(&b_rec).unwrap();
    copied.id = "b2".into();
    let lease = c.lease_grant(30, None).await.unwrap().id();
    let with_lease = Some(etcd_client::PutOptions::new().with_lease(lease));
    c.put("/pdserve/t/decode/b2", serde_json::to_vec(&copied).unwrap(), with_lease)
        .await
        .unwrap();
    let unsealed = Registration::spawn(cfg.clone(), member("u", Role::Decode), "another-secret");
    // Then a good one: once it is in, the bad ones (put before it) have been judged.
    let c2 = Registration::spawn(cfg.clone(), member("c", Role::Prefill), SECRET);
    until(&mut view, Duration::from_secs(3), |v| v.of(Role::Prefill).len() == 1).await;
    let keys: Vec<String> = view.borrow().members.keys().cloned().collect();
    assert_eq!(keys, ["/pdserve/t/decode/b", "/pdserve/t/prefill/c"]);
    c2.deregister().await;
    drop(unsealed);
    assert_eq!(discovery::list(&other, SECRET).await.unwrap().len(), 1);

    // etcd killed: the view keeps its members, marked stale; a member that registers
    // meanwhile (retrying) and one that leaves meanwhile are seen once etcd is back.
    etcd.kill();
    until(&mut view, Duration::from_secs(5), |v| v.stale).await;
    assert_eq!(view.borrow().of(Role::Decode).len(), 1, "last membership kept");
    let late = Registration::spawn(cfg.clone(), member("late", Role::Prefill), SECRET);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!late.registered());
    b.deregister().await; // etcd down: the lease will expire it
    etcd.restart().await.unwrap();
    until(&mut view, Duration::from_secs(10), |v| {
        !v.stale && v.of(Role::Prefill).len() == 1 && v.of(Role::Decode).is_empty()
    })
    .await;
    assert!(late.registered());

    // A registration no longer kept alive (its daemon died) expires with its lease.
    let dead = Registration::spawn(cfg.clone(), member("dead", Role::Decode), SECRET);
    until(&mut view, Duration::from_secs(2), |v| v.of(Role::Decode).len() == 1).await;
    drop(dead);
    let expired = until(&mut view, Duration::from_secs(5), |v| v.of(Role::Decode).is_empty()).await;
    assert!(
        expired > Duration::from_millis(1000),
        "removed by its lease's expiry, not at once: {expired:?}"
    );
    late.deregister().await;
}

/// etcd frozen past the lease (as a partition looks to it): on its return it expires
/// every lease it did not hear. A member that registers again within a lease of the
/// watch's return never leaves the view; one that does not is dropped a lease later,
/// not at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_expired_by_an_outage_linger_a_lease_for_their_return() {
    let dir = tempdir::Dir::new("linger");
    let etcd = etcd(&dir).await;
    let cfg = config(&etcd, "l");
    let mut view = discovery::watch(cfg.clone(), SECRET);
    let (x, y) = (member("x", Role::Prefill), member("y", Role::Prefill));
    let rx = Registration::spawn(cfg.clone(), x.clone(), SECRET);
    let ry = Registration::spawn(cfg.clone(), y.clone(), SECRET);
    until(&mut view, Duration::from_secs(3), |v| v.of(Role::Prefill).len() == 2).await;
    // SAFETY: signalling the etcd child this test started.
    unsafe { libc::kill(etcd.pid() as i32, libc::SIGSTOP) };
    drop((rx, ry)); // neither is kept alive: their leases run out while etcd is frozen
    until(&mut view, Duration::from_secs(15), |v| v.stale).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // SAFETY: as above.
    unsafe { libc::kill(etcd.pid() as i32, libc::SIGCONT) };
    until(&mut view, Duration::from_secs(10), |v| !v.stale).await;
    let mut c = cfg.connect().await.unwrap();
    let in_etcd = |r: etcd_client::GetResponse| r.kvs().len();
    let mut expired = false;
    for _ in 0..40 {
        expired = in_etcd(
            c.get("/pdserve/l/", Some(etcd_client::GetOptions::new().with_prefix()))
                .await
                .unwrap(),
        ) == 0;
        if expired {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(expired, "etcd did not expire the leases: the test would prove nothing");
    assert_eq!(
        view.borrow().of(Role::Prefill).len(),
        2,
        "members expired by the outage are kept for now"
    );
    // x comes back; y does not.
    let back = Registration::spawn(cfg.clone(), x.clone(), SECRET);
    let t = Instant::now();
    let mut seen_without_x = false;
    while t.elapsed() < Duration::from_secs(5) {
        seen_without_x |= !view.borrow().members.values().any(|e| e.member.id == "x");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!seen_without_x, "x left the view although it registered again");
    let v = view.borrow().clone();
    assert_eq!(
        v.of(Role::Prefill).len(),
        1,
        "y dropped a lease after etcd's return: {:?}",
        v.members.keys().collect::<Vec<_>>()
    );
    back.deregister().await;
}
