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
use crate::router::Route;

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
        let mut new_route = false;
        for filter in &s.filters {
            let outcome = self.subscribe_one(
                skey,
                filter,
                subscription_id,
                &mut retained,
                &mut new_route,
                now,
            );
            let code = match outcome {
                FilterOutcome::Granted(qos) => SubscribeReasonCode::Success(qos_from_u8(qos)),
                FilterOutcome::Refused(code) => code,
                FilterOutcome::Fatal(reason, why) => {
                    return self.protocol_error(key, reason, why, now)
                }
            };
            codes.push(code);
        }
        let suback = Packet::SubAck(SubAck {
            pkid: s.pkid,
            return_codes: codes,
            properties: None,
        });
        // A new route must be known to every worker before SUBACK: a client that
        // publishes after its SUBACK, through any worker, must reach this subscription.
        let parked = ParkedSubAck {
            conn: key,
            session: skey,
            suback,
            retained,
        };
        match new_route.then(|| self.cluster.barrier()).flatten() {
            Some(barrier) => self.parked_subacks.push((barrier, parked)),
            None => self.complete_subscribe(parked, now),
        }
    }

    /// Sends a SUBACK and then the retained messages it unlocks (in that order).
    pub(super) fn complete_subscribe(&mut self, parked: ParkedSubAck, now: Instant) {
        let Some(conn) = self.conns.get_mut(parked.conn) else {
            return;
        };
        if conn.session != Some(parked.session) {
            return; // the connection went away while the cluster confirmed the route
        }
        conn.send(&parked.suback);
        for (msg, delivery) in parked.retained {
            self.deliver(parked.session, &msg, delivery, now);
        }
    }

    fn subscribe_one(
        &mut self,
        skey: usize,
        f: &Filter,
        subscription_id: Option<u32>,
        retained: &mut Vec<(Rc<Message>, Delivery)>,
        new_route: &mut bool,
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
        let route = match parsed {
            SubscriptionFilter::Plain(filter) => {
                self.subscriptions.insert(filter, skey, opts);
                Route {
                    filter: filter.into(),
                    group: None,
                }
            }
            SubscriptionFilter::Shared { group, filter } => {
                self.shared.insert(group, filter, skey, opts);
                Route {
                    filter: filter.into(),
                    group: Some(group.into()),
                }
            }
        };
        if !existed {
            *new_route |= self.add_route(route);
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

    /// Re-creates a subscription of an imported session (options already negotiated).
    pub(super) fn restore_subscription(
        &mut self,
        skey: usize,
        filter: &str,
        opts: topic_trie::SubscriptionOptions,
    ) {
        let route = match topic_trie::parse_subscription_filter(filter) {
            Ok(SubscriptionFilter::Plain(f)) => {
                self.subscriptions.insert(f, skey, opts);
                Route {
                    filter: f.into(),
                    group: None,
                }
            }
            Ok(SubscriptionFilter::Shared { group, filter: f }) => {
                self.shared.insert(group, f, skey, opts);
                Route {
                    filter: f.into(),
                    group: Some(group.into()),
                }
            }
            Err(_) => return,
        };
        self.sessions[skey]
            .subscriptions
            .insert(filter.into(), opts);
        self.add_route(route);
    }

    /// Removes one of a session's filters (as the client sent it) from the index.
    pub(super) fn remove_subscription(&mut self, skey: usize, filter: &str) {
        let route = match topic_trie::parse_subscription_filter(filter) {
            Ok(SubscriptionFilter::Plain(f)) => {
                self.subscriptions.remove(f, &skey);
                Route {
                    filter: f.into(),
                    group: None,
                }
            }
            Ok(SubscriptionFilter::Shared { group, filter: f }) => {
                self.shared.remove(group, f, skey);
                Route {
                    filter: f.into(),
                    group: Some(group.into()),
                }
            }
            Err(_) => return,
        };
        self.remove_route(route);
    }

    /// Counts a local subscription to `route`; the first one is announced to the cluster.
    /// Returns true if the route is new on this worker.
    fn add_route(&mut self, route: Route) -> bool {
        let refs = self.route_refs.entry(route.clone()).or_insert(0);
        *refs += 1;
        if *refs > 1 {
            return false;
        }
        self.routes.add(self.index, &route);
        self.cluster.route_added(&route);
        true
    }

    fn remove_route(&mut self, route: Route) {
        if let Some(refs) = self.route_refs.get_mut(&route) {
            *refs -= 1;
            if *refs == 0 {
                self.route_refs.remove(&route);
                self.routes.remove(self.index, &route);
                self.cluster.route_removed(&route);
            }
        }
    }
}

/// A SUBACK waiting for the cluster to confirm a new route (see `Cluster::barrier`).
#[derive(Debug)]
pub(crate) struct ParkedSubAck {
    conn: ConnKey,
    session: usize,
    suback: Packet,
    retained: Vec<(Rc<Message>, Delivery)>,
}
