//! Outbound delivery: a message to one subscribing session, through its connection's
//! inflight window or its bounded queue; redelivery on resume; the acknowledgements that
//! move the window (PUBACK, PUBREC/PUBREL, PUBCOMP).

use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;

use super::accounting::over_budget;
use super::conn::{Conn, MAX_PENDING_OUTPUT};
use super::flow::{Behind, Source};
use super::publish::is_empty_props;
use super::session::{Inflight, InflightState, Queued, Session};
use super::stats::Stats;
use super::{ConnKey, Engine};
use crate::model::{Delivery, Message, SessionKey};
use crate::protocol::{
    qos_from_u8, Packet, PubRec, PubRecReason, PubRel, PubRelReason, Publish, PublishProperties,
};

impl Engine {
    /// Sends `msg` to session `skey` now if its connection and window allow, else queues it.
    /// A session that is online and behind makes `source` wait for it (see `flow.rs`).
    pub(super) fn deliver(
        &mut self,
        skey: SessionKey,
        msg: &Rc<Message>,
        delivery: Delivery,
        source: Source,
        now: Instant,
    ) {
        if msg.is_expired(now) {
            self.stats.dropped_expired += 1;
            return;
        }
        let behind_mark = self.behind_mark();
        let session = &mut self.sessions[skey];
        let window = self.config.limits.max_inflight;
        let budget = self.config.limits.connection_memory_budget;
        let conn = session
            .conn
            .map(|ckey| &mut self.conns[ckey])
            .filter(|conn| !conn.is_closing());
        let online = conn.is_some();
        if let Some(conn) = conn {
            if delivery.qos == 0 {
                if conn.out.len() > MAX_PENDING_OUTPUT {
                    self.stats.dropped_qos0_backlog += 1;
                } else if conn.backlogged && over_budget(budget, conn, session, msg) {
                    // First step of the budget policy: a client that is not draining loses
                    // its QoS 0 messages rather than grow the broker's memory.
                    self.stats.dropped_over_budget += 1;
                } else {
                    send_publish(conn, msg, &delivery, 0, false, now, &mut self.stats);
                }
                return;
            }
            if session.queue.is_empty() && session.inflight.len() < window_of(conn, window) {
                let seq = session.take_seq();
                let sent = start_inflight(
                    conn,
                    session,
                    seq,
                    msg.clone(),
                    delivery,
                    now,
                    &mut self.stats,
                );
                if let (Some(pkid), true) = (sent, self.store_sessions) {
                    let m = self.sessions[skey].inflight.back();
                    if let Some(delivery) = m.map(|m| m.delivery.clone()) {
                        self.store_message(skey, seq, msg, &delivery, pkid, false);
                    }
                }
                return;
            }
            // QoS 1/2 past the window queue. Behind, the session pauses its source (see
            // `flow.rs`). A client that stays over its budget without making progress is
            // disconnected by the tick (`cut_slow_consumers`).
        } else if delivery.qos == 0 {
            // QoS 0 is not kept for offline clients (as Mosquitto's default).
            return;
        }
        // An online session's queue is bounded by backpressure, not by dropping what the
        // publisher was (or is about to be) acknowledged. The limit drops messages for an
        // offline session, and broker-originated ones (nobody to pause).
        let pausable = online && source != Source::Broker;
        if session.queue.len() >= self.config.limits.max_queued_messages && !pausable {
            self.stats.dropped_queue_full += 1;
            if self.stats.dropped_queue_full.is_power_of_two() {
                tracing::warn!(client_id = %session.client_id, dropped = self.stats.dropped_queue_full, "session queue full: messages dropped");
            }
            return;
        }
        let seq = session.take_seq();
        session.push_queued(Queued {
            seq,
            msg: msg.clone(),
            delivery,
        });
        // A held peer link stops every session's traffic on it, so a peer is held only at
        // the limit (a local publisher, at half of it); both resume below half.
        let mark = match source {
            Source::Peer(_) => self.config.limits.max_queued_messages.max(behind_mark),
            _ => behind_mark,
        };
        if online && session.queue.len() >= mark {
            self.wait_for(source, Behind::Session(skey));
        }
        if self.store_sessions {
            if let Some(q) = self.sessions[skey].queue.back() {
                let (m, d) = (q.msg.clone(), q.delivery.clone());
                self.store_message(skey, seq, &m, &d, 0, false);
            }
        }
    }

