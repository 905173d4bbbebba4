//! Write notifications seen at the target: the backends deliver tags, waiters await
//! them with a deadline. A tag that arrives before anyone waits is kept (bounded).
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::error::{Result, TransferError};

/// Early arrivals kept for later waiters; past this the oldest are forgotten.
const MAX_EARLY: usize = 1 << 16;

#[derive(Default)]
pub(crate) struct NotifyHub {
    state: Mutex<State>,
    waiting: AtomicUsize,
    /// The polling backend's driver thread: unparked when a waiter arrives, so the
    /// notification is looked for at once rather than at the next idle poll.
    waker: Mutex<Option<std::thread::Thread>>,
    next_waiter: AtomicU64,
}

#[derive(Default)]
struct State {
    early: HashSet<u64>,
    early_order: VecDeque<u64>,
    /// tag -> (waiter id, sender)
    waiters: HashMap<u64, (u64, oneshot::Sender<()>)>,
}

impl NotifyHub {
    pub(crate) fn deliver(&self, tag: u64) {
        let mut st = self.state.lock().unwrap();
        if let Some((_, tx)) = st.waiters.remove(&tag) {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(());
            return;
        }
        if st.early.insert(tag) {
            st.early_order.push_back(tag);
            if st.early_order.len() > MAX_EARLY
                && let Some(old) = st.early_order.pop_front()
            {
                st.early.remove(&old);
            }
        }
    }

    pub(crate) fn set_waker(&self, thread: std::thread::Thread) {
        *self.waker.lock().unwrap() = Some(thread);
    }

    /// Whether some task waits right now: the polling backends poll hard while so.
    pub(crate) fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Waits for `tag`. Dropping the future (a cancelled request) withdraws the waiter.
    pub(crate) async fn wait(&self, tag: u64, deadline: Duration) -> Result<()> {
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let rx = {
            let mut st = self.state.lock().unwrap();
            if st.early.remove(&tag) {
                st.early_order.retain(|t| *t != tag);
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            if st.waiters.insert(tag, (id, tx)).is_some() {
                // The earlier waiter's sender was dropped: it sees Closed.
                self.waiting.fetch_sub(1, Ordering::Relaxed);
            }
            self.waiting.fetch_add(1, Ordering::Relaxed);
            rx
        };
        if let Some(t) = self.waker.lock().unwrap().as_ref() {
            t.unpark();
        }
        let _withdraw = Withdraw { hub: self, tag, id };
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(TransferError::Invalid(format!("another waiter took over notification tag {tag}"))),
            Err(_) => Err(TransferError::Timeout {
                what: "waiting for write notification",
                after: deadline,
            }),
        }
    }
}

/// Removes a waiter that is still registered (timed out, or its future dropped); one that
/// was answered or replaced is already gone.
struct Withdraw<'a> {
    hub: &'a NotifyHub,
    tag: u64,
    id: u64,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        let mut st = self.hub.state.lock().unwrap();
        if st.waiters.get(&self.tag).is_some_and(|(id, _)| *id == self.id) {
            st.waiters.remove(&self.tag);
            self.hub.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_are_answered_and_withdrawn() {
        let hub = NotifyHub::default();
        // Early arrival: kept for the waiter that comes later.
        hub.deliver(1);
        hub.wait(1, Duration::from_millis(10)).await.unwrap();
        // A dropped wait (a cancelled request) leaves no waiter behind, so the polling
        // backends stop polling hard.
        {
            let w = hub.wait(2, Duration::from_secs(10));
            tokio::pin!(w);
            assert!(futures_poll_once(w.as_mut()).await.is_none());
            assert!(hub.has_waiters());
        }
        assert!(!hub.has_waiters());
        // A timed-out wait too, with the right error.
        let e = hub.wait(3, Duration::from_millis(5)).await.unwrap_err();
        assert!(matches!(e, TransferError::Timeout { .. }));
        assert!(!hub.has_waiters());
        // Delivery after registration answers the waiter.
        let (r, ()) = tokio::join!(hub.wait(4, Duration::from_secs(5)), async {
            tokio::task::yield_now().await;
            hub.deliver(4)
        });
        r.unwrap();
        assert!(!hub.has_waiters());
    }

    /// Polls a future once; `None` if it is still pending.
    async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
