//! OpenAI request bodies, parsed leniently where OpenAI's clients vary (string or list
//! prompts, stop strings and message contents) and strictly where a wrong value would
//! silently change the output (`n`, `logprobs`, penalties pdserve does not apply).
use proto::v1 as pb;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// What completions and chat completions share.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; vLLM and TGI accept it.
    pub top_k: Option<u32>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// vLLM's extras.
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    /// Our own id for the request (else one is made); echoed as `x-request-id`.
    pub request_id: Option<String>,
    /// vLLM's prefix-cache isolation: prompts share cached blocks only with equal salts.
    #[serde(default)]
    pub cache_salt: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub prompt: Prompt,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub max_completion_tokens: Option<u32>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Value>,
}

/// A body as `T`, or a 400 that says what is wrong with it.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}"), None))
}

impl Common {
    /// The request's sampling, refusing what pdserve cannot honour yet (a clear 400
    /// beats an answer that silently ignored a parameter).
    pub fn sampling(&self, max_tokens: Option<u32>, default_max_tokens: u32) -> Result<pb::SamplingParameters, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("only n = 1 is supported", Some("n")));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !matches!(v, Value::Null | Value::Bool(false)))
            || self.top_logprobs.is_some_and(|n| n > 0)
        {
            return Err(ApiError::bad_request("logprobs are not supported yet", Some("logprobs")));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::bad_request(
                    format!("{name} is not supported (use repetition_penalty)"),
                    Some(if name == "presence_penalty" {
                        "presence_penalty"
                    } else {
                        "frequency_penalty"
                    }),
                ));
            }
        }
        let stop = match &self.stop {
            None | Some(Value::Null) => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ApiError::bad_request("stop must be a string or a list of strings", Some("stop")))?,
            Some(_) => return Err(ApiError::bad_request("stop must be a string or a list of strings", Some("stop"))),
        };
        Ok(pb::SamplingParameters {
            // OpenAI's defaults: temperature 1, top_p 1; with no seed, a fresh one.
            temperature: Some(self.temperature.unwrap_or(1.0)),
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: Some(self.seed.map(|s| s as u64).unwrap_or_else(rand::random)),
            max_tokens: Some(max_tokens.or(self.max_tokens).unwrap_or(default_max_tokens)),
            stop,
            ignore_eos: self.ignore_eos,
        })
    }
}

impl CompletionRequest {
    /// One prompt: a string, token ids, or a list holding exactly one of those.
    pub fn input(&self) -> Result<pb::generate_request::Input, ApiError> {
        let bad = || {
            ApiError::bad_request(
                "prompt must be a string, a list of token ids, or a list of one of those",
                Some("prompt"),
            )
        };
        match &self.prompt {
            Prompt::Missing => Err(ApiError::bad_request("prompt is required", Some("prompt"))),
            Prompt::Text(t) => Ok(pb::generate_request::Input::Text(t.clone())),
            Prompt::Ids(ids) => Ok(pb::generate_request::Input::TokenIds(pb::TokenIds { ids: ids.clone() })),
            Prompt::Several(n) => Err(ApiError::bad_request(
                format!("one prompt per request is supported, not {n} (send several requests)"),
                Some("prompt"),
            )),
            Prompt::Invalid => Err(bad()),
        }
    }
}

/// `prompt` as sent, read without building a JSON tree first: a list of token ids
/// costs 4 bytes an id in memory, not a `serde_json::Value` each (16x a body's size).
#[derive(Debug, Default, PartialEq)]
pub enum Prompt {
    #[default]
    Missing,
    Text(String),
    Ids(Vec<u32>),
    /// A list of more than one prompt (how many).
    Several(usize),
    /// Not a shape OpenAI's API allows (or ids outside u32).
    Invalid,
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Prompt, D::Error> {
        d.deserialize_any(PromptVisitor { nested: false })
    }
}

