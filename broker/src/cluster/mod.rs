//! The boundary between this worker and the rest of the broker (other workers, other hosts).
//!
//! The engine tells the cluster what changes locally (routes, retained messages, client ids)
//! and hands it every message published here; the cluster's backend decides where those
//! go. [`Standalone`] is the one-worker backend: there is no one else, so it does nothing.
//! The embedded (Unix-socket mesh) and Redis backends implement the same trait, so the
//! engine does not change when they arrive.

use std::path::PathBuf;

use crate::engine::Message;

/// Who this worker is among its peers, given by the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerIdentity {
    /// 0..count; stable across restarts of this worker slot.
    pub index: u16,
    pub count: u16,
    /// Where the workers' Unix sockets live (one per worker: `w{index}.sock`).
    pub mesh_dir: PathBuf,
}

/// The worker that owns `client_id`: its sessions live there, and a connection accepted
/// elsewhere is handed to it. A fixed hash (FNV-1a), so every worker computes the same.
pub fn home_worker(client_id: &str, workers: u16) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in client_id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(workers.max(1))) as u16
}

pub trait Cluster {
    /// A local session subscribed to `filter` where none did before on this worker.
    fn route_added(&mut self, filter: &str);
    /// The last local subscription to `filter` went away.
    fn route_removed(&mut self, filter: &str);
    /// A message was published on this worker (after local delivery).
    fn forward(&mut self, msg: &Message);
    /// A client id connected here (the cluster ensures it is connected nowhere else).
    fn client_connected(&mut self, client_id: &str);
}

/// The backend of a broker with a single worker.
#[derive(Debug, Default)]
pub struct Standalone;

impl Cluster for Standalone {
    fn route_added(&mut self, _filter: &str) {}
    fn route_removed(&mut self, _filter: &str) {}
    fn forward(&mut self, _msg: &Message) {}
    fn client_connected(&mut self, _client_id: &str) {}
}

#[cfg(test)]
mod tests {
    use super::home_worker;

    #[test]
    fn home_worker_is_stable_and_spreads() {
        assert_eq!(home_worker("abc", 1), 0);
        assert_eq!(home_worker("client-1", 4), home_worker("client-1", 4));
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[home_worker(&format!("client-{i}"), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
