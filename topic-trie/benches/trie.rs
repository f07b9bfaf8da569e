//! Criterion benches: matching against 100k filters, and subscribe/unsubscribe
//! churn.
//!
//! `cargo bench -p topic-trie -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use topic_trie::{SubscriptionOptions, TopicTrie};

const FILTERS: usize = 100_000;
const CHURN: usize = 10_000;

/// The 100k-filter mix: a third literal, a third with `+`, a third with `#`
/// (only 100 distinct `site/*/#` filters, each with ~333 subscribers).
fn filter(i: usize) -> String {
    match i % 3 {
        0 => format!("dev/{i}/temp"),
        1 => format!("dev/+/{i}"),
        _ => format!("site/{}/#", i % 100),
    }
}

fn build(n: usize) -> TopicTrie<u64, SubscriptionOptions> {
    let mut t = TopicTrie::new();
    for i in 0..n {
        t.insert(&filter(i), i as u64, SubscriptionOptions::default());
    }
    t
}

fn bench_match(c: &mut Criterion) {
    let trie = build(FILTERS);
    let mut g = c.benchmark_group("match_100k_filters");
    g.throughput(Throughput::Elements(1));
    // Hits `dev/3/temp` only (the `dev/+/{i}` leaf `temp` does not exist).
    g.bench_function("literal_hit_1", |b| {
        b.iter(|| {
            let mut n = 0u32;
            trie.for_each_match(black_box("dev/3/temp"), |_, _| n += 1);
            black_box(n)
        })
    });
    // Hits `dev/+/4` via the `+` slot.
    g.bench_function("plus_hit_1", |b| {
        b.iter(|| {
            let mut n = 0u32;
            trie.for_each_match(black_box("dev/x/4"), |_, _| n += 1);
            black_box(n)
        })
    });
    // Hits `site/42/#`: ~333 subscribers visited.
    g.bench_function("hash_hit_333", |b| {
        b.iter(|| {
            let mut n = 0u32;
            trie.for_each_match(black_box("site/42/floor/3/temp"), |_, _| n += 1);
            black_box(n)
        })
    });
    g.bench_function("miss", |b| {
        b.iter(|| {
            let mut n = 0u32;
            trie.for_each_match(black_box("nothing/here/at/all"), |_, _| n += 1);
            black_box(n)
        })
    });
    g.finish();
}

fn bench_churn(c: &mut Criterion) {
    let filters: Vec<String> = (0..CHURN).map(filter).collect();
    let mut g = c.benchmark_group("churn");
    // One element = one insert or one remove.
    g.throughput(Throughput::Elements(2 * CHURN as u64));
    g.bench_function("insert_remove_10k_into_100k", |b| {
        b.iter_batched_ref(
            || build(FILTERS),
            |trie| {
                for (i, f) in filters.iter().enumerate() {
                    // Fresh keys, so every insert adds a subscription.
                    trie.insert(f, (FILTERS + i) as u64, SubscriptionOptions::default());
                }
                for (i, f) in filters.iter().enumerate() {
                    black_box(trie.remove(f, &((FILTERS + i) as u64)));
                }
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("insert_remove_10k_empty", |b| {
        let mut trie = TopicTrie::new();
        b.iter(|| {
            for (i, f) in filters.iter().enumerate() {
                trie.insert(f, i as u64, SubscriptionOptions::default());
            }
            for (i, f) in filters.iter().enumerate() {
                black_box(trie.remove(f, &(i as u64)));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench_match, bench_churn);
criterion_main!(benches);
