//! This worker's routing state: which local sessions subscribe to what (a topic trie) and
//! the retained messages. Cross-worker routes live behind [`crate::cluster::Cluster`].

mod retained;

pub use retained::RetainedStore;
pub use topic_trie::SubscriptionOptions;

/// Local subscriptions, keyed by session slot. Shared subscriptions are kept in the same
/// trie under their group, and the trie picks one member per message.
pub type SubscriptionIndex = topic_trie::TopicTrie<usize, SubscriptionOptions>;
