//! MQTT 5.0 behaviour of the real `mqttd`, seen through rumqttc's v5 client (and, for packets
//! rumqttc will not send, through its packet codec over a raw socket).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::clients::payload_str;
use common::clients::raw5::{connect_packet, Raw};
use common::clients::v5::*;
use common::Broker;

fn topic(p: &Publish) -> String {
    payload_str(&p.topic)
}

fn filter(path: &str, qos: QoS) -> Filter {
    Filter::new(path, qos)
}

fn will(topic: &str, payload: &str, delay: Option<u32>) -> LastWill {
    let props = delay.map(|d| LastWillProperties {
        delay_interval: Some(d),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: vec![],
    });
    LastWill::new(
        topic,
        payload.as_bytes().to_vec(),
        QoS::AtLeastOnce,
        false,
        props,
    )
}

// ---------------------------------------------------------------------------------------------
// CONNACK
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_carries_assigned_client_id_and_limits() {
    let broker = Broker::start_with(&[
        "limits.receive_maximum=20",
        "limits.max_packet_size=5000",
        "limits.max_topic_alias=7",
    ]);
    let mut c = connect(opts(&broker, "")).await;
    assert_eq!(c.connack.code, ConnectReturnCode::Success);
    let props = c.connack.properties.clone().expect("CONNACK properties");
    let assigned = props
        .assigned_client_identifier
        .clone()
        .expect("an empty client id must be answered with an Assigned Client Identifier");
    assert!(!assigned.is_empty(), "assigned client identifier is empty");
    assert_eq!(props.receive_max, Some(20), "Receive Maximum");
    assert_eq!(props.max_packet_size, Some(5000), "Maximum Packet Size");
    assert_eq!(props.topic_alias_max, Some(7), "Topic Alias Maximum");
    // The connection is usable.
    c.subscribe("connack/t", QoS::AtLeastOnce).await;
    c.publish("connack/t", QoS::AtLeastOnce, false, "hi").await;
    assert_eq!(payload_str(&c.next_publish().await.payload), "hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_empty_client_ids_get_different_assigned_ids() {
    let broker = Broker::start();
    let a = connect(opts(&broker, "")).await;
    let b = connect(opts(&broker, "")).await;
    let id = |c: &Conn| {
        c.connack
            .properties
            .as_ref()
            .and_then(|p| p.assigned_client_identifier.clone())
    };
    assert!(id(&a).is_some() && id(&b).is_some());
    assert_ne!(id(&a), id(&b), "assigned client identifiers must be unique");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximum_qos_is_announced_and_caps_granted_qos() {
    let broker = Broker::start_with(&["mqtt.maximum_qos=1"]);
    let mut c = connect(opts(&broker, "maxqos")).await;
    let props = c.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(props.max_qos, Some(1), "CONNACK Maximum QoS");
    let ack = c.subscribe("maxqos/t", QoS::ExactlyOnce).await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
}

// ---------------------------------------------------------------------------------------------
// Reason codes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suback_reports_invalid_topic_filters_per_filter() {
    let broker = Broker::start();
    let (mut raw, connack) =
        Raw::connect(&broker, connect_packet("raw-suback", true, None, None)).await;
    assert!(
        matches!(connack, Packet::ConnAck(ref c) if c.code == ConnectReturnCode::Success),
        "{connack:?}"
    );
    let sub = Subscribe {
        pkid: 7,
        filters: vec![
            filter("ok/t", QoS::AtLeastOnce),
            filter("a/#/b", QoS::AtMostOnce),
            filter("bad+/x", QoS::AtMostOnce),
            filter("ok/+/x", QoS::ExactlyOnce),
        ],
        properties: None,
    };
    raw.send(&Packet::Subscribe(sub)).await;
    match raw.recv().await {
        Some(Packet::SubAck(ack)) => {
            assert_eq!(ack.pkid, 7);
            assert_eq!(
                ack.return_codes,
                vec![
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::TopicFilterInvalid,
                    SubscribeReasonCode::TopicFilterInvalid,
                    SubscribeReasonCode::Success(QoS::ExactlyOnce),
                ],
                "one reason code per filter, 0x8F for the malformed ones"
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_features_are_announced_and_refused_in_suback() {
    let broker = Broker::start_with(&[
        "mqtt.wildcard_subscriptions=false",
        "mqtt.shared_subscriptions=false",
    ]);
    let mut c = connect(opts(&broker, "nofeatures")).await;
    let props = c.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(props.wildcard_subscription_available, Some(0));
    assert_eq!(props.shared_subscription_available, Some(0));
    let ack = c.subscribe("nf/+", QoS::AtLeastOnce).await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::WildcardSubscriptionsNotSupported]
    );
    let ack = c.subscribe("$share/g/nf/t", QoS::AtLeastOnce).await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::SharedSubscriptionsNotSupported]
    );
    let ack = c.subscribe("nf/t", QoS::AtLeastOnce).await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
}

// ---------------------------------------------------------------------------------------------
// Topic aliases
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alias_from_client_is_resolved_by_broker() {
    let broker = Broker::start();
    let mut sub = connect(opts(&broker, "alias-in-sub")).await;
    sub.subscribe("alias/in", QoS::AtLeastOnce).await;
    let mut publ = connect(opts(&broker, "alias-in-pub")).await;
    let alias = |a| PublishProperties {
        topic_alias: Some(a),
        ..Default::default()
    };
    // Topic + alias: defines alias 1.
    publ.publish_props("alias/in", QoS::AtLeastOnce, false, "first", Some(alias(1)))
        .await;
    // Empty topic + alias 1.
    publ.publish_props("", QoS::AtLeastOnce, false, "second", Some(alias(1)))
        .await;
    publ.publish_props("", QoS::AtMostOnce, false, "third", Some(alias(1)))
        .await;
    for want in ["first", "second", "third"] {
        let m = sub.next_publish().await;
        assert_eq!(payload_str(&m.payload), want);
        assert_eq!(
            topic(&m),
            "alias/in",
            "the subscriber (which allows no aliases) must see the full topic"
        );
        assert_eq!(
            m.properties.as_ref().and_then(|p| p.topic_alias),
            None,
            "no alias towards a client with Topic Alias Maximum 0"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_uses_topic_alias_towards_client_that_allows_it() {
    let broker = Broker::start();
    let mut o = opts(&broker, "alias-out-sub");
    o.set_topic_alias_max(Some(5));
    let mut sub = connect(o).await;
    sub.subscribe("alias/out", QoS::AtLeastOnce).await;
    let mut publ = connect(opts(&broker, "alias-out-pub")).await;
    publ.publish("alias/out", QoS::AtLeastOnce, false, "one")
        .await;
    publ.publish("alias/out", QoS::AtLeastOnce, false, "two")
        .await;

    // These are the packets as they were on the wire (rumqttc resolves aliases after the event).
    let one = sub.next_publish().await;
    let two = sub.next_publish().await;
    assert_eq!(payload_str(&one.payload), "one");
    assert_eq!(payload_str(&two.payload), "two");
    assert_eq!(
        topic(&one),
        "alias/out",
        "first message establishes the alias with the full topic"
    );
    let a1 = one.properties.as_ref().and_then(|p| p.topic_alias);
    let a2 = two.properties.as_ref().and_then(|p| p.topic_alias);
    assert!(
        matches!(a1, Some(1..=5)),
        "first message should carry a topic alias in 1..=5, got {a1:?}"
    );
    assert_eq!(
        topic(&two),
        "",
        "second message on the same topic should use the alias only"
    );
    assert_eq!(a2, a1, "second message must reuse the alias of the first");
}

// ---------------------------------------------------------------------------------------------
// Message expiry and publish properties
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_expiry_drops_expired_offline_messages_and_counts_down_others() {
    let broker = Broker::start();
    let mut s = connect(persistent(&broker, "expiry-sub", 60)).await;
    s.subscribe("expiry/t", QoS::AtLeastOnce).await;
    s.disconnect().await;

    let mut publ = connect(opts(&broker, "expiry-pub")).await;
    let expiry = |secs| PublishProperties {
        message_expiry_interval: Some(secs),
        ..Default::default()
    };
    publ.publish_props(
        "expiry/t",
        QoS::AtLeastOnce,
        false,
        "short",
        Some(expiry(1)),
    )
    .await;
    publ.publish_props(
        "expiry/t",
        QoS::AtLeastOnce,
        false,
        "long",
        Some(expiry(60)),
    )
    .await;
    // Deliberate wait: the 1 s message must expire while the session is offline.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let mut s = connect(persistent(&broker, "expiry-sub", 60)).await;
    assert!(s.connack.session_present);
    let m = s.next_publish().await;
    assert_eq!(
        payload_str(&m.payload),
        "long",
        "the expired message must not be delivered"
    );
    let left = m
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert!(
        matches!(left, Some(55..=58)),
        "message expiry must be the original 60 minus ~2.5 s spent waiting, got {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_expiry_is_forwarded_to_online_subscriber() {
    let broker = Broker::start();
    let mut sub = connect(opts(&broker, "expiry-live-sub")).await;
    sub.subscribe("expiry/live", QoS::AtLeastOnce).await;
    let mut publ = connect(opts(&broker, "expiry-live-pub")).await;
    let props = PublishProperties {
        message_expiry_interval: Some(30),
        ..Default::default()
    };
    publ.publish_props("expiry/live", QoS::AtLeastOnce, false, "x", Some(props))
        .await;
    let m = sub.next_publish().await;
    let left = m
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert!(
        matches!(left, Some(1..=30)),
        "expiry interval forwarded and not increased, got {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_properties_pass_through_unchanged() {
    let broker = Broker::start();
    let mut sub = connect(opts(&broker, "props-sub")).await;
    sub.subscribe("props/t", QoS::AtLeastOnce).await;
    let mut publ = connect(opts(&broker, "props-pub")).await;
    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("text/plain; charset=utf-8".into()),
        response_topic: Some("props/reply".into()),
        correlation_data: Some(Bytes::from_static(&[0, 1, 2, 0xff])),
        user_properties: vec![
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
            ("a".into(), "3".into()),
        ],
        ..Default::default()
    };
    publ.publish_props(
        "props/t",
        QoS::AtLeastOnce,
        false,
        "héllo",
        Some(sent.clone()),
    )
    .await;
    let m = sub.next_publish().await;
    assert_eq!(payload_str(&m.payload), "héllo");
    let got = m.properties.clone().expect("properties must be forwarded");
    assert_eq!(
        got.payload_format_indicator, sent.payload_format_indicator,
        "payload format indicator"
    );
    assert_eq!(got.content_type, sent.content_type, "content type");
    assert_eq!(got.response_topic, sent.response_topic, "response topic");
    assert_eq!(
        got.correlation_data, sent.correlation_data,
        "correlation data"
    );
    assert_eq!(
        got.user_properties, sent.user_properties,
        "user properties, in order, duplicates kept"
    );
}

// ---------------------------------------------------------------------------------------------
// Subscription options
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_deliver_all_subscription_identifiers() {
    let broker = Broker::start();
    let mut sub = connect(opts(&broker, "subid-sub")).await;
    sub.subscribe_filter(filter("subid/+", QoS::AtLeastOnce), Some(1))
        .await;
    sub.subscribe_filter(filter("subid/#", QoS::AtLeastOnce), Some(2))
        .await;
    sub.subscribe("marker", QoS::AtLeastOnce).await;
    let mut publ = connect(opts(&broker, "subid-pub")).await;
    publ.publish("subid/x", QoS::AtLeastOnce, false, "both")
        .await;
    publ.publish("subid/x/y", QoS::AtLeastOnce, false, "only2")
        .await;
    publ.publish("marker", QoS::AtLeastOnce, false, "MARK")
        .await;

    let mut both = Vec::new();
    let mut only2 = Vec::new();
    loop {
        let m = sub.next_publish().await;
        let ids = m
            .properties
            .as_ref()
            .map(|p| p.subscription_identifiers.clone())
            .unwrap_or_default();
        match payload_str(&m.payload).as_str() {
            "both" => both.push(ids),
            "only2" => only2.push(ids),
            "MARK" => {
                assert!(
                    ids.is_empty(),
                    "no identifier for a subscription made without one, got {ids:?}"
                );
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    // The server may send one copy with both identifiers or one copy per subscription; with one
    // copy it MUST carry both identifiers [MQTT-3.3.4-4].
    match both.len() {
        1 => {
            let ids: BTreeSet<usize> = both[0].iter().copied().collect();
            assert_eq!(
                ids,
                BTreeSet::from([1, 2]),
                "single copy must carry both subscription identifiers"
            );
        }
        2 => {
            let ids: BTreeSet<Vec<usize>> = both.into_iter().collect();
            assert_eq!(
                ids,
                BTreeSet::from([vec![1], vec![2]]),
                "one copy per subscription, each with its id"
            );
        }
        n => panic!("message matching two subscriptions delivered {n} times: {both:?}"),
    }
    assert_eq!(
        only2,
        vec![vec![2]],
        "message matching only subid/# carries only identifier 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_suppresses_own_messages() {
    let broker = Broker::start();
    let mut c = connect(opts(&broker, "nolocal")).await;
    let mut f = filter("nolocal/t", QoS::AtLeastOnce);
    f.nolocal = true;
    c.subscribe_filter(f, None).await;
    c.subscribe("nolocal/marker", QoS::AtLeastOnce).await;

    let mut other = connect(opts(&broker, "nolocal-other")).await;
    other
        .publish("nolocal/t", QoS::AtLeastOnce, false, "from-other")
        .await;
    assert_eq!(
        payload_str(&c.next_publish().await.payload),
        "from-other",
        "others' messages still arrive"
    );

    c.publish("nolocal/t", QoS::AtLeastOnce, false, "own").await;
    c.publish("nolocal/marker", QoS::AtLeastOnce, false, "MARK")
        .await;
    assert_eq!(
        payload_str(&c.next_publish().await.payload),
        "MARK",
        "own message must not come back with No Local"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_as_published_controls_retain_flag_of_live_messages() {
    let broker = Broker::start();
    let mut keep = connect(opts(&broker, "rap-keep")).await;
    let mut f = filter("rap/t", QoS::AtLeastOnce);
    f.preserve_retain = true;
    keep.subscribe_filter(f, None).await;
    let mut clear = connect(opts(&broker, "rap-clear")).await;
    clear
        .subscribe_filter(filter("rap/t", QoS::AtLeastOnce), None)
        .await;

    let mut publ = connect(opts(&broker, "rap-pub")).await;
    publ.publish("rap/t", QoS::AtLeastOnce, true, "retained")
        .await;
    publ.publish("rap/t", QoS::AtLeastOnce, false, "plain")
        .await;

    let (k1, k2) = (keep.next_publish().await, keep.next_publish().await);
    assert_eq!(
        (payload_str(&k1.payload).as_str(), k1.retain),
        ("retained", true),
        "Retain As Published=1 keeps RETAIN"
    );
    assert_eq!(
        (payload_str(&k2.payload).as_str(), k2.retain),
        ("plain", false)
    );
    let (c1, c2) = (clear.next_publish().await, clear.next_publish().await);
    assert_eq!(
        (payload_str(&c1.payload).as_str(), c1.retain),
        ("retained", false),
        "Retain As Published=0 clears RETAIN"
    );
    assert_eq!(
        (payload_str(&c2.payload).as_str(), c2.retain),
        ("plain", false)
    );
}

async fn subscribe_rh(c: &mut Conn, path: &str, rule: RetainForwardRule) {
    let mut f = filter(path, QoS::AtLeastOnce);
    f.retain_forward_rule = rule;
    let ack = c.subscribe_filter(f, None).await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_handling_0_1_2() {
    let broker = Broker::start();
    let mut publ = connect(opts(&broker, "rh-pub")).await;
    publ.publish("rh/t", QoS::AtLeastOnce, true, "kept").await;

    // 0: retained messages on every subscribe.
    let mut c0 = connect(opts(&broker, "rh-0")).await;
    subscribe_rh(&mut c0, "rh/t", RetainForwardRule::OnEverySubscribe).await;
    let m = c0.next_publish().await;
    assert_eq!((payload_str(&m.payload).as_str(), m.retain), ("kept", true));
    subscribe_rh(&mut c0, "rh/t", RetainForwardRule::OnEverySubscribe).await;
    let m = c0.next_publish().await;
    assert_eq!(
        (payload_str(&m.payload).as_str(), m.retain),
        ("kept", true),
        "RH=0: sent again on re-subscribe"
    );

    // 1: only when the subscription is new.
    let mut c1 = connect(opts(&broker, "rh-1")).await;
    subscribe_rh(&mut c1, "rh/t", RetainForwardRule::OnNewSubscribe).await;
    let m = c1.next_publish().await;
    assert_eq!(
        (payload_str(&m.payload).as_str(), m.retain),
        ("kept", true),
        "RH=1: sent for a new subscription"
    );
    subscribe_rh(&mut c1, "rh/t", RetainForwardRule::OnNewSubscribe).await;

    // 2: never.
    let mut c2 = connect(opts(&broker, "rh-2")).await;
    subscribe_rh(&mut c2, "rh/t", RetainForwardRule::Never).await;

    publ.publish("rh/t", QoS::AtLeastOnce, false, "MARK").await;
    assert_eq!(payload_str(&c0.next_publish().await.payload), "MARK");
    assert_eq!(
        payload_str(&c1.next_publish().await.payload),
        "MARK",
        "RH=1: not sent again for an existing subscription"
    );
    assert_eq!(
        payload_str(&c2.next_publish().await.payload),
        "MARK",
        "RH=2: retained message must not be sent"
    );
}

// ---------------------------------------------------------------------------------------------
// Flow control towards the client
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximum_packet_size_of_client_is_respected() {
    let broker = Broker::start();
    let mut o = opts(&broker, "mps-sub");
    o.set_max_packet_size(Some(256));
    let mut sub = connect(o).await;
    sub.subscribe("mps/t", QoS::AtLeastOnce).await;
    let mut publ = connect(opts(&broker, "mps-pub")).await;
    publ.publish("mps/t", QoS::AtLeastOnce, false, vec![b'x'; 1000])
        .await;
    publ.publish("mps/t", QoS::AtLeastOnce, false, "small")
        .await;
    let m = sub.next_publish().await;
    assert_eq!(
        payload_str(&m.payload),
        "small",
        "a message larger than the client's Maximum Packet Size must be dropped, the next one delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_of_client_limits_unacknowledged_publishes() {
    let broker = Broker::start();
    let mut o = opts(&broker, "rm-sub");
    o.set_receive_maximum(Some(2));
    o.set_manual_acks(true);
    let mut sub = connect(o).await;
    sub.subscribe("rm/t", QoS::AtLeastOnce).await;
    sub.subscribe("rm/marker", QoS::AtMostOnce).await;
    let mut publ = connect(opts(&broker, "rm-pub")).await;
    for i in 0..5 {
        publ.publish("rm/t", QoS::AtLeastOnce, false, format!("m{i}"))
            .await;
    }
    publ.publish("rm/marker", QoS::AtMostOnce, false, "MARK")
        .await;

    let m0 = sub.next_publish().await;
    let m1 = sub.next_publish().await;
    assert_eq!(payload_str(&m0.payload), "m0");
    assert_eq!(payload_str(&m1.payload), "m1");
    // Nothing but the QoS 0 marker may come now. The broker may hold the QoS 0 marker back
    // behind the queue, so a bounded silence is accepted too.
    let mut marker_seen = false;
    if let Some(p) = sub.next_publish_within(Duration::from_secs(2)).await {
        assert_eq!(
            payload_str(&p.payload),
            "MARK",
            "a third QoS 1 PUBLISH beyond Receive Maximum 2"
        );
        marker_seen = true;
    }
    sub.client.ack(&m0).await.unwrap();
    let mut next = sub.next_publish().await;
    if !marker_seen && payload_str(&next.payload) == "MARK" {
        marker_seen = true;
        next = sub.next_publish().await;
    }
    assert_eq!(payload_str(&next.payload), "m2", "one ack frees one slot");
    sub.client.ack(&m1).await.unwrap();
    sub.client.ack(&next).await.unwrap();
    for i in 3..5 {
        let mut m = sub.next_publish().await;
        if !marker_seen && payload_str(&m.payload) == "MARK" {
            marker_seen = true;
            m = sub.next_publish().await;
        }
        assert_eq!(payload_str(&m.payload), format!("m{i}"));
        sub.client.ack(&m).await.unwrap();
    }
    if !marker_seen {
        assert_eq!(payload_str(&sub.next_publish().await.payload), "MARK");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_splits_messages_between_members() {
    let broker = Broker::start();
    let mut members = Vec::new();
    for i in 0..2 {
        let mut m = connect(opts(&broker, &format!("share-{i}"))).await;
        m.subscribe("$share/g/share/t", QoS::AtLeastOnce).await;
        m.subscribe("share/marker", QoS::AtLeastOnce).await;
        members.push(m);
    }
    let mut publ = connect(opts(&broker, "share-pub")).await;
    for i in 0..10 {
        publ.publish("share/t", QoS::AtLeastOnce, false, format!("m{i}"))
            .await;
    }
    publ.publish("share/marker", QoS::AtLeastOnce, false, "MARK")
        .await;

    let mut all = Vec::new();
    let mut counts = Vec::new();
    for m in members.iter_mut() {
        let mut n = 0;
        loop {
            let p = m.next_publish().await;
            let payload = payload_str(&p.payload);
            if payload == "MARK" {
                break;
            }
            assert_eq!(
                topic(&p),
                "share/t",
                "shared subscription delivers the real topic"
            );
            all.push(payload);
            n += 1;
        }
        counts.push(n);
    }
    all.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    want.sort();
    assert_eq!(
        all, want,
        "each message to exactly one member (per-member counts {counts:?})"
    );
    assert!(
        counts.iter().all(|&n| n > 0),
        "both members should get some messages, got {counts:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Sessions, wills, disconnects
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_zero_ends_session_at_disconnect() {
    let broker = Broker::start();
    let mut c = connect(persistent(&broker, "sexp-0", 0)).await;
    assert!(!c.connack.session_present);
    c.subscribe("sexp0/t", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let mut c = connect(persistent(&broker, "sexp-0", 0)).await;
    assert!(
        !c.connack.session_present,
        "session with expiry 0 must not outlive its connection"
    );
    // And its subscription is gone.
    c.subscribe("sexp0/marker", QoS::AtLeastOnce).await;
    let mut publ = connect(opts(&broker, "sexp-0-pub")).await;
    publ.publish("sexp0/t", QoS::AtLeastOnce, false, "old-sub")
        .await;
    publ.publish("sexp0/marker", QoS::AtLeastOnce, false, "MARK")
        .await;
    assert_eq!(payload_str(&c.next_publish().await.payload), "MARK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_60_keeps_session_across_disconnect() {
    let broker = Broker::start();
    let mut c = connect(persistent(&broker, "sexp-60", 60)).await;
    c.subscribe("sexp60/t", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let mut publ = connect(opts(&broker, "sexp-60-pub")).await;
    publ.publish("sexp60/t", QoS::AtLeastOnce, false, "queued")
        .await;
    let mut c = connect(persistent(&broker, "sexp-60", 60)).await;
    assert!(
        c.connack.session_present,
        "session with expiry 60 must be resumed"
    );
    assert_eq!(payload_str(&c.next_publish().await.payload), "queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_start_discards_existing_session() {
    let broker = Broker::start();
    let mut c = connect(persistent(&broker, "cleanstart", 60)).await;
    c.subscribe("cleanstart/t", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let mut o = opts(&broker, "cleanstart");
    o.set_session_expiry_interval(Some(60));
    let c = connect(o).await; // clean_start = true
    assert!(
        !c.connack.session_present,
        "clean start must discard the stored session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_delay_not_sent_when_client_reconnects_in_time() {
    let broker = Broker::start();
    let mut watcher = connect(opts(&broker, "wd-watcher")).await;
    watcher.subscribe("wd/#", QoS::AtLeastOnce).await;
    let mut o = persistent(&broker, "wd-back", 60);
    o.set_last_will(will("wd/back", "gone", Some(2)));
    let c = connect(o).await;
    c.kill().await;
    let back = connect(persistent(&broker, "wd-back", 60)).await;
    assert!(back.connack.session_present);
    // Deliberate wait past the 2 s will delay: the will must not come.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let mut publ = connect(opts(&broker, "wd-pub")).await;
    publ.publish("wd/marker", QoS::AtLeastOnce, false, "MARK")
        .await;
    let m = watcher.next_publish().await;
    assert_eq!(
        (topic(&m).as_str(), payload_str(&m.payload).as_str()),
        ("wd/marker", "MARK"),
        "reconnecting within the Will Delay Interval must cancel the will"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_delay_sent_after_the_delay() {
    let broker = Broker::start();
    let mut watcher = connect(opts(&broker, "wd2-watcher")).await;
    watcher.subscribe("wd2/#", QoS::AtLeastOnce).await;
    let mut o = persistent(&broker, "wd2-gone", 60);
    o.set_last_will(will("wd2/gone", "gone", Some(2)));
    let c = connect(o).await;
    c.kill().await;
    let killed = Instant::now();
    let m = watcher.next_publish().await;
    let after = killed.elapsed();
    assert_eq!(
        (topic(&m).as_str(), payload_str(&m.payload).as_str()),
        ("wd2/gone", "gone")
    );
    assert!(
        after >= Duration::from_millis(1800),
        "will sent after {after:?}, before its 2 s delay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_sent_when_session_ends_before_will_delay() {
    // Session expiry 1 s < will delay 30 s: the will goes out when the session ends.
    let broker = Broker::start();
    let mut watcher = connect(opts(&broker, "wd3-watcher")).await;
    watcher.subscribe("wd3/#", QoS::AtLeastOnce).await;
    let mut o = persistent(&broker, "wd3-gone", 1);
    o.set_last_will(will("wd3/gone", "gone", Some(30)));
    let c = connect(o).await;
    c.kill().await;
    let m = watcher.next_publish().await;
    assert_eq!(
        (topic(&m).as_str(), payload_str(&m.payload).as_str()),
        ("wd3/gone", "gone")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_with_will_message_sends_the_will() {
    let broker = Broker::start();
    let mut watcher = connect(opts(&broker, "dw-watcher")).await;
    watcher.subscribe("dw/#", QoS::AtLeastOnce).await;
    let (mut raw, connack) = Raw::connect(
        &broker,
        connect_packet("dw-raw", true, None, Some(will("dw/raw", "bye", None))),
    )
    .await;
    assert!(
        matches!(connack, Packet::ConnAck(ref c) if c.code == ConnectReturnCode::Success),
        "{connack:?}"
    );
    // DISCONNECT, reason 0x04, property length 0 (rumqttc's encoder would omit the property
    // length, a form tested separately below).
    raw.send_bytes(&[0xE0, 0x02, 0x04, 0x00]).await;
    let m = watcher.next_publish().await;
    assert_eq!(
        (topic(&m).as_str(), payload_str(&m.payload).as_str()),
        ("dw/raw", "bye"),
        "DISCONNECT 0x04 must publish the will"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_disconnect_discards_the_will() {
    let broker = Broker::start();
    let mut watcher = connect(opts(&broker, "nd-watcher")).await;
    watcher.subscribe("nd/#", QoS::AtLeastOnce).await;
    let (mut raw, _) = Raw::connect(
        &broker,
        connect_packet("nd-raw", true, None, Some(will("nd/raw", "bye", None))),
    )
    .await;
    raw.send(&Packet::Disconnect(Disconnect::new(
        DisconnectReasonCode::NormalDisconnection,
    )))
    .await;
    // The broker must close the connection after DISCONNECT.
    assert_eq!(
        raw.recv().await,
        None,
        "broker should close the connection after DISCONNECT"
    );
    let mut publ = connect(opts(&broker, "nd-pub")).await;
    publ.publish("nd/marker", QoS::AtLeastOnce, false, "MARK")
        .await;
    assert_eq!(
        payload_str(&watcher.next_publish().await.payload),
        "MARK",
        "no will after DISCONNECT 0x00"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_with_reason_code_but_no_property_length_is_valid() {
    // [MQTT-3.14.2.2.1]: "If the Remaining Length is less than 2, a value of 0 is used" for the
    // property length, so E0 01 00 is a well-formed normal DISCONNECT: the will is discarded.
    let broker = Broker::start();
    let mut watcher = connect(opts(&broker, "dr-watcher")).await;
    watcher.subscribe("dr/#", QoS::AtLeastOnce).await;
    let (mut raw, _) = Raw::connect(
        &broker,
        connect_packet("dr-raw", true, None, Some(will("dr/raw", "bye", None))),
    )
    .await;
    raw.send_bytes(&[0xE0, 0x01, 0x00]).await;
    assert_eq!(
        raw.recv().await,
        None,
        "broker should just close the connection after a valid DISCONNECT"
    );
    let mut publ = connect(opts(&broker, "dr-pub")).await;
    publ.publish("dr/marker", QoS::AtLeastOnce, false, "MARK")
        .await;
    let m = watcher.next_publish().await;
    assert_eq!(
        (topic(&m).as_str(), payload_str(&m.payload).as_str()),
        ("dr/marker", "MARK"),
        "DISCONNECT E0 01 00 (reason 0x00, no property length) was treated as malformed: the will was published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_takeover_sends_disconnect_0x8e_to_the_old_connection() {
    let broker = Broker::start();
    let mut first = connect(opts(&broker, "v5-takeover")).await;
    let second = connect(opts(&broker, "v5-takeover")).await;
    assert_eq!(second.connack.code, ConnectReturnCode::Success);
    match first.events.expect_closed().await {
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => {
            eprintln!("takeover reason string: {reason_string:?}");
            assert_eq!(
                reason_code,
                DisconnectReasonCode::SessionTakenOver,
                "DISCONNECT reason code"
            );
        }
        other => {
            panic!("expected DISCONNECT 0x8E (Session taken over), connection ended with {other:?}")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_exactly_once_v5() {
    let broker = Broker::start();
    let mut sub = connect(opts(&broker, "v5-qos2-sub")).await;
    sub.subscribe("v5q2/t", QoS::ExactlyOnce).await;
    sub.subscribe("v5q2/marker", QoS::ExactlyOnce).await;
    let mut publ = connect(opts(&broker, "v5-qos2-pub")).await;
    publ.publish("v5q2/t", QoS::ExactlyOnce, false, "once")
        .await;
    publ.publish("v5q2/marker", QoS::ExactlyOnce, false, "MARK")
        .await;
    let m = sub.next_publish().await;
    assert_eq!(
        (payload_str(&m.payload).as_str(), m.qos),
        ("once", QoS::ExactlyOnce)
    );
    assert_eq!(payload_str(&sub.next_publish().await.payload), "MARK");
}

// ---------------------------------------------------------------------------------------------
// More limits, protocol errors and corner cases
// ---------------------------------------------------------------------------------------------

fn is_connack_success(p: &Packet) -> bool {
    matches!(p, Packet::ConnAck(c) if c.code == ConnectReturnCode::Success)
}

/// Expects a DISCONNECT with `reason` from the broker, then the connection closed.
async fn expect_disconnect(raw: &mut Raw, reason: DisconnectReasonCode) {
    match raw.recv().await {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, reason, "DISCONNECT reason code ({d:?})")
        }
        other => panic!("expected DISCONNECT {reason:?}, got {other:?}"),
    }
    assert_eq!(
        raw.recv().await,
        None,
        "connection must be closed after the DISCONNECT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alias_above_maximum_gets_disconnect_0x94() {
    let broker = Broker::start_with(&["limits.max_topic_alias=4"]);
    let (mut raw, connack) =
        Raw::connect(&broker, connect_packet("alias-bad", true, None, None)).await;
    assert!(is_connack_success(&connack), "{connack:?}");
    let props = PublishProperties {
        topic_alias: Some(5),
        ..Default::default()
    };
    raw.send(&Packet::Publish(Publish::new(
        "alias/bad",
        QoS::AtMostOnce,
        "x",
        Some(props),
    )))
    .await;
    expect_disconnect(&mut raw, DisconnectReasonCode::TopicAliasInvalid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_topic_with_unknown_alias_is_a_protocol_error() {
    let broker = Broker::start();
    let (mut raw, connack) =
        Raw::connect(&broker, connect_packet("alias-unknown", true, None, None)).await;
    assert!(is_connack_success(&connack), "{connack:?}");
    let props = PublishProperties {
        topic_alias: Some(3),
        ..Default::default()
    };
    raw.send(&Packet::Publish(Publish::new(
        "",
        QoS::AtMostOnce,
        "x",
        Some(props),
    )))
    .await;
    expect_disconnect(&mut raw, DisconnectReasonCode::ProtocolError).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_larger_than_broker_maximum_gets_disconnect_0x95() {
    let broker = Broker::start_with(&["limits.max_packet_size=200"]);
    let (mut raw, connack) =
        Raw::connect(&broker, connect_packet("too-big", true, None, None)).await;
    assert!(is_connack_success(&connack), "{connack:?}");
    raw.send(&Packet::Publish(Publish::new(
        "big/t",
        QoS::AtMostOnce,
        vec![b'x'; 500],
        None,
    )))
    .await;
    expect_disconnect(&mut raw, DisconnectReasonCode::PacketTooLarge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keep_alive_and_session_expiry_cap_are_announced() {
    let broker = Broker::start_with(&[
        "mqtt.server_keep_alive=5",
        "limits.max_session_expiry_secs=10",
    ]);
    let c = connect(persistent(&broker, "announce", 60)).await;
    let props = c.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(props.server_keep_alive, Some(5), "Server Keep Alive");
    assert_eq!(
        props.session_expiry_interval,
        Some(10),
        "the capped Session Expiry Interval must be announced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_in_short_forms_are_accepted() {
    // PUBACK/PUBREC/PUBCOMP may end after the reason code (no property length) [MQTT-3.4.2.2].
    let broker = Broker::start();
    let (mut raw, connack) =
        Raw::connect(&broker, connect_packet("short-acks", true, None, None)).await;
    assert!(is_connack_success(&connack), "{connack:?}");
    let sub = Subscribe {
        pkid: 1,
        filters: vec![
            filter("sa/q1", QoS::AtLeastOnce),
            filter("sa/q2", QoS::ExactlyOnce),
        ],
        properties: None,
    };
    raw.send(&Packet::Subscribe(sub)).await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    let mut publ = connect(opts(&broker, "short-acks-pub")).await;
    publ.publish("sa/q1", QoS::AtLeastOnce, false, "one").await;
    let pk = match raw.recv().await {
        Some(Packet::Publish(p)) => p.pkid,
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    raw.send_bytes(&[0x40, 0x03, (pk >> 8) as u8, pk as u8, 0x00])
        .await; // PUBACK, reason only
    publ.publish("sa/q2", QoS::ExactlyOnce, false, "two").await;
    let pk = match raw.recv().await {
        Some(Packet::Publish(p)) => p.pkid,
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    raw.send_bytes(&[0x50, 0x03, (pk >> 8) as u8, pk as u8, 0x00])
        .await; // PUBREC, reason only
    match raw.recv().await {
        Some(Packet::PubRel(r)) => assert_eq!(r.pkid, pk),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    raw.send_bytes(&[0x70, 0x02, (pk >> 8) as u8, pk as u8])
        .await; // PUBCOMP, packet id only
    publ.publish("sa/q1", QoS::AtLeastOnce, false, "MARK").await;
    match raw.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(payload_str(&p.payload), "MARK", "nothing resent, no error")
        }
        other => panic!("expected the marker PUBLISH, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_gets_no_retained_messages() {
    let broker = Broker::start();
    let mut publ = connect(opts(&broker, "shret-pub")).await;
    publ.publish("shret/t", QoS::AtLeastOnce, true, "retained")
        .await;
    let mut m = connect(opts(&broker, "shret-member")).await;
    m.subscribe("$share/g/shret/t", QoS::AtLeastOnce).await;
    publ.publish("shret/t", QoS::AtLeastOnce, false, "MARK")
        .await;
    let first = m.next_publish().await;
    assert_eq!(
        payload_str(&first.payload),
        "MARK",
        "[MQTT-3.8.4] retained messages are not sent for a new shared subscription"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_properties_are_forwarded() {
    let broker = Broker::start();
    let mut watcher = connect(opts(&broker, "wp-watcher")).await;
    watcher.subscribe("wp/#", QoS::AtLeastOnce).await;
    let mut o = opts(&broker, "wp-dying");
    o.set_last_will(LastWill::new(
        "wp/dying",
        b"gone".to_vec(),
        QoS::AtLeastOnce,
        false,
        Some(LastWillProperties {
            delay_interval: None,
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(100),
            content_type: Some("text/plain".into()),
            response_topic: Some("wp/reply".into()),
            correlation_data: Some(Bytes::from_static(b"corr")),
            user_properties: vec![("k".into(), "v".into())],
        }),
    ));
    connect(o).await.kill().await;
    let m = watcher.next_publish().await;
    assert_eq!(payload_str(&m.payload), "gone");
    let p = m
        .properties
        .clone()
        .expect("will properties must be forwarded");
    assert_eq!(p.payload_format_indicator, Some(1));
    assert!(
        matches!(p.message_expiry_interval, Some(1..=100)),
        "{:?}",
        p.message_expiry_interval
    );
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert_eq!(p.response_topic.as_deref(), Some("wp/reply"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"corr"[..]));
    assert_eq!(p.user_properties, vec![("k".to_string(), "v".to_string())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_expires() {
    let broker = Broker::start();
    let mut publ = connect(opts(&broker, "retexp-pub")).await;
    let expiry = |secs| PublishProperties {
        message_expiry_interval: Some(secs),
        ..Default::default()
    };
    publ.publish_props(
        "retexp/short",
        QoS::AtLeastOnce,
        true,
        "short",
        Some(expiry(1)),
    )
    .await;
    publ.publish_props(
        "retexp/long",
        QoS::AtLeastOnce,
        true,
        "long",
        Some(expiry(60)),
    )
    .await;
    // Deliberate wait: the 1 s retained message must expire.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut sub = connect(opts(&broker, "retexp-sub")).await;
    sub.subscribe("retexp/#", QoS::AtLeastOnce).await;
    publ.publish("retexp/marker", QoS::AtLeastOnce, false, "MARK")
        .await;
    let first = sub.next_publish().await;
    assert_eq!(
        payload_str(&first.payload),
        "long",
        "expired retained message must not be sent"
    );
    let left = first
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert!(
        matches!(left, Some(55..=58)),
        "retained expiry must count down, got {left:?}"
    );
    assert_eq!(payload_str(&sub.next_publish().await.payload), "MARK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_qos1_message_is_redelivered_with_dup_on_session_resume_v5() {
    let broker = Broker::start();
    let mut o = persistent(&broker, "v5-redeliver", 60);
    o.set_manual_acks(true);
    let mut s = connect(o.clone()).await;
    s.subscribe("v5redeliver/t", QoS::AtLeastOnce).await;
    let mut publ = connect(opts(&broker, "v5-redeliver-pub")).await;
    publ.publish("v5redeliver/t", QoS::AtLeastOnce, false, "once")
        .await;
    let m = s.next_publish().await;
    assert!(!m.dup);
    s.kill().await;
    let mut s = connect(o).await;
    assert!(s.connack.session_present);
    let again = s.next_publish().await;
    assert_eq!(payload_str(&again.payload), "once");
    assert!(again.dup, "a resent PUBLISH must have DUP=1");
    assert_eq!(again.pkid, m.pkid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_publishes_the_will_of_the_old_connection() {
    // The old connection is closed by the server without a DISCONNECT from its client, and its
    // will has no delay: the will is published [MQTT-3.1.2-8].
    let broker = Broker::start();
    let mut watcher = connect(opts(&broker, "tw-watcher")).await;
    watcher.subscribe("tw/#", QoS::AtLeastOnce).await;
    let mut o = opts(&broker, "tw-client");
    o.set_last_will(will("tw/client", "taken", None));
    let _first = connect(o).await;
    let _second = connect(opts(&broker, "tw-client")).await;
    let m = watcher.next_publish().await;
    assert_eq!(
        (topic(&m).as_str(), payload_str(&m.payload).as_str()),
        ("tw/client", "taken")
    );
}
