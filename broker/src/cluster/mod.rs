//! The boundary between this worker and the rest of the broker (other workers, other hosts).
//!
//! The engine keeps the route table (which workers subscribe to what) and decides where a
//! message goes; a cluster backend carries what crosses workers: route changes, forwarded
//! and retained messages, barriers, connections handed to the worker that owns their
//! client id, sessions moving to a successor, and `$SYS` counters.
//!
//! The interface has two directions and neither side holds a reference into the other (as
//! quinn-proto's endpoint and connections exchange events rather than calls):
//! - out: the engine calls [`Cluster`]; calls never block and never call back;
//! - in: the backend pushes [`ClusterEvent`]s into the worker's [`ClusterInbox`], and the
//!   worker feeds them to `Engine::handle_cluster`.
//!
//! Around the engine's life, the worker asks the backend through [`Lifecycle`] (ready to
//! serve? where do drained sessions go?). [`build`] makes the backend the config names:
//! [`Standalone`] for a broker of one worker, [`mesh`] (`cluster.backend = "embedded"`,
//! Unix sockets between the workers of one host), [`redis`] (`cluster.backend = "redis"`:
//! the mesh within a host, Redis between hosts). [`loopback`] connects engines in one
//! process for tests. Workers are named by [`NodeId`] (host and slot), so a backend that
//! spans hosts fits the same interface.

mod barrier;
mod census;
mod events;
mod fdpass;
mod handoff;
pub mod loopback;
pub mod mesh;
pub mod redis;
mod wire;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;

pub use barrier::Barriers;
pub use events::{ClusterEvent, ClusterInbox};
pub use handoff::{HandedStream, HandoffError, StreamKind};

use crate::config::{ClusterBackend, Config};
use crate::model::{
    Message, NodeId, Route, SessionImage, SharedTarget, StoreOp, StoreStats, WorkerStats,
};

/// Who this worker is among the workers of its host, given by the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerIdentity {
    /// 0..count; stable across restarts of this worker slot.
    pub index: u16,
    pub count: u16,
    /// Where the workers' Unix sockets live (one per worker: `w{index}.sock`).
    pub mesh_dir: PathBuf,
}

/// The slot (of `workers`) that owns `client_id`: its sessions live there, and a
/// connection accepted elsewhere is handed to it. A fixed hash (FNV-1a, then mixed), so
/// every worker computes the same.
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

/// What the engine asks of the rest of the cluster. Calls never block and never call
/// back into the engine: a backend queues what it must send, and what comes back arrives
/// later as a [`ClusterEvent`].
pub trait Cluster {
    /// This worker's name in the cluster.
    fn local_node(&self) -> NodeId;
    /// Worker processes on this host (the kernel spreads new connections over them).
    fn local_workers(&self) -> u16;
    /// True when this worker is the whole broker: every client id lives here.
    fn is_alone(&self) -> bool;
    /// The worker that owns `client_id`, from the cluster's current membership; every
    /// worker computes the same.
    fn home_of(&self, client_id: &str) -> NodeId;
    /// The worker that sums every worker's counters and publishes `$SYS`.
    fn sys_publisher(&self) -> NodeId;

