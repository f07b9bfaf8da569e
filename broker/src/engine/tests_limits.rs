//! Engine tests of the limits: the accountant's exact figures, the budget policy,
//! connection limits, the memory watermark and the rate limits. No sockets, no clocks.

use std::mem::size_of;
use std::net::IpAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::accounting::{message_bytes, Footprint};
use super::session::{Inflight, Queued, Session};
use super::tests::{puback, publish_payload, publishes, Harness};
use super::{Conn, ConnKey};
use crate::config::{Config, RateLimitAction};
use crate::protocol::{DisconnectReasonCode, Packet, Publish, QoS};
use rumqttc::v5::mqttbytes::v5 as wire;
use topic_trie::SubscriptionOptions;

const SLAB_SLOT: usize = size_of::<usize>();

fn harness(config: Config) -> Harness {
    // The engine's rate-limit clock starts at its creation, as does the harness's.
    Harness::with_config(config)
}

/// Sends CONNECT on an already accepted connection; returns what came back.
fn connect_raw(h: &mut Harness, key: ConnKey, id: &str) -> Vec<Packet> {
    let connect = wire::Connect {
        keep_alive: 0,
        client_id: id.into(),
        clean_start: true,
        properties: None,
    };
    h.send(key, Packet::Connect(connect, None, None));
    h.received(key)
}

fn connack_code(packets: &[Packet]) -> wire::ConnectReturnCode {
    match packets {
        [Packet::ConnAck(ack)] => ack.code,
        other => panic!("expected one CONNACK, got {other:?}"),
    }
}

fn session_of(h: &Harness, key: ConnKey) -> &Session {
    let skey = h.engine.conns[key].session.expect("attached");
    &h.engine.sessions[skey]
}

#[test]
fn footprint_moves_exactly_with_subscribe_queue_and_drain() {
    let mut config = Config::default();
    config.limits.max_inflight = 1;
    let mut h = harness(config);
    let sub = h.connect("s", false, 60, None);

    // Connected and idle: the structs themselves, nothing else.
    let base = h.engine.footprint(sub).unwrap();
    assert_eq!(
        base,
        Footprint {
            connection: size_of::<Conn>() + SLAB_SLOT,
            buffers: 0,
            aliases: 0,
            session: size_of::<Session>()
                + SLAB_SLOT
                + "s".len()
                + size_of::<(Box<str>, usize)>()
                + 1,
            subscriptions: 0,
            messages: 0,
        }
    );

    h.subscribe(sub, "a/b", QoS::AtLeastOnce);
    let fp = h.engine.footprint(sub).unwrap();
    let map_slots = session_of(&h, sub).subscriptions.capacity();
    let expected_subs = map_slots * (size_of::<(Box<str>, SubscriptionOptions)>() + 1)
        + 2 * "a/b".len()
        + size_of::<(usize, SubscriptionOptions)>();
    assert_eq!(fp.subscriptions, expected_subs);
    assert_eq!(fp.total() - base.total(), expected_subs);

    // Three 10-byte messages with a window of one: one inflight, two queued.
    let publisher = h.connect("p", true, 0, None);
    for pkid in 1..=3 {
        publish_payload(&mut h, publisher, "a/b", QoS::AtLeastOnce, pkid, 10);
    }
    let session = session_of(&h, sub);
    assert_eq!((session.inflight.len(), session.queue.len()), (1, 2));
    let one_message = message_bytes(&session.queue[0].msg);
    assert_eq!(
        one_message,
        size_of::<super::Message>() + 2 * size_of::<usize>() + "a/b".len() + 10
    );
    let expected_messages = session.inflight.capacity() * size_of::<Inflight>()
        + session.queue.capacity() * size_of::<Queued>()
        + 3 * one_message;
    assert_eq!(
        session.held_bytes(),
        size_of::<Inflight>() + 2 * size_of::<Queued>() + 3 * one_message
    );
    let fp = h.engine.footprint(sub).unwrap();
    assert_eq!(fp.messages, expected_messages);
    // The PUBLISH sent is waiting in the output buffer.
    assert!(fp.buffers > 0);

    // The client reads and acknowledges everything: messages and buffers go.
    for _ in 0..3 {
        let got = h.received(sub);
        let pkid = publishes(&got)[0].pkid;
        puback(&mut h, sub, pkid);
    }
    h.received(sub);
    assert_eq!(session_of(&h, sub).held_bytes(), 0);
    let fp = h.engine.footprint(sub).unwrap();
    assert_eq!(fp.buffers, 0);
    // The deques keep their capacity until the next tick finds them idle.
    h.advance(1);
    let fp = h.engine.footprint(sub).unwrap();
    assert_eq!(fp.messages, 0);
    assert_eq!(fp.total(), base.total() + expected_subs);

    let report = h.engine.memory_report();
    assert_eq!(report.connections, 2);
    assert_eq!(
        report.connection_bytes,
        fp.total() + h.engine.footprint(publisher).unwrap().total()
    );
    assert_eq!(report.histogram.count(), 2);
    assert_eq!(report.histogram.sum, report.connection_bytes as u64);
}

