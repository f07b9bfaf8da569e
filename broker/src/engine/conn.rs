//! Per-connection protocol state: what was negotiated in CONNECT and the bytes waiting to
//! be written. Everything here lives only as long as the network connection.

use std::rc::Rc;
use std::time::Instant;

use ahash::AHashMap;
use bytes::{Bytes, BytesMut};

use super::drivers::DriverId;
use super::rate::PublishBuckets;
use crate::model::SessionKey;
use crate::protocol::{
    self, Disconnect, DisconnectProperties, DisconnectReasonCode, Packet, Version,
};
use crate::wake_queue::WakeQueue;

/// Output beyond this many bytes means the client is not reading: QoS 0 messages to it are
/// dropped rather than buffered without bound (QoS 1/2 are bounded by the inflight window).
pub const MAX_PENDING_OUTPUT: usize = 4 * 1024 * 1024;

/// The v5 topic alias maps of one connection, both directions.
#[derive(Debug, Default)]
pub struct TopicAliases {
    /// Topic -> alias the client has been taught by us.
    pub outbound: AHashMap<Bytes, u16>,
    /// Alias -> topic the client has taught us.
    pub inbound: AHashMap<u16, Bytes>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Accepted; no CONNECT yet.
    AwaitingConnect,
    /// CONNACK sent; attached to a session.
    Active,
    /// Closing: flush `out`, then the driver drops the socket.
    Closing,
    /// Its client id lives on another worker: the driver passes the socket there.
    HandingOff,
}

/// Acknowledgements held until a cluster barrier completes, or until the backend has
/// handed the messages they acknowledge on (see `Engine::acknowledge`).
#[derive(Debug)]
pub struct HeldAcks {
    /// The latest barrier they wait for (barriers complete in order); 0: none.
    pub barrier: u64,
    /// The latest forward confirmation they wait for (in order too); 0: none.
    pub confirmation: u64,
    /// PUBACK/PUBREC/PUBCOMP packets, in the order the client's packets arrived.
    pub acks: Vec<Packet>,
}

/// Whether a new connection may have a session, decided when it is accepted and answered
/// at its CONNECT (refused clients still get a CONNACK saying why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Over the worker's or the broker's connection limit.
    OverLimit,
    /// The worker's resident memory is above `limits.memory_high_watermark_bytes`.
    OverMemory,
    /// Its source address opened connections faster than `limits.connect_rate_per_ip`.
    RateLimited,
}

/// Whether a connection's input is handled, or why not. (One field: the reasons exclude
/// each other, as a connection that handles nothing cannot acquire another.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    Reading,
    /// A SUBSCRIBE of this connection waits for a cluster barrier (`ParkedSubAck`), or its
    /// CONNECT for its client id to be claimed across hosts (`claims.rs`): the packets read
    /// after it wait, undecoded, in `partial`, so that they take effect after it (MQTT-4.6),
    /// as they would on one worker. Bounded by the barrier (claim) timeout and by the
    /// connection's memory budget (`partial` is charged to it). Still read.
    Held,
    /// Not read: a destination of its last PUBLISH is behind.
    Paused,
    /// The pause ended; the driver has yet to read it again
    /// ([`super::Engine::take_read_resumed`]).
    Resumed,
}

#[derive(Debug)]
pub struct Conn {
    pub state: ConnState,
    pub version: Version,
    pub session: Option<SessionKey>,
    /// Encoded packets not yet written to the socket. Empty (and unallocated) when idle.
    pub out: BytesMut,
    /// An incomplete packet left over from the last read. Empty when idle.
    pub partial: BytesMut,
    /// When the last complete packet arrived; until CONNECT, when the socket was accepted
    /// (so it also times the connect timeout).
    pub last_packet_at: Instant,
    /// Negotiated keep-alive, seconds (0 = none).
    pub keep_alive: u16,
    /// Refused ones count against no limit, and their CONNECT gets a refusal.
    pub admission: Admission,
    /// The last flush left output the socket would not take: the client is not draining.
    pub backlogged: bool,
    /// Bytes the transport driver keeps for this connection (see `accounting.rs`).
    pub transport_bytes: u32,
    /// Publish rate limit state (unused when no publish rate is configured).
    pub publish_buckets: PublishBuckets,
    /// Over its publish rate with the throttle action: input is not read before this time
    /// (engine milliseconds; 0 = not paused).
    pub paused_until_ms: u32,
    /// The client's v5 Receive Maximum: QoS 1/2 messages we may have unacknowledged.
    pub client_receive_max: u16,
    /// The client's v5 Maximum Packet Size: larger messages are not sent to it.
    pub client_max_packet: u32,
    /// Topic aliases the client accepts from us (v5 Topic Alias Maximum).
    pub client_alias_max: u16,
    /// Topic aliases in use, allocated on first use (most connections never use any).
    pub aliases: Option<Box<TopicAliases>>,
    /// This connection's key, to announce itself on the dirty list.
    pub key: usize,
    /// Where this connection announces that it has output to write or must close.
    pub dirty: Rc<DirtyList>,
    /// Already on the dirty list since the driver last took it.
    pub queued: bool,
    /// The driver serving it.
    pub driver: DriverId,
    /// Acknowledgements held until a cluster barrier completes. `None` nearly always.
    pub held_acks: Option<Box<HeldAcks>>,
    /// Timer ticks spent in `Closing` (see `Engine::should_abort`).
    pub close_ticks: u8,
    /// Timer ticks in a row it was found over its memory budget (see `accounting.rs`).
    pub over_budget_ticks: u8,
    /// Whether its input is handled, or waits for a destination its PUBLISH fed (see
    /// `flow.rs`) or for its SUBSCRIBE's barrier.
    pub flow: FlowState,
    /// It acknowledged a message or took output since the last tick (a consumer keeping
    /// up, however slowly, is not cut for its budget).
    pub progressed: bool,
}

