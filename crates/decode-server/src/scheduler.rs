//! The continuous batch: one thread decodes every running sequence one token per
//! step (up to `max_batch` per step, rotating when more are running). Sequences join
//! between steps with their first token already sampled, and leave when they stop,
//! fail, or their client goes away; their blocks are released then.
//!
//! Blocks are taken as sequences grow. When a step's sequence finds no block for its
//! next token, the newest running sequence is preempted (vLLM's recompute preemption):
//! its blocks go back to the pool and it waits, oldest first, until there is room to
//! resume; then its K/V (prompt and tokens so far) is recomputed here, and it goes on
//! with the same tokens it would have produced.
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use daemon::convert;
use engine::{DecodeInput, Engine, EngineError, FinishReason, Pick, SamplingParams, TextStream};
use proto::v1 as pb;
use tokio::sync::mpsc::UnboundedSender;
use tonic::Status;
use tracing::{info, warn};

pub enum Event {
    Chunk(pb::TokenChunk),
    Done(pb::GenerateResult),
    Failed(Status),
}

/// What streaming a token left of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    More,
    Finished(FinishReason),
    /// The client got an error instead.
    Failed,
}

pub struct Job {
    id: String,
    seq: u64,
    prompt_len: usize,
    tokens: Vec<u32>,
    blocks: Vec<u32>,
    params: SamplingParams,
    stream: TextStream,
    tx: UnboundedSender<Event>,
    received: Instant,
    queue_ms: f64,
    prefill: pb::PrefillResponse,
    prefill_server: String,
    backend: String,
    first_token_ms: f64,
    last_token: Instant,
    itl_sum_ms: f64,
    /// The first token went out before the job joined the batch (while its KV moved).
    first_sent: bool,
    /// The prompt's full blocks' hashes: a resumed sequence shares those still cached.
    hashes: Vec<engine::BlockHash>,
    /// Leading prompt tokens that were in our prefix cache at admission.
    decode_cached: usize,
    preemptions: u32,
}