#[test]
fn offline_sessions_are_in_the_worker_total() {
    let mut h = harness(Config::default());
    let sub = h.connect("s", false, 60, None);
    h.subscribe(sub, "t", QoS::AtLeastOnce);
    let footprint = h.engine.footprint(sub).unwrap();
    h.engine.connection_lost(sub, h.now);
    let report = h.engine.memory_report();
    assert_eq!((report.connections, report.offline_sessions), (0, 1));
    let connection_part = footprint.connection + footprint.buffers + footprint.aliases;
    assert_eq!(report.total(), footprint.total() - connection_part);
}

#[test]
fn qos0_to_a_backlogged_client_over_budget_is_dropped() {
    let mut config = Config::default();
    config.limits.connection_memory_budget = 4096;
    let mut h = harness(config);
    let sub = h.connect("s", true, 0, None);
    h.subscribe(sub, "t", QoS::AtMostOnce);
    let publisher = h.connect("p", true, 0, None);
    // Within one batch the output may grow past the budget: the client has not been
    // offered it yet, so nothing is dropped.
    for _ in 0..20 {
        publish_payload(&mut h, publisher, "t", QoS::AtMostOnce, 0, 500);
    }
    assert_eq!(h.engine.stats.dropped_over_budget, 0);
    // The socket took nothing: the client is not draining.
    h.engine.output_flushed(sub, 0);
    let held = h.engine.output(sub).unwrap().len();
    for _ in 0..20 {
        publish_payload(&mut h, publisher, "t", QoS::AtMostOnce, 0, 500);
    }
    assert_eq!(h.engine.stats.dropped_over_budget, 20);
    assert_eq!(h.engine.output(sub).unwrap().len(), held);
    // Once it drains, messages flow again.
    assert_eq!(publishes(&h.received(sub)).len(), 20);
    publish_payload(&mut h, publisher, "t", QoS::AtMostOnce, 0, 500);
    assert_eq!(publishes(&h.received(sub)).len(), 1);
}

