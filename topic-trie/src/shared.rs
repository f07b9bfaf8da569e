//! Shared subscription groups (`$share/{group}/{filter}`, MQTT 5.0 §4.8.2).
//!
//! A trie node's subscriber set holds, next to its plain subscribers, the
//! groups sharing that node's filter. Each group delivers one copy per
//! message, to its members in turn.

use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One share group on one filter.
pub(crate) struct SharedGroup<K, V> {
    name: Box<str>,
    /// Members in join order. Removal keeps the order (`Vec::remove`) so the
    /// rotation stays fair; groups are small (a handful of workers), so the
    /// O(members) join/leave is cheaper than a map.
    members: Vec<(K, V)>,
    /// Round-robin ticket counter. Atomic (relaxed: it orders nothing else)
    /// so that matching needs only `&self` and concurrent matchers each get
    /// a distinct ticket.
    next: AtomicUsize,
}

impl<K, V> SharedGroup<K, V> {
    #[inline]
    fn pick(&self) -> Option<&(K, V)> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        // The counter wraps after 2^64 (2^32) picks; the one uneven step at
        // the wrap is irrelevant.
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        self.members.get(ticket % n)
    }
}

/// All share groups on one filter. Usually one group, so a `Vec`.
pub(crate) struct SharedGroups<K, V> {
    groups: Vec<SharedGroup<K, V>>,
}

impl<K, V> Default for SharedGroups<K, V> {
    fn default() -> Self {
        SharedGroups { groups: Vec::new() }
    }
}

impl<K: Eq + Hash, V> SharedGroups<K, V> {
    pub(crate) fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    pub(crate) fn get(&self, group: &str, key: &K) -> Option<&V> {
        let g = self.groups.iter().find(|g| &*g.name == group)?;
        g.members.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Adds or replaces `key` in `group`; returns the previous value.
    pub(crate) fn insert(&mut self, group: &str, key: K, value: V) -> Option<V> {
        let idx = match self.groups.iter().position(|g| &*g.name == group) {
            Some(i) => i,
            None => {
                self.groups.reserve_exact(1);
                self.groups.push(SharedGroup {
                    name: group.into(),
                    members: Vec::new(),
                    next: AtomicUsize::new(0),
                });
                self.groups.len() - 1
            }
        };
        let g = &mut self.groups[idx];
        if let Some(slot) = g.members.iter_mut().find(|(k, _)| *k == key) {
            return Some(std::mem::replace(&mut slot.1, value));
        }
        // Pin the cursor to its position in the current list before the
        // length (the modulus) changes; the newcomer joins at the end of the
        // rotation.
        let n = g.members.len();
        let cur = g.next.get_mut();
        *cur = if n == 0 { 0 } else { *cur % n };
        g.members.push((key, value));
        None
    }

    /// Removes `key` from `group`, dropping the group when it empties.
    pub(crate) fn remove(&mut self, group: &str, key: &K) -> Option<V> {
        let gi = self.groups.iter().position(|g| &*g.name == group)?;
        let g = &mut self.groups[gi];
        let mi = g.members.iter().position(|(k, _)| k == key)?;
        let (_, old) = g.members.remove(mi);
        // Keep the rotation where it was: members after the removed one moved
        // down a slot, so step the cursor back if it pointed past it.
        let n = g.members.len();
        if n == 0 {
            self.groups.swap_remove(gi);
        } else {
            let cur = g.next.get_mut();
            let pos = *cur % (n + 1);
            *cur = if pos > mi { pos - 1 } else { pos % n };
        }
        Some(old)
    }

    /// Visits one member of every group, chosen round-robin.
    #[inline]
    pub(crate) fn visit_round_robin(&self, visit: &mut impl FnMut(&K, &V)) {
        for g in &self.groups {
            if let Some((k, v)) = g.pick() {
                visit(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picks(g: &SharedGroups<u32, ()>, n: usize) -> Vec<u32> {
        let mut out = Vec::new();
        for _ in 0..n {
            g.visit_round_robin(&mut |k, _| out.push(*k));
        }
        out
    }

    #[test]
    fn rotation_survives_removal() {
        let mut g = SharedGroups::default();
        for k in 1..=4u32 {
            g.insert("g", k, ());
        }
        assert_eq!(picks(&g, 2), [1, 2]);
        // Remove an already-served member: the next pick is still 3.
        g.remove("g", &1);
        assert_eq!(picks(&g, 4), [3, 4, 2, 3]);
        // Remove the member that would be next: its successor comes next.
        g.remove("g", &4);
        assert_eq!(picks(&g, 3), [2, 3, 2]);
        g.remove("g", &2);
        g.remove("g", &3);
        assert!(g.is_empty());
    }
}
