//! One thread per UCX/NIXL agent owns the library's objects (they are not thread
//! safe in the mode we use them) and progresses them. Callers talk to it through a
//! channel: synchronous calls for set-up (register, connect, prepare), oneshot
//! replies for writes. The thread polls hard while a write is in flight or a
//! notification is awaited, and parks otherwise; a new command or a new waiter for a
//! notification unparks it at once.
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crate::BackendKind;
use crate::error::{Result, TransferError};
use crate::notify::NotifyHub;

/// How long an idle driver sleeps between progress calls.
const IDLE_POLL: Duration = Duration::from_micros(500);

/// Writes up to this size are awaited by polling their answer (yielding to the
/// runtime in between) rather than by sleeping on it: waking a parked runtime thread
/// costs more than such a write takes. Larger writes take long enough that the wake
/// does not matter, and a spinning caller would take a core from the copy.
pub(crate) const SMALL_WRITE: u64 = 256 << 10;
/// How long a small write's answer is polled for before the caller sleeps on it.
const ANSWER_SPIN: Duration = Duration::from_micros(200);

pub(crate) trait Work: 'static {
    type Cmd: Send + 'static;
    /// Handles one command.
    fn command(&mut self, cmd: Self::Cmd);
    /// Progresses the library and completes what finished; returns whether anything
    /// is still in flight.
    fn progress(&mut self) -> bool;
    /// Releases everything, in an order the library accepts.
    fn finish(&mut self);
}

pub(crate) struct Driver<C> {
    backend: BackendKind,
    tx: Mutex<Option<mpsc::Sender<C>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The driver thread, to unpark after sending it a command.
    waker: Thread,
}

impl<C: Send + 'static> Driver<C> {
    /// Starts the thread; `make` builds the library state on it (so non-Send handles
    /// never cross threads) and its error is returned here.
    pub(crate) fn spawn<W, F>(backend: BackendKind, make: F, hub: Arc<NotifyHub>, hot: Duration) -> Result<Self>
    where
        W: Work<Cmd = C>,
        F: FnOnce() -> Result<W> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<C>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<()>>(1);
        let thread_hub = hub.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kv-{backend}"))
            .spawn(move || {
                let hub = thread_hub;
                let mut work = match make() {
                    Ok(w) => {
                        let _ = ready_tx.send(Ok(()));
                        w
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                run(&mut work, &rx, &hub, hot);
                work.finish();
            })
            .map_err(|e| TransferError::Unavailable {
                backend,
                detail: format!("cannot start driver thread: {e}"),
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {
                let waker = thread.thread().clone();
                hub.set_waker(waker.clone());
                Ok(Driver {
                    backend,
                    tx: Mutex::new(Some(tx)),
                    thread: Mutex::new(Some(thread)),
                    waker,
                })
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(TransferError::Unavailable {
                backend,
                detail: "driver thread died during start".into(),
            }),
        }
    }

    pub(crate) fn send(&self, cmd: C) -> Result<()> {
        let guard = self.tx.lock().unwrap();
        guard
            .as_ref()
            .ok_or(TransferError::Closed)?
            .send(cmd)
            .map_err(|_| TransferError::Closed)?;
        self.waker.unpark();
        Ok(())
    }

    /// Sends a command that answers through the given reply channel, and waits for
    /// the answer (set-up calls only: these are quick on the driver thread).
    pub(crate) fn call<R: Send + 'static>(&self, deadline: Duration, make: impl FnOnce(mpsc::SyncSender<R>) -> C) -> Result<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(make(tx))?;
        rx.recv_timeout(deadline).map_err(|e| match e {
            RecvTimeoutError::Timeout => TransferError::Timeout {
                what: "data-plane driver call",
                after: deadline,
            },
            RecvTimeoutError::Disconnected => TransferError::Closed,
        })
    }

    /// Sends a command that answers through a oneshot, and awaits the answer without
    /// blocking the runtime (writes: the driver enforces their deadlines). A `small`
    /// write's answer is polled for a moment first (see [`SMALL_WRITE`]).
    pub(crate) async fn ask<R: Send + 'static>(
        &self,
        small: bool,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<R>>) -> C,
    ) -> Result<R> {
        use tokio::sync::oneshot::error::TryRecvError;
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        self.send(make(tx))?;
        if small {
            let until = Instant::now() + ANSWER_SPIN;
            loop {
                match rx.try_recv() {
                    Ok(r) => return r,
                    Err(TryRecvError::Closed) => return Err(TransferError::Closed),
                    Err(TryRecvError::Empty) if Instant::now() < until => tokio::task::yield_now().await,
                    Err(TryRecvError::Empty) => break,
                }
            }
        }
        rx.await.map_err(|_| TransferError::Closed)?
    }

    /// Stops the thread after it released everything.
    pub(crate) fn shutdown(&self) {
        drop(self.tx.lock().unwrap().take());
        if let Some(t) = self.thread.lock().unwrap().take()
            && t.join().is_err()
        {
            tracing::error!(backend = %self.backend, "data-plane driver thread panicked");
        }
    }
}

fn run<W: Work>(work: &mut W, rx: &mpsc::Receiver<W::Cmd>, hub: &NotifyHub, hot: Duration) {
    let mut spins = 0u32;
    let mut last_active = Instant::now();
    loop {
        loop {
            match rx.try_recv() {
                Ok(cmd) => {
                    work.command(cmd);
                    last_active = Instant::now();
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        if work.progress() || hub.has_waiters() {
            last_active = Instant::now();
        }
        // Waking a sleeping thread costs tens of microseconds, more than a small write
        // takes: stay hot for a while after any activity, then park. Commands and new
        // notification waiters unpark the thread (a token: none is lost between the
        // checks above and the park).
        if last_active.elapsed() < hot {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            }
            continue;
        }
        std::thread::park_timeout(IDLE_POLL);
    }
}