#[test]
fn slow_qos1_consumer_is_disconnected_and_its_messages_wait_in_the_session() {
    let mut config = Config::default();
    config.limits.connection_memory_budget = 2048;
    config.limits.max_inflight = 2;
    let mut h = harness(config);
    let sub = h.connect("slow", false, 60, None);
    h.subscribe(sub, "t", QoS::AtLeastOnce);
    let publisher = h.connect("p", true, 0, None);
    let sent: u16 = 20;
    for pkid in 1..=sent {
        publish_payload(&mut h, publisher, "t", QoS::AtLeastOnce, pkid, 200);
    }
    // Over its budget (two inflight, the rest queued). The first tick sees it took its
    // two messages (progress); the next finds it over budget with no progress, a grace
    // period for a burst; the third, still none: it is cut off.
    assert!(session_of(&h, sub).held_bytes() > 2048);
    h.advance(1);
    assert!(!h.engine.is_closing(sub));
    h.advance(1);
    assert!(!h.engine.is_closing(sub));
    h.advance(1);
    assert!(h.engine.is_closing(sub));
    assert_eq!(h.engine.stats.slow_consumer_disconnects, 1);
    let got = h.received(sub);
    match got.last() {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, DisconnectReasonCode::QuotaExceeded)
        }
        other => panic!("expected DISCONNECT 0x97 last, got {other:?}"),
    }
    // The publisher's messages were all acknowledged, and none is lost: what the client
    // did not get waits in its session for the next connection.
    assert_eq!(h.received(publisher).len(), usize::from(sent));
    h.engine.connection_lost(sub, h.now);
    publish_payload(&mut h, publisher, "t", QoS::AtLeastOnce, sent + 1, 200);
    let back = h.engine.accept(h.driver, h.now, None);
    let mut props = wire::ConnectProperties::new();
    props.session_expiry_interval = Some(60);
    let connect = wire::Connect {
        keep_alive: 0,
        client_id: "slow".into(),
        clean_start: false,
        properties: Some(props),
    };
    h.send(back, Packet::Connect(connect, None, None));
    let mut delivered = 0;
    loop {
        let got = h.received(back);
        let ids: Vec<u16> = publishes(&got).iter().map(|p| p.pkid).collect();
        if ids.is_empty() {
            break;
        }
        for pkid in ids {
            delivered += 1;
            puback(&mut h, back, pkid);
        }
    }
    assert_eq!(delivered, usize::from(sent) + 1);

    // A client that drains its backlog within a tick is not cut off.
    let burst = h.connect("burst", true, 0, None);
    h.subscribe(burst, "b", QoS::AtLeastOnce);
    for pkid in 1..=20 {
        publish_payload(&mut h, publisher, "b", QoS::AtLeastOnce, pkid, 200);
    }
    h.advance(1);
    for _ in 0..10 {
        let got = h.received(burst);
        for p in publishes(&got).iter().map(|p| p.pkid).collect::<Vec<_>>() {
            puback(&mut h, burst, p);
        }
    }
    h.advance(1);
    assert!(!h.engine.is_closing(burst));
    assert_eq!(h.engine.stats.slow_consumer_disconnects, 1);
}

#[test]
fn connection_limit_refuses_with_quota_exceeded_and_frees_on_close() {
    let mut config = Config::default();
    config.limits.max_connections_per_worker = 2;
    let mut h = harness(config);
    let a = h.connect("a", true, 0, None);
    let _b = h.connect("b", true, 0, None);
    let c = h.engine.accept(h.driver, h.now, None);
    assert_eq!(
        connack_code(&connect_raw(&mut h, c, "c")),
        wire::ConnectReturnCode::QuotaExceeded
    );
    assert!(h.engine.is_closing(c));
    assert_eq!(h.engine.session_count(), 2);
    assert_eq!(h.engine.stats.connections_refused, 1);
    h.engine.connection_lost(c, h.now);
    h.engine.connection_lost(a, h.now);
    let _d = h.connect("d", true, 0, None);
}

#[test]
fn memory_high_watermark_refuses_new_connections() {
    let mut config = Config::default();
    config.limits.memory_high_watermark_bytes = 1_000_000;
    let mut h = harness(config);
    h.engine.set_resident_memory(2_000_000);
    let c = h.engine.accept(h.driver, h.now, None);
    assert_eq!(
        connack_code(&connect_raw(&mut h, c, "c")),
        wire::ConnectReturnCode::QuotaExceeded
    );
    assert_eq!(h.engine.stats.connections_refused_memory, 1);
    h.engine.set_resident_memory(500_000);
    h.connect("d", true, 0, None);
}