/// Reads a prompt; `nested`: inside the outer list (where only a string or ids may be).
struct PromptVisitor {
    nested: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for PromptVisitor {
    type Value = Prompt;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Prompt, D::Error> {
        d.deserialize_any(self)
    }
}

/// One element of a list: an id, or (the outer list's) a prompt of its own.
enum Elem {
    Id(u32),
    Prompt(Prompt),
}

struct ElemSeed {
    nested: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for ElemSeed {
    type Value = Elem;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Elem, D::Error> {
        struct V(bool);
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Elem;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a token id or a prompt")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Elem, E> {
                Ok(u32::try_from(v).map_or(Elem::Prompt(Prompt::Invalid), Elem::Id))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Elem, E> {
                Ok(u32::try_from(v).map_or(Elem::Prompt(Prompt::Invalid), Elem::Id))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Elem, E> {
                Ok(Elem::Prompt(Prompt::Invalid))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Elem, E> {
                Ok(Elem::Prompt(Prompt::Invalid))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Elem, E> {
                Ok(Elem::Prompt(Prompt::Invalid))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Elem, E> {
                PromptVisitor { nested: self.0 }.visit_str(v).map(Elem::Prompt)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Elem, A::Error> {
                PromptVisitor { nested: self.0 }.visit_seq(seq).map(Elem::Prompt)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Elem, A::Error> {
                PromptVisitor { nested: self.0 }.visit_map(map).map(Elem::Prompt)
            }
        }
        d.deserialize_any(V(self.nested))
    }
}

impl<'de> serde::de::Visitor<'de> for PromptVisitor {
    type Value = Prompt;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string, a list of token ids, or a list of one of those")
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Prompt, E> {
        Ok(if self.nested { Prompt::Invalid } else { Prompt::Missing })
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Prompt, E> {
        self.visit_unit()
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Prompt, E> {
        Ok(Prompt::Invalid)
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Prompt, E> {
        Ok(Prompt::Invalid)
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Prompt, E> {
        Ok(Prompt::Invalid)
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Prompt, E> {
        Ok(Prompt::Invalid)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Prompt, E> {
        Ok(Prompt::Text(v.to_string()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Prompt, E> {
        Ok(Prompt::Text(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Prompt, A::Error> {
        while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
        Ok(Prompt::Invalid)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
        let mut ids = Vec::new();
        let mut prompts = Vec::new();
        let mut invalid = false;
        while let Some(e) = seq.next_element_seed(ElemSeed { nested: true })? {
            match e {
                Elem::Id(id) => ids.push(id),
                // A prompt inside a prompt's list: only in the outer one, and never mixed with ids.
                Elem::Prompt(p) if !self.nested && matches!(p, Prompt::Text(_) | Prompt::Ids(_)) => prompts.push(p),
                Elem::Prompt(_) => invalid = true,
            }
            if !ids.is_empty() && !prompts.is_empty() {
                invalid = true;
            }
        }
        Ok(match (invalid, prompts.len()) {
            (true, _) => Prompt::Invalid,
            (false, 0) if ids.is_empty() && !self.nested => Prompt::Invalid,
            (false, 0) => Prompt::Ids(ids),
            (false, 1) => prompts.pop().unwrap_or(Prompt::Invalid),
            (false, n) => Prompt::Several(n),
        })
    }
}

impl ChatRequest {
    pub fn input(&self) -> Result<pb::generate_request::Input, ApiError> {
        let messages = self
            .messages
            .iter()
            .map(|m| {
                Ok(pb::ChatMessage {
                    role: m.role.clone(),
                    content: content_text(m.content.as_ref())?,
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok(pb::generate_request::Input::Chat(pb::Chat { messages }))
    }
}

/// A message's text: a string, or a list of parts of which only `text` ones are
/// understood.
fn content_text(v: Option<&Value>) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::bad_request(
                            format!("message content part of type {kind:?} is not supported (text only)"),
                            Some("messages"),
                        ));
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::bad_request(
            "message content must be a string or a list of parts",
            Some("messages"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_and_parameters() {
        let r: CompletionRequest = parse(br#"{"prompt": ["hi"], "max_tokens": 3, "stop": "x", "seed": 5}"#).unwrap();
        assert!(matches!(r.input().unwrap(), pb::generate_request::Input::Text(t) if t == "hi"));
        let s = r.common.sampling(None, 16).unwrap();
        assert_eq!(
            (s.max_tokens, s.seed, s.stop.as_slice()),
            (Some(3), Some(5), &["x".to_string()][..])
        );
        let r: CompletionRequest = parse(br#"{"prompt": [1, 2, 3]}"#).unwrap();
        assert!(matches!(r.input().unwrap(), pb::generate_request::Input::TokenIds(t) if t.ids == [1, 2, 3]));
        let r: CompletionRequest = parse(br#"{"prompt": [[4, 5]]}"#).unwrap();
        assert!(matches!(r.input().unwrap(), pb::generate_request::Input::TokenIds(t) if t.ids == [4, 5]));
        for bad in [
            r#"{"prompt": ["a", "b"]}"#,
            r#"{"prompt": 5}"#,
            r#"{"prompt": [-1]}"#,
            r#"{}"#,
            r#"{"prompt": null}"#,
            r#"{"prompt": []}"#,
            r#"{"prompt": [1, "a"]}"#,
            r#"{"prompt": [[1, [2]]]}"#,
            r#"{"prompt": [4294967296]}"#,
            r#"{"prompt": {"a": 1}}"#,
            r#"{"prompt": [1.5]}"#,
        ] {
            let r: CompletionRequest = parse(bad.as_bytes()).unwrap();
            assert_eq!(r.input().unwrap_err().status, 400, "{bad}");
        }
        for bad in [
            r#"{"n": 2}"#,
            r#"{"logprobs": true}"#,
            r#"{"presence_penalty": 0.5}"#,
            r#"{"stop": [1]}"#,
        ] {
            let r: CompletionRequest = parse(bad.as_bytes()).unwrap();
            assert_eq!(r.common.sampling(None, 16).unwrap_err().status, 400, "{bad}");
        }
        assert_eq!(parse::<CompletionRequest>(br#"{"max_tokens": "x"}"#).unwrap_err().status, 400);
    }

    #[test]
    fn chat_contents() {
        let r: ChatRequest =
            parse(br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#)
                .unwrap();
        match r.input().unwrap() {
            pb::generate_request::Input::Chat(c) => assert_eq!(c.messages[0].content, "ab"),
            other => panic!("{other:?}"),
        }
        let r: ChatRequest = parse(br#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#).unwrap();
        assert_eq!(r.input().unwrap_err().status, 400);
    }
}