impl Conn {
    pub fn new(
        key: usize,
        driver: DriverId,
        dirty: Rc<DirtyList>,
        now: Instant,
        admission: Admission,
    ) -> Conn {
        Conn {
            state: ConnState::AwaitingConnect,
            version: Version::V311,
            session: None,
            out: BytesMut::new(),
            partial: BytesMut::new(),
            last_packet_at: now,
            keep_alive: 0,
            admission,
            backlogged: false,
            transport_bytes: 0,
            publish_buckets: PublishBuckets::default(),
            paused_until_ms: 0,
            client_receive_max: u16::MAX,
            client_max_packet: u32::MAX,
            client_alias_max: 0,
            aliases: None,
            key,
            dirty,
            queued: false,
            driver,
            held_acks: None,
            close_ticks: 0,
            over_budget_ticks: 0,
            flow: FlowState::Reading,
            progressed: false,
        }
    }

    pub(super) fn driver_index(&self) -> usize {
        self.driver.index()
    }

    /// Encodes `packet` into the output buffer and wakes the driver. A packet over the
    /// client's Maximum Packet Size is shrunk or withheld (see [`Conn::try_send`]).
    pub fn send(&mut self, packet: &Packet) {
        self.try_send(packet);
    }

    /// As [`Conn::send`]; false if the packet was withheld because it exceeds the client's
    /// v5 Maximum Packet Size even without its Reason String and User Properties
    /// (MQTT-3.1.2-24: the server must not send it; -25: those two are left out first).
    /// PUBLISH never gets here too large: `deliver.rs` drops those as if sent.
    pub fn try_send(&mut self, packet: &Packet) -> bool {
        let before = self.out.len();
        protocol::write_packet(&mut self.out, self.version, packet);
        let fits = self.out.len() - before <= self.client_max_packet as usize;
        let sent = fits || self.send_shrunk(packet, before);
        self.wake();
        sent
    }

    /// `packet` did not fit: encodes it again without its optional properties, or not at all.
    #[cold]
    fn send_shrunk(&mut self, packet: &Packet, before: usize) -> bool {
        self.out.truncate(before);
        let limit = self.client_max_packet as usize;
        if let Some(smaller) = protocol::without_optional_properties(packet) {
            protocol::write_packet(&mut self.out, self.version, &smaller);
            if self.out.len() - before <= limit {
                tracing::debug!(conn = self.key, limit, "reason string and user properties left out to fit the client's maximum packet size");
                return true;
            }
            self.out.truncate(before);
        }
        tracing::warn!(
            conn = self.key,
            limit,
            "packet not sent: larger than the client's maximum packet size: {packet:?}"
        );
        false
    }

    pub fn aliases(&mut self) -> &mut TopicAliases {
        self.aliases.get_or_insert_with(Default::default)
    }

    /// Puts the connection on the dirty list (once until the driver takes the list).
    pub fn wake(&mut self) {
        if !self.queued {
            self.queued = true;
            self.dirty.push(self.key);
        }
    }

    /// Ends the connection: v5 clients get a DISCONNECT with `reason` (and `why` as the
    /// reason string); 3.1.1 has no server DISCONNECT, so they are just closed.
    pub fn disconnect(&mut self, reason: DisconnectReasonCode, why: &str) {
        if self.state == ConnState::Closing {
            return;
        }
        if self.version.is_v5() && self.state == ConnState::Active {
            let properties = (!why.is_empty()).then(|| DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(why.to_string()),
                user_properties: Vec::new(),
                server_reference: None,
            });
            self.send(&Packet::Disconnect(Disconnect {
                reason_code: reason,
                properties,
            }));
        }
        self.close();
    }

    /// Marks the connection for closing without sending anything more.
    pub fn close(&mut self) {
        self.state = ConnState::Closing;
        self.wake();
    }

    pub fn is_closing(&self) -> bool {
        self.state == ConnState::Closing
    }

    /// Deadline after which a silent client is cut off: 1.5 × keep-alive (MQTT-3.1.2-24).
    pub fn keep_alive_deadline(&self) -> Option<Instant> {
        (self.keep_alive > 0).then(|| {
            self.last_packet_at + std::time::Duration::from_millis(self.keep_alive as u64 * 1500)
        })
    }
}

/// Connections with bytes to write or a close to carry out, in the order they became so.
/// The transport driver takes the list after each batch of work and flushes each
/// connection once, however many packets it gained: one write per socket per batch.
pub type DirtyList = WakeQueue<usize>;
