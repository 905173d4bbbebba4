//! pdserve's engine: Llama-family models (Llama 2/3/3.x, TinyLlama, SmolLM, Qwen2) on
//! candle, with a paged KV cache whose blocks the data plane moves between processes.
//!
//! - [`Engine::load`] a Hugging Face model directory ([`synth`] writes a synthetic one);
//! - [`Engine::admit`] reserves KV blocks, [`Engine::prefill`] fills them,
//!   [`Engine::decode`] advances any batch of sequences by one token;
//! - [`kv_cache::KvPools::regions`] is what the data plane registers, and
//!   [`kv_cache::block_runs`] turns block tables into few, large transfer runs;
//! - [`generate::generate_local`] is the single-process reference.
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
#[cfg(feature = "cuda")]
mod graphs;
#[cfg(feature = "cuda")]
mod kernels;
pub mod kv_cache;
mod loader;
mod memory;
pub mod model;
pub mod sampling;
pub mod synth;

pub use config::{Arch, ModelConfig};
pub use engine::{Engine, EngineConfig, KV_EVENT_BACKLOG, KvEventBatch, Pick, PrefillPart, parse_device};
pub use error::{EngineError, Result};
pub use generate::{FinishReason, Generation, TextStream, generate_local};
pub use kv_cache::{Admitted, BlockHash, BlockManager, BlockRun, KvEvent, KvLayout, KvPools, PoolRegion, block_hashes, block_runs};
pub use loader::ModelDir;
pub use model::{DecodeInput, PrefillChunk};
pub use prompt::{ChatMessage, ChatTemplate};
pub use sampling::{MAX_STOP_BYTES, MAX_STOP_STRINGS, SamplingParams, sample};
