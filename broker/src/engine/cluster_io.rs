//! The engine's side of the cluster: what other workers tell this one (routes, forwarded
//! and retained messages, barrier confirmations, handed-over connections, counters) and the
//! connections this worker hands to others.

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;

use super::{ConnKey, Engine, Message};
use crate::cluster::WorkerStats;
use crate::protocol::ConnectReturnCode;
use crate::router::Route;

impl Engine {
    pub fn worker_index(&self) -> u16 {
        self.index
    }

    /// Connections whose client id lives on another worker: (conn, worker, bytes read).
    /// Only the TCP reactor's; see [`Engine::take_quic_handoff`] for the QUIC driver's.
    pub fn take_handoffs(&mut self) -> Vec<(ConnKey, u16, Bytes)> {
        std::mem::take(&mut self.handoffs)
    }

    /// The QUIC driver's connection `key`, if its client id turned out to live on another
    /// worker: (worker, bytes read). The driver then passes a socketpair end with
    /// [`Engine::hand_off`] and relays the connection through it.
    pub fn take_quic_handoff(&mut self, key: ConnKey) -> Option<(u16, Bytes)> {
        let at = self.quic_handoffs.iter().position(|h| h.0 == key)?;
        let (_, to, bytes) = self.quic_handoffs.swap_remove(at);
        Some((to, bytes))
    }

    /// Passes `socket` (the transport has deregistered it) to worker `to`. If that worker
    /// cannot be reached, the client is refused with "server unavailable" and the socket
    /// comes back to the transport to flush that CONNACK.
    pub fn hand_off(
        &mut self,
        key: ConnKey,
        to: u16,
        socket: OwnedFd,
        bytes: Bytes,
    ) -> Result<(), OwnedFd> {
        match self.cluster.handoff(to, socket, bytes) {
            Ok(()) => {
                self.stats.handed_off += 1;
                let conn = self.conns.remove(key);
                self.forget_conn(&conn);
                Ok(())
            }
            Err(socket) => {
                tracing::warn!(
                    conn = key,
                    worker = to,
                    "cannot reach the worker owning this client id"
                );
                let code = if self.conns[key].version.is_v5() {
                    ConnectReturnCode::ServerUnavailable
                } else {
                    ConnectReturnCode::ServiceUnavailable
                };
                self.conns[key].state = super::ConnState::AwaitingConnect;
                self.refuse(key, code, "worker owning the client id is unavailable");
                Err(socket)
            }
        }
    }

    /// A connection another worker handed over (a TCP socket, or the Unix end of a QUIC
    /// relay); the transport adopts it on its next turn. The worker that accepted it
    /// already applied the per-IP connect rate.
    pub fn adopt_socket(&mut self, socket: OwnedFd, bytes: Bytes) {
        self.adopted.push((socket, bytes));
        self.dirty.wake_driver();
    }

    pub fn take_adopted(&mut self) -> Vec<(OwnedFd, Bytes)> {
        std::mem::take(&mut self.adopted)
    }

    /// A peer announced (`added`) or withdrew a route.
    pub fn remote_route(&mut self, worker: u16, route: Route, added: bool) {
        let Some(known) = self.remote_routes.get_mut(worker as usize) else {
            return;
        };
        if added {
            self.routes.add(worker, &route);
            known.insert(route);
        } else if known.remove(&route) {
            self.routes.remove(worker, &route);
        }
    }

    /// A peer is gone (or restarted): forget everything it had announced.
    pub fn remove_worker(&mut self, worker: u16) {
        let Some(known) = self.remote_routes.get_mut(worker as usize) else {
            return;
        };
        let routes: HashSet<Route> = std::mem::take(known);
        for route in &routes {
            self.routes.remove(worker, route);
        }
        if let Some(stats) = self.worker_stats.get_mut(worker as usize) {
            *stats = None;
        }
        if !routes.is_empty() {
            let n = routes.len();
            tracing::info!(
                worker,
                routes = n,
                "peer worker gone or replaced: its routes removed"
            );
        }
    }

    /// A message published on another worker, for this worker's plain subscribers (if
    /// `plain`) and for one member of each listed shared group.
    pub fn deliver_forwarded(
        &mut self,
        msg: Message,
        plain: bool,
        shared: &[(Box<str>, Box<str>)],
        now: Instant,
    ) {
        self.stats.forwarded_in += 1;
        let msg = Rc::new(msg);
        if plain {
            self.deliver_to_plain_subscribers(&msg, now);
        }
        for (group, filter) in shared {
            self.deliver_to_shared_group(group, filter, &msg, now);
        }
    }

    /// A retained message set (or cleared) on another worker.
    pub fn store_retained_from_peer(&mut self, msg: Message) {
        self.retained.set(Rc::new(msg));
    }

    /// Every retained message, for a worker that joins.
    pub fn retained_snapshot(&self) -> Vec<Rc<Message>> {
        self.retained.all()
    }

    /// The routes of this worker's own subscriptions, for a worker that joins.
    pub fn local_routes(&self) -> Vec<Route> {
        self.route_refs.keys().cloned().collect()
    }

    /// Every peer confirmed barrier `id` (and so every earlier one: links are FIFO): the
    /// acknowledgements and SUBACKs waiting for it go out.
    pub fn barrier_done(&mut self, id: u64, now: Instant) {
        let holding = std::mem::take(&mut self.holding_acks);
        for key in holding {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            match conn.held_acks.take() {
                Some(held) if held.0 <= id => {
                    for ack in &held.1 {
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
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked_subacks)
            .into_iter()
            .partition(|(barrier, _)| *barrier == id);
        self.parked_subacks = waiting;
        for (_, parked) in done {
            self.complete_subscribe(parked, now);
        }
    }

    /// A peer's latest counters (kept for `$SYS`).
    pub fn peer_stats(&mut self, worker: u16, stats: WorkerStats) {
        if let Some(slot) = self.worker_stats.get_mut(worker as usize) {
            *slot = Some(stats);
        }
    }
}
