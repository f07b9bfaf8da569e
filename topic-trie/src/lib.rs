//! MQTT topic validation and the broker's subscription index.
//!
//! # Topic names and filters (MQTT 3.1.1 / 5.0 §4.7)
//!
//! Levels are separated by `/`; empty levels are valid and distinct
//! (`a//b` has three levels, the middle one empty). In filters, `+` matches
//! exactly one level (possibly empty) and must be a whole level; `#` matches
//! the parent level and any number of further levels and must be the whole
//! last level. Topics starting with `$` are not matched by a filter whose
//! first level is a wildcard.
//!
//! | filter            | valid? | why                                 |
//! |-------------------|--------|-------------------------------------|
//! | `sport/tennis/#`  | yes    | matches `sport/tennis` too          |
//! | `#`               | yes    | everything except `$...` topics     |
//! | `+/+`             | yes    | matches `/finance`                  |
//! | `$SYS/#`          | yes    | the way to see `$SYS` topics        |
//! | `$share/g/a/+`    | yes    | shared: group `g`, filter `a/+`     |
//! | `sport/tennis#`   | no     | `#` not a whole level               |
//! | `sport/#/ranking` | no     | `#` not last                        |
//! | `sport+`          | no     | `+` not a whole level               |
//! | `$share/g`        | no     | shared without a filter             |
//! | `$share//a`       | no     | empty share group                   |
//! | `$share/g+/a`     | no     | wildcard in share group             |
//! | (empty)           | no     | at least one character              |
//!
//! ```
//! use topic_trie::*;
//! assert!(validate_filter("sport/+/player1").is_ok());
//! assert_eq!(validate_filter("sport/#/ranking"), Err(TopicError::InvalidWildcard));
//! assert_eq!(validate_topic_name("a/+"), Err(TopicError::WildcardInTopicName));
//! assert_eq!(
//!     parse_subscription_filter("$share/workers/jobs/#"),
//!     Ok(SubscriptionFilter::Shared { group: "workers", filter: "jobs/#" })
//! );
//! assert!(filter_matches("sport/#", "sport"));
//! ```
//!
//! One limit goes beyond the spec: a filter may have at most
//! [`MAX_FILTER_LEVELS`] (1024) levels, because the trie recurses per level.
//!
//! # The trie ([`TopicTrie`])
//!
//! In the style of NATS' sublist and mosquitto's `subs.c`: one node per filter
//! level, and each node has
//!
//! * literal children, keyed by the level string — a `Vec` searched linearly
//!   while there are at most 8 (the usual case: most nodes have one child),
//!   an `AHashMap<Box<str>, Node>` beyond;
//! * a `plus: Option<Box<Node>>` slot for a `+` level;
//! * a `hash: Option<Box<Subscribers>>` slot for a final `#` (it never has
//!   children, so it only holds subscribers);
//! * the subscribers of the filter ending at this node: plain ones (a `Vec<(K, V)>`
//!   up to 16, an `AHashMap<K, V>` beyond) and, boxed because rare, the shared
//!   groups on this filter.
//!
//! Matching a topic walks its levels with `split_once('/')` (no allocation);
//! at each node it visits the `#` slot, descends into the `+` slot and into
//! the literal child for the level: at most three lookups per level and
//! never a scan over all filters. Removing prunes every node left empty.
//!
//! A `Node<u64, SubscriptionOptions>` is 72 bytes. Measured with a counting
//! allocator (`tests/memory.rs`, 100 000 filters, `K = u64`,
//! `V = SubscriptionOptions`; heap bytes per subscription, allocator
//! bookkeeping excluded):
//!
//! | filter set                            | bytes / subscription |
//! |---------------------------------------|----------------------|
//! | `dev/{i}/temp` (distinct, 3 levels)   | ~175                 |
//! | `dev/+/{i}` (distinct leaf)           | ~140                 |
//! | `news/#`, 100 000 subscribers         | ~45                  |
//!
//! # Shared subscriptions
//!
//! `$share/{group}/{filter}` members are stored at `filter`'s node, per group.
//! [`TopicTrie::for_each_match`] reports each matching group once, with the
//! member picked round-robin; the cursor is an atomic, so matching takes
//! `&self` and the trie stays `Sync`.

mod shared;
mod trie;
mod validate;

pub use trie::TopicTrie;
pub use validate::{
    filter_matches, parse_subscription_filter, validate_filter, validate_topic_name,
    SubscriptionFilter, TopicError, MAX_FILTER_LEVELS, MAX_TOPIC_LEN, SHARE_PREFIX,
};

/// Per-subscription options (MQTT 5.0 §3.8.3.1 plus the subscription
/// identifier), the value most users store in a [`TopicTrie`]. 12 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubscriptionOptions {
    /// Maximum QoS granted (0, 1 or 2).
    pub qos: u8,
    /// Do not send the subscriber's own publications back to it.
    pub no_local: bool,
    /// Keep the RETAIN flag as published instead of clearing it.
    pub retain_as_published: bool,
    /// 0: send retained on subscribe, 1: only if new subscription, 2: never.
    pub retain_handling: u8,
    /// Subscription Identifier from the SUBSCRIBE properties, if any.
    pub subscription_id: Option<u32>,
}
