//! The worker's QUIC driver: one task owning the `quinn_proto::Endpoint`, every
//! `quinn_proto::Connection` (with its relay) and the UDP socket.
//!
//! quinn-proto is I/O-free; this module is its only driver in the broker (STYLE.md §1),
//! and, like the TCP reactor, a transport driver of the engine: a connection whose client
//! id lives on this worker is an engine connection of its own (`Engine::accept_quic`), fed
//! and flushed directly by its relay. Only a connection handed to another worker goes
//! through a socketpair (see [`super::relay`]). Like the TCP reactor, it owns one
//! `mio::Poll` holding the UDP socket and the relay end of every such socketpair, and
//! registers only that epoll descriptor with tokio. Each turn:
//!
//! 1. takes the readiness events: UDP readable → receive a batch (`recvmmsg`, GRO via
//!    quinn-udp) and feed each datagram to [`Endpoint::handle`]: a connection's datagram is
//!    handed to it, a new one is accepted, a stateless answer is sent; a socketpair end
//!    ready → its connection is marked;
//! 2. fires the due timers (one ordered set of `(deadline, connection)`, each connection's
//!    earliest of `poll_timeout()`, its own handshake / linger deadline and the end of a
//!    publish-rate pause);
//! 3. marks the connections the engine made dirty (output, close) since the last turn;
//! 4. drives every marked connection once: application events, the relay's
//!    [`Relay::turn`] (client bytes into the engine, engine output into the streams),
//!    endpoint events, then `poll_transmit` into one shared buffer sent with GSO, then its
//!    next timer; 3 and 4 repeat while driving made other connections dirty (a PUBLISH
//!    read from one connection is delivered to subscribers on others in the same turn).
//!
//! So a connection costs its `quinn_proto::Connection`, its relay, its engine connection
//! and one timer entry: no task, no channel, no lock, no transmit buffer, no descriptor of
//! its own.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mio::{Events, Interest, Poll, Token};
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Dir, Endpoint, Event, ServerConfig, StreamEvent, Transmit,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::relay::{EngineIo, EngineSide, Outcome, Relay};
use crate::cluster::StreamKind;
use crate::engine::{ConnKey, DriverId, Engine, PendingHandoff};

/// Readiness events taken from epoll per turn.
const EVENTS_PER_TURN: usize = 1024;
/// Largest UDP payload received (quinn-proto's default maximum).
const MAX_UDP_PAYLOAD: usize = 1472;
/// `recvmmsg` calls per turn before other tasks get a go.
const RECV_BUDGET: usize = 16;
/// Datagrams per GSO send (quinn's own cap).
const MAX_GSO_SEGMENTS: usize = 10;
/// Bytes read from a socketpair end per `read(2)`.
const SCRATCH: usize = 64 * 1024;
/// How long a closing relay waits for the client to acknowledge the last bytes (a v5
/// DISCONNECT with its reason code, say) before closing the connection.
const LINGER: Duration = Duration::from_secs(2);
/// How long a stopping worker gives its QUIC connections to close cleanly.
const DRAIN: Duration = Duration::from_secs(2);
const UDP: Token = Token(usize::MAX);
/// Rounds of "drive the dirty connections" per turn before other tasks get a go.
const DIRTY_ROUNDS: usize = 8;
/// What a QUIC connection's transport state costs, for the engine's accountant: the
/// boxed `quinn_proto::Connection` with its 1-RTT keys, stream maps and CIDs, plus the
/// relay and timer entry (the vendored quinn-proto drops the rustls session after the
/// handshake, and an idle connection keeps no sent-packet tracking or drained queues).
/// Measured (docs/PERFORMANCE.md, 2026-12-04): RSS 11.9 KB per idle QUIC connection, of
/// which ~0.5 KB is the engine connection the accountant already counts. An estimate:
/// streams' data in flight is not included (bounded by the windows, as a TCP socket's
/// kernel buffers are not counted either).
pub const QUIC_CONNECTION_BYTES: u32 = 11_400;
/// No engine connection in `Driver::by_key`.
const NO_CONN: u32 = u32::MAX;

