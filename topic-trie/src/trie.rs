//! The subscription index: a token trie over topic-filter levels.
//!
//! See the crate docs for the layout. Every operation walks the filter or
//! topic one level at a time; no operation ever scans all filters.

use std::fmt;
use std::hash::Hash;

use ahash::AHashMap;

use crate::shared::SharedGroups;

/// A node keeps its literal children in a linearly searched slice up to this
/// many, and in a hash map beyond. Most nodes of a real subscription set have
/// one child (`dev/123/temp` style chains) and a one-entry hash table costs
/// ~4 buckets plus the map header, whereas a one-entry slice costs exactly one
/// entry. Comparing up to 8 short strings is about as fast as hashing one.
const FEW_CHILDREN: usize = 8;

/// Subscribers of one filter are kept in a slice up to this many (one or two
/// is the norm), then in a hash map so that (un)subscribing stays O(1) for
/// popular filters with thousands of subscribers.
const FEW_SUBS: usize = 16;

/// Splits off the first level: `"a/b/c"` -> `("a", Some("b/c"))`,
/// `"a"` -> `("a", None)`, `"a/"` -> `("a", Some(""))`.
#[inline]
pub(crate) fn split_level(s: &str) -> (&str, Option<&str>) {
    match s.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (s, None),
    }
}

/// Appends to an exactly-sized boxed slice (no spare capacity kept: nodes
/// are long-lived and numerous, so slack would dominate memory).
fn slice_push<T>(s: &mut Box<[T]>, item: T) -> usize {
    let mut v = std::mem::take(s).into_vec();
    v.reserve_exact(1);
    v.push(item);
    *s = v.into_boxed_slice();
    s.len() - 1
}

/// Swap-removes from an exactly-sized boxed slice.
fn slice_swap_remove<T>(s: &mut Box<[T]>, i: usize) -> T {
    let mut v = std::mem::take(s).into_vec();
    let item = v.swap_remove(i);
    *s = v.into_boxed_slice();
    item
}

/// A literal child: its level string and node.
type Child<K, V> = (Box<str>, Node<K, V>);

/// Literal (non-wildcard) children of a node. 16 bytes: a boxed slice rather
/// than a `Vec` saves the capacity word in every node.
enum Children<K, V> {
    /// Few children, linear search; empty slice (no allocation) when empty.
    Few(Box<[Child<K, V>]>),
    /// Many children, hashed (ahash with a random per-map seed, so topic
    /// levels chosen by clients cannot force collisions).
    Many(Box<AHashMap<Box<str>, Node<K, V>>>),
}

impl<K, V> Children<K, V> {
    fn is_empty(&self) -> bool {
        match self {
            Children::Few(v) => v.is_empty(),
            Children::Many(m) => m.is_empty(),
        }
    }

    #[inline]
    fn get(&self, tok: &str) -> Option<&Node<K, V>> {
        match self {
            Children::Few(v) => v.iter().find(|(t, _)| &**t == tok).map(|(_, n)| n),
            Children::Many(m) => m.get(tok),
        }
    }

    fn get_mut(&mut self, tok: &str) -> Option<&mut Node<K, V>> {
        match self {
            Children::Few(v) => v.iter_mut().find(|(t, _)| &**t == tok).map(|(_, n)| n),
            Children::Many(m) => m.get_mut(tok),
        }
    }

    fn get_or_insert(&mut self, tok: &str) -> &mut Node<K, V> {
        if let Children::Few(v) = self {
            if v.len() >= FEW_CHILDREN && !v.iter().any(|(t, _)| &**t == tok) {
                let mut map = AHashMap::with_capacity(v.len() + 1);
                map.extend(std::mem::take(v).into_vec());
                *self = Children::Many(Box::new(map));
            }
        }
        match self {
            Children::Few(v) => {
                let i = match v.iter().position(|(t, _)| &**t == tok) {
                    Some(i) => i,
                    // Exact growth: the default Vec growth would reserve 4
                    // slots for the typical single child.
                    None => slice_push(v, (tok.into(), Node::default())),
                };
                &mut v[i].1
            }
            // `entry` wants an owned key; the extra allocation on a hit only
            // happens when subscribing, never when matching.
            Children::Many(m) => m.entry(tok.into()).or_default(),
        }
    }