#[test]
fn connect_rate_is_per_source_address() {
    let mut config = Config::default();
    config.limits.connect_rate_per_ip = 1;
    config.limits.connect_burst_per_ip = 2;
    let mut h = harness(config);
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let other: IpAddr = "10.0.0.2".parse().unwrap();
    for id in ["a", "b"] {
        let k = h.engine.accept(h.driver, h.now, Some(ip));
        assert_eq!(
            connack_code(&connect_raw(&mut h, k, id)),
            wire::ConnectReturnCode::Success
        );
    }
    let k = h.engine.accept(h.driver, h.now, Some(ip));
    assert_eq!(
        connack_code(&connect_raw(&mut h, k, "c")),
        wire::ConnectReturnCode::ConnectionRateExceeded
    );
    assert_eq!(h.engine.stats.connections_refused_rate, 1);
    let k = h.engine.accept(h.driver, h.now, Some(other));
    assert_eq!(
        connack_code(&connect_raw(&mut h, k, "d")),
        wire::ConnectReturnCode::Success
    );
    // A second later the address has a token again.
    h.now += Duration::from_secs(1);
    let k = h.engine.accept(h.driver, h.now, Some(ip));
    assert_eq!(
        connack_code(&connect_raw(&mut h, k, "e")),
        wire::ConnectReturnCode::Success
    );
}

/// Five PUBLISHes arrive in one read from a client allowed 10/s with a burst of 2.
fn burst_of_five(h: &mut Harness, publisher: ConnKey) -> BytesMut {
    let mut bytes = BytesMut::new();
    for pkid in 1..=5 {
        let mut p = Publish::new("t", QoS::AtLeastOnce, Bytes::from_static(b"x"), None);
        p.pkid = pkid;
        Packet::Publish(p).write(&mut bytes, None).unwrap();
    }
    let mut buf = bytes.clone();
    h.engine.handle_read(publisher, &mut buf, h.now);
    bytes
}

#[test]
fn publish_rate_throttle_pauses_input_and_loses_nothing() {
    let mut config = Config::default();
    config.limits.publish_rate = 10;
    config.limits.publish_burst = 2;
    let mut h = harness(config);
    let sub = h.connect("s", true, 0, None);
    h.subscribe(sub, "t", QoS::AtLeastOnce);
    let publisher = h.connect("p", true, 0, None);
    burst_of_five(&mut h, publisher);
    // The burst, plus the one that went into debt; the rest waits unread.
    assert_eq!(publishes(&h.received(sub)).len(), 3);
    assert_eq!(h.engine.stats.rate_limited_publishes, 1);
    let until = h
        .engine
        .read_paused_until(publisher, h.now)
        .expect("paused");
    assert_eq!(until - h.now, Duration::from_millis(100));
    let mut delivered = 3;
    while delivered < 5 {
        h.now = h
            .engine
            .read_paused_until(publisher, h.now)
            .unwrap_or(h.now);
        assert!(h.engine.read_paused_until(publisher, h.now).is_none());
        let mut scratch = BytesMut::new();
        h.engine.prepare_read(publisher, &mut scratch);
        h.engine.handle_read(publisher, &mut scratch, h.now);
        delivered += publishes(&h.received(sub)).len();
    }
    assert_eq!(delivered, 5);
    let acks = h.received(publisher);
    assert_eq!(acks.len(), 5);
}

#[test]
fn publish_rate_disconnect_closes_with_0x96() {
    let mut config = Config::default();
    config.limits.publish_rate = 10;
    config.limits.publish_burst = 2;
    config.limits.rate_limit_action = RateLimitAction::Disconnect;
    let mut h = harness(config);
    let sub = h.connect("s", true, 0, None);
    h.subscribe(sub, "t", QoS::AtLeastOnce);
    let publisher = h.connect("p", true, 0, None);
    burst_of_five(&mut h, publisher);
    assert_eq!(publishes(&h.received(sub)).len(), 2);
    assert!(h.engine.is_closing(publisher));
    match h.received(publisher).last() {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, DisconnectReasonCode::MessageRateTooHigh)
        }
        other => panic!("expected DISCONNECT 0x96, got {other:?}"),
    }
    assert_eq!(h.engine.stats.rate_limit_disconnects, 1);
}

