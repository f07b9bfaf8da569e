//! An application message as the broker routes it, independent of who sent it and how.

use std::time::Instant;

use bytes::Bytes;

use crate::protocol::{PublishProperties, QoS};

/// A session's slot in one worker's engine. Meaningful only on that worker: it never
/// crosses the cluster (a forwarded message arrives without its origin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey(pub(crate) usize);

/// One PUBLISH as received, shared (`Rc`) by every queue and inflight window holding it.
///
/// The topic is the resolved name (never an alias) and was validated as UTF-8; `properties`
/// holds only what is forwarded to subscribers (no topic alias, no subscription identifiers).
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Boxed: most messages have none, and the struct would otherwise triple `Message`.
    pub properties: Option<Box<PublishProperties>>,
    /// From the v5 Message Expiry Interval; the message is dropped undelivered after it.
    pub expires_at: Option<Instant>,
    /// Session that published it, for No Local subscriptions (`None` for wills, `$SYS`
    /// and messages from other workers).
    pub origin: Option<SessionKey>,
}

impl Message {
    pub fn topic_str(&self) -> &str {
        // Validated as UTF-8 when the PUBLISH (or will) was accepted.
        std::str::from_utf8(&self.topic).unwrap_or_default()
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Seconds of expiry left, rounded up, for the Message Expiry Interval sent onwards.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|at| {
            let left = at.saturating_duration_since(now);
            (left.as_secs() + u64::from(left.subsec_nanos() > 0)).min(u32::MAX as u64) as u32
        })
    }
}

/// How one message goes to one subscriber: the subscription decides QoS, retain flag and ids.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    pub qos: u8,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
}
