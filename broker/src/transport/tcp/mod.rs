//! MQTT over TCP: one readiness loop per worker over all its connections.
//!
//! Connections are not tokio tasks. The worker owns one `mio::Poll` (an epoll instance)
//! holding the listener and every socket, and registers only that epoll descriptor with
//! tokio. One task reacts to it: it accepts, reads each readable socket into one
//! per-worker scratch buffer, hands the bytes to the engine, then writes every connection
//! the engine marked dirty, once each. So an idle connection costs a socket descriptor and
//! the engine's own state, nothing more (no task, no waker, no buffers), and a burst of
//! messages to one subscriber leaves in one `write(2)`.
//!
//! The same loop serves the TLS, WebSocket and WebSocket-over-TLS listeners (one reactor
//! per listener, each a driver of its own): there each connection also has its
//! [`Layers`], which turn socket bytes into MQTT bytes and back between the socket and the
//! engine. A layered connection whose client id lives on another worker stays here and is
//! relayed ([`super::relay`]): its TLS state cannot move to another process.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use tokio::io::unix::AsyncFd;

mod layered;

use super::layer::{Framing, LayerFactory, Layers};
use crate::cluster::StreamKind;
use crate::engine::{ConnKey, DriverId, Engine};

/// Bytes read per `read(2)`: many small packets per syscall.
const READ_CHUNK: usize = 64 * 1024;
/// Reads per connection per turn before the others get theirs (fairness under load).
const READ_BUDGET: usize = 8;
/// Readiness events taken from epoll per turn.
const EVENTS_PER_TURN: usize = 1024;
/// Pause before accepting again after an error such as EMFILE, so the loop never spins.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a shutdown waits for connections to flush their DISCONNECT.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// Input a closed connection may still send (read and discarded) after its last bytes
/// were flushed and its write side shut down, and for how long.
const LINGER_MAX_BYTES: usize = 1024 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(2);
/// Epoll tokens from here up are lingering sockets (by linger id), not connections.
const LINGER_BASE: usize = 1 << 48;
const LISTENER: Token = Token(usize::MAX);

pub struct TcpReactor {
    poll: Poll,
    events: Events,
    listener: Option<TcpListener>,
    /// Sockets by engine connection key.
    streams: Vec<Option<TcpStream>>,
    /// What this listener puts between socket and MQTT (nothing for plain TCP).
    factory: LayerFactory,
    /// Each connection's layers, by engine connection key (empty for plain TCP).
    layers: Vec<Option<Box<Layers>>>,
    /// Layered listeners' scratch space: socket bytes read, bytes between TLS and
    /// WebSocket, bytes encoded for the socket.
    raw: BytesMut,
    mid: BytesMut,
    encoded: BytesMut,
    engine: Rc<RefCell<Engine>>,
    /// This reactor's id with the engine.
    driver: DriverId,
    scratch: BytesMut,
    /// Connections that used up their read budget and may have more to read.
    unfinished_reads: Vec<ConnKey>,
    dirty: Vec<ConnKey>,
    accept_paused_until: Option<Instant>,
    /// Throttled connections (over their publish rate) and when to read them again.
    paused_reads: Vec<(Instant, ConnKey)>,
    /// Sockets of closed connections, write side shut down after their last bytes, whose
    /// input is drained before they are dropped. Dropping a socket while the client's bytes
    /// sit unread in it sends RST, and the client could lose the DISCONNECT it has not
    /// read yet; so input is read and discarded until EOF, `LINGER_MAX_BYTES` or
    /// `LINGER_TIME`. The engine is told the connection is gone when lingering starts.
    lingering: Vec<Lingering>,
    next_linger_id: usize,
}

struct Lingering {
    id: usize,
    stream: TcpStream,
    discarded: usize,
    until: Instant,
}

/// Why the loop woke up.
enum Wake {
    /// Socket readiness or dirty connections: a plain turn handles both.
    Io,
    AcceptRetry,
    /// A throttled connection's pause ended.
    ResumeReads,
    /// A lingering socket's time is up.
    LingerEnd,
    Shutdown,
    DrainDeadline,
}

