//! The Redis backend (`cluster.backend = "redis"`): the embedded mesh within this host,
//! Redis between hosts.
//!
//! Each worker is a node of the cluster, named `host.slot` in Redis (`redis.host_id`).
//! Within its host it reaches its peers through the mesh exactly as the embedded backend
//! does (the fast path: Unix sockets, no extra hop). For the other hosts it keeps, in
//! Redis (see [`keys`]):
//! - its **registration**: `P:nodes` and a liveness key refreshed every `heartbeat_ms`;
//!   a worker whose key expired is removed by a survivor ([`writer::heartbeat`]);
//! - its **routes**: a set per worker, plus every change on one change log (`P:log`, a
//!   stream) that every worker follows ([`follower`]), so a worker that reconnects
//!   resumes where it was, or reloads and applies only the difference;
//! - **retained messages**: a hash, changes on the same log; each worker's retained
//!   store is the local cache that follows them;
//! - **messages for other hosts**: written to the destination worker's inbox stream,
//!   many messages per entry and every destination in one pipeline ([`writer`]), read by
//!   its [`inbox`] reader. A QoS 1/2 publisher's acknowledgement waits until Redis has
//!   the message (`Cluster::unconfirmed_forwards`).
//!
//! Barriers span hosts: a barrier is also put on the change log, and every worker of
//! another host answers in the sender's inbox once it has applied the log up to it.
//! Streams rather than pub/sub carry messages between hosts: what is written stays until
//! its reader has it, so a reader that reconnects (or a Redis that restarts with its
//! append-only file) loses nothing, and on a Redis Cluster each inbox is one key, in one
//! shard, so a message goes to exactly one shard.

mod conn;
mod follower;
mod inbox;
mod keys;
mod state;
mod writer;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

pub use conn::check_reachable;
use state::{Change, PendingBarrier, Shared};

use super::wire::{self, Frame};
use super::{
    Backend, Cluster, ClusterEvent, ClusterInbox, HandedStream, HandoffError, Lifecycle,
    LocalFuture, Standalone, WorkerIdentity,
};
use crate::config::Config;
use crate::model::{
    Message, NodeId, Route, SessionImage, SharedTarget, StoreOp, StoreStats, WorkerStats,
};
use crate::protocol::QoS;

/// How long a draining worker waits for its inbox reader to stop, and then for what it
/// queued for other hosts to be written.
const STOP_DEADLINE: Duration = Duration::from_secs(3);
const FLUSH_DEADLINE: Duration = Duration::from_secs(10);

/// Starts the backend: the mesh (or nothing, for one worker) within the host, and the
/// Redis tasks. Must run inside the worker's `LocalSet`.
pub fn start(config: &Config, identity: Option<WorkerIdentity>) -> anyhow::Result<Backend> {
    let slot = identity.as_ref().map_or(0, |me| me.index);
    let local = match identity {
        Some(me) => super::mesh::start(me)?,
        None => Standalone::backend(),
    };
    let host = match config.redis.host_id {
        0 => keys::derived_host_id(config.listener.tcp.port()),
        id => id,
    };
    let outer = Rc::new(ClusterInbox::default());
    let me = NodeId { host, slot };
    let shared = Rc::new(RefCell::new(Shared::new(
        config.redis.clone(),
        me,
        outer.clone(),
    )));
    tracing::info!(node = %me, url = %config.redis.url, "redis backend");
    tokio::task::spawn_local(pump(local.inbox, shared.clone()));
    tokio::task::spawn_local(writer::run(shared.clone()));
    tokio::task::spawn_local(writer::heartbeat(shared.clone()));
    tokio::task::spawn_local(follower::run(shared.clone()));
    tokio::task::spawn_local(inbox::run(shared.clone()));
    Ok(Backend {
        cluster: Box::new(RedisCluster {
            local: local.cluster,
            shared: shared.clone(),
        }),
        inbox: outer,
        lifecycle: Box::new(RedisLifecycle {
            local: local.lifecycle,
            shared,
        }),
    })
}

