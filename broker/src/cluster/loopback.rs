//! An in-memory cluster backend: the engines of one process, each with its own inbox,
//! exchanging events directly. For tests of what crosses workers (route replication,
//! barriers, shared groups, peer loss, session handover) without sockets, processes or
//! sleeps: the test owns the engines and decides when each inbox is drained, so every
//! interleaving it exercises is deterministic.
//!
//! Delivery is FIFO per destination, like the mesh's links. As in the mesh, membership is
//! every node that ever joined (the configured slots): a node that left still owns its
//! client ids, and connections handed to it wait for its successor. Nodes may live on
//! different hosts ([`NodeId::host`]); a handoff to another host is refused as
//! [`HandoffError::Elsewhere`], as a backend that does not pass sockets between hosts would.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use super::{
    Backend, Barriers, Cluster, ClusterEvent, ClusterInbox, HandedStream, HandoffError, Lifecycle,
    LocalFuture,
};
use crate::model::{Message, NodeId, Route, SessionImage, SharedTarget, WorkerStats};

struct Member {
    inbox: Rc<ClusterInbox>,
    barriers: Barriers,
    /// Sessions given to [`Lifecycle::hand_over_sessions`], for the test to move on.
    handed_over: Vec<SessionImage>,
}

/// The shared medium: every live member, by node id.
#[derive(Default)]
pub struct LoopbackNet {
    members: BTreeMap<NodeId, Member>,
    /// Every node that ever joined: what client ids are spread over.
    membership: BTreeSet<NodeId>,
    /// Connections handed to a member that is away, delivered when it joins again.
    pending_handoffs: Vec<(NodeId, HandedStream)>,
    /// Messages forwarded, counted for tests.
    pub forwarded: u64,
    /// By node: the number of its processes so far (the latest is the current one).
    incarnations: BTreeMap<NodeId, u64>,
    /// (holder, peer): `holder` takes no more messages from `peer` (a destination of its
    /// is behind). Recorded for tests; delivery here does not stop.
    pub held: BTreeSet<(NodeId, NodeId)>,
}

impl LoopbackNet {
    pub fn new() -> Rc<RefCell<LoopbackNet>> {
        Rc::new(RefCell::new(LoopbackNet::default()))
    }

    /// Adds `node` and returns its backend. Every member already present and the new one
    /// hear of each other ([`ClusterEvent::PeerJoined`]), as when mesh links come up.
    pub fn join(net: &Rc<RefCell<LoopbackNet>>, node: NodeId) -> Backend {
        let inbox = Rc::new(ClusterInbox::default());
        let mut n = net.borrow_mut();
        for (&other, member) in &n.members {
            member.inbox.push(ClusterEvent::PeerJoined(node));
            inbox.push(ClusterEvent::PeerJoined(other));
        }
        n.membership.insert(node);
        let incarnation = {
            let count = n.incarnations.entry(node).or_insert(0);
            *count += 1;
            *count
        };
        let (waiting, others) = std::mem::take(&mut n.pending_handoffs)
            .into_iter()
            .partition(|(to, _)| *to == node);
        n.pending_handoffs = others;
        for (_, stream) in waiting {
            inbox.push(ClusterEvent::Adopt(stream));
        }
        n.members.insert(
            node,
            Member {
                inbox: inbox.clone(),
                barriers: Barriers::default(),
                handed_over: Vec::new(),
            },
        );
        Backend {
            cluster: Box::new(LoopbackCluster {
                net: net.clone(),
                me: node,
                incarnation,
            }),
            inbox,
            lifecycle: Box::new(LoopbackLifecycle {
                net: net.clone(),
                me: node,
            }),
        }
    }

    /// A new process for `node` while the old one still runs (a rolling restart): its
    /// peers hear [`ClusterEvent::PeerReplaced`] (keeping its routes until it settles),
    /// then it joins. The old process's withdrawals are ignored from now on, as the mesh
    /// ignores a superseded process's.
    pub fn replace(net: &Rc<RefCell<LoopbackNet>>, node: NodeId) -> Backend {
        {
            let n = net.borrow();
            for (_, member) in n.peers_of(node) {
                member.inbox.push(ClusterEvent::PeerReplaced(node));
            }
        }
        LoopbackNet::join(net, node)
    }

