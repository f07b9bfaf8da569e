//! `cluster.backend = "redis"` on a Redis Cluster (`redis.url` a list of seed URLs): two
//! mqttd hosts behave to clients as one broker while the cluster's masters are restarted
//! or replaced by their replicas. Each test starts its own cluster of real `redis-server`s
//! on free ports (`common::redis::RedisClusterServers`).
//!
//! Messages that must not be lost are counted by sequence number: every acknowledged one
//! arrives, and a second copy only as a DUP redelivery.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::clients::{payload_str, v4, v5};
use common::redis::RedisClusterServers;
use common::{prom, Broker};

/// How long the expected deliveries may take, at most, once publishing is done.
const STEP: Duration = Duration::from_secs(20);

/// The host ids, fixed so that the test knows its workers' keys in Redis: with the slots
/// `redis-cli --cluster create` gives three masters, host A's keys are on one master, host
/// B's on another, and the change log on the third.
const HOST_A: u32 = 11;
const HOST_B: u32 = 7;

/// A host: two workers on their own port, on `redis`, with a short liveness so that a
/// dead host would be noticed within the test.
fn host(redis: &RedisClusterServers, id: u32) -> Broker {
    let mut sets = redis.broker_sets();
    sets.push("redis.heartbeat_ms=200".into());
    sets.push("redis.liveness_ttl_ms=1000".into());
    sets.push(format!("redis.host_id={id}"));
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    Broker::start_workers(2, &sets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qos_and_retained_cross_hosts_on_a_redis_cluster() {
    let redis = RedisClusterServers::start();
    let a = host(&redis, HOST_A);
    let b = host(&redis, HOST_B);
    let mut sub = v5::connect(v5::opts(&b, "c-sub")).await;
    sub.subscribe("t/+/x", v5::QoS::ExactlyOnce).await;
    let mut publisher = v5::connect(v5::opts(&a, "c-pub")).await;
    for (i, qos) in [
        v5::QoS::AtMostOnce,
        v5::QoS::AtLeastOnce,
        v5::QoS::ExactlyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        publisher
            .publish(&format!("t/{i}/x"), qos, false, format!("m{i}"))
            .await;
        let got = sub.next_publish().await;
        assert_eq!(payload_str(&got.topic), format!("t/{i}/x"));
        assert_eq!(payload_str(&got.payload), format!("m{i}"));
        assert_eq!(got.qos, qos);
    }
    // Not matched by the filter: not delivered.
    publisher
        .publish("t/1/y", v5::QoS::AtLeastOnce, false, "no")
        .await;

    // Acknowledged once it is in Redis; a later subscriber on the other host has it.
    publisher
        .publish("r/1", v5::QoS::AtLeastOnce, true, "kept")
        .await;
    let mut late = v5::connect(v5::opts(&b, "c-late")).await;
    late.subscribe("r/#", v5::QoS::AtLeastOnce).await;
    let got = late.next_publish().await;
    assert_eq!(payload_str(&got.topic), "r/1");
    assert_eq!(payload_str(&got.payload), "kept");
    assert!(got.retain, "delivered as retained");

    // The non-matching message never came (anything after it on the same path did).
    publisher
        .publish("t/9/x", v5::QoS::AtLeastOnce, false, "last")
        .await;
    let got = sub.next_publish().await;
    assert_eq!(payload_str(&got.payload), "last");

    // The workers of both hosts are registered, and see Redis up.
    assert_eq!(registered(&redis), 4);
    for broker in [&a, &b] {
        let e = prom::scrape(broker);
        assert_eq!(
            e.sum("mqttd_redis_up", &[]),
            2.0,
            "both workers see redis up"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_for_a_persistent_subscriber_survives_master_restarts() {
    let mut redis = RedisClusterServers::start();
    survives(&mut redis, |redis, key| {
        let port = redis.master_of(key);
        eprintln!("restarting the master :{port} (serves {key})");
        redis.restart(port);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_for_a_persistent_subscriber_survives_failovers() {
    let mut redis = RedisClusterServers::start_with_replicas();
    survives(&mut redis, |redis, key| {
        let port = redis.master_of(key);
        let new = redis.failover(port);
        eprintln!("failed over the master :{port} (serves {key}) to :{new}");
    })
    .await;
}

/// N QoS 1 messages from host A to a persistent QoS 1 subscriber on host B; `disrupt` is
/// called three times during the run, each time with a key of a master not disrupted yet
/// (if there is one): the subscriber's inbox's first, then the change log's.
async fn survives(
    redis: &mut RedisClusterServers,
    disrupt: impl Fn(&mut RedisClusterServers, &str),
) {
    let a = host(redis, HOST_A);
    let b = host(redis, HOST_B);
    let mut sub = v4::connect(v4::persistent(&b, "d-sub")).await;
    sub.subscribe("seq", v4::QoS::AtLeastOnce).await;
    let mut publisher = v4::connect(v4::opts(&a, "d-pub")).await;
    const N: usize = 300;
    let mut got = BTreeSet::new();
    let mut disrupted: Vec<String> = Vec::new();
    for i in 0..N {
        if i > 0 && i % (N / 4) == 0 {
            // Messages crossing, the master that has the subscriber's inbox goes first,
            // then the one with the change log every worker follows, then another.
            let mut keys = vec![busiest_inbox(redis, HOST_B), "mqttd:log".to_string()];
            keys.extend((0..2).map(|slot| format!("mqttd:{{{HOST_A}.{slot}}}:in")));
            keys.push("mqttd:nodes".into());
            let used: Vec<u16> = disrupted.iter().map(|k| redis.master_of(k)).collect();
            let key = keys
                .iter()
                .find(|k| !used.contains(&redis.master_of(k)))
                .unwrap_or(&keys[0])
                .clone();
            disrupt(redis, &key);
            disrupted.push(key);
        }
        // Returns once PUBACKed: the message is in Redis.
        publisher
            .publish("seq", v4::QoS::AtLeastOnce, false, i.to_string())
            .await;
        while let Some(p) = sub.next_publish_within(Duration::from_millis(1)).await {
            take(p, &mut got);
        }
    }
    let deadline = Instant::now() + STEP;
    while got.len() < N && Instant::now() < deadline {
        if let Some(p) = sub.next_publish_within(Duration::from_millis(100)).await {
            take(p, &mut got);
        }
    }
    let lost: Vec<usize> = (0..N).filter(|n| !got.contains(n)).collect();
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");

    // Both hosts are still whole: no worker was taken for dead.
    assert_eq!(registered(redis), 4, "every worker still registered");
    for broker in [&a, &b] {
        // An error may surface after the last disruption: Redis is seen up again after it.
        let reconnects = prom::scrape_until(broker, "both workers to see redis up", |e| {
            (e.sum("mqttd_redis_up", &[]) == 2.0)
                .then(|| e.sum("mqttd_redis_reconnects_total", &[]))
        });
        eprintln!("host :{}: redis reconnects {reconnects}", broker.port());
    }
}

/// Counts a received sequence number; a repeat must be a redelivery.
fn take(p: v4::Publish, got: &mut BTreeSet<usize>) {
    let n: usize = payload_str(&p.payload).parse().unwrap();
    assert!(got.insert(n) || p.dup, "duplicate of {n} without DUP");
}

/// Workers registered in `mqttd:nodes`.
fn registered(redis: &RedisClusterServers) -> usize {
    let port = redis.master_of("mqttd:nodes");
    redis
        .cli(port, &["SCARD", "mqttd:nodes"])
        .and_then(|s| s.parse().ok())
        .expect("SCARD mqttd:nodes")
}

/// The inbox of `host`'s worker that the most batches were written to.
fn busiest_inbox(redis: &RedisClusterServers, host: u32) -> String {
    (0..2)
        .map(|slot| format!("mqttd:{{{host}.{slot}}}:in"))
        .max_by_key(|key| {
            let port = redis.master_of(key);
            let info = redis
                .cli(port, &["XINFO", "STREAM", key])
                .unwrap_or_default();
            let mut lines = info.lines();
            std::iter::from_fn(|| lines.next())
                .collect::<Vec<_>>()
                .windows(2)
                .find(|w| w[0] == "entries-added")
                .and_then(|w| w[1].parse::<u64>().ok())
                .unwrap_or(0)
        })
        .expect("two workers")
}
