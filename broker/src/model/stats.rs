//! The counters workers share for the broker-wide `$SYS` topics.

/// The counters one worker reports for `$SYS` (summed over workers by the node that
/// publishes them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    pub clients_connected: u64,
    pub sessions: u64,
    pub subscriptions: u64,
    pub retained: u64,
    pub messages_received: u64,
    pub messages_sent: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Messages this worker sent on to other workers (one per destination worker).
    pub forwarded: u64,
    /// Times this worker's slot was restarted after its process died.
    pub restarts: u64,
}

/// Upper bounds, in microseconds, of the round-trip latency buckets of a link to an outside
/// store (then `+Inf`).
pub const ROUND_TRIP_MICROS_BUCKETS: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// What a backend that talks to an outside store (Redis) reports for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// The store answered the last command sent to it.
    pub up: bool,
    /// Round trips (a pipeline is one), and their latency by bucket (not cumulative; the
    /// last entry is above every bound) with the sum, microseconds.
    pub round_trips: u64,
    pub round_trip_buckets: [u64; ROUND_TRIP_MICROS_BUCKETS.len() + 1],
    pub round_trip_micros_sum: u64,
    /// Commands sent in pipelines, and in the latest one.
    pub commands: u64,
    pub pipeline_depth: u64,
    /// Messages written for other hosts, and read from them.
    pub messages_out: u64,
    pub messages_in: u64,
    /// Connections (re)opened after a failure.
    pub reconnects: u64,
    /// Bytes waiting to be written to the store (forwards and changes).
    pub queued_bytes: u64,
}

impl StoreStats {
    pub fn observe_round_trip(&mut self, micros: u64, commands: usize) {
        let i = ROUND_TRIP_MICROS_BUCKETS
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(ROUND_TRIP_MICROS_BUCKETS.len());
        self.round_trip_buckets[i] += 1;
        self.round_trip_micros_sum += micros;
        self.round_trips += 1;
        self.commands += commands as u64;
        self.pipeline_depth = commands as u64;
    }
}
