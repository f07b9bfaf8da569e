//! SUBSCRIBE and UNSUBSCRIBE: per-filter checks and results, the subscription index, the
//! cluster's route table, and retained messages sent on subscribe.

use std::rc::Rc;
use std::time::Instant;

use topic_trie::{SubscriptionFilter, SubscriptionOptions};

use super::flow::Source;
use super::{ConnKey, Engine};
use crate::model::Route;
use crate::model::{Delivery, Message, SessionKey};
use crate::protocol::{
    qos_from_u8, DisconnectReasonCode, Filter, Packet, RetainForwardRule, SubAck, Subscribe,
    SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};

/// What one filter of a SUBSCRIBE came to.
enum FilterOutcome {
    Granted(Granted),
    Refused(SubscribeReasonCode),
    /// An error that ends the connection (No Local on a shared subscription, U+0000).
    Fatal(DisconnectReasonCode, &'static str),
}

/// A granted filter, not yet active (see [`ParkedSubAck`]).
#[derive(Debug)]
pub(crate) struct Granted {
    /// The filter as the client sent it (with `$share/g/` if shared).
    path: String,
    route: Route,
    opts: SubscriptionOptions,
    /// This subscription was counted in the route refs when it was announced.
    counted: bool,
}

/// A SUBSCRIBE whose filters become active, and whose SUBACK goes out, once the cluster has
/// confirmed its new routes: from then on a PUBLISH through any worker reaches them, and the
/// retained messages read at that moment include every retained PUBLISH acknowledged before.
#[derive(Debug)]
pub(crate) struct ParkedSubAck {
    conn: ConnKey,
    session: SessionKey,
    suback: Packet,
    granted: Vec<Granted>,
    /// Answers to the connection's later UNSUBSCRIBEs, which go out after this SUBACK.
    then: Vec<Packet>,
}

impl Engine {
    pub(super) fn handle_subscribe(&mut self, key: ConnKey, s: Subscribe, now: Instant) {
        let subscription_id = s.properties.as_ref().and_then(|p| p.id);
        if let Some(id) = subscription_id {
            if id == 0 || id > 268_435_455 {
                let why = "subscription identifier out of range";
                return self.protocol_error(key, DisconnectReasonCode::ProtocolError, why, now);
            }
            if !self.config.mqtt.subscription_identifiers {
                let reason = DisconnectReasonCode::SubscriptionIdentifiersNotSupported;
                return self.protocol_error(
                    key,
                    reason,
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
        let mut granted = Vec::with_capacity(s.filters.len());
        for filter in &s.filters {
            match self.check_filter(filter, subscription_id) {
                FilterOutcome::Granted(g) => {
                    codes.push(SubscribeReasonCode::Success(qos_from_u8(g.opts.qos)));
                    granted.push(g);
                }
                FilterOutcome::Refused(code) => codes.push(code),
                FilterOutcome::Fatal(reason, why) => {
                    return self.protocol_error(key, reason, why, now)
                }
            }
        }
        // Announce the routes this worker did not have; the peers confirm them (barrier)
        // before the filters go live and the SUBACK goes out.
        let mut new_route = false;
        for g in granted.iter_mut() {
            if !self.sessions[skey]
                .subscriptions
                .contains_key(g.path.as_str())
            {
                g.counted = true;
                new_route |= self.add_route(g.route.clone());
            }
        }
        let suback = Packet::SubAck(SubAck {
            pkid: s.pkid,
            return_codes: codes,
            properties: None,
        });
        let parked = ParkedSubAck {
            conn: key,
            session: skey,
            suback,
            granted,
            then: Vec::new(),
        };
        let barrier = new_route.then(|| self.cluster.barrier()).flatten();
        if barrier.is_some() {
            self.route_barrier = barrier;
        }
        // A route this SUBSCRIBE shares with an earlier one may not be confirmed yet either:
        // then it waits for the latest announcement's barrier too.
        match barrier.or(self.route_barrier) {
            Some(barrier) => self.parked_subacks.push((barrier, parked)),
            None => self.complete_subscribe(parked, now),
        }
    }

    /// Barrier `id` completed (and every earlier one): the SUBSCRIBEs waiting for it go live,
    /// in the order they arrived.
    pub(super) fn route_barrier_done(&mut self, id: u64, now: Instant) {
        if self.route_barrier.is_some_and(|b| b <= id) {
            self.route_barrier = None;
        }
        if self.parked_subacks.is_empty() {
            return;
        }
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked_subacks)
            .into_iter()
            .partition(|(barrier, _)| *barrier <= id);
        self.parked_subacks = waiting;
        for (_, parked) in done {
            self.complete_subscribe(parked, now);
        }
    }

    /// Connection `key` is gone: its parked SUBSCRIBEs are dropped with it (their routes
    /// uncounted), so nothing reaches a later connection that reuses the slot.
    pub(super) fn drop_parked_subscribes(&mut self, key: ConnKey) {
        if !self.parked_subacks.iter().any(|(_, p)| p.conn == key) {
            return;
        }
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked_subacks)
            .into_iter()
            .partition(|(_, p)| p.conn == key);
        self.parked_subacks = kept;
        for (_, parked) in gone {
            for g in parked.granted.into_iter().filter(|g| g.counted) {
                self.remove_route(g.route);
            }
        }
    }

    /// Activates the granted filters, sends the SUBACK, then the retained messages it
    /// unlocks (in that order, MQTT-3.8.4).
    pub(super) fn complete_subscribe(&mut self, parked: ParkedSubAck, now: Instant) {
        let alive = self
            .conns
            .get(parked.conn)
            .is_some_and(|c| c.session == Some(parked.session));
        if !alive {
            // The connection went away while the cluster confirmed the routes.
            for g in parked.granted.into_iter().filter(|g| g.counted) {
                self.remove_route(g.route);
            }
            return;
        }
        let skey = parked.session;
        let mut retained: Vec<(Rc<Message>, Delivery)> = Vec::new();
        for g in parked.granted {
            let existed = self.sessions[skey]
                .subscriptions
                .insert(g.path.as_str().into(), g.opts)
                .is_some();
            if existed && g.counted {
                self.remove_route(g.route.clone()); // counted twice by overlapping SUBSCRIBEs
            }
            match &g.route.group {
                None => {
                    self.subscriptions.insert(&g.route.filter, skey, g.opts);
                }
                Some(group) => {
                    self.shared.insert(group, &g.route.filter, skey, g.opts);
                }
            }
            // Retained messages are never sent for shared subscriptions (MQTT-4.8.2-5 note).
            let rh = g.opts.retain_handling;
            if g.route.group.is_none() && (rh == 0 || (rh == 1 && !existed)) {
                let mut found = Vec::new();
                self.retained.matching(&g.route.filter, now, &mut found);
                retained.extend(found.into_iter().map(|msg| {
                    let delivery = Delivery {
                        qos: g.opts.qos.min(msg.qos as u8),
                        retain: true,
                        subscription_ids: g.opts.subscription_id.into_iter().collect(),
                    };
                    (msg, delivery)
                }));
            }
        }
        self.conns[parked.conn].send(&parked.suback);
        for packet in &parked.then {
            self.conns[parked.conn].send(packet);
        }
        for (msg, delivery) in retained {
            self.deliver(skey, &msg, delivery, Source::Broker, now);
        }
    }

    /// Checks one filter of a SUBSCRIBE against the spec and this broker's features.
    fn check_filter(&self, f: &Filter, subscription_id: Option<u32>) -> FilterOutcome {
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
        let route = match parsed {
            SubscriptionFilter::Plain(filter) => Route {
                filter: filter.into(),
                group: None,
            },
            SubscriptionFilter::Shared { group, filter } => {
                if !mqtt.shared_subscriptions {
                    return FilterOutcome::Refused(
                        SubscribeReasonCode::SharedSubscriptionsNotSupported,
                    );
                }
                if f.nolocal {
                    let why = "No Local on a shared subscription";
                    return FilterOutcome::Fatal(DisconnectReasonCode::ProtocolError, why);
                }
                Route {
                    filter: filter.into(),
                    group: Some(group.into()),
                }
            }
        };
        if !mqtt.wildcard_subscriptions && route.filter.contains(['+', '#']) {
            return FilterOutcome::Refused(SubscribeReasonCode::WildcardSubscriptionsNotSupported);
        }
        let retain_handling = match f.retain_forward_rule {
            RetainForwardRule::OnEverySubscribe => 0,
            RetainForwardRule::OnNewSubscribe => 1,
            RetainForwardRule::Never => 2,
        };
        FilterOutcome::Granted(Granted {
            path: f.path.clone(),
            route,
            opts: SubscriptionOptions {
                qos: (f.qos as u8).min(mqtt.maximum_qos),
                no_local: f.nolocal,
                retain_as_published: f.preserve_retain,
                retain_handling,
                subscription_id,
            },
            counted: false,
        })
    }

    pub(super) fn handle_unsubscribe(&mut self, key: ConnKey, u: Unsubscribe, now: Instant) {
        if u.filters.is_empty() {
            // MQTT-3.10.3-2 (the codec crate lets it through, unlike an empty SUBSCRIBE).
            let reason = DisconnectReasonCode::ProtocolError;
            return self.protocol_error(key, reason, "UNSUBSCRIBE without a topic filter", now);
        }
        if u.filters.iter().any(|f| f.contains('\0')) {
            let reason = DisconnectReasonCode::MalformedPacket;
            return self.protocol_error(key, reason, "U+0000 in a topic filter", now);
        }
        let Some(skey) = self.conns[key].session else {
            return;
        };
        let mut reasons = Vec::with_capacity(u.filters.len());
        for filter in &u.filters {
            let mut existed = self.sessions[skey]
                .subscriptions
                .remove(filter.as_str())
                .is_some();
            if existed {
                self.remove_subscription(skey, filter);
            }
            // A SUBSCRIBE of this connection still waiting for its barrier counts as done:
            // the client sent it first, so it must not come alive after this.
            existed |= self.cancel_parked_filter(key, filter);
            reasons.push(if existed {
                UnsubAckReason::Success
            } else {
                UnsubAckReason::NoSubscriptionExisted
            });
        }
        let unsuback = Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            reasons,
            properties: None,
        });
        // Behind a parked SUBACK of this connection, so the acks keep the packets' order.
        match self
            .parked_subacks
            .iter_mut()
            .rev()
            .find(|(_, p)| p.conn == key)
        {
            Some((_, parked)) => parked.then.push(unsuback),
            None => self.conns[key].send(&unsuback),
        }
    }

