//! The cluster as clients see it: `mqttd --workers 4`, with every client placed on the worker
//! we want by choosing its client id (`home_worker`: a connection accepted by any worker is
//! handed to its client id's home worker). Each test checks that clients on different
//! workers behave as they would on one broker.
//!
//! Every wait is bounded; "nothing else arrived" is shown with a marker message published
//! last (per publisher and topic, order is kept, so a duplicate would come before it).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::clients::{payload_str, v4, v5};
use common::procs::worker_pids;
use common::Broker;
use mqttd_broker::cluster::home_worker;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use v4::{Event, Incoming, Outgoing, QoS, SubscribeReasonCode};

const WORKERS: u16 = 4;
/// Bound on waits for the process tree and for `$SYS` refreshes (once a second).
const SLOW_DEADLINE: Duration = Duration::from_secs(20);

fn start() -> Broker {
    Broker::start_workers(WORKERS, &[])
}

fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// A fresh client id whose home is `worker` (of [`WORKERS`]).
fn id_on(worker: u16, prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{prefix}-{}-{n}", std::process::id());
        if home_worker(&id, WORKERS) == worker {
            return id;
        }
    }
}

/// A v3.1.1 client (clean session) living on `worker`.
async fn client_on(broker: &Broker, worker: u16, prefix: &str) -> v4::Conn {
    v4::connect(v4::opts(broker, &id_on(worker, prefix))).await
}

/// Subscribes and checks the granted QoS.
async fn subscribe(c: &mut v4::Conn, filter: &str, q: QoS) {
    let ack = c.subscribe(filter, q).await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(q)],
        "[{}] SUBACK for {filter}",
        c.id
    );
}

/// Publishes every payload without waiting in between (pipelined), then waits for all of
/// their acknowledgements (QoS 0: for all of them to be written).
async fn publish_burst(c: &mut v4::Conn, topic: &str, q: QoS, payloads: &[String]) {
    for p in payloads {
        c.client
            .publish(topic, q, false, p.clone().into_bytes())
            .await
            .expect("publish request");
    }
    for _ in payloads {
        c.events
            .expect("publish acknowledgement", |e| match (q, e) {
                (QoS::AtMostOnce, Event::Outgoing(Outgoing::Publish(_))) => Some(()),
                (QoS::AtLeastOnce, Event::Incoming(Incoming::PubAck(_))) => Some(()),
                (QoS::ExactlyOnce, Event::Incoming(Incoming::PubComp(_))) => Some(()),
                _ => None,
            })
            .await;
    }
}

/// The PUBLISHes received before the one whose payload is `marker` (which is consumed).
async fn until_marker(c: &mut v4::Conn, marker: &str) -> Vec<v4::Publish> {
    let mut got = Vec::new();
    loop {
        let p = c.next_publish().await;
        if payload_str(&p.payload) == marker {
            return got;
        }
        got.push(p);
    }
}

fn payloads(ps: &[v4::Publish]) -> Vec<String> {
    ps.iter().map(|p| payload_str(&p.payload)).collect()
}

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Watches `$SYS` topics through a client subscribed to `filters`; keeps the latest value
/// of each topic, separately for live refreshes (retain flag clear: published after the
/// subscription) and for any message (including the retained copies sent on subscribing).
struct SysWatch {
    conn: v4::Conn,
    latest: BTreeMap<String, String>,
    live: BTreeMap<String, String>,
}

impl SysWatch {
    async fn new(broker: &Broker, worker: u16, filters: &[&str]) -> SysWatch {
        let mut conn = client_on(broker, worker, "sys").await;
        for f in filters {
            subscribe(&mut conn, f, QoS::AtMostOnce).await;
        }
        SysWatch {
            conn,
            latest: BTreeMap::new(),
            live: BTreeMap::new(),
        }
    }

