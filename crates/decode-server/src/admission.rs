//! Admission: a request's checks, and its KV blocks as a lease that gives them back
//! however the request ends (or holds them while a write into them may still land).
use std::sync::Arc;
use std::time::Duration;

use daemon::status::from_engine;
use daemon::validate;
use engine::{Engine, EngineError};
use proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::warn;

use crate::DecodeService;
use crate::scheduler::release;

/// A request's KV blocks. Dropped, it releases them, unless the scheduler took them
/// over (`armed` false) or a prefill-server's write may still land in them (see
/// [`Lease::quarantine`]).
pub(crate) struct Lease {
    pub(crate) engine: Arc<Engine>,
    pub(crate) freed: Arc<tokio::sync::Notify>,
    pub(crate) seq: u64,
    pub(crate) blocks: Vec<u32>,
    /// Leading prompt tokens whose K/V the blocks already hold (our prefix cache).
    pub(crate) cached_tokens: usize,
    pub(crate) armed: bool,
}

impl Lease {
    /// Keeps the blocks from other requests until `until`: a write a failed prefill
    /// started (or may start) could land in them before then.
    /// The lease is disarmed (dropping it afterwards frees nothing); a lease already
    /// disarmed (quarantined, or taken over by the scheduler) is left alone.
    pub(crate) fn quarantine(&mut self, until: tokio::time::Instant) {
        if !self.armed {
            return;
        }
        warn!(
            seq = self.seq,
            blocks = self.blocks.len(),
            hold_ms = until.saturating_duration_since(tokio::time::Instant::now()).as_millis() as u64,
            "a failed or cancelled prefill's blocks are held until no write of it can land"
        );
        // The blocks move to an armed copy of this lease, dropped (released) at `until`.
        let held = Lease {
            engine: self.engine.clone(),
            freed: self.freed.clone(),
            seq: self.seq,
            blocks: Vec::new(),
            cached_tokens: 0,
            armed: true,
        };
        self.armed = false;
        daemon::metrics::quarantine(held, self.blocks.len(), until);
    }
}

impl Lease {
    /// Releases the blocks now (no write into them can be pending); the lease is
    /// disarmed and holds none.
    pub(crate) fn give_back(&mut self) {
        if self.armed {
            release(&self.engine, &self.freed, self.seq);
            self.armed = false;
        }
        self.blocks.clear();
        self.cached_tokens = 0;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.armed {
            release(&self.engine, &self.freed, self.seq);
        }
    }
}

impl DecodeService {
    /// Every check of the request (before any stream starts), then the pool's size:
    /// a request that could never fit is refused now, not after its deadline.
    pub(crate) async fn validate(&self, req: &pb::GenerateRequest) -> Result<(Vec<u32>, engine::SamplingParams), Status> {
        let limits = validate::Limits::new(&self.engine, self.cfg.max_prompt_tokens, self.cfg.max_tokens_limit);
        let (prompt, params) = validate::generate(&self.engine, req, limits).await?;
        let need = self.engine.blocks_for(prompt.len() + params.max_tokens as usize);
        if need > self.engine.total_blocks() {
            // Permanent, not load: OUT_OF_RANGE (HTTP 400), so no client retries it.
            return Err(Status::out_of_range(format!(
                "the request needs {need} KV blocks (prompt + max_tokens), the pool has {}: shorten the prompt or lower max_tokens",
                self.engine.total_blocks()
            )));
        }
        Ok((prompt, params))
    }

    /// Takes the blocks of a prompt of `prompt_len` tokens whose full blocks have
    /// `hashes` (those of its leading blocks in our prefix cache are shared), covering
    /// `admit_tokens` positions (see `kv_allocation`). When they are not free at once,
    /// the request waits in line (first come, first served: a large request is not
    /// starved by small ones behind it) up to the queue deadline, unless `max_waiting`
    /// others already wait (then RESOURCE_EXHAUSTED at once, with a retry hint) or its
    /// client goes away. Preempted sequences resume before anyone in line is admitted.
    pub(crate) async fn lease(
        &self,
        prompt_len: usize,
        max_tokens: u32,
        hashes: &[engine::BlockHash],
        cancel: &CancellationToken,
    ) -> Result<Lease, Status> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.cfg.queue_deadline_ms);
        let seq = self.engine.next_sequence_id();
        let tokens = self.cfg.admit_tokens(prompt_len, max_tokens);
        let lease = |a: engine::Admitted| {
            metrics::gauge!(daemon::metrics::BLOCKS_FREE).set(self.engine.free_blocks() as f64);
            Lease {
                engine: self.engine.clone(),
                freed: self.scheduler.blocks_freed.clone(),
                seq,
                blocks: a.blocks,
                cached_tokens: a.cached_tokens,
                armed: true,
            }
        };
        let admit = || -> Result<engine::Admitted, EngineError> {
            // On demand, running sequences grow into the pool: a new one leaves them a
            // margin, and waits while any preempted sequence waits to resume.
            if !self.cfg.reserves() {
                let (free, total) = (self.engine.available_blocks(), self.engine.total_blocks());
                let need = self.engine.blocks_for(tokens) + self.scheduler.watermark;
                if self.scheduler.preempted() > 0 || (free < need && self.engine.sequences() > 0) {
                    return Err(EngineError::OutOfBlocks { needed: need, free, total });
                }
            }
            self.engine.admit_sequence(seq, prompt_len, tokens, hashes)
        };
        // Nobody in line and the blocks free: no wait.
        if let Ok(_line) = self.line.try_lock() {
            match admit() {
                Ok(blocks) => return Ok(lease(blocks)),
                Err(EngineError::OutOfBlocks { .. }) => {}
                Err(e) => return Err(from_engine(&e)),
            }
        }
        let Some(_waiting) = daemon::metrics::Waiting::enter(&self.waiting, self.cfg.max_waiting) else {
            return Err(daemon::metrics::rejected(
                "queue_full",
                format!(
                    "overloaded: {} requests already wait for KV blocks (max_waiting); retry later",
                    self.cfg.max_waiting
                ),
                RETRY_AFTER_MS,
            ));
        };
        let wait = async {
            // tokio's Mutex hands itself over in the order it was asked for: the line.
            let _line = self.line.lock().await;
            loop {
                let freed = self.scheduler.blocks_freed.notified();
                match admit() {
                    Ok(blocks) => return Ok(lease(blocks)),
                    Err(EngineError::OutOfBlocks { needed, free, total }) => {
                        if tokio::time::timeout_at(deadline, freed).await.is_err() {
                            return Err(Status::resource_exhausted(format!(
                                "no KV blocks within queue_deadline_ms: need {needed}, {free} free of {total}"
                            )));
                        }
                    }
                    Err(e) => return Err(from_engine(&e)),
                }
            }
        };
        let queued = async {
            tokio::time::timeout_at(deadline, wait).await.unwrap_or_else(|_| {
                Err(Status::resource_exhausted(
                    "no KV blocks within queue_deadline_ms (waiting in line behind others)",
                ))
            })
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(Status::cancelled("the client went away while the request waited for KV blocks")),
            r = queued => r,
        }
    }
}

/// The retry hint of a request refused because the line is full.
const RETRY_AFTER_MS: u64 = 1_000;
