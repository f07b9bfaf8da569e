//! The worker's MQTT engine: every connection's and session's protocol state, with no I/O.
//!
//! A transport driver feeds it bytes ([`Engine::handle_read`]), tells it when a socket is
//! gone ([`Engine::connection_lost`]) and takes the bytes it must write ([`Engine::output`]);
//! a periodic [`Engine::tick`] runs the timers (keep-alive, connect timeout, will delay,
//! session expiry). Every call takes `now`, so tests drive it without sockets or clocks.
//!
//! Layout: [`conn`] per-connection state, [`session`] per-client-id state; the packet
//! handlers are split by concern into `connect.rs`, `publish.rs` (inbound PUBLISH,
//! retained, wills, routing), `deliver.rs` (to one session: window, queue, redelivery,
//! acks) and `subscribe.rs`; `drivers.rs` is the engine's side of the transport drivers,
//! `cluster_io.rs` what the cluster tells this worker ([`Engine::handle_cluster`]),
//! `handover.rs` sessions moving to a successor (and a successor taking over), `flow.rs`
//! backpressure (who waits for a destination that is behind), `sys.rs` `$SYS`.

mod accounting;
mod barriers;
mod claims;
mod cluster_io;
mod conn;
mod connect;
mod deliver;
mod drivers;
mod durable;
mod flow;
mod gauges;
mod handover;
mod identity;
mod publish;
mod rate;
mod session;
mod stats;
mod subscribe;
mod sys;

use std::net::IpAddr;
use std::rc::Rc;
use std::time::Instant;

use ahash::AHashMap;
use bytes::BytesMut;
use slab::Slab;

pub use accounting::{Footprint, MemoryReport, MODEL_BYTES};
pub use conn::{Admission, Conn, ConnState, DirtyList, HeldAcks};
pub use drivers::{DriverId, PendingHandoff};
pub use session::{Session, Sessions};
pub use stats::Stats;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::model::Route;
use crate::model::{Message, NodeId, SessionKey, SharedTarget, WorkerStats};
use crate::protocol::{self, DecodeError, DisconnectReasonCode, Packet, PingResp};
use crate::router::RetainedStore;
use crate::router::{RouteTable, SharedGroups, SubscriptionIndex};
use drivers::DriverSlot;
use subscribe::ParkedSubAck;

/// How often a driver re-checks a connection paused for backpressure if nothing woke it.
const FLOW_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Ticks a closing connection may spend flushing before it is dropped regardless.
const ABORT_AFTER_TICKS: u8 = 3;

/// Identifies a connection for its driver; a slot in the engine's connection slab.
pub type ConnKey = usize;