impl Job {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        seq: u64,
        prompt: Vec<u32>,
        first: u32,
        blocks: Vec<u32>,
        params: SamplingParams,
        tx: UnboundedSender<Event>,
        received: Instant,
        queue_ms: f64,
        prefill: pb::PrefillResponse,
        prefill_server: String,
        backend: String,
    ) -> Job {
        let prompt_len = prompt.len();
        let mut tokens = prompt;
        tokens.push(first);
        Job {
            id,
            seq,
            prompt_len,
            tokens,
            blocks,
            params,
            stream: TextStream::new(prompt_len),
            tx,
            received,
            queue_ms,
            prefill,
            prefill_server,
            backend,
            first_token_ms: 0.0,
            last_token: Instant::now(),
            itl_sum_ms: 0.0,
            first_sent: false,
            hashes: Vec::new(),
            decode_cached: 0,
            preemptions: 0,
        }
    }

    /// What our prefix cache held of the prompt: its blocks' hashes, and the leading
    /// tokens found at admission.
    pub fn set_cache(&mut self, hashes: Vec<engine::BlockHash>, cached_tokens: usize) {
        self.hashes = hashes;
        self.decode_cached = cached_tokens;
    }

    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Streams the newest token, then ends the stream if the sequence is finished;
    /// returns true when it is over.
    fn emit(&mut self, engine: &Engine) -> bool {
        match self.send_newest(engine) {
            Sent::More => false,
            Sent::Finished(reason) => {
                self.complete(reason);
                true
            }
            Sent::Failed => true,
        }
    }

    /// Streams the newest token to the client.
    pub fn send_newest(&mut self, engine: &Engine) -> Sent {
        self.first_sent = true;
        let now = Instant::now();
        if self.generated() == 1 {
            self.first_token_ms = self.received.elapsed().as_secs_f64() * 1e3;
            metrics::histogram!(daemon::metrics::TTFT).record(self.first_token_ms / 1e3);
        } else {
            let gap = now.duration_since(self.last_token).as_secs_f64();
            self.itl_sum_ms += gap * 1e3;
            metrics::histogram!(daemon::metrics::ITL).record(gap);
        }
        metrics::counter!(daemon::metrics::GENERATED_TOKENS).increment(1);
        self.last_token = now;
        let (text, finish) = match self.stream.push(engine, &self.tokens, &self.params) {
            Ok(x) => x,
            Err(e) => {
                let _ = self.tx.send(Event::Failed(daemon::status::from_engine(&e)));
                return Sent::Failed;
            }
        };
        let last = *self.tokens.last().expect("a token");
        let _ = self.tx.send(Event::Chunk(pb::TokenChunk {
            token_ids: vec![last],
            text,
        }));
        match finish {
            Some(reason) => Sent::Finished(reason),
            None => Sent::More,
        }
    }

    /// The prefill's final figures (the KV transfer's), once the write completed.
    pub fn set_prefill(&mut self, prefill: pb::PrefillResponse) {
        self.prefill = prefill;
    }

    /// Ends the client's stream with the result.
    pub fn complete(&mut self, reason: FinishReason) {
        let n = self.generated();
        let result = pb::GenerateResult {
            request_id: self.id.clone(),
            finish_reason: convert::finish_to_wire(reason) as i32,
            token_ids: self.tokens[self.prompt_len..].to_vec(),
            text: self.stream.text().to_string(),
            prompt_tokens: self.prompt_len as u32,
            completion_tokens: n as u32,
            timings: Some(pb::Timings {
                queue_ms: self.queue_ms + self.prefill.queue_ms,
                prefill_ms: self.prefill.prefill_ms,
                kv_transfer_ms: self.prefill.kv_transfer_ms,
                first_token_ms: self.first_token_ms,
                total_ms: self.received.elapsed().as_secs_f64() * 1e3,
                kv_bytes: self.prefill.kv_bytes,
                mean_inter_token_ms: if n > 1 { self.itl_sum_ms / (n - 1) as f64 } else { 0.0 },
            }),
            prefill_server: self.prefill_server.clone(),
            cached_tokens: self.prefill.cached_tokens,
            decode_cached_tokens: self.decode_cached as u32,
            preemptions: self.preemptions,
            kv_backend: if self.prefill_server == crate::prefill::LOCAL {
                "none".into()
            } else {
                self.backend.clone()
            },
        };
        metrics::histogram!(daemon::metrics::E2E).record(self.received.elapsed().as_secs_f64());
        metrics::histogram!(daemon::metrics::QUEUE_TIME).record((self.queue_ms + self.prefill.queue_ms) / 1e3);
        info!(request_id = %self.id, tokens = n, reason = reason.as_str(), "finished");
        let _ = self.tx.send(Event::Done(result));
    }
}

pub struct Scheduler {
    tx: std::sync::Mutex<Option<Sender<Job>>>,
    /// Releases the blocks of a job submitted after `stop` (no thread takes it).
    engine: Arc<Engine>,
    /// Signalled whenever blocks are released (and when no preempted sequence waits
    /// any more): admission waits on it.
    pub blocks_freed: Arc<tokio::sync::Notify>,
    /// Preempted sequences waiting to resume, and preemptions since start.
    preempted: Arc<AtomicUsize>,
    preemptions: Arc<AtomicU64>,
    /// Blocks a new sequence leaves free for the running ones to grow into (on demand).
    pub watermark: usize,
}

impl Scheduler {
    pub fn start(engine: Arc<Engine>, max_batch: usize, resume_chunk: usize) -> Scheduler {
        let (tx, rx) = mpsc::channel();
        let freed = Arc::new(tokio::sync::Notify::new());
        let preempted = Arc::new(AtomicUsize::new(0));
        let preemptions = Arc::new(AtomicU64::new(0));
        // vLLM's default: 1% of the pool.
        let watermark = (engine.total_blocks() / 100).max(1);
        let batch = Batch {
            engine: engine.clone(),
            freed: freed.clone(),
            preempted: preempted.clone(),
            preemptions: preemptions.clone(),
            watermark,
            resume_chunk: resume_chunk.max(1),
        };
        std::thread::Builder::new()
            .name("decode-batch".into())
            .spawn(move || batch.run(rx, max_batch))
            .expect("scheduler thread");
        Scheduler {
            tx: std::sync::Mutex::new(Some(tx)),
            engine,
            blocks_freed: freed,
            preempted,
            preemptions,
            watermark,
        }
    }