    /// The first local subscription to `route` appeared on this worker.
    fn route_added(&mut self, route: &Route);
    /// The last local subscription to `route` went away.
    fn route_removed(&mut self, route: &Route);
    /// Sends `msg` to worker `to`: for its plain subscriptions if `plain`, and to one member
    /// of each listed shared group. A QoS 1/2 message is never dropped (its publisher has
    /// been or is about to be acknowledged). True when `to` is behind (what is queued for
    /// it passed the backend's mark): the engine pauses the publisher until
    /// [`ClusterEvent::PeerCaughtUp`].
    fn forward(&mut self, to: NodeId, msg: &Message, plain: bool, shared: &[SharedTarget]) -> bool;
    /// Called before a QoS 1/2 message's acknowledgement goes out, after it was routed:
    /// `Some(id)` when something forwarded since the last call is not yet handed on as far
    /// as this backend promises (a backend writing to an outside store); the
    /// acknowledgement then waits for [`ClusterEvent::ForwardsConfirmed`] with `id` or
    /// later. Confirmations complete in order. `None` (the default): handed on in memory.
    fn unconfirmed_forwards(&mut self) -> Option<u64> {
        None
    }
    /// A CONNECT for `client_id` is about to be accepted here. `Some(ticket)` when the id
    /// must first be claimed across hosts: the CONNECT waits for
    /// [`ClusterEvent::Claimed`] (and, when that names a previous owner and
    /// `want_session`, for the session). `None` (the default): ids are unique within
    /// this backend's reach already (a client id's home worker).
    fn claim(&mut self, _client_id: &str, _want_session: bool) -> Option<u64> {
        None
    }
    /// Answers [`ClusterEvent::Released`]: the session of `client_id` for `to`, or `None`
    /// when there was none.
    fn send_session(&mut self, _to: NodeId, _client_id: &str, _image: Option<SessionImage>) {}
    /// True when this backend keeps persistent sessions in a store: the engine then tells
    /// it of every change to one ([`Cluster::store_session`]).
    fn stores_sessions(&self) -> bool {
        false
    }
    /// A change to persistent session `client_id`, which this worker owns since its claim
    /// `epoch` (a store refuses changes from an older owner). A stored message counts as
    /// forwarded: the acknowledgement of its PUBLISH waits for the store
    /// ([`Cluster::unconfirmed_forwards`]).
    fn store_session(&mut self, _client_id: &str, _epoch: u64, _op: StoreOp) {}
    /// Stops (`hold`) or resumes taking messages from `peer`: a destination here is behind,
    /// so the peer's queue for this worker grows and it pauses its own publishers.
    fn hold_peer(&mut self, _peer: NodeId, _hold: bool) {}
    /// A retained message was set (or cleared, empty payload) on this worker.
    fn retained(&mut self, msg: &Message);
    /// Asks every peer to confirm it has applied everything sent so far. `None` when there
    /// is nothing to wait for; otherwise [`ClusterEvent::BarrierDone`] follows.
    fn barrier(&mut self) -> Option<u64>;
    /// Answers [`ClusterEvent::BarrierRequested`]: everything `from` sent before its
    /// barrier `id` has been applied here.
    fn barrier_reached(&mut self, from: NodeId, id: u64);
    /// The engine stopped waiting for barrier `id` and every earlier one (they timed out):
    /// forget them, so a peer that never answers does not make them pile up.
    fn barrier_abandoned(&mut self, id: u64);
    /// Answers [`ClusterEvent::PeerJoined`]: this worker's routes and every retained
    /// message, for `peer`.
    fn sync_peer(&mut self, peer: NodeId, routes: &[Route], retained: &[Rc<Message>]);
    /// Hands a client connection to worker `to` (its client id lives there).
    fn handoff(&mut self, to: NodeId, stream: HandedStream) -> Result<(), HandoffError>;
    /// This worker has imported its predecessor's sessions (if it had one) and announced
    /// their routes: peers drop what the predecessor announced beyond that
    /// ([`ClusterEvent::PeerSettled`]).
    fn settled(&mut self) {}
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
    /// The link to an outside store, for a backend that has one (Redis).
    fn store_stats(&self) -> Option<StoreStats> {
        None
    }
}

