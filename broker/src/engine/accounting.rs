//! The accountant: what each connection costs in memory, counted from the structures it
//! owns, and what the worker holds in all.
//!
//! The capacity plan (the seeds' 20 KB model: socket buffer 8 KB, session 500 B,
//! subscriptions 1 KB, queue 10 KB) was a guess; these figures are the broker's own. A
//! connection's [`Footprint`] is computed from its `Conn`, its session and what that session
//! holds, using allocated capacities (not lengths), so it is what the allocator handed out,
//! minus the allocator's own rounding. Kernel socket buffers are not in a process's RSS and
//! are not counted. A message shared by several sessions (`Rc`) is charged in full to each
//! holder: the per-connection figure is what that connection pins, so the worker total is
//! an upper bound when messages fan out, and exact for idle connections.
//!
//! The budget decisions on the delivery path (`deliver.rs`) do not recompute footprints:
//! they use the session's running `held_bytes` and the connection's unwritten output.

use std::mem::{size_of, size_of_val};

use super::conn::{Conn, TopicAliases};
use super::session::{Inflight, Queued, Session};
use super::{ConnKey, Engine};
use crate::histogram::Histogram;
use crate::model::{Delivery, Message};
use crate::protocol::{DisconnectReasonCode, PublishProperties};
use topic_trie::SubscriptionOptions;

/// The seeds' capacity model: bytes planned per connection.
pub const MODEL_BYTES: usize = 20 * 1024;

/// Bytes of heap one slab slot adds beyond its value (the occupied/vacant tag, rounded).
const SLAB_SLOT_OVERHEAD: usize = size_of::<usize>();
/// Bytes an `Rc` allocation adds to its value (strong and weak counts).
const RC_OVERHEAD: usize = 2 * size_of::<usize>();
/// Per entry of a hashbrown map: the control byte.
const MAP_CONTROL_BYTE: usize = 1;
/// The session's entry in the client-id registry (`Engine::client_ids`): key and slab index.
const CLIENT_ID_ENTRY: usize = size_of::<(Box<str>, usize)>() + MAP_CONTROL_BYTE;
/// What one subscription adds to the topic-trie: its (session, options) entry in the leaf,
/// plus the filter's bytes as an upper bound for nodes it may have created.
const INDEX_ENTRY: usize = size_of::<(usize, SubscriptionOptions)>();

/// What one connection holds, by part. Every field is bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// The `Conn` in its slab slot, plus what the transport keeps per connection.
    pub connection: usize,
    /// Unwritten output and an incomplete input packet (both freed when idle).
    pub buffers: usize,
    /// v5 topic alias maps.
    pub aliases: usize,
    /// The `Session` in its slab slot, its client id, its will and incoming QoS 2 ids.
    pub session: usize,
    /// The session's subscription map and its entries in the subscription index.
    pub subscriptions: usize,
    /// Inflight and queued messages (entries and the messages themselves).
    pub messages: usize,
}

impl Footprint {
    pub fn total(&self) -> usize {
        self.connection
            + self.buffers
            + self.aliases
            + self.session
            + self.subscriptions
            + self.messages
    }
}

/// The worker's memory as the accountant sees it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemoryReport {
    /// Open connections counted.
    pub connections: usize,
    /// Sum of their footprints.
    pub connection_bytes: usize,
    /// Sessions with no connection (kept for a persistent client), and their bytes.
    pub offline_sessions: usize,
    pub offline_session_bytes: usize,
    /// Footprints of the connections (the `mqttd_connection_accounted_bytes` buckets).
    pub histogram: Histogram,
}

impl MemoryReport {
    /// Everything accounted on this worker.
    pub fn total(&self) -> usize {
        self.connection_bytes + self.offline_session_bytes
    }
}

impl Engine {
    /// What connection `key` holds now, or `None` if there is no such connection.
    pub fn footprint(&self, key: ConnKey) -> Option<Footprint> {
        let conn = self.conns.get(key)?;
        let mut fp = Footprint {
            connection: size_of::<Conn>() + SLAB_SLOT_OVERHEAD + conn.transport_bytes as usize,
            buffers: conn.out.capacity() + conn.partial.capacity(),
            aliases: conn.aliases.as_deref().map_or(0, alias_bytes),
            ..Footprint::default()
        };
        if let Some(session) = conn.session.and_then(|s| self.sessions.get(s)) {
            session_footprint(session, &mut fp);
        }
        Some(fp)
    }

    /// Walks every connection and offline session. O(connections): for metrics scrapes and
    /// tests, not for the message path.
    pub fn memory_report(&self) -> MemoryReport {
        let mut report = MemoryReport::default();
        for (key, _) in self.conns.iter() {
            let Some(total) = self.footprint(key).map(|f| f.total()) else {
                continue;
            };
            report.connections += 1;
            report.connection_bytes += total;
            report.histogram.observe(total as u64);
        }
        for (_, session) in self.sessions.iter().filter(|(_, s)| s.conn.is_none()) {
            let mut fp = Footprint::default();
            session_footprint(session, &mut fp);
            report.offline_sessions += 1;
            report.offline_session_bytes += fp.total();
        }
        report
    }

    /// The per-connection budget (`limits.connection_memory_budget`), 0 when there is none.
    pub fn connection_budget(&self) -> usize {
        self.config.limits.connection_memory_budget
    }

