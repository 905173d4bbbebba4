//! The router's workers of one role: the static ones from the config, and those found
//! through discovery, which come and go. Each has a slot (its bit in the KV index, its
//! entry in per-worker tables) that is reused only once nothing holds its last owner:
//! a request still on a departed worker never counts against its successor.
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub(crate) struct Backend {
    pub(crate) url: String,
    /// The gRPC health service name checked.
    pub(crate) service: &'static str,
    pub(crate) channel: Channel,
    pub(crate) healthy: AtomicBool,
    pub(crate) outstanding: AtomicUsize,
    /// Prompt tokens a prefill-server still has to compute for requests we sent it
    /// (counted from routing until their first token): its load under `kv_aware`.
    pub(crate) pending: AtomicUsize,
    /// Its place in the KV index and per-worker tables.
    pub(crate) slot: usize,
    /// Found through discovery (static ones stay for the process's life).
    pub(crate) discovered: bool,
    /// Cancelled when it leaves the membership: its health checks and KV-event
    /// subscriber end.
    pub(crate) gone: CancellationToken,
}

pub(crate) struct Members {
    pub(crate) service: &'static str,
    slots: RwLock<Vec<Option<Arc<Backend>>>>,
    /// Departed workers still held by a request or a task: their slots are not reused.
    retired: Mutex<Vec<Weak<Backend>>>,
    capacity: usize,
}

impl Members {
    pub(crate) fn new(service: &'static str, capacity: usize) -> Members {
        Members {
            service,
            slots: RwLock::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
            capacity,
        }
    }

    /// How many slots there can be (the KV state's tables are this long).
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The workers now, by slot.
    pub(crate) fn live(&self) -> Vec<Arc<Backend>> {
        self.slots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    pub(crate) fn by_url(&self, url: &str) -> Option<Arc<Backend>> {
        self.slots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .flatten()
            .find(|b| b.url == url)
            .cloned()
    }

    /// Adds a worker at `url` in the first free slot; None when every slot is taken.
    pub(crate) fn add(&self, url: &str, channel: Channel, discovered: bool) -> Option<Arc<Backend>> {
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        retired.retain(|w| w.strong_count() > 0);
        let held = |i: usize| retired.iter().filter_map(Weak::upgrade).any(|b| b.slot == i);
        let slot = (0..self.capacity).find(|&i| slots.get(i).is_none_or(Option::is_none) && !held(i))?;
        let b = Arc::new(Backend {
            url: url.to_string(),
            service: self.service,
            channel,
            healthy: AtomicBool::new(false),
            outstanding: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            slot,
            discovered,
            gone: CancellationToken::new(),
        });
        if slots.len() <= slot {
            slots.resize(slot + 1, None);
        }
        slots[slot] = Some(b.clone());
        Some(b)
    }

    /// Removes the discovered workers not in `keep`; returns them (already cancelled).
    pub(crate) fn retain_discovered(&self, keep: &[String]) -> Vec<Arc<Backend>> {
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        retired.retain(|w| w.strong_count() > 0);
        let mut gone = Vec::new();
        for s in slots.iter_mut() {
            if let Some(b) = s.take_if(|b| b.discovered && !keep.contains(&b.url)) {
                b.gone.cancel();
                retired.push(Arc::downgrade(&b));
                gone.push(b);
            }
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slot_is_reused_only_once_nothing_holds_its_last_owner() {
        let m = Members::new("s", 2);
        let ch = || tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let a = m.add("http://a", ch(), true).unwrap();
        let b = m.add("http://b", ch(), true).unwrap();
        assert_eq!((a.slot, b.slot), (0, 1));
        assert!(m.add("http://c", ch(), true).is_none(), "full");
        let gone = m.retain_discovered(&["http://b".into()]);
        assert_eq!(gone.len(), 1);
        assert!(a.gone.is_cancelled());
        drop(gone);
        // `a` is still held (a request on it): its slot stays taken.
        assert!(m.add("http://c", ch(), true).is_none());
        drop(a);
        let c = m.add("http://c", ch(), true).unwrap();
        assert_eq!(c.slot, 0);
        assert_eq!(
            m.live().iter().map(|b| b.url.as_str()).collect::<Vec<_>>(),
            ["http://c", "http://b"]
        );
        let s = m.add("http://s", ch(), false);
        assert!(s.is_none());
        assert!(m.retain_discovered(&[]).len() == 2 && m.live().is_empty());
    }
}
