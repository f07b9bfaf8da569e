//! This worker's members of shared subscription groups (`$share/{group}/{filter}`).
//!
//! Which *worker* serves a group for a given message is decided by the route table (one
//! worker per group per message, round-robin over the workers with members); the worker
//! chosen then picks one of its local members here, round-robin as well.

use ahash::AHashMap;
use topic_trie::SubscriptionOptions;

use crate::model::SessionKey;

#[derive(Debug, Default)]
struct Group {
    members: Vec<(SessionKey, SubscriptionOptions)>,
    next: usize,
}

#[derive(Debug, Default)]
pub struct SharedGroups {
    /// group -> filter -> local members (nested so lookups by `&str` allocate nothing).
    groups: AHashMap<Box<str>, AHashMap<Box<str>, Group>>,
}

impl SharedGroups {
    /// Adds or updates `session` in the group. Returns true if the group was new here.
    pub fn insert(
        &mut self,
        group: &str,
        filter: &str,
        session: SessionKey,
        opts: SubscriptionOptions,
    ) -> bool {
        let filters = self.groups.entry(group.into()).or_default();
        let is_new = !filters.contains_key(filter);
        let g = filters.entry(filter.into()).or_default();
        match g.members.iter_mut().find(|(s, _)| *s == session) {
            Some(member) => member.1 = opts,
            None => g.members.push((session, opts)),
        }
        is_new
    }

    /// Removes `session` from the group. Returns true if the group is now empty here.
    pub fn remove(&mut self, group: &str, filter: &str, session: SessionKey) -> bool {
        let Some(filters) = self.groups.get_mut(group) else {
            return false;
        };
        let Some(g) = filters.get_mut(filter) else {
            return false;
        };
        g.members.retain(|(s, _)| *s != session);
        if !g.members.is_empty() {
            return false;
        }
        filters.remove(filter);
        if filters.is_empty() {
            self.groups.remove(group);
        }
        true
    }

    /// The next member of the group, round-robin.
    pub fn pick(&mut self, group: &str, filter: &str) -> Option<(SessionKey, SubscriptionOptions)> {
        let g = self.groups.get_mut(group)?.get_mut(filter)?;
        if g.members.is_empty() {
            return None;
        }
        let member = g.members[g.next % g.members.len()];
        g.next = g.next.wrapping_add(1);
        Some(member)
    }

    pub fn len(&self) -> usize {
        self.groups
            .values()
            .flat_map(|filters| filters.values())
            .map(|g| g.members.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_members_in_turn_and_forgets_empty_groups() {
        let mut g = SharedGroups::default();
        let o = SubscriptionOptions::default();
        let (one, two) = (SessionKey(1), SessionKey(2));
        assert!(g.insert("g", "t", one, o));
        assert!(!g.insert("g", "t", two, o));
        let picks: Vec<SessionKey> = (0..4).map(|_| g.pick("g", "t").unwrap().0).collect();
        assert_eq!(picks, [one, two, one, two]);
        assert!(!g.remove("g", "t", one));
        assert_eq!(g.pick("g", "t").unwrap().0, two);
        assert!(g.remove("g", "t", two));
        assert!(g.pick("g", "t").is_none());
        assert!(g.is_empty());
    }
}
