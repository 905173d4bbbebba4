//! The OpenAI-compatible HTTP API, the front door every client already speaks (the
//! `openai` libraries, curl scripts, LangChain, `vllm bench serve`, Open WebUI):
//!
//! - `POST /v1/completions`, `POST /v1/chat/completions`: JSON, or server-sent events
//!   with `"stream": true` (ending `data: [DONE]`; `stream_options.include_usage`
//!   adds a usage chunk);
//! - `GET /v1/models`, `GET /health`.
//!
//! It is a translation layer over any `pdserve.v1.Generation` service, called in
//! process: the router serves it in front of its decode-servers, a decode-server for a
//! one-node setup. `Authorization: Bearer` is checked against the same client token
//! as the gRPC API. pdserve's own timings ride along in a `pdserve` object.
mod error;
mod request;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
pub use error::ApiError;
use futures_util::StreamExt as _;
use proto::v1 as pb;
use proto::v1::generation_server::Generation;
use request::{ChatRequest, Common, CompletionRequest, parse};
use serde_json::{Value, json};
use tokio_stream::Stream;

/// `max_tokens` when a request gives none: OpenAI's 16 for completions; a chat answer
/// needs room to finish.
pub const DEFAULT_COMPLETION_TOKENS: u32 = 16;
pub const DEFAULT_CHAT_TOKENS: u32 = 512;

/// The HTTP API over the Generation service `G`.
pub struct Api<G> {
    backend: G,
    /// The one model name served (`GET /v1/models`; other names are 404).
    model: String,
    token: daemon::auth::BearerToken,
    ready: Box<dyn Fn() -> bool + Send + Sync>,
}

impl<G> Api<G> {
    pub fn new(backend: G, model: String, auth_token: &str, ready: impl Fn() -> bool + Send + Sync + 'static) -> Api<G> {
        Api {
            backend,
            model,
            token: daemon::auth::BearerToken::new(auth_token),
            ready: Box::new(ready),
        }
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let got = headers.get("authorization").and_then(|v| v.to_str().ok());
        if self.token.accepts(got) {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            match got {
                Some(_) => "wrong API key (Authorization: Bearer)",
                None => "this API needs an API key: `Authorization: Bearer <token>`",
            },
        ))
    }
}

/// The routes, ready to serve.
pub fn app<G>(api: Arc<Api<G>>) -> axum::Router
where
    G: Generation,
{
    axum::Router::new()
        .route("/v1/completions", post(completions::<G>))
        .route("/v1/chat/completions", post(chat_completions::<G>))
        .route("/v1/models", get(models::<G>))
        // The key is checked before a body is read.
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), require_key::<G>))
        .route("/health", get(health::<G>))
        // Bodies are capped before parsing, like gRPC messages.
        .layer(axum::extract::DefaultBodyLimit::max(daemon::MAX_MESSAGE_BYTES))
        .with_state(api)
}

/// The HTTP front of a daemon: binds `listen` (empty: no HTTP API, `None`) and serves
/// `api` from a task until `shutdown` resolves (in-flight requests finish).
pub async fn start<G: Generation>(
    listen: &str,
    api: Api<G>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>> {
    if listen.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(addr = %listen, model = %api.model, "OpenAI HTTP API listening");
    let app = app(Arc::new(api));
    Ok(Some(tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await
    })))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn require_key<G>(State(api): State<Arc<Api<G>>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match api.authorize(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn models<G>(State(api): State<Arc<Api<G>>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{ "id": api.model, "object": "model", "created": now(), "owned_by": "pdserve" }],
    }))
    .into_response()
}