pub struct Engine {
    config: Rc<Config>,
    conns: Slab<Conn>,
    sessions: Sessions,
    client_ids: AHashMap<Box<str>, SessionKey>,
    /// Local plain subscriptions.
    subscriptions: SubscriptionIndex,
    /// Local members of shared subscription groups.
    shared: SharedGroups,
    /// Which workers (this one included) subscribe to what.
    routes: RouteTable,
    /// Local subscriptions per route, so the cluster hears of a route once.
    route_refs: AHashMap<Route, u32>,
    retained: RetainedStore,
    cluster: Box<dyn Cluster>,
    /// This worker's name in the cluster.
    me: NodeId,
    /// Set while a CONNECT is decoded: the bytes to pass on if the client id lives elsewhere.
    connect_bytes: Option<bytes::Bytes>,
    /// Set while a CONNECT is handled: its password, as bytes (see [`protocol::ConnectFrame`]).
    connect_password: Option<bytes::Bytes>,
    /// The transport drivers, by [`DriverId`]: their dirty lists, handoffs and adoptions.
    drivers: Vec<DriverSlot>,
    /// Connections with acknowledgements held for a cluster barrier.
    holding_acks: Vec<ConnKey>,
    /// SUBACKs waiting for a cluster barrier.
    parked_subacks: Vec<(u64, ParkedSubAck)>,
    /// The latest barrier after a route announcement, while it is not complete: until
    /// then a SUBSCRIBE to an already announced route may not be known to every peer.
    route_barrier: Option<u64>,
    /// Barriers this engine waits for, oldest first, with the tick that first saw each
    /// (`barriers.rs`: their timeout).
    pending_barriers: std::collections::VecDeque<(u64, Option<Instant>)>,
    /// The latest barrier completed (or given up), and the latest forward confirmation
    /// (`Cluster::unconfirmed_forwards`): held acknowledgements wait for both.
    barriers_done: u64,
    forwards_confirmed: u64,
    /// CONNECTs waiting for their client id to be claimed across hosts (`claims.rs`).
    parked_connects: Vec<claims::ParkedConnect>,
    /// The claim epoch of each session claimed across hosts (empty unless the backend
    /// claims): a release from an older claim leaves a newer session alone.
    claim_epochs: AHashMap<Box<str>, u64>,
    /// Identities of connections that proved one below MQTT (a TLS client certificate).
    peer_identities: AHashMap<ConnKey, Box<str>>,
    /// The backend keeps persistent sessions in a store (`durable.rs`).
    store_sessions: bool,
    /// Routes each peer announced, so they can be dropped when it goes away.
    remote_routes: AHashMap<NodeId, std::collections::HashSet<Route>>,
    /// Routes a replaced peer's predecessor announced, kept until the replacement settles.
    stale_routes: AHashMap<NodeId, std::collections::HashSet<Route>>,
    /// Set while this worker imports its predecessor's sessions (`handover.rs`).
    takeover: Option<handover::Takeover>,
    /// Latest counters reported by each worker, this one included (for `$SYS`, kept by the
    /// worker that publishes it).
    worker_stats: std::collections::BTreeMap<NodeId, WorkerStats>,
    started_at: Instant,
    last_sys_publish: Option<Instant>,
    plain_worker_scratch: Vec<NodeId>,
    shared_target_scratch: Vec<(NodeId, SharedTarget)>,
    /// Connections that count against the limit (have not been refused).
    admitted: usize,
    /// New connections per source address (this worker's share of the broker's rate).
    connect_limiter: rate::ConnectLimiter,
    /// This process's resident memory as last measured by the worker (bytes).
    resident_bytes: u64,
    next_assigned_id: u64,
    /// Sources paused for destinations that are behind (see `flow.rs`).
    waiters: flow::Waiters,
    /// Reused on every PUBLISH to collect matching subscriptions without allocating.
    match_scratch: Vec<(SessionKey, topic_trie::SubscriptionOptions)>,
    pub stats: Stats,
}

