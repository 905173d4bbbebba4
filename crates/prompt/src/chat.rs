//! Chat templates: the model's own Jinja template from `tokenizer_config.json`,
//! rendered with minijinja (as TGI and mistral.rs do) with Python's string methods, so
//! the templates Hugging Face models ship render as `transformers` renders them.
use std::path::Path;

use serde::Serialize;

use crate::{PromptError, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Instructions a rendering may run: far above what a real template spends on the
/// largest conversation the daemons accept.
const TEMPLATE_FUEL: u64 = 50_000_000;
/// A rendered conversation's largest size.
const MAX_RENDERED_BYTES: usize = 16 << 20;

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// `bos_token`/`eos_token` in tokenizer_config.json: a string or `{ "content": ... }`.
fn special(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template in `dir/tokenizer_config.json`, if the model has one.
    pub fn load(dir: &Path) -> Result<Option<ChatTemplate>> {
        let path = dir.join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| PromptError::model(&path, format!("not JSON: {e}")))?;
        let source = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            // A list of named templates: the default one.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_string)
                .ok_or_else(|| PromptError::model(&path, "chat_template list has no \"default\" template"))?,
            _ => return Ok(None),
        };
        Self::new(&source, special(cfg.get("bos_token")), special(cfg.get("eos_token")))
            .map(Some)
            .map_err(|e| PromptError::model(&path, e.to_string()))
    }

    pub fn new(source: &str, bos_token: String, eos_token: String) -> Result<ChatTemplate> {
        let mut env = minijinja::Environment::new();
        // A model's template is code from its file: bounded, so a template that loops
        // (or a conversation it blows up) fails instead of holding a thread.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| PromptError::Invalid(format!("chat template does not parse: {e}")))?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    /// The conversation as the model expects it, ending with the assistant's turn
    /// opened (`add_generation_prompt`).
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let t = self.env.get_template("chat").expect("added at construction");
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        // A template's raise_exception (say, roles out of order) is the caller's error.
        .map_err(|e| PromptError::Invalid(format!("chat template: {e}")))
        .and_then(|text| {
            if text.len() > MAX_RENDERED_BYTES {
                return Err(PromptError::Invalid(format!(
                    "the chat template rendered {} bytes (at most {MAX_RENDERED_BYTES})",
                    text.len()
                )));
            }
            Ok(text)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template, as its tokenizer_config.json ships it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_as_transformers_does() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>".into(), "<|im_end|>".into()).unwrap();
        assert_eq!(
            t.render(&[msg("user", "Hi")]).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&[msg("system", "Be brief."), msg("user", "Hi")]).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raised_errors() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ bos_token }}{{ messages[0].content.strip() }}",
            "<s>".into(),
            String::new(),
        )
        .unwrap();
        assert_eq!(t.render(&[msg("user", "  x  ")]).unwrap(), "<s>x");
        let e = t.render(&[msg("assistant", "x")]).unwrap_err();
        assert!(matches!(e, PromptError::Invalid(m) if m.contains("first must be user")));
        assert!(ChatTemplate::new("{% for %}", String::new(), String::new()).is_err());
    }
}