async fn health<G>(State(api): State<Arc<Api<G>>>) -> StatusCode {
    if (api.ready)() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn completions<G: Generation>(State(api): State<Arc<Api<G>>>, headers: HeaderMap, body: Bytes) -> Response {
    let run = async {
        let r: CompletionRequest = parse(&body)?;
        let input = r.input()?;
        api.generate(Kind::Completion, &headers, &r.common, input, None).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions<G: Generation>(State(api): State<Arc<Api<G>>>, headers: HeaderMap, body: Bytes) -> Response {
    let run = async {
        let r: ChatRequest = parse(&body)?;
        let input = r.input()?;
        api.generate(Kind::Chat, &headers, &r.common, input, r.max_completion_tokens).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

impl Kind {
    fn object(self, streaming: bool) -> &'static str {
        match (self, streaming) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Completion => "cmpl-",
            Kind::Chat => "chatcmpl-",
        }
    }
}

fn finish_reason(r: i32) -> &'static str {
    match pb::FinishReason::try_from(r) {
        Ok(pb::FinishReason::Length) => "length",
        _ => "stop",
    }
}

fn usage(r: &pb::GenerateResult) -> Value {
    json!({
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
        // Leading prompt tokens taken from the prefill-server's prefix cache.
        "prompt_tokens_details": { "cached_tokens": r.cached_tokens },
    })
}

/// pdserve's own figures for the request.
fn extension(r: &pb::GenerateResult) -> Value {
    let t = r.timings.unwrap_or_default();
    json!({
        "request_id": r.request_id,
        "prefill_server": r.prefill_server,
        "kv_backend": r.kv_backend,
        "queue_ms": t.queue_ms,
        "prefill_ms": t.prefill_ms,
        "kv_transfer_ms": t.kv_transfer_ms,
        "kv_bytes": t.kv_bytes,
        "first_token_ms": t.first_token_ms,
        "total_ms": t.total_ms,
        "mean_inter_token_ms": t.mean_inter_token_ms,
    })
}

type Events = Pin<Box<dyn Stream<Item = Result<Event, std::convert::Infallible>> + Send>>;

impl<G: Generation> Api<G> {
    async fn generate(
        &self,
        kind: Kind,
        headers: &HeaderMap,
        common: &Common,
        input: pb::generate_request::Input,
        max_tokens: Option<u32>,
    ) -> Result<Response, ApiError> {
        if let Some(m) = common.model.as_deref()
            && m != self.model
        {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("The model `{m}` does not exist (this server serves `{}`)", self.model),
            ));
        }
        let default_max = if kind == Kind::Chat {
            DEFAULT_CHAT_TOKENS
        } else {
            DEFAULT_COMPLETION_TOKENS
        };
        let sampling = common.sampling(max_tokens, default_max)?;
        // The body's id must be valid (the client chose it); a proxy's header that is
        // not a usable id is replaced rather than failing every request behind it.
        let request_id = match &common.request_id {
            Some(id) => {
                daemon::validate::request_id(id)?;
                id.clone()
            }
            None => headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .filter(|id| daemon::validate::request_id(id).is_ok())
                .map_or_else(daemon::new_request_id, str::to_string),
        };
        let req = pb::GenerateRequest {
            request_id: request_id.clone(),
            input: Some(input),
            sampling: Some(sampling),
            cache_salt: common.cache_salt.clone(),
        };
        let mut stream = Box::pin(self.backend.generate(tonic::Request::new(req)).await?.into_inner());
        let id = format!("{}{request_id}", kind.id_prefix());
        let mut resp = if common.stream {
            let usage = common.stream_options.as_ref().is_some_and(|o| o.include_usage);
            // The status line waits for the first message: a request refused while it
            // queues (no KV blocks: 429, no decode-server: 503) gets its HTTP status,
            // not a 200 with an error event. The client waits for its first token anyway.
            let first = match stream.next().await {
                Some(Err(s)) => return Err(s.into()),
                first => first,
            };
            let stream = futures_util::stream::iter(first).chain(stream);
            Sse::new(sse(stream, kind, id, self.model.clone(), usage)).into_response()
        } else {
            self.collect(stream, kind, id).await?.into_response()
        };
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        Ok(resp)
    }

    /// The whole answer as one JSON object.
    async fn collect(&self, mut stream: Pin<Box<G::GenerateStream>>, kind: Kind, id: String) -> Result<axum::Json<Value>, ApiError> {
        while let Some(item) = stream.next().await {
            let Some(pb::generate_response::Kind::Result(r)) = item?.kind else {
                continue;
            };
            let choice = match kind {
                Kind::Completion => json!({
                    "index": 0, "text": r.text, "logprobs": null, "finish_reason": finish_reason(r.finish_reason),
                }),
                Kind::Chat => json!({
                    "index": 0,
                    "message": { "role": "assistant", "content": r.text },
                    "logprobs": null,
                    "finish_reason": finish_reason(r.finish_reason),
                }),
            };
            return Ok(axum::Json(json!({
                "id": id,
                "object": kind.object(false),
                "created": now(),
                "model": self.model,
                "choices": [choice],
                "usage": usage(&r),
                "pdserve": extension(&r),
            })));
        }
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "generation ended without a result",
        ))
    }
}

