//! Write notifications seen at the target: the backends deliver tags, waiters await
//! them with a deadline. A tag that arrives before anyone waits is kept (bounded).
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::error::{Result, TransferError};

/// Early arrivals kept for later waiters; past this the oldest are forgotten.
const MAX_EARLY: usize = 1 << 16;

#[derive(Default)]
pub(crate) struct NotifyHub {
    state: Mutex<State>,
    waiting: AtomicUsize,
}

#[derive(Default)]
struct State {
    early: HashSet<u64>,
    early_order: VecDeque<u64>,
    waiters: HashMap<u64, oneshot::Sender<()>>,
}

impl NotifyHub {
    pub(crate) fn deliver(&self, tag: u64) {
        let mut st = self.state.lock().unwrap();
        if let Some(tx) = st.waiters.remove(&tag) {
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

    /// Whether some task waits right now: the polling backends poll hard while so.
    pub(crate) fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    pub(crate) async fn wait(&self, tag: u64, deadline: Duration) -> Result<()> {
        let rx = {
            let mut st = self.state.lock().unwrap();
            if st.early.remove(&tag) {
                st.early_order.retain(|t| *t != tag);
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            if st.waiters.insert(tag, tx).is_some() {
                // The earlier waiter's sender was dropped: it sees Closed.
                self.waiting.fetch_sub(1, Ordering::Relaxed);
            }
            self.waiting.fetch_add(1, Ordering::Relaxed);
            rx
        };
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(TransferError::Invalid(format!("another waiter took over notification tag {tag}"))),
            Err(_) => {
                let mut st = self.state.lock().unwrap();
                if st.waiters.remove(&tag).is_some() {
                    self.waiting.fetch_sub(1, Ordering::Relaxed);
                }
                Err(TransferError::Timeout {
                    what: "waiting for write notification",
                    after: deadline,
                })
            }
        }
    }
}
