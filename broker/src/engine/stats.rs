//! Counters of one worker's engine, read by $SYS topics and metrics.

#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Times the supervisor restarted this worker's slot before this process.
    pub restarts: u64,
    pub connections_accepted: u64,
    pub connections_closed: u64,
    pub connections_refused: u64,
    /// accept(2) failures (EMFILE, ...), each followed by a short pause.
    pub accept_errors: u64,
    pub packets_received: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// PUBLISHes received from clients, by QoS (index 0, 1, 2).
    pub messages_received: [u64; 3],
    /// PUBLISHes sent to clients, by the QoS they were sent with.
    pub messages_sent: [u64; 3],
    pub protocol_errors: u64,
    pub keepalive_timeouts: u64,
    pub takeovers: u64,
    /// Messages sent to another worker (one per worker per message).
    pub forwarded: u64,
    /// Messages received from another worker.
    pub forwarded_in: u64,
    /// Connections handed to the worker that owns their client id.
    pub handed_off: u64,
    /// QoS 0 messages not sent because the client's output was backed up.
    pub dropped_qos0_backlog: u64,
    /// QoS 1/2 messages not queued because the session's queue was full.
    pub dropped_queue_full: u64,
    /// Messages whose expiry interval passed before delivery.
    pub dropped_expired: u64,
    /// Messages larger than the client's Maximum Packet Size.
    pub dropped_too_large: u64,
    /// Queued or inflight messages lost because their session ended.
    pub dropped_on_session_end: u64,
    // Limits, accounting and rate limits.
    /// CONNECTs refused because the worker was above its memory high watermark.
    pub connections_refused_memory: u64,
    /// CONNECTs refused because their address exceeded the per-IP connect rate.
    pub connections_refused_rate: u64,
    /// QoS 0 messages not sent because the client was not draining and over its budget.
    pub dropped_over_budget: u64,
    /// Connections closed because their QoS 1/2 messages would have queued past the budget.
    pub slow_consumer_disconnects: u64,
    /// Times a client went over its publish rate and was paused.
    pub rate_limited_publishes: u64,
    /// Clients disconnected for going over their publish rate.
    pub rate_limit_disconnects: u64,
    /// Clients refused for their credentials (no authentication yet: always 0).
    pub auth_failures: u64,
    /// Times a client was paused because a destination of its PUBLISH was behind.
    pub publishers_paused: u64,
    /// Times a peer's link was held because a destination of its messages was behind.
    pub peer_links_held: u64,
    /// Messages for other workers dropped at a full (64 MiB) or disconnected mesh link;
    /// copied from the cluster backend when metrics are taken.
    pub dropped_mesh_backlog: u64,
    /// Cluster barriers given up after `cluster.barrier_timeout_ms` (a peer did not answer).
    pub barrier_timeouts: u64,
    /// CONNECTs that went on without their client id settled across hosts in time.
    pub claim_timeouts: u64,
}
