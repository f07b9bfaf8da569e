//! What the Redis backend's tasks and the engine's handle share (one worker thread).

use std::collections::{HashSet, VecDeque};
use std::rc::Rc;

use ahash::{AHashMap, AHashSet};
use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

use super::keys::Keys;
use crate::cluster::{ClusterEvent, ClusterInbox};
use crate::config::RedisConfig;
use crate::model::{NodeId, Route, StoreOp, StoreStats};

/// Bytes queued for another host beyond which it is behind: publishers whose messages go
/// there pause until it is under `CAUGHT_UP` again (as for a mesh peer).
pub(super) const BEHIND: usize = 4 * 1024 * 1024;
pub(super) const CAUGHT_UP: usize = 1024 * 1024;
/// Batches (entries) unread in another worker's inbox beyond which it is behind too, so
/// a host that cannot keep up does not make Redis hold an unbounded backlog.
pub(super) const INBOX_BEHIND: u64 = 64;
pub(super) const INBOX_CAUGHT_UP: u64 = 16;
/// Queued for another host beyond this, QoS 0 forwards to it are dropped (counted); QoS
/// 1/2 never are (their publishers are paused, and their acknowledgements held).
pub(super) const MAX_QUEUED: usize = 64 * 1024 * 1024;

/// A change for the route table or the retained store, in the order the engine made it.
#[derive(Debug)]
pub(super) enum Change {
    RouteAdd(Route),
    RouteRemove(Route),
    /// Replace this worker's route set in Redis with what it has now (at start, after a
    /// takeover, after being reaped by mistake).
    SyncRoutes,
    /// A retained message set or cleared (`frame`: its encoded `Retained` frame).
    Retained {
        topic: Bytes,
        frame: Bytes,
        clear: bool,
    },
    /// This worker is new to the cluster (or was reaped while unreachable).
    Join,
    /// A change to a persistent session (see `writer::STORE`).
    Store {
        client_id: String,
        epoch: u64,
        /// Boxed: a session image is large, and most changes are not.
        op: Box<StoreOp>,
    },
    /// Claim a client id for this worker (see `writer::CLAIM`).
    Claim {
        ticket: u64,
        client_id: String,
        want_session: bool,
    },
    /// Announce a barrier on the change log.
    Barrier(u64),
}

/// Messages queued for one worker of another host.
#[derive(Default)]
pub(super) struct Outbox {
    pub buf: BytesMut,
    /// Reported behind to the engine; `PeerCaughtUp` is due.
    pub behind: bool,
    /// Its inbox in Redis holds more than `INBOX_BEHIND` unread batches.
    pub inbox_backlog: u64,
}

/// A barrier of this worker: done when the mesh's part is and every remote worker that
/// was a member when it started has confirmed it (or left).
pub(super) struct PendingBarrier {
    pub id: u64,
    pub mesh: Option<u64>,
    pub remote: Vec<NodeId>,
}

pub(super) struct Shared {
    pub cfg: RedisConfig,
    pub keys: Keys,
    /// This worker as other hosts name it.
    pub me: NodeId,
    pub me_name: String,
    /// The worker's inbox: events for the engine.
    pub outer: Rc<ClusterInbox>,

    // Written by the engine's calls, taken by the writer.
    pub changes: VecDeque<Change>,
    pub outboxes: AHashMap<NodeId, Outbox>,
    pub wake_writer: Rc<Notify>,
    /// Something was forwarded to another host since the last confirmation id was issued.
    pub forwarded_unconfirmed: bool,
    pub confirmations_issued: u64,
    pub confirmations_done: u64,
    /// This worker's routes (to replace its set in Redis wholesale).
    pub my_routes: HashSet<Route>,
    /// Draining for a successor: route changes are the successor's to make now.
    pub retiring: bool,
    pub dropped: u64,
    /// The writer waits for Redis to answer a pipeline.
    pub in_flight: bool,

    pub claims_issued: u64,
    pub next_barrier: u64,
    pub barriers: VecDeque<PendingBarrier>,

    /// Live workers of other hosts, as the change log says.
    pub members: AHashSet<NodeId>,
    /// The follower has loaded the cluster's state once, and the heartbeat has registered
    /// this worker once (so a host started after this one counts it in its barriers).
    pub synced: bool,
    pub registered: bool,
    pub synced_notify: Rc<Notify>,

    /// The inbox reader may run (this worker serves; its predecessor no longer reads).
    pub serving: bool,
    pub serving_notify: Rc<Notify>,
    /// The inbox reader must stop (draining), and has.
    pub inbox_stop: bool,
    pub inbox_stopped: bool,
    /// Remote workers the engine holds (a destination here is behind): the inbox is not
    /// read while any is.
    pub held: AHashSet<NodeId>,
    pub hold_released: Rc<Notify>,

