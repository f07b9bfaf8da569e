//! Heap bytes per subscription, measured with a counting global allocator,
//! and a check that matching does not allocate.
//!
//! One test function only: the counter is process-wide, so concurrent tests in
//! this binary would pollute it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

use topic_trie::{SubscriptionOptions, TopicTrie};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const N: u64 = 100_000;

fn bytes_per_sub(filters: &[String]) -> f64 {
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let mut trie: TopicTrie<u64, SubscriptionOptions> = TopicTrie::new();
    for (i, f) in filters.iter().enumerate() {
        trie.insert(f, i as u64, SubscriptionOptions::default());
    }
    let used = LIVE_BYTES.load(Ordering::Relaxed) - before;
    assert_eq!(trie.len(), filters.len());
    drop(trie);
    // ahash allocates its process-wide seed once and keeps it: allow that.
    let leaked = LIVE_BYTES.load(Ordering::Relaxed) - before;
    assert!(leaked.abs() < 256, "leaked {leaked} bytes");
    used as f64 / filters.len() as f64
}

#[test]
fn memory_per_subscription_and_no_alloc_matching() {
    let distinct3: Vec<String> = (0..N).map(|i| format!("dev/{i}/temp")).collect();
    let distinct_leaf: Vec<String> = (0..N).map(|i| format!("dev/+/{i}")).collect();
    let mix: Vec<String> = (0..N)
        .map(|i| match i % 3 {
            0 => format!("dev/{i}/temp"),
            1 => format!("dev/+/{i}"),
            _ => format!("site/{}/#", i % 100),
        })
        .collect();
    let same: Vec<String> = (0..N).map(|_| "news/#".to_string()).collect();

    let a = bytes_per_sub(&distinct3);
    let b = bytes_per_sub(&distinct_leaf);
    let c = bytes_per_sub(&mix);
    let d = bytes_per_sub(&same);
    println!("bytes/subscription: dev/{{i}}/temp {a:.1}, dev/+/{{i}} {b:.1}, mix {c:.1}, news/# x N {d:.1}");
    // Budgets (measured: ~182, ~114, ~140, ~33); fail loudly if a layout
    // change regresses them.
    assert!(a < 200.0, "{a}");
    assert!(b < 140.0, "{b}");
    assert!(c < 160.0, "{c}");
    assert!(d < 48.0, "{d}");

    // Matching must not allocate, whatever it visits.
    let mut trie: TopicTrie<u64, SubscriptionOptions> = TopicTrie::new();
    for (i, f) in mix.iter().enumerate() {
        trie.insert(f, i as u64, SubscriptionOptions::default());
    }
    trie.insert_shared("g", "dev/+/temp", 1, SubscriptionOptions::default());
    trie.insert_shared("g", "dev/+/temp", 2, SubscriptionOptions::default());
    let topics = [
        "dev/3/temp",
        "dev/4/4",
        "site/42/a/b/c",
        "site/42",
        "nothing/here",
        "$SYS/x",
    ];
    let allocs_before = ALLOCS.load(Ordering::Relaxed);
    let mut hits = 0usize;
    for t in topics {
        trie.for_each_match(t, |_, _| hits += 1);
    }
    assert_eq!(
        ALLOCS.load(Ordering::Relaxed),
        allocs_before,
        "matching allocated"
    );
    // dev/3/temp: literal + shared; dev/4/4: dev/+/4; site/42/..: 333 or 334 each x2.
    assert!(hits > 600, "{hits}");
}
