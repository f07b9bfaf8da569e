//! `cluster.backend = "redis"`: several mqttd hosts on one real `redis-server` behave to
//! clients as one broker. Each "host" is a supervisor with two workers on its own port
//! (and so its own host id); each test starts its own Redis on a free port.
//!
//! Messages that must not be lost are counted by sequence number: every acknowledged one
//! arrives, and a second copy only as a DUP redelivery.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::clients::{payload_str, v4, v5};
use common::procs::{wait_until_gone, worker_pids};
use common::redis::RedisServer;
use common::{prom, Broker};

/// How long one expected delivery may take before the test fails.
const STEP: Duration = Duration::from_secs(20);

/// A host: two workers on their own port, on `redis`, with a short liveness so that a
/// dead host is noticed within the test.
fn host(redis: &RedisServer, extra: &[&str]) -> Broker {
    let mut sets = redis.broker_sets();
    sets.push("redis.heartbeat_ms=200".into());
    sets.push("redis.liveness_ttl_ms=1000".into());
    sets.extend(extra.iter().map(|s| s.to_string()));
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    Broker::start_workers(2, &sets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qos_crosses_hosts_with_wildcards_and_properties() {
    let redis = RedisServer::start();
    let a = host(&redis, &[]);
    let b = host(&redis, &[]);
    let mut sub = v5::connect(v5::opts(&b, "x-sub")).await;
    sub.subscribe("t/+/x", v5::QoS::ExactlyOnce).await;
    sub.subscribe("u/#", v5::QoS::AtLeastOnce).await;
    let mut publisher = v5::connect(v5::opts(&a, "x-pub")).await;
    let props = v5::PublishProperties {
        content_type: Some("text/plain".into()),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(Bytes::from_static(b"corr-1")),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    for (i, qos) in [
        v5::QoS::AtMostOnce,
        v5::QoS::AtLeastOnce,
        v5::QoS::ExactlyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        publisher
            .publish_props(
                &format!("t/{i}/x"),
                qos,
                false,
                format!("m{i}"),
                Some(props.clone()),
            )
            .await;
        let got = sub.next_publish().await;
        assert_eq!(payload_str(&got.topic), format!("t/{i}/x"));
        assert_eq!(payload_str(&got.payload), format!("m{i}"));
        assert_eq!(got.qos, qos);
        let p = got.properties.expect("properties crossed the hosts");
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
        assert_eq!(p.response_topic.as_deref(), Some("reply/here"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"corr-1"[..]));
        assert_eq!(p.user_properties, vec![("k".to_string(), "v".to_string())]);
    }
    // A filter that matches nothing published is not delivered to; "u/#" matches "u".
    publisher
        .publish("u", v5::QoS::AtLeastOnce, false, "parent")
        .await;
    let got = sub.next_publish().await;
    assert_eq!(payload_str(&got.topic), "u");

    // The Redis link is up and counted on both hosts.
    for broker in [&a, &b] {
        let e = prom::scrape(broker);
        assert_eq!(
            e.sum("mqttd_redis_up", &[]),
            2.0,
            "both workers see redis up"
        );
        assert!(e.sum("mqttd_redis_round_trips_total", &[]) > 0.0);
    }
    let e = prom::scrape(&a);
    assert!(e.sum("mqttd_redis_messages_total", &[("direction", "out")]) >= 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_and_shared_subscriptions_span_hosts() {
    let redis = RedisServer::start();
    let a = host(&redis, &[]);
    let b = host(&redis, &[]);
    let mut publisher = v5::connect(v5::opts(&a, "r-pub")).await;
    // Acknowledged once every worker of both hosts stored it.
    publisher
        .publish("r/1", v5::QoS::AtLeastOnce, true, "kept")
        .await;
    let mut late = v5::connect(v5::opts(&b, "r-late")).await;
    late.subscribe("r/#", v5::QoS::AtLeastOnce).await;
    let got = late.next_publish().await;
    assert_eq!(payload_str(&got.payload), "kept");
    assert!(got.retain, "delivered as retained");

    // A shared group with a member on each host: each message goes to exactly one.
    let mut on_a = v5::connect(v5::opts(&a, "g-a")).await;
    on_a.subscribe("$share/g/s/#", v5::QoS::AtLeastOnce).await;
    let mut on_b = v5::connect(v5::opts(&b, "g-b")).await;
    on_b.subscribe("$share/g/s/#", v5::QoS::AtLeastOnce).await;
    const N: usize = 40;
    for i in 0..N {
        publisher
            .publish("s/k", v5::QoS::AtLeastOnce, false, i.to_string())
            .await;
    }
    let (mut seen_a, mut seen_b) = (BTreeSet::new(), BTreeSet::new());
    let deadline = Instant::now() + STEP;
    while seen_a.len() + seen_b.len() < N && Instant::now() < deadline {
        if let Some(p) = on_a.next_publish_within(Duration::from_millis(50)).await {
            assert!(seen_a.insert(payload_str(&p.payload)), "duplicate on a");
        }
        if let Some(p) = on_b.next_publish_within(Duration::from_millis(50)).await {
            assert!(seen_b.insert(payload_str(&p.payload)), "duplicate on b");
        }
    }
    assert_eq!(seen_a.len() + seen_b.len(), N, "a {seen_a:?} b {seen_b:?}");
    assert!(
        seen_a.is_disjoint(&seen_b),
        "a message went to both members"
    );
    assert!(
        !seen_a.is_empty() && !seen_b.is_empty(),
        "spread over both hosts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_for_a_persistent_subscriber_survives_a_redis_restart() {
    let mut redis = RedisServer::start_durable();
    let a = host(&redis, &[]);
    let b = host(&redis, &[]);
    let mut sub = v4::connect(v4::persistent(&b, "d-sub")).await;
    sub.subscribe("seq", v4::QoS::AtLeastOnce).await;
    let mut publisher = v4::connect(v4::opts(&a, "d-pub")).await;
    const N: usize = 300;
    let mut got = BTreeSet::new();
    for i in 0..N {
        if i == N / 3 {
            // Messages in flight between the hosts, Redis killed and back: the inboxes are
            // in its append-only file, the writers send what they had again.
            redis.restart();
        }
        // Returns once PUBACKed: the message is in Redis.
        publisher
            .publish("seq", v4::QoS::AtLeastOnce, false, i.to_string())
            .await;
        while let Some(p) = sub.next_publish_within(Duration::from_millis(1)).await {
            let n: usize = payload_str(&p.payload).parse().unwrap();
            assert!(got.insert(n) || p.dup, "duplicate of {n} without DUP");
        }
    }
    let deadline = Instant::now() + STEP;
    while got.len() < N && Instant::now() < deadline {
        if let Some(p) = sub.next_publish_within(Duration::from_millis(100)).await {
            let n: usize = payload_str(&p.payload).parse().unwrap();
            assert!(got.insert(n) || p.dup, "duplicate of {n} without DUP");
        }
    }
    let lost: Vec<usize> = (0..N).filter(|n| !got.contains(n)).collect();
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    let e = prom::scrape(&a);
    assert!(
        e.sum("mqttd_redis_reconnects_total", &[]) >= 1.0,
        "the outage was seen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_hosts_workers_are_removed_by_a_survivor() {
    let redis = RedisServer::start();
    let a = host(&redis, &[]);
    let mut b = host(&redis, &[]);
    let mut sub = v5::connect(v5::opts(&b, "dead-sub")).await;
    sub.subscribe("dead/x", v5::QoS::AtLeastOnce).await;
    let members = || redis.cli(&["SCARD", "mqttd:nodes"]).unwrap_or_default();
    assert_eq!(members(), "4");
    let routes_on_a = prom::scrape(&a).sum("mqttd_routes", &[]);
    assert!(routes_on_a >= 2.0, "both workers of a know b's route");
    // The whole host dies at once: no drain, no goodbye.
    b.signal("KILL");
    b.wait_exit();
    drop(sub);
    let deadline = Instant::now() + STEP;
    while members() != "2" {
        assert!(Instant::now() < deadline, "b's workers still registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    prom::scrape_until(&a, "b's routes gone from a", |e| {
        (e.sum("mqttd_routes", &[]) == routes_on_a - 2.0).then_some(())
    });
}

#[test]
fn refuses_to_start_when_redis_is_unreachable() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args(["--bind", "127.0.0.1:0", "--set", "metrics.enabled=false"])
        .args(["--set", "cluster.backend=\"redis\""])
        .args(["--set", &format!("redis.url=\"{url}\"")])
        .args(["--set", "redis.connect_timeout_secs=1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run mqttd");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&url), "names the URL: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(15), "bounded wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_moves_between_hosts_with_its_session() {
    let redis = RedisServer::start();
    let a = host(&redis, &[]);
    let b = host(&redis, &[]);
    // A persistent session on a, with messages queued while it is offline.
    let mut first = v5::connect(v5::persistent(&a, "mover", 300)).await;
    first.subscribe("mv/#", v5::QoS::AtLeastOnce).await;
    first.disconnect().await;
    let mut publisher = v5::connect(v5::opts(&a, "mv-pub")).await;
    for i in 0..5 {
        publisher
            .publish("mv/q", v5::QoS::AtLeastOnce, false, i.to_string())
            .await;
    }
    // Online on a again, then the same id connects through b: a's connection is taken
    // over (0x8E) and the session, with what was queued, continues on b.
    let mut on_a = v5::connect(v5::persistent(&a, "mover", 300)).await;
    let mut got = BTreeSet::new();
    while got.len() < 5 {
        let p = on_a.next_publish().await;
        got.insert(payload_str(&p.payload));
    }
    let mut on_b = v5::connect(v5::persistent(&b, "mover", 300)).await;
    assert!(on_b.connack.session_present, "the session came from a");
    let closed = on_a.events.expect_closed().await;
    assert!(
        format!("{closed:?}").contains("SessionTakenOver"),
        "a's connection ended with 0x8E: {closed:?}"
    );
    // The subscription came along: a message published on a reaches the client on b.
    publisher
        .publish("mv/after", v5::QoS::AtLeastOnce, false, "after")
        .await;
    let p = on_b.next_publish().await;
    assert_eq!(payload_str(&p.payload), "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_connects_with_one_id_on_two_hosts_leave_one_owner() {
    let redis = RedisServer::start();
    let a = host(&redis, &[]);
    let b = host(&redis, &[]);
    const N: usize = 20;
    let mut tries = Vec::new();
    for i in 0..N {
        let broker = if i % 2 == 0 { &a } else { &b };
        let o = v4::persistent(broker, "contested");
        tries.push(tokio::spawn(async move { v4::try_connect(o).await.ok() }));
    }
    let mut conns = Vec::new();
    for t in tries {
        if let Some(conn) = t.await.unwrap() {
            conns.push(conn);
        }
    }
    assert!(!conns.is_empty(), "some connects succeeded");
    // Every connection but the last owner's is closed by the broker, on either host.
    let deadline = Instant::now() + STEP;
    let open = loop {
        let mut open = 0;
        for c in conns.iter_mut() {
            if !c.events.closed_within(Duration::from_millis(10)).await {
                open += 1;
            }
        }
        if open <= 1 || Instant::now() >= deadline {
            break open;
        }
    };
    assert_eq!(open, 1, "exactly one connection keeps the client id");
    let owner = redis
        .cli(&["HGET", "mqttd:owner:{contested}", "owner"])
        .unwrap_or_default();
    assert!(!owner.is_empty(), "the registry names one owner");
    assert_eq!(
        redis.cli(&["HGET", "mqttd:owner:{contested}", "epoch"]),
        Some(N.to_string()),
        "every connect claimed the id once"
    );
}

/// Kills a host at once, workers and supervisor: nothing gets to drain or hand anything
/// over (the workers are stopped first, so the supervisor's death, which asks them to
/// drain, reaches processes that cannot run).
fn kill_host(host: &mut Broker) {
    let workers = worker_pids(host.pid());
    for (_, pid) in &workers {
        Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap();
    }
    host.signal("KILL");
    host.wait_exit();
    for (_, pid) in &workers {
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    }
}

/// Publishes `n` QoS 1 messages numbered from 0 on `topic`; each is PUBACKed, so stored.
async fn publish_numbered(broker: &Broker, id: &str, topic: &str, n: usize) {
    let mut publisher = v4::connect(v4::opts(broker, id)).await;
    for i in 0..n {
        publisher
            .publish(topic, v4::QoS::AtLeastOnce, false, i.to_string())
            .await;
    }
    publisher.disconnect().await;
}

/// Reconnects `id` (persistent) to `broker` and checks that its session is there with
/// every one of the `n` numbered messages (a repeat only with DUP).
async fn expect_session_with(broker: &Broker, id: &str, n: usize) {
    // As a real client does: a connection that ends while a worker is replaced is tried
    // again.
    let deadline = Instant::now() + STEP;
    let mut sub = loop {
        match v4::try_connect(v4::persistent(broker, id)).await {
            Ok(conn) => break conn,
            Err(e) => assert!(Instant::now() < deadline, "{id}: cannot connect: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(sub.connack.session_present, "{id}: session restored");
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + STEP;
    while got.len() < n && Instant::now() < deadline {
        if let Some(p) = sub.next_publish_within(Duration::from_millis(200)).await {
            let k: usize = payload_str(&p.payload).parse().unwrap();
            assert!(got.insert(k) || p.dup, "duplicate of {k} without DUP");
        }
    }
    let lost: Vec<usize> = (0..n).filter(|k| !got.contains(k)).collect();
    assert!(lost.is_empty(), "{id}: acknowledged and lost: {lost:?}");
    sub.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_survives_kill_9_of_its_worker() {
    let redis = RedisServer::start();
    let a = host(&redis, &[]);
    let mut sub = v4::connect(v4::persistent(&a, "dur-worker")).await;
    sub.subscribe("dur/w", v4::QoS::AtLeastOnce).await;
    sub.disconnect().await;
    publish_numbered(&a, "dur-w-pub", "dur/w", 50).await;
    // Its worker dies with the session and its queue in memory; the supervisor starts a
    // new process for the slot, which has nothing of it but what Redis kept.
    let home = mqttd_broker::cluster::home_worker("dur-worker", 2);
    let (_, pid) = worker_pids(a.pid())
        .into_iter()
        .find(|&(i, _)| i == home)
        .expect("home worker");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    wait_until_gone(pid, STEP).await;
    expect_session_with(&a, "dur-worker", 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_survives_kill_9_of_its_host_and_of_every_broker() {
    let redis = RedisServer::start();
    let mut a = host(&redis, &[]);
    let mut b = host(&redis, &[]);
    let mut sub = v4::connect(v4::persistent(&a, "dur-host")).await;
    sub.subscribe("dur/h", v4::QoS::AtLeastOnce).await;
    sub.disconnect().await;
    publish_numbered(&a, "dur-h-pub", "dur/h", 50).await;
    // Host a dies whole; the client comes back through host b.
    kill_host(&mut a);
    expect_session_with(&b, "dur-host", 50).await;

    // Queued again on b, then every broker process dies; a new host has it all.
    publish_numbered(&b, "dur-h-pub2", "dur/h", 30).await;
    kill_host(&mut b);
    let c = host(&redis, &[]);
    expect_session_with(&c, "dur-host", 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_hosts_wills_fire_once_on_a_survivor() {
    let redis = RedisServer::start();
    let mut a = host(&redis, &[]);
    let b = host(&redis, &[]);
    let c = host(&redis, &[]);
    let mut watchers = Vec::new();
    for (broker, id) in [(&b, "will-watch-b"), (&c, "will-watch-c")] {
        let mut w = v5::connect(v5::opts(broker, id)).await;
        w.subscribe("will/#", v5::QoS::AtLeastOnce).await;
        watchers.push(w);
    }
    // Online on a with a will, when a dies whole: b and c survive, one of them adopts the
    // session and fires the will, which both watchers get exactly once.
    let mut o = v5::persistent(&a, "will-client", 300);
    o.set_last_will(v5::LastWill::new(
        "will/gone",
        "bye",
        v5::QoS::AtLeastOnce,
        false,
        None,
    ));
    let client = v5::connect(o).await;
    kill_host(&mut a);
    for w in watchers.iter_mut() {
        let p = w.next_publish().await;
        assert_eq!(payload_str(&p.topic), "will/gone");
        assert_eq!(payload_str(&p.payload), "bye");
        assert!(
            w.next_publish_within(Duration::from_secs(2))
                .await
                .is_none(),
            "the will fired twice"
        );
    }
    drop(client);
    // The session itself lives on: the client finds it through any host.
    let back = v5::connect(v5::persistent(&c, "will-client", 300)).await;
    assert!(back.connack.session_present);
}
