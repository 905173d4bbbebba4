//! Decode-servers' sessions. A Handshake hands out a session: 128 random bits, bound
//! to the decode-server's data-plane agent name and to this process's boot id. A
//! Prefill must name all three, so a session can be neither guessed, nor used by
//! another peer, nor carried over a restart. One session per peer (a new Handshake
//! replaces the old one, whose data-plane peer is disconnected), and at most `max`
//! (past that the least recently used goes).
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kv_transfer::PeerId;
use tonic::Status;

pub(crate) type SessionId = [u8; 16];

#[derive(Debug)]
pub(crate) struct Session {
    /// The decode-server's data-plane agent name.
    pub name: String,
    pub peer: PeerId,
    pub regions: Vec<u32>,
    pub num_blocks: usize,
    /// Milliseconds since the table was made, at the last use (for eviction).
    last_used: AtomicU64,
}

impl Session {
    pub fn new(name: String, peer: PeerId, regions: Vec<u32>, num_blocks: usize) -> Session {
        Session {
            name,
            peer,
            regions,
            num_blocks,
            last_used: AtomicU64::new(0),
        }
    }
}

pub(crate) struct Sessions {
    boot_id: [u8; 16],
    max: usize,
    epoch: Instant,
    map: Mutex<HashMap<SessionId, Arc<Session>>>,
}

impl Sessions {
    pub fn new(max: usize) -> Sessions {
        Sessions {
            boot_id: rand::random(),
            max,
            epoch: Instant::now(),
            map: Mutex::default(),
        }
    }

    pub fn boot_id(&self) -> &[u8; 16] {
        &self.boot_id
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Adds `s` under a fresh id; returns the id and the sessions it displaced (the
    /// same peer's earlier one, or the least recently used at the cap), whose
    /// data-plane peers the caller disconnects.
    pub fn insert(&self, s: Session) -> (SessionId, Vec<Arc<Session>>) {
        let id: SessionId = rand::random();
        s.last_used.store(self.now_ms(), Ordering::Relaxed);
        let mut map = self.map.lock().unwrap();
        let mut gone: Vec<Arc<Session>> = Vec::new();
        map.retain(|_, old| {
            let same = old.name == s.name;
            if same {
                gone.push(old.clone());
            }
            !same
        });
        while map.len() >= self.max {
            let Some(lru) = map.iter().min_by_key(|(_, v)| v.last_used.load(Ordering::Relaxed)).map(|(k, _)| *k) else {
                break;
            };
            gone.extend(map.remove(&lru));
        }
        map.insert(id, Arc::new(s));
        (id, gone)
    }

    /// The session a Prefill names, if it is one of ours, of this boot, and the caller's.
    pub fn get(&self, id: &[u8], boot_id: &[u8], peer_name: &str) -> Result<Arc<Session>, Status> {
        if boot_id != self.boot_id {
            return Err(Status::failed_precondition(
                "the session is from an earlier start of this prefill-server: handshake again",
            ));
        }
        let s = <SessionId>::try_from(id)
            .ok()
            .and_then(|id| self.map.lock().unwrap().get(&id).cloned())
            .ok_or_else(|| Status::failed_precondition("unknown session: handshake again"))?;
        if s.name != peer_name {
            return Err(Status::permission_denied("the session belongs to another decode-server"));
        }
        s.last_used.store(self.now_ms(), Ordering::Relaxed);
        Ok(s)
    }

    /// Ends `s` (if it is still here, not replaced): true if it was. Its data-plane
    /// peer is the caller's to disconnect.
    pub fn remove(&self, s: &Arc<Session>) -> bool {
        let mut map = self.map.lock().unwrap();
        let before = map.len();
        map.retain(|_, v| !Arc::ptr_eq(v, s));
        map.len() != before
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, n: u64) -> Session {
        Session::new(name.into(), PeerId::from_raw(n), vec![], 1)
    }

    #[test]
    fn sessions_are_bound_replaced_and_capped() {
        let t = Sessions::new(2);
        let boot = *t.boot_id();
        let (a1, gone) = t.insert(peer("a", 1));
        assert!(gone.is_empty());
        assert!(t.get(&a1, &boot, "a").is_ok());
        // Another peer's session, a wrong boot id, a guessed or short id.
        assert_eq!(t.get(&a1, &boot, "b").unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(t.get(&a1, &[0; 16], "a").unwrap_err().code(), tonic::Code::FailedPrecondition);
        assert_eq!(t.get(&[1; 16], &boot, "a").unwrap_err().code(), tonic::Code::FailedPrecondition);
        assert_eq!(t.get(&a1[..8], &boot, "a").unwrap_err().code(), tonic::Code::FailedPrecondition);
        // A re-handshake replaces the peer's session.
        let (a2, gone) = t.insert(peer("a", 2));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].peer, PeerId::from_raw(1));
        assert!(t.get(&a1, &boot, "a").is_err());
        assert!(t.get(&a2, &boot, "a").is_ok());
        // At the cap, the least recently used goes.
        let (b, _) = t.insert(peer("b", 3));
        std::thread::sleep(std::time::Duration::from_millis(3));
        assert!(t.get(&a2, &boot, "a").is_ok());
        let (_, gone) = t.insert(peer("c", 4));
        assert_eq!(gone.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["b"]);
        assert!(t.get(&b, &boot, "b").is_err());
        assert_eq!(t.len(), 2);
    }
}
