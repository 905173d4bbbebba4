//! A request's prompt as every pdserve daemon and the router see it:
//!
//! - [`Prompter`]: the model's tokenizer and chat template, loaded from a model
//!   directory without its weights (the router tokenizes with it to route by prefix);
//! - [`block_hashes`]: the chained hashes that name a prompt's full KV blocks, the
//!   same on the workers that cache blocks and on the router that indexes them.
pub mod chat;
pub mod hash;

use std::path::{Path, PathBuf};

pub use chat::{ChatMessage, ChatTemplate};
pub use hash::{BlockHash, block_hashes};

pub type Result<T, E = PromptError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// A tokenizer or template file that cannot be loaded: names the file and the problem.
    #[error("model file {path}: {problem}")]
    Model { path: PathBuf, problem: String },
    /// A prompt that cannot be made as asked (no template, a template's own error).
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl PromptError {
    pub fn model(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        PromptError::Model {
            path: path.into(),
            problem: problem.into(),
        }
    }
}

/// A model's tokenizer (`tokenizer.json`) and chat template (`tokenizer_config.json`).
pub struct Prompter {
    tokenizer: tokenizers::Tokenizer,
    /// The model's chat template, if it ships one.
    chat: Option<ChatTemplate>,
}

impl Prompter {
    /// From a model directory: `tokenizer.json` must be there, a chat template may be.
    pub fn load(dir: &Path) -> Result<Prompter> {
        let path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| PromptError::model(&path, format!("not a tokenizer: {e}")))?;
        Ok(Prompter {
            tokenizer,
            chat: ChatTemplate::load(dir)?,
        })
    }

    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// A conversation's prompt: the model's chat template with the assistant's turn
    /// opened, tokenized without adding special tokens (the template writes them).
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let t = self.chat.as_ref().ok_or_else(|| {
            PromptError::Invalid("this model has no chat template (tokenizer_config.json): send text or token_ids".into())
        })?;
        let text = t.render(messages)?;
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn detokenize(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| PromptError::Tokenizer(e.to_string()))
    }
}
