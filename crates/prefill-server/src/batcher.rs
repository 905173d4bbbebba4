//! The prefill scheduler: prompts whose blocks are admitted wait here, and one thread
//! packs them into forward passes of at most `max_batch_tokens` tokens and
//! `max_batch_prompts` prompts, first come first served. A prompt is computed in chunks
//! of at most `chunk_tokens` (chunked prefill), so a long prompt advances in every pass
//! it is in without holding the prompts behind it for its whole prefill; the oldest
//! prompt always gets a chunk, so none starves. A prompt's first token is sampled in
//! the pass that computes its last chunk.
use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Instant;

use engine::{Engine, PrefillPart, SamplingParams};
use tokio::sync::oneshot;
use tonic::Status;
use tracing::{info, warn};

use crate::Computed;

/// A prompt to compute into its admitted blocks (`computed` holds them: it is handed
/// back, or dropped, and so released, only once no pass writes into them any more).
pub(crate) struct Work {
    pub(crate) computed: Computed,
    pub(crate) prompt: Vec<u32>,
    pub(crate) params: SamplingParams,
    pub(crate) received: Instant,
    /// Not started by then: refused (the queue deadline).
    pub(crate) start_by: Instant,
    pub(crate) reply: oneshot::Sender<Result<Computed, Status>>,
}

/// How the passes are packed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub(crate) max_batch_tokens: usize,
    pub(crate) max_batch_prompts: usize,
    pub(crate) chunk_tokens: usize,
}

pub(crate) struct Batcher {
    tx: std::sync::Mutex<Option<Sender<Work>>>,
}

impl Batcher {
    pub(crate) fn start(engine: std::sync::Arc<Engine>, budget: Budget) -> Batcher {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("prefill-batch".into())
            .spawn(move || run(&engine, rx, budget))
            .expect("prefill thread");
        Batcher {
            tx: std::sync::Mutex::new(Some(tx)),
        }
    }

    /// Queues a prompt; after `stop`, refuses it (its blocks are released).
    pub(crate) fn submit(&self, work: Work) {
        let refused = match self.tx.lock().unwrap().as_ref() {
            Some(tx) => tx.send(work).err().map(|mpsc::SendError(w)| w),
            None => Some(work),
        };
        if let Some(w) = refused {
            let _ = w.reply.send(Err(Status::unavailable("prefill-server is shutting down")));
        }
    }

    /// Ends the thread once the prompts queued are done.
    pub(crate) fn stop(&self) {
        self.tx.lock().unwrap().take();
    }
}

struct Active {
    work: Work,
    /// Positions whose K/V the blocks hold (a cached prefix, then computed chunks).
    done: usize,
    started: Option<Instant>,
}

fn run(engine: &Engine, rx: Receiver<Work>, budget: Budget) {
    let mut queue: VecDeque<Active> = VecDeque::new();
    let admit = |w: Work| Active {
        done: w.computed.cached_tokens,
        work: w,
        started: None,
    };
    loop {
        if queue.is_empty() {
            match rx.recv() {
                Ok(w) => queue.push_back(admit(w)),
                Err(_) => break,
            }
        }
        while let Ok(w) = rx.try_recv() {
            queue.push_back(admit(w));
        }
        // Prompts nobody waits for any more, and those past the queue deadline before
        // their first chunk, leave (their blocks are released as they drop).
        let now = Instant::now();
        queue.retain_mut(|a| {
            if a.work.reply.is_closed() {
                info!("prompt dropped from the prefill queue: its caller went away");
                return false;
            }
            if a.started.is_none() && now >= a.work.start_by {
                let (tx, _) = oneshot::channel();
                let reply = std::mem::replace(&mut a.work.reply, tx);
                let _ = reply.send(Err(Status::resource_exhausted(
                    "prefill queue: not started within queue_deadline_ms",
                )));
                return false;
            }
            true
        });
        if queue.is_empty() {
            continue;
        }
        // The pass: the oldest prompts first, a chunk each, within the budget.
        let mut left = budget.max_batch_tokens.max(1);
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (queue index, chunk end)
        for (i, a) in queue.iter().enumerate() {
            if left == 0 || plan.len() >= budget.max_batch_prompts.max(1) {
                break;
            }
            let take = (a.work.prompt.len() - a.done).min(budget.chunk_tokens.max(1)).min(left);
            plan.push((i, a.done + take));
            left -= take;
        }
        let t = Instant::now();
        for &(i, _) in &plan {
            queue[i].started.get_or_insert(t);
        }
        let parts: Vec<PrefillPart<'_>> = plan
            .iter()
            .map(|&(i, to)| {
                let a = &queue[i];
                PrefillPart {
                    prompt: &a.work.prompt,
                    from: a.done,
                    to,
                    blocks: &a.work.computed.blocks,
                    params: &a.work.params,
                }
            })
            .collect();
        let tokens: usize = parts.iter().map(|p| p.to - p.from).sum();
        metrics::histogram!(daemon::metrics::PREFILL_BATCH_TOKENS).record(tokens as f64);
        metrics::histogram!(daemon::metrics::PREFILL_BATCH_PROMPTS).record(parts.len() as f64);
        let result = engine.prefill_batch_pick(&parts);
        drop(parts);
        let mut finished = Vec::new();
        match result {
            Ok(firsts) => {
                for (&(i, to), first) in plan.iter().zip(firsts) {
                    queue[i].done = to;
                    if let Some(token) = first {
                        finished.push((i, Ok(token)));
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, prompts = plan.len(), "prefill pass failed; failing its prompts");
                let status = daemon::status::from_engine(&e);
                finished.extend(plan.iter().map(|&(i, _)| (i, Err(status.clone()))));
            }
        }
        // Highest index first: removing one leaves the others' indices valid.
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (i, outcome) in finished {
            let a = queue.remove(i).expect("planned");
            let Work {
                mut computed,
                received,
                reply,
                ..
            } = a.work;
            let started = a.started.expect("computed");
            let _ = reply.send(outcome.map(|token| {
                computed.first_token = token;
                computed.queue_ms = started.duration_since(received).as_secs_f64() * 1e3;
                computed.prefill_ms = started.elapsed().as_secs_f64() * 1e3;
                computed
            }));
        }
    }
}