/// The epoll descriptor, as tokio needs it.
struct EpollFd(RawFd);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl TcpReactor {
    /// A reactor for `listener`, whose connections get the layers `factory` makes.
    pub fn new(
        listener: std::net::TcpListener,
        engine: Rc<RefCell<Engine>>,
        factory: LayerFactory,
    ) -> io::Result<TcpReactor> {
        let poll = Poll::new()?;
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        // Plain MQTT byte streams handed over by other workers are served by the plain
        // listener: TCP sockets, and the worker ends of QUIC, TLS and WebSocket relays.
        let adopts: &[StreamKind] = match factory.framing {
            Framing::Plain => &[StreamKind::Mqtt],
            _ => &[],
        };
        let name = factory.framing.name();
        let driver = engine.borrow_mut().add_driver(name, adopts);
        Ok(TcpReactor {
            poll,
            events: Events::with_capacity(EVENTS_PER_TURN),
            listener: Some(listener),
            streams: Vec::new(),
            factory,
            layers: Vec::new(),
            raw: BytesMut::new(),
            mid: BytesMut::new(),
            encoded: BytesMut::new(),
            engine,
            driver,
            scratch: BytesMut::with_capacity(READ_CHUNK),
            unfinished_reads: Vec::new(),
            dirty: Vec::new(),
            accept_paused_until: None,
            paused_reads: Vec::new(),
            lingering: Vec::new(),
            next_linger_id: 0,
        })
    }