impl Engine {
    /// An engine for the worker `cluster` names ([`Cluster::local_node`]).
    pub fn new(config: Rc<Config>, cluster: Box<dyn Cluster>) -> Engine {
        let retained = RetainedStore::new(config.limits.max_retained_messages);
        let workers = cluster.local_workers();
        let connect_limiter = rate::ConnectLimiter::new(connect_rate(&config, workers));
        let me = cluster.local_node();
        let store_sessions = cluster.stores_sessions();
        Engine {
            config,
            conns: Slab::new(),
            sessions: Sessions::default(),
            client_ids: AHashMap::new(),
            subscriptions: SubscriptionIndex::new(),
            shared: SharedGroups::default(),
            routes: RouteTable::default(),
            route_refs: AHashMap::new(),
            retained,
            cluster,
            me,
            connect_bytes: None,
            connect_password: None,
            drivers: Vec::new(),
            parked_subacks: Vec::new(),
            route_barrier: None,
            pending_barriers: Default::default(),
            barriers_done: 0,
            forwards_confirmed: 0,
            parked_connects: Vec::new(),
            claim_epochs: AHashMap::new(),
            peer_identities: AHashMap::new(),
            store_sessions,
            holding_acks: Vec::new(),
            worker_stats: Default::default(),
            remote_routes: AHashMap::new(),
            stale_routes: AHashMap::new(),
            takeover: None,
            started_at: Instant::now(),
            last_sys_publish: None,
            plain_worker_scratch: Vec::new(),
            shared_target_scratch: Vec::new(),
            admitted: 0,
            connect_limiter,
            resident_bytes: 0,
            next_assigned_id: 0,
            waiters: flow::Waiters::default(),
            match_scratch: Vec::new(),
            stats: Stats::default(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// While a throttled client is paused: when its input may be read again. The driver
    /// leaves the socket unread until then (TCP flow control pushes back on the client).
    pub fn read_paused_until(&mut self, key: ConnKey, now: Instant) -> Option<Instant> {
        let now_ms = self.millis(now);
        let conn = self.conns.get_mut(key)?;
        if conn.flow == conn::FlowState::Paused {
            // Until the destination catches up, which wakes the connection; the time is
            // only the driver's safety net.
            return Some(now + FLOW_RECHECK);
        }
        if conn.paused_until_ms == 0 {
            return None;
        }
        let left = conn.paused_until_ms.wrapping_sub(now_ms);
        if left == 0 || left > u32::MAX / 2 {
            conn.paused_until_ms = 0;
            return None;
        }
        Some(now + std::time::Duration::from_millis(u64::from(left)))
    }

    fn admission(&mut self, now: Instant, peer: Option<IpAddr>) -> Admission {
        let limits = &self.config.limits;
        let broker_full = limits.max_connections > 0
            && self.cluster.broker_connections().unwrap_or(self.admitted) >= limits.max_connections;
        if self.admitted >= limits.max_connections_per_worker || broker_full {
            Admission::OverLimit
        } else if limits.memory_high_watermark_bytes > 0
            && self.resident_bytes > limits.memory_high_watermark_bytes
        {
            Admission::OverMemory
        } else if peer.is_some_and(|ip| !self.connect_limiter.admit(ip, self.millis(now))) {
            Admission::RateLimited
        } else {
            Admission::Admitted
        }
    }

    /// Tells the engine this process's resident memory (the worker measures it each second;
    /// the engine stays free of I/O). New connections are refused above the watermark.
    pub fn set_resident_memory(&mut self, bytes: u64) {
        self.resident_bytes = bytes;
    }

    /// `now` as engine milliseconds, the clock of the rate limiters.
    fn millis(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.started_at).as_millis() as u32
    }

    /// A connection's slot was freed (closed, or handed to another worker).
    fn forget_conn(&mut self, conn: &Conn) {
        self.drop_parked_subscribes(conn.key);
        if !self.peer_identities.is_empty() {
            self.peer_identities.remove(&conn.key);
        }
        self.drivers[conn.driver_index()].conns -= 1;
        self.release_admission(conn.admission);
    }

    /// One connection left the admitted set.
    fn release_admission(&mut self, admission: Admission) {
        if admission == Admission::Admitted {
            self.admitted -= 1;
            self.cluster.connections_changed(self.admitted);
        }
    }

    /// The buffer a driver should read into for `key`: the worker-wide `scratch` with any
    /// partial packet from the previous read of this connection moved in front.
    pub fn prepare_read(&mut self, key: ConnKey, scratch: &mut BytesMut) {
        scratch.clear();
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.partial.is_empty() {
                scratch.extend_from_slice(&conn.partial);
                conn.partial = BytesMut::new();
            }
        }
    }

    /// Handles every complete packet in `buf` (bytes just read for `key`, after
    /// [`Engine::prepare_read`]). An incomplete tail is kept in the connection.
    pub fn handle_read(&mut self, key: ConnKey, buf: &mut BytesMut, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.state == ConnState::AwaitingConnect && !self.cluster.is_alone() {
            // Kept until CONNECT is decoded: if its client id lives on another worker, the
            // connection moves there together with every byte read so far.
            self.connect_bytes = Some(bytes::Bytes::copy_from_slice(buf));
        }
        if conn.flow == conn::FlowState::Held && !buf.is_empty() {
            // Not decoded yet, but the client is alive: keep-alive counts from here.
            conn.last_packet_at = now;
        }
        self.stats.bytes_received += buf.len() as u64;
        self.handle_input(key, buf, now);
    }

    /// Decodes and handles the complete packets in `buf`, until the connection pauses
    /// (throttled, or waiting for a barrier); the rest is kept in the connection.
    fn handle_input(&mut self, key: ConnKey, buf: &mut BytesMut, now: Instant) {
        let max = self.config.limits.max_packet_size;
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            if conn.is_closing() || conn.state == ConnState::HandingOff {
                buf.clear();
                self.connect_bytes = None;
                return;
            }
            if conn.flow == conn::FlowState::Held {
                // Behind a SUBSCRIBE waiting for its barrier: the rest waits (as a partial
                // packet) until that SUBSCRIBE completes.
                break;
            }
            let read = match conn.state {
                ConnState::AwaitingConnect => protocol::read_connect(buf, max).map(|r| {
                    r.map(|frame| {
                        conn.version = frame.version;
                        self.connect_password = frame.password;
                        frame.packet
                    })
                }),
                _ => protocol::read_packet(buf, conn.version, max),
            };
            match read {
                Ok(Some(packet)) => {
                    self.stats.packets_received += 1;
                    self.conns[key].last_packet_at = now;
                    self.handle_packet(key, packet, now);
                    if self.conns.get(key).is_some_and(|c| {
                        c.paused_until_ms != 0 || c.flow == conn::FlowState::Paused
                    }) {
                        // Throttled or waiting for a destination: the rest waits (as a
                        // partial packet) for the pause to end.
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.decode_failed(key, e, now);
                    buf.clear();
                    return;
                }
            }
        }
        if !buf.is_empty() {
            if let Some(conn) = self.conns.get_mut(key) {
                // Copied out so the worker's scratch buffer can be reused by the next read.
                conn.partial = BytesMut::from(&buf[..]);
            }
            buf.clear();
        }
    }

    /// The SUBSCRIBE `key` waited for has completed: the packets read behind it are
    /// handled now (the driver may have nothing more to read to trigger it).
    fn release_input(&mut self, key: ConnKey, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.flow == conn::FlowState::Held {
            conn.flow = conn::FlowState::Reading;
        }
        let mut held = std::mem::take(&mut conn.partial);
        if !held.is_empty() {
            self.handle_input(key, &mut held, now);
        }
    }

    fn decode_failed(&mut self, key: ConnKey, e: DecodeError, now: Instant) {
        self.stats.protocol_errors += 1;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        tracing::warn!(conn = key, version = ?conn.version, "closing connection: {e}");
        if conn.state == ConnState::AwaitingConnect {
            connect::refuse_undecodable_connect(conn, &e);
        } else {
            conn.disconnect(e.reason(), &e.to_string());
        }
        self.end_connection(key, true, now);
    }

    fn handle_packet(&mut self, key: ConnKey, packet: Packet, now: Instant) {
        let state = self.conns[key].state;
        match (state, packet) {
            (ConnState::AwaitingConnect, Packet::Connect(connect, will, login)) => {
                self.handle_connect(key, connect, will, login, now)
            }
            (ConnState::Active, Packet::Publish(p)) => self.handle_publish(key, p, now),
            (ConnState::Active, Packet::PubAck(a)) => self.handle_puback(key, a.pkid, now),
            (ConnState::Active, Packet::PubRec(r)) => self.handle_pubrec(key, r, now),
            (ConnState::Active, Packet::PubRel(r)) => self.handle_pubrel(key, r.pkid),
            (ConnState::Active, Packet::PubComp(c)) => self.handle_pubcomp(key, c.pkid, now),
            (ConnState::Active, Packet::Subscribe(s)) => self.handle_subscribe(key, s, now),
            (ConnState::Active, Packet::Unsubscribe(u)) => self.handle_unsubscribe(key, u, now),
            (ConnState::Active, Packet::PingReq(_)) => {
                self.conns[key].send(&Packet::PingResp(PingResp))
            }
            (ConnState::Active, Packet::Disconnect(d)) => self.handle_disconnect(key, d, now),
            (_, packet) => {
                // A second CONNECT, AUTH without an authentication method, or a packet only
                // a server sends: all protocol errors (MQTT-3.1.0-2, 4.8.0-1, 3.15.0-x).
                let kind = packet_name(&packet);
                self.protocol_error(key, DisconnectReasonCode::ProtocolError, kind, now);
            }
        }
    }

    /// Closes `key` because of what the client did, with the spec's reason code for v5.
    pub(crate) fn protocol_error(
        &mut self,
        key: ConnKey,
        reason: DisconnectReasonCode,
        why: &str,
        now: Instant,
    ) {
        self.stats.protocol_errors += 1;
        let conn = &mut self.conns[key];
        tracing::warn!(
            conn = key,
            ?reason,
            "closing connection: protocol violation: {why}"
        );
        conn.disconnect(reason, why);
        self.end_connection(key, true, now);
    }

    /// The driver saw the socket close or fail. Publishes the will unless the client had
    /// said DISCONNECT, and detaches the session. The slot is freed here.
    pub fn connection_lost(&mut self, key: ConnKey, now: Instant) {
        if !self.conns.contains(key) {
            return;
        }
        // A handoff it never made (the driver lost the socket first) goes with it.
        let _ = self.take_handoff(key);
        self.flush_held_input(key, now);
        self.end_connection(key, true, now);
        let conn = self.conns.remove(key);
        self.forget_conn(&conn);
        self.stats.connections_closed += 1;
    }

    /// Bytes waiting to be written for `key`, if any. The driver writes what it can and
    /// advances the buffer; `None` once the connection is gone.
    pub fn output(&mut self, key: ConnKey) -> Option<&mut BytesMut> {
        self.conns.get_mut(key).map(|c| &mut c.out)
    }

    /// After a flush that wrote `bytes`: give the buffer's memory back once it is empty, so
    /// an idle connection holds none; output left over means the client is not draining
    /// (budget decisions treat it as backlogged until a flush empties it).
    pub fn output_flushed(&mut self, key: ConnKey, bytes: usize) {
        self.stats.bytes_sent += bytes as u64;
        if let Some(conn) = self.conns.get_mut(key) {
            conn.progressed |= bytes > 0;
            conn.backlogged = !conn.out.is_empty();
            if !conn.backlogged {
                conn.out = BytesMut::new();
            }
        }
    }

    /// True when the driver should close the socket once `output` is flushed.
    pub fn is_closing(&self, key: ConnKey) -> bool {
        self.conns
            .get(key)
            .is_none_or(|c| c.is_closing() || c.state == ConnState::HandingOff)
    }

    /// True when a closing connection has failed to flush its last bytes for a few ticks:
    /// the driver drops it without waiting for a client that does not read.
    pub fn should_abort(&self, key: ConnKey) -> bool {
        self.conns
            .get(key)
            .is_none_or(|c| c.close_ticks >= ABORT_AFTER_TICKS)
    }

    /// Server shutdown: every client is told (v5: DISCONNECT 0x8B) and its connection closed.
    pub fn shutdown(&mut self, now: Instant) {
        // Every listener's driver asks; connections already told are left alone.
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.is_closing())
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            let conn = &mut self.conns[key];
            conn.disconnect(
                DisconnectReasonCode::ServerShuttingDown,
                "server shutting down",
            );
            self.end_connection(key, false, now);
        }
    }

    /// Runs the timers; call about once a second.
    pub fn tick(&mut self, now: Instant) {
        let connect_timeout = self.config.limits.connect_timeout();
        let mut expired = Vec::new();
        let mut closing = Vec::new();
        for (key, conn) in self.conns.iter() {
            let late = match conn.state {
                ConnState::AwaitingConnect => now >= conn.last_packet_at + connect_timeout,
                // A client paused for backpressure is silent because we do not read it.
                ConnState::Active => {
                    conn.flow != conn::FlowState::Paused
                        && conn.keep_alive_deadline().is_some_and(|d| now >= d)
                }
                ConnState::Closing => {
                    closing.push(key);
                    false
                }
                ConnState::HandingOff => false,
            };
            if late {
                expired.push(key);
            }
        }
        for key in closing {
            let conn = &mut self.conns[key];
            conn.close_ticks = conn.close_ticks.saturating_add(1);
            if conn.close_ticks >= ABORT_AFTER_TICKS {
                // Let the driver see should_abort().
                conn.queued = false;
                conn.wake();
            }
        }
        for key in expired {
            let conn = &mut self.conns[key];
            if conn.state == ConnState::AwaitingConnect {
                tracing::debug!(conn = key, "no CONNECT within the connect timeout");
                conn.close();
            } else {
                tracing::info!(conn = key, "keep-alive timeout");
                self.stats.keepalive_timeouts += 1;
                conn.disconnect(DisconnectReasonCode::KeepAliveTimeout, "keep-alive timeout");
                self.end_connection(key, true, now);
            }
        }
        self.cut_slow_consumers();
        self.expire_barriers(now);
        self.expire_parked_connects(now);
        self.expire_sessions(now);
        self.release_idle_message_buffers();
        self.connect_limiter.sweep(self.millis(now));
        self.retained.sweep(now);
        self.publish_sys(now);
    }

    /// Sessions whose inflight window and queue emptied give the deques' memory back, so
    /// a connection that has gone idle costs its base footprint again. Done here, once a
    /// second, rather than on every acknowledgement (that would allocate per message).
    fn release_idle_message_buffers(&mut self) {
        for (_, s) in self.sessions.iter_mut() {
            if s.inflight.is_empty() && s.inflight.capacity() > 0 {
                s.inflight = Default::default();
            }
            if s.queue.is_empty() && s.queue.capacity() > 0 {
                s.queue = Default::default();
            }
        }
    }

    /// Offline sessions: publish wills whose delay passed, discard expired sessions.
    fn expire_sessions(&mut self, now: Instant) {
        let mut wills = Vec::new();
        let mut ended = Vec::new();
        for (skey, s) in self.sessions.iter_mut() {
            if s.conn.is_some() {
                continue;
            }
            if s.will_at.is_some_and(|at| at <= now) {
                s.will_at = None;
                if let Some(will) = s.will.take() {
                    wills.push(will.msg);
                }
            }
            if s.expires_at.is_some_and(|at| at <= now) {
                ended.push(skey);
            }
        }
        for msg in wills {
            self.publish_will(msg, now);
        }
        for skey in ended {
            self.discard_session(skey, now);
        }
    }

    /// Detaches the connection from its session and marks it closing (the driver frees the
    /// slot). `abnormal`: the will is due (no DISCONNECT was received).
    fn end_connection(&mut self, key: ConnKey, abnormal: bool, now: Instant) {
        let conn = &mut self.conns[key];
        if !conn.is_closing() {
            conn.close();
        }
        let Some(skey) = conn.session.take() else {
            return;
        };
        let session = &mut self.sessions[skey];
        session.conn = None;
        if !abnormal {
            session.will = None;
        }
        // Offline, its queue limit applies again: nobody waits for it any more.
        self.session_progressed(skey);
        let session = &mut self.sessions[skey];
        if session.expiry_secs == 0 {
            // The session ends with the connection: the will (if due) goes out now.
            self.discard_session(skey, now);
            return;
        }
        if session.expiry_secs != u32::MAX {
            session.expires_at =
                Some(now + std::time::Duration::from_secs(session.expiry_secs as u64));
        }
        if let Some(will) = &session.will {
            if will.delay_secs == 0 {
                let will = session.will.take().map(|w| w.msg);
                if let Some(msg) = will {
                    self.publish_will(msg, now);
                }
            } else {
                session.will_at =
                    Some(now + std::time::Duration::from_secs(will.delay_secs as u64));
            }
        }
        self.store_meta(skey, false, now);
    }

    /// Removes a session and its subscriptions; a will still pending is published first
    /// (the session's end is one of the two moments a delayed will is due).
    fn discard_session(&mut self, skey: SessionKey, now: Instant) {
        self.store_dropped(skey);
        self.caught_up(flow::Behind::Session(skey));
        let session = self.sessions.remove(skey);
        if self.client_ids.get(&session.client_id) == Some(&skey) {
            self.client_ids.remove(&session.client_id);
            self.claim_epochs.remove(&session.client_id);
        }
        for (filter, _) in session.subscriptions.iter() {
            self.remove_subscription(skey, filter);
        }
        self.stats.dropped_on_session_end += (session.queue.len() + session.inflight.len()) as u64;
        if let Some(will) = session.will {
            self.publish_will(will.msg, now);
        }
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }

    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// A fresh client id that lives on this worker (its hash picks this worker).
    fn assign_client_id(&mut self) -> String {
        loop {
            self.next_assigned_id += 1;
            let id = format!("mqttd-{}-{:x}", std::process::id(), self.next_assigned_id);
            let home = self.cluster.home_of(&id);
            if home == self.me && !self.client_ids.contains_key(id.as_str()) {
                return id;
            }
        }
    }
}

/// This worker's share of the broker-wide per-IP connect rate: the kernel spreads
/// connections evenly over the workers (SO_REUSEPORT hashes the source port too).
fn connect_rate(config: &Config, workers: u16) -> rate::Rate {
    let limits = &config.limits;
    let share = f32::from(workers.max(1));
    rate::Rate::new(
        limits.connect_rate_per_ip as f32 / share,
        (limits.connect_burst_per_ip as f32 / share).ceil(),
    )
}

fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Auth(_) => "AUTH without an authentication method",
        Packet::Connect(..) => "second CONNECT",
        Packet::ConnAck(_) => "CONNACK from a client",
        Packet::SubAck(_) => "SUBACK from a client",
        Packet::UnsubAck(_) => "UNSUBACK from a client",
        Packet::PingResp(_) => "PINGRESP from a client",
        _ => "packet before CONNECT",
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_cluster;
#[cfg(test)]
mod tests_limits;
#[cfg(test)]
mod tests_spec;
