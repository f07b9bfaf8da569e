//! Retained messages: the last retained PUBLISH per topic name.

use std::rc::Rc;
use std::time::Instant;

use ahash::AHashMap;
use bytes::Bytes;

use crate::model::Message;

#[derive(Debug)]
pub struct RetainedStore {
    by_topic: AHashMap<Bytes, Rc<Message>>,
    max: usize,
}

impl RetainedStore {
    pub fn new(max: usize) -> RetainedStore {
        RetainedStore {
            by_topic: AHashMap::new(),
            max,
        }
    }

    /// Stores `msg` as the retained message of its topic; an empty payload clears it
    /// (MQTT-3.3.1-10). Returns false when the store is full and the topic is new.
    pub fn set(&mut self, msg: Rc<Message>) -> bool {
        if msg.payload.is_empty() {
            self.by_topic.remove(&msg.topic);
            return true;
        }
        if self.by_topic.len() >= self.max && !self.by_topic.contains_key(&msg.topic) {
            return false;
        }
        self.by_topic.insert(msg.topic.clone(), msg);
        true
    }

    /// Appends the unexpired retained messages matching `filter` (a plain filter) to `out`.
    pub fn matching(&self, filter: &str, now: Instant, out: &mut Vec<Rc<Message>>) {
        if !filter.contains(['+', '#']) {
            out.extend(
                self.by_topic
                    .get(filter.as_bytes())
                    .filter(|m| !m.is_expired(now))
                    .cloned(),
            );
            return;
        }
        out.extend(
            self.by_topic
                .values()
                .filter(|m| !m.is_expired(now) && topic_trie::filter_matches(filter, m.topic_str()))
                .cloned(),
        );
    }

    /// Drops expired messages (called from the worker's periodic tick).
    pub fn sweep(&mut self, now: Instant) {
        self.by_topic.retain(|_, m| !m.is_expired(now));
    }

    pub fn all(&self) -> Vec<Rc<Message>> {
        self.by_topic.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.by_topic.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }
}
