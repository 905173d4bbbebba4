//! One thread per UCX/NIXL agent progresses the library's objects. The objects live
//! behind one lock (their UCX workers are in serialized mode: any thread, one at a
//! time), together with the command channel. Callers talk to the thread through that
//! channel: synchronous calls for set-up (register, connect, prepare), oneshot
//! replies for writes. The thread polls hard while a write is in flight or a
//! notification is awaited, and parks otherwise; a new command or a new waiter for a
//! notification unparks it at once.
//!
//! A write of host memory up to [`INLINE_WRITE`] is posted from the caller's thread
//! instead ([`Driver::ask_inline`]): it takes the lock, runs what is queued before it,
//! posts, and progresses until its answer is there. Handing it to the driver thread
//! and back costs two thread hand-offs, and on 2 cores the three threads that then
//! spin (caller, driver, the peer's driver) sometimes starve one another: writes of
//! 4 KiB took 210 µs in whole runs, where inline ones take 3 µs.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
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
/// Host-memory writes up to this size are posted from the caller's thread. Over one
/// host (cma) UCX copies the bytes on the thread that progresses the write, so this
/// bounds how long a runtime thread is busy with one (about 80 µs on the 2-core CI
/// machine).
pub(crate) const INLINE_WRITE: u64 = 1 << 20;

/// How a write's caller waits for its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Posted and progressed on the caller's thread ([`Driver::ask_inline`]).
    Inline,
    /// Handed to the driver thread; its answer polled for a moment, then slept on.
    Poll,
    /// Handed to the driver thread and slept on.
    Sleep,
}

impl Wait {
    /// The way for a write of `bytes`; `host` when every byte on both sides is in
    /// host memory.
    pub(crate) fn for_write(bytes: u64, host: bool) -> Wait {
        if host && bytes <= INLINE_WRITE {
            Wait::Inline
        } else if bytes <= SMALL_WRITE {
            Wait::Poll
        } else {
            Wait::Sleep
        }
    }
}

/// The library state and the commands queued for it, under one lock.
struct Locked<W: Work> {
    work: W,
    rx: mpsc::Receiver<W::Cmd>,
}

impl<W: Work> Locked<W> {
    /// Runs every queued command, in order: whether there was any, or None once the
    /// channel is closed (the driver is stopping).
    fn drain(&mut self) -> Option<bool> {
        let mut ran = false;
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => {
                    self.work.command(cmd);
                    ran = true;
                }
                Err(TryRecvError::Empty) => return Some(ran),
                Err(TryRecvError::Disconnected) => return None,
            }
        }
    }
}

struct Shared<W: Work> {
    locked: Mutex<Option<Locked<W>>>,
    /// Callers posting inline right now: the driver thread keeps off the lock meanwhile.
    inline: AtomicUsize,
}

impl<W: Work> Shared<W> {
    fn lock(&self) -> MutexGuard<'_, Option<Locked<W>>> {
        self.locked.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Library state that may move between threads: all access goes through the driver's
/// lock, so its library calls never overlap.
pub(crate) trait Work: Send + 'static {
    type Cmd: Send + 'static;
    /// Handles one command.
    fn command(&mut self, cmd: Self::Cmd);
    /// Progresses the library and completes what finished; returns whether anything
    /// is still in flight.
    fn progress(&mut self) -> bool;
    /// Releases everything, in an order the library accepts.
    fn finish(&mut self);
}

/// Sends commands to a driver thread ([`Driver::handle`]). It shares the driver's
/// sender instead of cloning it: a handle left somewhere must not keep the channel
/// open, or the driver thread would never see its shutdown.
pub(crate) struct Handle<C> {
    tx: Arc<Mutex<Option<mpsc::Sender<C>>>>,
    waker: Thread,
}

impl<C> Handle<C> {
    pub(crate) fn send(&self, cmd: C) {
        // A command that is not sent is dropped after the lock is released (it may
        // hold a lease whose drop sends again).
        let unsent = match self.tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(tx) => tx.send(cmd).err().map(|e| e.0),
            None => Some(cmd),
        };
        match unsent {
            None => self.waker.unpark(),
            Some(cmd) => drop(cmd),
        }
    }
}

