//! Registration and watching against a real etcd (the system's `etcd` binary, on
//! loopback ports this test picks).
use std::time::{Duration, Instant};

use discovery::{DiscoveryConfig, EmbeddedEtcd, Member, Registration, Role, View};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn etcd(dir: &tempdir::Dir) -> EmbeddedEtcd {
    EmbeddedEtcd::start(dir.path(), "127.0.0.1", free_port(), free_port()).await.expect("etcd starts (apt install etcd-server)")
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
    let cfg = DiscoveryConfig {
        etcd: vec![etcd.url.clone()],
        cluster: "t".into(),
        lease_ttl_s: 2,
        timeout_ms: 1_000,
        ..Default::default()
    };
    let mut view = discovery::watch(cfg.clone());
    until(&mut view, Duration::from_secs(5), |v| v.synced && v.members.is_empty()).await;

    // Registered: seen at once; deregistered: gone at once.
    let a = Registration::spawn(cfg.clone(), member("a", Role::Prefill));
    let seen = until(&mut view, Duration::from_secs(2), |v| v.of(Role::Prefill).len() == 1).await;
    assert!(seen < Duration::from_secs(1), "registration seen after {seen:?}");
    assert_eq!(view.borrow().of(Role::Prefill)[0].member, member("a", Role::Prefill));
    let b = Registration::spawn(cfg.clone(), member("b", Role::Decode));
    until(&mut view, Duration::from_secs(2), |v| v.of(Role::Decode).len() == 1).await;
    a.deregister().await;
    let gone = until(&mut view, Duration::from_secs(2), |v| v.of(Role::Prefill).is_empty()).await;
    assert!(gone < Duration::from_secs(1), "deregistration seen after {gone:?}");

    // Another cluster's members and records that are not members are not seen.
    let other = DiscoveryConfig {
        cluster: "u".into(),
        ..cfg.clone()
    };
    let _o = Registration::spawn(other.clone(), member("o", Role::Prefill));
    let mut c = cfg.connect().await.unwrap();
    c.put("/pdserve/t/prefill/x", "not json", None).await.unwrap();
    c.put("/pdserve/t/decode/y", serde_json::to_vec(&member("z", Role::Decode)).unwrap(), None).await.unwrap();
    until(&mut view, Duration::from_secs(2), |v| v.of(Role::Decode).len() == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(view.borrow().members.len(), 1, "only b: {:?}", view.borrow().members.keys().collect::<Vec<_>>());
    assert_eq!(discovery::list(&other).await.unwrap().len(), 1);

    // etcd killed: the view keeps its members, marked stale; a member that registers
    // meanwhile (retrying) and one that leaves meanwhile are seen once etcd is back.
    etcd.kill();
    until(&mut view, Duration::from_secs(5), |v| v.stale).await;
    assert_eq!(view.borrow().of(Role::Decode).len(), 1, "last membership kept");
    let late = Registration::spawn(cfg.clone(), member("late", Role::Prefill));
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
    let dead = Registration::spawn(cfg.clone(), member("dead", Role::Decode));
    until(&mut view, Duration::from_secs(2), |v| v.of(Role::Decode).len() == 1).await;
    drop(dead);
    let expired = until(&mut view, Duration::from_secs(5), |v| v.of(Role::Decode).is_empty()).await;
    assert!(expired > Duration::from_millis(1000), "removed by its lease's expiry, not at once: {expired:?}");
    late.deregister().await;
}