/// Moves the mesh's events to the worker's inbox, in order; the mesh's barrier
/// completions become part of this backend's barriers.
async fn pump(mesh: Rc<ClusterInbox>, shared: Rc<RefCell<Shared>>) {
    let outer = shared.borrow().outer.clone();
    let mut events = Vec::new();
    loop {
        std::future::poll_fn(|cx| mesh.poll_ready(cx)).await;
        mesh.take(&mut events);
        for event in events.drain(..) {
            match event {
                ClusterEvent::BarrierDone(id) => shared.borrow_mut().mesh_barrier_done(id),
                other => outer.push(other),
            }
        }
    }
}

/// The engine's handle: the mesh for this host's workers, Redis for the others.
pub struct RedisCluster {
    local: Box<dyn Cluster>,
    shared: Rc<RefCell<Shared>>,
}

impl Cluster for RedisCluster {
    fn local_node(&self) -> NodeId {
        self.local.local_node()
    }
    fn local_workers(&self) -> u16 {
        self.local.local_workers()
    }
    fn is_alone(&self) -> bool {
        self.local.is_alone()
    }
    fn home_of(&self, client_id: &str) -> NodeId {
        self.local.home_of(client_id)
    }
    fn sys_publisher(&self) -> NodeId {
        self.local.sys_publisher()
    }

    fn route_added(&mut self, route: &Route) {
        self.local.route_added(route);
        let mut s = self.shared.borrow_mut();
        s.my_routes.insert(route.clone());
        s.change(Change::RouteAdd(route.clone()));
    }

    fn route_removed(&mut self, route: &Route) {
        self.local.route_removed(route);
        let mut s = self.shared.borrow_mut();
        s.my_routes.remove(route);
        s.change(Change::RouteRemove(route.clone()));
    }

    /// Another host's worker: queued for the writer, which sends it with everything else
    /// queued in one pipeline. Kept while Redis is down (QoS 0 only dropped past
    /// `MAX_QUEUED`); behind (publishers pause) past `BEHIND` queued, or when the
    /// destination has not read its inbox.
    fn forward(&mut self, to: NodeId, msg: &Message, plain: bool, shared: &[SharedTarget]) -> bool {
        if to.host == NodeId::LOCAL_HOST {
            return self.local.forward(to, msg, plain, shared);
        }
        if is_host_local(msg) {
            return false;
        }
        let mut s = self.shared.borrow_mut();
        let outbox = s.outboxes.entry(to).or_default();
        let queued = outbox.buf.len();
        if queued > state::MAX_QUEUED && msg.qos == QoS::AtMostOnce {
            s.dropped += 1;
            return true;
        }
        wire::encode_publish(&mut outbox.buf, plain, shared, msg, Instant::now());
        if writer::is_behind(queued, outbox.inbox_backlog) {
            outbox.behind = true;
        }
        let behind = outbox.behind;
        s.stats.messages_out += 1;
        s.forwarded_unconfirmed = true;
        s.wake_writer.notify_one();
        behind
    }

    fn unconfirmed_forwards(&mut self) -> Option<u64> {
        let mut s = self.shared.borrow_mut();
        if !s.forwarded_unconfirmed {
            // Nothing new: an earlier confirmation may still be due, but this message did
            // not go through Redis.
            return None;
        }
        s.forwarded_unconfirmed = false;
        s.confirmations_issued += 1;
        Some(s.confirmations_issued)
    }

    /// Every CONNECT (clean or not: a client id is unique across hosts) claims its id in
    /// Redis, in the writer's next pipeline.
    fn claim(&mut self, client_id: &str, want_session: bool) -> Option<u64> {
        let mut s = self.shared.borrow_mut();
        s.claims_issued += 1;
        let ticket = s.claims_issued;
        s.change(Change::Claim {
            ticket,
            client_id: client_id.to_string(),
            want_session,
        });
        Some(ticket)
    }