    /// The driver's own per-connection state (e.g. a QUIC connection's quinn-proto and
    /// rustls state), so the footprint covers the transport too.
    pub fn set_transport_bytes(&mut self, key: ConnKey, bytes: u32) {
        if let Some(conn) = self.conns.get_mut(key) {
            conn.transport_bytes = bytes;
        }
    }
}

fn session_footprint(session: &Session, fp: &mut Footprint) {
    fp.session = size_of::<Session>()
        + SLAB_SLOT_OVERHEAD
        + session.client_id.len()
        + CLIENT_ID_ENTRY
        + session.will.as_deref().map_or(0, |w| {
            size_of_val(w) - size_of::<Message>() + message_bytes(&w.msg) - RC_OVERHEAD
        })
        + session.incoming_qos2.capacity() * size_of::<u16>();
    fp.subscriptions = session.subscriptions.capacity()
        * (size_of::<(Box<str>, SubscriptionOptions)>() + MAP_CONTROL_BYTE)
        + session
            .subscriptions
            .keys()
            .map(|filter| 2 * filter.len() + INDEX_ENTRY)
            .sum::<usize>();
    fp.messages = session.inflight.capacity() * size_of::<Inflight>()
        + session.queue.capacity() * size_of::<Queued>()
        + session
            .inflight
            .iter()
            .map(|m| held_message_bytes(&m.msg, &m.delivery))
            .chain(
                session
                    .queue
                    .iter()
                    .map(|q| held_message_bytes(&q.msg, &q.delivery)),
            )
            .sum::<usize>();
}

fn alias_bytes(aliases: &TopicAliases) -> usize {
    size_of::<TopicAliases>()
        + aliases.outbound.capacity() * (size_of::<(bytes::Bytes, u16)>() + MAP_CONTROL_BYTE)
        + aliases.outbound.keys().map(|t| t.len()).sum::<usize>()
        + aliases.inbound.capacity() * (size_of::<(u16, bytes::Bytes)>() + MAP_CONTROL_BYTE)
        + aliases.inbound.values().map(|t| t.len()).sum::<usize>()
}

/// A message as one `Rc` allocation: the struct, the counts, topic, payload, properties.
pub fn message_bytes(msg: &Message) -> usize {
    size_of::<Message>()
        + RC_OVERHEAD
        + msg.topic.len()
        + msg.payload.len()
        + msg
            .properties
            .as_deref()
            .map_or(0, |p| size_of::<PublishProperties>() + properties_bytes(p))
}

/// What a message held for one session costs beyond its queue/inflight entry.
pub fn held_message_bytes(msg: &Message, delivery: &Delivery) -> usize {
    message_bytes(msg) + delivery.subscription_ids.capacity() * size_of::<u32>()
}

fn properties_bytes(p: &PublishProperties) -> usize {
    p.response_topic.as_ref().map_or(0, String::capacity)
        + p.correlation_data.as_ref().map_or(0, bytes::Bytes::len)
        + p.content_type.as_ref().map_or(0, String::capacity)
        + p.user_properties.capacity() * size_of::<(String, String)>()
        + p.user_properties
            .iter()
            .map(|(k, v)| k.capacity() + v.capacity())
            .sum::<usize>()
        + p.subscription_identifiers.capacity() * size_of::<usize>()
}

/// Budget decisions for one delivery, given what the connection already holds.
pub(super) fn over_budget(budget: usize, conn: &Conn, session: &Session, msg: &Message) -> bool {
    budget > 0 && held_by(conn, session) + message_bytes(msg) > budget
}

/// What a connection holds that grows with traffic: unwritten output and its messages.
pub(super) fn held_by(conn: &Conn, session: &Session) -> usize {
    conn.out.len() + session.held_bytes()
}

/// Ticks in a row a connection may be found over its budget before it is cut off.
const SLOW_CONSUMER_TICKS: u8 = 2;

impl Engine {
    /// The second step of the budget policy (the first, dropping QoS 0 to a client that is
    /// not draining, is in `deliver`): a connection found over its budget, having neither
    /// taken output nor acknowledged a message since the tick before, at
    /// `SLOW_CONSUMER_TICKS` ticks in a row has stopped reading. It is disconnected (v5: 0x97)
    /// and its queued messages stay with its session, as for any client that went away.
    pub(super) fn cut_slow_consumers(&mut self) {
        let budget = self.config.limits.connection_memory_budget;
        if budget == 0 {
            return;
        }
        for (_, conn) in self.conns.iter_mut() {
            let Some(session) = conn.session.and_then(|s| self.sessions.get(s)) else {
                continue;
            };
            let progressed = std::mem::take(&mut conn.progressed);
            if conn.is_closing() || held_by(conn, session) <= budget || progressed {
                // Under budget, or over it but reading and acknowledging: a consumer that
                // keeps up (its publishers are paused to its pace, see `flow.rs`).
                conn.over_budget_ticks = 0;
                continue;
            }
            conn.over_budget_ticks += 1;
            if conn.over_budget_ticks >= SLOW_CONSUMER_TICKS {
                self.stats.slow_consumer_disconnects += 1;
                let held = held_by(conn, session);
                tracing::warn!(client_id = %session.client_id, held, budget, "slow consumer: disconnecting");
                conn.disconnect(
                    DisconnectReasonCode::QuotaExceeded,
                    "slow consumer: over its memory budget",
                );
            }
        }
    }
}