    pub stats: StoreStats,
    /// Whether Redis was reported down in the log already (one line per outage).
    pub down_logged: bool,
}

impl Shared {
    pub fn new(cfg: RedisConfig, me: NodeId, outer: Rc<ClusterInbox>) -> Shared {
        Shared {
            keys: Keys::new(&cfg.prefix),
            cfg,
            me,
            me_name: super::keys::name(me),
            outer,
            changes: VecDeque::new(),
            outboxes: AHashMap::new(),
            wake_writer: Rc::new(Notify::new()),
            forwarded_unconfirmed: false,
            confirmations_issued: 0,
            confirmations_done: 0,
            my_routes: HashSet::new(),
            retiring: false,
            dropped: 0,
            in_flight: false,
            claims_issued: 0,
            next_barrier: 0,
            barriers: VecDeque::new(),
            members: AHashSet::new(),
            synced: false,
            registered: false,
            synced_notify: Rc::new(Notify::new()),
            serving: false,
            serving_notify: Rc::new(Notify::new()),
            inbox_stop: false,
            inbox_stopped: false,
            held: AHashSet::new(),
            hold_released: Rc::new(Notify::new()),
            stats: StoreStats::default(),
            down_logged: false,
        }
    }

    pub fn change(&mut self, change: Change) {
        if self.retiring
            && matches!(
                change,
                Change::RouteAdd(_) | Change::RouteRemove(_) | Change::SyncRoutes
            )
        {
            return;
        }
        self.changes.push_back(change);
        self.wake_writer.notify_one();
    }

    pub fn queued_bytes(&self) -> usize {
        self.outboxes.values().map(|o| o.buf.len()).sum()
    }

    /// Redis answered: log the recovery once.
    pub fn mark_up(&mut self) {
        if !self.stats.up {
            if self.down_logged {
                tracing::info!(url = %self.cfg.url, "redis reachable again");
                self.stats.reconnects += 1;
            }
            self.stats.up = true;
            self.down_logged = false;
        }
    }

    /// A command or connection failed: Redis is down (one log line per outage).
    pub fn mark_down(&mut self, what: &str, e: &redis::RedisError) {
        self.stats.up = false;
        if !self.down_logged {
            self.down_logged = true;
            tracing::error!(
                url = %self.cfg.url,
                "redis unreachable ({what}: {e}): delivery within this host goes on; \
                 messages for other hosts wait (their QoS 1/2 acknowledgements too)"
            );
        }
    }

    // Barriers.

    /// Completes what can be: barriers complete in order, so the oldest pending ones whose
    /// parts are all done are reported as one `BarrierDone` (the latest of them).
    pub fn complete_barriers(&mut self) {
        let mut done = None;
        while let Some(front) = self.barriers.front() {
            if front.mesh.is_some() || !front.remote.is_empty() {
                break;
            }
            done = Some(front.id);
            self.barriers.pop_front();
        }
        if let Some(id) = done {
            self.outer.push(ClusterEvent::BarrierDone(id));
        }
    }

    /// The mesh completed its barrier `mesh_id` (and every earlier one).
    pub fn mesh_barrier_done(&mut self, mesh_id: u64) {
        for b in self.barriers.iter_mut() {
            if b.mesh.is_some_and(|m| m <= mesh_id) {
                b.mesh = None;
            }
        }
        self.complete_barriers();
    }

    /// `from` has applied the change log up to this worker's barrier `id` (so every earlier
    /// barrier too).
    pub fn remote_barrier_done(&mut self, from: NodeId, id: u64) {
        for b in self.barriers.iter_mut().take_while(|b| b.id <= id) {
            b.remote.retain(|&n| n != from);
        }
        self.complete_barriers();
    }

    /// A remote worker left: it confirms nothing any more.
    pub fn member_left(&mut self, node: NodeId) {
        self.members.remove(&node);
        self.held.remove(&node);
        for b in self.barriers.iter_mut() {
            b.remote.retain(|&n| n != node);
        }
        self.complete_barriers();
        if self.held.is_empty() {
            self.hold_released.notify_waiters();
        }
    }

    /// Forwards written to Redis up to confirmation `upto`.
    pub fn confirmed(&mut self, upto: u64) {
        if upto > self.confirmations_done {
            self.confirmations_done = upto;
            self.outer.push(ClusterEvent::ForwardsConfirmed(upto));
        }
    }
}