/// What the worker wants from its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// New connections are refused; existing ones carry on.
    NotAccepting,
    /// Wait (≤ [`DRAIN`]) for the connections to close, close the rest, and return.
    Draining,
}

/// Where a connection is in its life.
enum Stage {
    /// Handshake, then waiting for the control stream (until the deadline).
    Opening {
        deadline: Instant,
    },
    Relaying(Box<Relay>),
    /// The engine closed: streams finished, waiting for the client to acknowledge the
    /// control stream (until the deadline), then the QUIC close.
    Lingering {
        control: quinn_proto::StreamId,
        deadline: Instant,
    },
    /// Closed by us or the peer; kept until quinn-proto says it is drained.
    Closed,
}

struct Conn {
    quic: quinn_proto::Connection,
    stage: Stage,
    /// The entry this connection has in the timer set.
    timer: Option<Instant>,
    /// Already in the driver's list of connections to drive this turn.
    marked: bool,
    /// The last turn that drove it (see `Driver::settle_quiet`).
    driven_turn: u32,
}

pub struct Driver {
    /// This driver's id with the engine.
    id: DriverId,
    endpoint: Endpoint,
    server_config: Arc<ServerConfig>,
    poll: Poll,
    events: Events,
    socket: mio::net::UdpSocket,
    udp: quinn_udp::UdpSocketState,
    local_addr: SocketAddr,
    /// Indexed by `ConnectionHandle` (quinn-proto reuses its indices, so this stays dense).
    conns: Vec<Option<Box<Conn>>>,
    timers: BTreeSet<(Instant, usize)>,
    marked: Vec<usize>,
    /// Turns so far (wrapping): tells whether a connection was driven in this one.
    turn: u32,
    /// Connections driven this turn, and those driven in the previous one: a connection of
    /// the previous turn not driven again in this one has gone quiet, and gives back the
    /// memory an idle connection need not keep (`release_idle_memory`). Deferred by a turn
    /// so that a busy connection does not free and reallocate its queues every turn.
    driven: Vec<usize>,
    settle: Vec<usize>,
    recv_buf: Box<[u8]>,
    recv_slot: usize,
    send_buf: Vec<u8>,
    scratch: Box<[u8]>,
    /// Client bytes for the engine (`Engine::prepare_read`/`handle_read`).
    feed: BytesMut,
    /// Engine connection key → index in `conns`, for connections served directly.
    by_key: Vec<u32>,
    dirty: Vec<ConnKey>,
    max_gso: usize,
    /// The last `recvmmsg` batch was full: more datagrams are probably waiting.
    recv_more: bool,
    /// False once the worker stops: a connection that opens its control stream only then
    /// is closed instead of becoming an engine connection of a worker shutting down.
    accepting: bool,
}

impl Driver {
    /// Hands `conn`'s endpoint events to the endpoint; true if any came back to it.
    fn endpoint_events(&mut self, conn: &mut Conn, index: usize) -> bool {
        let mut more = false;
        while let Some(event) = conn.quic.poll_endpoint_events() {
            if let Some(event) = self.endpoint.handle_event(ConnectionHandle(index), event) {
                conn.quic.handle_event(event);
                more = true;
            }
        }
        more
    }

    /// Sends every datagram `conn` has ready, through the shared transmit buffer.
    fn transmit(&mut self, conn: &mut Conn, now: Instant) {
        loop {
            self.send_buf.clear();
            let Some(transmit) = conn
                .quic
                .poll_transmit(now, self.max_gso, &mut self.send_buf)
            else {
                break;
            };
            self.send(&transmit);
        }
    }

