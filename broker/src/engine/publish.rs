//! PUBLISH in both directions: accepting a client's PUBLISH (aliases, validation, QoS 1/2
//! handshakes), routing it to matching sessions, and delivering it to each subscriber
//! through its inflight window and queue.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::conn::{Conn, MAX_PENDING_OUTPUT};
use super::message::{Delivery, Message};
use super::session::{Inflight, InflightState, Queued, Session};
use super::stats::Stats;
use super::{ConnKey, Engine};
use crate::protocol::{
    qos_from_u8, Disconnect, DisconnectReasonCode, Packet, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, Publish, PublishProperties,
};
use crate::router::RouteKind;

impl Engine {
    pub(super) fn handle_publish(&mut self, key: ConnKey, p: Publish, now: Instant) {
        let mqtt = &self.config.mqtt;
        let qos = p.qos as u8;
        if qos > mqtt.maximum_qos {
            return self.protocol_error(
                key,
                DisconnectReasonCode::QoSNotSupported,
                "QoS not supported",
                now,
            );
        }
        if p.retain && !mqtt.retain_available {
            return self.protocol_error(
                key,
                DisconnectReasonCode::RetainNotSupported,
                "retain not supported",
                now,
            );
        }
        let mut topic = p.topic;
        let mut properties = p.properties;
        if let Some(props) = properties.as_mut() {
            if !props.subscription_identifiers.is_empty() {
                // MQTT-3.3.4-6: only the server sends subscription identifiers.
                return self.protocol_error(
                    key,
                    DisconnectReasonCode::ProtocolError,
                    "subscription identifier in PUBLISH",
                    now,
                );
            }
            if let Some(alias) = props.topic_alias.take() {
                if alias == 0 || alias > self.config.limits.max_topic_alias {
                    return self.protocol_error(
                        key,
                        DisconnectReasonCode::TopicAliasInvalid,
                        "topic alias out of range",
                        now,
                    );
                }
                let conn = &mut self.conns[key];
                if topic.is_empty() {
                    match conn.aliases().inbound.get(&alias) {
                        Some(t) => topic = t.clone(),
                        None => {
                            return self.protocol_error(
                                key,
                                DisconnectReasonCode::ProtocolError,
                                "unknown topic alias",
                                now,
                            )
                        }
                    }
                } else if valid_topic(&topic) {
                    // Copied: the topic is a slice of the shared read buffer.
                    conn.aliases()
                        .inbound
                        .insert(alias, Bytes::copy_from_slice(&topic));
                }
            }
        }
        if !valid_topic(&topic) {
            return self.protocol_error(
                key,
                DisconnectReasonCode::TopicNameInvalid,
                "invalid topic name",
                now,
            );
        }
        if let Some(props) = &properties {
            if props.payload_format_indicator == Some(1) && std::str::from_utf8(&p.payload).is_err()
            {
                return self.protocol_error(
                    key,
                    DisconnectReasonCode::PayloadFormatInvalid,
                    "payload is not UTF-8",
                    now,
                );
            }
        }
        let Some(skey) = self.conns[key].session else {
            return;
        };
        if qos == 2 {
            let session = &mut self.sessions[skey];
            if session.incoming_qos2.contains(&p.pkid) {
                // A resend of a message already accepted: acknowledge again, deliver once.
                return self.conns[key].send(&pubrec(p.pkid));
            }
            // v5 announces Receive Maximum in CONNACK; 3.1.1 has no such limit, so there the
            // packet id space (65535) is the bound.
            let limit = if self.conns[key].version.is_v5() {
                self.config.limits.receive_maximum as usize
            } else {
                u16::MAX as usize
            };
            if session.incoming_qos2.len() >= limit {
                return self.protocol_error(
                    key,
                    DisconnectReasonCode::ReceiveMaximumExceeded,
                    "receive maximum exceeded",
                    now,
                );
            }
            session.incoming_qos2.push(p.pkid);
        }

        let expires_at = properties
            .as_ref()
            .and_then(|pr| pr.message_expiry_interval)
            .map(|s| now + Duration::from_secs(s as u64));
        let (topic, payload) = if qos > 0 || p.retain {
            if let Some(data) = properties
                .as_mut()
                .and_then(|pr| pr.correlation_data.as_mut())
            {
                *data = Bytes::copy_from_slice(data);
            }
            detach(&topic, &p.payload)
        } else {
            (topic, p.payload)
        };
        let msg = Rc::new(Message {
            topic,
            payload,
            qos: p.qos,
            retain: p.retain,
            properties: properties.filter(|pr| !is_empty_props(pr)),
            expires_at,
            origin: Some(skey),
        });
        self.stats.messages_received += 1;
        if msg.retain {
            self.store_retained(&msg);
        }
        self.route(&msg, now);
        match qos {
            1 => {
                let ack = Packet::PubAck(PubAck {
                    pkid: p.pkid,
                    reason: PubAckReason::Success,
                    properties: None,
                });
                self.acknowledge(key, ack, msg.retain);
            }
            2 => self.acknowledge(key, pubrec(p.pkid), msg.retain),
            _ => {}
        }
    }

