//! A persistent session as plain data, independent of any worker's slots: what moves from
//! a draining worker to its successor (and, with a shared store, what is stored).

use topic_trie::SubscriptionOptions;

use super::message::{Delivery, Message};

#[derive(Debug)]
pub struct SessionImage {
    pub client_id: String,
    pub expiry_secs: u32,
    /// Seconds left before an offline session expires (`None`: never).
    pub expires_in: Option<u32>,
    pub subscriptions: Vec<SubscriptionImage>,
    /// Messages waiting for the client, in order.
    pub queue: Vec<QueuedImage>,
    /// Messages sent and not yet fully acknowledged, in order.
    pub inflight: Vec<InflightImage>,
    /// Packet ids of QoS 2 messages received (PUBREC sent) and not yet released.
    pub incoming_qos2: Vec<u16>,
    /// A will waiting for its delay to pass (the client went away before the move).
    pub will: Option<WillImage>,
}

/// A delayed will of an offline session.
#[derive(Debug, Clone)]
pub struct WillImage {
    pub msg: Message,
    pub delay_secs: u32,
    /// Seconds left before it is published.
    pub due_in: u32,
}

/// One subscription, as the client sent its filter.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionImage {
    pub filter: String,
    pub options: SubscriptionOptions,
}

#[derive(Debug, Clone)]
pub struct QueuedImage {
    /// The message's number in its session (names it in a session store).
    pub seq: u64,
    pub msg: Message,
    pub delivery: Delivery,
}

#[derive(Debug, Clone)]
pub struct InflightImage {
    /// The message's number in its session (names it in a session store).
    pub seq: u64,
    pub pkid: u16,
    /// PUBREC received and PUBREL sent: waiting for PUBCOMP rather than PUBACK/PUBREC.
    pub awaiting_comp: bool,
    pub msg: Message,
    pub delivery: Delivery,
}

/// A change to a persistent session, for a backend that keeps sessions in a store.
#[derive(Debug)]
pub enum StoreOp {
    /// Everything but its messages (`queue` and `inflight` empty). `online`: its expiry
    /// does not run; offline, the store forgets it after `expiry_secs`.
    Meta { image: SessionImage, online: bool },
    /// A QoS 1/2 message entered the session, or moved on in it: `pkid` 0 = queued.
    Message(InflightImage),
    /// Message `seq` left the session (acknowledged, expired or discarded).
    Remove(u64),
    /// The session ended.
    Drop,
}