    /// Waits (bounded) until `done` accepts the values seen so far (checked after every
    /// message); `live_only` considers only refreshes published after subscribing.
    async fn wait(
        &mut self,
        what: &str,
        live_only: bool,
        done: impl FnMut(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<String, String> {
        match self.try_wait(what, live_only, done).await {
            Ok(values) => values,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`wait`](Self::wait) that returns what went wrong instead of panicking.
    async fn try_wait(
        &mut self,
        what: &str,
        live_only: bool,
        mut done: impl FnMut(&BTreeMap<String, String>) -> bool,
    ) -> Result<BTreeMap<String, String>, String> {
        let deadline = Instant::now() + SLOW_DEADLINE;
        loop {
            let values = if live_only { &self.live } else { &self.latest };
            if done(values) {
                return Ok(values.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(p) = self.conn.next_publish_within(left).await else {
                return Err(format!(
                    "timed out after {SLOW_DEADLINE:?} waiting for $SYS {what}; latest values: {:?}, live: {:?}",
                    self.latest, self.live
                ));
            };
            let value = payload_str(&p.payload);
            if !p.retain {
                self.live.insert(p.topic.clone(), value.clone());
            }
            self.latest.insert(p.topic.clone(), value);
        }
    }

    /// The next live value of `topic` (a refresh published after this call).
    async fn try_next_live(&mut self, topic: &str) -> Result<String, String> {
        self.live.remove(topic);
        let values = self
            .try_wait(&format!("a refresh of {topic}"), true, |v| {
                v.contains_key(topic)
            })
            .await?;
        Ok(values[topic].clone())
    }

    /// Waits for a live value of `topic` equal to `want`.
    async fn try_live_eq(&mut self, topic: &str, want: i64, why: &str) -> Result<(), String> {
        self.try_wait(&format!("{topic} == {want} ({why})"), true, |v| {
            v.get(topic).is_some_and(|r| r.parse::<i64>() == Ok(want))
        })
        .await
        .map(drop)
    }
}

// ------------------------------------------------------------------------------------------
// The process tree, from /proc
// ------------------------------------------------------------------------------------------

async fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + SLOW_DEADLINE;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------------------------------
// 1. Cross-worker delivery, QoS 0/1/2
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_worker_delivery_qos_0_1_2() {
    let broker = start();
    let mut sub = client_on(&broker, 1, "xw-sub").await;
    let mut publ = client_on(&broker, 2, "xw-pub").await;
    for q in 0..=2u8 {
        let topic = format!("xw/q{q}");
        subscribe(&mut sub, &topic, qos(q)).await;
        let sent = numbered(&format!("q{q}-"), 100);
        publish_burst(&mut publ, &topic, qos(q), &sent).await;
        publ.publish(&topic, qos(q), false, "end").await;
        let got = until_marker(&mut sub, "end").await;
        assert_eq!(
            payloads(&got),
            sent,
            "QoS {q}: every message once, in order, before the marker"
        );
        for p in &got {
            assert_eq!(p.topic, topic);
            assert_eq!(p.qos, qos(q), "QoS {q}: delivered QoS");
            assert!(!p.retain, "QoS {q}: retain flag on a live message");
            assert!(!p.dup, "QoS {q}: DUP on a first delivery");
        }
    }
    // The delivered QoS is the lower of the publication's and the subscription's.
    subscribe(&mut sub, "xw/down", QoS::AtLeastOnce).await;
    publ.publish("xw/down", QoS::ExactlyOnce, false, "two-to-one")
        .await;
    let p = sub.next_publish().await;
    assert_eq!(payload_str(&p.payload), "two-to-one");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    // And the other way round: publisher and subscriber swap workers.
    subscribe(&mut publ, "xw/back", QoS::ExactlyOnce).await;
    sub.publish("xw/back", QoS::ExactlyOnce, false, "back")
        .await;
    sub.publish("xw/back", QoS::ExactlyOnce, false, "end").await;
    assert_eq!(payloads(&until_marker(&mut publ, "end").await), ["back"]);
}

// ------------------------------------------------------------------------------------------
// 2. Wildcards across workers, once per subscriber
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_filters_across_workers_deliver_once_per_subscriber() {
    let broker = start();
    // Subscribers on workers 0, 1 (two of them) and 2; the publisher on worker 3.
    let mut plus = client_on(&broker, 0, "wc-plus").await;
    subscribe(&mut plus, "w/+/temp", QoS::AtLeastOnce).await;
    // Overlapping filters of one subscriber: still one delivery per message.
    subscribe(&mut plus, "w/a/#", QoS::AtLeastOnce).await;
    let mut hash = client_on(&broker, 1, "wc-hash").await;
    subscribe(&mut hash, "w/#", QoS::AtLeastOnce).await;
    let mut first_level = client_on(&broker, 1, "wc-first").await;
    subscribe(&mut first_level, "+/a/temp", QoS::AtLeastOnce).await;
    let mut exact = client_on(&broker, 2, "wc-exact").await;
    subscribe(&mut exact, "w/a/temp", QoS::AtLeastOnce).await;
    let mut publ = client_on(&broker, 3, "wc-pub").await;

    for (topic, payload) in [
        ("w/a/temp", "1"),
        ("w/b/temp", "2"),
        ("w/a/b/c", "3"),
        ("w", "4"),
        ("x/a/temp", "5"),
        ("w/a", "6"),
        ("nothing/here", "7"),
    ] {
        publ.publish(topic, QoS::AtLeastOnce, false, payload).await;
    }
    // Matches every subscriber: the marker.
    publ.publish("w/a/temp", QoS::AtLeastOnce, false, "end")
        .await;

    let expect = |c: &str, got: Vec<v4::Publish>, want: &[(&str, &str)]| {
        let got: Vec<(String, String)> = got
            .iter()
            .map(|p| (p.topic.clone(), payload_str(&p.payload)))
            .collect();
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(t, p)| (t.to_string(), p.to_string()))
            .collect();
        assert_eq!(got, want, "{c}: messages received before the marker");
    };
    expect(
        "w/+/temp + w/a/# (worker 0)",
        until_marker(&mut plus, "end").await,
        &[
            ("w/a/temp", "1"),
            ("w/b/temp", "2"),
            ("w/a/b/c", "3"),
            ("w/a", "6"),
        ],
    );
    expect(
        "w/# (worker 1)",
        until_marker(&mut hash, "end").await,
        &[
            ("w/a/temp", "1"),
            ("w/b/temp", "2"),
            ("w/a/b/c", "3"),
            ("w", "4"),
            ("w/a", "6"),
        ],
    );
    expect(
        "+/a/temp (worker 1)",
        until_marker(&mut first_level, "end").await,
        &[("w/a/temp", "1"), ("x/a/temp", "5")],
    );
    expect(
        "w/a/temp (worker 2)",
        until_marker(&mut exact, "end").await,
        &[("w/a/temp", "1")],
    );
}

// ------------------------------------------------------------------------------------------
// 3. Retained messages across workers
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_across_workers() {
    let broker = start();
    // Every client connects first, so each SUBSCRIBE follows the PUBACK it depends on
    // immediately: as on one broker, a retained message acknowledged to its publisher is
    // there for every later subscriber, whichever worker it lives on.
    let mut a = client_on(&broker, 0, "rt-a").await;
    let mut b = client_on(&broker, 1, "rt-b").await;
    let mut c = client_on(&broker, 2, "rt-c").await;
    let mut d = client_on(&broker, 3, "rt-d").await;

    a.publish("rt/x", QoS::AtLeastOnce, true, "kept").await;
    for (worker, sub, filter) in [(1, &mut b, "rt/x"), (2, &mut c, "rt/+")] {
        subscribe(sub, filter, QoS::AtLeastOnce).await;
        let p = sub.next_publish().await;
        assert_eq!(
            (p.topic.as_str(), payload_str(&p.payload).as_str()),
            ("rt/x", "kept"),
            "worker {worker}, {filter}"
        );
        assert!(
            p.retain,
            "worker {worker}: retain flag of a retained message"
        );
        assert_eq!(p.qos, QoS::AtLeastOnce);
    }

    // Cleared on worker 0: a new subscriber on worker 3 gets nothing retained; the first
    // thing it sees is a live marker published after its SUBACK.
    a.publish("rt/x", QoS::AtLeastOnce, true, "").await;
    subscribe(&mut d, "rt/x", QoS::AtLeastOnce).await;
    a.publish("rt/x", QoS::AtLeastOnce, false, "marker").await;
    let p = d.next_publish().await;
    assert!(
        payload_str(&p.payload) == "marker" && !p.retain,
        "retained rt/x cleared on worker 0 (PUBACK received), then subscribed on worker 3: \
         first PUBLISH was {:?} retain={} instead of the live marker",
        payload_str(&p.payload),
        p.retain
    );

    // Replaced over and over from different workers: a new subscriber on yet another
    // worker gets the latest value, not the one its worker had before.
    let mut pubs = Vec::new();
    for worker in 0..WORKERS {
        pubs.push(client_on(&broker, worker, "rt-ypub").await);
    }
    let mut subs = Vec::new();
    for i in 0..12u16 {
        subs.push(client_on(&broker, (i + 1) % WORKERS, "rt-ysub").await);
    }
    for (i, sub) in subs.iter_mut().enumerate() {
        let from = i % WORKERS as usize;
        let value = format!("v{i}");
        pubs[from]
            .publish("rt/y", QoS::AtLeastOnce, true, value.clone())
            .await;
        subscribe(sub, "rt/y", QoS::AtLeastOnce).await;
        let p = sub.next_publish().await;
        if payload_str(&p.payload) != value || !p.retain {
            // What else arrives shortly, for the failure message only.
            let mut more = Vec::new();
            while let Some(p) = sub.next_publish_within(Duration::from_millis(500)).await {
                more.push((payload_str(&p.payload), p.retain));
            }
            panic!(
                "retained {value:?} set on worker {from} (PUBACK received), then subscribed on \
                 worker {}: first PUBLISH was {:?} retain={}, then {more:?}",
                (from + 1) % WORKERS as usize,
                payload_str(&p.payload),
                p.retain
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// 4. Shared subscriptions across workers
// ------------------------------------------------------------------------------------------

/// Forwards every PUBLISH `c` receives, tagged with `tag`, until the receiver is gone.
fn pump(
    mut c: v4::Conn,
    tag: usize,
    tx: UnboundedSender<(usize, v4::Publish)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(p) = c.next_publish_within(Duration::from_secs(120)).await {
            if tx.send((tag, p)).is_err() {
                break;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_members_on_three_workers() {
    let broker = start();
    let (tx, mut rx) = unbounded_channel();
    let mut pumps = Vec::new();
    for (tag, worker) in [0u16, 1, 2].into_iter().enumerate() {
        let mut m = client_on(&broker, worker, "sh-member").await;
        subscribe(&mut m, "$share/g/sh/t", QoS::AtLeastOnce).await;
        pumps.push(pump(m, tag, tx.clone()));
    }
    drop(tx);
    let mut publ = client_on(&broker, 3, "sh-pub").await;
    let sent = numbered("m", 60);
    publish_burst(&mut publ, "sh/t", QoS::AtLeastOnce, &sent).await;

    // Markers, one at a time, until every member has received one: a member's messages
    // arrive in publication order, so all its share of the 60 came before its marker.
    let mut got: Vec<Vec<String>> = vec![Vec::new(); 3];
    let mut marker_seen = [false; 3];
    let mut markers = 0;
    while marker_seen.iter().any(|s| !s) {
        assert!(
            markers < 40,
            "40 markers and some member never got one: {marker_seen:?}; received {got:?}"
        );
        let marker = format!("marker{markers}");
        markers += 1;
        publ.publish("sh/t", QoS::AtLeastOnce, false, marker.clone())
            .await;
        loop {
            let (tag, p) = tokio::time::timeout(common::clients::DEADLINE, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{marker} reached no member; received {got:?}"))
                .expect("member connections gone");
            let payload = payload_str(&p.payload);
            assert_eq!(p.topic, "sh/t");
            if payload.starts_with("marker") {
                assert_eq!(payload, marker, "markers out of order");
                marker_seen[tag] = true;
                break;
            }
            got[tag].push(payload);
        }
    }
    let mut all: Vec<String> = got.iter().flatten().cloned().collect();
    let total = all.len();
    all.sort_by_key(|p| p[1..].parse::<u32>().unwrap());
    all.dedup();
    assert_eq!(
        total,
        60,
        "deliveries in total (duplicates: {})",
        total - all.len()
    );
    assert_eq!(all, sent, "each message delivered once overall");
    let counts: Vec<usize> = got.iter().map(Vec::len).collect();
    eprintln!("shared group split across workers 0, 1, 2: {counts:?}");
    assert!(
        counts.iter().filter(|&&n| n > 0).count() >= 2,
        "one member got everything: {counts:?}"
    );
    // Each member's share is in publication order.
    for share in &got {
        let nums: Vec<u32> = share.iter().map(|p| p[1..].parse().unwrap()).collect();
        assert!(
            nums.windows(2).all(|w| w[0] < w[1]),
            "out of order: {share:?}"
        );
    }
    for p in pumps {
        p.abort();
    }
}

// ------------------------------------------------------------------------------------------
// 5. Takeover across workers
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_across_workers_v5() {
    use v5::{ConnectReturnCode, ConnectionError, DisconnectReasonCode, StateError};
    let broker = start();
    let id = id_on(1, "tk5");
    let mut prev = v5::connect(v5::opts(&broker, &id)).await;
    // Several rounds: SO_REUSEPORT spreads the new connections over the workers, each is
    // handed to worker 1, which holds the id.
    for round in 0..8 {
        let next = v5::connect(v5::opts(&broker, &id)).await;
        assert_eq!(
            next.connack.code,
            ConnectReturnCode::Success,
            "round {round}"
        );
        match prev.events.expect_closed().await {
            ConnectionError::MqttState(StateError::ServerDisconnect { reason_code, .. }) => {
                assert_eq!(
                    reason_code,
                    DisconnectReasonCode::SessionTakenOver,
                    "round {round}: DISCONNECT reason code"
                );
            }
            other => panic!(
                "round {round}: expected DISCONNECT 0x8E (Session taken over), the connection ended with {other:?}"
            ),
        }
        prev = next;
    }
    // The survivor is a working client: a publisher on another worker reaches it.
    prev.subscribe("tk/t", v5::QoS::AtLeastOnce).await;
    let mut publ = v5::connect(v5::opts(&broker, &id_on(3, "tk5-pub"))).await;
    publ.publish("tk/t", v5::QoS::AtLeastOnce, false, "to the survivor")
        .await;
    let p = prev.next_publish().await;
    assert_eq!(payload_str(&p.payload), "to the survivor");

    // A persistent session taken over keeps its subscriptions.
    let pid = id_on(2, "tk5-persist");
    let mut first = v5::connect(v5::persistent(&broker, &pid, 300)).await;
    first.subscribe("tk/p", v5::QoS::AtLeastOnce).await;
    let mut second = v5::connect(v5::persistent(&broker, &pid, 300)).await;
    assert!(
        second.connack.session_present,
        "session taken over is present"
    );
    match first.events.expect_closed().await {
        ConnectionError::MqttState(StateError::ServerDisconnect { reason_code, .. }) => {
            assert_eq!(reason_code, DisconnectReasonCode::SessionTakenOver)
        }
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    publ.publish("tk/p", v5::QoS::AtLeastOnce, false, "kept sub")
        .await;
    let p = second.next_publish().await;
    assert_eq!(payload_str(&p.payload), "kept sub");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_across_workers_v311() {
    let broker = start();
    let id = id_on(3, "tk4");
    let mut prev = v4::connect(v4::opts(&broker, &id)).await;
    for round in 0..8 {
        let next = v4::connect(v4::opts(&broker, &id)).await;
        assert_eq!(
            next.connack.code,
            v4::ConnectReturnCode::Success,
            "round {round}"
        );
        // 3.1.1 has no DISCONNECT from the server: the old connection is closed.
        let _ = prev.events.expect_closed().await;
        prev = next;
    }
    subscribe(&mut prev, "tk4/t", QoS::AtLeastOnce).await;
    let mut publ = client_on(&broker, 0, "tk4-pub").await;
    publ.publish("tk4/t", QoS::AtLeastOnce, false, "to the survivor")
        .await;
    assert_eq!(
        payload_str(&prev.next_publish().await.payload),
        "to the survivor"
    );
}

// ------------------------------------------------------------------------------------------
// 6. Persistent sessions resumed, queued messages from another worker
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_resumes_with_queued_messages_v311() {
    let broker = start();
    let id = id_on(1, "ps4");
    let mut x = v4::connect(v4::persistent(&broker, &id)).await;
    assert!(!x.connack.session_present);
    subscribe(&mut x, "ps4/t", QoS::AtLeastOnce).await;
    x.disconnect().await;

    let mut publ = client_on(&broker, 2, "ps4-pub").await;
    let sent = numbered("queued", 5);
    publish_burst(&mut publ, "ps4/t", QoS::AtLeastOnce, &sent).await;

    // Reconnections land on any worker (SO_REUSEPORT) and are handed to worker 1; do it
    // a few times, each time with more queued messages.
    for round in 0..3 {
        let mut x = v4::connect(v4::persistent(&broker, &id)).await;
        assert!(x.connack.session_present, "round {round}: session present");
        let got: Vec<v4::Publish> = {
            let mut got = Vec::new();
            for _ in 0..sent.len() {
                got.push(x.next_publish().await);
            }
            got
        };
        assert_eq!(
            payloads(&got),
            sent,
            "round {round}: queued messages in order"
        );
        for p in &got {
            assert_eq!(p.qos, QoS::AtLeastOnce);
        }
        publ.publish("ps4/t", QoS::AtLeastOnce, false, "live").await;
        assert_eq!(
            payload_str(&x.next_publish().await.payload),
            "live",
            "round {round}: nothing more than the queued messages, then live traffic"
        );
        x.disconnect().await;
        publish_burst(&mut publ, "ps4/t", QoS::AtLeastOnce, &sent).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_resumes_with_queued_messages_v5() {
    use v5::QoS;
    let broker = start();
    let id = id_on(2, "ps5");
    let mut x = v5::connect(v5::persistent(&broker, &id, 300)).await;
    assert!(!x.connack.session_present);
    x.subscribe("ps5/t", QoS::AtLeastOnce).await;
    x.disconnect().await;

    let mut publ = v5::connect(v5::opts(&broker, &id_on(0, "ps5-pub"))).await;
    for i in 0..5 {
        publ.publish("ps5/t", QoS::AtLeastOnce, false, format!("queued{i}"))
            .await;
    }
    let mut x = v5::connect(v5::persistent(&broker, &id, 300)).await;
    assert!(x.connack.session_present, "session present");
    for i in 0..5 {
        let p = x.next_publish().await;
        assert_eq!(payload_str(&p.payload), format!("queued{i}"));
        assert_eq!(p.qos, QoS::AtLeastOnce);
    }
    publ.publish("ps5/t", QoS::AtLeastOnce, false, "live").await;
    assert_eq!(payload_str(&x.next_publish().await.payload), "live");
}

// ------------------------------------------------------------------------------------------
// 7. kill -9 of one worker
// ------------------------------------------------------------------------------------------

/// Clients `ring[i]` publish to `ring[i+1]`'s topic, round after round, each waiting for its
/// message to arrive: any error on any of them fails the test (the Events helpers panic).
async fn run_ring(
    mut ring: Vec<v4::Conn>,
    topics: Vec<String>,
    rounds: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Vec<v4::Conn> {
    let n = ring.len();
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let payload = format!("round{round}");
        for i in 0..n {
            ring[i]
                .publish(
                    &topics[(i + 1) % n],
                    QoS::AtLeastOnce,
                    false,
                    payload.clone(),
                )
                .await;
        }
        for i in 0..n {
            let p = ring[(i + 1) % n].next_publish().await;
            assert_eq!(
                (p.topic.as_str(), payload_str(&p.payload)),
                (topics[(i + 1) % n].as_str(), payload.clone()),
                "ring client {}",
                ring[(i + 1) % n].id
            );
        }
        round += 1;
        rounds.store(round, Ordering::Relaxed);
    }
    ring
}

async fn rounds_advance(rounds: &AtomicU64, by: u64, what: &str) {
    let from = rounds.load(Ordering::Relaxed);
    wait_for(&format!("{by} more ring rounds {what} (at {from})"), || {
        (rounds.load(Ordering::Relaxed) >= from + by).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_is_replaced_and_others_keep_serving() {
    const VICTIM: u16 = 2;
    const ROUTES: &str = "$SYS/broker/routes/count";
    let mut broker = start();
    let supervisor = broker.pid();
    let before = wait_for("4 worker processes", || {
        let w = worker_pids(supervisor);
        (w.len() == WORKERS as usize).then_some(w)
    })
    .await;
    let victim_pid = before
        .iter()
        .find(|(i, _)| *i == VICTIM)
        .map(|&(_, pid)| pid)
        .expect("a worker with --worker-index 2");

    // The victim's client, with two filters nobody else has.
    let only = ["kill/only-victim/1", "kill/only-victim/2"];
    let mut doomed = client_on(&broker, VICTIM, "kill-doomed").await;
    for f in only {
        subscribe(&mut doomed, f, QoS::AtLeastOnce).await;
    }
    // Clients on the other workers, passing messages around a ring.
    let mut ring = Vec::new();
    let mut topics = Vec::new();
    for worker in [0u16, 1, 3] {
        let mut c = client_on(&broker, worker, "kill-ring").await;
        let topic = format!("kill/ring/{worker}");
        subscribe(&mut c, &topic, QoS::AtLeastOnce).await;
        ring.push(c);
        topics.push(topic);
    }
    let mut other = client_on(&broker, 3, "kill-other").await;
    subscribe(&mut other, "kill/from-new", QoS::AtLeastOnce).await;
    other
        .publish("kill/kept", QoS::AtLeastOnce, true, "retained before")
        .await;
    // Sanity: the victim's client gets cross-worker messages.
    other
        .publish(only[0], QoS::AtLeastOnce, false, "hello victim")
        .await;
    assert_eq!(
        payload_str(&doomed.next_publish().await.payload),
        "hello victim"
    );

    // Every subscription is made (SUBACK waits for every worker): the next refresh counts all.
    // Failures of the $SYS routes count are reported at the end, after the rest is checked.
    let mut sys = SysWatch::new(&broker, 0, &[ROUTES]).await;
    let mut routes_problems: Vec<String> = Vec::new();
    let with_victim: Option<i64> = match sys.try_next_live(ROUTES).await {
        Ok(v) => Some(v.parse().expect("routes count")),
        Err(e) => {
            routes_problems.push(e);
            None
        }
    };
    eprintln!("routes with the victim's: {with_victim:?}");

    let rounds = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let ring_task = tokio::spawn(run_ring(ring, topics, rounds.clone(), stop.clone()));
    rounds_advance(&rounds, 20, "before the kill").await;

    let status = std::process::Command::new("kill")
        .args(["-KILL", &victim_pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());

    // Its connections die with it...
    let _ = doomed.events.expect_closed().await;
    // ...its routes go...
    if let Some(with_victim) = with_victim {
        let expected = with_victim - only.len() as i64;
        if let Err(e) = sys
            .try_live_eq(ROUTES, expected, "the victim's routes removed")
            .await
        {
            routes_problems.push(e);
        }
    }
    // ...and the others keep serving.
    rounds_advance(&rounds, 20, "after the kill").await;

    let replacement = wait_for("a replacement worker 2", || {
        worker_pids(supervisor)
            .into_iter()
            .find(|&(i, pid)| i == VICTIM && pid != victim_pid)
            .map(|(_, pid)| pid)
    })
    .await;
    eprintln!("worker {VICTIM}: pid {victim_pid} killed, replaced by {replacement}");

    // A client living on the new worker. Until the new worker has joined the mesh, a peer
    // that accepted the connection cannot hand it over and refuses it (server unavailable).
    let id = id_on(VICTIM, "kill-reborn");
    let deadline = Instant::now() + SLOW_DEADLINE;
    let mut refused = Vec::new();
    let mut reborn = loop {
        match v4::try_connect(v4::opts(&broker, &id)).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "a client of the replaced worker never connected: {refused:?}"
                );
                refused.push(format!("{e:?}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    if !refused.is_empty() {
        eprintln!(
            "connections refused before the replacement joined: {}, first {:?}",
            refused.len(),
            refused[0]
        );
    }
    for f in only {
        subscribe(&mut reborn, f, QoS::AtLeastOnce).await;
    }
    // The new worker got the retained messages when it joined.
    subscribe(&mut reborn, "kill/kept", QoS::AtLeastOnce).await;
    let p = reborn.next_publish().await;
    assert_eq!(payload_str(&p.payload), "retained before");
    assert!(p.retain);
    // Cross-worker both ways.
    other
        .publish(only[1], QoS::AtLeastOnce, false, "to the new worker")
        .await;
    let p = reborn.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), payload_str(&p.payload).as_str()),
        (only[1], "to the new worker")
    );
    reborn
        .publish(
            "kill/from-new",
            QoS::AtLeastOnce,
            false,
            "from the new worker",
        )
        .await;
    assert_eq!(
        payload_str(&other.next_publish().await.payload),
        "from the new worker"
    );
    if let Some(with_victim) = with_victim {
        // The victim's two filters again, plus "kill/kept" (nobody else's).
        if let Err(e) = sys
            .try_live_eq(ROUTES, with_victim + 1, "the new worker's routes")
            .await
        {
            routes_problems.push(e);
        }
    }

    rounds_advance(&rounds, 20, "after the replacement").await;
    stop.store(true, Ordering::Relaxed);
    let ring = ring_task
        .await
        .expect("a ring client saw an error or lost a message");
    for c in ring {
        c.disconnect().await;
    }
    broker.assert_alive();
    // The restart is counted (the supervisor tells the replacement; worker 0 publishes it).
    let restarts = format!("$SYS/broker/workers/{VICTIM}/restarts");
    let mut restart_watch = SysWatch::new(&broker, 0, &[&restarts]).await;
    restart_watch
        .wait("the restart counted", false, |v| {
            v.get(&restarts).map(String::as_str) == Some("1")
        })
        .await;
    assert!(
        routes_problems.is_empty(),
        "everything else passed, but $SYS routes count: {routes_problems:#?}"
    );
}

// ------------------------------------------------------------------------------------------
// 8. $SYS connection counts per worker
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_counts_clients_per_worker_and_in_total() {
    let broker = start();
    let mut sys = SysWatch::new(
        &broker,
        0,
        &[
            "$SYS/broker/workers/+/clients/connected",
            "$SYS/broker/clients/connected",
            "$SYS/broker/workers/count",
        ],
    )
    .await;
    // With the watcher (on worker 0): 1, 2, 1, 3.
    let mut clients = Vec::new();
    for (worker, n) in [(1u16, 2), (2, 1), (3, 3)] {
        for _ in 0..n {
            clients.push((worker, client_on(&broker, worker, "sys-count").await));
        }
    }
    let want = |counts: [u64; 4]| {
        let mut want = BTreeMap::new();
        for (i, n) in counts.iter().enumerate() {
            want.insert(
                format!("$SYS/broker/workers/{i}/clients/connected"),
                n.to_string(),
            );
        }
        want.insert(
            "$SYS/broker/clients/connected".to_string(),
            counts.iter().sum::<u64>().to_string(),
        );
        want.insert("$SYS/broker/workers/count".to_string(), WORKERS.to_string());
        want
    };
    let expected = want([1, 2, 1, 3]);
    sys.wait(&format!("{expected:?}"), false, |v| {
        expected.iter().all(|(k, n)| v.get(k) == Some(n))
    })
    .await;

    // Two leave worker 3, one leaves worker 1.
    let mut keep = Vec::new();
    let mut left = [(3u16, 2), (1, 1)]
        .into_iter()
        .collect::<BTreeMap<u16, usize>>();
    for (worker, c) in clients {
        match left.get_mut(&worker) {
            Some(n) if *n > 0 => {
                *n -= 1;
                c.disconnect().await;
            }
            _ => keep.push(c),
        }
    }
    let expected = want([1, 1, 1, 1]);
    sys.wait(&format!("{expected:?}"), false, |v| {
        expected.iter().all(|(k, n)| v.get(k) == Some(n))
    })
    .await;
    drop(keep);
}

/// Many connections arriving at once, most of them handed to another worker in batches
/// (several descriptors in one mesh write): every one gets its CONNACK.
#[test]
fn a_burst_of_connections_is_handed_over_intact() {
    use std::io::{Read, Write};
    let broker = Broker::start_workers(WORKERS, &[]);
    let connect = |id: &str| {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];
        body.extend_from_slice(&(id.len() as u16).to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend(body);
        packet
    };
    let mut streams: Vec<std::net::TcpStream> = (0..400)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(broker.addr).expect("connect");
            s.write_all(&connect(&format!("burst-{i}")))
                .expect("send CONNECT");
            s
        })
        .collect();
    for (i, s) in streams.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack)
            .unwrap_or_else(|e| panic!("connection {i}: no CONNACK: {e}"));
        assert_eq!(connack, [0x20, 2, 0, 0], "connection {i}");
    }
}
