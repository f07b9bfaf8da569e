//! The engine's side of the cluster: what other workers tell this one, as
//! [`ClusterEvent`]s the worker feeds to [`Engine::handle_cluster`] (routes, forwarded and
//! retained messages, barriers, handed-over connections, sessions, counters).

use std::rc::Rc;
use std::time::Instant;

use super::claims::Release;
use super::flow::{Behind, Source};
use super::Engine;
use crate::cluster::ClusterEvent;
use crate::model::{Message, NodeId, Route, SharedTarget};

impl Engine {
    /// Applies one event from the cluster backend. Events must be fed in the order the
    /// backend produced them (a barrier confirms everything before it).
    pub fn handle_cluster(&mut self, event: ClusterEvent, now: Instant) {
        match event {
            ClusterEvent::PeerJoined(peer) => {
                let routes: Vec<Route> = self.route_refs.keys().cloned().collect();
                let retained = self.retained.all();
                self.cluster.sync_peer(peer, &routes, &retained);
            }
            ClusterEvent::PeerLeft(peer) => {
                self.remove_peer(peer);
                self.owner_gone(peer, now);
            }
            ClusterEvent::PeerReplaced(peer) => self.peer_replaced(peer),
            ClusterEvent::PeerSettled(peer) => self.peer_settled(peer),
            ClusterEvent::RouteAdded { from, route } => self.remote_route(from, route, true),
            ClusterEvent::RouteRemoved { from, route } => self.remote_route(from, route, false),
            ClusterEvent::Forwarded {
                from,
                msg,
                plain,
                shared,
            } => {
                if self.takeover.is_some() {
                    // The sessions it may be for are still on their way from our predecessor.
                    self.hold_forwarded(from, msg, plain, shared);
                } else {
                    self.deliver_forwarded(from, msg, plain, &shared, now);
                }
            }
            ClusterEvent::PeerCaughtUp(peer) => self.caught_up(Behind::Peer(peer)),
            ClusterEvent::Retained(msg) => {
                self.retained.set(Rc::new(msg));
            }
            ClusterEvent::BarrierRequested { from, id } => self.cluster.barrier_reached(from, id),
            ClusterEvent::BarrierDone(id) => self.barrier_done(id, now),
            ClusterEvent::ForwardsConfirmed(id) => self.forwards_confirmed(id),
            ClusterEvent::Adopt(stream) => self.adopt(stream),
            ClusterEvent::PeerStats { from, stats } => {
                self.worker_stats.insert(from, stats);
            }
            ClusterEvent::SessionImported(image) => self.session_received(*image, now),
            ClusterEvent::Claimed {
                ticket,
                epoch,
                previous,
                stored,
            } => self.claimed(ticket, epoch, previous, stored, now),
            ClusterEvent::Released {
                client_id,
                to,
                send_session,
                epoch,
            } => self.released(
                &client_id,
                Release {
                    to,
                    send: send_session,
                    epoch,
                },
                now,
            ),
            ClusterEvent::SessionAbsent(client_id) => self.session_arrived(&client_id, now),
            ClusterEvent::SessionAdopted { image, epoch } => {
                self.session_adopted(*image, epoch, now)
            }
            ClusterEvent::SessionContinued(image) => self.continue_session(*image),
        }
    }

    /// A peer announced (`added`) or withdrew a route. Announcing a route twice (a peer
    /// re-syncing) changes nothing.
    fn remote_route(&mut self, from: NodeId, route: Route, added: bool) {
        if from == self.me {
            return;
        }
        if added {
            if let Some(stale) = self.stale_routes.get_mut(&from) {
                if stale.remove(&route) {
                    // Re-announced by the replacement: kept, and now its own.
                    self.remote_routes.entry(from).or_default().insert(route);
                    return;
                }
            }
        }
        let known = self.remote_routes.entry(from).or_default();
        if added {
            if !known.contains(&route) {
                self.routes.add(from, &route);
                known.insert(route);
            }
        } else if known.remove(&route) {
            self.routes.remove(from, &route);
        }
    }

    /// A new process took `peer`'s place: what the old one announced is kept (and
    /// messages for it keep going to the slot) until the new one has settled.
    fn peer_replaced(&mut self, peer: NodeId) {
        self.worker_stats.remove(&peer);
        let Some(routes) = self.remote_routes.remove(&peer) else {
            return;
        };
        self.stale_routes.entry(peer).or_default().extend(routes);
    }

    /// `peer`'s replacement has re-announced the routes of the sessions it imported:
    /// its predecessor's other routes go.
    fn peer_settled(&mut self, peer: NodeId) {
        let Some(stale) = self.stale_routes.remove(&peer) else {
            return;
        };
        for route in &stale {
            self.routes.remove(peer, route);
        }
        if !stale.is_empty() {
            tracing::info!(worker = %peer, routes = stale.len(), "replaced worker's routes not re-announced: removed");
        }
    }

    /// A peer is gone: forget everything it had announced.
    fn remove_peer(&mut self, peer: NodeId) {
        self.worker_stats.remove(&peer);
        // What was waiting for it to catch up will not get there through it any more.
        self.caught_up(Behind::Peer(peer));
        self.peer_settled(peer);
        let Some(routes) = self.remote_routes.remove(&peer) else {
            return;
        };
        for route in &routes {
            self.routes.remove(peer, route);
        }
        if !routes.is_empty() {
            let n = routes.len();
            tracing::info!(
                worker = %peer,
                routes = n,
                "peer worker gone or replaced: its routes removed"
            );
        }
    }

    /// A message published on another worker, for this worker's plain subscribers (if
    /// `plain`) and for one member of each listed shared group.
    pub(super) fn deliver_forwarded(
        &mut self,
        from: NodeId,
        msg: Message,
        plain: bool,
        shared: &[SharedTarget],
        now: Instant,
    ) {
        self.stats.forwarded_in += 1;
        let msg = Rc::new(msg);
        let source = Source::Peer(from);
        if plain {
            self.deliver_to_plain_subscribers(&msg, source, now);
        }
        for target in shared {
            self.deliver_to_shared_group(&target.group, &target.filter, &msg, source, now);
        }
    }

    /// Every peer confirmed barrier `id` (and so every earlier one: links are FIFO): the
    /// acknowledgements and SUBACKs waiting for it go out.
    pub(super) fn barrier_done(&mut self, id: u64, now: Instant) {
        self.barriers_done = self.barriers_done.max(id);
        self.release_held_acks();
        self.connects_after_barrier(id, now);
        self.route_barrier_done(id, now);
    }

    /// The backend has handed on everything forwarded up to confirmation `id`.
    fn forwards_confirmed(&mut self, id: u64) {
        self.forwards_confirmed = self.forwards_confirmed.max(id);
        self.release_held_acks();
    }

    /// Sends the held acknowledgements whose barrier and confirmation are both complete.
    fn release_held_acks(&mut self) {
        let holding = std::mem::take(&mut self.holding_acks);
        for key in holding {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            match conn.held_acks.take() {
                Some(held)
                    if held.barrier <= self.barriers_done
                        && held.confirmation <= self.forwards_confirmed =>
                {
                    for ack in &held.acks {
                        conn.send(ack);
                    }
                }
                Some(held) => {
                    conn.held_acks = Some(held);
                    self.holding_acks.push(key);
                }
                None => {}
            }
        }
    }
}
