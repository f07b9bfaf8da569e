//! SUBSCRIBE and UNSUBSCRIBE: per-filter checks and results, the subscription index, the
//! cluster's route table, and retained messages sent on subscribe.

use std::rc::Rc;
use std::time::Instant;

use topic_trie::{SubscriptionFilter, SubscriptionOptions};

use super::message::{Delivery, Message};
use super::{ConnKey, Engine};
use crate::protocol::{
    qos_from_u8, DisconnectReasonCode, Filter, Packet, RetainForwardRule, SubAck, Subscribe,
    SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};

/// What one filter of a SUBSCRIBE came to.
enum FilterOutcome {
    Granted(u8),
    Refused(SubscribeReasonCode),
    /// An error that ends the connection (No Local on a shared subscription, U+0000).
    Fatal(DisconnectReasonCode, &'static str),
}

impl Engine {
    pub(super) fn handle_subscribe(&mut self, key: ConnKey, s: Subscribe, now: Instant) {
        let subscription_id = s.properties.as_ref().and_then(|p| p.id);
        if let Some(id) = subscription_id {
            if id == 0 || id > 268_435_455 {
                return self.protocol_error(
                    key,
                    DisconnectReasonCode::ProtocolError,
                    "subscription identifier out of range",
                    now,
                );
            }
            if !self.config.mqtt.subscription_identifiers {
                return self.protocol_error(
                    key,
                    DisconnectReasonCode::SubscriptionIdentifiersNotSupported,
                    "subscription identifiers not supported",
                    now,
                );
            }
        }
        let Some(skey) = self.conns[key].session else {
            return;
        };
        let subscription_id = subscription_id.map(|id| id as u32);
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained: Vec<(Rc<Message>, Delivery)> = Vec::new();
        for filter in &s.filters {
            let code = match self.subscribe_one(skey, filter, subscription_id, &mut retained, now) {
                FilterOutcome::Granted(qos) => SubscribeReasonCode::Success(qos_from_u8(qos)),
                FilterOutcome::Refused(code) => code,
                FilterOutcome::Fatal(reason, why) => {
                    return self.protocol_error(key, reason, why, now)
                }
            };
            codes.push(code);
        }
        // SUBACK goes out before the retained messages it unlocks (MQTT-3.8.4-4 ordering).
        self.conns[key].send(&Packet::SubAck(SubAck {
            pkid: s.pkid,
            return_codes: codes,
            properties: None,
        }));
        for (msg, delivery) in retained {
            self.deliver(skey, &msg, delivery, now);
        }
    }

    fn subscribe_one(
        &mut self,
        skey: usize,
        f: &Filter,
        subscription_id: Option<u32>,
        retained: &mut Vec<(Rc<Message>, Delivery)>,
        now: Instant,
    ) -> FilterOutcome {
        if f.path.contains('\0') {
            // U+0000 in any MQTT string makes the packet malformed (MQTT-1.5.4-2), which
            // closes the connection, unlike a filter that is merely invalid.
            return FilterOutcome::Fatal(
                DisconnectReasonCode::MalformedPacket,
                "U+0000 in a topic filter",
            );
        }
        let mqtt = &self.config.mqtt;
        let parsed = match topic_trie::parse_subscription_filter(&f.path) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(filter = %f.path, "invalid topic filter: {e}");
                return FilterOutcome::Refused(SubscribeReasonCode::TopicFilterInvalid);
            }
        };
        let inner = match parsed {
            SubscriptionFilter::Plain(filter) => filter,
            SubscriptionFilter::Shared { filter, .. } => {
                if !mqtt.shared_subscriptions {
                    return FilterOutcome::Refused(
                        SubscribeReasonCode::SharedSubscriptionsNotSupported,
                    );
                }
                if f.nolocal {
                    return FilterOutcome::Fatal(
                        DisconnectReasonCode::ProtocolError,
                        "No Local on a shared subscription",
                    );
                }
                filter
            }
        };
        if !mqtt.wildcard_subscriptions && inner.contains(['+', '#']) {
            return FilterOutcome::Refused(SubscribeReasonCode::WildcardSubscriptionsNotSupported);
        }
        let granted = (f.qos as u8).min(mqtt.maximum_qos);
        let retain_handling = match f.retain_forward_rule {
            RetainForwardRule::OnEverySubscribe => 0,
            RetainForwardRule::OnNewSubscribe => 1,
            RetainForwardRule::Never => 2,
        };
        let opts = SubscriptionOptions {
            qos: granted,
            no_local: f.nolocal,
            retain_as_published: f.preserve_retain,
            retain_handling,
            subscription_id,
        };
        let existed = self.sessions[skey]
            .subscriptions
            .insert(f.path.as_str().into(), opts)
            .is_some();
        match parsed {
            SubscriptionFilter::Plain(filter) => {
                self.subscriptions.insert(filter, skey, opts);
            }
            SubscriptionFilter::Shared { group, filter } => {
                self.subscriptions.insert_shared(group, filter, skey, opts);
            }
        }
        if !existed {
            self.add_route(inner);
        }
        // Retained messages are never sent for shared subscriptions (MQTT-4.8.2-5 note).
        let wants_retained = matches!(parsed, SubscriptionFilter::Plain(_))
            && (retain_handling == 0 || (retain_handling == 1 && !existed));
        if wants_retained {
            let mut found = Vec::new();
            self.retained.matching(inner, now, &mut found);
            retained.extend(found.into_iter().map(|msg| {
                let delivery = Delivery {
                    qos: granted.min(msg.qos as u8),
                    retain: true,
                    subscription_ids: subscription_id.into_iter().collect(),
                };
                (msg, delivery)
            }));
        }
        FilterOutcome::Granted(granted)
    }

    pub(super) fn handle_unsubscribe(&mut self, key: ConnKey, u: Unsubscribe, now: Instant) {
        if u.filters.iter().any(|f| f.contains('\0')) {
            let reason = DisconnectReasonCode::MalformedPacket;
            return self.protocol_error(key, reason, "U+0000 in a topic filter", now);
        }
        let Some(skey) = self.conns[key].session else {
            return;
        };
        let mut reasons = Vec::with_capacity(u.filters.len());
        for filter in &u.filters {
            let existed = self.sessions[skey]
                .subscriptions
                .remove(filter.as_str())
                .is_some();
            if existed {
                self.remove_subscription(skey, filter);
                reasons.push(UnsubAckReason::Success);
            } else {
                reasons.push(UnsubAckReason::NoSubscriptionExisted);
            }
        }
        self.conns[key].send(&Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            reasons,
            properties: None,
        }));
    }

    /// Removes one of a session's filters (as the client sent it) from the index.
    pub(super) fn remove_subscription(&mut self, skey: usize, filter: &str) {
        let inner = match topic_trie::parse_subscription_filter(filter) {
            Ok(SubscriptionFilter::Plain(f)) => {
                self.subscriptions.remove(f, &skey);
                f
            }
            Ok(SubscriptionFilter::Shared { group, filter: f }) => {
                self.subscriptions.remove_shared(group, f, &skey);
                f
            }
            Err(_) => return,
        };
        self.remove_route(inner);
    }

    fn add_route(&mut self, filter: &str) {
        let refs = self.route_refs.entry(filter.into()).or_insert(0);
        *refs += 1;
        if *refs == 1 {
            self.cluster.route_added(filter);
        }
    }

    fn remove_route(&mut self, filter: &str) {
        if let Some(refs) = self.route_refs.get_mut(filter) {
            *refs -= 1;
            if *refs == 0 {
                self.route_refs.remove(filter);
                self.cluster.route_removed(filter);
            }
        }
    }
}
