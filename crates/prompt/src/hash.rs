//! Names for full KV blocks: what the prefix cache of a worker keys its blocks by, what
//! its KV events publish, and what the router's index looks prompts up by.
use sha2::{Digest, Sha256};

/// A full block's identity for prefix caching: SHA-256 over the previous block's hash
/// (for the first block, the model's fingerprint) and this block's token ids, all 256
/// bits kept. A cryptographic hash because a collision would hand one request another
/// request's KV; finding one costs ~2^128 evaluations.
pub type BlockHash = [u8; 32];

/// The chained hashes of the full blocks of `tokens` (a trailing partial block has
/// none); a non-empty `salt` starts a chain of its own.
pub fn block_hashes(fingerprint: u64, salt: &str, tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut parent = [0u8; 32];
    parent[..8].copy_from_slice(&fingerprint.to_le_bytes());
    if !salt.is_empty() {
        let mut h = Sha256::new();
        h.update(b"pdserve cache_salt");
        h.update(parent);
        h.update(salt.as_bytes());
        parent = h.finalize().into();
    }
    tokens
        .chunks_exact(block_size.max(1))
        .map(|block| {
            let mut h = Sha256::new();
            h.update(parent);
            for t in block {
                h.update(t.to_le_bytes());
            }
            parent = h.finalize().into();
            parent
        })
        .collect()
}