    /// Takes `filter` out of the connection's parked SUBSCRIBEs; true if one had it.
    fn cancel_parked_filter(&mut self, key: ConnKey, filter: &str) -> bool {
        let mut uncounted = Vec::new();
        let mut found = false;
        for (_, parked) in self
            .parked_subacks
            .iter_mut()
            .filter(|(_, p)| p.conn == key)
        {
            parked.granted.retain_mut(|g| {
                if g.path != filter {
                    return true;
                }
                found = true;
                if g.counted {
                    uncounted.push(g.route.clone());
                }
                false
            });
        }
        for route in uncounted {
            self.remove_route(route);
        }
        found
    }

    /// Re-creates a subscription of an imported session (options already negotiated).
    pub(super) fn restore_subscription(
        &mut self,
        skey: SessionKey,
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
    pub(super) fn remove_subscription(&mut self, skey: SessionKey, filter: &str) {
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
        self.routes.add(self.me, &route);
        self.cluster.route_added(&route);
        true
    }

    fn remove_route(&mut self, route: Route) {
        if let Some(refs) = self.route_refs.get_mut(&route) {
            *refs -= 1;
            if *refs == 0 {
                self.route_refs.remove(&route);
                self.routes.remove(self.me, &route);
                self.cluster.route_removed(&route);
            }
        }
    }
}
