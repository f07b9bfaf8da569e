//! MQTT 3.1.1 behaviour of the real `mqttd`, seen through rumqttc's v3.1.1 ("v4") client.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::clients::v4::*;
use common::clients::{payload_str, DEADLINE};
use common::Broker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Receives PUBLISHes until one with payload `marker`; returns the (topic, payload) before it.
async fn collect_until_marker(c: &mut Conn, marker: &str) -> Vec<(String, String)> {
    let mut got = Vec::new();
    loop {
        let p = c.next_publish().await;
        let payload = payload_str(&p.payload);
        if payload == marker {
            return got;
        }
        got.push((p.topic.clone(), payload));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_gets_successful_connack() {
    let broker = Broker::start();
    let c = connect(opts(&broker, "v311-connect")).await;
    assert_eq!(c.connack.code, ConnectReturnCode::Success);
    assert!(
        !c.connack.session_present,
        "a clean session must not be reported as present"
    );
    c.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_each_qos_delivered_at_min_of_subscription_and_publish_qos() {
    let broker = Broker::start();
    let mut sub = connect(opts(&broker, "qos-sub")).await;
    for s in 0..3u8 {
        let ack = sub.subscribe(&format!("qos/s{s}"), qos(s)).await;
        assert_eq!(
            ack.return_codes,
            vec![SubscribeReasonCode::Success(qos(s))],
            "SUBACK for QoS {s}"
        );
    }
    let mut publ = connect(opts(&broker, "qos-pub")).await;
    for s in 0..3u8 {
        for p in 0..3u8 {
            publ.publish(&format!("qos/s{s}"), qos(p), false, format!("s{s}p{p}"))
                .await;
        }
    }
    let mut got = BTreeMap::new();
    while got.len() < 9 {
        let m = sub.next_publish().await;
        let payload = payload_str(&m.payload);
        assert!(
            got.insert(payload.clone(), (m.topic.clone(), m.qos))
                .is_none(),
            "{payload} delivered twice"
        );
    }
    for s in 0..3u8 {
        for p in 0..3u8 {
            let (topic, q) = &got[&format!("s{s}p{p}")];
            assert_eq!(topic, &format!("qos/s{s}"));
            assert_eq!(
                *q,
                qos(s.min(p)),
                "sub QoS {s}, pub QoS {p}: delivered QoS must be min"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plus_wildcard_matches_exactly_one_level() {
    let broker = Broker::start();
    let mut sub = connect(opts(&broker, "plus-sub")).await;
    sub.subscribe("a/+/c", QoS::AtLeastOnce).await;
    sub.subscribe("marker", QoS::AtLeastOnce).await;
    let mut publ = connect(opts(&broker, "plus-pub")).await;
    for t in [
        "a/b/c", "a/b/d", "a/b/c/d", "a//c", "a/c", "x/b/c", "a/xyz/c",
    ] {
        publ.publish(t, QoS::AtLeastOnce, false, t).await;
    }
    publ.publish("marker", QoS::AtLeastOnce, false, "MARK")
        .await;
    let got: BTreeSet<String> = collect_until_marker(&mut sub, "MARK")
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    let want: BTreeSet<String> = ["a/b/c", "a//c", "a/xyz/c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, want, "topics delivered for filter a/+/c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_wildcard_matches_parent_and_all_descendants() {
    let broker = Broker::start();
    let mut sub = connect(opts(&broker, "hash-sub")).await;
    sub.subscribe("sport/#", QoS::AtLeastOnce).await;
    sub.subscribe("marker", QoS::AtLeastOnce).await;
    let mut publ = connect(opts(&broker, "hash-pub")).await;
    for t in [
        "sport",
        "sport/tennis",
        "sport/tennis/player1",
        "sport/",
        "sports",
        "other/sport",
    ] {
        publ.publish(t, QoS::AtLeastOnce, false, t).await;
    }
    publ.publish("marker", QoS::AtLeastOnce, false, "MARK")
        .await;
    let got: BTreeSet<String> = collect_until_marker(&mut sub, "MARK")
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    let want: BTreeSet<String> = ["sport", "sport/tennis", "sport/tennis/player1", "sport/"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, want, "topics delivered for filter sport/#");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_at_first_level_do_not_match_dollar_topics() {
    let broker = Broker::start();
    let mut wild = connect(opts(&broker, "dollar-wild")).await;
    wild.subscribe("#", QoS::AtLeastOnce).await;
    wild.subscribe("+/x", QoS::AtLeastOnce).await;
    let mut explicit = connect(opts(&broker, "dollar-explicit")).await;
    explicit.subscribe("$test/#", QoS::AtLeastOnce).await;

    let mut publ = connect(opts(&broker, "dollar-pub")).await;
    publ.publish("$test/x", QoS::AtLeastOnce, false, "dollar")
        .await;
    // The $ topic was routed: an explicit $test/# subscription gets it.
    let m = explicit.next_publish().await;
    assert_eq!(
        (m.topic.as_str(), payload_str(&m.payload).as_str()),
        ("$test/x", "dollar")
    );

    publ.publish("marker/x", QoS::AtLeastOnce, false, "MARK")
        .await;
    let first = wild.next_publish().await;
    assert_eq!(
        (first.topic.as_str(), payload_str(&first.payload).as_str()),
        ("marker/x", "MARK"),
        "a '#' / '+/x' subscriber must not receive a topic starting with '$'"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_delivered_on_subscribe_and_cleared_by_empty_payload() {
    let broker = Broker::start();
    let mut publ = connect(opts(&broker, "ret-pub")).await;
    publ.publish("ret/1", QoS::AtLeastOnce, true, "hello").await;

    let mut sub1 = connect(opts(&broker, "ret-sub1")).await;
    sub1.subscribe("ret/#", QoS::AtLeastOnce).await;
    let m = sub1.next_publish().await;
    assert_eq!(m.topic, "ret/1");
    assert_eq!(payload_str(&m.payload), "hello");
    assert!(
        m.retain,
        "a retained message sent because of a new subscription must have RETAIN=1"
    );
    assert_eq!(m.qos, QoS::AtLeastOnce);

    // A zero-byte retained PUBLISH removes the retained message.
    publ.publish("ret/1", QoS::AtLeastOnce, true, Vec::new())
        .await;

    let mut sub2 = connect(opts(&broker, "ret-sub2")).await;
    sub2.subscribe("ret/#", QoS::AtLeastOnce).await;
    publ.publish("ret/marker", QoS::AtLeastOnce, false, "MARK")
        .await;
    let first = sub2.next_publish().await;
    assert_eq!(
        (
            first.topic.as_str(),
            payload_str(&first.payload).as_str(),
            first.retain
        ),
        ("ret/marker", "MARK", false),
        "the retained message must be gone after an empty retained publish"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_flag_is_cleared_when_forwarding_to_existing_subscription() {
    let broker = Broker::start();
    let mut sub = connect(opts(&broker, "retlive-sub")).await;
    sub.subscribe("retlive/t", QoS::AtLeastOnce).await;
    let mut publ = connect(opts(&broker, "retlive-pub")).await;
    publ.publish("retlive/t", QoS::AtLeastOnce, true, "live")
        .await;
    let m = sub.next_publish().await;
    assert_eq!(payload_str(&m.payload), "live");
    assert!(
        !m.retain,
        "[MQTT-3.3.1-9] RETAIN must be 0 for a message matching an established subscription"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    let broker = Broker::start();
    let mut sub = connect(opts(&broker, "unsub-sub")).await;
    sub.subscribe("unsub/t", QoS::AtLeastOnce).await;
    sub.subscribe("unsub/marker", QoS::AtLeastOnce).await;
    let mut publ = connect(opts(&broker, "unsub-pub")).await;
    publ.publish("unsub/t", QoS::AtLeastOnce, false, "before")
        .await;
    assert_eq!(payload_str(&sub.next_publish().await.payload), "before");

    sub.unsubscribe("unsub/t").await;
    publ.publish("unsub/t", QoS::AtLeastOnce, false, "after")
        .await;
    publ.publish("unsub/marker", QoS::AtLeastOnce, false, "MARK")
        .await;
    assert_eq!(
        payload_str(&sub.next_publish().await.payload),
        "MARK",
        "nothing may arrive after UNSUBACK"
    );
}

fn with_will(mut o: MqttOptions, topic: &str, payload: &str) -> MqttOptions {
    o.set_last_will(LastWill::new(
        topic,
        payload.as_bytes().to_vec(),
        QoS::AtLeastOnce,
        false,
    ));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_when_connection_drops_without_disconnect() {
    let broker = Broker::start();
    let mut watcher = connect(opts(&broker, "will-watcher")).await;
    watcher.subscribe("will/#", QoS::AtLeastOnce).await;
    let dying = connect(with_will(opts(&broker, "will-dying"), "will/dying", "gone")).await;
    dying.kill().await;
    let m = watcher.next_publish().await;
    assert_eq!(
        (m.topic.as_str(), payload_str(&m.payload).as_str()),
        ("will/dying", "gone")
    );
    assert_eq!(m.qos, QoS::AtLeastOnce);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_will_after_clean_disconnect() {
    let broker = Broker::start();
    let mut watcher = connect(opts(&broker, "nowill-watcher")).await;
    watcher.subscribe("nowill/#", QoS::AtLeastOnce).await;
    let polite = connect(with_will(
        opts(&broker, "nowill-polite"),
        "nowill/polite",
        "gone",
    ))
    .await;
    // Returns once the broker has closed the connection after our DISCONNECT.
    polite.disconnect().await;
    let mut publ = connect(opts(&broker, "nowill-pub")).await;
    publ.publish("nowill/marker", QoS::AtLeastOnce, false, "MARK")
        .await;
    let first = watcher.next_publish().await;
    assert_eq!(
        (first.topic.as_str(), payload_str(&first.payload).as_str()),
        ("nowill/marker", "MARK"),
        "the will must be discarded on DISCONNECT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_keeps_subscription_and_queues_offline_messages() {
    let broker = Broker::start();
    let mut s = connect(persistent(&broker, "persist-1")).await;
    assert!(
        !s.connack.session_present,
        "first connection: no session yet"
    );
    s.subscribe("persist/t", QoS::AtLeastOnce).await;
    s.disconnect().await;

    let mut publ = connect(opts(&broker, "persist-pub")).await;
    for i in 0..3 {
        publ.publish("persist/t", QoS::AtLeastOnce, false, format!("m{i}"))
            .await;
    }

    let mut s = connect(persistent(&broker, "persist-1")).await;
    assert!(
        s.connack.session_present,
        "CONNACK must report the stored session"
    );
    for i in 0..3 {
        let m = s.next_publish().await;
        assert_eq!(
            payload_str(&m.payload),
            format!("m{i}"),
            "queued messages in order"
        );
        assert_eq!(m.qos, QoS::AtLeastOnce);
    }
    // The subscription itself survived too.
    publ.publish("persist/t", QoS::AtLeastOnce, false, "online")
        .await;
    assert_eq!(payload_str(&s.next_publish().await.payload), "online");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_queue_is_bounded_and_keeps_the_oldest_messages() {
    let broker = Broker::start_with(&["limits.max_queued_messages=3"]);
    let mut s = connect(persistent(&broker, "bound-1")).await;
    s.subscribe("bound/t", QoS::AtLeastOnce).await;
    s.disconnect().await;

    let mut publ = connect(opts(&broker, "bound-pub")).await;
    for i in 0..5 {
        publ.publish("bound/t", QoS::AtLeastOnce, false, format!("m{i}"))
            .await;
    }
    let mut s = connect(persistent(&broker, "bound-1")).await;
    assert!(s.connack.session_present);
    for i in 0..3 {
        assert_eq!(
            payload_str(&s.next_publish().await.payload),
            format!("m{i}")
        );
    }
    publ.publish("bound/t", QoS::AtLeastOnce, false, "MARK")
        .await;
    assert_eq!(
        payload_str(&s.next_publish().await.payload),
        "MARK",
        "with max_queued_messages=3, messages beyond the third must have been dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_with_same_client_id_takes_over() {
    let broker = Broker::start();
    let mut first = connect(opts(&broker, "takeover")).await;
    let mut second = connect(opts(&broker, "takeover")).await;
    assert_eq!(second.connack.code, ConnectReturnCode::Success);
    let err = first.events.expect_closed().await;
    eprintln!("first connection ended with: {err:?}");
    // The new connection works.
    second.subscribe("takeover/t", QoS::AtLeastOnce).await;
    second
        .publish("takeover/t", QoS::AtLeastOnce, false, "hi")
        .await;
    assert_eq!(payload_str(&second.next_publish().await.payload), "hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_client_id_with_clean_session_is_accepted() {
    let broker = Broker::start();
    let mut c = connect(opts(&broker, "")).await;
    assert_eq!(c.connack.code, ConnectReturnCode::Success);
    assert!(!c.connack.session_present);
    c.subscribe("anon/t", QoS::AtLeastOnce).await;
    c.publish("anon/t", QoS::AtLeastOnce, false, "hi").await;
    assert_eq!(payload_str(&c.next_publish().await.payload), "hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_client_id_with_persistent_session_is_rejected() {
    let broker = Broker::start();
    // rumqttc refuses this combination in set_clean_session, so set the id afterwards.
    let mut o = persistent(&broker, "placeholder");
    o.set_client_id(String::new());
    match try_connect(o).await {
        Ok(c) => panic!(
            "expected CONNACK 0x02 (identifier rejected), got {:?}",
            c.connack
        ),
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::BadClientId, "CONNACK return code")
        }
        Err(e) => panic!("expected CONNACK 0x02 (identifier rejected), got error {e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_qos1_message_is_redelivered_with_dup_on_session_resume() {
    let broker = Broker::start();
    let mut o = persistent(&broker, "redeliver");
    o.set_manual_acks(true);
    let mut s = connect(o.clone()).await;
    s.subscribe("redeliver/t", QoS::AtLeastOnce).await;

    let mut publ = connect(opts(&broker, "redeliver-pub")).await;
    publ.publish("redeliver/t", QoS::AtLeastOnce, false, "once")
        .await;
    let m = s.next_publish().await;
    assert_eq!(payload_str(&m.payload), "once");
    assert!(!m.dup, "first delivery must not have DUP");
    s.kill().await; // no PUBACK, no DISCONNECT

    let mut s = connect(o).await;
    assert!(s.connack.session_present);
    let again = s.next_publish().await;
    assert_eq!(
        payload_str(&again.payload),
        "once",
        "the unacknowledged message must be resent"
    );
    assert_eq!(again.qos, QoS::AtLeastOnce);
    assert!(again.dup, "[MQTT-4.4.0-1] a resent PUBLISH must have DUP=1");
    assert_eq!(
        again.pkid, m.pkid,
        "a resent PUBLISH keeps its packet identifier"
    );
    s.client.ack(&again).await.unwrap();
    // Once acknowledged it is not sent again: the next message is a new one.
    publ.publish("redeliver/t", QoS::AtLeastOnce, false, "MARK")
        .await;
    let next = s.next_publish().await;
    assert_eq!(payload_str(&next.payload), "MARK");
}

/// A 3.1.1 CONNECT with the given keep-alive and client id, clean session.
fn raw_connect_v311(keep_alive: u16, id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

async fn raw_connack(stream: &mut TcpStream) {
    let mut connack = [0u8; 4];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .expect("read CONNACK");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_is_enforced_on_a_silent_client() {
    let broker = Broker::start();
    let mut stream = TcpStream::connect(broker.addr).await.unwrap();
    stream
        .write_all(&raw_connect_v311(1, "silent"))
        .await
        .unwrap();
    raw_connack(&mut stream).await;
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
        .await
        .expect("broker must close a connection silent for 1.5 x keep-alive");
    let elapsed = start.elapsed();
    match n {
        Ok(0) => {}
        Ok(n) => panic!(
            "expected the connection to be closed, got {n} bytes: {:?}",
            &buf[..n]
        ),
        Err(e) => eprintln!("closed with error {e}"),
    }
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed too early: {elapsed:?}"
    );
    assert!(
        elapsed <= Duration::from_secs(4),
        "closed too late: {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_pings_keep_the_connection_open() {
    let broker = Broker::start();
    let mut stream = TcpStream::connect(broker.addr).await.unwrap();
    stream
        .write_all(&raw_connect_v311(1, "pinger"))
        .await
        .unwrap();
    raw_connack(&mut stream).await;
    // 3 s of PINGREQ every 500 ms: twice the 1.5 s limit, never idle for more than 0.5 s.
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        stream.write_all(&[0xC0, 0x00]).await.unwrap();
        let mut resp = [0u8; 2];
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut resp))
            .await
            .expect("PINGRESP in time")
            .unwrap_or_else(|e| panic!("ping {i}: connection closed: {e}"));
        assert_eq!(resp, [0xD0, 0x00], "PINGRESP");
    }
}

/// 3.1.1 has no Receive Maximum: a client may have any number of QoS 2 PUBLISHes awaiting
/// PUBREL/PUBCOMP. rumqttc keeps up to 100 unacknowledged by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_unacknowledged_qos2_publishes_from_a_v311_client_are_accepted() {
    let broker = Broker::start();
    let mut sub = connect(opts(&broker, "burst-sub")).await;
    sub.subscribe("burst/t", QoS::ExactlyOnce).await;
    let mut o = opts(&broker, "burst-pub");
    o.set_inflight(100);
    let mut publ = connect(o).await;
    // Queue 100 publishes at once; the event loop sends them without waiting for PUBRECs.
    for i in 0..100 {
        publ.client
            .publish("burst/t", QoS::ExactlyOnce, false, format!("m{i}"))
            .await
            .unwrap();
    }
    for i in 0..100 {
        publ.events
            .expect(
                &format!("PUBCOMP #{i} (the broker closed the connection?)"),
                |e| match e {
                    Event::Incoming(Incoming::PubComp(_)) => Some(()),
                    _ => None,
                },
            )
            .await;
    }
    for i in 0..100 {
        assert_eq!(
            payload_str(&sub.next_publish().await.payload),
            format!("m{i}")
        );
    }
}

async fn read4(stream: &mut TcpStream) -> [u8; 4] {
    let mut b = [0u8; 4];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut b))
        .await
        .expect("reply in time")
        .expect("connection open");
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publish_resent_with_dup_before_pubrel_is_delivered_once() {
    let broker = Broker::start();
    let mut sub = connect(opts(&broker, "dupq2-sub")).await;
    sub.subscribe("dupq2/t", QoS::ExactlyOnce).await;

    let mut stream = TcpStream::connect(broker.addr).await.unwrap();
    stream
        .write_all(&raw_connect_v311(30, "dupq2-raw"))
        .await
        .unwrap();
    raw_connack(&mut stream).await;
    let publish = |byte1: u8| {
        let mut p = vec![byte1, 2 + 7 + 2 + 4];
        p.extend_from_slice(&[0, 7]);
        p.extend_from_slice(b"dupq2/t");
        p.extend_from_slice(&[0x00, 0x05]); // packet id 5
        p.extend_from_slice(b"once");
        p
    };
    stream.write_all(&publish(0x34)).await.unwrap(); // QoS 2
    assert_eq!(read4(&mut stream).await, [0x50, 0x02, 0x00, 0x05], "PUBREC");
    stream.write_all(&publish(0x3C)).await.unwrap(); // same, DUP=1
    assert_eq!(
        read4(&mut stream).await,
        [0x50, 0x02, 0x00, 0x05],
        "PUBREC for the resent PUBLISH"
    );
    stream.write_all(&[0x62, 0x02, 0x00, 0x05]).await.unwrap(); // PUBREL
    assert_eq!(
        read4(&mut stream).await,
        [0x70, 0x02, 0x00, 0x05],
        "PUBCOMP"
    );

    let mut publ = connect(opts(&broker, "dupq2-pub")).await;
    publ.publish("dupq2/t", QoS::ExactlyOnce, false, "MARK")
        .await;
    assert_eq!(payload_str(&sub.next_publish().await.payload), "once");
    assert_eq!(
        payload_str(&sub.next_publish().await.payload),
        "MARK",
        "a QoS 2 PUBLISH resent before PUBREL must not be delivered twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_delivered_at_min_of_retained_and_subscription_qos() {
    let broker = Broker::start();
    let mut publ = connect(opts(&broker, "retq-pub")).await;
    publ.publish("retq/t", QoS::ExactlyOnce, true, "r").await;
    let mut s1 = connect(opts(&broker, "retq-s1")).await;
    s1.subscribe("retq/t", QoS::AtLeastOnce).await;
    let m = s1.next_publish().await;
    assert_eq!((m.qos, m.retain), (QoS::AtLeastOnce, true));
    let mut s2 = connect(opts(&broker, "retq-s2")).await;
    s2.subscribe("retq/t", QoS::ExactlyOnce).await;
    let m = s2.next_publish().await;
    assert_eq!((m.qos, m.retain), (QoS::ExactlyOnce, true));
}
