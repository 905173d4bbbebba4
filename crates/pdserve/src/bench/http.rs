//! The bench's client of an OpenAI-compatible HTTP API (pdserve's own, or another
//! server's), so that its figures compare with `vllm bench serve` and friends: streaming
//! `POST /v1/completions` (or `/v1/chat/completions` for chat prompts) with
//! `stream_options.include_usage`, timed per server-sent event.
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use proto::v1 as pb;
use serde_json::{Value, json};

/// One event may not grow past this (a server that never ends a line is an error, not
/// an out-of-memory).
const MAX_EVENT_BYTES: usize = 4 << 20;
/// An error body is read up to this.
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;

#[derive(Clone)]
pub struct OpenAiClient {
    http: Client<HttpConnector, Full<Bytes>>,
    /// `http://host:port/v1`.
    base: String,
    pub model: String,
    token: Option<String>,
}

/// What a streamed answer ended with.
#[derive(Debug, Default)]
pub struct Answer {
    /// `usage`: prompt and completion tokens, if the server sent it.
    pub usage: Option<(usize, usize)>,
    /// `usage.prompt_tokens_details.cached_tokens` (0 when absent).
    pub cached_tokens: usize,
    /// pdserve's own figures (the `pdserve` extension object), when the server is pdserve.
    pub pdserve: Option<Value>,
}

impl OpenAiClient {
    /// `url`: the server (`http://host:port`) or its API base (`.../v1`). Without
    /// `model`, the first model `GET /v1/models` lists; that call also checks that the
    /// server answers and takes the token.
    pub async fn connect(url: &str, token: Option<&str>, model: Option<&str>) -> anyhow::Result<OpenAiClient> {
        if !url.starts_with("http://") {
            bail!("--api openai takes an http:// URL (got {url:?})");
        }
        let trimmed = url.trim_end_matches('/');
        let base = if trimmed.ends_with("/v1") {
            trimmed.to_string()
        } else {
            format!("{trimmed}/v1")
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let http = Client::builder(TokioExecutor::new()).build(connector);
        let mut c = OpenAiClient {
            http,
            base,
            model: model.unwrap_or_default().to_string(),
            token: token.map(str::to_string),
        };
        let models = c.get_json("/models").await?;
        if c.model.is_empty() {
            c.model = models["data"][0]["id"]
                .as_str()
                .with_context(|| format!("{}/models lists no model: {models}", c.base))?
                .to_string();
        }
        Ok(c)
    }

    fn request(&self, method: hyper::Method, path: &str, body: Bytes) -> anyhow::Result<hyper::Request<Full<Bytes>>> {
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        Ok(b.body(Full::new(body))?)
    }

    /// A small JSON answer, whole within 10 s.
    async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let req = self.request(hyper::Method::GET, path, Bytes::new())?;
        let call = async {
            let resp = self.http.request(req).await.with_context(|| format!("{}{path}", self.base))?;
            let status = resp.status();
            anyhow::Ok((status, read_capped(resp.into_body(), MAX_EVENT_BYTES).await?))
        };
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .with_context(|| format!("{}{path}: no whole answer in 10 s", self.base))??;
        if !status.is_success() {
            bail!("{}{path}: HTTP {status}: {}", self.base, error_message(&body));
        }
        serde_json::from_slice(&body).with_context(|| format!("{}{path}: not JSON", self.base))
    }

