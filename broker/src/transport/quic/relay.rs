//! One QUIC connection's relay: moves MQTT bytes between the client's QUIC streams (in a
//! `quinn_proto::Connection`) and the engine.
//!
//! The engine side is either the engine itself ([`EngineSide::Direct`]: the client id lives
//! on this worker; client packets go to `Engine::handle_read`, `Engine::output` is taken
//! straight into the streams), or a socketpair end ([`EngineSide::Socket`]) whose other end
//! was handed to the worker holding the client id, whose TCP reactor serves it like any
//! TCP socket. A connection starts direct and switches to a socketpair only for that
//! handoff.
//!
//! No task and no waker: the driver ([`super::driver`]) calls [`Relay::turn`] whenever the
//! connection had an event (datagram, timer), its engine connection became dirty, or the
//! socketpair end became ready, and each turn moves whatever is ready in every direction.
//! An idle relay holds no buffers (the queues are empty and unallocated).
//!
//! Each direction is bounded by [`QUEUE_CAP`]: past it the relay stops reading that
//! direction's source, and back-pressure reaches the client (QUIC flow control) or the
//! engine (its output stays in the connection, which the engine's budget sees, or a full
//! socketpair) as it would over TCP.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use quinn_proto::{Connection, Dir, ReadError, StreamId, WriteError};

use crate::engine::{ConnKey, Engine, PendingHandoff};

use super::mux::{packets, Framer, Mux, StreamNo, CONTROL};

/// Bytes queued per direction before the relay stops reading that direction's source
/// (towards the client: per stream; see [`Relay::dispatch`] for what happens beyond it).
const QUEUE_CAP: usize = 256 * 1024;
/// Bytes queued towards the client over all streams before the relay stops reading the
/// engine's output.
const QUEUE_CAP_ALL_STREAMS: usize = 4 * QUEUE_CAP;
/// Largest chunk taken from a client stream at once.
const READ_CHUNK: usize = 64 * 1024;
/// Chunks written to the socketpair per `writev(2)`.
const IOV_MAX: usize = 64;

/// One client stream (the control stream or a data stream).
struct Flow {
    no: StreamNo,
    id: StreamId,
    /// The client has not finished (or reset) its side yet.
    recv_open: bool,
    framer: Framer,
    /// Packets from the engine for this stream, not yet taken by quinn-proto.
    out: VecDeque<Bytes>,
    out_bytes: usize,
    /// Writing failed (stream stopped by the client, connection gone).
    broken: bool,
}

impl Flow {
    fn new(no: StreamNo, id: StreamId) -> Flow {
        Flow {
            no,
            id,
            recv_open: true,
            framer: Framer::default(),
            out: VecDeque::new(),
            out_bytes: 0,
            broken: false,
        }
    }

    fn queue(&mut self, bytes: Bytes) {
        if !bytes.is_empty() && !self.broken {
            self.out_bytes += bytes.len();
            self.out.push_back(bytes);
        }
    }
}

/// How a relay ended, or must change.
#[derive(Debug)]
pub(super) enum Outcome {
    /// The engine closed its end (DISCONNECT, takeover, protocol error, keep-alive...).
    EngineClosed,
    /// The client is gone or finished its control stream.
    ClientGone,
    /// Direct only: the client id lives on worker `to`; the driver hands it a socketpair
    /// end with `bytes` (everything read so far) and calls [`Relay::switch_to_socket`].
    HandOff(PendingHandoff),
}

/// Where the relay's engine side is.
pub(super) enum EngineSide {
    /// This worker's engine connection `key`.
    Direct {
        key: ConnKey,
        /// Over its publish rate (throttle): client bytes wait until then.
        paused_until: Option<Instant>,
    },
    /// The relay's end of a socketpair; the engine of the client id's worker has the other.
    Socket(mio::net::UnixStream),
}

/// What a turn needs from the driver: the engine (direct side) and its buffers.
pub(super) struct EngineIo<'a> {
    pub(super) engine: &'a mut Engine,
    /// The driver's buffer for feeding the engine (see `Engine::prepare_read`).
    pub(super) feed: &'a mut BytesMut,
    /// The driver's buffer for reading a socketpair end.
    pub(super) scratch: &'a mut [u8],
    pub(super) now: Instant,
}

pub(super) struct Relay {
    engine_side: EngineSide,
    /// Edge-triggered readiness of a socketpair `engine_side`, cleared on `WouldBlock`.
    pub(super) engine_readable: bool,
    pub(super) engine_writable: bool,
    /// `flows[0]` is the control stream.
    flows: Vec<Flow>,
    next_no: StreamNo,
    mux: Mux,
    /// Whole packets from the client, interleaved, waiting for the socketpair.
    to_engine: VecDeque<Bytes>,
    to_engine_bytes: usize,
    from_engine: Framer,
    engine_done: bool,
    client_done: bool,
    max_packet_size: u32,
    /// QoS 0 messages dropped for a full data stream (reported when the relay ends).
    pub(super) dropped_qos0: u64,
    /// Direct: the engine gave up on flushing a closing connection (`should_abort`).
    aborted: bool,
    /// Direct: the engine decided to hand the connection to another worker.
    handoff: Option<PendingHandoff>,
}

