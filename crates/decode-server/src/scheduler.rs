//! The continuous batch: one thread decodes every running sequence one token per
//! step (up to `max_batch` per step, rotating when more are running). Sequences join
//! between steps with their first token already sampled, and leave when they stop,
//! fail, or their client goes away; their blocks are released then.
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use daemon::convert;
use engine::{DecodeInput, Engine, FinishReason, Pick, SamplingParams, TextStream};
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
        }
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
    /// Signalled whenever blocks are released: admission waits on it.
    pub blocks_freed: Arc<tokio::sync::Notify>,
}

impl Scheduler {
    pub fn start(engine: Arc<Engine>, max_batch: usize) -> Scheduler {
        let (tx, rx) = mpsc::channel();
        let freed = Arc::new(tokio::sync::Notify::new());
        let (f, e) = (freed.clone(), engine.clone());
        std::thread::Builder::new()
            .name("decode-batch".into())
            .spawn(move || run(e, rx, max_batch, f))
            .expect("scheduler thread");
        Scheduler {
            tx: std::sync::Mutex::new(Some(tx)),
            engine,
            blocks_freed: freed,
        }
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

fn run(engine: Arc<Engine>, rx: Receiver<Job>, max_batch: usize, freed: Arc<tokio::sync::Notify>) {
    let mut running: Vec<Job> = Vec::new();
    let mut offset = 0usize;
    let finish = |job: Job| release(&engine, &freed, job.seq);
    loop {
        // Join: new sequences whose first token (sampled at prefill) is not out yet send it.
        let first = if running.is_empty() {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(j) => Some(j),
                Err(RecvTimeoutError::Timeout) => continue,
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
                finish(job);
            } else {
                running.push(job);
            }
        }
        // Leave: clients that went away.
        let (gone, keep): (Vec<Job>, Vec<Job>) = running.drain(..).partition(|j| j.tx.is_closed());
        running = keep;
        for j in gone {
            info!(request_id = %j.id, "client went away; sequence cancelled");
            metrics::counter!(daemon::metrics::REQUESTS_CANCELLED).increment(1);
            finish(j);
        }
        if closed {
            break;
        }
        if running.is_empty() {
            continue;
        }
        // Step: up to max_batch sequences, rotating so none starves.
        let n = running.len().min(max_batch);
        metrics::gauge!(daemon::metrics::RUNNING).set(running.len() as f64);
        metrics::histogram!(daemon::metrics::BATCH_SIZE).record(n as f64);
        offset %= running.len();
        let picked: Vec<usize> = (0..n).map(|i| (offset + i) % running.len()).collect();
        offset += n;
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
                    finish(running.swap_remove(i));
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
                    let _ = job.tx.send(Event::Failed(status.clone()));
                    finish(job);
                }
            }
        }
    }
    for job in running.drain(..) {
        let _ = job.tx.send(Event::Failed(Status::unavailable("decode-server is shutting down")));
        finish(job);
    }
}
