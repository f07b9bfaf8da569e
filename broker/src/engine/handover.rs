//! Moving persistent sessions out of a draining worker and into its successor (a rolling
//! restart replaces worker `i` by a new process with the same index). What moves is what
//! MQTT keeps for a client id: subscriptions, queued and inflight messages, incoming QoS 2
//! packet ids, the remaining expiry and a delayed will still waiting. (The drain's
//! DISCONNECT 0x8B is the server's doing: the wills of the clients it disconnects are not
//! due; their reconnection brings new ones.)
//!
//! The successor takes over before it serves anyone ([`Engine::begin_takeover`]): messages
//! peers forward meanwhile may be for sessions still on their way, so they are held and
//! delivered once the sessions are in ([`Engine::end_takeover`]).

use std::rc::Rc;
use std::time::{Duration, Instant};

use super::flow::{Behind, Source};
use super::session::{Inflight, InflightState, Queued, Session, Will};
use super::Engine;
use crate::model::{
    InflightImage, Message, NodeId, QueuedImage, SessionImage, SessionKey, SharedTarget,
    SubscriptionImage, WillImage,
};

/// Forwarded messages held during a takeover beyond which peers' links are held too.
const TAKEOVER_HOLD: usize = 100_000;

/// A takeover in progress: what peers forwarded meanwhile, in order.
#[derive(Default)]
pub(super) struct Takeover {
    held: Vec<(NodeId, Message, bool, Vec<SharedTarget>)>,
}

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
        keys.into_iter()
            .map(|skey| self.export_session(skey, now))
            .collect()
    }

    /// Takes one offline session out of this engine, as an image to send on.
    pub(super) fn export_session(&mut self, skey: SessionKey, now: Instant) -> SessionImage {
        let s = self.sessions.remove(skey);
        self.client_ids.remove(&s.client_id);
        self.claim_epochs.remove(&s.client_id);
        for filter in s.subscriptions.keys() {
            self.remove_subscription(skey, filter);
        }
        SessionImage {
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
                    seq: u64::from(q.seq),
                    msg: (*q.msg).clone(),
                    delivery: q.delivery,
                })
                .collect(),
            inflight: s
                .inflight
                .into_iter()
                .map(|m| InflightImage {
                    seq: u64::from(m.seq),
                    pkid: m.pkid,
                    awaiting_comp: m.state == InflightState::AwaitingComp,
                    msg: (*m.msg).clone(),
                    delivery: m.delivery,
                })
                .collect(),
            incoming_qos2: s.incoming_qos2,
            will: s.will.zip(s.will_at).map(|(will, at)| WillImage {
                msg: will.msg,
                delay_secs: will.delay_secs,
                due_in: at.saturating_duration_since(now).as_secs() as u32,
            }),
        }
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
                // Numbered by a `Session` (32 bits) wherever it came from.
                seq: q.seq as u32,
                msg: Rc::new(q.msg),
                delivery: q.delivery,
            })
            .collect();
        session.inflight = image.inflight.into_iter().map(inflight_from).collect();
        session.next_seq = session
            .queue
            .iter()
            .map(|q| q.seq)
            .chain(session.inflight.iter().map(|m| m.seq))
            .max()
            .unwrap_or(0);
        if let Some(will) = image.will {
            session.will_at = Some(now + Duration::from_secs(u64::from(will.due_in)));
            session.will = Some(Box::new(Will {
                msg: will.msg,
                delay_secs: will.delay_secs,
            }));
        }
        session.recount_held();
        let skey = self.sessions.insert(session);
        self.client_ids.insert(id, skey);
        for sub in image.subscriptions {
            self.restore_subscription(skey, &sub.filter, sub.options);
        }
    }

    /// More messages of a session imported just before (a large one comes in parts).
    pub(super) fn continue_session(&mut self, image: SessionImage) {
        let Some(&skey) = self.client_ids.get(image.client_id.as_str()) else {
            return;
        };
        let session = &mut self.sessions[skey];
        if session.conn.is_some() {
            // Not the session being imported (its client is online): leave it alone.
            return;
        }
        for q in image.queue {
            session.next_seq = session.next_seq.max(q.seq as u32);
            session.push_queued(Queued {
                seq: q.seq as u32,
                msg: Rc::new(q.msg),
                delivery: q.delivery,
            });
        }
        for m in image.inflight {
            session.next_seq = session.next_seq.max(m.seq as u32);
            session.push_inflight(inflight_from(m));
        }
    }

    /// This worker replaces a process whose sessions are on their way: until
    /// [`Engine::end_takeover`], messages forwarded by peers are held.
    pub fn begin_takeover(&mut self) {
        self.takeover = Some(Takeover::default());
    }

    /// The predecessor's sessions are in (or it is gone): what was held is delivered, in
    /// order, and the peers hear this worker has settled (routes the predecessor announced
    /// and no imported session re-announced go). Called once at start, with or without a
    /// predecessor.
    pub fn end_takeover(&mut self, now: Instant) {
        if let Some(takeover) = self.takeover.take() {
            self.caught_up(Behind::Takeover);
            let held = takeover.held.len();
            for (from, msg, plain, shared) in takeover.held {
                self.deliver_forwarded(from, msg, plain, &shared, now);
            }
            tracing::info!(
                sessions = self.sessions.len(),
                held,
                "took over from the predecessor"
            );
        }
        self.cluster.settled();
    }

    /// A forwarded message during a takeover: held, and past `TAKEOVER_HOLD` its peer is
    /// paused too (see `flow.rs`).
    pub(super) fn hold_forwarded(
        &mut self,
        from: NodeId,
        msg: Message,
        plain: bool,
        shared: Vec<SharedTarget>,
    ) {
        let Some(takeover) = &mut self.takeover else {
            return;
        };
        takeover.held.push((from, msg, plain, shared));
        if takeover.held.len() >= TAKEOVER_HOLD {
            self.wait_for(Source::Peer(from), Behind::Takeover);
        }
    }
}

fn inflight_from(m: InflightImage) -> Inflight {
    Inflight {
        seq: m.seq as u32,
        pkid: m.pkid,
        msg: Rc::new(m.msg),
        delivery: m.delivery,
        state: if m.awaiting_comp {
            InflightState::AwaitingComp
        } else {
            InflightState::AwaitingAck
        },
    }
}
