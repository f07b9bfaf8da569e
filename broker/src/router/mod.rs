//! This worker's routing state: which local sessions subscribe to what (a topic trie for
//! plain subscriptions, [`SharedGroups`] for shared ones), the cluster [`RouteTable`] of
//! which workers subscribe to what, and the retained messages.

mod retained;
mod routes;
mod shared;

pub use retained::RetainedStore;
pub use routes::{RouteKind, RouteTable};
pub use shared::SharedGroups;
pub use topic_trie::SubscriptionOptions;

use crate::model::SessionKey;

/// Local plain subscriptions, keyed by session slot.
pub type SubscriptionIndex = topic_trie::TopicTrie<SessionKey, SubscriptionOptions>;
