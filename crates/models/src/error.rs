//! The crate's error type: every variant names the file (or command) and the problem.
use std::path::{Path, PathBuf};

pub type Result<T, E = ModelsError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    /// A file that cannot be read, parsed or written as needed.
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: String },
    /// A GGUF of an architecture the engine does not run.
    #[error("{}: unsupported architecture {arch:?} (supported: llama, qwen2)", path.display())]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    /// A GGUF whose tokenizer is not byte-level BPE.
    #[error(
        "{}: tokenizer model {model:?} is not supported: only byte-level BPE (`gpt2`) tokenizers are imported \
         (SentencePiece `llama` vocabularies are not)",
        path.display()
    )]
    UnsupportedTokenizer { path: PathBuf, model: String },
    /// The output directory would be overwritten.
    #[error("{}: already exists and is not an empty directory; give a new or an empty one", path.display())]
    OutputExists { path: PathBuf },
    /// `pdserve model fetch` of a name not in the table.
    #[error("unknown model {name:?} (known: {known})")]
    UnknownModel { name: String, known: String },
    /// A download whose bytes are not the pinned ones.
    #[error("{}: sha256 is {actual}, expected {expected} (corrupt or tampered download; delete it and retry)", path.display())]
    Checksum { path: PathBuf, expected: String, actual: String },
    /// An external command (pip) that failed.
    #[error("`{command}` failed: {problem}")]
    Command { command: String, problem: String },
}

impl ModelsError {
    pub(crate) fn file(path: impl AsRef<Path>, problem: impl Into<String>) -> Self {
        ModelsError::File {
            path: path.as_ref().to_path_buf(),
            problem: problem.into(),
        }
    }
}