impl Relay {
    pub(super) fn new(engine_side: EngineSide, control: StreamId, max_packet_size: u32) -> Relay {
        Relay {
            engine_side,
            engine_readable: true,
            engine_writable: true,
            flows: vec![Flow::new(CONTROL, control)],
            next_no: CONTROL + 1,
            mux: Mux::default(),
            to_engine: VecDeque::new(),
            to_engine_bytes: 0,
            from_engine: Framer::default(),
            engine_done: false,
            client_done: false,
            max_packet_size,
            dropped_qos0: 0,
            aborted: false,
            handoff: None,
        }
    }

    /// The socketpair end, when the relay has one.
    pub(super) fn socket(&mut self) -> Option<&mut mio::net::UnixStream> {
        match &mut self.engine_side {
            EngineSide::Socket(socket) => Some(socket),
            EngineSide::Direct { .. } => None,
        }
    }

    /// The engine connection, while the relay is direct.
    pub(super) fn direct_key(&self) -> Option<ConnKey> {
        match self.engine_side {
            EngineSide::Direct { key, .. } => Some(key),
            EngineSide::Socket(_) => None,
        }
    }

    /// Frees the queues' storage once they are empty, so an idle relay holds no buffers
    /// (a drained `VecDeque` keeps its capacity: ~250 B per connection measured). The
    /// driver calls it once the connection has gone quiet (a turn without being driven).
    pub(super) fn release_idle_memory(&mut self) {
        if self.to_engine.is_empty() {
            self.to_engine = VecDeque::new();
        }
        for flow in &mut self.flows {
            if flow.out.is_empty() {
                flow.out = VecDeque::new();
            }
        }
    }

    /// When a throttled direct connection may be fed again (the driver's timer).
    pub(super) fn wake_at(&self) -> Option<Instant> {
        match self.engine_side {
            EngineSide::Direct { paused_until, .. } => paused_until,
            EngineSide::Socket(_) => None,
        }
    }

    /// After a handoff: from now on the engine side is `socket`.
    pub(super) fn switch_to_socket(&mut self, socket: mio::net::UnixStream) {
        self.engine_side = EngineSide::Socket(socket);
        self.engine_readable = true;
        self.engine_writable = true;
    }

    /// The QUIC connection is gone (lost, closed by the client, timed out).
    pub(super) fn client_gone(&mut self) {
        self.client_done = true;
    }

    /// The control stream's id, while the control stream is usable.
    pub(super) fn control(&self) -> Option<StreamId> {
        self.flows
            .first()
            .filter(|f| f.no == CONTROL && !f.broken)
            .map(|f| f.id)
    }

    /// Finishes every stream (the engine is done): the client reads the last bytes, then EOF.
    pub(super) fn finish_streams(&mut self, conn: &mut Connection) {
        for flow in &self.flows {
            let _ = conn.send_stream(flow.id).finish();
        }
    }

    /// Moves whatever is ready, in every direction, until nothing moves; returns how the
    /// relay ended, if it did.
    pub(super) fn turn(&mut self, conn: &mut Connection, io: &mut EngineIo) -> Option<Outcome> {
        loop {
            let mut progress = self.accept_streams(conn);
            progress |= self.read_client(conn);
            if self.direct_key().is_some() {
                progress |= self.feed_engine(io);
                if let Some(handoff) = self.handoff.take() {
                    return Some(Outcome::HandOff(handoff));
                }
                progress |= self.take_output(io);
            } else {
                progress |= self.write_engine();
                progress |= self.read_engine(io.scratch);
            }
            progress |= self.write_client(conn);
            let flushed = self.flows.iter().all(|f| f.out.is_empty() || f.broken);
            if self.engine_done && (flushed || self.aborted) {
                return Some(Outcome::EngineClosed);
            }
            let paused = self.wake_at().is_some();
            if self.client_done && (self.to_engine.is_empty() || self.engine_done || paused) {
                return Some(Outcome::ClientGone);
            }
            if !progress {
                return None;
            }
        }
    }

    /// Takes data streams the client opened (quinn-proto caps how many are open at once).
    fn accept_streams(&mut self, conn: &mut Connection) -> bool {
        let mut progress = false;
        while !self.client_done {
            let Some(id) = conn.streams().accept(Dir::Bi) else {
                break;
            };
            let no = self.next_no;
            self.next_no += 1;
            self.mux.data_stream_opened();
            self.flows.push(Flow::new(no, id));
            progress = true;
        }
        progress
    }

