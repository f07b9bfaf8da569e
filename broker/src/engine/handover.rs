//! Moving persistent sessions out of a draining worker and into its successor (a rolling
//! restart replaces worker `i` by a new process with the same index). What moves is what
//! MQTT keeps for a client id: subscriptions, queued and inflight messages, incoming QoS 2
//! packet ids and the remaining expiry. The will does not move: the drain told the client
//! to go (DISCONNECT 0x8B), and its reconnection brings a new one.

use std::rc::Rc;
use std::time::{Duration, Instant};

use super::session::{Inflight, InflightState, Queued, Session};
use super::Engine;
use crate::model::{InflightImage, QueuedImage, SessionImage, SessionKey, SubscriptionImage};

impl Engine {
    /// Takes every offline persistent session out of this engine (after a drain closed
    /// all connections), as images to send to this worker's successor.
    pub fn export_sessions(&mut self, now: Instant) -> Vec<SessionImage> {
        let keys: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.conn.is_none() && s.expiry_secs > 0)
            .map(|(k, _)| k)
            .collect();
        let mut images = Vec::with_capacity(keys.len());
        for skey in keys {
            let s = self.sessions.remove(skey);
            self.client_ids.remove(&s.client_id);
            for filter in s.subscriptions.keys() {
                self.remove_subscription(skey, filter);
            }
            images.push(SessionImage {
                client_id: s.client_id.to_string(),
                expiry_secs: s.expiry_secs,
                expires_in: s.expires_at.map(|at| {
                    at.saturating_duration_since(now)
                        .as_secs()
                        .min(u32::MAX as u64) as u32
                }),
                subscriptions: s
                    .subscriptions
                    .iter()
                    .map(|(filter, options)| SubscriptionImage {
                        filter: filter.to_string(),
                        options: *options,
                    })
                    .collect(),
                queue: s
                    .queue
                    .into_iter()
                    .map(|q| QueuedImage {
                        msg: (*q.msg).clone(),
                        delivery: q.delivery,
                    })
                    .collect(),
                inflight: s
                    .inflight
                    .into_iter()
                    .map(|m| InflightImage {
                        pkid: m.pkid,
                        awaiting_comp: m.state == InflightState::AwaitingComp,
                        msg: (*m.msg).clone(),
                        delivery: m.delivery,
                    })
                    .collect(),
                incoming_qos2: s.incoming_qos2,
            });
        }
        images
    }

    /// Installs a session handed over by this worker's predecessor (unless the client id
    /// already has a session here: a client that reconnected first wins).
    pub(super) fn import_session(&mut self, image: SessionImage, now: Instant) {
        if self.client_ids.contains_key(image.client_id.as_str()) {
            return;
        }
        let id: Box<str> = image.client_id.into_boxed_str();
        let mut session = Session::new(id.clone(), image.expiry_secs);
        session.expires_at = image
            .expires_in
            .map(|s| now + Duration::from_secs(s as u64));
        session.incoming_qos2 = image.incoming_qos2;
        session.queue = image
            .queue
            .into_iter()
            .map(|q| Queued {
                msg: Rc::new(q.msg),
                delivery: q.delivery,
            })
            .collect();
        session.inflight = image
            .inflight
            .into_iter()
            .map(|m| Inflight {
                pkid: m.pkid,
                msg: Rc::new(m.msg),
                delivery: m.delivery,
                state: if m.awaiting_comp {
                    InflightState::AwaitingComp
                } else {
                    InflightState::AwaitingAck
                },
            })
            .collect();
        session.recount_held();
        let skey = self.sessions.insert(session);
        self.client_ids.insert(id, skey);
        for sub in image.subscriptions {
            self.restore_subscription(skey, &sub.filter, sub.options);
        }
    }
}