    /// Streams one request; `on_text` is called at every event that carries text.
    /// Errors are the server's words (`HTTP 429: ...`).
    pub async fn stream(
        &self,
        request_id: &str,
        input: &pb::generate_request::Input,
        max_tokens: usize,
        temperature: f32,
        seed: u64,
        mut on_text: impl FnMut(Instant),
    ) -> Result<Answer, String> {
        let mut body = json!({
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
            "stream": true,
            "stream_options": { "include_usage": true },
            // Every request generates exactly max_tokens (vLLM's and pdserve's extension).
            "ignore_eos": true,
        });
        let path = match input {
            pb::generate_request::Input::Text(t) => {
                body["prompt"] = json!(t);
                "/completions"
            }
            pb::generate_request::Input::TokenIds(ids) => {
                body["prompt"] = json!(ids.ids);
                "/completions"
            }
            pb::generate_request::Input::Chat(c) => {
                let msgs: Vec<Value> = c.messages.iter().map(|m| json!({ "role": m.role, "content": m.content })).collect();
                body["messages"] = json!(msgs);
                "/chat/completions"
            }
        };
        let mut req = self
            .request(hyper::Method::POST, path, Bytes::from(body.to_string()))
            .map_err(|e| e.to_string())?;
        if let Ok(v) = hyper::header::HeaderValue::from_str(request_id) {
            req.headers_mut().insert("x-request-id", v);
        }
        let resp = self.http.request(req).await.map_err(|e| format!("{}{path}: {e}", self.base))?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let read = read_capped(body, MAX_ERROR_BODY_BYTES);
            let b = tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err(format!("HTTP {}: {}", status.as_u16(), error_message(&b)));
        }
        let mut answer = Answer::default();
        let mut buf: Vec<u8> = Vec::new();
        let mut scanned = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading the stream: {e}"))?;
            let Ok(data) = frame.into_data() else { continue };
            // Only the new bytes (and the 3 before them) can complete an event.
            let from = scanned.min(buf.len()).saturating_sub(3);
            buf.extend_from_slice(&data);
            let mut search = from;
            while let Some((text_end, end)) = find_event_end(&buf[search..]).map(|(a, b)| (a + search, b + search)) {
                search = 0;
                let event: Vec<u8> = buf.drain(..end).collect();
                match parse_event(&event[..text_end])? {
                    Event::Done => return Ok(answer),
                    Event::Chunk(v) => {
                        if chunk_text(&v).is_some_and(|t| !t.is_empty()) {
                            on_text(Instant::now());
                        }
                        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                            let n = |k: &str| u[k].as_u64().unwrap_or(0) as usize;
                            answer.usage = Some((n("prompt_tokens"), n("completion_tokens")));
                            answer.cached_tokens = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0) as usize;
                        }
                        if let Some(x) = v.get("pdserve") {
                            answer.pdserve = Some(x.clone());
                        }
                    }
                    Event::Other => {}
                }
            }
            scanned = buf.len();
            if buf.len() > MAX_EVENT_BYTES {
                return Err(format!("an event of over {MAX_EVENT_BYTES} bytes"));
            }
        }
        Err("the stream ended without `data: [DONE]`".into())
    }
}

/// A body up to `cap` bytes; the callers put a deadline on the whole read.
async fn read_capped(mut body: hyper::body::Incoming, cap: usize) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame?.into_data() {
            out.extend_from_slice(&d[..d.len().min(cap - out.len())]);
            if out.len() >= cap {
                break;
            }
        }
    }
    Ok(out)
}

/// OpenAI's error shape (`{"error": {"message": ...}}`), else the body as text.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

/// Where the first complete event ends: (end of its text, end including the blank line).
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[derive(Debug)]
enum Event {
    Chunk(Value),
    Done,
    Other,
}

/// One server-sent event: its `data:` lines joined; `[DONE]`, a JSON chunk, or (an
/// `error` object) the server's error.
fn parse_event(raw: &[u8]) -> Result<Event, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "an event that is not UTF-8".to_string())?;
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    if data.is_empty() {
        return Ok(Event::Other);
    }
    let data = data.join("\n");
    if data.trim() == "[DONE]" {
        return Ok(Event::Done);
    }
    let v: Value = serde_json::from_str(&data).map_err(|e| format!("an event that is not JSON ({e}): {data:.200}"))?;
    if let Some(e) = v.get("error") {
        return Err(format!("error mid-stream: {}", e["message"].as_str().unwrap_or("(no message)")));
    }
    Ok(Event::Chunk(v))
}

/// The text a chunk adds: a completion's `text` or a chat's `delta.content`.
fn chunk_text(v: &Value) -> Option<&str> {
    let c = v.get("choices")?.get(0)?;
    c.get("text").or_else(|| c.get("delta")?.get("content"))?.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_and_read_as_openai_servers_send_them() {
        let s = b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: [DONE]\n\n";
        let (text_end, end) = find_event_end(s).unwrap();
        assert_eq!(&s[end..], b"data: [DONE]\n\n");
        let Event::Chunk(v) = parse_event(&s[..text_end]).unwrap() else {
            panic!()
        };
        assert_eq!(chunk_text(&v), Some("a"));
        assert!(matches!(parse_event(b"data: [DONE]").unwrap(), Event::Done));
        assert!(matches!(parse_event(b": keep-alive").unwrap(), Event::Other));
        let chat = parse_event(b"data:{\"choices\":[{\"delta\":{\"content\":\"x\"}}]}").unwrap();
        let Event::Chunk(v) = chat else { panic!() };
        assert_eq!(chunk_text(&v), Some("x"));
        assert_eq!(find_event_end(b"data: 1\r\n\r\nrest"), Some((7, 11)));
        assert_eq!(find_event_end(b"data: partial"), None);
        let e = parse_event(b"data: {\"error\":{\"message\":\"overloaded\",\"code\":429}}").unwrap_err();
        assert!(e.contains("overloaded"), "{e}");
        assert!(parse_event(b"data: {nope").is_err());
    }

    #[test]
    fn error_bodies_give_the_message() {
        assert_eq!(error_message(br#"{"error":{"message":"bad model"}}"#), "bad model");
        assert_eq!(error_message(b" plain text "), "plain text");
    }
}
