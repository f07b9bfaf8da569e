//! Client ids across hosts. Within a host a client id lives on one worker (its home), so
//! takeover is local; across hosts a backend may first have to claim the id (Redis: an
//! owner and an epoch per client id, changed atomically; the latest claim owns it). Until
//! the claim is answered the CONNECT waits, with the packets read after it
//! (`FlowState::Held`). When the id was owned on another host, that host closes its
//! connection (v5 DISCONNECT 0x8E) and, if the new connection resumes the session, sends
//! the session here first.
//!
//! Claims race: a release may reach a worker before, or after, its own claim of the same
//! id is answered, and may come from an older claim than its own. The epochs decide: a
//! release from an older claim leaves a newer connection alone (and answers "no session"
//! so its sender does not wait), one from a newer claim ends the connection here, even
//! one still waiting for its own claim (it is accepted and at once taken over, as the
//! earlier of two connects with one id is on one worker).
//!
//! Bounded: a claim (or a session) not answered within [`CLAIM_DEADLINE`] (the store is
//! down, the old owner died) lets the CONNECT go on with what this worker has, logged and
//! counted (`mqttd_claim_timeouts_total`).

use std::time::{Duration, Instant};

use super::conn::{ConnState, FlowState};
use super::connect::Negotiated;
use super::{ConnKey, Engine};
use crate::model::{NodeId, SessionImage};
use crate::protocol::{DisconnectReasonCode, LastWill};

/// How long a CONNECT waits for its claim, and then for its session from another host.
pub(super) const CLAIM_DEADLINE: Duration = Duration::from_secs(5);

/// Another host's claim of a client id: who (`to`), at which epoch, and whether it wants
/// the session.
#[derive(Debug, Clone, Copy)]
pub(super) struct Release {
    pub to: NodeId,
    pub send: bool,
    pub epoch: u64,
}

/// A CONNECT waiting for its client id to be claimed (or its session to arrive).
pub(super) struct ParkedConnect {
    ticket: u64,
    key: ConnKey,
    negotiated: Negotiated,
    will: Option<LastWill>,
    since: Instant,
    /// Its claim's epoch, once answered.
    epoch: Option<u64>,
    /// Claimed; the session is coming from its previous owner on another host.
    awaiting_session: bool,
    /// The session came, and its routes were announced: the CONNACK waits for this
    /// barrier, so that a message published anywhere once it is out finds them.
    barrier: Option<u64>,
    /// The newest release of this id seen while parked: applied once it is accepted, if
    /// newer than its own claim.
    released: Option<Release>,
    /// The session as the store has it: used if the previous owner does not answer.
    stored: Option<Box<SessionImage>>,
    /// The owner on another host the session is expected from.
    previous: Option<NodeId>,
}

impl Engine {
    /// Accepts the CONNECT now, or parks it until the backend has claimed its client id.
    pub(super) fn claim_then_accept(
        &mut self,
        key: ConnKey,
        negotiated: Negotiated,
        will: Option<LastWill>,
        now: Instant,
    ) {
        let wants_session = !negotiated.clean_start;
        let Some(ticket) = self.cluster.claim(&negotiated.client_id, wants_session) else {
            return self.accept_connect(key, negotiated, will, now);
        };
        self.conns[key].flow = FlowState::Held;
        self.parked_connects.push(ParkedConnect {
            ticket,
            key,
            negotiated,
            will,
            since: now,
            epoch: None,
            awaiting_session: false,
            barrier: None,
            released: None,
            stored: None,
            previous: None,
        });
    }

    /// The backend claimed (at `epoch`) the client id of the CONNECT parked as `ticket`.
    /// `previous`: the owner on another host, which sends the session if the CONNECT
    /// resumes it.
    pub(super) fn claimed(
        &mut self,
        ticket: u64,
        epoch: u64,
        previous: Option<NodeId>,
        stored: Option<Box<SessionImage>>,
        now: Instant,
    ) {
        let Some(i) = self.parked_connects.iter().position(|p| p.ticket == ticket) else {
            return;
        };
        let parked = &mut self.parked_connects[i];
        parked.epoch = Some(epoch);
        let lost = parked.released.is_some_and(|r| r.epoch > epoch);
        let wants = !parked.negotiated.clean_start && !lost;
        if wants && previous.is_some() {
            // The previous owner has it (fresher than the store): wait for it, and fall
            // back on the stored copy if it does not answer.
            parked.awaiting_session = true;
            parked.since = now;
            parked.stored = stored;
            parked.previous = previous;
            return;
        }
        let restore = stored.filter(|_| {
            wants
                && !self
                    .client_ids
                    .contains_key(parked.negotiated.client_id.as_str())
        });
        if let Some(image) = restore {
            // Nobody has it in memory (this worker restarted, or its host): the store's
            // copy is the session.
            tracing::info!(client_id = %image.client_id, "session restored from the store");
            parked.awaiting_session = true;
            return self.session_received(*image, now);
        }
        let parked = self.parked_connects.swap_remove(i);
        self.finish_parked(parked, now);
    }

