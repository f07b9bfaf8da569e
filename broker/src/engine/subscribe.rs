//! SUBSCRIBE and UNSUBSCRIBE: per-filter checks and results, the subscription index, the
//! cluster's route table, and retained messages sent on subscribe.

use std::rc::Rc;
use std::time::Instant;

use topic_trie::{SubscriptionFilter, SubscriptionOptions};

use super::conn::FlowState;
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

/// A granted filter of a SUBSCRIBE.
#[derive(Debug)]
pub(crate) struct Granted {
    /// The filter as the client sent it (with `$share/g/` if shared).
    path: String,
    route: Route,
    opts: SubscriptionOptions,
    /// The session already had this filter (set when it is activated): for Retain
    /// Handling 1, which sends retained messages only for a new subscription.
    existed: bool,
}

/// A SUBSCRIBE whose SUBACK goes out once the cluster has confirmed its new routes: from
/// then on a PUBLISH through any worker reaches the subscription, and the retained messages
/// read at that moment include every retained PUBLISH acknowledged before.
///
/// The filters are live on this worker from the start (MQTT-3.8.4 lets messages precede
/// the SUBACK): a message a peer forwards because it already applied the route must not
/// find the subscription missing here, and a client that does not wait for its SUBACK
/// gets what it would on one worker.
#[derive(Debug)]
pub(crate) struct ParkedSubAck {
    conn: ConnKey,
    session: SessionKey,
    suback: Packet,
    granted: Vec<Granted>,
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
        // Live here at once; the routes this worker did not have are announced, and the
        // peers confirm them (barrier) before the SUBACK goes out.
        let mut new_route = false;
        for g in granted.iter_mut() {
            new_route |= self.activate(skey, g);
        }
        self.store_meta(skey, true, now);
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
        };
        let barrier = if new_route {
            self.start_barrier()
        } else {
            None
        };
        if barrier.is_some() {
            self.route_barrier = barrier;
        }
        // A route this SUBSCRIBE shares with an earlier one may not be confirmed yet either:
        // then it waits for the latest announcement's barrier too.
        match barrier.or(self.route_barrier) {
            Some(barrier) => {
                // The connection's later packets wait behind it (`FlowState::Held`), so
                // a connection has at most one parked SUBSCRIBE.
                self.conns[key].flow = FlowState::Held;
                self.parked_subacks.push((barrier, parked));
            }
            None => self.complete_subscribe(parked, now),
        }
    }

    /// Adds a granted filter to the session and the index; true if its route is new on
    /// this worker (announced to the cluster).
    fn activate(&mut self, skey: SessionKey, g: &mut Granted) -> bool {
        g.existed = self.sessions[skey]
            .subscriptions
            .insert(g.path.as_str().into(), g.opts)
            .is_some();
        match &g.route.group {
            None => {
                self.subscriptions.insert(&g.route.filter, skey, g.opts);
            }
            Some(group) => {
                self.shared.insert(group, &g.route.filter, skey, g.opts);
            }
        }
        !g.existed && self.add_route(g.route.clone())
    }

    /// Barrier `id` completed (and every earlier one): the SUBSCRIBEs waiting for it are
    /// acknowledged, in the order they arrived.
    pub(super) fn route_barrier_done(&mut self, id: u64, now: Instant) {
        self.barrier_settled(id);
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
        let conns: Vec<ConnKey> = done.iter().map(|(_, p)| p.conn).collect();
        for (_, parked) in done {
            self.complete_subscribe(parked, now);
        }
        // Every SUBACK due is out before any packet held behind one is handled.
        for key in conns {
            self.release_input(key, now);
        }
    }

    /// Connection `key` is lost while a SUBSCRIBE of it waits for its barrier: the packets
    /// read behind it take effect now, in order, as they would have had the connection
    /// stayed (a PUBLISH then DISCONNECT sent just before closing the socket).
    pub(super) fn flush_held_input(&mut self, key: ConnKey, now: Instant) {
        if !self
            .conns
            .get(key)
            .is_some_and(|c| c.flow == FlowState::Held)
        {
            return;
        }
        let (mine, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked_subacks)
            .into_iter()
            .partition(|(_, p)| p.conn == key);
        self.parked_subacks = kept;
        for (_, parked) in mine {
            self.complete_subscribe(parked, now);
        }
        self.release_input(key, now);
    }

    /// Connection `key` is gone: its parked SUBACK goes with it, so nothing reaches a later
    /// connection that reuses the slot. (Its filters stay with the session, if that lives.)
    pub(super) fn drop_parked_subscribes(&mut self, key: ConnKey) {
        self.parked_subacks.retain(|(_, p)| p.conn != key);
    }

    /// Sends the SUBACK, then the retained messages it unlocks (in that order, MQTT-3.8.4).
    pub(super) fn complete_subscribe(&mut self, parked: ParkedSubAck, now: Instant) {
        let alive = self
            .conns
            .get(parked.conn)
            .is_some_and(|c| c.session == Some(parked.session));
        if !alive {
            // The connection went away while the cluster confirmed the routes.
            return;
        }
        let skey = parked.session;
        let mut retained: Vec<(Rc<Message>, Delivery)> = Vec::new();
        for g in parked.granted {
            // Retained messages are never sent for shared subscriptions (MQTT-4.8.2-5 note).
            let rh = g.opts.retain_handling;
            if g.route.group.is_none() && (rh == 0 || (rh == 1 && !g.existed)) {
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
            existed: false,
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
            // A SUBSCRIBE of this connection waiting for its barrier holds this UNSUBSCRIBE
            // back (`FlowState::Held`): it is live by now.
            let existed = self.sessions[skey]
                .subscriptions
                .remove(filter.as_str())
                .is_some();
            if existed {
                self.remove_subscription(skey, filter);
            }
            reasons.push(if existed {
                UnsubAckReason::Success
            } else {
                UnsubAckReason::NoSubscriptionExisted
            });
        }
        self.store_meta(skey, true, now);
        self.conns[key].send(&Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            reasons,
            properties: None,
        }));
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
