//! Bookkeeping for barriers: "tell me once every peer has applied what I sent so far".
//!
//! The engine holds a SUBACK (new routes) or the acknowledgement of a retained PUBLISH
//! until every peer confirms, so that what a client was told is done holds on every
//! worker. A backend whose links are FIFO sends a barrier request behind everything else
//! and counts the confirmations here; a peer that goes away counts as having confirmed.

use ahash::AHashMap;

use crate::model::NodeId;

#[derive(Debug, Default)]
pub struct Barriers {
    next: u64,
    /// Barrier id → peers that have not confirmed it yet.
    waiting: AHashMap<u64, Vec<NodeId>>,
}

impl Barriers {
    /// A new barrier waiting for `peers`; `None` when there is no one to wait for.
    pub fn start(&mut self, peers: Vec<NodeId>) -> Option<u64> {
        if peers.is_empty() {
            return None;
        }
        self.next += 1;
        self.waiting.insert(self.next, peers);
        Some(self.next)
    }

    /// `peer` confirmed barrier `id`; true when that was the last confirmation missing.
    pub fn confirmed(&mut self, id: u64, peer: NodeId) -> bool {
        let Some(waiting) = self.waiting.get_mut(&id) else {
            return false;
        };
        waiting.retain(|&p| p != peer);
        if waiting.is_empty() {
            self.waiting.remove(&id);
            return true;
        }
        false
    }

    /// Barrier `id` and every earlier one are no longer waited for (timed out).
    pub fn abandon(&mut self, id: u64) {
        self.waiting.retain(|&b, _| b > id);
    }

    /// `peer` is gone: its pending confirmations count as given. Returns the barriers
    /// this completes, oldest first.
    pub fn forget(&mut self, peer: NodeId) -> Vec<u64> {
        let mut done = Vec::new();
        for (id, waiting) in self.waiting.iter_mut() {
            waiting.retain(|&p| p != peer);
            if waiting.is_empty() {
                done.push(*id);
            }
        }
        for id in &done {
            self.waiting.remove(id);
        }
        done.sort_unstable();
        done
    }
}
