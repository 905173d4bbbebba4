//! The decode-server's gRPC services (the client API and DecodeAdmin) and its serve loop.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

use crate::scheduler::Event;
use crate::{DecodeConfig, DecodeService};

type EventStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

/// The client API over a shared service.
#[derive(Clone)]
pub struct DecodeApi(pub Arc<DecodeService>);

#[tonic::async_trait]
impl pb::generation_server::Generation for DecodeApi {
    type GenerateStream = EventStream;

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        // The prefill-server the router started this prompt on, if it did.
        let hint = req
            .metadata()
            .get(daemon::PREFILL_HINT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut r = req.into_inner();
        if r.request_id.is_empty() {
            r.request_id = daemon::new_request_id();
        }
        let span = info_span!("generate", request_id = %r.request_id);
        let (prompt, params) = self.0.validate(&r).instrument(span.clone()).await.inspect_err(|s| {
            span.in_scope(|| warn!(code = ?s.code(), message = s.message(), "refused"));
            daemon::metrics::request_done(Err(s.code()));
            // The router's early start of it would run for nothing.
            if let Some(url) = &hint {
                self.0.drop_early(url, &r.request_id);
            }
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        // Cancelled when the client's stream is dropped (it went away, or the router
        // in front of us dropped its call): every wait of the request ends.
        let cancel = tokio_util::sync::CancellationToken::new();
        let on_drop = cancel.clone().drop_guard();
        daemon::tasks::spawn(
            self.0
                .clone()
                .run(r.request_id.clone(), hint, (prompt, r.cache_salt.clone()), params, tx, cancel)
                .instrument(span),
        );
        use tokio_stream::StreamExt;
        let stream = UnboundedReceiverStream::new(rx).map(move |e| {
            let _cancel_on_drop = &on_drop;
            e
        });
        let stream = stream.map(|e| match e {
            Event::Chunk(c) => Ok(pb::GenerateResponse {
                kind: Some(pb::generate_response::Kind::Chunk(c)),
            }),
            Event::Done(res) => {
                daemon::metrics::request_done(Ok(()));
                Ok(pb::GenerateResponse {
                    kind: Some(pb::generate_response::Kind::Result(res)),
                })
            }
            Event::Failed(s) => {
                daemon::metrics::request_done(Err(s.code()));
                Err(s)
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn generate_once(&self, req: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResult>, Status> {
        use tokio_stream::StreamExt;
        let mut stream = self.generate(req).await?.into_inner();
        while let Some(item) = stream.next().await {
            if let Some(pb::generate_response::Kind::Result(r)) = item?.kind {
                return Ok(Response::new(r));
            }
        }
        Err(Status::internal("generation ended without a result"))
    }
}

#[tonic::async_trait]
impl pb::decode_admin_server::DecodeAdmin for DecodeApi {
    async fn stats(&self, _: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        let s = &self.0;
        Ok(Response::new(pb::StatsResponse {
            free_blocks: s.engine.free_blocks() as u32,
            total_blocks: s.engine.total_blocks() as u32,
            sequences: s.engine.sequences() as u32,
            healthy_prefill_servers: s.peer_list().iter().filter(|p| p.healthy.load(Ordering::Relaxed)).count() as u32,
            preemptions: s.scheduler.preemptions(),
            preempted: s.scheduler.preempted() as u32,
            cached_blocks: s.engine.cached_blocks() as u32,
        }))
    }
}

/// Serves until `shutdown` resolves, then drains in-flight requests (up to the drain
/// deadline) and releases the data plane.
pub async fn serve(cfg: DecodeConfig, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let addr: SocketAddr = cfg.listen.parse()?;
    let drain = Duration::from_millis(cfg.drain_deadline_ms);
    let (reporter, health) = tonic_health::server::health_reporter();
    type Svc = pb::generation_server::GenerationServer<DecodeApi>;
    reporter.set_not_serving::<Svc>().await;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    daemon::metrics::install(&cfg.metrics_listen, "decode-server")?;
    info!(%addr, "decode-server listening; loading model");
    let (mut server, token) = (cfg.tls.server()?, daemon::auth::BearerToken::new(&cfg.auth_token));
    daemon::auth::warn_if_open(&cfg.listen, &cfg.internal_token, &cfg.tls);
    let internal = daemon::auth::InternalAuth::new(&cfg.internal_token, &cfg.tls);
    let http_listen = cfg.http_listen.clone();
    let model_name = match cfg.served_model_name.as_str() {
        "" => cfg
            .engine
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "default".into()),
        n => n.to_string(),
    };
    let client_token = cfg.auth_token.clone();
    let svc = DecodeService::new(cfg.clone()).await?;
    daemon::membership::check_model(&cfg.discovery, svc.engine.layout())?;
    svc.spawn_handshakes();
    svc.follow_discovery();
    let registration = daemon::membership::register(
        &cfg.discovery,
        daemon::membership::Describe {
            role: daemon::membership::Role::Decode,
            listen: &cfg.listen,
            tls: &cfg.tls,
            http: &cfg.http_listen,
            metrics: &cfg.metrics_listen,
            engine: Some((&svc.engine, &svc.agent, &cfg.engine.device)),
            max_batch: cfg.max_batch,
            internal_token: &cfg.internal_token,
        },
    )?;
    let discovery = cfg.discovery.clone();
    daemon::systemd::ready("decode-server: model loaded, KV pools registered; health SERVING once a prefill-server is handshaken");
    // Serving once some prefill-server is handshaken; back to not serving if all are
    // lost, and for good once draining.
    let draining = Arc::new(AtomicBool::new(false));
    {
        let (svc, draining) = (svc.clone(), draining.clone());
        daemon::report_readiness::<Svc>(reporter.clone(), "decode-server", move || {
            svc.ready() && !draining.load(Ordering::Relaxed)
        });
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // KV-event streams never end on their own: they end when the drain begins.
    let events_stop = tokio_util::sync::CancellationToken::new();
    let drain_started = Arc::new(tokio::sync::Notify::new());
    // The HTTP front stops accepting with the gRPC one.
    let http_stop = tokio_util::sync::CancellationToken::new();
    let (ready, draining_now) = (svc.clone(), draining.clone());
    let api = openai::Api::new(DecodeApi(svc.clone()), model_name, &client_token, move || {
        ready.ready() && !draining_now.load(Ordering::Relaxed)
    });
    let http = openai::start(&http_listen, api, http_stop.clone().cancelled_owned()).await?;
    {
        let drain_started = drain_started.clone();
        let reporter = reporter.clone();
        let http_stop = http_stop.clone();
        let events_stop = events_stop.clone();
        daemon::tasks::spawn(async move {
            shutdown.await;
            // Out of the membership first: routers stop sending new requests before
            // the health check says not serving and the listener closes.
            daemon::membership::deregister(registration, &discovery).await;
            events_stop.cancel();
            draining.store(true, Ordering::Relaxed);
            reporter.set_not_serving::<Svc>().await;
            drain_started.notify_one();
            http_stop.cancel();
            let _ = stop_tx.send(());
        });
    }
    let api = pb::generation_server::GenerationServer::new(DecodeApi(svc.clone())).max_decoding_message_size(daemon::MAX_MESSAGE_BYTES);
    let (reflection, reflection_alpha) = daemon::reflection(&["pdserve.v1.Generation", "pdserve.v1.DecodeAdmin", "pdserve.v1.KvEvents"]);
    let events = daemon::kv_events::KvEventsApi::new(svc.engine.clone(), events_stop);
    let server = server
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            pb::decode_admin_server::DecodeAdminServer::new(DecodeApi(svc.clone())),
            internal.clone(),
        ))
        .add_service(events.service(internal))
        .add_service(tonic::service::interceptor::InterceptedService::new(api, token))
        .serve_with_incoming_shutdown(daemon::incoming(listener), async {
            let _ = stop_rx.await;
        });
    let http_done = async {
        match http {
            Some(h) => h.await.map_err(anyhow::Error::from)?.map_err(anyhow::Error::from),
            None => Ok(()),
        }
    };
    let both = async { tokio::try_join!(async { server.await.map_err(anyhow::Error::from) }, http_done) };
    tokio::pin!(both);
    tokio::select! {
        r = &mut both => { r?; }
        _ = async { drain_started.notified().await; tokio::time::sleep(drain).await } => {
            warn!("drain deadline passed; cancelling in-flight requests");
        }
    }
    svc.scheduler.stop();
    daemon::drain_tasks("decode-server").await;
    svc.agent.shutdown();
    info!("decode-server stopped");
    Ok(())
}