    /// Sends a PUBACK/PUBREC/PUBCOMP, in order with the connection's earlier ones. The ack
    /// of a retained PUBLISH waits until every peer has stored the message (a barrier after
    /// the `Retained` frame), so a subscriber on any worker sees what was acknowledged;
    /// later acks of the connection queue behind it (acks go in PUBLISH order, MQTT-4.6).
    fn acknowledge(&mut self, key: ConnKey, ack: Packet, retained: bool) {
        let barrier = if retained {
            self.cluster.barrier()
        } else {
            None
        };
        let conn = &mut self.conns[key];
        match (&mut conn.held_acks, barrier) {
            (Some(held), barrier) => {
                held.0 = barrier.unwrap_or(held.0).max(held.0);
                held.1.push(ack);
            }
            (None, Some(barrier)) => {
                conn.held_acks = Some(Box::new((barrier, vec![ack])));
                self.holding_acks.push(key);
            }
            (None, None) => conn.send(&ack),
        }
    }

    /// Stores a retained message published on this worker and tells the peers.
    pub(super) fn store_retained(&mut self, msg: &Rc<Message>) {
        if self.retained.set(msg.clone()) {
            self.cluster.retained(msg);
        } else {
            tracing::warn!(
                topic = msg.topic_str(),
                "retained store full: message not retained"
            );
        }
    }