    /// Preemptions since start.
    pub fn preemptions(&self) -> u64 {
        self.preemptions.load(Ordering::Relaxed)
    }

    /// Preempted sequences waiting to resume now.
    pub fn preempted(&self) -> usize {
        self.preempted.load(Ordering::Relaxed)
    }

    /// Hands a job (and its blocks) to the batch thread; after `stop`, fails it and
    /// releases its blocks.
    pub fn submit(&self, job: Job) {
        let refused = match self.tx.lock().unwrap().as_ref() {
            Some(tx) => tx.send(job).err().map(|mpsc::SendError(job)| job),
            None => Some(job),
        };
        if let Some(job) = refused {
            release(&self.engine, &self.blocks_freed, job.seq);
            let _ = job.tx.send(Event::Failed(Status::unavailable("decode-server is shutting down")));
        }
    }

    /// Stops the thread; running sequences are cancelled and their blocks released.
    pub fn stop(&self) {
        self.tx.lock().unwrap().take();
    }
}

/// Releases a sequence's blocks, and wakes the admissions waiting for blocks.
pub(crate) fn release(engine: &Engine, freed: &tokio::sync::Notify, seq: u64) {
    engine.release(seq);
    metrics::gauge!(daemon::metrics::BLOCKS_FREE).set(engine.free_blocks() as f64);
    freed.notify_waiters();
}

/// Preempted sequences: those waiting for room (oldest first), and the one whose K/V
/// is being recomputed (`done` positions so far).
#[derive(Default)]
struct Preempted {
    queue: VecDeque<Job>,
    resuming: Option<Job>,
    done: usize,
}