    /// Client streams → whole packets queued for the engine.
    fn read_client(&mut self, conn: &mut Connection) -> bool {
        let mut progress = false;
        let Relay {
            flows,
            mux,
            to_engine,
            to_engine_bytes,
            client_done,
            max_packet_size,
            ..
        } = self;
        for flow in flows.iter_mut() {
            if *client_done || !flow.recv_open || *to_engine_bytes >= QUEUE_CAP {
                continue;
            }
            let mut stream = conn.recv_stream(flow.id);
            let mut chunks = match stream.read(true) {
                Ok(chunks) => chunks,
                Err(_) => {
                    progress = true;
                    flow.recv_open = false;
                    if flow.no == CONTROL {
                        *client_done = true;
                    }
                    continue;
                }
            };
            while *to_engine_bytes < QUEUE_CAP {
                match chunks.next(READ_CHUNK) {
                    Ok(Some(chunk)) => {
                        progress = true;
                        let run = flow.framer.push(chunk.bytes, *max_packet_size);
                        for packet in packets(&run) {
                            mux.client_packet(flow.no, &packet);
                        }
                        if !run.is_empty() {
                            *to_engine_bytes += run.len();
                            to_engine.push_back(run);
                        }
                    }
                    Err(ReadError::Blocked) => break,
                    // Finished (`None`) or reset.
                    Ok(None) | Err(_) => {
                        progress = true;
                        flow.recv_open = false;
                        if flow.no == CONTROL {
                            // As a TCP half-close: the session ends.
                            *client_done = true;
                        }
                        break;
                    }
                }
            }
            // Flow-control credit is sent with the driver's next transmit.
            let _ = chunks.finalize();
        }
        progress
    }

    /// Direct: queued client packets → the engine (unless it throttles the client; then
    /// they wait, the queue fills, and the relay stops reading the client's streams).
    fn feed_engine(&mut self, io: &mut EngineIo) -> bool {
        let EngineSide::Direct { key, paused_until } = &mut self.engine_side else {
            return false;
        };
        let key = *key;
        if self.engine_done {
            self.to_engine.clear();
            self.to_engine_bytes = 0;
            return false;
        }
        if let Some(until) = io.engine.read_paused_until(key, io.now) {
            *paused_until = Some(until);
            return false;
        }
        // A pause that just ended may have left complete packets in the connection.
        let resumed = paused_until.take().is_some();
        if self.to_engine.is_empty() && !resumed {
            return false;
        }
        io.engine.prepare_read(key, io.feed);
        for chunk in self.to_engine.drain(..) {
            io.feed.extend_from_slice(&chunk);
        }
        self.to_engine_bytes = 0;
        io.engine.handle_read(key, io.feed, io.now);
        self.handoff = io.engine.take_handoff(key);
        true
    }

    /// Direct: the engine's output → packets queued on the stream each belongs to (the
    /// engine's buffer holds whole packets, so no framing is needed). When the engine is
    /// done with the connection and everything is taken, the relay finishes.
    fn take_output(&mut self, io: &mut EngineIo) -> bool {
        let Some(key) = self.direct_key() else {
            return false;
        };
        if self.engine_done {
            // Closing and drained, but the client has not taken the last bytes: the
            // engine's deadline for that (`should_abort`) ends the wait.
            if !self.aborted && io.engine.should_abort(key) {
                self.aborted = true;
                return true;
            }
            return false;
        }
        let queued: usize = self.flows.iter().map(|f| f.out_bytes).sum();
        let cap = if self.flows.len() == 1 {
            QUEUE_CAP
        } else {
            QUEUE_CAP_ALL_STREAMS
        };
        let mut progress = false;
        match io.engine.output(key) {
            None => {
                self.engine_done = true;
                return true;
            }
            Some(out) if out.is_empty() => {}
            Some(_) if queued >= cap => {
                // The client is not draining: the engine sees its output backlogged.
                io.engine.output_flushed(key, 0);
            }
            Some(out) => {
                let run = out.split().freeze();
                let n = run.len();
                io.engine.output_flushed(key, n);
                self.dispatch(run);
                progress = true;
            }
        }
        if io.engine.is_closing(key) {
            let drained = io.engine.output(key).is_none_or(|out| out.is_empty());
            if drained || io.engine.should_abort(key) {
                self.aborted = io.engine.should_abort(key);
                self.engine_done = true;
                progress = true;
            }
        }
        progress
    }