    /// After (re)connecting: resend what is inflight (PUBLISH with DUP, or PUBREL), then
    /// fill the window from the queue (MQTT-4.4.0-1).
    pub(super) fn resume_delivery(&mut self, skey: SessionKey, now: Instant) {
        let session = &mut self.sessions[skey];
        let Some(ckey) = session.conn else {
            return;
        };
        let conn = &mut self.conns[ckey];
        let mut pos = 0;
        let mut removed = Vec::new();
        while let Some(m) = session.inflight.get(pos) {
            let sent = match m.state {
                InflightState::AwaitingAck => send_publish(
                    conn,
                    &m.msg,
                    &m.delivery,
                    m.pkid,
                    true,
                    now,
                    &mut self.stats,
                ),
                InflightState::AwaitingComp => {
                    conn.send(&pubrel(m.pkid, PubRelReason::Success));
                    true
                }
            };
            if sent {
                pos += 1;
            } else {
                // Over the Maximum Packet Size this connection allows (it may be smaller
                // than the last one's): discarded as if sent (v5 §3.1.2.11.4), so it must
                // leave the window too, or no acknowledgement would ever free its slot.
                tracing::debug!(client_id = %session.client_id, pkid = m.pkid, "inflight message too large for the resumed connection: discarded");
                if let Some(m) = session.remove_inflight(pos) {
                    removed.push(m.seq);
                }
            }
        }
        for seq in removed {
            self.store_removed(skey, seq);
        }
        self.pump_queue(skey, now);
    }

    /// Moves queued messages into the inflight window while it has room.
    fn pump_queue(&mut self, skey: SessionKey, now: Instant) {
        let session = &mut self.sessions[skey];
        let Some(ckey) = session.conn else {
            return;
        };
        let conn = &mut self.conns[ckey];
        let window = window_of(conn, self.config.limits.max_inflight);
        // What moved, for the session store: (seq, packet id it was sent with, or None if
        // it left the session). Allocates only when something moved and is stored.
        let mut moved: Vec<(u32, Option<u16>)> = Vec::new();
        let store = self.store_sessions && session.expiry_secs > 0;
        while session.inflight.len() < window {
            let Some(q) = session.pop_queued() else {
                break;
            };
            if q.msg.is_expired(now) {
                self.stats.dropped_expired += 1;
                if store {
                    moved.push((q.seq, None));
                }
                continue;
            }
            let sent = start_inflight(
                conn,
                session,
                q.seq,
                q.msg,
                q.delivery,
                now,
                &mut self.stats,
            );
            if store {
                moved.push((q.seq, sent));
            }
        }
        for (seq, sent) in moved {
            match sent {
                Some(pkid) => {
                    let inflight = &self.sessions[skey].inflight;
                    let m = inflight.iter().rev().find(|m| m.seq == seq);
                    if let Some((msg, delivery)) = m.map(|m| (m.msg.clone(), m.delivery.clone())) {
                        self.store_message(skey, seq, &msg, &delivery, pkid, false);
                    }
                }
                None => self.store_removed(skey, seq),
            }
        }
        self.session_progressed(skey);
    }

    pub(super) fn handle_puback(&mut self, key: ConnKey, pkid: u16, now: Instant) {
        self.complete_inflight(key, pkid, InflightState::AwaitingAck, now);
    }

    pub(super) fn handle_pubcomp(&mut self, key: ConnKey, pkid: u16, now: Instant) {
        self.complete_inflight(key, pkid, InflightState::AwaitingComp, now);
    }

    /// Removes an acknowledged message from the window and lets the queue move up.
    fn complete_inflight(
        &mut self,
        key: ConnKey,
        pkid: u16,
        expected: InflightState,
        now: Instant,
    ) {
        let Some(skey) = self.conns[key].session else {
            return;
        };
        self.conns[key].progressed = true;
        let session = &mut self.sessions[skey];
        match session.inflight_position(pkid) {
            Some(pos) if session.inflight[pos].state == expected => {
                if let Some(m) = session.remove_inflight(pos) {
                    self.store_removed(skey, m.seq);
                }
                self.pump_queue(skey, now);
            }
            _ => tracing::debug!(conn = key, pkid, "acknowledgement for an unknown packet id"),
        }
    }

    pub(super) fn handle_pubrec(&mut self, key: ConnKey, rec: PubRec, now: Instant) {
        let Some(skey) = self.conns[key].session else {
            return;
        };
        let session = &mut self.sessions[skey];
        let conn = &mut self.conns[key];
        let pos = session.inflight_position(rec.pkid).filter(|&p| {
            session.inflight[p].state == InflightState::AwaitingAck
                && session.inflight[p].delivery.qos == 2
        });
        match pos {
            Some(pos) if is_error_reason(&rec.reason) => {
                // The receiver refused it: the exchange ends here (v5 §4.3.3).
                if let Some(m) = session.remove_inflight(pos) {
                    self.store_removed(skey, m.seq);
                }
                self.pump_queue(skey, now);
            }
            Some(pos) => {
                let m = &mut session.inflight[pos];
                m.state = InflightState::AwaitingComp;
                conn.send(&pubrel(rec.pkid, PubRelReason::Success));
                if self.store_sessions {
                    let (seq, msg, delivery) = (m.seq, m.msg.clone(), m.delivery.clone());
                    self.store_message(skey, seq, &msg, &delivery, rec.pkid, true);
                }
            }
            None => conn.send(&pubrel(rec.pkid, PubRelReason::PacketIdentifierNotFound)),
        }
    }
}