    /// Serves until `shutdown` resolves; then tells every client (v5: DISCONNECT 0x8B),
    /// flushes, and returns once all connections are closed or the drain deadline passed.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let fd = EpollFd(self.poll.as_raw_fd());
        // SAFETY: the descriptor belongs to `self.poll`, which outlives this local (a
        // parameter is dropped after the function's locals) and is never replaced.
        let epoll = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        tokio::pin!(shutdown);
        let mut drain_deadline = None;
        loop {
            self.turn();
            // Other drivers' connections are theirs to drain.
            let open = self.engine.borrow().driver_connections(self.driver);
            if drain_deadline.is_some() && open == 0 {
                return Ok(());
            }
            let events_left = self.events.iter().count() == EVENTS_PER_TURN;
            if !self.unfinished_reads.is_empty() || events_left {
                // More work is ready: let other tasks run, then come straight back.
                tokio::task::yield_now().await;
                continue;
            }
            let accept_retry = self.accept_paused_until;
            let resume_at = self.paused_reads.iter().map(|&(at, _)| at).min();
            let linger_end = self.lingering.iter().map(|l| l.until).min();
            let draining = drain_deadline.is_some();
            let deadline = drain_deadline.unwrap_or_else(tokio::time::Instant::now);
            let wake = tokio::select! {
                ready = epoll.readable() => {
                    // Cleared before epoll is polled, so events arriving meanwhile wake us again.
                    ready?.clear_ready();
                    Wake::Io
                }
                _ = poll_fn(|cx| self.engine.borrow().poll_dirty(self.driver, cx)) => Wake::Io,
                _ = sleep_until(accept_retry), if accept_retry.is_some() => Wake::AcceptRetry,
                _ = sleep_until(resume_at), if resume_at.is_some() => Wake::ResumeReads,
                _ = sleep_until(linger_end), if linger_end.is_some() => Wake::LingerEnd,
                _ = &mut shutdown, if !draining => Wake::Shutdown,
                _ = tokio::time::sleep_until(deadline), if draining => Wake::DrainDeadline,
            };
            match wake {
                Wake::Io => {}
                Wake::LingerEnd => {
                    let now = Instant::now();
                    self.lingering.retain(|l| l.until > now);
                }
                Wake::AcceptRetry => {
                    self.accept_paused_until = None;
                    self.accept_all();
                }
                Wake::ResumeReads => {
                    let now = Instant::now();
                    let unfinished = &mut self.unfinished_reads;
                    self.paused_reads.retain(|&(at, key)| {
                        let due = at <= now;
                        if due {
                            unfinished.push(key);
                        }
                        !due
                    });
                }
                Wake::Shutdown => {
                    drain_deadline = Some(tokio::time::Instant::now() + DRAIN_DEADLINE);
                    self.stop_accepting();
                    let open = self.engine.borrow().connection_count();
                    tracing::info!(open, "shutting down: disconnecting clients");
                    self.engine.borrow_mut().shutdown(Instant::now());
                }
                Wake::DrainDeadline => {
                    tracing::warn!("drain deadline passed with connections still open");
                    return Ok(());
                }
            }
        }
    }

    /// One batch: take what epoll has, read and handle it, then write what became dirty.
    fn turn(&mut self) {
        self.adopt_handed_over();
        self.events.clear();
        if let Err(e) = self.poll.poll(&mut self.events, Some(Duration::ZERO)) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!("epoll_wait: {e}");
            }
        }
        let mut to_read = std::mem::take(&mut self.unfinished_reads);
        let mut accept = false;
        let mut lingering = Vec::new();
        for event in self.events.iter() {
            match event.token() {
                LISTENER => accept = true,
                Token(id) if id >= LINGER_BASE => {
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        lingering.push(id - LINGER_BASE);
                    }
                }
                Token(key) => {
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        to_read.push(key);
                    }
                    if event.is_writable() {
                        // Space in the send buffer: retry whatever output is pending.
                        self.dirty.push(key);
                    }
                }
            }
        }
        for id in lingering {
            self.discard_input(id);
        }
        if accept && self.accept_paused_until.is_none() {
            self.accept_all();
        }
        for key in to_read.drain(..) {
            self.read(key);
        }
        self.unfinished_reads.append(&mut to_read);
        self.hand_off_connections();
        self.flush_dirty();
    }

    /// Connections whose client id lives on another worker leave for it, socket and bytes.
    fn hand_off_connections(&mut self) {
        let handoffs = self.engine.borrow_mut().take_handoffs(self.driver);
        for handoff in handoffs {
            let key = handoff.key;
            let Some(mut stream) = self.streams.get_mut(key).and_then(Option::take) else {
                continue;
            };
            let _ = self.poll.registry().deregister(&mut stream);
            if let Some(layers) = self.layers.get_mut(key).and_then(Option::take) {
                match super::relay::hand_off(&self.engine, self.driver, handoff, stream, layers) {
                    Ok(()) => continue,
                    Err((stream, layers)) => {
                        self.install(key, stream);
                        self.layers[key] = Some(layers);
                        continue;
                    }
                }
            }
            let socket = OwnedFd::from(stream);
            let result = self
                .engine
                .borrow_mut()
                .hand_off(handoff, StreamKind::Mqtt, socket);
            if let Err(socket) = result {
                // The engine refused the client instead; keep the socket to flush that.
                self.install(key, TcpStream::from_std(std::net::TcpStream::from(socket)));
            }
        }
    }

    /// Connections other workers handed over: adopted, then fed the bytes already read.
    fn adopt_handed_over(&mut self) {
        let adopted = self.engine.borrow_mut().take_adopted(self.driver);
        for stream in adopted {
            let now = Instant::now();
            // Rate-checked where it arrived: no address for the per-IP connect rate here.
            let key = self.engine.borrow_mut().accept(self.driver, now, None);
            if let Some(identity) = stream.identity {
                self.engine
                    .borrow_mut()
                    .set_peer_identity(key, identity.into());
            }
            let socket = stream.socket;
            self.install(key, TcpStream::from_std(std::net::TcpStream::from(socket)));
            let mut buf = BytesMut::from(&stream.bytes[..]);
            self.engine.borrow_mut().handle_read(key, &mut buf, now);
        }
    }

    /// Registers `stream` with epoll under `key` (closing the connection if that fails).
    fn install(&mut self, key: ConnKey, mut stream: TcpStream) {
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(key), interest)
        {
            tracing::warn!("registering a connection: {e}");
            self.engine
                .borrow_mut()
                .connection_lost(key, Instant::now());
            return;
        }
        if self.streams.len() <= key {
            self.streams.resize_with(key + 1, || None);
        }
        self.streams[key] = Some(stream);
        self.account(key);
    }

    /// Tells the engine's accountant what this loop keeps for `key`.
    fn account(&mut self, key: ConnKey) {
        let mut bytes = std::mem::size_of::<Option<TcpStream>>();
        if let Some(layers) = self.layers.get(key).and_then(Option::as_ref) {
            bytes += std::mem::size_of::<Option<Box<Layers>>>() + layers.footprint();
        }
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        self.engine.borrow_mut().set_transport_bytes(key, bytes);
    }

    fn accept_all(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        let mut accepted = Vec::new();
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    accepted.push((stream, peer));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: epoll will not report the backlog again, so
                    // come back on a timer rather than spin or give up.
                    tracing::warn!("accept failed: {e}; pausing accepts");
                    self.engine.borrow_mut().stats.accept_errors += 1;
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    break;
                }
            }
        }
        let now = Instant::now();
        for (stream, peer) in accepted {
            let key = self
                .engine
                .borrow_mut()
                .accept(self.driver, now, Some(peer.ip()));
            match self.factory.layers() {
                Ok(None) => {}
                Ok(Some(layers)) => {
                    if self.layers.len() <= key {
                        self.layers.resize_with(key + 1, || None);
                    }
                    self.layers[key] = Some(layers);
                }
                Err(e) => {
                    tracing::warn!("TLS state for a new connection: {e}");
                    self.engine.borrow_mut().connection_lost(key, now);
                    continue;
                }
            }
            self.install(key, stream);
        }
    }

    fn stop_accepting(&mut self) {
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
    }

    /// Reads `key` until the socket is drained or the budget is used.
    fn read(&mut self, key: ConnKey) {
        if self.factory.framing != Framing::Plain {
            return self.read_layered(key);
        }
        let mut engine = self.engine.borrow_mut();
        for _ in 0..READ_BUDGET {
            if let Some(until) = engine.read_paused_until(key, Instant::now()) {
                // Over its publish rate: the socket stays unread until the pause ends.
                self.paused_reads.push((until, key));
                return;
            }
            let Some(stream) = self.streams.get_mut(key).and_then(Option::as_mut) else {
                return;
            };
            if engine.is_closing(key) {
                // Unread until its output is flushed (then `linger` drains it).
                return;
            }
            engine.prepare_read(key, &mut self.scratch);
            let result = read_into(stream, &mut self.scratch);
            let now = Instant::now();
            match result {
                Ok(0) => {
                    drop(engine);
                    return self.close(key);
                }
                Ok(_) => engine.handle_read(key, &mut self.scratch, now),
                Err(e) => {
                    // Give any partial packet back to the connection before leaving.
                    engine.handle_read(key, &mut self.scratch, now);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => {
                            if let Some(until) = engine.read_paused_until(key, now) {
                                // Complete packets wait in the connection until the pause ends.
                                self.paused_reads.push((until, key));
                            }
                            return;
                        }
                        io::ErrorKind::Interrupted => continue,
                        _ => {
                            tracing::debug!(conn = key, "read error: {e}");
                            drop(engine);
                            return self.close(key);
                        }
                    }
                }
            }
        }
        self.unfinished_reads.push(key);
    }

    /// Writes each dirty connection's output; closes those the engine is done with.
    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        loop {
            let mut more = Vec::new();
            self.engine.borrow_mut().take_dirty(self.driver, &mut more);
            dirty.append(&mut more);
            if dirty.is_empty() {
                break;
            }
            dirty.sort_unstable();
            dirty.dedup();
            for key in dirty.drain(..) {
                self.flush(key);
            }
        }
        self.dirty = dirty;
    }

    fn flush(&mut self, key: ConnKey) {
        if self.factory.framing != Framing::Plain {
            return self.flush_layered(key);
        }
        let Some(stream) = self.streams.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        let mut engine = self.engine.borrow_mut();
        let mut written = 0;
        let mut failed = false;
        let mut had_output = false;
        if let Some(out) = engine.output(key) {
            had_output = !out.is_empty();
            while !out.is_empty() {
                match stream.write(out) {
                    Ok(0) => {
                        failed = true;
                        break;
                    }
                    Ok(n) => {
                        out.advance(n);
                        written += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!(conn = key, "write error: {e}");
                        failed = true;
                        break;
                    }
                }
            }
        }
        if had_output {
            engine.output_flushed(key, written);
        }
        let drained = engine.output(key).is_none_or(|out| out.is_empty());
        let closing = engine.is_closing(key);
        let abort = engine.should_abort(key);
        let resumed = engine.take_read_resumed(key);
        drop(engine);
        if resumed {
            // Its pause for a destination that was behind ended: read what waited.
            self.unfinished_reads.push(key);
        }
        if failed || (closing && abort) {
            self.close(key);
        } else if closing && drained {
            self.linger(key);
        }
    }

    /// All output of a closing connection is written: the engine is done with it, the
    /// socket sends FIN after the last bytes (the client reads everything, then EOF) and
    /// lingers, draining what the client still sends, before it is dropped.
    fn linger(&mut self, key: ConnKey) {
        let Some(mut stream) = self.streams.get_mut(key).and_then(Option::take) else {
            return;
        };
        if let Some(slot) = self.layers.get_mut(key) {
            *slot = None;
        }
        let id = self.next_linger_id;
        let token = Token(LINGER_BASE + id);
        let lingers = stream.shutdown(std::net::Shutdown::Write).is_ok()
            && self
                .poll
                .registry()
                .reregister(&mut stream, token, Interest::READABLE)
                .is_ok();
        if lingers {
            self.next_linger_id += 1;
            self.lingering.push(Lingering {
                id,
                stream,
                discarded: 0,
                until: Instant::now() + LINGER_TIME,
            });
            // Epoll is edge-triggered: input that arrived while the output was flushing
            // raised no new event, so drain it now.
            self.discard_input(id);
        } else {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        self.engine
            .borrow_mut()
            .connection_lost(key, Instant::now());
    }

    /// Reads and drops a lingering socket's input (all there is: epoll is edge-triggered);
    /// drops the socket at EOF, on an error or past `LINGER_MAX_BYTES`.
    fn discard_input(&mut self, id: usize) {
        let Some(at) = self.lingering.iter().position(|l| l.id == id) else {
            return;
        };
        let l = &mut self.lingering[at];
        let done = loop {
            self.scratch.clear();
            match read_into(&mut l.stream, &mut self.scratch) {
                Ok(0) => break true,
                Ok(n) => {
                    l.discarded += n;
                    if l.discarded > LINGER_MAX_BYTES {
                        tracing::debug!("dropping a closed connection still sending");
                        break true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        self.scratch.clear();
        if done {
            // Dropping the stream closes it (and takes it out of epoll).
            self.lingering.swap_remove(at);
        }
    }

    /// Drops the socket and tells the engine (which publishes a will if one is due).
    fn close(&mut self, key: ConnKey) {
        if let Some(mut stream) = self.streams.get_mut(key).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        if let Some(slot) = self.layers.get_mut(key) {
            *slot = None;
        }
        self.engine
            .borrow_mut()
            .connection_lost(key, Instant::now());
    }
}

/// One `read(2)` appended to `buf`'s spare capacity.
fn read_into(stream: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    buf.reserve(READ_CHUNK);
    let spare = buf.spare_capacity_mut();
    // SAFETY: `read` on a socket only writes into the slice (it never reads it), and the
    // length is advanced by exactly the number of bytes the kernel wrote.
    let slice =
        unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<u8>(), spare.len()) };
    let n = stream.read(slice)?;
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}
