//! Getting a request's prompt into our KV pools: a prefill-server computes it and
//! writes it there (retried once on another), or this server prefills it itself.
use std::time::Duration;

use daemon::auth::PrefillClient;
use daemon::convert;
use daemon::status::from_transfer;
use proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};
use tracing::warn;

use crate::DecodeService;
use crate::admission::Lease;
use crate::peers::{Conn, PrefillPeer};

/// A failed prefill: the status for the client, and until when its blocks must be
/// held because a prefill-server's write into them may still land (None: none can).
pub(crate) struct PrefillFailed {
    pub(crate) status: Status,
    pub(crate) hold_until: Option<tokio::time::Instant>,
}

impl From<Status> for PrefillFailed {
    fn from(status: Status) -> Self {
        PrefillFailed { status, hold_until: None }
    }
}

/// Called once with the first token of a prefill, the server that computed it, and
/// the blocks it went into.
pub(crate) type OnFirst<'a> = dyn FnMut(&pb::PrefillResponse, &str, &Lease) + Send + 'a;

/// How much longer than a prefill-server's own deadlines a failed prefill's blocks are
/// held: an abandoned write's last bytes, and the request's time on the wire.
const WRITE_MARGIN: Duration = Duration::from_secs(1);

/// The longest a prefill-server's `pdserve-kv-may-land-ms` can make us hold blocks (its
/// backends name at most 60 s; a peer cannot pin our pool for longer).
const MAX_MAY_LAND: Duration = Duration::from_secs(120);

/// `prefill_server` of requests prefilled by the decode-server itself.
pub(crate) const LOCAL: &str = daemon::LOCAL_PREFILL;

