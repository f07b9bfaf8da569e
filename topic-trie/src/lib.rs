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
//! level. A node (48 bytes for `K = u64`) has
//!
//! * literal children keyed by the level string: an exactly-sized boxed slice
//!   searched linearly while there are at most 8 (the usual case: most nodes
//!   have one child, and a one-entry hash table would cost four buckets), an
//!   `AHashMap<Box<str>, Node>` (randomly seeded, so clients cannot force
//!   collisions) beyond;
//! * one `Option<Box<Wild>>` holding the `+` child (a full node) and the
//!   subscribers of a final `#` (which never has children). Boxed together
//!   because most nodes have neither: one pointer per node instead of two;
//! * the subscribers of the filter ending at this node: plain ones (a boxed
//!   slice of `(K, V)` up to 16, an `AHashMap<K, V>` beyond) and, boxed
//!   because rare, the shared groups on this filter.
//!
//! Matching a topic walks its levels with `split_once('/')` and never
//! allocates (checked in `tests/memory.rs`): at each node it visits the `#`
//! subscribers, descends into the `+` child and into the literal child for
//! the level — at most three lookups per level, never a scan over all
//! filters. Inserting is iterative; removing recurses once per level and
//! prunes every node left empty.
//!
//! Memory, measured with a counting allocator (`tests/memory.rs`: 100 000
//! subscriptions, `K = u64`, `V = SubscriptionOptions`; requested heap bytes
//! per subscription, malloc's own per-chunk overhead not included):
//!
//! | filter set                                      | bytes / subscription |
//! |-------------------------------------------------|----------------------|
//! | `dev/{i}/temp` (distinct, two new nodes each)   | ~182                 |
//! | `dev/+/{i}` (distinct, one new node each)       | ~114                 |
//! | mix of the above and `site/{i % 100}/#`         | ~140                 |
//! | `news/#` with 100 000 subscribers               | ~33                  |
//!
//! Speed (`benches/trie.rs`, 100 000-filter mix, 2-core VM): one match with a
//! literal hit ~26 ns, a `+` hit ~21 ns, a miss ~6 ns, a `#` hit visiting 333
//! subscribers ~146 ns; subscribe/unsubscribe churn ~4 M ops/s into the
//! 100k-filter trie, ~10 M ops/s into an empty one.
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