    /// Publishes a will (or any broker-originated message) as if its client had.
    pub(super) fn publish_will(&mut self, mut msg: Message, now: Instant) {
        msg.origin = None;
        // The expiry interval counts from publication, not from CONNECT.
        msg.expires_at = msg
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|s| now + Duration::from_secs(s as u64));
        let msg = Rc::new(msg);
        if msg.retain {
            self.store_retained(&msg);
        }
        self.route(&msg, now);
    }

    /// Delivers `msg` to the local sessions that subscribe to it, and forwards it to the
    /// workers that have matching routes: each such worker gets it once, for its plain
    /// subscriptions and for the shared groups the route table picked it to serve.
    pub(super) fn route(&mut self, msg: &Rc<Message>, now: Instant) {
        self.deliver_to_plain_subscribers(msg, now);
        let mut plain_workers = std::mem::take(&mut self.plain_worker_scratch);
        let mut shared = std::mem::take(&mut self.shared_target_scratch);
        plain_workers.clear();
        shared.clear();
        let me = self.index;
        self.routes
            .for_each_match(msg.topic_str(), |&worker, kind| match kind {
                RouteKind::Plain if worker != me => plain_workers.push(worker),
                RouteKind::Plain => {}
                RouteKind::Shared { group, filter } => {
                    shared.push((worker, group.clone(), filter.clone()))
                }
            });
        for (_, group, filter) in shared.iter().filter(|(w, ..)| *w == me) {
            self.deliver_to_shared_group(group, filter, msg, now);
        }
        shared.retain(|(w, ..)| *w != me);
        if !plain_workers.is_empty() || !shared.is_empty() {
            plain_workers.sort_unstable();
            plain_workers.dedup();
            let mut workers: Vec<u16> = plain_workers
                .iter()
                .copied()
                .chain(shared.iter().map(|(w, ..)| *w))
                .collect();
            workers.sort_unstable();
            workers.dedup();
            for worker in workers {
                let plain = plain_workers.binary_search(&worker).is_ok();
                let groups: Vec<(Box<str>, Box<str>)> = shared
                    .iter()
                    .filter(|(w, ..)| *w == worker)
                    .map(|(_, g, f)| (g.clone(), f.clone()))
                    .collect();
                self.stats.forwarded += 1;
                self.cluster.forward(worker, msg, plain, &groups);
            }
        }
        self.plain_worker_scratch = plain_workers;
        self.shared_target_scratch = shared;
    }

    /// Local plain subscriptions: once per session, overlapping subscriptions merged
    /// (highest QoS, every subscription identifier).
    pub(super) fn deliver_to_plain_subscribers(&mut self, msg: &Rc<Message>, now: Instant) {
        let mut matches = std::mem::take(&mut self.match_scratch);
        matches.clear();
        self.subscriptions
            .for_each_match(msg.topic_str(), |k, v| matches.push((*k, *v)));
        matches.sort_unstable_by_key(|(k, _)| *k);
        let mut i = 0;
        while i < matches.len() {
            let skey = matches[i].0;
            let mut delivery = Delivery::default();
            let mut wanted = false;
            while i < matches.len() && matches[i].0 == skey {
                let opts = matches[i].1;
                i += 1;
                if opts.no_local && msg.origin == Some(skey) {
                    continue;
                }
                wanted = true;
                delivery.qos = delivery.qos.max(opts.qos.min(msg.qos as u8));
                delivery.retain |= opts.retain_as_published && msg.retain;
                if let Some(id) = opts.subscription_id {
                    delivery.subscription_ids.push(id);
                }
            }
            if wanted {
                self.deliver(skey, msg, delivery, now);
            }
        }
        self.match_scratch = matches;
    }

    /// One local member of a shared group, round-robin.
    pub(super) fn deliver_to_shared_group(
        &mut self,
        group: &str,
        filter: &str,
        msg: &Rc<Message>,
        now: Instant,
    ) {
        let Some((skey, opts)) = self.shared.pick(group, filter) else {
            return;
        };
        let delivery = Delivery {
            qos: opts.qos.min(msg.qos as u8),
            retain: opts.retain_as_published && msg.retain,
            subscription_ids: opts.subscription_id.into_iter().collect(),
        };
        self.deliver(skey, msg, delivery, now);
    }

    /// Sends `msg` to session `skey` now if its connection and window allow, else queues it.
    pub(super) fn deliver(
        &mut self,
        skey: usize,
        msg: &Rc<Message>,
        delivery: Delivery,
        now: Instant,
    ) {
        if msg.is_expired(now) {
            self.stats.dropped_expired += 1;
            return;
        }
        let session = &mut self.sessions[skey];
        let window = self.config.limits.max_inflight;
        if let Some(ckey) = session.conn {
            let conn = &mut self.conns[ckey];
            if delivery.qos == 0 {
                if conn.out.len() > MAX_PENDING_OUTPUT {
                    self.stats.dropped_qos0_backlog += 1;
                } else {
                    send_publish(conn, msg, &delivery, 0, false, now, &mut self.stats);
                }
                return;
            }
            if session.queue.is_empty() && session.inflight.len() < window_of(conn, window) {
                start_inflight(conn, session, msg.clone(), delivery, now, &mut self.stats);
                return;
            }
        } else if delivery.qos == 0 {
            // QoS 0 is not kept for offline clients (as Mosquitto's default).
            return;
        }
        if session.queue.len() >= self.config.limits.max_queued_messages {
            self.stats.dropped_queue_full += 1;
            if self.stats.dropped_queue_full.is_power_of_two() {
                tracing::warn!(client_id = %session.client_id, dropped = self.stats.dropped_queue_full, "session queue full: messages dropped");
            }
            return;
        }
        session.queue.push_back(Queued {
            msg: msg.clone(),
            delivery,
        });
    }

    /// After (re)connecting: resend what is inflight (PUBLISH with DUP, or PUBREL), then
    /// fill the window from the queue (MQTT-4.4.0-1).
    pub(super) fn resume_delivery(&mut self, skey: usize, now: Instant) {
        let session = &mut self.sessions[skey];
        let Some(ckey) = session.conn else {
            return;
        };
        let conn = &mut self.conns[ckey];
        for m in session.inflight.iter() {
            match m.state {
                InflightState::AwaitingAck => {
                    send_publish(
                        conn,
                        &m.msg,
                        &m.delivery,
                        m.pkid,
                        true,
                        now,
                        &mut self.stats,
                    );
                }
                InflightState::AwaitingComp => conn.send(&pubrel(m.pkid, PubRelReason::Success)),
            }
        }
        self.pump_queue(skey, now);
    }

    /// Moves queued messages into the inflight window while it has room.
    fn pump_queue(&mut self, skey: usize, now: Instant) {
        let session = &mut self.sessions[skey];
        let Some(ckey) = session.conn else {
            return;
        };
        let conn = &mut self.conns[ckey];
        let window = window_of(conn, self.config.limits.max_inflight);
        while session.inflight.len() < window {
            let Some(q) = session.queue.pop_front() else {
                break;
            };
            if q.msg.is_expired(now) {
                self.stats.dropped_expired += 1;
                continue;
            }
            start_inflight(conn, session, q.msg, q.delivery, now, &mut self.stats);
        }
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
        let session = &mut self.sessions[skey];
        match session.inflight_position(pkid) {
            Some(pos) if session.inflight[pos].state == expected => {
                session.inflight.remove(pos);
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
                session.inflight.remove(pos);
                self.pump_queue(skey, now);
            }
            Some(pos) => {
                session.inflight[pos].state = InflightState::AwaitingComp;
                conn.send(&pubrel(rec.pkid, PubRelReason::Success));
            }
            None => conn.send(&pubrel(rec.pkid, PubRelReason::PacketIdentifierNotFound)),
        }
    }

    pub(super) fn handle_pubrel(&mut self, key: ConnKey, pkid: u16) {
        let Some(skey) = self.conns[key].session else {
            return;
        };
        let pending = &mut self.sessions[skey].incoming_qos2;
        let reason = match pending.iter().position(|&id| id == pkid) {
            Some(pos) => {
                pending.swap_remove(pos);
                PubCompReason::Success
            }
            None => PubCompReason::PacketIdentifierNotFound,
        };
        let comp = Packet::PubComp(PubComp {
            pkid,
            reason,
            properties: None,
        });
        self.acknowledge(key, comp, false);
    }

    pub(super) fn handle_disconnect(&mut self, key: ConnKey, d: Disconnect, now: Instant) {
        if let Some(skey) = self.conns[key].session {
            let requested = d
                .properties
                .as_ref()
                .and_then(|p| p.session_expiry_interval);
            if let Some(expiry) = requested {
                let session = &mut self.sessions[skey];
                if session.expiry_secs == 0 && expiry > 0 {
                    // MQTT-3.14.2-2: expiry 0 at CONNECT cannot be raised at DISCONNECT.
                    return self.protocol_error(
                        key,
                        DisconnectReasonCode::ProtocolError,
                        "session expiry raised from 0",
                        now,
                    );
                }
                session.expiry_secs = expiry.min(self.config.limits.max_session_expiry_secs);
            }
        }
        let with_will = d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
        self.conns[key].close();
        self.end_connection(key, with_will, now);
    }
}