    /// A session (or the news that there is none) arrived from the worker that owned
    /// `client_id`: the CONNECT waiting for it goes on (with the store's copy, if the
    /// owner had none in memory: it restarted since).
    pub(super) fn session_arrived(&mut self, client_id: &str, now: Instant) {
        let Some(i) = self
            .parked_connects
            .iter()
            .position(|p| p.awaiting_session && p.negotiated.client_id == client_id)
        else {
            return;
        };
        if !self.client_ids.contains_key(client_id) {
            if let Some(image) = self.parked_connects[i].stored.take() {
                self.parked_connects[i].previous = None;
                return self.session_received(*image, now);
            }
        }
        let parked = self.parked_connects.swap_remove(i);
        self.finish_parked(parked, now);
    }

    /// A session of a dead host's worker that this worker adopted (the store's copy, now
    /// owned here at `epoch`): offline, it collects messages, expires and fires its will
    /// here, until its client comes back.
    pub(super) fn session_adopted(&mut self, image: SessionImage, epoch: u64, now: Instant) {
        let client_id = image.client_id.clone();
        if self.client_ids.contains_key(client_id.as_str()) {
            return;
        }
        let expiry = image.expiry_secs;
        self.import_session(image, now);
        let Some(&skey) = self.client_ids.get(client_id.as_str()) else {
            return;
        };
        self.claim_epochs
            .insert(client_id.clone().into_boxed_str(), epoch);
        let session = &mut self.sessions[skey];
        if session.expires_at.is_none() && expiry != u32::MAX {
            // It was online when its host died: its expiry starts now.
            session.expires_at = Some(now + Duration::from_secs(u64::from(expiry)));
        }
        tracing::info!(client_id, "adopted a dead host's session");
        self.store_meta(skey, false, now);
    }

    /// Another host claimed `client_id`: unless this worker claimed it later, its
    /// connection here is closed (v5 0x8E, as for a takeover within a host) and its
    /// session handed over if asked for, else ended.
    pub(super) fn released(&mut self, client_id: &str, release: Release, now: Instant) {
        if let Some(parked) = self
            .parked_connects
            .iter_mut()
            .find(|p| p.negotiated.client_id == client_id)
        {
            if parked.epoch.is_some_and(|own| own > release.epoch) {
                return self.not_releasing(client_id, release);
            }
            if parked.released.is_none_or(|r| r.epoch < release.epoch) {
                parked.released = Some(release);
            }
            if parked.epoch.is_some() {
                // Lost to a newer claim: no need to wait for a session any longer.
                let ticket = parked.ticket;
                let i = self.parked_connects.iter().position(|p| p.ticket == ticket);
                if let Some(parked) = i.map(|i| self.parked_connects.swap_remove(i)) {
                    self.finish_parked(parked, now);
                }
            }
            return;
        }
        if self
            .claim_epochs
            .get(client_id)
            .is_some_and(|&own| own > release.epoch)
        {
            return self.not_releasing(client_id, release);
        }
        if let Some(&skey) = self.client_ids.get(client_id) {
            if let Some(old) = self.sessions[skey].conn {
                tracing::info!(conn = old, client_id, to = %release.to, "session taken over by another host");
                self.stats.takeovers += 1;
                self.conns[old]
                    .disconnect(DisconnectReasonCode::SessionTakenOver, "session taken over");
                self.end_connection(old, true, now);
            }
        }
        // Ending the connection may have ended a session with expiry 0.
        let image = match self.client_ids.get(client_id).copied() {
            Some(skey) if release.send => Some(self.export_session(skey, now)),
            Some(skey) => {
                self.discard_session(skey, now);
                None
            }
            None => None,
        };
        if release.send {
            self.cluster.send_session(release.to, client_id, image);
        }
    }