    /// `node` is gone (its process died, or it was replaced): every other member hears
    /// [`ClusterEvent::PeerLeft`], and barriers waiting for it complete. What was queued
    /// for it is lost with it.
    pub fn leave(&mut self, node: NodeId) {
        self.members.remove(&node);
        for member in self.members.values_mut() {
            member.inbox.push(ClusterEvent::PeerLeft(node));
            for id in member.barriers.forget(node) {
                member.inbox.push(ClusterEvent::BarrierDone(id));
            }
        }
    }

    /// The inbox of `node` (to check what is waiting for it).
    pub fn inbox(&self, node: NodeId) -> Option<Rc<ClusterInbox>> {
        self.members.get(&node).map(|m| m.inbox.clone())
    }

    /// Sessions `node` exported when it drained.
    pub fn take_handed_over(&mut self, node: NodeId) -> Vec<SessionImage> {
        self.members
            .get_mut(&node)
            .map(|m| std::mem::take(&mut m.handed_over))
            .unwrap_or_default()
    }

    fn peers_of(&self, me: NodeId) -> impl Iterator<Item = (&NodeId, &Member)> {
        self.members.iter().filter(move |(&n, _)| n != me)
    }

    fn send(&self, to: NodeId, event: ClusterEvent) -> bool {
        match self.members.get(&to) {
            Some(member) => {
                member.inbox.push(event);
                true
            }
            None => false,
        }
    }

    /// Slots on `host`, for the home of a client id.
    fn slots_on(&self, host: u32) -> Vec<NodeId> {
        self.membership
            .iter()
            .copied()
            .filter(|n| n.host == host)
            .collect()
    }
}

pub struct LoopbackCluster {
    net: Rc<RefCell<LoopbackNet>>,
    me: NodeId,
    /// Which process of `me` this is (a replacement is a newer one).
    incarnation: u64,
}

impl LoopbackCluster {
    /// A newer process replaced this one (it is draining).
    fn superseded(&self) -> bool {
        self.net.borrow().incarnations.get(&self.me) != Some(&self.incarnation)
    }
}

impl Cluster for LoopbackCluster {
    fn local_node(&self) -> NodeId {
        self.me
    }

    fn local_workers(&self) -> u16 {
        self.net.borrow().slots_on(self.me.host).len() as u16
    }

    fn is_alone(&self) -> bool {
        self.net.borrow().membership.len() <= 1
    }

    /// Hosts own client ids by the same hash as slots do within a host: the host among
    /// the members' hosts, then the slot among that host's members.
    fn home_of(&self, client_id: &str) -> NodeId {
        let net = self.net.borrow();
        let mut hosts: Vec<u32> = net.membership.iter().map(|n| n.host).collect();
        hosts.dedup();
        let host = hosts[super::home_worker(client_id, hosts.len() as u16) as usize];
        let slots = net.slots_on(host);
        slots[super::home_worker(client_id, slots.len() as u16) as usize]
    }

    fn sys_publisher(&self) -> NodeId {
        *self.net.borrow().membership.first().unwrap_or(&self.me)
    }

    fn route_added(&mut self, route: &Route) {
        let net = self.net.borrow();
        for (_, m) in net.peers_of(self.me) {
            m.inbox.push(ClusterEvent::RouteAdded {
                from: self.me,
                route: route.clone(),
            });
        }
    }

    fn settled(&mut self) {
        let net = self.net.borrow();
        for (_, m) in net.peers_of(self.me) {
            m.inbox.push(ClusterEvent::PeerSettled(self.me));
        }
    }

    fn route_removed(&mut self, route: &Route) {
        if self.superseded() {
            return;
        }
        let net = self.net.borrow();
        for (_, m) in net.peers_of(self.me) {
            m.inbox.push(ClusterEvent::RouteRemoved {
                from: self.me,
                route: route.clone(),
            });
        }
    }

