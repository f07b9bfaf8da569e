//! Property tests: the trie against the naive matcher and a HashMap model.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use topic_trie::{filter_matches, validate_filter, validate_topic_name, TopicTrie};

const TOPIC_LEVELS: &[&str] = &["a", "b", "$x", ""];
const FILTER_LEVELS: &[&str] = &["a", "b", "$x", "", "+"];

fn topic() -> impl Strategy<Value = String> {
    // A single empty level would be the empty (invalid) topic name.
    prop::collection::vec(prop::sample::select(TOPIC_LEVELS), 1..5)
        .prop_map(|l| l.join("/"))
        .prop_filter("empty topic", |t| !t.is_empty())
}

/// Random valid filters: levels from the alphabet, `#` only as the last level.
fn filter() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(prop::sample::select(FILTER_LEVELS), 0..5),
        any::<bool>(),
    )
        .prop_filter_map("empty filter", |(mut levels, hash)| {
            if hash {
                levels.push("#");
            }
            let f = levels.join("/");
            if f.is_empty() {
                None
            } else {
                Some(f)
            }
        })
}

fn group() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![3 => Just(None), 1 => Just(Some("g1")), 1 => Just(Some("g2"))]
}

#[derive(Debug, Clone)]
enum Op {
    Insert(Option<&'static str>, String, u8, u32),
    Remove(Option<&'static str>, String, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (group(), filter(), 0u8..6, any::<u32>()).prop_map(|(g, f, k, v)| Op::Insert(g, f, k, v)),
        1 => (group(), filter(), 0u8..6).prop_map(|(g, f, k)| Op::Remove(g, f, k)),
    ]
}

type Model = HashMap<(Option<&'static str>, String, u8), u32>;

/// Checks one topic: plain subscriptions exactly as the oracle says, and each
/// matching (group, filter) exactly once with one of its members.
fn check_topic(trie: &TopicTrie<u8, (Option<&'static str>, String, u32)>, model: &Model, t: &str) {
    let mut got_plain: Vec<(String, u8, u32)> = Vec::new();
    let mut got_shared: BTreeMap<(&'static str, String), Vec<u8>> = BTreeMap::new();
    trie.for_each_match(t, |k, (g, f, v)| match g {
        None => got_plain.push((f.clone(), *k, *v)),
        Some(g) => got_shared.entry((g, f.clone())).or_default().push(*k),
    });
    got_plain.sort();

    let mut want_plain: Vec<(String, u8, u32)> = Vec::new();
    let mut want_shared: BTreeMap<(&'static str, String), Vec<u8>> = BTreeMap::new();
    for ((g, f, k), v) in model {
        if !filter_matches(f, t) {
            continue;
        }
        match g {
            None => want_plain.push((f.clone(), *k, *v)),
            Some(g) => want_shared.entry((*g, f.clone())).or_default().push(*k),
        }
    }
    want_plain.sort();
    assert_eq!(got_plain, want_plain, "topic {t:?}");
    assert_eq!(
        got_shared.keys().collect::<Vec<_>>(),
        want_shared.keys().collect::<Vec<_>>(),
        "topic {t:?}"
    );
    for (gk, picked) in &got_shared {
        assert_eq!(picked.len(), 1, "group {gk:?} visited more than once");
        assert!(
            want_shared[gk].contains(&picked[0]),
            "{gk:?} picked a non-member"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn generated_inputs_are_valid(f in filter(), t in topic()) {
        prop_assert_eq!(validate_filter(&f), Ok(()));
        prop_assert_eq!(validate_topic_name(&t), Ok(()));
    }

    #[test]
    fn trie_matches_like_naive_matcher(
        subs in prop::collection::vec((filter(), 0u8..4, group()), 0..60),
        topics in prop::collection::vec(topic(), 1..20),
    ) {
        let mut trie = TopicTrie::new();
        let mut model = Model::new();
        for (i, (f, k, g)) in subs.into_iter().enumerate() {
            let v = i as u32;
            match g {
                None => trie.insert(&f, k, (g, f.clone(), v)),
                Some(g) => trie.insert_shared(g, &f, k, (Some(g), f.clone(), v)),
            };
            model.insert((g, f, k), v);
        }
        prop_assert_eq!(trie.len(), model.len());
        for t in &topics {
            check_topic(&trie, &model, t);
        }
    }

    #[test]
    fn insert_remove_sequences_match_model(
        ops in prop::collection::vec(op(), 1..120),
        topics in prop::collection::vec(topic(), 1..10),
    ) {
        let mut trie = TopicTrie::new();
        let mut model = Model::new();
        for op in ops {
            match op {
                Op::Insert(g, f, k, v) => {
                    let val = (g, f.clone(), v);
                    let old = match g {
                        None => trie.insert(&f, k, val),
                        Some(g) => trie.insert_shared(g, &f, k, val),
                    };
                    let want = model.insert((g, f, k), v);
                    prop_assert_eq!(old.map(|o| o.2), want);
                }
                Op::Remove(g, f, k) => {
                    let old = match g {
                        None => trie.remove(&f, &k),
                        Some(g) => trie.remove_shared(g, &f, &k),
                    };
                    let want = model.remove(&(g, f, k));
                    prop_assert_eq!(old.map(|o| o.2), want);
                }
            }
            prop_assert_eq!(trie.len(), model.len());
        }
        for ((g, f, k), v) in &model {
            let got = match g {
                None => trie.get(f, k),
                Some(g) => trie.get_shared(g, f, k),
            };
            prop_assert_eq!(got.map(|o| o.2), Some(*v));
        }
        for t in &topics {
            check_topic(&trie, &model, t);
        }
        // Removing everything must prune the trie back to the bare root.
        for (g, f, k) in model.keys() {
            let removed = match g {
                None => trie.remove(f, k),
                Some(g) => trie.remove_shared(g, f, k),
            };
            prop_assert!(removed.is_some());
        }
        prop_assert!(trie.is_empty());
        prop_assert_eq!(trie.node_count(), 1);
    }
}
