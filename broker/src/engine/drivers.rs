//! The engine's side of its transport drivers (the TCP reactor, the QUIC driver, ...).
//!
//! A driver registers once and gets a [`DriverId`]; every connection it accepts carries
//! that id, so each driver takes only its own dirty connections, its own handoffs and the
//! handed-over streams of the kinds it adopts. The engine knows nothing else about
//! transports: a new one is a new driver, not a change here.

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;

use super::conn::{Admission, Conn, DirtyList};
use super::{connect, publish, rate, ConnKey, Engine};
use crate::cluster::{HandedStream, HandoffError, StreamKind};
use crate::model::NodeId;
use crate::protocol::{ConnAckProperties, ConnectReturnCode};

/// A transport driver registered with the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DriverId(u8);

impl DriverId {
    pub(super) fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// What the engine keeps per driver.
#[derive(Debug, Default)]
pub(super) struct DriverSlot {
    /// The transport it serves (the `transport` label of its metrics).
    pub(super) name: &'static str,
    /// Connections accepted since start.
    pub(super) accepted: u64,
    /// Connections its protocol layers gave up on, by reason.
    pub(super) errors: Vec<(&'static str, u64)>,
    /// Kinds of handed-over streams this driver takes on.
    adopts: Vec<StreamKind>,
    /// Its connections with output or a pending close.
    pub(super) dirty: Rc<DirtyList>,
    /// Its connections whose client id lives on another worker.
    handoffs: Vec<PendingHandoff>,
    /// Streams other workers handed over, waiting for this driver to adopt them.
    adopted: Vec<HandedStream>,
    /// Its open connections (the ones it waits for when it drains).
    pub(super) conns: usize,
}

/// A connection to pass to the worker that owns its client id, with every byte read from
/// it so far (the new owner reads them first).
#[derive(Debug)]
pub struct PendingHandoff {
    pub key: ConnKey,
    pub to: NodeId,
    pub bytes: Bytes,
}

impl Engine {
    /// Registers a transport driver, `name` being its transport ("tcp", "tls", "quic"...).
    /// `adopts`: the kinds of handed-over streams it serves (a driver that terminates its
    /// protocol in-process, like QUIC or TLS, adopts none).
    pub fn add_driver(&mut self, name: &'static str, adopts: &[StreamKind]) -> DriverId {
        let id = DriverId(self.drivers.len() as u8);
        self.drivers.push(DriverSlot {
            name,
            adopts: adopts.to_vec(),
            ..DriverSlot::default()
        });
        id
    }

    /// A new connection of `driver`: from the network (`peer` is its source address, for the
    /// per-IP connect rate) or handed over by another worker (`None`: already rate-checked
    /// there). Over a limit it is still accepted, so that its CONNECT can be answered with
    /// the reason ("quota exceeded" / "server unavailable" / "connection rate exceeded"); no
    /// session is created for it.
    pub fn accept(&mut self, driver: DriverId, now: Instant, peer: Option<IpAddr>) -> ConnKey {
        let admission = self.admission(now, peer);
        if admission == Admission::Admitted {
            self.admitted += 1;
            self.cluster.connections_changed(self.admitted);
        }
        self.stats.connections_accepted += 1;
        let (packets, bytes) = publish::publish_rates(&self.config.limits);
        let buckets = rate::PublishBuckets::full(packets, bytes, self.millis(now));
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let slot = &mut self.drivers[driver.index()];
        slot.conns += 1;
        slot.accepted += 1;
        let mut conn = Conn::new(key, driver, slot.dirty.clone(), now, admission);
        conn.publish_buckets = buckets;
        entry.insert(conn);
        key
    }

    /// The connections of `driver` that gained output or must close since the last call,
    /// each once.
    pub fn take_dirty(&mut self, driver: DriverId, into: &mut Vec<ConnKey>) {
        self.drivers[driver.index()].dirty.take(into);
        for &key in into.iter() {
            // A key whose slot now holds another driver's connection (closed and reused
            // since) is left alone.
            if let Some(conn) = self.conns.get_mut(key) {
                if conn.driver == driver {
                    conn.queued = false;
                }
            }
        }
    }

    /// Ready when `driver` has a dirty connection or a stream to adopt; wakes the caller on
    /// the next one otherwise.
    pub fn poll_dirty(&self, driver: DriverId, cx: &mut Context<'_>) -> Poll<()> {
        let slot = &self.drivers[driver.index()];
        if !slot.adopted.is_empty() {
            return Poll::Ready(());
        }
        slot.dirty.poll_ready(cx)
    }

    /// A connection of `driver` broke its transport's protocol (a failed TLS handshake, a
    /// bad WebSocket upgrade...): counted by `reason`.
    pub fn transport_error(&mut self, driver: DriverId, reason: &'static str) {
        let errors = &mut self.drivers[driver.index()].errors;
        match errors.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => errors.push((reason, 1)),
        }
    }

