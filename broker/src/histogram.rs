//! The per-connection memory histogram the accountant fills and `/metrics` exports.

/// Upper bounds of the `mqttd_connection_accounted_bytes` buckets (then `+Inf`).
pub const ACCOUNTED_BYTES_BUCKETS: [u64; 10] =
    [256, 512, 1024, 2048, 4096, 8192, 16384, 20480, 32768, 65536];

/// A histogram over [`ACCOUNTED_BYTES_BUCKETS`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Observations per bucket, not cumulative; the last entry is above every bound (+Inf).
    pub buckets: [u64; ACCOUNTED_BYTES_BUCKETS.len() + 1],
    pub sum: u64,
}

impl Histogram {
    pub fn observe(&mut self, value: u64) {
        let i = ACCOUNTED_BYTES_BUCKETS
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(ACCOUNTED_BYTES_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum += value;
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}
