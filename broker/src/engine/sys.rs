//! `$SYS` topics: every worker reports its counters each tick; worker 0 sums them and
//! publishes Mosquitto-compatible topics (retained, QoS 0), plus per-worker connection
//! counts under `$SYS/broker/workers/{index}/`.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::flow::Source;
use super::{ConnState, Engine, Message};
use crate::model::WorkerStats;
use crate::protocol::QoS;

/// How often `$SYS` is refreshed.
const SYS_INTERVAL: Duration = Duration::from_secs(1);

impl Engine {
    fn local_stats(&self) -> WorkerStats {
        WorkerStats {
            clients_connected: self
                .conns
                .iter()
                .filter(|(_, c)| c.state == ConnState::Active)
                .count() as u64,
            sessions: self.sessions.len() as u64,
            subscriptions: (self.subscriptions.len() + self.shared.len()) as u64,
            retained: self.retained.len() as u64,
            messages_received: self.stats.messages_received.iter().sum(),
            messages_sent: self.stats.messages_sent.iter().sum(),
            bytes_received: self.stats.bytes_received,
            bytes_sent: self.stats.bytes_sent,
            forwarded: self.stats.forwarded,
            restarts: self.stats.restarts,
        }
    }

    /// Reports this worker's counters and, on worker 0, publishes the `$SYS` topics.
    pub(super) fn publish_sys(&mut self, now: Instant) {
        if self
            .last_sys_publish
            .is_some_and(|at| now < at + SYS_INTERVAL)
        {
            return;
        }
        self.last_sys_publish = Some(now);
        let stats = self.local_stats();
        self.worker_stats.insert(self.me, stats);
        self.cluster.report_stats(&stats);
        if self.cluster.sys_publisher() != self.me {
            return;
        }
        let mut total = WorkerStats::default();
        let mut topics: Vec<(String, String)> = Vec::new();
        for (i, s) in &self.worker_stats {
            total.clients_connected += s.clients_connected;
            total.sessions += s.sessions;
            total.subscriptions += s.subscriptions;
            total.messages_received += s.messages_received;
            total.messages_sent += s.messages_sent;
            total.bytes_received += s.bytes_received;
            total.bytes_sent += s.bytes_sent;
            total.forwarded += s.forwarded;
            topics.push((
                format!("$SYS/broker/workers/{i}/clients/connected"),
                s.clients_connected.to_string(),
            ));
            topics.push((
                format!("$SYS/broker/workers/{i}/restarts"),
                s.restarts.to_string(),
            ));
        }
        let uptime = now.saturating_duration_since(self.started_at).as_secs();
        topics.extend([
            (
                "$SYS/broker/version".to_string(),
                format!("mqttd {}", env!("CARGO_PKG_VERSION")),
            ),
            (
                "$SYS/broker/uptime".to_string(),
                format!("{uptime} seconds"),
            ),
            (
                "$SYS/broker/clients/connected".to_string(),
                total.clients_connected.to_string(),
            ),
            (
                "$SYS/broker/clients/total".to_string(),
                total.sessions.to_string(),
            ),
            (
                "$SYS/broker/subscriptions/count".to_string(),
                total.subscriptions.to_string(),
            ),
            (
                "$SYS/broker/retained messages/count".to_string(),
                stats.retained.to_string(),
            ),
            (
                "$SYS/broker/messages/received".to_string(),
                total.messages_received.to_string(),
            ),
            (
                "$SYS/broker/messages/sent".to_string(),
                total.messages_sent.to_string(),
            ),
            (
                "$SYS/broker/bytes/received".to_string(),
                total.bytes_received.to_string(),
            ),
            (
                "$SYS/broker/bytes/sent".to_string(),
                total.bytes_sent.to_string(),
            ),
            (
                "$SYS/broker/workers/count".to_string(),
                self.cluster.local_workers().to_string(),
            ),
            (
                "$SYS/broker/messages/forwarded".to_string(),
                total.forwarded.to_string(),
            ),
            // Routes known to worker 0: its own and every live peer's (a dead peer's go).
            (
                "$SYS/broker/routes/count".to_string(),
                self.routes.len().to_string(),
            ),
        ]);
        for (topic, value) in topics {
            let msg = Rc::new(Message {
                topic: Bytes::from(topic),
                payload: Bytes::from(value),
                qos: QoS::AtMostOnce,
                retain: true,
                properties: None,
                expires_at: None,
                origin: None,
            });
            self.store_retained(&msg);
            self.route(&msg, Source::Broker, now);
        }
    }
}
