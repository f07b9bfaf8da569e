//! Inbound PUBLISH: accepting a client's PUBLISH (aliases, validation, QoS 1/2 handshakes,
//! acknowledgements in order), retained messages and wills, and routing a message to the
//! matching local sessions and workers. Delivery to one session is in `deliver.rs`.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::conn::HeldAcks;
use super::flow::{Behind, Source};
use super::rate::Rate;
use super::{ConnKey, Engine};
use crate::config::{Limits, RateLimitAction};
use crate::model::{Delivery, Message, NodeId, SessionKey, SharedTarget};
use crate::protocol::{
    Disconnect, DisconnectReasonCode, Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecReason, Publish, PublishProperties, QoS,
};
use crate::router::RouteKind;

/// A client's PUBLISH that passed the checks against the config and the protocol: its
/// topic is resolved (from the topic alias, if it used one) and valid, and the alias is
/// gone from its properties.
struct ValidPublish {
    topic: Bytes,
    payload: Bytes,
    properties: Option<PublishProperties>,
    qos: QoS,
    retain: bool,
    pkid: u16,
}

impl Engine {
    pub(super) fn handle_publish(&mut self, key: ConnKey, p: Publish, now: Instant) {
        if !self.within_publish_rate(key, p.payload.len(), now) {
            return;
        }
        let publish = match self.validate_publish(key, p) {
            Ok(publish) => publish,
            Err((reason, why)) => return self.protocol_error(key, reason, why, now),
        };
        let Some(skey) = self.conns[key].session else {
            return;
        };
        if publish.qos == QoS::ExactlyOnce
            && !self.record_incoming_qos2(key, skey, publish.pkid, now)
        {
            return;
        }
        self.accept_publish(key, skey, publish, now);
    }

