//! The one validation of what clients and peers send, called by every entry point:
//! the router's `Generate`, the decode-server's `Generate`, the prefill-server's
//! `Prefill` and `EarlyPrefill`. Every size is capped before it is used (text before
//! it is tokenized, and tokenized on a blocking thread, never a runtime thread).
//! Refusals are INVALID_ARGUMENT, with the reason.
use std::sync::Arc;

use engine::{Engine, SamplingParams};
use proto::v1 as pb;
use tonic::Status;

use crate::convert;
use crate::status::from_engine;

/// Longest `request_id`, in bytes. Ids go into logs, metrics and metadata.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Longest text prompt the router forwards (it knows no model; each daemon then
/// applies its own, tighter cap).
pub const MAX_PROMPT_BYTES: usize = 4 << 20;
/// An engine daemon refuses text longer than this many bytes per allowed prompt
/// token before tokenizing: no tokenizer makes tokens that long on average, so no
/// prompt that fits is refused, and the tokenizer's work stays bounded.
pub const PROMPT_BYTES_PER_TOKEN: usize = 32;

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// A request id: at most [`MAX_REQUEST_ID_BYTES`] printable ASCII characters (empty:
/// one is generated).
pub fn request_id(id: &str) -> Result<(), Status> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(invalid(format!(
            "request_id of {} bytes exceeds the limit of {MAX_REQUEST_ID_BYTES}",
            id.len()
        )));
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(invalid(format!(
            "request_id may hold printable ASCII only (no spaces or control characters), found {c:?}"
        )));
    }
    Ok(())
}

/// Longest data-plane agent name a peer may give (the data plane's own limit).
pub const MAX_PEER_NAME_BYTES: usize = 256;

/// A peer's data-plane agent name (Handshake, Prefill): 1 to 256 printable ASCII bytes.
/// It goes into logs and status messages.
pub fn peer_name(name: &str) -> Result<(), Status> {
    if name.is_empty() || name.len() > MAX_PEER_NAME_BYTES || !name.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(format!(
            "peer_name must be 1 to {MAX_PEER_NAME_BYTES} printable ASCII bytes"
        )));
    }
    Ok(())
}

/// Sampling parameters with the API's defaults, checked (ranges, `max_tokens` within
/// `max_tokens_limit`, stop strings' count and length).
pub fn sampling(p: Option<&pb::SamplingParameters>, max_tokens_limit: u32) -> Result<SamplingParams, Status> {
    let params = convert::sampling(p);
    params.validate(max_tokens_limit).map_err(invalid)?;
    Ok(params)
}

/// The prompt's presence and size, before anything reads it.
pub fn prompt_size(input: Option<&pb::generate_request::Input>, max_bytes: usize, max_tokens: usize) -> Result<(), Status> {
    match input {
        None => Err(invalid("the request has no prompt: set text or token_ids")),
        Some(pb::generate_request::Input::Text(t)) if t.is_empty() => Err(invalid("the prompt is empty")),
        Some(pb::generate_request::Input::Text(t)) if t.len() > max_bytes => Err(invalid(format!(
            "prompt text of {} bytes exceeds the limit of {max_bytes}",
            t.len()
        ))),
        Some(pb::generate_request::Input::TokenIds(ids)) => prompt_len(ids.ids.len(), max_tokens),
        Some(pb::generate_request::Input::Text(_)) => Ok(()),
        Some(pb::generate_request::Input::Chat(c)) => chat_size(c, max_bytes),
    }
}

/// Most messages in a conversation, and the longest role name.
pub const MAX_CHAT_MESSAGES: usize = 4096;
pub const MAX_ROLE_BYTES: usize = 64;

fn chat_size(c: &pb::Chat, max_bytes: usize) -> Result<(), Status> {
    if c.messages.is_empty() {
        return Err(invalid("the conversation is empty: messages needs at least one"));
    }
    if c.messages.len() > MAX_CHAT_MESSAGES {
        return Err(invalid(format!(
            "{} messages exceed the limit of {MAX_CHAT_MESSAGES}",
            c.messages.len()
        )));
    }
    if let Some(m) = c.messages.iter().find(|m| m.role.is_empty() || m.role.len() > MAX_ROLE_BYTES) {
        return Err(invalid(format!(
            "a message role must be 1 to {MAX_ROLE_BYTES} bytes, got {:?}",
            m.role.chars().take(MAX_ROLE_BYTES).collect::<String>()
        )));
    }
    let bytes: usize = c.messages.iter().map(|m| m.content.len() + m.role.len()).sum();
    if bytes > max_bytes {
        return Err(invalid(format!(
            "the conversation's {bytes} bytes exceed the prompt limit of {max_bytes}"
        )));
    }
    Ok(())
}

fn prompt_len(n: usize, max_tokens: usize) -> Result<(), Status> {
    if n == 0 {
        return Err(invalid("the prompt is empty"));
    }
    if n > max_tokens {
        return Err(invalid(format!("prompt of {n} tokens exceeds the limit of {max_tokens}")));
    }
    Ok(())
}

