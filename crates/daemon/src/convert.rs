//! Between the wire types of `pdserve.v1` and the engine's.
use engine::{FinishReason, KvLayout, SamplingParams};
use proto::v1 as pb;

/// A conversation as the chat template takes it.
pub fn chat_from_wire(c: &pb::Chat) -> Vec<engine::ChatMessage> {
    c.messages
        .iter()
        .map(|m| engine::ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect()
}

/// Sampling parameters with the API's defaults for unset fields.
pub fn sampling(p: Option<&pb::SamplingParameters>) -> SamplingParams {
    let d = SamplingParams::default();
    let Some(p) = p else { return d };
    SamplingParams {
        temperature: p.temperature.unwrap_or(d.temperature),
        top_k: p.top_k.unwrap_or(d.top_k),
        top_p: p.top_p.unwrap_or(d.top_p),
        repetition_penalty: p.repetition_penalty.unwrap_or(d.repetition_penalty),
        seed: p.seed.unwrap_or(d.seed),
        max_tokens: p.max_tokens.unwrap_or(d.max_tokens),
        stop: p.stop.clone(),
        ignore_eos: p.ignore_eos.unwrap_or(d.ignore_eos),
    }
}

pub fn sampling_to_wire(p: &SamplingParams) -> pb::SamplingParameters {
    pb::SamplingParameters {
        temperature: Some(p.temperature),
        top_k: Some(p.top_k),
        top_p: Some(p.top_p),
        repetition_penalty: Some(p.repetition_penalty),
        seed: Some(p.seed),
        max_tokens: Some(p.max_tokens),
        stop: p.stop.clone(),
        ignore_eos: Some(p.ignore_eos),
    }
}

pub fn layout_to_wire(l: &KvLayout) -> pb::KvLayout {
    pb::KvLayout {
        model_fingerprint: l.model_fingerprint,
        num_layers: l.num_layers as u32,
        num_kv_heads: l.num_kv_heads as u32,
        head_dim: l.head_dim as u32,
        block_size: l.block_size as u32,
        dtype: l.dtype.clone(),
        num_blocks: l.num_blocks as u32,
    }
}

pub fn layout_from_wire(l: &pb::KvLayout) -> KvLayout {
    KvLayout {
        model_fingerprint: l.model_fingerprint,
        num_layers: l.num_layers as usize,
        num_kv_heads: l.num_kv_heads as usize,
        head_dim: l.head_dim as usize,
        block_size: l.block_size as usize,
        dtype: l.dtype.clone(),
        num_blocks: l.num_blocks as usize,
    }
}

pub fn finish_to_wire(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Stop => pb::FinishReason::Stop,
    }
}