/// Copies topic and payload into one allocation of their own. They arrive as slices of the
/// worker's 64 KiB read buffer; a message that will be kept (QoS 1/2 windows and queues,
/// retained) must not pin that whole buffer. QoS 0 is never kept, so it skips the copy.
fn detach(topic: &Bytes, payload: &Bytes) -> (Bytes, Bytes) {
    let mut both = BytesMut::with_capacity(topic.len() + payload.len());
    both.extend_from_slice(topic);
    both.extend_from_slice(payload);
    let mut both = both.freeze();
    let payload = both.split_off(topic.len());
    (both, payload)
}

fn valid_topic(topic: &[u8]) -> bool {
    std::str::from_utf8(topic).is_ok_and(|t| topic_trie::validate_topic_name(t).is_ok())
}

fn is_empty_props(p: &PublishProperties) -> bool {
    p.payload_format_indicator.is_none()
        && p.message_expiry_interval.is_none()
        && p.response_topic.is_none()
        && p.correlation_data.is_none()
        && p.user_properties.is_empty()
        && p.content_type.is_none()
}

fn is_error_reason(r: &PubRecReason) -> bool {
    !matches!(
        r,
        PubRecReason::Success | PubRecReason::NoMatchingSubscribers
    )
}

fn pubrec(pkid: u16) -> Packet {
    Packet::PubRec(PubRec {
        pkid,
        reason: PubRecReason::Success,
        properties: None,
    })
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
fn start_inflight(
    conn: &mut Conn,
    session: &mut Session,
    msg: Rc<Message>,
    delivery: Delivery,
    now: Instant,
    stats: &mut Stats,
) {
    let pkid = session.next_pkid();
    if send_publish(conn, &msg, &delivery, pkid, false, now, stats) {
        session.inflight.push_back(Inflight {
            pkid,
            msg,
            delivery,
            state: InflightState::AwaitingAck,
        });
    }
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
    stats.messages_sent += 1;
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
    let mut props = msg.properties.clone().unwrap_or_default();
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
