//! Shared subscription round-robin fairness.

use std::collections::HashMap;

use topic_trie::{parse_subscription_filter, SubscriptionFilter, SubscriptionOptions, TopicTrie};

fn picks(trie: &TopicTrie<u32, SubscriptionOptions>, topic: &str, n: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut this = Vec::new();
        trie.for_each_match(topic, |k, _| this.push(*k));
        assert_eq!(this.len(), 1, "a group delivers exactly one copy");
        out.extend(this);
    }
    out
}

#[test]
fn members_are_picked_in_turn() {
    let mut trie = TopicTrie::new();
    let SubscriptionFilter::Shared { group, filter } =
        parse_subscription_filter("$share/workers/jobs/+").unwrap()
    else {
        panic!("expected shared")
    };
    for k in 0..5 {
        trie.insert_shared(group, filter, k, SubscriptionOptions::default());
    }
    // Re-subscribing replaces the options but does not change the rotation.
    let opts = SubscriptionOptions {
        qos: 1,
        ..Default::default()
    };
    assert!(trie.insert_shared(group, filter, 2, opts).is_some());
    assert_eq!(trie.len(), 5);

    let seq = picks(&trie, "jobs/build", 1000);
    // Strict rotation: every window of 5 consecutive picks is a permutation.
    for w in seq.windows(5) {
        let mut w = w.to_vec();
        w.sort_unstable();
        assert_eq!(w, [0, 1, 2, 3, 4]);
    }
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for k in seq {
        *counts.entry(k).or_default() += 1;
    }
    assert!(counts.values().all(|&c| c == 200), "{counts:?}");
}

#[test]
fn each_group_gets_one_copy_and_plain_subscribers_all_get_theirs() {
    let mut trie = TopicTrie::new();
    let o = SubscriptionOptions::default();
    trie.insert_shared("a", "t/#", 1, o);
    trie.insert_shared("a", "t/#", 2, o);
    trie.insert_shared("b", "t/#", 3, o);
    trie.insert_shared("a", "t/x", 4, o); // a different group identity: (a, t/x)
    trie.insert("t/x", 5, o);
    trie.insert("t/+", 6, o);
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for _ in 0..100 {
        let mut got = Vec::new();
        trie.for_each_match("t/x", |k, _| got.push(*k));
        // (a,t/#) + (b,t/#) + (a,t/x) + two plain = 5 deliveries.
        assert_eq!(got.len(), 5, "{got:?}");
        for k in got {
            *counts.entry(k).or_default() += 1;
        }
    }
    assert_eq!(counts[&1], 50);
    assert_eq!(counts[&2], 50);
    assert_eq!(counts[&3], 100);
    assert_eq!(counts[&4], 100);
    assert_eq!(counts[&5], 100);
    assert_eq!(counts[&6], 100);
}

#[test]
fn fairness_after_leave_and_join() {
    let mut trie = TopicTrie::new();
    let o = SubscriptionOptions::default();
    for k in 0..4 {
        trie.insert_shared("g", "s", k, o);
    }
    let _ = picks(&trie, "s", 3); // 0, 1, 2 served; 3 is next
    assert!(trie.remove_shared("g", "s", &1).is_some());
    assert_eq!(picks(&trie, "s", 3), [3, 0, 2]);
    trie.insert_shared("g", "s", 9, o);
    assert_eq!(picks(&trie, "s", 4), [3, 9, 0, 2]);
    for k in [0, 2, 3, 9] {
        assert!(trie.remove_shared("g", "s", &k).is_some());
    }
    assert!(trie.is_empty());
    let mut n = 0;
    trie.for_each_match("s", |_, _| n += 1);
    assert_eq!(n, 0);
}

#[test]
fn concurrent_matching_shares_the_rotation() {
    // The cursor is atomic: &TopicTrie can be matched from several threads and
    // the picks still divide evenly.
    let mut trie = TopicTrie::new();
    for k in 0..4u32 {
        trie.insert_shared("g", "c", k, SubscriptionOptions::default());
    }
    let counts: Vec<[usize; 4]> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut c = [0usize; 4];
                    for _ in 0..10_000 {
                        trie.for_each_match("c", |k, _| c[*k as usize] += 1);
                    }
                    c
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total: Vec<usize> = (0..4).map(|k| counts[0][k] + counts[1][k]).collect();
    assert_eq!(total, [5_000; 4]);
}