    /// Queued client packets → the socketpair.
    fn write_engine(&mut self) -> bool {
        if self.engine_done {
            self.to_engine.clear();
            self.to_engine_bytes = 0;
            return false;
        }
        let mut progress = false;
        while !self.to_engine.is_empty() && self.engine_writable {
            let mut iov = [IoSlice::new(&[]); IOV_MAX];
            let mut n = 0;
            for (slot, chunk) in iov.iter_mut().zip(self.to_engine.iter()) {
                *slot = IoSlice::new(chunk);
                n += 1;
            }
            let EngineSide::Socket(socket) = &mut self.engine_side else {
                return progress;
            };
            match socket.write_vectored(&iov[..n]) {
                Ok(mut written) => {
                    progress = true;
                    self.to_engine_bytes -= written;
                    while written > 0 {
                        let front = self.to_engine.front_mut().expect("written ≤ queued");
                        let take = written.min(front.len());
                        front.advance(take);
                        written -= take;
                        if front.is_empty() {
                            self.to_engine.pop_front();
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.engine_writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    progress = true;
                    self.engine_done = true;
                    self.to_engine.clear();
                    self.to_engine_bytes = 0;
                }
            }
        }
        progress
    }

    /// The socketpair → packets queued on the stream each belongs to.
    fn read_engine(&mut self, scratch: &mut [u8]) -> bool {
        let mut progress = false;
        loop {
            let queued: usize = self.flows.iter().map(|f| f.out_bytes).sum();
            let cap = if self.flows.len() == 1 {
                QUEUE_CAP
            } else {
                QUEUE_CAP_ALL_STREAMS
            };
            if self.engine_done || !self.engine_readable || queued >= cap {
                return progress;
            }
            let EngineSide::Socket(socket) = &mut self.engine_side else {
                return progress;
            };
            match socket.read(scratch) {
                Ok(0) => {
                    self.engine_done = true;
                    return true;
                }
                Ok(n) => {
                    progress = true;
                    let run = self
                        .from_engine
                        .push(Bytes::copy_from_slice(&scratch[..n]), u32::MAX);
                    self.dispatch(run);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.engine_readable = false;
                    return progress;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.engine_done = true;
                    return true;
                }
            }
        }
    }

    /// Queues a run of whole packets from the engine, each on its stream; consecutive
    /// packets for the same stream stay one chunk.
    ///
    /// With one stream this is TCP: a client that does not read stalls its own session.
    /// With several, a stream whose queue is full loses its QoS 0 PUBLISHes (which MQTT
    /// allows), so a client not reading one stream does not stall the others; QoS 1/2 and
    /// acknowledgements are always queued (the inflight window bounds them).
    fn dispatch(&mut self, run: Bytes) {
        if self.flows.len() == 1 {
            self.flows[0].queue(run);
            return;
        }
        // (first byte, one past the last) of the current group, and its stream.
        let (mut start, mut at, mut target) = (0, 0, None);
        for packet in packets(&run) {
            let no = self.mux.route(&packet);
            let index = self.flows.iter().position(|f| f.no == no).unwrap_or(0);
            let qos0_publish = packet[0] >> 4 == 3 && packet[0] & 0b0110 == 0;
            let drop = qos0_publish && self.flows[index].out_bytes >= QUEUE_CAP;
            let wanted = (!drop).then_some(index);
            if target != wanted {
                if let Some(t) = target {
                    self.flows[t].queue(run.slice(start..at));
                }
                (start, target) = (at, wanted);
            }
            at += packet.len();
            if drop {
                self.dropped_qos0 += 1;
                start = at;
            }
        }
        if let Some(t) = target {
            self.flows[t].queue(run.slice(start..at));
        }
    }

    /// Per-stream queues → quinn-proto (no copy: the chunks are handed over as they are).
    /// A stream the client stopped drops its data stream (its routes fall back to
    /// control); the control stream failing ends the session.
    fn write_client(&mut self, conn: &mut Connection) -> bool {
        let mut progress = false;
        for flow in &mut self.flows {
            if flow.out.is_empty() || flow.broken {
                continue;
            }
            let mut stream = conn.send_stream(flow.id);
            let chunks = flow.out.make_contiguous();
            match stream.write_chunks(chunks) {
                Ok(written) => {
                    if written.bytes > 0 {
                        progress = true;
                    }
                    flow.out_bytes -= written.bytes;
                    flow.out.drain(..written.chunks);
                }
                Err(WriteError::Blocked) => {}
                Err(_) => {
                    progress = true;
                    flow.broken = true;
                    flow.out.clear();
                    flow.out_bytes = 0;
                }
            }
        }
        let control_broken = self.flows[0].broken && self.flows[0].no == CONTROL;
        if control_broken && !self.client_done {
            self.client_done = true;
            progress = true;
        }
        let mux = &mut self.mux;
        self.flows.retain(|f| {
            // A stream the client only finished stays: it may still want what it subscribed to.
            let gone = f.no != CONTROL && f.broken;
            if gone {
                mux.stream_closed(f.no);
            }
            !gone
        });
        progress
    }
}