fn is_error_reason(r: &PubRecReason) -> bool {
    !matches!(
        r,
        PubRecReason::Success | PubRecReason::NoMatchingSubscribers
    )
}

fn pubrel(pkid: u16, reason: PubRelReason) -> Packet {
    Packet::PubRel(PubRel {
        pkid,
        reason,
        properties: None,
    })
}

/// QoS 1/2 messages this connection may have unacknowledged: ours and the client's limit.
fn window_of(conn: &Conn, max_inflight: u16) -> usize {
    max_inflight.min(conn.client_receive_max) as usize
}

/// Sends a new QoS 1/2 message with a fresh packet id and records it as inflight.
/// Returns the packet id, or `None` if the message was discarded (too large for the
/// client's Maximum Packet Size).
fn start_inflight(
    conn: &mut Conn,
    session: &mut Session,
    seq: u32,
    msg: Rc<Message>,
    delivery: Delivery,
    now: Instant,
    stats: &mut Stats,
) -> Option<u16> {
    let pkid = session.next_pkid();
    if !send_publish(conn, &msg, &delivery, pkid, false, now, stats) {
        return None;
    }
    session.push_inflight(Inflight {
        seq,
        pkid,
        msg,
        delivery,
        state: InflightState::AwaitingAck,
    });
    Some(pkid)
}

/// Encodes one PUBLISH of `msg` for this connection. Returns false if it was dropped
/// because it exceeds the client's Maximum Packet Size (v5 §3.1.2.11.4: discarded as if sent).
fn send_publish(
    conn: &mut Conn,
    msg: &Message,
    delivery: &Delivery,
    pkid: u16,
    dup: bool,
    now: Instant,
    stats: &mut Stats,
) -> bool {
    let mut publish = Publish {
        dup,
        qos: qos_from_u8(delivery.qos),
        retain: delivery.retain,
        topic: msg.topic.clone(),
        pkid,
        payload: msg.payload.clone(),
        properties: None,
    };
    if conn.version.is_v5() {
        publish.properties = outgoing_properties(msg, delivery, now);
    }
    if publish.size() > conn.client_max_packet as usize {
        stats.dropped_too_large += 1;
        return false;
    }
    if conn.version.is_v5() && conn.client_alias_max > 0 {
        apply_topic_alias(conn, &mut publish);
    }
    stats.messages_sent[usize::from(delivery.qos.min(2))] += 1;
    conn.send(&Packet::Publish(publish));
    true
}

/// The v5 properties of one outgoing copy: the publisher's, the remaining expiry and this
/// subscriber's subscription identifiers. `None` (the fast path) when there are none.
fn outgoing_properties(
    msg: &Message,
    delivery: &Delivery,
    now: Instant,
) -> Option<PublishProperties> {
    if msg.properties.is_none() && delivery.subscription_ids.is_empty() {
        return None;
    }
    let mut props = msg.properties.as_deref().cloned().unwrap_or_default();
    props.message_expiry_interval = msg.remaining_expiry(now);
    props.subscription_identifiers = delivery
        .subscription_ids
        .iter()
        .map(|&id| id as usize)
        .collect();
    Some(props)
}

/// Replaces the topic by an alias the client already knows, or teaches it a new one while
/// its Topic Alias Maximum allows (v5 §3.3.2.3.4).
fn apply_topic_alias(conn: &mut Conn, publish: &mut Publish) {
    let props = publish
        .properties
        .get_or_insert_with(PublishProperties::default);
    let max = conn.client_alias_max as usize;
    let aliases = &mut conn.aliases().outbound;
    if let Some(&alias) = aliases.get(&publish.topic) {
        props.topic_alias = Some(alias);
        publish.topic = Bytes::new();
    } else if aliases.len() < max {
        let alias = aliases.len() as u16 + 1;
        aliases.insert(Bytes::copy_from_slice(&publish.topic), alias);
        props.topic_alias = Some(alias);
    } else if is_empty_props(props) && props.subscription_identifiers.is_empty() {
        publish.properties = None;
    }
}
