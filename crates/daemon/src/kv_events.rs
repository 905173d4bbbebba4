//! A worker's KV events (`KvEvents.SubscribeKvEvents`), served the same way by
//! prefill-servers and decode-servers: a snapshot of the prefix cache, then its changes
//! in order, with the worker's load on every message. The router's KV-aware routing
//! follows them.
use std::sync::Arc;
use std::time::Duration;

use engine::{Engine, KvEvent};
use proto::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Hashes in one snapshot message: 4096 x 34 bytes on the wire, far below the message cap.
pub const SNAPSHOT_CHUNK: usize = 4096;
/// The range a subscriber may ask for its heartbeat.
pub const HEARTBEAT_MS: std::ops::RangeInclusive<u32> = 100..=60_000;
const DEFAULT_HEARTBEAT_MS: u32 = 1_000;
/// Streams one worker serves at once: a router or two per worker is the use; past
/// this a subscription is refused (RESOURCE_EXHAUSTED), so that holders of the internal
/// token cannot pile up tasks and snapshots.
pub const MAX_SUBSCRIBERS: usize = 32;

#[derive(Clone)]
pub struct KvEventsApi {
    engine: Arc<Engine>,
    /// Ends every stream: the daemon is stopping (a graceful shutdown would otherwise
    /// wait for streams that never end).
    stop: CancellationToken,
    subscribers: Arc<std::sync::atomic::AtomicUsize>,
}

/// One stream's place among [`MAX_SUBSCRIBERS`], given back when its task ends.
struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl KvEventsApi {
    pub fn new(engine: Arc<Engine>, stop: CancellationToken) -> KvEventsApi {
        KvEventsApi {
            engine,
            stop,
            subscribers: Default::default(),
        }
    }

    /// The service, behind the internal credentials' check.
    pub fn service(
        self,
        auth: crate::auth::InternalAuth,
    ) -> tonic::service::interceptor::InterceptedService<pb::kv_events_server::KvEventsServer<KvEventsApi>, crate::auth::InternalAuth> {
        tonic::service::interceptor::InterceptedService::new(pb::kv_events_server::KvEventsServer::new(self), auth)
    }
}

fn load(e: &Engine) -> pb::KvLoad {
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    pb::KvLoad {
        // Blocks promised to preempted sequences are no room for a new request.
        free_blocks: n(e.available_blocks()),
        total_blocks: n(e.total_blocks()),
        cached_blocks: n(e.cached_blocks()),
        sequences: n(e.sequences()),
    }
}

/// Block hashes as the wire carries them.
fn wire(hashes: &[engine::BlockHash]) -> Vec<Vec<u8>> {
    hashes.iter().map(|h| h.to_vec()).collect()
}

/// The messages of one snapshot taken at `seq`.
fn snapshot(e: &Engine, seq: u64, hashes: &[engine::BlockHash]) -> Vec<pb::KvEventsMessage> {
    let layout = e.layout();
    let parts: Vec<&[engine::BlockHash]> = if hashes.is_empty() {
        vec![&[]]
    } else {
        hashes.chunks(SNAPSHOT_CHUNK).collect()
    };
    let last = parts.len() - 1;
    parts
        .into_iter()
        .enumerate()
        .map(|(i, part)| pb::KvEventsMessage {
            seq,
            kind: Some(pb::kv_events_message::Kind::Snapshot(pb::KvSnapshot {
                first: i == 0,
                last: i == last,
                hashes: wire(part),
                model_fingerprint: layout.model_fingerprint,
                block_size: layout.block_size as u32,
            })),
            load: (i == last).then(|| load(e)),
        })
        .collect()
}

