//! The barriers this engine waits for, and their timeout.
//!
//! A SUBACK for a new route and the acknowledgement of a retained PUBLISH wait until every
//! peer confirms a barrier (see `cluster/barrier.rs`). A peer that left counts as having
//! confirmed, but one that is connected and hung never answers: without a deadline it
//! would hold those acknowledgements, and the packets read behind a parked SUBSCRIBE,
//! forever. After `cluster.barrier_timeout_ms` the barrier counts as done: what waited for
//! it is released, the backend forgets it, and the timeout is logged and counted
//! (`mqttd_barrier_timeouts_total`). What is given up is only the guarantee for the hung
//! peer: a PUBLISH through it may miss the new subscription, or not see the retained message.

use std::time::{Duration, Instant};

use super::Engine;

impl Engine {
    /// Asks the cluster for a barrier (`Cluster::barrier`) and starts its clock.
    pub(super) fn start_barrier(&mut self) -> Option<u64> {
        let id = self.cluster.barrier()?;
        // Timed from the first tick that sees it (`expire_barriers`): the clock is only
        // read there, so the deadline is late by up to one tick (1 s).
        self.pending_barriers.push_back((id, None));
        Some(id)
    }

    /// Barrier `id` completed, and with it every earlier one (links are FIFO).
    pub(super) fn barrier_settled(&mut self, id: u64) {
        while self.pending_barriers.front().is_some_and(|&(b, _)| b <= id) {
            self.pending_barriers.pop_front();
        }
    }

    /// From the 1 s tick: barriers older than `cluster.barrier_timeout_ms` count as done.
    pub(super) fn expire_barriers(&mut self, now: Instant) {
        let timeout = Duration::from_millis(self.config.cluster.barrier_timeout_ms);
        let mut expired = None;
        for (id, started) in self.pending_barriers.iter_mut() {
            let started = *started.get_or_insert(now);
            if now.saturating_duration_since(started) >= timeout {
                expired = Some(*id);
            }
        }
        // Ids grow with time, so every barrier up to the latest expired one is overdue too.
        let Some(id) = expired else {
            return;
        };
        let overdue = self
            .pending_barriers
            .iter()
            .take_while(|&&(b, _)| b <= id)
            .count();
        self.stats.barrier_timeouts += overdue as u64;
        tracing::warn!(
            barrier = id,
            overdue,
            timeout_ms = self.config.cluster.barrier_timeout_ms,
            "cluster barrier not confirmed in time (a peer is hung?): releasing what waited for it"
        );
        self.cluster.barrier_abandoned(id);
        self.barrier_done(id, now);
    }
}