/// Many PUBLISHes in one read, `count` of them, QoS 1 to topic `t`.
fn pipelined_publishes(count: u16) -> BytesMut {
    let mut bytes = BytesMut::new();
    for pkid in 1..=count {
        let mut p = Publish::new("t", QoS::AtLeastOnce, Bytes::from_static(b"x"), None);
        p.pkid = pkid;
        Packet::Publish(p).write(&mut bytes, None).unwrap();
    }
    bytes
}

/// Acknowledges every PUBLISH `key` received since the last call; how many there were.
fn ack_all(h: &mut Harness, key: ConnKey) -> usize {
    let got = h.received(key);
    let ids: Vec<u16> = publishes(&got).iter().map(|p| p.pkid).collect();
    for &pkid in &ids {
        puback(h, key, pkid);
    }
    ids.len()
}

#[test]
fn publisher_faster_than_its_subscriber_is_paused_and_nothing_is_dropped() {
    let mut config = Config::default();
    config.limits.max_inflight = 2;
    config.limits.max_queued_messages = 8;
    let mut h = harness(config);
    let sub = h.connect("s", true, 0, None);
    h.subscribe(sub, "t", QoS::AtLeastOnce);
    let publisher = h.connect("p", true, 0, None);
    let sent = 100;
    let mut bytes = pipelined_publishes(sent);
    h.engine.handle_read(publisher, &mut bytes, h.now);
    // Two inflight, then the queue up to half its limit: the subscriber is behind, so the
    // publisher is not read further; the rest of its bytes wait unread.
    assert_eq!(session_of(&h, sub).queue.len(), 4);
    assert!(h.engine.read_paused_until(publisher, h.now).is_some());
    assert_eq!(
        h.received(publisher).len(),
        6,
        "acknowledged: what was routed"
    );
    let mut delivered = 0;
    let mut rounds = 0;
    while delivered < usize::from(sent) {
        rounds += 1;
        assert!(rounds < 1000, "stalled at {delivered}");
        delivered += ack_all(&mut h, sub);
        if h.engine.take_read_resumed(publisher) {
            assert!(h.engine.read_paused_until(publisher, h.now).is_none());
            let mut scratch = BytesMut::new();
            h.engine.prepare_read(publisher, &mut scratch);
            h.engine.handle_read(publisher, &mut scratch, h.now);
        }
        assert!(session_of(&h, sub).queue.len() <= 5, "bounded by the mark");
    }
    assert_eq!(delivered, usize::from(sent));
    assert_eq!(h.engine.stats.dropped_queue_full, 0);
    assert!(h.engine.stats.publishers_paused > 0);
    let acks = h.received(publisher).len() + 6;
    assert_eq!(acks, usize::from(sent));
}

#[test]
fn paused_publisher_is_released_when_its_subscriber_goes_offline() {
    let mut config = Config::default();
    config.limits.max_inflight = 1;
    config.limits.max_queued_messages = 4;
    let mut h = harness(config);
    let sub = h.connect("s", false, 60, None);
    h.subscribe(sub, "t", QoS::AtLeastOnce);
    let publisher = h.connect("p", true, 0, None);
    let mut bytes = pipelined_publishes(10);
    h.engine.handle_read(publisher, &mut bytes, h.now);
    assert!(h.engine.read_paused_until(publisher, h.now).is_some());
    h.engine.connection_lost(sub, h.now);
    // Offline, the session's queue limit applies: the publisher goes on, and what does
    // not fit is dropped and counted (the documented offline policy).
    assert!(h.engine.take_read_resumed(publisher));
    let mut scratch = BytesMut::new();
    h.engine.prepare_read(publisher, &mut scratch);
    h.engine.handle_read(publisher, &mut scratch, h.now);
    assert!(h.engine.read_paused_until(publisher, h.now).is_none());
    assert_eq!(h.received(publisher).len(), 10);
    let dropped = h.engine.stats.dropped_queue_full;
    assert_eq!(
        dropped,
        10 - 1 - 4,
        "one inflight, four queued, the rest dropped"
    );
}