    fn remove(&mut self, tok: &str) {
        match self {
            Children::Few(v) => {
                if let Some(i) = v.iter().position(|(t, _)| &**t == tok) {
                    slice_swap_remove(v, i);
                }
            }
            Children::Many(m) => {
                m.remove(tok);
                if m.len() <= FEW_CHILDREN / 2 {
                    *self = Children::Few(m.drain().collect());
                } else if m.capacity() > 4 * m.len() {
                    m.shrink_to_fit();
                }
            }
        }
    }

    fn for_each(&self, mut f: impl FnMut(&Node<K, V>)) {
        match self {
            Children::Few(v) => v.iter().for_each(|(_, n)| f(n)),
            Children::Many(m) => m.values().for_each(f),
        }
    }
}

/// The plain (non-shared) subscribers of one filter.
enum SubList<K, V> {
    Few(Box<[(K, V)]>),
    Many(Box<AHashMap<K, V>>),
}

impl<K: Eq + Hash, V> SubList<K, V> {
    fn len(&self) -> usize {
        match self {
            SubList::Few(v) => v.len(),
            SubList::Many(m) => m.len(),
        }
    }

    fn get(&self, key: &K) -> Option<&V> {
        match self {
            SubList::Few(v) => v.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            SubList::Many(m) => m.get(key),
        }
    }

    fn insert(&mut self, key: K, value: V) -> Option<V> {
        if let SubList::Few(v) = self {
            if let Some(slot) = v.iter_mut().find(|(k, _)| *k == key) {
                return Some(std::mem::replace(&mut slot.1, value));
            }
            if v.len() < FEW_SUBS {
                slice_push(v, (key, value));
                return None;
            }
            let mut map = AHashMap::with_capacity(v.len() + 1);
            map.extend(std::mem::take(v).into_vec());
            *self = SubList::Many(Box::new(map));
        }
        match self {
            SubList::Many(m) => m.insert(key, value),
            SubList::Few(v) => {
                slice_push(v, (key, value));
                None
            }
        }
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        match self {
            SubList::Few(v) => {
                let i = v.iter().position(|(k, _)| k == key)?;
                let (_, old) = slice_swap_remove(v, i);
                Some(old)
            }
            SubList::Many(m) => {
                let old = m.remove(key)?;
                if m.len() <= FEW_SUBS / 2 {
                    *self = SubList::Few(m.drain().collect());
                } else if m.capacity() > 4 * m.len() {
                    m.shrink_to_fit();
                }
                Some(old)
            }
        }
    }

    #[inline]
    fn for_each(&self, visit: &mut impl FnMut(&K, &V)) {
        match self {
            SubList::Few(v) => v.iter().for_each(|(k, val)| visit(k, val)),
            SubList::Many(m) => m.iter().for_each(|(k, val)| visit(k, val)),
        }
    }
}

/// Everything subscribed to exactly one filter: plain subscribers and shared
/// groups (boxed, because shared subscriptions are rare and the box keeps
/// every node 16 bytes smaller).
pub(crate) struct Subscribers<K, V> {
    plain: SubList<K, V>,
    shared: Option<Box<SharedGroups<K, V>>>,
}

impl<K, V> Default for Subscribers<K, V> {
    fn default() -> Self {
        Subscribers {
            plain: SubList::Few(Box::default()),
            shared: None,
        }
    }
}

impl<K: Eq + Hash, V> Subscribers<K, V> {
    fn is_empty(&self) -> bool {
        self.plain.len() == 0 && self.shared.is_none()
    }

    #[inline]
    fn visit(&self, visit: &mut impl FnMut(&K, &V)) {
        self.plain.for_each(visit);
        if let Some(groups) = &self.shared {
            groups.visit_round_robin(visit);
        }
    }
}

/// The wildcard slots of a node, boxed together: most nodes have neither, so
/// one pointer in every node is cheaper than two, and a node that has one
/// wildcard child pays one extra allocation only.
struct Wild<K, V> {
    /// The `+` child (a full node: `a/+/b`).
    plus: Option<Node<K, V>>,
    /// Subscribers of a final `#` (`#` is always last, so no children).
    hash: Option<Subscribers<K, V>>,
}

