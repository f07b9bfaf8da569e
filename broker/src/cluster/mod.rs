//! The boundary between this worker and the rest of the broker (other workers, other hosts).
//!
//! The engine tells the cluster what changes locally (routes, retained messages, client ids)
//! and hands it every message published here; the cluster's backend decides where those
//! go. [`Standalone`] is the one-worker backend: there is no one else, so it does nothing.
//! The embedded (Unix-socket mesh) and Redis backends implement the same trait, so the
//! engine does not change when they arrive.

use crate::engine::Message;

pub trait Cluster {
    /// A local session subscribed to `filter` where none did before on this worker.
    fn route_added(&mut self, filter: &str);
    /// The last local subscription to `filter` went away.
    fn route_removed(&mut self, filter: &str);
    /// A message was published on this worker (after local delivery).
    fn forward(&mut self, msg: &Message);
    /// A client id connected here (the cluster ensures it is connected nowhere else).
    fn client_connected(&mut self, client_id: &str);
}

/// The backend of a broker with a single worker.
#[derive(Debug, Default)]
pub struct Standalone;

impl Cluster for Standalone {
    fn route_added(&mut self, _filter: &str) {}
    fn route_removed(&mut self, _filter: &str) {}
    fn forward(&mut self, _msg: &Message) {}
    fn client_connected(&mut self, _client_id: &str) {}
}
