//! The engine's error type; the daemons map it to a gRPC status once.
use std::path::PathBuf;

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A model directory that cannot be loaded: names the file and the problem.
    #[error("model file {path}: {problem}")]
    Model { path: PathBuf, problem: String },
    /// Not enough free KV blocks for a request right now.
    #[error("out of KV cache blocks: need {needed}, {free} free of {total}")]
    OutOfBlocks { needed: usize, free: usize, total: usize },
    /// A request the engine cannot serve as asked (too long, bad parameters).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Tokenizer failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A tensor operation failed (device, shapes).
    #[error("compute: {0}")]
    Compute(#[from] candle_core::Error),
}

impl EngineError {
    pub(crate) fn model(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        EngineError::Model {
            path: path.into(),
            problem: problem.into(),
        }
    }
}

impl From<prompt::PromptError> for EngineError {
    fn from(e: prompt::PromptError) -> Self {
        match e {
            prompt::PromptError::Model { path, problem } => EngineError::Model { path, problem },
            prompt::PromptError::Invalid(m) => EngineError::Invalid(m),
            prompt::PromptError::Tokenizer(m) => EngineError::Tokenizer(m),
        }
    }
}