impl<K, V> Default for Wild<K, V> {
    fn default() -> Self {
        Wild {
            plus: None,
            hash: None,
        }
    }
}

impl<K, V> Wild<K, V> {
    fn is_empty(&self) -> bool {
        self.plus.is_none() && self.hash.is_none()
    }
}

/// One trie node = one filter level. 48 bytes for `K = u64`.
pub(crate) struct Node<K, V> {
    children: Children<K, V>,
    wild: Option<Box<Wild<K, V>>>,
    subs: Subscribers<K, V>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            children: Children::Few(Box::default()),
            wild: None,
            subs: Subscribers::default(),
        }
    }
}

impl<K: Eq + Hash, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.wild.is_none() && self.subs.is_empty()
    }

    fn count(&self) -> usize {
        let mut n = 1;
        if let Some(w) = &self.wild {
            n += usize::from(w.hash.is_some());
            if let Some(p) = &w.plus {
                n += p.count();
            }
        }
        self.children.for_each(|c| n += c.count());
        n
    }
}

/// The subscription index: topic filter -> subscribers keyed by `K`, each with
/// a value `V` (typically [`crate::SubscriptionOptions`]).
///
/// Plain and shared (`$share/{group}/{filter}`) subscriptions live in the same
/// trie; a shared group is identified by `(group, filter)`.
///
/// Filters passed to the mutating methods must be valid plain filters (see
/// [`crate::validate_filter`]); an invalid one is stored in some unspecified
/// but harmless way (e.g. `a/#/b` keeps `#` as a literal level that no valid
/// topic name can match), never a panic.
///
/// `TopicTrie` is `Send + Sync` when `K` and `V` are: the round-robin cursor
/// of a shared group is an atomic, so matching takes `&self` and may run
/// concurrently under a read lock.
pub struct TopicTrie<K, V> {
    root: Node<K, V>,
    len: usize,
}