impl Preempted {
    fn len(&self) -> usize {
        self.queue.len() + usize::from(self.resuming.is_some())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The batch thread's view of the pool.
struct Batch {
    engine: Arc<Engine>,
    freed: Arc<tokio::sync::Notify>,
    preempted: Arc<AtomicUsize>,
    preemptions: Arc<AtomicU64>,
    watermark: usize,
    /// Most positions of a preempted sequence's K/V recomputed between two decode
    /// steps: the running sequences wait for each chunk, and it bounds the pass's memory.
    resume_chunk: usize,
}

impl Batch {
    fn finish(&self, job: Job) {
        release(&self.engine, &self.freed, job.seq);
    }

    fn fail(&self, job: Job, status: Status) {
        let _ = job.tx.send(Event::Failed(status));
        self.finish(job);
    }

    /// Gives a sequence the block its next token's K/V goes into. Out of blocks: the
    /// error (the caller preempts); any other failure ends the sequence.
    fn grow(&self, job: &mut Job) -> Result<(), EngineError> {
        let need = job.tokens.len();
        if job.blocks.len() * self.engine.layout().block_size >= need {
            return Ok(());
        }
        job.blocks = self.engine.grow(job.seq, need)?;
        metrics::gauge!(daemon::metrics::BLOCKS_FREE).set(self.engine.free_blocks() as f64);
        Ok(())
    }

    /// Takes `job`'s blocks back and queues it to resume (oldest first). The count of
    /// preempted rises before the blocks go back: no admission takes them meanwhile.
    fn preempt(&self, mut job: Job, waiting: &mut Preempted) {
        job.preemptions += 1;
        self.preemptions.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(daemon::metrics::PREEMPTIONS).increment(1);
        let (seq, id, tokens) = (job.seq, job.id.clone(), job.tokens.len());
        job.blocks.clear();
        let at = waiting.queue.partition_point(|q| q.received <= job.received);
        waiting.queue.insert(at, job);
        self.set_preempted(waiting);
        release(&self.engine, &self.freed, seq);
        info!(request_id = %id, tokens, free = self.engine.free_blocks(), "KV pool full: sequence preempted");
    }

    /// Publishes the preempted sequences: how many wait (admissions wait behind them),
    /// and the blocks the queued ones will take (no room for new requests, as the
    /// router's view of the pool has it).
    fn set_preempted(&self, waiting: &Preempted) {
        let n = waiting.len();
        self.engine
            .hold_blocks(waiting.queue.iter().map(|j| self.engine.blocks_for(j.tokens.len())).sum());
        let was = self.preempted.swap(n, Ordering::Relaxed);
        metrics::gauge!(daemon::metrics::PREEMPTED).set(n as f64);
        if n == 0 && was > 0 {
            // Admissions held back for the preempted may go now.
            self.freed.notify_waiters();
        }
    }

    /// One step of resuming: the oldest preempted sequence gets its blocks once the pool
    /// has room for it and a block more for each running sequence (they grow too: a
    /// smaller margin would preempt it again at once), and then its K/V is recomputed
    /// from its tokens, at most `resume_chunk` positions a step, between decode steps
    /// (the prompt's cached blocks are shared, not recomputed). Done, it runs again.
    fn resume(&self, waiting: &mut Preempted, running: &mut Vec<Job>) {
        let waited = waiting.len();
        if waiting.resuming.is_none()
            && let Some(job) = waiting.queue.front()
        {
            // Room for the running sequences' growth over the steps its recompute takes
            // (at least the watermark); with none running, only for itself (a sequence
            // the pool can hold alone always resumes).
            let len = job.tokens.len();
            let steps = (len - 1).div_ceil(self.resume_chunk);
            let growth = running.len() * (steps.div_ceil(self.engine.layout().block_size) + 1);
            let margin = if running.is_empty() { 0 } else { self.watermark.max(growth) };
            let need = (self.engine.blocks_for(len) + margin).min(self.engine.total_blocks());
            if self.engine.free_blocks() >= need {
                let mut job = waiting.queue.pop_front().expect("a front");
                match self.engine.admit_sequence(job.seq, len - 1, len, &job.hashes) {
                    Ok(a) => {
                        job.blocks = a.blocks;
                        waiting.done = a.cached_tokens;
                        waiting.resuming = Some(job);
                        // Its blocks are taken: no longer promised.
                        self.set_preempted(waiting);
                        metrics::gauge!(daemon::metrics::BLOCKS_FREE).set(self.engine.free_blocks() as f64);
                    }
                    Err(EngineError::OutOfBlocks { .. }) => waiting.queue.push_front(job),
                    Err(e) => self.fail(job, daemon::status::from_engine(&e)),
                }
            }
        }
        if let Some(job) = waiting.resuming.take() {
            // Every position but the last token's (its next decode step writes that).
            let (len, from) = (job.tokens.len(), waiting.done);
            let to = (from + self.resume_chunk).min(len - 1);
            // A chunk of the "prompt" `tokens[..len - 1]`: no logits but for its last.
            let part = engine::PrefillPart {
                prompt: &job.tokens[..len - 1],
                from,
                to,
                blocks: &job.blocks,
                params: &job.params,
            };
            let step = if from < to {
                self.engine.prefill_batch_pick(&[part]).map(|_| ())
            } else {
                Ok(())
            };
            match step {
                Err(e) => {
                    warn!(request_id = %job.id, error = %e, "a preempted sequence could not resume");
                    self.fail(job, daemon::status::from_engine(&e));
                }
                Ok(()) if to == len - 1 => {
                    info!(request_id = %job.id, tokens = len, "preempted sequence resumed");
                    running.push(job);
                }
                Ok(()) => {
                    waiting.done = to;
                    waiting.resuming = Some(job);
                }
            }
        }
        // Published when one left (resumed or failed); not at every decode step.
        if waiting.len() != waited {
            self.set_preempted(waiting);
        }
    }

    fn run(self, rx: Receiver<Job>, max_batch: usize) {
        let engine = self.engine.clone();
        let mut running: Vec<Job> = Vec::new();
        let mut preempted = Preempted::default();
        let mut offset = 0usize;
        loop {
            // Join: new sequences whose first token (sampled at prefill) is not out yet send it.
            let first = if running.is_empty() {
                // Preempted sequences resume once blocks come back: look again soon (at
                // once while one is being recomputed).
                let wait = match (&preempted.resuming, preempted.is_empty()) {
                    (Some(_), _) => 0,
                    (None, true) => 100,
                    (None, false) => 5,
                };
                match rx.recv_timeout(Duration::from_millis(wait)) {
                    Ok(j) => Some(j),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                None
            };
            let mut closed = false;
            for mut job in first.into_iter().chain(std::iter::from_fn(|| match rx.try_recv() {
                Ok(j) => Some(j),
                Err(mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    None
                }
                Err(mpsc::TryRecvError::Empty) => None,
            })) {
                if job.tx.is_closed() || (!job.first_sent && job.emit(&engine)) {
                    self.finish(job);
                } else {
                    running.push(job);
                }
            }
            // Leave: clients that went away.
            let (gone, keep): (Vec<Job>, Vec<Job>) = running.drain(..).partition(|j| j.tx.is_closed());
            running = keep;
            let (mut gone_waiting, keep): (Vec<Job>, Vec<Job>) = preempted.queue.drain(..).partition(|j| j.tx.is_closed());
            preempted.queue = keep.into();
            if let Some(j) = preempted.resuming.take_if(|j| j.tx.is_closed()) {
                gone_waiting.push(j);
            }
            if !gone_waiting.is_empty() {
                self.set_preempted(&preempted);
            }
            for j in gone.into_iter().chain(gone_waiting) {
                info!(request_id = %j.id, "client went away; sequence cancelled");
                metrics::counter!(daemon::metrics::REQUESTS_CANCELLED).increment(1);
                self.finish(j);
            }
            if closed {
                break;
            }
            self.resume(&mut preempted, &mut running);
            // Step: up to max_batch sequences, rotating so none starves, each with a
            // block for its new token (out of blocks: the newest running is preempted).
            let picked = loop {
                if running.is_empty() {
                    break None;
                }
                let n = running.len().min(max_batch);
                offset %= running.len();
                let picked: Vec<usize> = (0..n).map(|i| (offset + i) % running.len()).collect();
                match picked.iter().find_map(|&i| self.grow(&mut running[i]).err().map(|e| (i, e))) {
                    None => break Some(picked),
                    Some((_, EngineError::OutOfBlocks { .. })) => {
                        let newest = (0..running.len()).max_by_key(|&i| running[i].received).expect("running");
                        let job = running.swap_remove(newest);
                        self.preempt(job, &mut preempted);
                    }
                    Some((i, e)) => {
                        let job = running.swap_remove(i);
                        self.fail(job, daemon::status::from_engine(&e));
                    }
                }
            };
            let Some(picked) = picked else {
                metrics::gauge!(daemon::metrics::RUNNING).set(0.0);
                continue;
            };
            let n = picked.len();
            offset += n;
            metrics::gauge!(daemon::metrics::RUNNING).set(running.len() as f64);
            metrics::histogram!(daemon::metrics::BATCH_SIZE).record(n as f64);
            let batch: Vec<DecodeInput> = picked
                .iter()
                .map(|&i| DecodeInput {
                    token: *running[i].tokens.last().unwrap(),
                    pos: running[i].tokens.len() - 1,
                    blocks: &running[i].blocks,
                })
                .collect();
            let picks: Vec<Pick> = picked
                .iter()
                .map(|&i| Pick {
                    params: &running[i].params,
                    history: &running[i].tokens,
                    step: running[i].generated() as u64,
                })
                .collect();
            let result = engine.decode_pick(&batch, &picks);
            drop((batch, picks));
            match result {
                Ok(next) => {
                    let mut done = Vec::new();
                    for (&i, next) in picked.iter().zip(next) {
                        let job = &mut running[i];
                        job.tokens.push(next);
                        if job.emit(&engine) {
                            done.push(i);
                        }
                    }
                    done.sort_unstable_by(|a, b| b.cmp(a));
                    for i in done {
                        self.finish(running.swap_remove(i));
                    }
                    if running.is_empty() {
                        metrics::gauge!(daemon::metrics::RUNNING).set(0.0);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "decode step failed; failing its sequences");
                    let status = daemon::status::from_engine(&e);
                    let mut picked = picked;
                    picked.sort_unstable_by(|a, b| b.cmp(a));
                    for i in picked {
                        let job = running.swap_remove(i);
                        self.fail(job, status.clone());
                    }
                }
            }
        }
        let resuming = preempted.resuming.take();
        for job in running.drain(..).chain(preempted.queue.drain(..)).chain(resuming) {
            self.fail(job, Status::unavailable("decode-server is shutting down"));
        }
        self.set_preempted(&Preempted::default());
    }
}
