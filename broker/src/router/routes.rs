//! The cluster route table: which workers have subscriptions matching a topic. Every worker
//! keeps a replica (its own routes plus those its peers announce), so a PUBLISH is
//! forwarded only to workers with a matching subscription, and each shared group is
//! served by one worker per message.

use topic_trie::TopicTrie;

use crate::model::{NodeId, Route, SharedTarget};

/// What a route-table match yields per worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteKind {
    Plain,
    /// A shared group this worker has members of (the trie picks one worker per group).
    Shared(SharedTarget),
}

#[derive(Debug, Default)]
pub struct RouteTable {
    trie: TopicTrie<NodeId, RouteKind>,
}

impl RouteTable {
    pub fn add(&mut self, worker: NodeId, route: &Route) {
        match &route.group {
            None => {
                self.trie.insert(&route.filter, worker, RouteKind::Plain);
            }
            Some(group) => {
                let kind = RouteKind::Shared(SharedTarget {
                    group: group.clone(),
                    filter: route.filter.clone(),
                });
                self.trie.insert_shared(group, &route.filter, worker, kind);
            }
        }
    }

    pub fn remove(&mut self, worker: NodeId, route: &Route) {
        match &route.group {
            None => self.trie.remove(&route.filter, &worker),
            Some(group) => self.trie.remove_shared(group, &route.filter, &worker),
        };
    }

    /// Calls `visit` for each worker with a plain route matching `topic`, and for each
    /// matching shared group once, with the worker picked to serve it.
    pub fn for_each_match(&self, topic: &str, visit: impl FnMut(&NodeId, &RouteKind)) {
        self.trie.for_each_match(topic, visit);
    }

    pub fn len(&self) -> usize {
        self.trie.len()
    }

    pub fn is_empty(&self) -> bool {
        self.trie.is_empty()
    }
}