    /// Checks a client's PUBLISH against the config and the protocol; the error is the
    /// reason to close the connection with. The order of the checks decides which reason a
    /// client gets when several fail. Resolving the topic alias reads the connection's alias
    /// table, and a PUBLISH that sets an alias adds to it.
    fn validate_publish(
        &mut self,
        key: ConnKey,
        p: Publish,
    ) -> Result<ValidPublish, (DisconnectReasonCode, &'static str)> {
        let mqtt = &self.config.mqtt;
        if p.qos as u8 > mqtt.maximum_qos {
            return Err((DisconnectReasonCode::QoSNotSupported, "QoS not supported"));
        }
        if p.retain && !mqtt.retain_available {
            return Err((
                DisconnectReasonCode::RetainNotSupported,
                "retain not supported",
            ));
        }
        let mut topic = p.topic;
        let mut properties = p.properties;
        if let Some(props) = properties.as_mut() {
            if !props.subscription_identifiers.is_empty() {
                // MQTT-3.3.4-6: only the server sends subscription identifiers.
                return Err((
                    DisconnectReasonCode::ProtocolError,
                    "subscription identifier in PUBLISH",
                ));
            }
            if let Some(alias) = props.topic_alias.take() {
                if alias == 0 || alias > self.config.limits.max_topic_alias {
                    return Err((
                        DisconnectReasonCode::TopicAliasInvalid,
                        "topic alias out of range",
                    ));
                }
                let conn = &mut self.conns[key];
                if topic.is_empty() {
                    match conn.aliases().inbound.get(&alias) {
                        Some(t) => topic = t.clone(),
                        None => {
                            return Err((
                                DisconnectReasonCode::ProtocolError,
                                "unknown topic alias",
                            ))
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
            return Err((DisconnectReasonCode::TopicNameInvalid, "invalid topic name"));
        }
        if let Some(props) = &properties {
            if props.payload_format_indicator == Some(1) && std::str::from_utf8(&p.payload).is_err()
            {
                return Err((
                    DisconnectReasonCode::PayloadFormatInvalid,
                    "payload is not UTF-8",
                ));
            }
        }
        Ok(ValidPublish {
            topic,
            payload: p.payload,
            properties,
            qos: p.qos,
            retain: p.retain,
            pkid: p.pkid,
        })
    }

    /// Records the packet id of an inbound QoS 2 PUBLISH until its PUBREL. False if the
    /// message goes no further: a resend of one already accepted (PUBREC sent again, so it
    /// is delivered once) or one over the receive maximum (the connection is closed).
    fn record_incoming_qos2(
        &mut self,
        key: ConnKey,
        skey: SessionKey,
        pkid: u16,
        now: Instant,
    ) -> bool {
        let session = &mut self.sessions[skey];
        if session.incoming_qos2.contains(&pkid) {
            // A resend of a message already accepted: acknowledge again, deliver once.
            self.conns[key].send(&pubrec(pkid));
            return false;
        }
        // v5 announces Receive Maximum in CONNACK; 3.1.1 has no such limit, so there the
        // packet id space (65535) is the bound.
        let limit = if self.conns[key].version.is_v5() {
            self.config.limits.receive_maximum as usize
        } else {
            u16::MAX as usize
        };
        if session.incoming_qos2.len() >= limit {
            self.protocol_error(
                key,
                DisconnectReasonCode::ReceiveMaximumExceeded,
                "receive maximum exceeded",
                now,
            );
            return false;
        }
        session.incoming_qos2.push(pkid);
        true
    }

    /// Turns an accepted PUBLISH into a message from session `skey`, stores it if retained,
    /// routes it and acknowledges it.
    fn accept_publish(
        &mut self,
        key: ConnKey,
        skey: SessionKey,
        publish: ValidPublish,
        now: Instant,
    ) {
        let ValidPublish {
            topic,
            payload,
            mut properties,
            qos,
            retain,
            pkid,
        } = publish;
        let expires_at = properties
            .as_ref()
            .and_then(|pr| pr.message_expiry_interval)
            .map(|s| now + Duration::from_secs(s as u64));
        let (topic, payload) = if qos != QoS::AtMostOnce || retain {
            if let Some(data) = properties
                .as_mut()
                .and_then(|pr| pr.correlation_data.as_mut())
            {
                *data = Bytes::copy_from_slice(data);
            }
            detach(&topic, &payload)
        } else {
            (topic, payload)
        };
        let msg = Rc::new(Message {
            topic,
            payload,
            qos,
            retain,
            properties: properties.filter(|pr| !is_empty_props(pr)).map(Box::new),
            expires_at,
            origin: Some(skey),
        });
        self.stats.messages_received[qos as usize] += 1;
        if msg.retain {
            self.store_retained(&msg);
        }
        self.route(&msg, Source::Client(key), now);
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let ack = Packet::PubAck(PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                    properties: None,
                });
                self.acknowledge(key, ack, msg.retain);
            }
            QoS::ExactlyOnce => self.acknowledge(key, pubrec(pkid), msg.retain),
        }
    }

    /// Charges a PUBLISH to the client's rate limit. Over it, the client is paused (its
    /// input is not read until its buckets refill; this PUBLISH still goes through) or
    /// disconnected (v5: 0x96, and this PUBLISH is dropped), as configured.
    fn within_publish_rate(&mut self, key: ConnKey, payload: usize, now: Instant) -> bool {
        let (packets, bytes) = publish_rates(&self.config.limits);
        if !packets.is_limited() && !bytes.is_limited() {
            return true;
        }
        let now_ms = self.millis(now);
        let conn = &mut self.conns[key];
        let wait = conn.publish_buckets.take(packets, bytes, payload, now_ms);
        if wait == 0 {
            return true;
        }
        match self.config.limits.rate_limit_action {
            RateLimitAction::Throttle => {
                self.stats.rate_limited_publishes += 1;
                // Never 0, which means "not paused".
                conn.paused_until_ms = now_ms.wrapping_add(wait).max(1);
                true
            }
            RateLimitAction::Disconnect => {
                self.stats.rate_limit_disconnects += 1;
                tracing::warn!(conn = key, "publish rate exceeded: disconnecting");
                conn.disconnect(
                    DisconnectReasonCode::MessageRateTooHigh,
                    "publish rate exceeded",
                );
                self.end_connection(key, true, now);
                false
            }
        }
    }

    /// Sends a PUBACK/PUBREC/PUBCOMP, in order with the connection's earlier ones. The ack
    /// of a retained PUBLISH waits until every peer has stored the message (a barrier after
    /// the `Retained` frame), so a subscriber on any worker sees what was acknowledged;
    /// later acks of the connection queue behind it (acks go in PUBLISH order, MQTT-4.6).
    /// Sends `ack` now, or holds it (behind any held before it, so acknowledgements keep
    /// their order) until what it promises holds cluster-wide: a retained message stored
    /// on every peer (a barrier), and what was forwarded for it handed to a backend that
    /// confirms (`Cluster::unconfirmed_forwards`, e.g. written to Redis). Neither is timed
    /// out the same way: a barrier is given up after `cluster.barrier_timeout_ms` (a hung
    /// peer), a confirmation never is (the client's window pushes back instead).
    fn acknowledge(&mut self, key: ConnKey, ack: Packet, retained: bool) {
        let barrier = if retained { self.start_barrier() } else { None };
        let confirmation = self.cluster.unconfirmed_forwards();
        let conn = &mut self.conns[key];
        match &mut conn.held_acks {
            Some(held) => {
                held.barrier = held.barrier.max(barrier.unwrap_or(0));
                held.confirmation = held.confirmation.max(confirmation.unwrap_or(0));
                held.acks.push(ack);
            }
            None if barrier.is_some() || confirmation.is_some() => {
                conn.held_acks = Some(Box::new(HeldAcks {
                    barrier: barrier.unwrap_or(0),
                    confirmation: confirmation.unwrap_or(0),
                    acks: vec![ack],
                }));
                self.holding_acks.push(key);
            }
            None => conn.send(&ack),
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
        self.route(&msg, Source::Broker, now);
    }

    /// Delivers `msg` to the local sessions that subscribe to it, and forwards it to the
    /// workers that have matching routes: each such worker gets it once, for its plain
    /// subscriptions and for the shared groups the route table picked it to serve.
    /// `source` waits if a destination is behind (see `flow.rs`).
    pub(super) fn route(&mut self, msg: &Rc<Message>, source: Source, now: Instant) {
        self.deliver_to_plain_subscribers(msg, source, now);
        let mut plain_workers = std::mem::take(&mut self.plain_worker_scratch);
        let mut shared = std::mem::take(&mut self.shared_target_scratch);
        plain_workers.clear();
        shared.clear();
        let me = self.me;
        self.routes
            .for_each_match(msg.topic_str(), |&worker, kind| match kind {
                RouteKind::Plain if worker != me => plain_workers.push(worker),
                RouteKind::Plain => {}
                RouteKind::Shared(target) => shared.push((worker, target.clone())),
            });
        for (_, target) in shared.iter().filter(|(w, _)| *w == me) {
            self.deliver_to_shared_group(&target.group, &target.filter, msg, source, now);
        }
        shared.retain(|(w, _)| *w != me);
        plain_workers.sort_unstable();
        plain_workers.dedup();
        if shared.is_empty() {
            // The common case: plain routes only, one frame per worker, nothing allocated.
            for &worker in &plain_workers {
                self.stats.forwarded += 1;
                if self.cluster.forward(worker, msg, true, &[]) {
                    self.wait_for(source, Behind::Peer(worker));
                }
            }
        } else {
            let mut workers: Vec<NodeId> = plain_workers
                .iter()
                .copied()
                .chain(shared.iter().map(|(w, _)| *w))
                .collect();
            workers.sort_unstable();
            workers.dedup();
            for worker in workers {
                let plain = plain_workers.binary_search(&worker).is_ok();
                let groups: Vec<SharedTarget> = shared
                    .iter()
                    .filter(|(w, _)| *w == worker)
                    .map(|(_, target)| target.clone())
                    .collect();
                self.stats.forwarded += 1;
                if self.cluster.forward(worker, msg, plain, &groups) {
                    self.wait_for(source, Behind::Peer(worker));
                }
            }
        }
        self.plain_worker_scratch = plain_workers;
        self.shared_target_scratch = shared;
    }

    /// Local plain subscriptions: once per session, overlapping subscriptions merged
    /// (highest QoS, every subscription identifier).
    pub(super) fn deliver_to_plain_subscribers(
        &mut self,
        msg: &Rc<Message>,
        source: Source,
        now: Instant,
    ) {
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
                self.deliver(skey, msg, delivery, source, now);
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
        source: Source,
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
        self.deliver(skey, msg, delivery, source, now);
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
        // Only Normal disconnection (0x00) deletes the will (v5 §3.14.4, MQTT-3.14.4-3):
        // 0x04 asks for it, and any error reason the client gives is an abnormal end.
        // A 3.1.1 DISCONNECT is decoded as 0x00.
        let with_will = d.reason_code != DisconnectReasonCode::NormalDisconnection;
        if with_will {
            tracing::debug!(conn = key, reason = ?d.reason_code, "client DISCONNECT: will is due");
        }
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

pub(super) fn is_empty_props(p: &PublishProperties) -> bool {
    p.payload_format_indicator.is_none()
        && p.message_expiry_interval.is_none()
        && p.response_topic.is_none()
        && p.correlation_data.is_none()
        && p.user_properties.is_empty()
        && p.content_type.is_none()
}

fn pubrec(pkid: u16) -> Packet {
    Packet::PubRec(PubRec {
        pkid,
        reason: PubRecReason::Success,
        properties: None,
    })
}

/// The per-client publish limits (packets, payload bytes) from the config.
pub(super) fn publish_rates(limits: &Limits) -> (Rate, Rate) {
    (
        Rate::new(limits.publish_rate as f32, limits.publish_burst as f32),
        Rate::new(
            limits.publish_bytes_rate as f32,
            limits.publish_bytes_burst as f32,
        ),
    )
}