impl DecodeService {
    /// Prefill on a prefill-server (retrying once on another, unless the first token
    /// is out), or here. `on_first` gets the first token as soon as it is known, with
    /// the server's name and the blocks' lease; returns the final figures once the KV
    /// cache is in our pools. A retry after a failure that may still write gets fresh
    /// blocks, and the old ones are quarantined.
    #[allow(clippy::too_many_arguments)]
    /// `(prompt, cache_salt)`: the tokens, and the request's prefix-cache salt.
    pub(crate) async fn prefill(
        &self,
        id: &str,
        hint: Option<&str>,
        (prompt, cache_salt): (&[u32], &str),
        lease: &mut Lease,
        params: &engine::SamplingParams,
        on_first: &mut OnFirst<'_>,
        cancel: &CancellationToken,
    ) -> Result<pb::PrefillResponse, PrefillFailed> {
        // Here: no prefill-server, a short prompt, or the router's conditional
        // disaggregation found the prompt's uncached part short.
        // What a prefill here would compute: the part our prefix cache lacks.
        let uncached = prompt.len() - lease.cached_tokens;
        let asked = hint == Some(LOCAL) && uncached <= self.cfg.max_local_prefill_tokens;
        let local = self.prefills_alone() || uncached < self.cfg.local_prefill_below || asked;
        if !local {
            let mut last = PrefillFailed::from(Status::unavailable("no prefill-server is reachable"));
            let mut tried: Vec<String> = Vec::new();
            for attempt in 0..2 {
                let hint = if attempt == 0 { hint } else { None };
                let peer = match self.pick_peer(hint).filter(|p| !tried.contains(&p.url)) {
                    Some(p) => p,
                    // None handshaken (yet): handshake now rather than wait for the background loop.
                    // A client that goes away ends the wait (the handshake is safe to
                    // drop half-way: its key is revoked, its session replaced later).
                    None => match tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return Err(Status::cancelled("the client went away").into()),
                        p = self.handshake_any(&tried) => p,
                    } {
                        Some(p) => p,
                        None => break,
                    },
                };
                tried.push(peer.url.clone());
                if attempt > 0
                    && let Some(until) = last.hold_until
                {
                    // The old blocks go to quarantine first: they come back on their
                    // own, and waiting for fresh ones while holding them could stall
                    // the whole line behind this request.
                    lease.quarantine(until);
                    let hashes = self.engine.prompt_hashes(prompt, cache_salt);
                    *lease = self
                        .lease(prompt.len(), params.max_tokens, &hashes, cancel)
                        .await
                        .map_err(PrefillFailed::from)?;
                }
                let mut first_out = false;
                let mut first = |r: &pb::PrefillResponse, server: &str, l: &Lease| {
                    first_out = true;
                    on_first(r, server, l)
                };
                // The session this attempt uses: a failure ends that one, not a newer one.
                let Some(conn) = peer.conn.lock().await.clone() else {
                    last = PrefillFailed::from(Status::unavailable(format!("prefill-server {} is not handshaken", peer.url)));
                    continue;
                };
                if lease.cached_tokens > 0 && !conn.skips_cached {
                    // An older prefill-server would write every block named, our shared
                    // cached ones included: fresh blocks for the whole prompt instead.
                    lease.give_back();
                    *lease = self
                        .lease(prompt.len(), params.max_tokens, &[], cancel)
                        .await
                        .map_err(PrefillFailed::from)?;
                }
                let session = conn.session.clone();
                let result = self
                    .remote_prefill(&peer, conn, id, (prompt, cache_salt), lease, params, &mut first, cancel)
                    .await;
                match result {
                    Ok(r) => return Ok(r),
                    // Our client went away: no retry (and no peer to blame).
                    Err(f) if cancel.is_cancelled() => return Err(f),
                    Err(PrefillFailed { status: s, hold_until })
                        if matches!(
                            s.code(),
                            tonic::Code::Unavailable
                                    | tonic::Code::FailedPrecondition
                                    | tonic::Code::DeadlineExceeded
                                    | tonic::Code::Unknown
                                    // A prefill-server killed while our call is on its
                                    // connection: the transport reports the call cancelled.
                                    | tonic::Code::Cancelled
                                    // Our internal token is not the prefill-server's: a
                                    // deployment error, logged; to the client, unavailable.
                                    | tonic::Code::Unauthenticated
                                    | tonic::Code::PermissionDenied
                        ) =>
                    {
                        warn!(url = %peer.url, code = ?s.code(), message = s.message(), "prefill-server failed; marking it unhealthy");
                        self.forget(&peer, &session).await;
                        // A session it no longer knows (it restarted, or dropped ours):
                        // nothing was written, and the retry may handshake it again.
                        if s.code() == tonic::Code::FailedPrecondition {
                            tried.retain(|u| u != &peer.url);
                        }
                        // However the prefill-server failed, to the client it is unavailable.
                        last = PrefillFailed {
                            status: Status::unavailable(format!("prefill-server {} failed: {:?}: {}", peer.url, s.code(), s.message())),
                            hold_until,
                        };
                        // The first token is out: the answer has started, no retry.
                        if first_out {
                            return Err(last);
                        }
                    }
                    Err(f) => return Err(f),
                }
            }
            return Err(last);
        }
        if let Some(url) = hint {
            self.drop_early(url, id);
        }
        // Only the part of the prompt not in our prefix cache is computed.
        let cached = lease.cached_tokens;
        let (first_token, prefill_ms) = daemon::prefill_first_token(&self.engine, prompt, cached, &lease.blocks, params).await?;
        let r = pb::PrefillResponse {
            first_token,
            prefill_ms,
            cached_tokens: cached as u32,
            ..Default::default()
        };
        on_first(&r, LOCAL, lease);
        Ok(r)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn remote_prefill(
        &self,
        peer: &PrefillPeer,
        conn: Conn,
        id: &str,
        (prompt, cache_salt): (&[u32], &str),
        lease: &Lease,
        params: &engine::SamplingParams,
        on_first: &mut OnFirst<'_>,
        cancel: &CancellationToken,
    ) -> Result<pb::PrefillResponse, PrefillFailed> {
        let Conn {
            mut client,
            session,
            boot_id,
            agent,
            write_deadline,
            ..
        } = conn;
        // Unpredictable, and only a write by this prefill-server's agent answers it.
        let tag = kv_transfer::random_tag();
        let n = self.engine.blocks_for(prompt.len());
        let deadline = Duration::from_millis(self.cfg.prefill_deadline_ms);
        let mut req = Request::new(pb::PrefillRequest {
            request_id: id.to_string(),
            session,
            boot_id,
            peer_name: self.agent.name().to_string(),
            token_ids: prompt.to_vec(),
            dst_blocks: lease.blocks[..n].to_vec(),
            notify_tag: tag,
            sampling: Some(convert::sampling_to_wire(params)),
            write_by_ms: deadline.as_millis() as u64,
            cache_salt: cache_salt.to_string(),
            // Blocks our prefix cache holds: the prefill-server writes only the rest.
            dst_cached_blocks: (lease.cached_tokens / self.engine.layout().block_size) as u32,
        });
        req.set_timeout(deadline);
        // The deadline travels as grpc-timeout, but tonic's client does not enforce it.
        let call = self.remote_prefill_call(&mut client, req, (&agent, tag), &peer.url, lease, on_first);
        // A client that goes away drops the call (the prefill-server sees it gone and
        // starts no write); a write already started may land until its deadline, so
        // the blocks are held like those of a broken connection. A call never polled
        // sent nothing: nothing can land.
        let sent = std::sync::atomic::AtomicBool::new(false);
        let call = async {
            sent.store(true, std::sync::atomic::Ordering::Relaxed);
            call.await
        };
        let outcome = tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(Status::cancelled("the client went away during its prefill")),
            r = tokio::time::timeout(deadline, call) => r.unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "the prefill took longer than prefill_deadline_ms ({} ms)",
                    deadline.as_millis()
                )))
            }),
        };
        outcome.map_err(|status| {
            let status = daemon::status::lost_peer(status, &format!("prefill-server {}", peer.url));
            if !sent.load(std::sync::atomic::Ordering::Relaxed) {
                return PrefillFailed { status, hold_until: None };
            }
            let now = tokio::time::Instant::now();
            let may_land = status
                .metadata()
                .get(daemon::KV_MAY_LAND_MS)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let hold_until = if let Some(ms) = may_land {
                // The prefill-server abandoned its write (and closed its connection):
                // bytes may land for as long as it says, capped by what its own
                // deadlines allow.
                let left = Duration::from_millis(ms).min(MAX_MAY_LAND);
                Some(now + left + WRITE_MARGIN)
            } else if status.metadata().contains_key(daemon::KV_WRITE_OVER) {
                // The prefill-server answered: it is done with the request; a
                // refusal came before any write, and an abandoned write may land
                // for a moment.
                let refused = matches!(
                    status.code(),
                    tonic::Code::InvalidArgument
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::PermissionDenied
                        | tonic::Code::ResourceExhausted
                );
                (!refused).then_some(now + kv_transfer::LANDING_GRACE + WRITE_MARGIN)
            } else {
                // Our deadline passed or the connection broke: the prefill-server
                // may still be at it. It starts no write once it sees the call
                // gone (nor past `write_by_ms`), and one it started ends within its
                // write deadline. (A prefill-server that never sees the call go, on
                // a half-open connection, could start one until `write_by_ms`.)
                Some(now + write_deadline + kv_transfer::LANDING_GRACE + WRITE_MARGIN)
            };
            PrefillFailed { status, hold_until }
        })
    }

    pub(crate) async fn remote_prefill_call(
        &self,
        client: &mut PrefillClient,
        req: Request<pb::PrefillRequest>,
        (writer, tag): (&str, u64),
        url: &str,
        lease: &Lease,
        on_first: &mut OnFirst<'_>,
    ) -> Result<pb::PrefillResponse, Status> {
        let mut stream = client.prefill(req).await?.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("prefill-server ended the prefill without a first token"))?;
        if first.first_token as usize >= self.engine.config().vocab_size {
            return Err(Status::internal(format!(
                "prefill-server sent first token {} outside the vocabulary",
                first.first_token
            )));
        }
        on_first(&first, url, lease);
        let done = stream
            .message()
            .await?
            .filter(|m| m.kv_written)
            .ok_or_else(|| Status::unavailable("prefill-server ended the prefill before its KV write completed"))?;
        // The bytes are ours once the write's notification arrived.
        self.agent
            .wait_notification_from(writer, tag, self.agent.deadline())
            .await
            .map_err(|e| from_transfer(&e))?;
        Ok(done)
    }
}