/// An event's messages: one, or several of the same number when it names more than
/// [`SNAPSHOT_CHUNK`] hashes (a subscriber caps what one message may carry).
fn event(seq: u64, ev: &KvEvent, e: &Engine) -> Vec<pb::KvEventsMessage> {
    use pb::kv_events_message::Kind;
    let kinds: Vec<Kind> = match ev {
        KvEvent::Stored { parent, hashes } => {
            // A later part's parent is the hash before it.
            let mut parent = parent.map(|p| p.to_vec()).unwrap_or_default();
            hashes
                .chunks(SNAPSHOT_CHUNK)
                .map(|part| {
                    Kind::Stored(pb::KvStored {
                        parent: std::mem::replace(&mut parent, part[part.len() - 1].to_vec()),
                        hashes: wire(part),
                    })
                })
                .collect()
        }
        KvEvent::Removed { hashes } => hashes
            .chunks(SNAPSHOT_CHUNK)
            .map(|part| Kind::Removed(pb::KvRemoved { hashes: wire(part) }))
            .collect(),
    };
    let load = load(e);
    kinds
        .into_iter()
        .map(|kind| pb::KvEventsMessage {
            seq,
            kind: Some(kind),
            load: Some(load),
        })
        .collect()
}

type Stream = ReceiverStream<Result<pb::KvEventsMessage, Status>>;

#[tonic::async_trait]
impl pb::kv_events_server::KvEvents for KvEventsApi {
    type SubscribeKvEventsStream = Stream;

    async fn subscribe_kv_events(&self, req: Request<pb::SubscribeKvEventsRequest>) -> Result<Response<Stream>, Status> {
        let heartbeat = match req.into_inner().heartbeat_ms {
            0 => DEFAULT_HEARTBEAT_MS,
            ms if HEARTBEAT_MS.contains(&ms) => ms,
            ms => {
                return Err(Status::invalid_argument(format!(
                    "heartbeat_ms {ms} is outside {}..={}",
                    HEARTBEAT_MS.start(),
                    HEARTBEAT_MS.end()
                )));
            }
        };
        let heartbeat = Duration::from_millis(heartbeat.into());
        let slot = Slot(self.subscribers.clone());
        if self.subscribers.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= MAX_SUBSCRIBERS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_SUBSCRIBERS} KV-event streams are open on this worker already"
            )));
        }
        // A few messages of slack: a subscriber that stops reading holds the task at
        // `send` (bounded memory); one that goes away ends it.
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (engine, stop) = (self.engine.clone(), self.stop.clone());
        // Not tracked: the stream lives as long as its subscriber, and ends at `stop`.
        tokio::spawn(async move {
            let _slot = slot;
            // Every send also ends at `stop`: a subscriber that stops reading must not
            // hold the task (and with it the daemon's graceful shutdown).
            let send = |m: pb::KvEventsMessage| {
                let (tx, stop) = (tx.clone(), stop.clone());
                async move {
                    tokio::select! {
                        _ = stop.cancelled() => false,
                        r = tx.send(Ok(m)) => r.is_ok(),
                    }
                }
            };
            'fresh: loop {
                let (mut seq, hashes, mut events) = engine.subscribe_kv_events();
                for m in snapshot(&engine, seq, &hashes) {
                    if !send(m).await {
                        return;
                    }
                }
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tx.closed() => return,
                        r = tokio::time::timeout(heartbeat, events.recv()) => r,
                    };
                    match next {
                        Ok(Ok(batch)) => {
                            for (n, ev) in batch.iter() {
                                // Numbers at or below the snapshot's are in it already.
                                if *n <= seq {
                                    continue;
                                }
                                seq = *n;
                                for m in event(seq, ev, &engine) {
                                    if !send(m).await {
                                        return;
                                    }
                                }
                            }
                        }
                        Ok(Err(RecvError::Lagged(_))) => {
                            tracing::warn!("a KV-event subscriber fell behind; sending it a new snapshot");
                            continue 'fresh;
                        }
                        Ok(Err(RecvError::Closed)) => return,
                        Err(_) => {
                            let beat = pb::KvEventsMessage {
                                seq,
                                kind: Some(pb::kv_events_message::Kind::Heartbeat(pb::KvHeartbeat {})),
                                load: Some(load(&engine)),
                            };
                            if !send(beat).await {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