    /// Never behind: an inbox has no bound (tests decide when it is drained).
    fn forward(&mut self, to: NodeId, msg: &Message, plain: bool, shared: &[SharedTarget]) -> bool {
        let mut net = self.net.borrow_mut();
        let mut msg = msg.clone();
        // A session key means nothing on another worker (the mesh does not carry it).
        msg.origin = None;
        let event = ClusterEvent::Forwarded {
            from: self.me,
            msg,
            plain,
            shared: shared.to_vec(),
        };
        if net.send(to, event) {
            net.forwarded += 1;
        }
        false
    }

    fn hold_peer(&mut self, peer: NodeId, hold: bool) {
        let mut net = self.net.borrow_mut();
        if hold {
            net.held.insert((self.me, peer));
        } else {
            net.held.remove(&(self.me, peer));
        }
    }

    fn retained(&mut self, msg: &Message) {
        let net = self.net.borrow();
        for (_, m) in net.peers_of(self.me) {
            let mut msg = msg.clone();
            msg.origin = None;
            m.inbox.push(ClusterEvent::Retained(msg));
        }
    }

    fn barrier(&mut self) -> Option<u64> {
        let mut net = self.net.borrow_mut();
        let peers: Vec<NodeId> = net.peers_of(self.me).map(|(&n, _)| n).collect();
        let id = net
            .members
            .get_mut(&self.me)?
            .barriers
            .start(peers.clone())?;
        for peer in peers {
            net.send(peer, ClusterEvent::BarrierRequested { from: self.me, id });
        }
        Some(id)
    }

    fn barrier_reached(&mut self, from: NodeId, id: u64) {
        let mut net = self.net.borrow_mut();
        let Some(member) = net.members.get_mut(&from) else {
            return;
        };
        if member.barriers.confirmed(id, self.me) {
            member.inbox.push(ClusterEvent::BarrierDone(id));
        }
    }

    fn barrier_abandoned(&mut self, id: u64) {
        if let Some(member) = self.net.borrow_mut().members.get_mut(&self.me) {
            member.barriers.abandon(id);
        }
    }

    fn sync_peer(&mut self, peer: NodeId, routes: &[Route], retained: &[Rc<Message>]) {
        let net = self.net.borrow();
        for route in routes {
            let route = route.clone();
            net.send(
                peer,
                ClusterEvent::RouteAdded {
                    from: self.me,
                    route,
                },
            );
        }
        for msg in retained {
            let mut msg = (**msg).clone();
            msg.origin = None;
            net.send(peer, ClusterEvent::Retained(msg));
        }
    }

    fn handoff(&mut self, to: NodeId, stream: HandedStream) -> Result<(), HandoffError> {
        if to.host != self.me.host {
            return Err(HandoffError::Elsewhere {
                stream,
                server_reference: Some(format!("host-{}", to.host)),
            });
        }
        let mut net = self.net.borrow_mut();
        if let Some(member) = net.members.get(&to) {
            member.inbox.push(ClusterEvent::Adopt(stream));
            return Ok(());
        }
        if !net.membership.contains(&to) {
            return Err(HandoffError::Unreachable(stream));
        }
        // Away (restarting): the client waits for the successor, as over the mesh.
        net.pending_handoffs.push((to, stream));
        Ok(())
    }

    fn report_stats(&mut self, stats: &WorkerStats) {
        let publisher = self.sys_publisher();
        if publisher != self.me {
            let from = self.me;
            let stats = *stats;
            self.net
                .borrow()
                .send(publisher, ClusterEvent::PeerStats { from, stats });
        }
    }
}

struct LoopbackLifecycle {
    net: Rc<RefCell<LoopbackNet>>,
    me: NodeId,
}

impl Lifecycle for LoopbackLifecycle {
    fn ready(&self) -> LocalFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Keeps the sessions for the test ([`LoopbackNet::take_handed_over`]), which plays
    /// the successor.
    fn hand_over_sessions<'a>(
        &'a self,
        export: Box<dyn FnOnce() -> Vec<SessionImage> + 'a>,
    ) -> LocalFuture<'a, ()> {
        let images = export();
        if let Some(member) = self.net.borrow_mut().members.get_mut(&self.me) {
            member.handed_over.extend(images);
        }
        Box::pin(std::future::ready(()))
    }
}
