//! Backpressure: a message is acknowledged to its publisher as soon as it is routed, so
//! nothing routed may be dropped on the way to an online subscriber. Instead, whoever
//! feeds a destination that is behind waits for it, as TCP would:
//!
//! - an online session whose queue reaches half of `limits.max_queued_messages` is
//!   *behind*: the client connection whose PUBLISH filled it stops being read; at the
//!   limit itself, a peer worker whose forwarded message filled it stops being read too
//!   (its link is held, which stops all its traffic here, hence the later mark; the
//!   peer's outbox then fills and it pauses its own publishers, below);
//! - a peer whose outbox (frames not yet written to it) passed the backend's watermark is
//!   *behind*: the publisher whose message was forwarded to it stops being read.
//!
//! Each waits until the destination catches up (the session's queue falls back below the
//! mark, its client goes offline or the peer's outbox drains), then is read again. A
//! paused source finishes the packet it is in, so a destination overshoots its mark by
//! at most one message per source (and per link, what was already read from it): online
//! queues are bounded by the mark plus the number of sources, not by a drop.
//!
//! What is still dropped, counted: QoS 0 under overload (`deliver.rs`), messages to an
//! offline session whose queue is full, broker-originated messages (retained messages on
//! SUBSCRIBE, wills) to a full queue, and a client that stops reading altogether is cut as
//! a slow consumer (`accounting.rs`), after which its session is offline.

use ahash::AHashMap;

use super::conn::FlowState;
use super::{ConnKey, Engine};
use crate::model::{NodeId, SessionKey};

/// Where a message being routed came from: who waits if a destination is behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// A client's PUBLISH on this worker.
    Client(ConnKey),
    /// A message another worker forwarded.
    Peer(NodeId),
    /// The broker itself (wills, `$SYS`, retained messages on SUBSCRIBE): nothing to pause.
    Broker,
}

/// A destination that is behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Behind {
    Session(SessionKey),
    Peer(NodeId),
    /// This worker, while it imports its predecessor's sessions (`handover.rs`).
    Takeover,
}

/// Who waits for which destination.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    by_destination: AHashMap<Behind, Vec<Source>>,
    /// Peers whose link is held, with the number of destinations each waits for.
    held_peers: AHashMap<NodeId, u32>,
}

impl Engine {
    /// `source` fed `dest`, which is behind: pause the source until `dest` catches up.
    pub(super) fn wait_for(&mut self, source: Source, dest: Behind) {
        match source {
            Source::Broker => return,
            Source::Client(key) => {
                let Some(conn) = self.conns.get_mut(key) else {
                    return;
                };
                if conn.flow == FlowState::Paused {
                    return;
                }
                conn.flow = FlowState::Paused;
                self.stats.publishers_paused += 1;
            }
            Source::Peer(peer) => {
                let holds = self.waiters.held_peers.entry(peer).or_insert(0);
                *holds += 1;
                if *holds == 1 {
                    self.stats.peer_links_held += 1;
                    self.cluster.hold_peer(peer, true);
                }
            }
        }
        if let Behind::Session(skey) = dest {
            self.sessions[skey].waited_for = true;
        }
        self.waiters
            .by_destination
            .entry(dest)
            .or_default()
            .push(source);
    }

    /// `dest` caught up (or is gone): whoever waited for it is read again.
    pub(super) fn caught_up(&mut self, dest: Behind) {
        let Some(sources) = self.waiters.by_destination.remove(&dest) else {
            return;
        };
        if let Behind::Session(skey) = dest {
            if let Some(session) = self.sessions.get_mut(skey) {
                session.waited_for = false;
            }
        }
        for source in sources {
            match source {
                Source::Broker => {}
                Source::Client(key) => {
                    // (A key reused by a newer connection gets a harmless extra read.)
                    if let Some(conn) = self.conns.get_mut(key) {
                        if conn.flow == FlowState::Paused {
                            conn.flow = FlowState::Resumed;
                            conn.wake();
                        }
                    }
                }
                Source::Peer(peer) => {
                    let Some(holds) = self.waiters.held_peers.get_mut(&peer) else {
                        continue;
                    };
                    *holds -= 1;
                    if *holds == 0 {
                        self.waiters.held_peers.remove(&peer);
                        self.cluster.hold_peer(peer, false);
                    }
                }
            }
        }
    }

    /// The queue length at which an online session pushes back on its sources.
    pub(super) fn behind_mark(&self) -> usize {
        (self.config.limits.max_queued_messages / 2).max(1)
    }

    /// After session `skey`'s queue shrank or its client left: releases its waiters once
    /// it is no longer behind.
    pub(super) fn session_progressed(&mut self, skey: SessionKey) {
        let Some(session) = self.sessions.get(skey) else {
            return;
        };
        if !session.waited_for {
            return;
        }
        if session.conn.is_none() || session.queue.len() < self.behind_mark() {
            self.caught_up(Behind::Session(skey));
        }
    }

    /// True (once) when the driver should read `key` again: its pause for a destination
    /// that was behind has ended. Drivers ask after flushing a dirty connection.
    pub fn take_read_resumed(&mut self, key: ConnKey) -> bool {
        match self.conns.get_mut(key) {
            Some(conn) if conn.flow == FlowState::Resumed => {
                conn.flow = FlowState::Reading;
                true
            }
            _ => false,
        }
    }
}
