//! The prefill-servers a decode-server uses: one session each (a capability from its
//! Handshake), handshaken one at a time per server, kept alive in the background,
//! chosen round robin or by the router's hint.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use daemon::auth::PrefillClient;
use daemon::{convert, validate};
use proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tracing::{info, warn};

use crate::DecodeService;

/// A prefill-server and our session with it.
pub(crate) struct PrefillPeer {
    pub(crate) url: String,
    /// Held through a handshake: one at a time per prefill-server.
    pub(crate) conn: tokio::sync::Mutex<Option<Conn>>,
    pub(crate) healthy: AtomicBool,
    /// Found through discovery (a static one stays for the process's life).
    pub(crate) discovered: bool,
    /// Cancelled when it leaves the membership: its handshake loop ends.
    pub(crate) gone: CancellationToken,
}

impl PrefillPeer {
    pub(crate) fn new(url: &str, discovered: bool) -> Arc<PrefillPeer> {
        Arc::new(PrefillPeer {
            url: url.to_string(),
            conn: Default::default(),
            healthy: AtomicBool::new(false),
            discovered,
            gone: CancellationToken::new(),
        })
    }
}

#[derive(Clone)]
pub(crate) struct Conn {
    pub(crate) client: PrefillClient,
    /// The session (a capability) and the prefill-server's boot id, from its Handshake.
    pub(crate) session: Vec<u8>,
    pub(crate) boot_id: Vec<u8>,
    /// The prefill-server's data-plane agent: its writes' notifications come from it.
    pub(crate) agent: String,
    /// The key our agent issued for its TCP data-plane connections (revoked with the session).
    pub(crate) key: Vec<u8>,
    /// The prefill-server's transfer deadline: how long one of its writes may last.
    pub(crate) write_deadline: Duration,
    /// It writes only the blocks after those our prefix cache holds (older ones write
    /// every block named).
    pub(crate) skips_cached: bool,
}

/// Deadline of a DropEarly call (it only saves the prefill-server some memory).
const DROP_EARLY_DEADLINE: Duration = Duration::from_secs(2);

/// A data-plane key issued for a handshake in progress: revoked when dropped unless
/// the handshake kept it.
struct PendingKey<'a> {
    agent: &'a kv_transfer::Agent,
    key: Option<Vec<u8>>,
}

impl PendingKey<'_> {
    fn keep(mut self) -> Vec<u8> {
        self.key.take().unwrap_or_default()
    }
}

impl Drop for PendingKey<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.agent.revoke_key(&k);
        }
    }
}

/// Deadline of a Handshake call (the prefill-server loads our metadata: quick).
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