    fn stores_sessions(&self) -> bool {
        true
    }

    /// Queued for the writer's next pipeline (one script call per session); a stored
    /// message holds its publisher's acknowledgement until Redis has it.
    fn store_session(&mut self, client_id: &str, epoch: u64, op: StoreOp) {
        let mut s = self.shared.borrow_mut();
        s.forwarded_unconfirmed |= matches!(op, StoreOp::Message(_));
        s.change(Change::Store {
            client_id: client_id.to_string(),
            epoch,
            op: Box::new(op),
        });
    }

    /// Through the new owner's inbox, in frames of bounded size, then `HandoverEnd`
    /// (its inbox reader puts the parts together).
    fn send_session(&mut self, to: NodeId, client_id: &str, image: Option<SessionImage>) {
        let mut s = self.shared.borrow_mut();
        let outbox = s.outboxes.entry(to).or_default();
        let now = Instant::now();
        match image {
            Some(image) => {
                for frame in super::mesh::session_frames(image) {
                    wire::encode(&mut outbox.buf, &frame, now);
                }
                wire::encode(&mut outbox.buf, &Frame::HandoverEnd, now);
            }
            None => wire::encode(&mut outbox.buf, &Frame::NoSession(client_id.into()), now),
        }
        s.wake_writer.notify_one();
    }

    fn hold_peer(&mut self, peer: NodeId, hold: bool) {
        if peer.host == NodeId::LOCAL_HOST {
            return self.local.hold_peer(peer, hold);
        }
        let mut s = self.shared.borrow_mut();
        if hold {
            s.held.insert(peer);
        } else {
            s.held.remove(&peer);
            if s.held.is_empty() {
                s.hold_released.notify_waiters();
            }
        }
    }

    fn retained(&mut self, msg: &Message) {
        self.local.retained(msg);
        if is_host_local(msg) {
            return;
        }
        let mut frame = BytesMut::new();
        wire::encode(&mut frame, &Frame::Retained(msg.clone()), Instant::now());
        self.shared.borrow_mut().change(Change::Retained {
            topic: msg.topic.clone(),
            frame: frame.freeze(),
            clear: msg.payload.is_empty(),
        });
    }

    fn barrier(&mut self) -> Option<u64> {
        let mesh = self.local.barrier();
        let mut s = self.shared.borrow_mut();
        let remote: Vec<NodeId> = s.members.iter().copied().collect();
        if mesh.is_none() && remote.is_empty() {
            return None;
        }
        s.next_barrier += 1;
        let id = s.next_barrier;
        if !remote.is_empty() {
            s.change(Change::Barrier(id));
        }
        s.barriers.push_back(PendingBarrier { id, mesh, remote });
        Some(id)
    }

    fn barrier_reached(&mut self, from: NodeId, id: u64) {
        if from.host == NodeId::LOCAL_HOST {
            return self.local.barrier_reached(from, id);
        }
        let mut s = self.shared.borrow_mut();
        let outbox = s.outboxes.entry(from).or_default();
        wire::encode(&mut outbox.buf, &Frame::BarrierAck(id), Instant::now());
        s.wake_writer.notify_one();
    }

    fn barrier_abandoned(&mut self, id: u64) {
        let mut s = self.shared.borrow_mut();
        let mut mesh = None;
        while s.barriers.front().is_some_and(|b| b.id <= id) {
            if let Some(b) = s.barriers.pop_front() {
                mesh = mesh.max(b.mesh);
            }
        }
        drop(s);
        if let Some(m) = mesh {
            self.local.barrier_abandoned(m);
        }
    }

    fn sync_peer(&mut self, peer: NodeId, routes: &[Route], retained: &[Rc<Message>]) {
        self.local.sync_peer(peer, routes, retained);
    }

    fn handoff(&mut self, to: NodeId, stream: HandedStream) -> Result<(), HandoffError> {
        self.local.handoff(to, stream)
    }

