//! The state MQTT keeps for a client id across connections: subscriptions, the outbound
//! inflight window and queue, incoming QoS 2 ids and the will. Plain data, no I/O, so it
//! can be turned into a `SessionImage` to move between workers or into a store.

use std::collections::VecDeque;
use std::ops::{Index, IndexMut};
use std::rc::Rc;
use std::time::Instant;

use ahash::AHashMap;
use slab::Slab;
use topic_trie::SubscriptionOptions;

use super::accounting::held_message_bytes;
use crate::model::{Delivery, Message, SessionKey};

/// Where a QoS 1/2 message sent to the client stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightState {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    AwaitingAck,
    /// PUBREL sent, waiting for PUBCOMP (QoS 2).
    AwaitingComp,
}

#[derive(Debug)]
pub struct Inflight {
    /// Its number in the session (see `Session::next_seq`).
    pub seq: u32,
    pub pkid: u16,
    pub msg: Rc<Message>,
    pub delivery: Delivery,
    pub state: InflightState,
}

impl Inflight {
    /// Bytes this entry holds, for the accountant (see `accounting.rs`).
    pub fn cost(&self) -> usize {
        std::mem::size_of::<Inflight>() + held_message_bytes(&self.msg, &self.delivery)
    }
}

/// A message waiting for room in the inflight window or for the client to come back.
#[derive(Debug)]
pub struct Queued {
    /// Its number in the session (see `Session::next_seq`).
    pub seq: u32,
    pub msg: Rc<Message>,
    pub delivery: Delivery,
}

impl Queued {
    /// Bytes this entry holds, for the accountant (see `accounting.rs`).
    pub fn cost(&self) -> usize {
        std::mem::size_of::<Queued>() + held_message_bytes(&self.msg, &self.delivery)
    }
}

/// A will: published when the connection ends without a normal DISCONNECT.
#[derive(Debug)]
pub struct Will {
    pub msg: Message,
    /// v5 Will Delay Interval, seconds.
    pub delay_secs: u32,
}

#[derive(Debug)]
pub struct Session {
    pub client_id: Box<str>,
    /// The connection attached to this session, if the client is online.
    pub conn: Option<usize>,
    /// Seconds the session outlives its connection; 0 = ends with it; u32::MAX = never.
    pub expiry_secs: u32,
    /// Set while offline: when the session is discarded.
    pub expires_at: Option<Instant>,
    /// Filter as the client sent it (including `$share/g/`) -> options.
    pub subscriptions: AHashMap<Box<str>, SubscriptionOptions>,
    /// Boxed: most sessions have none, and a will is as large as a message.
    pub will: Option<Box<Will>>,
    /// Set while offline with a delayed will: when it is published.
    pub will_at: Option<Instant>,
    /// Outbound QoS 1/2 messages not yet fully acknowledged, in the order sent.
    pub inflight: VecDeque<Inflight>,
    pub queue: VecDeque<Queued>,
    /// Bytes of the messages in `inflight` and `queue` (entries included), kept as they
    /// come and go so budget checks on the delivery path cost nothing.
    /// 32 bits, wrapping (additions and removals stay consistent): the figure is exact up
    /// to 4 GiB, far above any session the limits allow; it keeps `Session` at its size.
    held_bytes: u32,
    next_pkid: u16,
    /// Sources are paused until this session catches up (see `flow.rs`); kept here so an
    /// acknowledgement needs no lookup in the waiters map to know whether to release any.
    pub waited_for: bool,
    /// Packet ids of incoming QoS 2 PUBLISHes awaiting PUBREL (their PUBREC was sent).
    pub incoming_qos2: Vec<u16>,
    /// The number the last QoS 1/2 message entering the session got: it names the message
    /// in a session store (`durable.rs`) until it is acknowledged. 32 bits (the session
    /// stays within its size): it wraps after 4 billion messages, long after those
    /// numbered before have left the session.
    pub next_seq: u32,
}

impl Session {
    pub fn new(client_id: Box<str>, expiry_secs: u32) -> Session {
        Session {
            client_id,
            conn: None,
            expiry_secs,
            expires_at: None,
            subscriptions: AHashMap::new(),
            will: None,
            will_at: None,
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            held_bytes: 0,
            next_pkid: 0,
            waited_for: false,
            incoming_qos2: Vec::new(),
            next_seq: 0,
        }
    }

    /// Bytes of the messages in `inflight` and `queue`, entries included.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes as usize
    }

    /// A number for a message entering the session.
    pub fn take_seq(&mut self) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }

    /// A packet id not used by any inflight message (the window is far below 65535).
    pub fn next_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            let id = self.next_pkid;
            if !self.inflight.iter().any(|m| m.pkid == id) {
                return id;
            }
        }
    }

    pub fn push_queued(&mut self, q: Queued) {
        self.held_bytes = self.held_bytes.wrapping_add(q.cost() as u32);
        self.queue.push_back(q);
    }

    pub fn pop_queued(&mut self) -> Option<Queued> {
        let q = self.queue.pop_front()?;
        self.held_bytes = self.held_bytes.wrapping_sub(q.cost() as u32);
        Some(q)
    }

    pub fn push_inflight(&mut self, m: Inflight) {
        self.held_bytes = self.held_bytes.wrapping_add(m.cost() as u32);
        self.inflight.push_back(m);
    }

    pub fn remove_inflight(&mut self, pos: usize) -> Option<Inflight> {
        let m = self.inflight.remove(pos)?;
        self.held_bytes = self.held_bytes.wrapping_sub(m.cost() as u32);
        Some(m)
    }

    /// Recomputes `held_bytes` after `inflight` or `queue` were replaced wholesale.
    pub fn recount_held(&mut self) {
        let held = self.inflight.iter().map(Inflight::cost).sum::<usize>()
            + self.queue.iter().map(Queued::cost).sum::<usize>();
        self.held_bytes = held as u32;
    }

    pub fn inflight_position(&self, pkid: u16) -> Option<usize> {
        // Acks nearly always come in order, so the front is checked first.
        self.inflight.iter().position(|m| m.pkid == pkid)
    }
}

/// This worker's sessions, addressed by [`SessionKey`] (a slab: keys are reused once a
/// session is gone, so a key is only good while its session lives).
#[derive(Debug, Default)]
pub struct Sessions(Slab<Session>);

impl Sessions {
    pub fn insert(&mut self, session: Session) -> SessionKey {
        SessionKey(self.0.insert(session))
    }

    pub fn remove(&mut self, key: SessionKey) -> Session {
        self.0.remove(key.0)
    }

    pub fn get(&self, key: SessionKey) -> Option<&Session> {
        self.0.get(key.0)
    }

    pub fn get_mut(&mut self, key: SessionKey) -> Option<&mut Session> {
        self.0.get_mut(key.0)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (SessionKey, &Session)> {
        self.0.iter().map(|(k, s)| (SessionKey(k), s))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (SessionKey, &mut Session)> {
        self.0.iter_mut().map(|(k, s)| (SessionKey(k), s))
    }
}

impl Index<SessionKey> for Sessions {
    type Output = Session;

    fn index(&self, key: SessionKey) -> &Session {
        &self.0[key.0]
    }
}

impl IndexMut<SessionKey> for Sessions {
    fn index_mut(&mut self, key: SessionKey) -> &mut Session {
        &mut self.0[key.0]
    }
}