impl<K: Eq + Hash + Clone, V> Default for TopicTrie<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V> fmt::Debug for TopicTrie<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicTrie")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone, V> TopicTrie<K, V> {
    /// An empty index (allocates nothing).
    pub fn new() -> Self {
        TopicTrie {
            root: Node::default(),
            len: 0,
        }
    }

    /// Number of `(filter, key)` subscriptions, shared-group members included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when there is no subscription at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes every subscription.
    pub fn clear(&mut self) {
        *self = Self::new();
    }

    /// Number of trie nodes (root included; a `#` slot counts as one).
    /// Diagnostics only: it walks the whole trie.
    pub fn node_count(&self) -> usize {
        self.root.count()
    }

    /// Adds or replaces `key`'s subscription to the plain `filter`.
    /// Returns the previous value if `key` already had this filter.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let old = self.subscribers_mut(filter).plain.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Adds or replaces `key` as a member of shared group `group` on `filter`
    /// (the parts of `$share/{group}/{filter}`). Returns the previous value if
    /// `key` already was a member.
    pub fn insert_shared(&mut self, group: &str, filter: &str, key: K, value: V) -> Option<V> {
        let subs = self.subscribers_mut(filter);
        let old = subs
            .shared
            .get_or_insert_with(Default::default)
            .insert(group, key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `key`'s plain subscription to `filter`, pruning nodes that
    /// become empty. Returns the removed value.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let old = remove_in(&mut self.root, filter, &mut |s| s.plain.remove(key));
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Removes `key` from shared group `group` on `filter`, dropping the group
    /// when it empties and pruning nodes that become empty.
    pub fn remove_shared(&mut self, group: &str, filter: &str, key: &K) -> Option<V> {
        let old = remove_in(&mut self.root, filter, &mut |s| {
            let groups = s.shared.as_mut()?;
            let old = groups.remove(group, key);
            if groups.is_empty() {
                s.shared = None;
            }
            old
        });
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The value of `key`'s plain subscription to `filter`, if any.
    pub fn get(&self, filter: &str, key: &K) -> Option<&V> {
        self.subscribers(filter)?.plain.get(key)
    }

    /// The value of `key`'s membership in shared group `group` on `filter`.
    pub fn get_shared(&self, group: &str, filter: &str, key: &K) -> Option<&V> {
        self.subscribers(filter)?.shared.as_ref()?.get(group, key)
    }

    /// Calls `visit` for every `(key, value)` whose plain filter matches
    /// `topic`, and once per matching shared group with the member chosen
    /// round-robin (the group's cursor advances; it is an atomic, so this
    /// takes `&self`).
    ///
    /// A subscriber matched through several filters is visited once per
    /// filter; merging (highest QoS, all subscription identifiers) is the
    /// caller's job. Visiting order is unspecified. Never allocates.
    ///
    /// `topic` should be a valid topic name; it is not re-validated here.
    pub fn for_each_match(&self, topic: &str, mut visit: impl FnMut(&K, &V)) {
        let root = &self.root;
        let (first, rest) = split_level(topic);
        // §4.7.2: topics starting with '$' are not matched by a filter whose
        // first level is a wildcard. Only the root's wildcard slots are
        // skipped; deeper ones (`$SYS/+`) match normally.
        if !first.starts_with('$') {
            if let Some(w) = &root.wild {
                if let Some(h) = &w.hash {
                    h.visit(&mut visit);
                }
                if let Some(p) = &w.plus {
                    match_from(p, rest, &mut visit);
                }
            }
        }
        if let Some(c) = root.children.get(first) {
            match_from(c, rest, &mut visit);
        }
    }

    /// Finds (creating as needed) the subscriber set of `filter`. Iterative,
    /// so inserting never recurses.
    fn subscribers_mut(&mut self, filter: &str) -> &mut Subscribers<K, V> {
        let mut node = &mut self.root;
        let mut rest = filter;
        loop {
            let (tok, next) = split_level(rest);
            if tok == "#" && next.is_none() {
                let wild = node.wild.get_or_insert_with(Default::default);
                return wild.hash.get_or_insert_with(Default::default);
            }
            node = if tok == "+" {
                let wild = node.wild.get_or_insert_with(Default::default);
                wild.plus.get_or_insert_with(Default::default)
            } else {
                node.children.get_or_insert(tok)
            };
            match next {
                Some(n) => rest = n,
                None => return &mut node.subs,
            }
        }
    }

    /// Finds the subscriber set of `filter` without creating anything.
    fn subscribers(&self, filter: &str) -> Option<&Subscribers<K, V>> {
        let mut node = &self.root;
        let mut rest = filter;
        loop {
            let (tok, next) = split_level(rest);
            if tok == "#" && next.is_none() {
                return node.wild.as_ref()?.hash.as_ref();
            }
            node = if tok == "+" {
                node.wild.as_ref()?.plus.as_ref()?
            } else {
                node.children.get(tok)?
            };
            match next {
                Some(n) => rest = n,
                None => return Some(&node.subs),
            }
        }
    }
}

/// Matches the remaining topic levels `rest` below `node` (which matched the
/// previous level). `None` means the topic ended at `node`.
///
/// Recursion depth is bounded by the trie depth (at most
/// [`crate::MAX_FILTER_LEVELS`] for validated filters), not by the topic.
fn match_from<K: Eq + Hash, V, F: FnMut(&K, &V)>(
    node: &Node<K, V>,
    rest: Option<&str>,
    visit: &mut F,
) {
    let wild = node.wild.as_deref();
    // A '#' below this node matches both the parent level (topic ends here,
    // "sport/#" vs "sport") and any number of further levels.
    if let Some(h) = wild.and_then(|w| w.hash.as_ref()) {
        h.visit(visit);
    }
    let Some(rest) = rest else {
        node.subs.visit(visit);
        return;
    };
    let (tok, next) = split_level(rest);
    // '+' consumes exactly one level, even an empty one.
    if let Some(p) = wild.and_then(|w| w.plus.as_ref()) {
        match_from(p, next, visit);
    }
    if let Some(c) = node.children.get(tok) {
        match_from(c, next, visit);
    }
}

/// Walks `filter` below `node`, applies `op` to its subscriber set and prunes
/// every node left empty on the way back up.
fn remove_in<K: Eq + Hash, V, R>(
    node: &mut Node<K, V>,
    filter: &str,
    op: &mut impl FnMut(&mut Subscribers<K, V>) -> Option<R>,
) -> Option<R> {
    let (tok, next) = split_level(filter);
    if tok == "#" && next.is_none() {
        let wild = node.wild.as_deref_mut()?;
        let subs = wild.hash.as_mut()?;
        let r = op(subs);
        if subs.is_empty() {
            wild.hash = None;
            if wild.is_empty() {
                node.wild = None;
            }
        }
        return r;
    }
    let is_plus = tok == "+";
    let child = if is_plus {
        node.wild.as_deref_mut()?.plus.as_mut()?
    } else {
        node.children.get_mut(tok)?
    };
    let r = match next {
        Some(n) => remove_in(child, n, op),
        None => op(&mut child.subs),
    };
    if child.is_empty() {
        if is_plus {
            if let Some(wild) = node.wild.as_deref_mut() {
                wild.plus = None;
                if wild.is_empty() {
                    node.wild = None;
                }
            }
        } else {
            node.children.remove(tok);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(t: &TopicTrie<u32, &'static str>, topic: &str) -> Vec<&'static str> {
        let mut v = Vec::new();
        t.for_each_match(topic, |_, f| v.push(*f));
        v.sort_unstable();
        v
    }

    fn trie_of(filters: &[&'static str]) -> TopicTrie<u32, &'static str> {
        let mut t = TopicTrie::new();
        for (i, f) in filters.iter().enumerate() {
            t.insert(f, i as u32, *f);
        }
        t
    }

    #[test]
    fn node_layout_is_compact() {
        // Guards the memory budget documented in the crate docs.
        assert_eq!(std::mem::size_of::<Children<u64, ()>>(), 16);
        assert_eq!(std::mem::size_of::<SubList<u64, ()>>(), 16);
        assert_eq!(std::mem::size_of::<Subscribers<u64, ()>>(), 24);
        assert_eq!(std::mem::size_of::<Node<u64, ()>>(), 48);
    }

    #[test]
    fn exact_and_multilevel() {
        let t = trie_of(&["sport/tennis/player1/#"]);
        assert_eq!(
            matches(&t, "sport/tennis/player1"),
            ["sport/tennis/player1/#"]
        );
        assert_eq!(
            matches(&t, "sport/tennis/player1/ranking"),
            ["sport/tennis/player1/#"]
        );
        assert_eq!(
            matches(&t, "sport/tennis/player1/score/wimbledon"),
            ["sport/tennis/player1/#"]
        );
        assert!(matches(&t, "sport/tennis").is_empty());
    }

    #[test]
    fn hash_matches_parent_and_everything() {
        let t = trie_of(&["sport/#", "#"]);
        assert_eq!(matches(&t, "sport"), ["#", "sport/#"]);
        assert_eq!(matches(&t, "sport/"), ["#", "sport/#"]);
        assert_eq!(matches(&t, "other"), ["#"]);
        assert_eq!(matches(&t, "/"), ["#"]);
    }

    #[test]
    fn plus_matches_exactly_one_level() {
        let t = trie_of(&["sport/tennis/+", "sport/+", "+/+", "/+", "+"]);
        assert_eq!(matches(&t, "sport/tennis/player1"), ["sport/tennis/+"]);
        assert_eq!(matches(&t, "sport/tennis/player2"), ["sport/tennis/+"]);
        assert!(matches(&t, "sport/tennis/player1/ranking").is_empty());
        assert_eq!(matches(&t, "sport"), ["+"]);
        assert_eq!(matches(&t, "sport/"), ["+/+", "sport/+"]);
        assert_eq!(matches(&t, "/finance"), ["+/+", "/+"]);
    }

    #[test]
    fn plus_combined_with_hash() {
        let t = trie_of(&["+/tennis/#", "sport/+/player1"]);
        assert_eq!(matches(&t, "sport/tennis"), ["+/tennis/#"]);
        assert_eq!(matches(&t, "x/tennis/a/b"), ["+/tennis/#"]);
        assert_eq!(matches(&t, "sport/golf/player1"), ["sport/+/player1"]);
        assert!(matches(&t, "sport/golf/player2").is_empty());
    }

    #[test]
    fn empty_levels_are_distinct() {
        let t = trie_of(&["a//b", "a/b", "/a", "a/"]);
        assert_eq!(matches(&t, "a//b"), ["a//b"]);
        assert_eq!(matches(&t, "a/b"), ["a/b"]);
        assert_eq!(matches(&t, "/a"), ["/a"]);
        assert_eq!(matches(&t, "a/"), ["a/"]);
        assert!(matches(&t, "a").is_empty());
    }

    #[test]
    fn dollar_topics_hide_from_leading_wildcards() {
        let t = trie_of(&["#", "+/monitor/Clients", "$SYS/#", "$SYS/monitor/+", "+"]);
        assert_eq!(
            matches(&t, "$SYS/monitor/Clients"),
            ["$SYS/#", "$SYS/monitor/+"]
        );
        assert_eq!(matches(&t, "$SYS"), ["$SYS/#"]);
        assert_eq!(matches(&t, "x/monitor/Clients"), ["#", "+/monitor/Clients"]);
        // Only a leading '$' counts.
        assert_eq!(matches(&t, "a$"), ["#", "+"]);
    }

    #[test]
    fn shared_dollar_rule_applies_to_inner_filter() {
        let mut t: TopicTrie<u32, ()> = TopicTrie::new();
        t.insert_shared("g", "#", 1, ());
        t.insert_shared("g", "$SYS/#", 2, ());
        let mut seen = Vec::new();
        t.for_each_match("$SYS/x", |k, _| seen.push(*k));
        assert_eq!(seen, [2]);
    }

    #[test]
    fn insert_replace_remove_and_prune() {
        let mut t: TopicTrie<u32, u8> = TopicTrie::new();
        assert_eq!(t.insert("a/+/c", 1, 0), None);
        assert_eq!(t.insert("a/+/c", 1, 2), Some(0));
        assert_eq!(t.insert("a/b/#", 1, 1), None);
        assert_eq!(t.insert_shared("g", "a/b/#", 1, 7), None);
        assert_eq!(t.len(), 3);
        assert_eq!(t.get("a/+/c", &1), Some(&2));
        assert_eq!(t.get_shared("g", "a/b/#", &1), Some(&7));
        assert_eq!(t.remove("a/+/c", &2), None);
        assert_eq!(t.remove("x/y", &1), None);
        assert_eq!(t.remove("a/+/c", &1), Some(2));
        assert_eq!(t.remove("a/b/#", &1), Some(1));
        assert_eq!(t.remove_shared("g", "a/b/#", &1), Some(7));
        assert_eq!(t.remove_shared("g", "a/b/#", &1), None);
        assert!(t.is_empty());
        assert_eq!(t.node_count(), 1);
    }

    #[test]
    fn children_promote_and_demote() {
        let mut t: TopicTrie<u32, ()> = TopicTrie::new();
        for i in 0..100 {
            t.insert(&format!("x/{i}"), i, ());
        }
        for i in 0..100 {
            let mut n = 0;
            t.for_each_match(&format!("x/{i}"), |k, _| {
                assert_eq!(*k, i);
                n += 1;
            });
            assert_eq!(n, 1);
        }
        for i in 0..100 {
            assert_eq!(t.remove(&format!("x/{i}"), &i), Some(()));
        }
        assert_eq!(t.node_count(), 1);
    }

    #[test]
    fn many_subscribers_on_one_filter() {
        let mut t: TopicTrie<u32, u32> = TopicTrie::new();
        for i in 0..1000 {
            assert_eq!(t.insert("news/#", i, i), None);
        }
        assert_eq!(t.insert("news/#", 5, 50), Some(5));
        let mut n = 0;
        t.for_each_match("news/today", |_, _| n += 1);
        assert_eq!(n, 1000);
        for i in 0..1000 {
            assert!(t.remove("news/#", &i).is_some());
        }
        assert!(t.is_empty());
        assert_eq!(t.node_count(), 1);
    }

    #[test]
    fn invalid_filters_do_not_panic() {
        let mut t: TopicTrie<u32, ()> = TopicTrie::new();
        t.insert("a/#/b", 1, ());
        t.insert("", 2, ());
        t.insert("//", 3, ());
        let mut n = 0;
        t.for_each_match("a/x/b", |_, _| n += 1);
        assert_eq!(n, 0);
        assert_eq!(t.remove("a/#/b", &1), Some(()));
        assert_eq!(t.remove("", &2), Some(()));
        assert_eq!(t.remove("//", &3), Some(()));
        assert_eq!(t.node_count(), 1);
    }
}