/// An id the driver hands to a caller (a new connection or endpoint): dropped unread
/// (the caller was cancelled after the driver answered), it sends the command that
/// undoes it, so nothing is left behind without an owner.
pub(crate) struct Lease<C> {
    id: u64,
    /// None once kept (or when the driver was stopping).
    handle: Option<Handle<C>>,
    undo: fn(u64) -> C,
}

impl<C> Lease<C> {
    pub(crate) fn new(id: u64, handle: Option<Handle<C>>, undo: fn(u64) -> C) -> Self {
        Lease { id, handle, undo }
    }

    /// The caller has it: nothing to undo.
    pub(crate) fn keep(mut self) -> u64 {
        self.handle = None;
        self.id
    }
}

impl<C> Drop for Lease<C> {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.send((self.undo)(self.id));
        }
    }
}

pub(crate) struct Driver<W: Work> {
    backend: BackendKind,
    shared: Arc<Shared<W>>,
    tx: Arc<Mutex<Option<mpsc::Sender<W::Cmd>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The driver thread, to unpark after sending it a command.
    waker: Thread,
}

impl<W: Work> Driver<W> {
    /// Starts the thread; `make` builds the library state on it (the thread that
    /// initialises a library is its main user) and its error is returned here.
    pub(crate) fn spawn<F>(backend: BackendKind, make: F, hub: Arc<NotifyHub>, hot: Duration) -> Result<Self>
    where
        F: FnOnce() -> Result<W> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<W::Cmd>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<()>>(1);
        let thread_hub = hub.clone();
        let shared = Arc::new(Shared {
            locked: Mutex::new(None),
            inline: AtomicUsize::new(0),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kv-{backend}"))
            .spawn(move || {
                let (hub, shared) = (thread_hub, thread_shared);
                match make() {
                    Ok(work) => {
                        *shared.lock() = Some(Locked { work, rx });
                        let _ = ready_tx.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                run(&shared, &hub, hot);
                if let Some(mut l) = shared.lock().take() {
                    l.work.finish();
                }
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
                    shared,
                    tx: Arc::new(Mutex::new(Some(tx))),
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

    /// A sender of commands that outlives a borrow of the driver (for values that
    /// undo themselves when dropped unread); None once the driver is stopping.
    pub(crate) fn handle(&self) -> Option<Handle<W::Cmd>> {
        self.tx.lock().unwrap().is_some().then(|| Handle {
            tx: self.tx.clone(),
            waker: self.waker.clone(),
        })
    }

    pub(crate) fn send(&self, cmd: W::Cmd) -> Result<()> {
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
    /// the answer, blocking the calling thread (registration and deregistration only:
    /// start-up, shutdown and `Drop`).
    pub(crate) fn call<R: Send + 'static>(&self, deadline: Duration, make: impl FnOnce(mpsc::SyncSender<R>) -> W::Cmd) -> Result<R> {
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
    /// blocking the runtime (connect, prepare: on the request path).
    pub(crate) async fn call_async<R: Send + 'static>(
        &self,
        deadline: Duration,
        make: impl FnOnce(tokio::sync::oneshot::Sender<R>) -> W::Cmd,
    ) -> Result<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(make(tx))?;
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(TransferError::Closed),
            Err(_) => Err(TransferError::Timeout {
                what: "data-plane driver call",
                after: deadline,
            }),
        }
    }

    /// [`Driver::call_async`] for a command that creates something (a connection, an
    /// endpoint) and answers its id as a [`Lease`]: `make` gets the handle the lease
    /// undoes through, so a caller cancelled after the answer leaves nothing behind.
    pub(crate) async fn call_leased(
        &self,
        deadline: Duration,
        make: impl FnOnce(Option<Handle<W::Cmd>>, tokio::sync::oneshot::Sender<Result<Lease<W::Cmd>>>) -> W::Cmd,
    ) -> Result<u64> {
        let undo = self.handle();
        let lease = self.call_async(deadline, |reply| make(undo, reply)).await??;
        Ok(lease.keep())
    }

    /// Runs a command that answers through a oneshot (a write: the driver enforces its
    /// deadline) and awaits the answer without blocking the runtime, the way `wait` says.
    pub(crate) async fn ask<R: Send + 'static>(
        &self,
        wait: Wait,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<R>>) -> W::Cmd,
    ) -> Result<R> {
        use tokio::sync::oneshot::error::TryRecvError;
        if wait == Wait::Inline {
            return self.ask_inline(make).await;
        }
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        self.send(make(tx))?;
        if wait == Wait::Poll {
            // Polled, not slept on: the wake-up of a parked runtime thread would cost more.
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

    /// Runs a write's command on the caller's thread (see the module comment): what is
    /// queued first, then the command, then progress until the answer is there or
    /// [`ANSWER_SPIN`] has passed; after that the driver thread completes it. Only for
    /// host memory (GPU pointers need the device's context, bound on the driver thread)
    /// and writes up to [`INLINE_WRITE`].
    async fn ask_inline<R: Send + 'static>(&self, make: impl FnOnce(tokio::sync::oneshot::Sender<Result<R>>) -> W::Cmd) -> Result<R> {
        use tokio::sync::oneshot::error::TryRecvError;
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let answer = {
            let _inline = InlineGuard::enter(&self.shared.inline);
            let mut guard = self.shared.lock();
            // Commands sent before this write (a deregistration, a release) go first.
            match guard.as_mut().and_then(|l| l.drain().map(|_| l)) {
                Some(l) => {
                    l.work.command(make(tx));
                    let until = Instant::now() + ANSWER_SPIN;
                    loop {
                        match rx.try_recv() {
                            Ok(r) => break Some(r),
                            Err(TryRecvError::Closed) => break Some(Err(TransferError::Closed)),
                            Err(TryRecvError::Empty) if Instant::now() < until => {
                                l.work.progress();
                            }
                            Err(TryRecvError::Empty) => break None,
                        }
                    }
                }
                None => Some(Err(TransferError::Closed)),
            }
        };
        match answer {
            Some(r) => r,
            None => {
                // Still in flight: the driver thread progresses it from here.
                self.waker.unpark();
                rx.await.map_err(|_| TransferError::Closed)?
            }
        }
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

/// Counts a caller posting inline for as long as it lives, and no longer, even
/// if the post panics half-way: the driver thread keeps off the lock meanwhile.
struct InlineGuard<'a>(&'a AtomicUsize);

impl<'a> InlineGuard<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        InlineGuard(count)
    }
}

impl Drop for InlineGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn run<W: Work>(shared: &Shared<W>, hub: &NotifyHub, hot: Duration) {
    let mut spins = 0u32;
    let mut last_active = Instant::now();
    loop {
        if shared.inline.load(Ordering::Acquire) > 0 {
            // A caller holds (or is about to take) the lock for an inline write, and
            // unparks this thread if it hands the write over. Sleep meanwhile: spinning
            // here would take a core from the caller or the peer (2-core machines).
            std::thread::park_timeout(IDLE_POLL);
            continue;
        }
        {
            let mut guard = shared.lock();
            let Some(l) = guard.as_mut() else { return };
            match l.drain() {
                None => return,
                Some(true) => last_active = Instant::now(),
                Some(false) => {}
            }
            if l.work.progress() || hub.has_waiters() {
                last_active = Instant::now();
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_writes_up_to_the_limit_are_posted_inline() {
        assert_eq!(Wait::for_write(1, true), Wait::Inline);
        assert_eq!(Wait::for_write(INLINE_WRITE, true), Wait::Inline);
        assert_eq!(Wait::for_write(INLINE_WRITE + 1, true), Wait::Sleep);
        // GPU memory needs the device's context, which only the driver thread binds.
        assert_eq!(Wait::for_write(4096, false), Wait::Poll);
        assert_eq!(Wait::for_write(SMALL_WRITE, false), Wait::Poll);
        assert_eq!(Wait::for_write(SMALL_WRITE + 1, false), Wait::Sleep);
    }
}