/// The router's check: everything that needs no model.
pub fn routed(req: &pb::GenerateRequest) -> Result<(), Status> {
    request_id(&req.request_id)?;
    prompt_size(req.input.as_ref(), MAX_PROMPT_BYTES, MAX_PROMPT_BYTES)?;
    sampling(req.sampling.as_ref(), u32::MAX)?;
    Ok(())
}

/// The limits of a daemon that runs the model.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest prompt, in tokens.
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` (`u32::MAX` on the prefill-server: the decode-server caps it).
    pub max_tokens_limit: u32,
}

impl Limits {
    /// A daemon's limits from its config: `max_prompt_tokens` 0 means the model's maximum.
    pub fn new(engine: &Engine, max_prompt_tokens: usize, max_tokens_limit: u32) -> Limits {
        Limits {
            max_prompt_tokens: match max_prompt_tokens {
                0 => engine.max_model_len(),
                n => n,
            },
            max_tokens_limit,
        }
    }

    fn max_prompt_bytes(&self) -> usize {
        self.max_prompt_tokens.saturating_mul(PROMPT_BYTES_PER_TOKEN)
    }
}

/// A generate request for a daemon with the model: every check, the text tokenized on
/// a blocking thread once its size passed; returns the prompt's tokens and sampling.
pub async fn generate(engine: &Arc<Engine>, req: &pb::GenerateRequest, limits: Limits) -> Result<(Vec<u32>, SamplingParams), Status> {
    request_id(&req.request_id)?;
    cache_salt(&req.cache_salt)?;
    let params = sampling(req.sampling.as_ref(), limits.max_tokens_limit)?;
    prompt_size(req.input.as_ref(), limits.max_prompt_bytes(), limits.max_prompt_tokens)?;
    let tokens = match &req.input {
        Some(pb::generate_request::Input::Text(t)) => {
            let (e, t) = (engine.clone(), t.clone());
            tokio::task::spawn_blocking(move || e.tokenize(&t))
                .await
                .map_err(|e| Status::internal(format!("tokenizer task: {e}")))?
                .map_err(|e| from_engine(&e))?
        }
        Some(pb::generate_request::Input::TokenIds(ids)) => ids.ids.clone(),
        Some(pb::generate_request::Input::Chat(c)) => {
            let messages = crate::convert::chat_from_wire(c);
            let e = engine.clone();
            tokio::task::spawn_blocking(move || e.chat_prompt(&messages))
                .await
                .map_err(|e| Status::internal(format!("chat template task: {e}")))?
                .map_err(|e| from_engine(&e))?
        }
        None => unreachable!("prompt_size refuses a request without a prompt"),
    };
    prompt(engine, &tokens, &params, limits)?;
    Ok((tokens, params))
}

/// A prefill-server's `Prefill`: the id, the tokens and the sampling it carries.
pub fn prefill(engine: &Engine, req: &pb::PrefillRequest, limits: Limits) -> Result<SamplingParams, Status> {
    request_id(&req.request_id)?;
    cache_salt(&req.cache_salt)?;
    let params = sampling(req.sampling.as_ref(), limits.max_tokens_limit)?;
    prompt(engine, &req.token_ids, &params, limits)?;
    Ok(params)
}

/// Longest `cache_salt`, in bytes.
pub const MAX_CACHE_SALT_BYTES: usize = 256;

/// A prefix-cache salt: any text up to [`MAX_CACHE_SALT_BYTES`].
pub fn cache_salt(salt: &str) -> Result<(), Status> {
    if salt.len() > MAX_CACHE_SALT_BYTES {
        return Err(Status::invalid_argument(format!(
            "cache_salt is {} bytes; at most {MAX_CACHE_SALT_BYTES}",
            salt.len()
        )));
    }
    Ok(())
}

/// Tokens against the limits and the model (vocabulary, sequence length).
fn prompt(engine: &Engine, tokens: &[u32], params: &SamplingParams, limits: Limits) -> Result<(), Status> {
    prompt_len(tokens.len(), limits.max_prompt_tokens)?;
    engine.check_prompt(tokens, params).map_err(|e| from_engine(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_short_and_printable() {
        assert!(request_id("").is_ok());
        assert!(request_id("req-0123_abc.9:x").is_ok());
        assert!(request_id(&"a".repeat(MAX_REQUEST_ID_BYTES)).is_ok());
        for bad in ["a".repeat(MAX_REQUEST_ID_BYTES + 1), "a b".into(), "a\nb".into(), "é".into()] {
            assert_eq!(request_id(&bad).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn routed_requests_are_capped() {
        let text = |t: &str| pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Text(t.into())),
            ..Default::default()
        };
        assert!(routed(&text("hi")).is_ok());
        for (req, why) in [
            (pb::GenerateRequest::default(), "no prompt"),
            (text(""), "empty"),
            (text(&"x".repeat(MAX_PROMPT_BYTES + 1)), "exceeds"),
        ] {
            let s = routed(&req).unwrap_err();
            assert_eq!(s.code(), tonic::Code::InvalidArgument);
            assert!(s.message().contains(why), "{}", s.message());
        }
        let mut long_stop = text("hi");
        long_stop.sampling = Some(pb::SamplingParameters {
            stop: vec!["s".repeat(engine::MAX_STOP_BYTES + 1)],
            ..Default::default()
        });
        assert_eq!(routed(&long_stop).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