impl DecodeService {
    /// Handshakes with `peer` unless a handshake that ran while we waited for its lock
    /// already did: one at a time per prefill-server, whoever asks.
    pub(crate) async fn handshake(&self, peer: &PrefillPeer) -> Result<(), String> {
        let mut conn = peer.conn.lock().await;
        if conn.is_some() && peer.healthy.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(old) = conn.take() {
            self.agent.revoke_key(&old.key);
        }
        let ch = self
            .cfg
            .tls
            .endpoint(&peer.url)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut client = daemon::auth::prefill_client(ch, &self.cfg.internal_token);
        let transfer_metadata = self.agent.local_metadata().await.map_err(|e| e.to_string())?;
        // Pending until the answer names the prefill-server's agent: only a connection
        // under that name authenticates with it, so no other key holder can send the
        // notifications we scope to it.
        // Revoked unless the handshake completes (an error, or a cancelled caller
        // dropping this future half-way).
        let pending = PendingKey {
            agent: &self.agent,
            key: Some(self.agent.issue_pending_key()),
        };
        let key = pending.key.clone().unwrap_or_default();
        let req = pb::HandshakeRequest {
            peer_name: self.agent.name().to_string(),
            layout: Some(convert::layout_to_wire(self.engine.layout())),
            backend: self.agent.backend().to_string(),
            transfer_metadata,
            pool_regions: self.region_ids.clone(),
            data_plane_key: key.clone(),
        };
        let mut req = Request::new(req);
        req.set_timeout(HANDSHAKE_DEADLINE);
        let resp = match tokio::time::timeout(HANDSHAKE_DEADLINE, client.handshake(req)).await {
            Ok(Ok(r)) => r.into_inner(),
            failed => {
                return Err(match failed {
                    Ok(Err(s)) => format!("{:?}: {}", s.code(), s.message()),
                    _ => format!("no answer within {HANDSHAKE_DEADLINE:?}"),
                });
            }
        };
        if validate::peer_name(&resp.peer_name).is_err() || !self.agent.bind_key(&key, &resp.peer_name) {
            return Err(format!(
                "the prefill-server's agent name {:?} is not usable",
                resp.peer_name.chars().take(64).collect::<String>()
            ));
        }
        if peer.gone.is_cancelled() {
            // It left the membership while we handshook (its cleanup may have run): the
            // pending key is revoked as it drops.
            return Err("it left the membership".into());
        }
        info!(url = %peer.url, prefill = %resp.peer_name, "prefill-server handshaken");
        let key = pending.keep();
        *conn = Some(Conn {
            client,
            session: resp.session,
            boot_id: resp.boot_id,
            agent: resp.peer_name,
            key,
            // The peer's word, capped by our own patience: it sizes how long our blocks
            // are held after a failed prefill.
            write_deadline: Duration::from_millis(resp.write_deadline_ms).min(Duration::from_millis(self.cfg.prefill_deadline_ms)),
            skips_cached: resp.skips_cached_blocks,
        });
        peer.healthy.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Marks `peer` failed and ends `session` (its data-plane key is revoked), unless a
    /// newer session replaced it meanwhile (a late failure of an old one must not tear
    /// down the fresh one); the next request or the background loop handshakes again.
    pub(crate) async fn forget(&self, peer: &PrefillPeer, session: &[u8]) {
        let mut conn = peer.conn.lock().await;
        if conn.as_ref().is_some_and(|c| c.session == session) {
            peer.healthy.store(false, Ordering::Relaxed);
            if let Some(old) = conn.take() {
                self.agent.revoke_key(&old.key);
            }
        }
    }

    /// Keeps every prefill-server handshaken: retries the unreachable ones.
    pub(crate) fn spawn_handshakes(self: &Arc<Self>) {
        for peer in self.peer_list() {
            self.spawn_handshake(peer);
        }
    }

    /// Keeps `peer` handshaken until it leaves the membership.
    fn spawn_handshake(self: &Arc<Self>, peer: Arc<PrefillPeer>) {
        let svc = self.clone();
        // For the peer's life: not tracked (a drain would wait for it in vain).
        tokio::spawn(async move {
            loop {
                if !peer.healthy.load(Ordering::Relaxed) {
                    tokio::select! {
                        _ = peer.gone.cancelled() => return,
                        r = svc.handshake(&peer) => if let Err(e) = r {
                            warn!(url = %peer.url, error = %e, "prefill-server handshake failed; retrying");
                        },
                    }
                }
                tokio::select! {
                    _ = peer.gone.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(svc.cfg.handshake_interval_ms)) => {}
                }
            }
        });
    }

    /// The prefill-servers known now (static and discovered).
    pub(crate) fn peer_list(&self) -> Vec<Arc<PrefillPeer>> {
        self.peers.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The prefill-server named `url` (as the configs and the membership name it).
    pub(crate) fn peer(&self, url: &str) -> Option<Arc<PrefillPeer>> {
        self.peers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|p| p.url == url)
            .cloned()
    }