    /// Also where this worker's route set in Redis is replaced by what it has now (a
    /// predecessor's routes that no session here re-announced go), and from when it reads
    /// its inbox.
    fn settled(&mut self) {
        self.local.settled();
        let mut s = self.shared.borrow_mut();
        s.change(Change::SyncRoutes);
        s.serving = true;
        s.serving_notify.notify_waiters();
    }

    fn report_stats(&mut self, stats: &WorkerStats) {
        self.local.report_stats(stats);
    }
    fn connections_changed(&mut self, admitted: usize) {
        self.local.connections_changed(admitted);
    }
    fn broker_connections(&self) -> Option<usize> {
        self.local.broker_connections()
    }
    fn dropped_forwards(&self) -> u64 {
        self.local.dropped_forwards() + self.shared.borrow().dropped
    }
    fn store_stats(&self) -> Option<StoreStats> {
        let s = self.shared.borrow();
        let mut stats = s.stats.clone();
        stats.queued_bytes = s.queued_bytes() as u64;
        Some(stats)
    }
}

struct RedisLifecycle {
    local: Box<dyn Lifecycle>,
    shared: Rc<RefCell<Shared>>,
}

impl Lifecycle for RedisLifecycle {
    /// The mesh's peers, then this worker registered and the other hosts' state loaded
    /// once (or
    /// `redis.connect_timeout_secs` passed: then the worker serves this host, and learns
    /// the others' routes when Redis answers).
    fn ready(&self) -> LocalFuture<'_, ()> {
        Box::pin(async move {
            self.local.ready().await;
            let (notify, wait) = {
                let s = self.shared.borrow();
                (
                    s.synced_notify.clone(),
                    Duration::from_secs(s.cfg.connect_timeout_secs),
                )
            };
            let synced = tokio::time::timeout(wait, async {
                loop {
                    let notified = notify.notified();
                    let ready = {
                        let s = self.shared.borrow();
                        s.synced && s.registered
                    };
                    if ready {
                        return;
                    }
                    notified.await;
                }
            })
            .await;
            if synced.is_err() {
                tracing::warn!("other hosts' routes not loaded from redis yet: serving anyway");
            }
        })
    }

    fn has_predecessor(&self) -> bool {
        self.local.has_predecessor()
    }

    fn take_over(&self) -> LocalFuture<'_, ()> {
        self.local.take_over()
    }

    /// Stops reading the inbox (what is left is the successor's), hands the sessions on
    /// through the mesh, then writes out what is queued for Redis: messages acknowledged
    /// to their publishers among it.
    fn hand_over_sessions<'a>(
        &'a self,
        export: Box<dyn FnOnce() -> Vec<SessionImage> + 'a>,
    ) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            {
                let mut s = self.shared.borrow_mut();
                s.inbox_stop = true;
                s.serving_notify.notify_waiters();
            }
            let reading = || {
                let s = self.shared.borrow();
                s.serving && !s.inbox_stopped
            };
            wait_until(STOP_DEADLINE, reading).await;
            self.local
                .hand_over_sessions(Box::new(move || {
                    let sessions = export();
                    // The successor announces what it routes from now on.
                    self.shared.borrow_mut().retiring = true;
                    sessions
                }))
                .await;
            let busy = || {
                let s = self.shared.borrow();
                s.in_flight || !s.changes.is_empty() || s.queued_bytes() > 0
            };
            if !wait_until(FLUSH_DEADLINE, busy).await {
                tracing::warn!("exiting with messages for other hosts not written to redis");
            }
        })
    }
}

/// `$SYS` topics describe the host that publishes them: they stay on it (each host's
/// `$SYS` tree is its own, as each broker's is).
fn is_host_local(msg: &Message) -> bool {
    msg.topic.starts_with(b"$SYS")
}

/// Waits while `busy` holds, at most `deadline`; whether it stopped holding.
async fn wait_until(deadline: Duration, busy: impl Fn() -> bool) -> bool {
    let until = tokio::time::Instant::now() + deadline;
    while busy() {
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}