/// A future on the worker's thread (backends are single-threaded like the engine).
pub type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// What the worker asks of a backend around the engine's life.
pub trait Lifecycle {
    /// Resolves once the engine may serve clients: the backend has what it needs from its
    /// peers (or gave up waiting). Events pushed before it resolves are in the inbox.
    fn ready(&self) -> LocalFuture<'_, ()>;
    /// True when this process replaces one that is still running (a rolling restart):
    /// its sessions will come ([`Lifecycle::take_over`]).
    fn has_predecessor(&self) -> bool {
        false
    }
    /// Resolves once the predecessor's sessions are all in the inbox (or it is gone, or
    /// gave up); at once without a predecessor. The worker serves nobody before.
    fn take_over(&self) -> LocalFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
    /// After a drain closed every connection: moves the persistent sessions on to where
    /// they will be served next. `export` takes them out of the engine; a backend with
    /// nowhere to send them does not call it. Resolves once what this worker queued for
    /// its peers has been sent too (messages it acknowledged to its publishers).
    fn hand_over_sessions<'a>(
        &'a self,
        export: Box<dyn FnOnce() -> Vec<SessionImage> + 'a>,
    ) -> LocalFuture<'a, ()>;
}

/// A backend, in the three parts the worker wires up: the [`Cluster`] the engine owns, the
/// inbox the worker drains into the engine, and the [`Lifecycle`] the worker keeps.
pub struct Backend {
    pub cluster: Box<dyn Cluster>,
    pub inbox: Rc<ClusterInbox>,
    pub lifecycle: Box<dyn Lifecycle>,
}

/// Builds the backend the config names. `identity` is `None` for a broker of one worker,
/// which needs none. Must run inside the worker's `LocalSet` (backends spawn their tasks).
pub fn build(config: &Config, identity: Option<WorkerIdentity>) -> anyhow::Result<Backend> {
    match (config.cluster.backend, identity) {
        (ClusterBackend::Embedded, None) => Ok(Standalone::backend()),
        (ClusterBackend::Embedded, Some(me)) => Ok(mesh::start(me)?),
        // Even one worker has other hosts to reach.
        (ClusterBackend::Redis, identity) => self::redis::start(config, identity),
    }
}

/// The backend of a broker with a single worker: there is no one else.
#[derive(Debug, Default)]
pub struct Standalone;

impl Standalone {
    pub fn backend() -> Backend {
        Backend {
            cluster: Box::new(Standalone),
            inbox: Rc::new(ClusterInbox::default()),
            lifecycle: Box::new(Standalone),
        }
    }
}

impl Cluster for Standalone {
    fn local_node(&self) -> NodeId {
        NodeId::local(0)
    }
    fn local_workers(&self) -> u16 {
        1
    }
    fn is_alone(&self) -> bool {
        true
    }
    fn home_of(&self, _client_id: &str) -> NodeId {
        NodeId::local(0)
    }
    fn sys_publisher(&self) -> NodeId {
        NodeId::local(0)
    }
    fn route_added(&mut self, _route: &Route) {}
    fn route_removed(&mut self, _route: &Route) {}
    fn forward(
        &mut self,
        _to: NodeId,
        _msg: &Message,
        _plain: bool,
        _shared: &[SharedTarget],
    ) -> bool {
        false
    }
    fn retained(&mut self, _msg: &Message) {}
    fn barrier(&mut self) -> Option<u64> {
        None
    }
    fn barrier_reached(&mut self, _from: NodeId, _id: u64) {}
    fn barrier_abandoned(&mut self, _id: u64) {}
    fn sync_peer(&mut self, _peer: NodeId, _routes: &[Route], _retained: &[Rc<Message>]) {}
    fn handoff(&mut self, _to: NodeId, stream: HandedStream) -> Result<(), HandoffError> {
        Err(HandoffError::Unreachable(stream))
    }
    fn report_stats(&mut self, _stats: &WorkerStats) {}
}

impl Lifecycle for Standalone {
    fn ready(&self) -> LocalFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
    /// Nowhere to send them: a broker of one worker keeps sessions in memory only.
    fn hand_over_sessions<'a>(
        &'a self,
        _export: Box<dyn FnOnce() -> Vec<SessionImage> + 'a>,
    ) -> LocalFuture<'a, ()> {
        Box::pin(std::future::ready(()))
    }
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
