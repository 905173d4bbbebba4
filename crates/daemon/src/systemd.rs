//! systemd integration for `Type=notify` units: READY=1 once the daemon can serve (model
//! loaded, KV pools registered, socket bound), STOPPING=1 when it starts draining, and
//! watchdog pings from the async runtime (a stuck runtime stops them). Outside systemd
//! (no `NOTIFY_SOCKET`) all of it does nothing.
use std::time::Duration;

use sd_notify::NotifyState;

/// Tells the service manager that start-up finished, and starts feeding its watchdog
/// when the unit has `WatchdogSec=`. Call from inside the tokio runtime.
pub fn ready(status: &str) {
    if let Err(e) = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let every = Duration::from_micros(usec / 2);
        tracing::info!(?every, "feeding the systemd watchdog");
        // For the process's life: not tracked (a drain would wait for it in vain).
        tokio::spawn(async move {
            loop {
                let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
                tokio::time::sleep(every).await;
            }
        });
    }
}

/// Tells the service manager that the daemon is draining.
pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}
