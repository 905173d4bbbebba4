//! Every task a daemon spawns beside its gRPC handlers goes through here, so that
//! shutdown can wait for them (bounded) instead of cutting them off mid-write: a
//! prefill's response task, a background handshake. (Quarantines are not tracked:
//! they only hold memory, which goes with the process.)
use std::sync::LazyLock;
use std::time::Duration;

use tokio_util::task::TaskTracker;

static TRACKER: LazyLock<TaskTracker> = LazyLock::new(TaskTracker::new);

/// Spawns `fut` on the current runtime, tracked.
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    TRACKER.spawn(fut)
}

/// Tasks spawned and not yet finished.
pub fn running() -> usize {
    TRACKER.len()
}

/// Waits until every tracked task has finished, or `limit` passed; returns how many
/// were still running then (they are left to the runtime's shutdown).
pub async fn drain(limit: Duration) -> usize {
    TRACKER.close();
    let _ = tokio::time::timeout(limit, TRACKER.wait()).await;
    TRACKER.reopen();
    TRACKER.len()
}
