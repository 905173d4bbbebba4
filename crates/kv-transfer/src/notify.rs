//! Write notifications seen at the target: the backends deliver (sender, tag) pairs,
//! waiters await a tag, from one sender or from any, with a deadline. A notification
//! that arrives before anyone waits is kept per (tag, sender), bounded.
//!
//! Scoping by sender is what keeps one peer's write from answering a wait meant for
//! another's: a decode-server waits for its tag *from the prefill-server it asked*.
//! The sender is the backend's idea of the writing agent: the name a TCP connection
//! authenticated with, the NIXL notification's source agent, the name in the UCX
//! notification's header.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::error::{Result, TransferError};

/// Early arrivals kept for later waiters; past this the oldest are forgotten.
const MAX_EARLY: usize = 1 << 16;
/// Senders remembered for one tag. A tag is drawn at random for one write by one
/// peer, so more than one sender is already a misdirected write; the cap keeps a peer
/// that claims many names from making each delivery of a tag slower.
const MAX_SENDERS_PER_TAG: usize = 8;

#[derive(Default)]
pub(crate) struct NotifyHub {
    state: Mutex<State>,
    waiting: AtomicUsize,
    /// The polling backend's driver thread: unparked when a waiter arrives, so the
    /// notification is looked for at once rather than at the next idle poll.
    waker: Mutex<Option<std::thread::Thread>>,
    next_waiter: AtomicU64,
}

struct Waiter {
    id: u64,
    /// Only a delivery by this sender answers; None: any sender.
    from: Option<Box<str>>,
    tx: oneshot::Sender<()>,
}

#[derive(Default)]
struct State {
    /// Early arrivals: tag -> (sender, arrival number), one entry per sender.
    early: HashMap<u64, Vec<(Arc<str>, u64)>>,
    /// (arrival number, tag), oldest first, for eviction. An entry a waiter took stays
    /// here until eviction or compaction skips it (so taking one is O(1)).
    early_order: VecDeque<(u64, u64)>,
    /// Live early arrivals (the entries of `early`).
    early_len: usize,
    next_arrival: u64,
    /// tag -> its waiter
    waiters: HashMap<u64, Waiter>,
}

impl State {
    fn remember(&mut self, sender: &str, tag: u64) {
        let senders = self.early.entry(tag).or_default();
        if senders.iter().any(|(s, _)| &**s == sender) {
            return;
        }
        if senders.len() >= MAX_SENDERS_PER_TAG {
            tracing::debug!(tag, sender, "dropping a notification: too many senders of this tag");
            return;
        }
        let n = self.next_arrival;
        self.next_arrival += 1;
        senders.push((Arc::from(sender), n));
        self.early_order.push_back((n, tag));
        self.early_len += 1;
        while self.early_len > MAX_EARLY {
            self.evict_oldest();
        }
        if self.early_order.len() > 2 * MAX_EARLY {
            // Mostly entries that waiters took: drop them (amortised O(1) per arrival).
            let early = &self.early;
            self.early_order
                .retain(|(n, tag)| early.get(tag).is_some_and(|v| v.iter().any(|(_, m)| m == n)));
        }
    }

    fn evict_oldest(&mut self) {
        while let Some((n, tag)) = self.early_order.pop_front() {
            if let Some(senders) = self.early.get_mut(&tag)
                && let Some(i) = senders.iter().position(|(_, m)| *m == n)
            {
                senders.swap_remove(i);
                if senders.is_empty() {
                    self.early.remove(&tag);
                }
                self.early_len -= 1;
                return;
            }
        }
    }

    /// Takes an early arrival of `tag` from `from` (any sender when None).
    fn take_early(&mut self, from: Option<&str>, tag: u64) -> bool {
        let Some(senders) = self.early.get_mut(&tag) else {
            return false;
        };
        let Some(i) = senders.iter().position(|(s, _)| from.is_none_or(|f| &**s == f)) else {
            return false;
        };
        senders.swap_remove(i);
        if senders.is_empty() {
            self.early.remove(&tag);
        }
        self.early_len -= 1;
        true
    }
}

impl NotifyHub {
    /// A write with notification `tag` by the agent named `sender` has landed.
    pub(crate) fn deliver(&self, sender: &str, tag: u64) {
        let mut st = self.state.lock().unwrap();
        let answers = st.waiters.get(&tag).is_some_and(|w| w.from.as_deref().is_none_or(|f| f == sender));
        if answers && let Some(w) = st.waiters.remove(&tag) {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            let _ = w.tx.send(());
            return;
        }
        // No waiter, or one waiting for another sender: keep it for a later waiter of
        // this sender (a misdirected write answers nobody else).
        st.remember(sender, tag);
    }

