//! Read-only views of the engine's state for the metrics endpoint ([`crate::metrics`]):
//! the gauges (how much of each thing exists now) next to a copy of the counters.

use super::{ConnState, Engine};
use crate::metrics::{TransportMetrics, WorkerMetrics};

impl Engine {
    /// A snapshot of this worker's metrics (process metrics excepted: see
    /// [`crate::metrics::ProcessMetrics`]). Walks the connection and session slabs, so it
    /// costs O(connections + sessions): fine once per scrape, not for a hot path.
    pub fn metrics(&self) -> WorkerMetrics {
        let (mut queued, mut inflight) = (0, 0);
        for (_, s) in self.sessions.iter() {
            queued += s.queue.len() as u64;
            inflight += s.inflight.len() as u64;
        }
        let limits = &self.config.limits;
        let memory = self.memory_report();
        let mut s = self.stats.clone();
        s.dropped_mesh_backlog = self.cluster.dropped_forwards();
        WorkerMetrics {
            connections: self
                .conns
                .iter()
                .filter(|(_, c)| c.state == ConnState::Active)
                .count() as u64,
            connection_limit: limits.max_connections_per_worker as u64,
            sessions: self.sessions.len() as u64,
            // Plain and shared, as `$SYS/broker/subscriptions/count` counts them.
            subscriptions: (self.subscriptions.len() + self.shared.len()) as u64,
            routes: self.routes.len() as u64,
            retained_messages: self.retained.len() as u64,
            queued_messages: queued,
            inflight_messages: inflight,
            memory_high_watermark_bytes: limits.memory_high_watermark_bytes,
            connections_refused: vec![
                ("connection_limit", s.connections_refused),
                ("memory", s.connections_refused_memory),
                ("connect_rate", s.connections_refused_rate),
            ],
            stats: s.clone(),
            // Connections and offline sessions, as the accountant counts them.
            accounted_bytes: memory.total() as u64,
            connection_budget_bytes: limits.connection_memory_budget as u64,
            connection_accounted_bytes: memory.histogram,
            rate_limited: vec![
                ("connect", s.connections_refused_rate),
                (
                    "publish",
                    s.rate_limited_publishes + s.rate_limit_disconnects,
                ),
            ],
            slow_consumer_disconnects: s.slow_consumer_disconnects,
            auth_failures: s.auth_failures,
            store: self.cluster.store_stats(),
            transports: self.transport_metrics(),
        }
    }

    fn transport_metrics(&self) -> Vec<TransportMetrics> {
        self.drivers
            .iter()
            .map(|d| TransportMetrics {
                transport: d.name,
                connections: d.conns as u64,
                accepted: d.accepted,
                errors: d.errors.clone(),
            })
            .collect()
    }
}
