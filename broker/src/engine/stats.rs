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
    pub messages_received: u64,
    pub messages_sent: u64,
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
}