    /// The next healthy prefill-server, or `preferred` (the router's hint) if healthy.
    pub(crate) fn pick_peer(&self, preferred: Option<&str>) -> Option<Arc<PrefillPeer>> {
        if let Some(p) = preferred.and_then(|u| self.peer(u))
            && p.healthy.load(Ordering::Relaxed)
        {
            return Some(p);
        }
        let peers = self.peer_list();
        let n = peers.len();
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &peers[(start + i) % n])
            .find(|p| p.healthy.load(Ordering::Relaxed))
            .cloned()
    }

    /// Follows the prefill-servers registered in etcd (with `[discovery]`): adds those
    /// whose KV layout matches ours, drops those that leave. A dropped one's session
    /// stays usable for the prefills already on it, until the prefill deadline.
    pub(crate) fn follow_discovery(self: &Arc<Self>) {
        if !self.cfg.discovery.enabled() {
            return;
        }
        let mut view = discovery::watch(self.cfg.discovery.clone(), &self.cfg.internal_token);
        let svc = self.clone();
        // For the process's life: not tracked (a drain would wait for it in vain).
        tokio::spawn(async move {
            let mut refused = daemon::membership::Refused::default();
            while view.changed().await.is_ok() {
                let v = view.borrow_and_update().clone();
                svc.discovery_synced.store(v.synced, Ordering::Relaxed);
                refused.keep_only(&v);
                let mut wanted = Vec::new();
                for e in v.of(discovery::Role::Prefill) {
                    let m = &e.member;
                    if !daemon::membership::reachable(m, &svc.cfg.tls, &mut refused) {
                        continue;
                    }
                    let fit = m
                        .layout
                        .as_ref()
                        .ok_or_else(|| "it names no KV layout".to_string())
                        .and_then(|l| svc.engine.layout().check_compatible(l));
                    match fit {
                        Ok(()) => wanted.push(m.url.clone()),
                        Err(why) => refused.note(m, &why),
                    }
                }
                svc.set_discovered(&wanted);
            }
        });
    }

    /// Makes the discovered prefill-servers exactly `urls` (static ones stay).
    fn set_discovered(self: &Arc<Self>, urls: &[String]) {
        let (mut added, mut dropped) = (Vec::new(), Vec::new());
        {
            let mut peers = self.peers.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            peers.retain(|p| {
                let keep = !p.discovered || urls.contains(&p.url);
                if !keep {
                    dropped.push(p.clone());
                }
                keep
            });
            for u in urls {
                if !peers.iter().any(|p| &p.url == u) {
                    let p = PrefillPeer::new(u, true);
                    peers.push(p.clone());
                    added.push(p);
                }
            }
        }
        for p in added {
            info!(url = %p.url, "discovery: prefill-server added");
            self.spawn_handshake(p);
        }
        for p in dropped {
            info!(url = %p.url, "discovery: prefill-server dropped");
            p.gone.cancel();
            // Its prefills in flight keep their session; the data-plane key goes once
            // none can still be running.
            let (svc, grace) = (self.clone(), Duration::from_millis(self.cfg.prefill_deadline_ms));
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                if let Some(old) = p.conn.lock().await.take() {
                    svc.agent.revoke_key(&old.key);
                }
            });
        }
    }

    /// Tells the prefill-server at `url` (in the background, best effort: unclaimed, it
    /// goes after its hold anyway) to release the router's early start of `id`.
    pub(crate) fn drop_early(&self, url: &str, id: &str) {
        let Some(peer) = self.peer(url) else {
            return;
        };
        let request_id = id.to_string();
        daemon::tasks::spawn(async move {
            let Some(mut client) = peer.conn.lock().await.as_ref().map(|c| c.client.clone()) else {
                return;
            };
            let call = client.drop_early(pb::DropEarlyRequest { request_id });
            if let Ok(Err(s)) = tokio::time::timeout(DROP_EARLY_DEADLINE, call).await {
                warn!(url = %peer.url, code = ?s.code(), message = s.message(), "could not drop the early prefill");
            }
        });
    }

    /// Handshakes, in order, with the not-yet-handshaken peers outside `skip`; the first that answers.
    pub(crate) async fn handshake_any(&self, skip: &[String]) -> Option<Arc<PrefillPeer>> {
        for peer in self
            .peer_list()
            .iter()
            .filter(|p| !p.healthy.load(Ordering::Relaxed) && !skip.contains(&p.url) && !p.gone.is_cancelled())
        {
            match self.handshake(peer).await {
                Ok(()) => return Some(peer.clone()),
                Err(e) => warn!(url = %peer.url, error = %e, "prefill-server handshake on demand failed"),
            }
        }
        None
    }
}