/// Server-sent events: a chunk per text delta, the finish reason (with pdserve's
/// figures), the usage if asked, `[DONE]`. An error mid-stream is an `error` object.
/// Dropping the response (the client went away) drops the generation's stream, which
/// cancels the request upstream.
fn sse<S>(stream: S, kind: Kind, id: String, model: String, include_usage: bool) -> Events
where
    S: Stream<Item = Result<pb::GenerateResponse, tonic::Status>> + Send + 'static,
{
    let created = now();
    let chunk = move |choices: Value, extra: Option<(&str, Value)>| {
        let mut v = json!({ "id": id, "object": kind.object(true), "created": created, "model": model, "choices": choices });
        if let Some((k, x)) = extra {
            v[k] = x;
        }
        Event::default().data(v.to_string())
    };
    let delta = move |text: &str, finish: Option<&str>| match kind {
        Kind::Completion => json!([{ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }]),
        Kind::Chat if finish.is_some() => json!([{ "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish }]),
        Kind::Chat => json!([{ "index": 0, "delta": { "content": text }, "logprobs": null, "finish_reason": null }]),
    };
    let opening = (kind == Kind::Chat).then(|| {
        chunk(
            json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }]),
            None,
        )
    });
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen_end = finished.clone();
    let body = stream.flat_map(move |item| {
        if matches!(
            &item,
            Err(_)
                | Ok(pb::GenerateResponse {
                    kind: Some(pb::generate_response::Kind::Result(_))
                })
        ) {
            seen_end.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let events: Vec<Event> = match item {
            Ok(pb::GenerateResponse {
                kind: Some(pb::generate_response::Kind::Chunk(c)),
            }) if !c.text.is_empty() => vec![chunk(delta(&c.text, None), None)],
            Ok(pb::GenerateResponse {
                kind: Some(pb::generate_response::Kind::Result(r)),
            }) => {
                let mut v = vec![chunk(
                    delta("", Some(finish_reason(r.finish_reason))),
                    Some(("pdserve", extension(&r))),
                )];
                if include_usage {
                    v.push(chunk(json!([]), Some(("usage", usage(&r)))));
                }
                v
            }
            Ok(_) => vec![],
            Err(s) => vec![Event::default().data(ApiError::from(s).body().to_string())],
        };
        futures_util::stream::iter(events)
    });
    // A stream that ends with neither a result nor an error was cut off: say so,
    // rather than let `[DONE]` pass a truncated answer as complete.
    let cut_off = futures_util::stream::iter([()]).filter_map(move |()| {
        let ended = finished.load(std::sync::atomic::Ordering::Relaxed);
        std::future::ready((!ended).then(|| {
            let e = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the generation ended without a result");
            Event::default().data(e.body().to_string())
        }))
    });
    let done = futures_util::stream::once(std::future::ready(Event::default().data("[DONE]")));
    Box::pin(futures_util::stream::iter(opening).chain(body).chain(cut_off).chain(done).map(Ok))
}