    /// A release from a claim older than this worker's own: the session stays here; the
    /// claimant, if it waits for a session, hears there is none for it.
    fn not_releasing(&mut self, client_id: &str, release: Release) {
        if release.send {
            self.cluster.send_session(release.to, client_id, None);
        }
    }

    /// Worker `peer` is gone (its host died): CONNECTs waiting for a session from it take
    /// the store's copy, or go on without one.
    pub(super) fn owner_gone(&mut self, peer: NodeId, now: Instant) {
        while let Some(i) = self
            .parked_connects
            .iter()
            .position(|p| p.awaiting_session && p.previous == Some(peer))
        {
            self.parked_connects[i].previous = None;
            match self.parked_connects[i].stored.take() {
                Some(image) => {
                    tracing::info!(client_id = %image.client_id, "previous owner gone: session restored from the store");
                    self.parked_connects[i].since = now;
                    self.session_received(*image, now);
                }
                None => {
                    let parked = self.parked_connects.swap_remove(i);
                    self.finish_parked(parked, now);
                }
            }
        }
    }

    /// A session sent by another host for a CONNECT parked here: its routes are
    /// announced as it is installed; the CONNACK waits until every worker has them.
    pub(super) fn session_received(&mut self, image: SessionImage, now: Instant) {
        let client_id = image.client_id.clone();
        self.import_session(image, now);
        let Some(i) = self
            .parked_connects
            .iter()
            .position(|p| p.awaiting_session && p.negotiated.client_id == client_id)
        else {
            return;
        };
        match self.start_barrier() {
            Some(barrier) => {
                let parked = &mut self.parked_connects[i];
                parked.awaiting_session = false;
                parked.barrier = Some(barrier);
                parked.since = now;
            }
            None => {
                let parked = self.parked_connects.swap_remove(i);
                self.finish_parked(parked, now);
            }
        }
    }

    /// Barrier `id` (and every earlier one) completed: CONNECTs waiting for it go on.
    pub(super) fn connects_after_barrier(&mut self, id: u64, now: Instant) {
        while let Some(i) = self
            .parked_connects
            .iter()
            .position(|p| p.barrier.is_some_and(|b| b <= id))
        {
            let parked = self.parked_connects.swap_remove(i);
            self.finish_parked(parked, now);
        }
    }

    /// From the 1 s tick: CONNECTs that waited too long go on with what this worker has.
    pub(super) fn expire_parked_connects(&mut self, now: Instant) {
        while let Some(i) = self
            .parked_connects
            .iter()
            .position(|p| now >= p.since + CLAIM_DEADLINE)
        {
            if let Some(image) = self.parked_connects[i].stored.take() {
                // The previous owner did not answer (its host died): the store's copy.
                tracing::info!(client_id = %image.client_id, "previous owner silent: session restored from the store");
                self.parked_connects[i].since = now;
                self.session_received(*image, now);
                continue;
            }
            let parked = self.parked_connects.swap_remove(i);
            tracing::warn!(
                client_id = parked.negotiated.client_id,
                waited_for = if parked.awaiting_session {
                    "session"
                } else {
                    "claim"
                },
                "client id not settled across hosts in time: connecting with this host's state"
            );
            self.stats.claim_timeouts += 1;
            self.finish_parked(parked, now);
        }
    }

    /// Accepts a parked CONNECT (if its client is still there) and applies a newer
    /// release seen meanwhile.
    fn finish_parked(&mut self, parked: ParkedConnect, now: Instant) {
        let key = parked.key;
        if !self
            .conns
            .get(key)
            .is_some_and(|c| c.state == ConnState::AwaitingConnect && !c.is_closing())
        {
            return;
        }
        let client_id = parked.negotiated.client_id.clone();
        let epoch = parked.epoch.unwrap_or(0);
        self.conns[key].flow = FlowState::Reading;
        self.accept_connect(key, parked.negotiated, parked.will, now);
        if parked.epoch.is_some() {
            // After attaching: a session a clean start discarded took its epoch along.
            self.claim_epochs
                .insert(client_id.clone().into_boxed_str(), epoch);
            if let Some(skey) = self.conns[key].session {
                self.store_meta(skey, true, now);
            }
        }
        match parked.released {
            Some(release) if release.epoch > epoch => self.released(&client_id, release, now),
            _ => self.release_input(key, now),
        }
    }
}
