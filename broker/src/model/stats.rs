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