    /// Open connections of `driver`.
    pub fn driver_connections(&self, driver: DriverId) -> usize {
        self.drivers[driver.index()].conns
    }

    /// Connections of `driver` whose client id lives on another worker. The driver lets go
    /// of each socket and passes it on with [`Engine::hand_off`].
    pub fn take_handoffs(&mut self, driver: DriverId) -> Vec<PendingHandoff> {
        std::mem::take(&mut self.drivers[driver.index()].handoffs)
    }

    /// The handoff of connection `key`, if its client id turned out to live elsewhere (for
    /// a driver that checks connection by connection).
    pub fn take_handoff(&mut self, key: ConnKey) -> Option<PendingHandoff> {
        let driver = self.conns.get(key)?.driver;
        let handoffs = &mut self.drivers[driver.index()].handoffs;
        let at = handoffs.iter().position(|h| h.key == key)?;
        Some(handoffs.swap_remove(at))
    }

    /// Queued by CONNECT handling: `key` moves to `to`.
    pub(super) fn queue_handoff(&mut self, key: ConnKey, to: NodeId, bytes: Bytes) {
        let driver = self.conns[key].driver;
        let handoff = PendingHandoff { key, to, bytes };
        self.drivers[driver.index()].handoffs.push(handoff);
    }

    /// Passes `socket` (its driver has let go of it; it carries `kind`) to worker `to`. If
    /// that worker cannot take it, the client is refused (v5: "server unavailable", or "use
    /// another server" when it lives on another host) and the socket comes back to the
    /// driver to flush that CONNACK.
    pub fn hand_off(
        &mut self,
        handoff: PendingHandoff,
        kind: StreamKind,
        socket: OwnedFd,
    ) -> Result<(), OwnedFd> {
        let key = handoff.key;
        let stream = HandedStream {
            kind,
            socket,
            identity: self.peer_identities.get(&key).cloned(),
            bytes: handoff.bytes,
        };
        match self.cluster.handoff(handoff.to, stream) {
            Ok(()) => {
                self.stats.handed_off += 1;
                let conn = self.conns.remove(key);
                self.forget_conn(&conn);
                Ok(())
            }
            Err(e) => {
                let v5 = self.conns[key].version.is_v5();
                self.conns[key].state = super::ConnState::AwaitingConnect;
                let stream = match e {
                    HandoffError::Unreachable(stream) => {
                        tracing::warn!(
                            conn = key,
                            worker = %handoff.to,
                            "cannot reach the worker owning this client id"
                        );
                        let code = if v5 {
                            ConnectReturnCode::ServerUnavailable
                        } else {
                            ConnectReturnCode::ServiceUnavailable
                        };
                        self.refuse(key, code, "worker owning the client id is unavailable");
                        stream
                    }
                    HandoffError::Elsewhere {
                        stream,
                        server_reference,
                    } => {
                        tracing::info!(
                            conn = key,
                            worker = %handoff.to,
                            "client id lives on another host: client redirected"
                        );
                        self.redirect(key, server_reference);
                        stream
                    }
                };
                Err(stream.socket)
            }
        }
    }

    /// Refuses `key`'s CONNECT because its client id lives on another host: v5 clients are
    /// told to use another server (with its reference, when known); 3.1.1 has no such code,
    /// so "server unavailable".
    fn redirect(&mut self, key: ConnKey, server_reference: Option<String>) {
        let conn = &mut self.conns[key];
        if !conn.version.is_v5() {
            let code = ConnectReturnCode::ServiceUnavailable;
            return self.refuse(key, code, "client id lives on another host");
        }
        let properties = ConnAckProperties {
            server_reference,
            ..connect::empty_connack_props()
        };
        let code = ConnectReturnCode::UseAnotherServer;
        conn.send(&connect::connack(false, code, Some(properties)));
        conn.close();
    }

    /// A stream another worker handed over: queued for the driver that adopts its kind.
    pub(super) fn adopt(&mut self, stream: HandedStream) {
        let Some(slot) = self
            .drivers
            .iter_mut()
            .find(|d| d.adopts.contains(&stream.kind))
        else {
            tracing::warn!(kind = ?stream.kind, "no driver for a handed-over stream: closed");
            return;
        };
        slot.adopted.push(stream);
        slot.dirty.wake();
    }

    /// Streams handed over to `driver` since the last call. The driver accepts each
    /// (`peer` = `None`) and feeds it `bytes` before reading the socket.
    pub fn take_adopted(&mut self, driver: DriverId) -> Vec<HandedStream> {
        std::mem::take(&mut self.drivers[driver.index()].adopted)
    }
}
