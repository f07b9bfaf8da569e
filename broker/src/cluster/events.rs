//! What the cluster tells the engine, and the queue it travels through.
//!
//! A backend never calls into the engine: it pushes [`ClusterEvent`]s into the worker's
//! [`ClusterInbox`], and the worker feeds them to `Engine::handle_cluster` in the order
//! they were pushed. So no backend holds a reference to the engine, and nothing a backend
//! does from inside a [`super::Cluster`] call can re-enter it.

use super::HandedStream;
use crate::model::{Message, NodeId, Route, SessionImage, SharedTarget, WorkerStats};
use crate::wake_queue::WakeQueue;

#[derive(Debug)]
pub enum ClusterEvent {
    /// A peer is reachable (first time, or again after a restart): it needs this worker's
    /// routes and the retained messages (answered with [`super::Cluster::sync_peer`]).
    PeerJoined(NodeId),
    /// A peer is gone (its process died): forget everything it announced.
    PeerLeft(NodeId),
    /// A new process took a peer's place (a rolling restart, or a restart after a crash).
    /// What the old one announced stays until the new one is [`ClusterEvent::PeerSettled`]:
    /// its sessions are on their way to it, and messages for them must keep coming.
    PeerReplaced(NodeId),
    /// The new process has imported its predecessor's sessions and re-announced their
    /// routes: the predecessor's routes it did not re-announce are gone.
    PeerSettled(NodeId),
    RouteAdded {
        from: NodeId,
        route: Route,
    },
    RouteRemoved {
        from: NodeId,
        route: Route,
    },
    /// A message published on another worker, for this worker's plain subscribers (if
    /// `plain`) and for one local member of each listed shared group.
    Forwarded {
        from: NodeId,
        msg: Message,
        plain: bool,
        shared: Vec<SharedTarget>,
    },
    /// The link to a peer that was behind ([`super::Cluster::forward`] returned true) has
    /// caught up: the publishers waiting for it may go on.
    PeerCaughtUp(NodeId),
    /// A retained message set (or cleared, empty payload) on another worker.
    Retained(Message),
    /// A peer asks to be told once everything it sent before this point has been applied
    /// (answered with [`super::Cluster::barrier_reached`]).
    BarrierRequested {
        from: NodeId,
        id: u64,
    },
    /// Every peer confirmed this worker's barrier `id` (and so every earlier one).
    BarrierDone(u64),
    /// What was forwarded up to confirmation `id` (see
    /// [`super::Cluster::unconfirmed_forwards`]) and before has been handed on.
    ForwardsConfirmed(u64),
    /// A connection another worker handed over (its client id lives here).
    Adopt(HandedStream),
    PeerStats {
        from: NodeId,
        stats: WorkerStats,
    },
    /// The client id of the CONNECT parked as `ticket` (see [`super::Cluster::claim`]) is
    /// this worker's now. `previous`: its owner on another host, which sends the session
    /// ([`ClusterEvent::SessionImported`] or [`ClusterEvent::SessionAbsent`]) when asked.
    /// `epoch` orders the claims of one client id (the latest owns it).
    /// `stored`: the session as a session store has it (asked for by a CONNECT that
    /// resumes its session), used unless this worker or the previous owner has it.
    Claimed {
        ticket: u64,
        epoch: u64,
        previous: Option<NodeId>,
        stored: Option<Box<SessionImage>>,
    },
    /// Worker `to` (on another host) claimed `client_id` at `epoch`: unless this worker
    /// claimed it later, close its connection here and, if `send_session`, answer with
    /// [`super::Cluster::send_session`].
    Released {
        client_id: String,
        to: NodeId,
        send_session: bool,
        epoch: u64,
    },
    /// A session of a dead worker that this worker now owns (claimed at `epoch`): its
    /// will and expiry run here.
    SessionAdopted {
        image: Box<SessionImage>,
        epoch: u64,
    },
    /// The previous owner of a claimed client id had no session for it.
    SessionAbsent(String),
    /// A persistent session handed over by this slot's previous process, or by the
    /// previous owner of a client id claimed here.
    SessionImported(Box<SessionImage>),
    /// More queued and inflight messages of the session imported last (a large session
    /// comes in several parts).
    SessionContinued(Box<SessionImage>),
}

/// The queue of events from a backend to the worker's engine. Single-threaded: the
/// backend's tasks and the engine share one worker thread.
pub type ClusterInbox = WakeQueue<ClusterEvent>;
