//! Persistent sessions in a store (a backend with `Cluster::stores_sessions`, Redis): every
//! change to a session that outlives its connection is told to the backend as it happens,
//! so that the store can rebuild the session after this worker (or its host) dies.
//!
//! What is stored: the session's subscriptions, expiry and incoming QoS 2 ids (`Meta`,
//! written when the client connects, subscribes, unsubscribes or goes offline), and each
//! QoS 1/2 message from when it enters the session until the client has acknowledged it
//! (`Message`, named by its number in the session, updated when it is sent and when its
//! PUBREC arrives; `Remove`). A message stored for a session counts as forwarded: its
//! publisher's PUBACK/PUBREC waits until the store has it. Sessions that end with their
//! connection (expiry 0) cost nothing. The will goes with the meta: when a host dies, a
//! survivor adopts its stored sessions and fires their wills (once: one survivor adopts).

use std::time::Instant;

use super::Engine;
use crate::model::{
    Delivery, InflightImage, Message, SessionImage, SessionKey, StoreOp, WillImage,
};

impl Engine {
    /// The store's name and owner epoch for session `skey`, if it is kept there.
    fn stored(&self, skey: SessionKey) -> Option<(&str, u64)> {
        if !self.store_sessions {
            return None;
        }
        let session = self.sessions.get(skey)?;
        if session.expiry_secs == 0 {
            return None;
        }
        let epoch = *self.claim_epochs.get(&session.client_id)?;
        Some((&session.client_id, epoch))
    }

    fn send_store(&mut self, skey: SessionKey, op: StoreOp) {
        let Some((client_id, epoch)) = self.stored(skey) else {
            return;
        };
        let client_id = client_id.to_string();
        self.cluster.store_session(&client_id, epoch, op);
    }

    /// A QoS 1/2 message entered session `skey` as `seq` (`pkid` 0: queued), or was sent,
    /// or its PUBREC arrived (`awaiting_comp`).
    pub(super) fn store_message(
        &mut self,
        skey: SessionKey,
        seq: u32,
        msg: &Message,
        delivery: &Delivery,
        pkid: u16,
        awaiting_comp: bool,
    ) {
        if self.stored(skey).is_none() {
            return;
        }
        let entry = InflightImage {
            seq: u64::from(seq),
            pkid,
            awaiting_comp,
            msg: msg.clone(),
            delivery: delivery.clone(),
        };
        self.send_store(skey, StoreOp::Message(entry));
    }

    /// Message `seq` left session `skey`.
    pub(super) fn store_removed(&mut self, skey: SessionKey, seq: u32) {
        self.send_store(skey, StoreOp::Remove(u64::from(seq)));
    }

    /// The session's state other than its messages, after it changed; `online`: whether
    /// its client is connected (offline, the store expires it).
    pub(super) fn store_meta(&mut self, skey: SessionKey, online: bool, now: Instant) {
        if self.stored(skey).is_none() {
            return;
        }
        let s = &self.sessions[skey];
        let image = SessionImage {
            client_id: s.client_id.to_string(),
            expiry_secs: s.expiry_secs,
            expires_in: s.expires_at.map(|at| {
                at.saturating_duration_since(now)
                    .as_secs()
                    .min(u64::from(u32::MAX)) as u32
            }),
            subscriptions: s
                .subscriptions
                .iter()
                .map(|(filter, options)| crate::model::SubscriptionImage {
                    filter: filter.to_string(),
                    options: *options,
                })
                .collect(),
            queue: Vec::new(),
            inflight: Vec::new(),
            incoming_qos2: s.incoming_qos2.clone(),
            // Online, the will as it would be due if the connection died now; offline,
            // a delayed will still waiting. A survivor that adopts the session of a dead
            // host fires it (see the Redis backend's reaper).
            will: s.will.as_ref().map(|w| WillImage {
                msg: w.msg.clone(),
                delay_secs: w.delay_secs,
                due_in: s.will_at.map_or(w.delay_secs, |at| {
                    at.saturating_duration_since(now).as_secs() as u32
                }),
            }),
        };
        self.send_store(skey, StoreOp::Meta { image, online });
    }

    /// The session ended: the store forgets it.
    pub(super) fn store_dropped(&mut self, skey: SessionKey) {
        self.send_store(skey, StoreOp::Drop);
    }
}
