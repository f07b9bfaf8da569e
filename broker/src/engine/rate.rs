//! Rate limits: token buckets for a client's PUBLISH packets and payload bytes, and for
//! new connections per source IP address.
//!
//! Time is milliseconds since the engine started, kept as `u32` (wrapping after 49 days,
//! harmless: only differences are used, and buckets idle that long are simply full), so a
//! connection's two buckets cost 12 bytes.

use std::collections::HashMap;
use std::net::IpAddr;

/// Most source addresses tracked at once; past it new addresses are not limited (failing
/// open) until the tick drops the addresses whose buckets are full again.
const MAX_TRACKED_ADDRESSES: usize = 65_536;

/// A rate and a burst; a rate of 0 means "unlimited".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f32,
    pub burst: f32,
}

impl Rate {
    pub fn new(per_sec: f32, burst: f32) -> Rate {
        Rate {
            per_sec,
            burst: burst.max(1.0),
        }
    }

    pub fn is_limited(&self) -> bool {
        self.per_sec > 0.0
    }

    fn refill(&self, tokens: f32, elapsed_ms: u32) -> f32 {
        (tokens + self.per_sec * elapsed_ms as f32 / 1000.0).min(self.burst)
    }

    /// Milliseconds until `tokens` (negative: a debt) is back at zero.
    fn wait_ms(&self, tokens: f32) -> u32 {
        if tokens >= 0.0 {
            0
        } else {
            (-tokens * 1000.0 / self.per_sec).ceil() as u32
        }
    }
}

/// One client's publish buckets (packets and payload bytes). A publish is always taken,
/// even into debt; a client in debt is paused (or disconnected) until the debt is repaid.
/// Taking into debt rather than refusing means no decoded packet ever waits in the broker.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishBuckets {
    packets: f32,
    bytes: f32,
    stamp_ms: u32,
}

impl PublishBuckets {
    pub fn full(packets: Rate, bytes: Rate, now_ms: u32) -> PublishBuckets {
        PublishBuckets {
            packets: packets.burst,
            bytes: bytes.burst,
            stamp_ms: now_ms,
        }
    }

    /// Charges one PUBLISH of `payload` bytes; returns how long (ms) the client must wait
    /// before it may publish again (0: it may go on).
    pub fn take(&mut self, packets: Rate, bytes: Rate, payload: usize, now_ms: u32) -> u32 {
        let elapsed = now_ms.wrapping_sub(self.stamp_ms);
        self.stamp_ms = now_ms;
        let mut wait = 0;
        if packets.is_limited() {
            self.packets = packets.refill(self.packets, elapsed) - 1.0;
            wait = wait.max(packets.wait_ms(self.packets));
        }
        if bytes.is_limited() {
            self.bytes = bytes.refill(self.bytes, elapsed) - payload as f32;
            wait = wait.max(bytes.wait_ms(self.bytes));
        }
        wait
    }
}

/// New connections per source address. Keyed by what the peer controls, so the map uses
/// the standard (randomly keyed) hasher, not a fast one an attacker can collide.
#[derive(Debug)]
pub struct ConnectLimiter {
    rate: Rate,
    buckets: HashMap<IpAddr, (f32, u32)>,
}

impl ConnectLimiter {
    pub fn new(rate: Rate) -> ConnectLimiter {
        ConnectLimiter {
            rate,
            buckets: HashMap::new(),
        }
    }

    /// Takes a token for a connection from `ip`; false when it has none left.
    pub fn admit(&mut self, ip: IpAddr, now_ms: u32) -> bool {
        if !self.rate.is_limited() {
            return true;
        }
        if self.buckets.len() >= MAX_TRACKED_ADDRESSES && !self.buckets.contains_key(&ip) {
            return true;
        }
        let rate = self.rate;
        let (tokens, stamp) = self.buckets.entry(ip).or_insert((rate.burst, now_ms));
        *tokens = rate.refill(*tokens, now_ms.wrapping_sub(*stamp));
        *stamp = now_ms;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets addresses whose bucket has refilled: they are as good as new.
    pub fn sweep(&mut self, now_ms: u32) {
        let rate = self.rate;
        self.buckets.retain(|_, (tokens, stamp)| {
            rate.refill(*tokens, now_ms.wrapping_sub(*stamp)) < rate.burst
        });
    }

    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_bucket_allows_the_burst_then_asks_to_wait() {
        let packets = Rate::new(10.0, 3.0);
        let bytes = Rate::new(0.0, 0.0);
        let mut b = PublishBuckets::full(packets, bytes, 0);
        assert_eq!(b.take(packets, bytes, 10, 0), 0);
        assert_eq!(b.take(packets, bytes, 10, 0), 0);
        assert_eq!(b.take(packets, bytes, 10, 0), 0);
        // The fourth goes into debt: one token at 10/s is 100 ms away.
        assert_eq!(b.take(packets, bytes, 10, 0), 100);
        // 100 ms later the debt is repaid and one more costs another 100 ms.
        assert_eq!(b.take(packets, bytes, 10, 100), 100);
        assert_eq!(b.take(packets, bytes, 10, 400), 0);
    }

    #[test]
    fn byte_bucket_counts_payload() {
        let packets = Rate::new(0.0, 0.0);
        let bytes = Rate::new(1000.0, 1000.0);
        let mut b = PublishBuckets::full(packets, bytes, 0);
        assert_eq!(b.take(packets, bytes, 600, 0), 0);
        assert_eq!(b.take(packets, bytes, 600, 0), 200);
        assert_eq!(b.take(packets, bytes, 0, 200), 0);
    }

    #[test]
    fn connect_limiter_is_per_address_and_sweeps() {
        let mut l = ConnectLimiter::new(Rate::new(1.0, 2.0));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(l.admit(a, 0));
        assert!(l.admit(a, 0));
        assert!(!l.admit(a, 0));
        assert!(l.admit(b, 0));
        assert!(l.admit(a, 1000));
        l.sweep(10_000);
        assert_eq!(l.tracked(), 0);
    }
}
