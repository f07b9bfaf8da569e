//! The boundary between this worker and the rest of the broker (other workers, other hosts).
//!
//! The engine keeps the route table (which workers subscribe to what) and decides where a
//! message goes; the cluster backend carries what crosses workers: route changes, forwarded
//! messages, retained messages, connections handed to the worker that owns their client id,
//! and `$SYS` counters. [`Standalone`] is the one-worker backend; [`mesh`] the embedded one
//! (a Unix-socket mesh between the worker processes of one host). A Redis backend implements
//! the same trait, so the engine does not change when it arrives.

mod census;
mod fdpass;
pub mod mesh;
mod wire;

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use bytes::Bytes;

use crate::engine::Message;
use crate::router::Route;

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
/// elsewhere is handed to it. A fixed hash (FNV-1a, then mixed), so every worker computes
/// the same.
pub fn home_worker(client_id: &str, workers: u16) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in client_id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV-1a's low bits depend on few input bits (the lowest is the parity of the bytes'
    // low bits), so mix before taking the remainder (murmur3's 64-bit finalizer).
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    (hash % u64::from(workers.max(1))) as u16
}

/// What the engine tells the rest of the cluster. Calls never block: a backend queues
/// what it must send and reports what comes back through the engine's inbound methods
/// (`remote_route`, `deliver_forwarded`, `barrier_done`, `adopt_socket`, ...).
pub trait Cluster {
    /// The first local subscription to `route` appeared on this worker.
    fn route_added(&mut self, route: &Route);
    /// The last local subscription to `route` went away.
    fn route_removed(&mut self, route: &Route);
    /// Sends `msg` to worker `to`: for its plain subscriptions if `plain`, and to one member
    /// of each listed shared group.
    fn forward(&mut self, to: u16, msg: &Message, plain: bool, shared: &[(Box<str>, Box<str>)]);
    /// A retained message was set (or cleared, empty payload) on this worker.
    fn retained(&mut self, msg: &Message);
    /// Asks every peer to confirm it has applied everything sent so far. `None` when there
    /// is nothing to wait for; otherwise the engine hears `barrier_done(id)` later.
    fn barrier(&mut self) -> Option<u64>;
    /// Hands a client connection to worker `to` (its client id lives there): the socket and
    /// the bytes already read from it. Gives the socket back if `to` cannot be reached.
    fn handoff(&mut self, to: u16, socket: OwnedFd, bytes: Bytes) -> Result<(), OwnedFd>;
    /// This worker's counters, for the cluster-wide `$SYS` topics.
    fn report_stats(&mut self, stats: &WorkerStats);
    /// The number of connections this worker admitted changed (for the broker-wide limit).
    fn connections_changed(&mut self, _admitted: usize) {}
    /// Connections admitted by the whole broker, where the backend can tell; `None` means
    /// this worker is the whole broker.
    fn broker_connections(&self) -> Option<usize> {
        None
    }
    /// Messages for other workers dropped because a peer's outbox was full or its link down.
    fn dropped_forwards(&self) -> u64 {
        0
    }
}

/// The counters one worker reports for `$SYS` (summed over workers by worker 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    pub clients_connected: u64,
    pub sessions: u64,
    pub subscriptions: u64,
    pub retained: u64,
    pub messages_received: u64,
    pub messages_sent: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Messages this worker sent on to other workers (one per destination worker).
    pub forwarded: u64,
    /// Times this worker's slot was restarted after its process died.
    pub restarts: u64,
}

/// The backend of a broker with a single worker: there is no one else.
#[derive(Debug, Default)]
pub struct Standalone;

impl Cluster for Standalone {
    fn route_added(&mut self, _route: &Route) {}
    fn route_removed(&mut self, _route: &Route) {}
    fn forward(
        &mut self,
        _to: u16,
        _msg: &Message,
        _plain: bool,
        _shared: &[(Box<str>, Box<str>)],
    ) {
    }
    fn retained(&mut self, _msg: &Message) {}
    fn barrier(&mut self) -> Option<u64> {
        None
    }
    fn handoff(&mut self, _to: u16, socket: OwnedFd, _bytes: Bytes) -> Result<(), OwnedFd> {
        Err(socket)
    }
    fn report_stats(&mut self, _stats: &WorkerStats) {}
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
        // Ids that differ in one character must not always land apart (FNV-1a's low bit).
        let apart = (0..1000)
            .filter(|i| home_worker(&format!("x-s{i}"), 2) != home_worker(&format!("x-p{i}"), 2))
            .count();
        assert!((300..700).contains(&apart), "{apart}");
    }
}