    pub(crate) fn set_waker(&self, thread: std::thread::Thread) {
        *self.waker.lock().unwrap() = Some(thread);
    }

    /// Whether some task waits right now: the polling backends poll hard while so.
    pub(crate) fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Waits for `tag` delivered by `from` (by any sender when None). Dropping the
    /// future (a cancelled request) withdraws the waiter.
    pub(crate) async fn wait(&self, from: Option<&str>, tag: u64, deadline: Duration) -> Result<()> {
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let rx = {
            let mut st = self.state.lock().unwrap();
            if st.take_early(from, tag) {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            let w = Waiter {
                id,
                from: from.map(Into::into),
                tx,
            };
            if st.waiters.insert(tag, w).is_some() {
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
        if st.waiters.get(&self.tag).is_some_and(|w| w.id == self.id) {
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
        hub.deliver("a", 1);
        hub.wait(None, 1, Duration::from_millis(10)).await.unwrap();
        // A dropped wait (a cancelled request) leaves no waiter behind, so the polling
        // backends stop polling hard.
        {
            let w = hub.wait(None, 2, Duration::from_secs(10));
            tokio::pin!(w);
            assert!(futures_poll_once(w.as_mut()).await.is_none());
            assert!(hub.has_waiters());
        }
        assert!(!hub.has_waiters());
        // A timed-out wait too, with the right error.
        let e = hub.wait(None, 3, Duration::from_millis(5)).await.unwrap_err();
        assert!(matches!(e, TransferError::Timeout { .. }));
        assert!(!hub.has_waiters());
        // Delivery after registration answers the waiter.
        let (r, ()) = tokio::join!(hub.wait(None, 4, Duration::from_secs(5)), async {
            tokio::task::yield_now().await;
            hub.deliver("a", 4)
        });
        r.unwrap();
        assert!(!hub.has_waiters());
    }

    #[tokio::test]
    async fn scoped_waits_take_only_their_sender() {
        let hub = NotifyHub::default();
        let short = Duration::from_millis(20);
        // Early: B's delivery of tag 1 does not answer a wait for A's.
        hub.deliver("b", 1);
        assert!(matches!(hub.wait(Some("a"), 1, short).await, Err(TransferError::Timeout { .. })));
        // ... and is still kept for a wait for B's (or any sender's).
        hub.wait(Some("b"), 1, short).await.unwrap();
        hub.deliver("b", 1);
        hub.wait(None, 1, short).await.unwrap();
        // Late: a waiter for A is not answered by B, then is by A; B's stays early.
        let (r, ()) = tokio::join!(hub.wait(Some("a"), 2, Duration::from_secs(5)), async {
            tokio::task::yield_now().await;
            hub.deliver("b", 2);
            assert!(hub.has_waiters(), "B's delivery did not answer A's waiter");
            hub.deliver("a", 2);
        });
        r.unwrap();
        assert!(!hub.has_waiters());
        hub.wait(Some("b"), 2, short).await.unwrap();
        assert!(matches!(hub.wait(Some("a"), 2, short).await, Err(TransferError::Timeout { .. })));
    }

    #[tokio::test]
    async fn early_arrivals_are_bounded() {
        let hub = NotifyHub::default();
        hub.deliver("a", 0);
        for tag in 1..=MAX_EARLY as u64 {
            hub.deliver("flood", tag);
        }
        {
            let st = hub.state.lock().unwrap();
            assert_eq!(st.early_len, MAX_EARLY);
        }
        // The oldest (A's) was forgotten, the newest kept.
        let short = Duration::from_millis(5);
        assert!(hub.wait(Some("a"), 0, short).await.is_err());
        hub.wait(Some("flood"), MAX_EARLY as u64, short).await.unwrap();
        // Taken entries are compacted away from the order queue as arrivals go on.
        for tag in 0..3 * MAX_EARLY as u64 {
            hub.deliver("x", 1 << 40 | tag);
            hub.wait(Some("x"), 1 << 40 | tag, short).await.unwrap();
        }
        let st = hub.state.lock().unwrap();
        assert!(st.early_order.len() <= 2 * MAX_EARLY + 1);
        assert_eq!(st.early_len, MAX_EARLY - 1);
        // Senders per tag are capped.
        drop(st);
        for i in 0..2 * MAX_SENDERS_PER_TAG {
            hub.deliver(&format!("s{i}"), 7);
        }
        assert_eq!(hub.state.lock().unwrap().early.get(&7).map(Vec::len), Some(MAX_SENDERS_PER_TAG));
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