    pub(super) fn new(
        endpoint: Endpoint,
        server_config: Arc<ServerConfig>,
        socket: std::net::UdpSocket,
        id: DriverId,
    ) -> io::Result<Driver> {
        socket.set_nonblocking(true)?;
        let local_addr = socket.local_addr()?;
        let udp = quinn_udp::UdpSocketState::new((&socket).into())?;
        let mut socket = mio::net::UdpSocket::from_std(socket);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut socket, UDP, Interest::READABLE)?;
        let recv_slot = (udp.gro_segments().max(1) * MAX_UDP_PAYLOAD).min(64 * 1024);
        let max_gso = udp.max_gso_segments().clamp(1, MAX_GSO_SEGMENTS);
        Ok(Driver {
            id,
            endpoint,
            server_config,
            poll,
            events: Events::with_capacity(EVENTS_PER_TURN),
            socket,
            udp,
            local_addr,
            conns: Vec::new(),
            timers: BTreeSet::new(),
            marked: Vec::new(),
            turn: 0,
            driven: Vec::new(),
            settle: Vec::new(),
            recv_buf: vec![0; recv_slot * quinn_udp::BATCH_SIZE].into_boxed_slice(),
            recv_slot,
            send_buf: Vec::with_capacity(max_gso * MAX_UDP_PAYLOAD),
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            feed: BytesMut::with_capacity(SCRATCH),
            by_key: Vec::new(),
            dirty: Vec::new(),
            max_gso,
            recv_more: false,
            accepting: true,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until told to drain (see [`Phase`]) and the connections are gone.
    pub async fn run(
        mut self,
        engine: std::rc::Rc<std::cell::RefCell<Engine>>,
        mut phase: watch::Receiver<Phase>,
    ) {
        let fd = EpollFd(self.poll.as_raw_fd());
        // SAFETY: the descriptor belongs to `self.poll`, which outlives `epoll` (declared
        // after `self`, dropped first) and is never replaced.
        let epoll =
            match unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
                Ok(epoll) => epoll,
                Err(e) => return tracing::error!("QUIC driver: registering epoll: {e}"),
            };
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        let mut phase_open = true;
        loop {
            self.turn(&engine);
            if drain_deadline.is_some() && self.conns.iter().all(Option::is_none) {
                return;
            }
            if self.recv_more {
                tokio::task::yield_now().await;
                continue;
            }
            let next_timer = self
                .timers
                .first()
                .map(|&(at, _)| tokio::time::Instant::from_std(at));
            tokio::select! {
                ready = epoll.readable() => match ready {
                    // Cleared before epoll is polled, so events arriving meanwhile wake us.
                    Ok(mut guard) => guard.clear_ready(),
                    Err(e) => return tracing::error!("QUIC driver: epoll: {e}"),
                },
                _ = sleep_until(next_timer), if next_timer.is_some() => {}
                _ = std::future::poll_fn(|cx| engine.borrow().poll_dirty(self.id, cx)) => {}
                changed = phase.changed(), if phase_open => {
                    if changed.is_err() {
                        phase_open = false;
                        continue;
                    }
                    let now = *phase.borrow_and_update();
                    if now != Phase::Serving {
                        self.endpoint.set_server_config(None);
                        self.accepting = false;
                    }
                    if now == Phase::Draining && drain_deadline.is_none() {
                        drain_deadline = Some(tokio::time::Instant::now() + DRAIN);
                    }
                }
                _ = sleep_until(drain_deadline), if drain_deadline.is_some() => {
                    self.close_all(&engine);
                    return;
                }
            }
        }
    }

    /// One batch: readiness, datagrams, timers, then every connection that had something.
    fn turn(&mut self, engine: &std::rc::Rc<std::cell::RefCell<Engine>>) {
        self.events.clear();
        if let Err(e) = self.poll.poll(&mut self.events, Some(Duration::ZERO)) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!("QUIC driver: epoll_wait: {e}");
            }
        }
        let mut udp_ready = self.recv_more;
        for event in self.events.iter() {
            match event.token() {
                UDP => udp_ready = true,
                Token(index) => {
                    if let Some(conn) = self.conns.get_mut(index).and_then(Option::as_mut) {
                        if let Stage::Relaying(relay) = &mut conn.stage {
                            if event.is_readable() || event.is_read_closed() || event.is_error() {
                                relay.engine_readable = true;
                            }
                            if event.is_writable() || event.is_write_closed() || event.is_error() {
                                relay.engine_writable = true;
                            }
                        }
                        mark(&mut self.marked, conn, index);
                    }
                }
            }
        }
        let now = Instant::now();
        if udp_ready {
            self.receive(now, engine);
        }
        while let Some(&(at, index)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if let Some(conn) = self.conns.get_mut(index).and_then(Option::as_mut) {
                conn.timer = None;
                mark(&mut self.marked, conn, index);
            }
        }
        for _ in 0..DIRTY_ROUNDS {
            self.mark_dirty(engine);
            if self.marked.is_empty() {
                break;
            }
            let mut marked = std::mem::take(&mut self.marked);
            for &index in &marked {
                self.drive(index, now, engine);
            }
            marked.clear();
            self.marked = marked;
        }
        self.settle_quiet();
        self.turn = self.turn.wrapping_add(1);
    }

    /// The connections driven in the previous turn and not in this one have gone quiet:
    /// they drop what an idle connection need not keep (quinn-proto's tracking of ACK-only
    /// packets the client may never acknowledge, ~1.1 KB, and drained queues; the relay's
    /// empty queues).
    fn settle_quiet(&mut self) {
        for &index in &self.settle {
            let Some(conn) = self.conns.get_mut(index).and_then(Option::as_mut) else {
                continue;
            };
            if conn.driven_turn == self.turn {
                continue;
            }
            conn.quic.release_idle_memory();
            if let Stage::Relaying(relay) = &mut conn.stage {
                relay.release_idle_memory();
            }
        }
        self.settle.clear();
        std::mem::swap(&mut self.settle, &mut self.driven);
    }

    /// Marks the connections the engine gave output or a close since the last call.
    fn mark_dirty(&mut self, engine: &std::rc::Rc<std::cell::RefCell<Engine>>) {
        engine.borrow_mut().take_dirty(self.id, &mut self.dirty);
        for &key in &self.dirty {
            let index = self.by_key.get(key).copied().unwrap_or(NO_CONN);
            if index == NO_CONN {
                continue;
            }
            if let Some(conn) = self.conns.get_mut(index as usize).and_then(Option::as_mut) {
                mark(&mut self.marked, conn, index as usize);
            }
        }
    }

    /// Receives up to [`RECV_BUDGET`] batches of datagrams and hands each to the endpoint.
    fn receive(&mut self, now: Instant, engine: &std::rc::Rc<std::cell::RefCell<Engine>>) {
        self.recv_more = false;
        let mut metas = [quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
        for _ in 0..RECV_BUDGET {
            let mut recv_buf = std::mem::take(&mut self.recv_buf);
            let received = {
                let mut iovs: Vec<io::IoSliceMut<'_>> = recv_buf
                    .chunks_mut(self.recv_slot)
                    .map(io::IoSliceMut::new)
                    .collect();
                self.udp.recv((&self.socket).into(), &mut iovs, &mut metas)
            };
            let count = match received {
                Ok(count) => count,
                Err(e) => {
                    self.recv_buf = recv_buf;
                    if e.kind() != io::ErrorKind::WouldBlock
                        && e.kind() != io::ErrorKind::Interrupted
                    {
                        tracing::debug!("QUIC driver: recv: {e}");
                    }
                    return;
                }
            };
            for (meta, slot) in metas[..count].iter().zip(recv_buf.chunks(self.recv_slot)) {
                let stride = meta.stride.max(1);
                for datagram in slot[..meta.len].chunks(stride) {
                    self.datagram(now, meta, datagram, engine);
                }
            }
            self.recv_buf = recv_buf;
            if count < quinn_udp::BATCH_SIZE {
                return;
            }
        }
        self.recv_more = true;
    }

    fn datagram(
        &mut self,
        now: Instant,
        meta: &quinn_udp::RecvMeta,
        datagram: &[u8],
        engine: &std::rc::Rc<std::cell::RefCell<Engine>>,
    ) {
        let ecn = meta
            .ecn
            .and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8));
        self.send_buf.clear();
        let event = self.endpoint.handle(
            now,
            meta.addr,
            meta.dst_ip,
            ecn,
            BytesMut::from(datagram),
            &mut self.send_buf,
        );
        match event {
            None => {}
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                if let Some(conn) = self.conns.get_mut(handle.0).and_then(Option::as_mut) {
                    conn.quic.handle_event(event);
                    mark(&mut self.marked, conn, handle.0);
                }
            }
            Some(DatagramEvent::Response(transmit)) => self.send(&transmit),
            Some(DatagramEvent::NewConnection(incoming)) => {
                self.send_buf.clear();
                let config = Some(self.server_config.clone());
                match self
                    .endpoint
                    .accept(incoming, now, &mut self.send_buf, config)
                {
                    Ok((handle, quic)) => {
                        let deadline = now + engine.borrow().config().limits.connect_timeout();
                        let index = handle.0;
                        if self.conns.len() <= index {
                            self.conns.resize_with(index + 1, || None);
                        }
                        let conn = self.conns[index].insert(Box::new(Conn {
                            quic,
                            stage: Stage::Opening { deadline },
                            timer: None,
                            marked: false,
                            driven_turn: self.turn.wrapping_sub(1),
                        }));
                        mark(&mut self.marked, conn, index);
                    }
                    Err(e) => {
                        tracing::debug!("QUIC handshake refused: {}", e.cause);
                        if let Some(transmit) = e.response {
                            self.send(&transmit);
                        }
                    }
                }
            }
        }
    }

    /// Sends what `send_buf` holds for `transmit`. A full socket buffer drops it: QUIC's
    /// loss recovery resends, as for a datagram lost on the way.
    fn send(&self, transmit: &Transmit) {
        let udp_transmit = quinn_udp::Transmit {
            destination: transmit.destination,
            ecn: transmit
                .ecn
                .and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
            contents: &self.send_buf[..transmit.size],
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        };
        if let Err(e) = self.udp.try_send((&self.socket).into(), &udp_transmit) {
            tracing::debug!("QUIC driver: send: {e}");
        }
    }

    /// Everything one connection has to do now.
    fn drive(
        &mut self,
        index: usize,
        now: Instant,
        engine: &std::rc::Rc<std::cell::RefCell<Engine>>,
    ) {
        let Some(mut conn) = self.conns.get_mut(index).and_then(Option::take) else {
            return;
        };
        conn.marked = false;
        if conn.driven_turn != self.turn {
            conn.driven_turn = self.turn;
            self.driven.push(index);
        }
        if conn.quic.poll_timeout().is_some_and(|at| at <= now) {
            conn.quic.handle_timeout(now);
        }
        // Until quinn-proto has nothing more to say: application events and the relay's
        // turn, endpoint events (which may answer with connection events), transmits.
        loop {
            self.stage_events(&mut conn, now);
            self.advance(&mut conn, index, now, engine);
            let mut more = false;
            more |= self.endpoint_events(&mut conn, index);
            self.transmit(&mut conn, now);
            // Transmitting can emit endpoint events too (new connection ids, say).
            more |= self.endpoint_events(&mut conn, index);
            if !more {
                break;
            }
        }
        if conn.quic.is_drained() {
            if let Some(at) = conn.timer.take() {
                self.timers.remove(&(at, index));
            }
            // The relay (and its socketpair end, or its engine connection) goes with it.
            self.release(&mut conn, now, engine);
            return;
        }
        let stage_deadline = match &conn.stage {
            Stage::Opening { deadline } | Stage::Lingering { deadline, .. } => Some(*deadline),
            Stage::Relaying(relay) => relay.wake_at(),
            _ => None,
        };
        let wake = match (conn.quic.poll_timeout(), stage_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if wake != conn.timer {
            if let Some(at) = conn.timer.take() {
                self.timers.remove(&(at, index));
            }
            if let Some(at) = wake {
                self.timers.insert((at, index));
            }
            conn.timer = wake;
        }
        self.conns[index] = Some(conn);
    }

    /// Application events from quinn-proto, applied to the connection's stage.
    fn stage_events(&mut self, conn: &mut Conn, now: Instant) {
        while let Some(event) = conn.quic.poll() {
            match (&mut conn.stage, event) {
                (Stage::Relaying(relay), Event::ConnectionLost { reason }) => {
                    tracing::debug!("QUIC connection ended: {reason}");
                    relay.client_gone();
                }
                // A stream the client stopped fails at the relay's next write to it, as
                // with quinn: a publisher that stopped reading its control stream, say,
                // loses its session only when the engine has something to tell it.
                (
                    Stage::Lingering { control, .. },
                    Event::Stream(StreamEvent::Finished { id } | StreamEvent::Stopped { id, .. }),
                ) if id == *control => {
                    conn.quic.close(now, 0u32.into(), Bytes::new());
                    conn.stage = Stage::Closed;
                }
                (
                    Stage::Lingering { .. } | Stage::Opening { .. },
                    Event::ConnectionLost { reason },
                ) => {
                    tracing::debug!("QUIC connection ended: {reason}");
                    conn.stage = Stage::Closed;
                }
                _ => {}
            }
        }
    }

    /// Opening → relaying once the control stream is there; the relay's turn; the close.
    fn advance(
        &mut self,
        conn: &mut Conn,
        index: usize,
        now: Instant,
        engine: &std::rc::Rc<std::cell::RefCell<Engine>>,
    ) {
        if let Stage::Opening { deadline } = conn.stage {
            let control = if conn.quic.is_handshaking() {
                None
            } else {
                conn.quic.streams().accept(Dir::Bi)
            };
            match control {
                Some(_) if !self.accepting => {
                    conn.quic
                        .close(now, 0u32.into(), Bytes::from_static(b"shutting down"));
                    conn.stage = Stage::Closed;
                }
                Some(control) => {
                    let relay = self.direct_relay(conn, index, control, now, engine);
                    conn.stage = Stage::Relaying(Box::new(relay));
                }
                None if now >= deadline => {
                    // A client that never opens a stream is dropped like a TCP client that
                    // never sends CONNECT.
                    tracing::debug!("QUIC connection opened no stream in time");
                    conn.quic
                        .close(now, 0u32.into(), Bytes::from_static(b"no stream opened"));
                    conn.stage = Stage::Closed;
                }
                None => {}
            }
        }
        if let Stage::Lingering { deadline, .. } = conn.stage {
            if now >= deadline {
                conn.quic.close(now, 0u32.into(), Bytes::new());
                conn.stage = Stage::Closed;
            }
        }
        let Stage::Relaying(relay) = &mut conn.stage else {
            return;
        };
        let outcome = loop {
            let outcome = {
                let mut engine = engine.borrow_mut();
                let mut io = EngineIo {
                    engine: &mut engine,
                    feed: &mut self.feed,
                    scratch: &mut self.scratch,
                    now,
                };
                relay.turn(&mut conn.quic, &mut io)
            };
            match outcome {
                None => return,
                Some(Outcome::HandOff(handoff)) => {
                    if !self.hand_off(relay, index, handoff, now, engine) {
                        conn.quic
                            .close(now, 0u32.into(), Bytes::from_static(b"server busy"));
                        conn.stage = Stage::Closed;
                        return;
                    }
                }
                Some(outcome) => break outcome,
            }
        };
        if relay.dropped_qos0 > 0 {
            let dropped = relay.dropped_qos0;
            tracing::debug!(dropped, "QoS 0 messages dropped for full QUIC data streams");
        }
        if let Some(socket) = relay.socket() {
            let _ = self.poll.registry().deregister(socket);
        }
        if let Some(key) = relay.direct_key() {
            // As the TCP reactor closing a socket: the engine frees the connection and
            // publishes the will if one is due.
            self.forget_key(key);
            engine.borrow_mut().connection_lost(key, now);
        }
        match outcome {
            Outcome::EngineClosed => {
                relay.finish_streams(&mut conn.quic);
                // Closing the connection discards unsent stream data: wait (bounded) until
                // the client has acknowledged the control stream's last bytes.
                match relay.control() {
                    Some(control) if !conn.quic.is_closed() => {
                        conn.stage = Stage::Lingering {
                            control,
                            deadline: now + LINGER,
                        };
                    }
                    _ => {
                        conn.quic.close(now, 0u32.into(), Bytes::new());
                        conn.stage = Stage::Closed;
                    }
                }
            }
            Outcome::ClientGone | Outcome::HandOff(_) => {
                // Dropping a socketpair end (with the stage): the engine reads EOF, as from
                // a TCP peer that went away, and publishes the will if one is due.
                conn.quic.close(now, 0u32.into(), Bytes::new());
                conn.stage = Stage::Closed;
            }
        }
    }

    /// The control stream is open: an engine connection served directly by the relay.
    fn direct_relay(
        &mut self,
        conn: &Conn,
        index: usize,
        control: quinn_proto::StreamId,
        now: Instant,
        engine: &std::rc::Rc<std::cell::RefCell<Engine>>,
    ) -> Relay {
        let peer = conn.quic.remote_address().ip();
        let mut engine = engine.borrow_mut();
        let key = engine.accept(self.id, now, Some(peer));
        engine.set_transport_bytes(key, QUIC_CONNECTION_BYTES);
        let max_packet_size = engine.config().limits.max_packet_size;
        if self.by_key.len() <= key {
            self.by_key.resize(key + 1, NO_CONN);
        }
        self.by_key[key] = index as u32;
        let side = EngineSide::Direct {
            key,
            paused_until: None,
        };
        Relay::new(side, control, max_packet_size)
    }

    /// The engine found that the client id lives on another worker: a socketpair, one end
    /// to that worker (with the bytes read so far, over the cluster like a TCP handoff),
    /// the other kept by the relay from now on. False if the connection must be dropped.
    fn hand_off(
        &mut self,
        relay: &mut Relay,
        index: usize,
        handoff: PendingHandoff,
        now: Instant,
        engine: &std::rc::Rc<std::cell::RefCell<Engine>>,
    ) -> bool {
        let Some(key) = relay.direct_key() else {
            return false;
        };
        let pair = std::os::unix::net::UnixStream::pair().and_then(|(ours, theirs)| {
            ours.set_nonblocking(true)?;
            theirs.set_nonblocking(true)?;
            let mut ours = mio::net::UnixStream::from_std(ours);
            self.poll.registry().register(
                &mut ours,
                Token(index),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok((ours, theirs))
        });
        let mut engine = engine.borrow_mut();
        let (ours, theirs) = match pair {
            Ok(pair) => pair,
            Err(e) => {
                // Most likely EMFILE: refuse this one client, as a failed accept would.
                tracing::warn!("QUIC handoff socketpair: {e}");
                engine.stats.accept_errors += 1;
                self.forget_key(key);
                engine.connection_lost(key, now);
                return false;
            }
        };
        // The relayed stream carries plain MQTT bytes: the other worker reads it as TCP.
        match engine.hand_off(handoff, StreamKind::Mqtt, OwnedFd::from(theirs)) {
            Ok(()) => {
                self.forget_key(key);
                relay.switch_to_socket(ours);
            }
            Err(_theirs) => {
                // The engine refused the client instead (a CONNACK saying why), which the
                // relay flushes directly.
                let mut ours = ours;
                let _ = self.poll.registry().deregister(&mut ours);
            }
        }
        true
    }

    fn forget_key(&mut self, key: ConnKey) {
        if let Some(slot) = self.by_key.get_mut(key) {
            *slot = NO_CONN;
        }
    }

    /// A connection leaves the driver: a direct one's engine connection is lost with it.
    fn release(
        &mut self,
        conn: &mut Conn,
        now: Instant,
        engine: &std::rc::Rc<std::cell::RefCell<Engine>>,
    ) {
        if let Stage::Relaying(relay) = &conn.stage {
            if let Some(key) = relay.direct_key() {
                self.forget_key(key);
                engine.borrow_mut().connection_lost(key, now);
            }
        }
    }

    /// The drain deadline passed: close what is left, and send the closes.
    fn close_all(&mut self, engine: &std::rc::Rc<std::cell::RefCell<Engine>>) {
        let now = Instant::now();
        for index in 0..self.conns.len() {
            let Some(mut conn) = self.conns[index].take() else {
                continue;
            };
            self.release(&mut conn, now, engine);
            conn.quic
                .close(now, 0u32.into(), Bytes::from_static(b"shutdown"));
            self.transmit(&mut conn, now);
        }
    }
}

fn mark(marked: &mut Vec<usize>, conn: &mut Conn, index: usize) {
    if !conn.marked {
        conn.marked = true;
        marked.push(index);
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The epoll descriptor, as tokio needs it.
struct EpollFd(RawFd);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}
