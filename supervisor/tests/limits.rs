//! The broker's limits against the real binary, with raw MQTT clients (so every reason code
//! and every byte the broker sends is visible): connection limits per worker and per
//! broker, the per-IP connect rate, the per-client publish rate, and the memory budget
//! policy for subscribers that stop reading (QoS 0 dropped, QoS 1 disconnected as a slow
//! consumer) while the other subscribers get every message.
//!
//! Each test also reads the outcome back from the metrics endpoint, as an operator would.
//! Every wait is bounded (`raw::TIMEOUT`); there are no sleeps and no timing assertions.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use common::prom::{scrape, scrape_until};
use common::raw::{self, body, client_id, hex, End, Raw, V};
use common::Broker;
use socket2::{Domain, Socket, Type};

/// The reason code of a v5 CONNACK.
fn connack_reason(connack: &[u8]) -> u8 {
    assert_eq!(connack[0], 0x20, "not a CONNACK: {}", hex(connack));
    body(connack)[1]
}

/// Opens a connection, sends CONNECT and returns the CONNACK.
fn connect_answer(addr: SocketAddr, v: V, id: &str) -> (Raw, Vec<u8>) {
    let mut c = Raw::open(addr, v);
    c.send(&raw::connect(v, id));
    let connack = c.read_packet().expect("CONNACK").expect("CONNACK, got EOF");
    (c, connack)
}

/// The broker refuses with this CONNACK and closes.
fn expect_refused(addr: SocketAddr, v: V, expected: &[u8]) {
    let (mut c, connack) = connect_answer(addr, v, &client_id("refused"));
    match v {
        V::V3 => assert_eq!(connack, expected, "{}", hex(&connack)),
        V::V5 => assert_eq!(connack_reason(&connack), expected[0], "{}", hex(&connack)),
    }
    let (_, end) = c.read_until_close();
    assert!(matches!(end, End::Eof), "refused connection not closed");
}

/// A v5 PUBACK for `pkid` (reason omitted: success).
fn puback(pkid: u16) -> Vec<u8> {
    raw::packet(0x40, &pkid.to_be_bytes())
}

/// (QoS, packet id, payload) of a v5 PUBLISH.
fn parse_publish(p: &[u8]) -> (u8, u16, Vec<u8>) {
    assert_eq!(p[0] & 0xF0, 0x30, "not a PUBLISH: {}", hex(p));
    let qos = (p[0] >> 1) & 3;
    let b = body(p);
    let topic_len = u16::from_be_bytes([b[0], b[1]]) as usize;
    let mut at = 2 + topic_len;
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16::from_be_bytes([b[at], b[at + 1]]);
        at += 2;
    }
    // v5 property length (a variable byte integer) and the properties.
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let byte = b[at];
        at += 1;
        len |= usize::from(byte & 0x7F) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    (qos, pkid, b[at + len..].to_vec())
}

fn subscribe(c: &mut Raw, filter: &str, qos: u8) {
    c.send(&raw::subscribe(V::V5, 1, filter.as_bytes(), qos));
    let suback = c.read_packet().expect("SUBACK").expect("SUBACK, got EOF");
    assert_eq!(suback[0], 0x90, "not a SUBACK: {}", hex(&suback));
    assert_eq!(*body(&suback).last().unwrap(), qos, "{}", hex(&suback));
}

fn numbered(i: u32, len: usize) -> Vec<u8> {
    let mut p = i.to_be_bytes().to_vec();
    p.resize(len, b'.');
    p
}

#[test]
fn connection_limit_refuses_the_next_client_and_keeps_serving() {
    let broker = Broker::start_workers(1, &["limits.max_connections_per_worker=3"]);
    let (mut sub, _) = Raw::connect(broker.addr, V::V5, &client_id("sub"));
    let (mut publisher, _) = Raw::connect(broker.addr, V::V5, &client_id("pub"));
    let (_third, _) = Raw::connect(broker.addr, V::V3, &client_id("third"));
    // v5: 0x97 Quota exceeded; 3.1.1: 0x03 Server unavailable. Both closed.
    expect_refused(broker.addr, V::V5, &[0x97]);
    expect_refused(broker.addr, V::V3, &[0x20, 0x02, 0x00, 0x03]);
    // The three admitted clients are served as before.
    subscribe(&mut sub, "limit/t", 1);
    publisher.send(&raw::publish(V::V5, b"limit/t", 1, 7, &[], b"still here"));
    let ack = publisher.read_packet().unwrap().unwrap();
    assert_eq!(ack[0], 0x40, "{}", hex(&ack));
    let got = sub.read_packet().unwrap().unwrap();
    assert_eq!(parse_publish(&got).2, b"still here");
    let e = scrape(&broker);
    let refused = e.sum(
        "mqttd_connections_refused_total",
        &[("reason", "connection_limit")],
    );
    assert_eq!(refused, 2.0);
    assert_eq!(e.sum("mqttd_connections", &[]), 3.0);
}

#[test]
fn broker_wide_limit_counts_every_worker() {
    let broker = Broker::start_workers(2, &["limits.max_connections=4"]);
    let mut clients: Vec<Raw> = (0..4)
        .map(|i| Raw::connect(broker.addr, V::V5, &client_id(&format!("c{i}"))).0)
        .collect();
    // Whichever worker takes it, the fifth is over the broker's limit.
    for _ in 0..3 {
        expect_refused(broker.addr, V::V5, &[0x97]);
    }
    // One leaves; once the broker has seen it go, a newcomer gets its place.
    clients.pop().unwrap().send(&raw::packet(0xE0, &[]));
    let deadline = Instant::now() + raw::TIMEOUT;
    loop {
        let (_c, connack) = connect_answer(broker.addr, V::V5, &client_id("late"));
        match connack_reason(&connack) {
            0x00 => break,
            0x97 => assert!(Instant::now() < deadline, "the freed place never came back"),
            other => panic!("unexpected CONNACK reason {other:#x}"),
        }
    }
}

/// A connection from source address `ip` (any 127.0.0.x works on Linux loopback).
fn open_from(ip: [u8; 4], addr: SocketAddr) -> Raw {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from((ip, 0)).into())
        .expect("bind source address");
    socket
        .connect_timeout(&addr.into(), raw::TIMEOUT)
        .expect("connect to mqttd");
    Raw::from_stream(TcpStream::from(socket), V::V5)
}

#[test]
fn connect_rate_per_ip_refuses_with_0x9f() {
    let broker = Broker::start_workers(
        1,
        &[
            "limits.connect_rate_per_ip=1",
            "limits.connect_burst_per_ip=3",
        ],
    );
    let mut kept = Vec::new();
    for i in 0..3 {
        let mut c = open_from([127, 0, 0, 1], broker.addr);
        c.send(&raw::connect(V::V5, &client_id(&format!("burst{i}"))));
        let connack = c.read_packet().unwrap().unwrap();
        assert_eq!(connack_reason(&connack), 0x00, "{}", hex(&connack));
        kept.push(c);
    }
    let mut over = open_from([127, 0, 0, 1], broker.addr);
    over.send(&raw::connect(V::V5, &client_id("over")));
    let connack = over.read_packet().unwrap().unwrap();
    assert_eq!(connack_reason(&connack), 0x9F, "{}", hex(&connack));
    // Another address has its own allowance.
    let mut other = open_from([127, 0, 0, 2], broker.addr);
    other.send(&raw::connect(V::V5, &client_id("other")));
    let connack = other.read_packet().unwrap().unwrap();
    assert_eq!(connack_reason(&connack), 0x00, "{}", hex(&connack));
    let e = scrape(&broker);
    assert_eq!(
        e.sum(
            "mqttd_connections_refused_total",
            &[("reason", "connect_rate")]
        ),
        1.0
    );
    assert_eq!(
        e.sum("mqttd_rate_limited_total", &[("kind", "connect")]),
        1.0
    );
}

#[test]
fn publish_rate_disconnect_closes_with_0x96() {
    let broker = Broker::start_workers(
        1,
        &[
            "limits.publish_rate=5",
            "limits.publish_burst=5",
            "limits.rate_limit_action=\"disconnect\"",
        ],
    );
    let (mut publisher, _) = Raw::connect(broker.addr, V::V5, &client_id("fast"));
    let burst: Vec<u8> = (0..20)
        .flat_map(|i| raw::publish(V::V5, b"rate/t", 0, 0, &[], &numbered(i, 8)))
        .collect();
    publisher.send_lossy(&burst);
    let (bytes, end) = publisher.read_until_close();
    let (packets, _) = raw::split_packets(&bytes);
    let last = packets.last().expect("a DISCONNECT");
    assert_eq!(last[0], 0xE0, "{}", hex(last));
    assert_eq!(body(last)[0], 0x96, "{}", hex(last));
    assert!(matches!(end, End::Eof));
    let e = scrape(&broker);
    assert_eq!(
        e.sum("mqttd_rate_limited_total", &[("kind", "publish")]),
        1.0
    );
}

#[test]
fn publish_rate_throttle_delivers_everything_in_order() {
    let broker = Broker::start_workers(1, &["limits.publish_rate=20", "limits.publish_burst=5"]);
    let (mut sub, _) = Raw::connect(broker.addr, V::V5, &client_id("sub"));
    subscribe(&mut sub, "rate/t", 1);
    let (mut publisher, _) = Raw::connect(broker.addr, V::V5, &client_id("pub"));
    const N: u32 = 30;
    let burst: Vec<u8> = (0..N)
        .flat_map(|i| raw::publish(V::V5, b"rate/t", 1, i as u16 + 1, &[], &numbered(i, 8)))
        .collect();
    publisher.send(&burst);
    // Throttled, not refused: every message arrives, in order, and is acknowledged.
    for i in 0..N {
        let p = sub.read_packet().unwrap().expect("PUBLISH");
        let (_, pkid, payload) = parse_publish(&p);
        assert_eq!(payload, numbered(i, 8));
        sub.send(&puback(pkid));
    }
    for i in 0..N {
        let ack = publisher.read_packet().unwrap().expect("PUBACK");
        assert_eq!(ack[0], 0x40, "{}", hex(&ack));
        assert_eq!(u16::from_be_bytes([ack[2], ack[3]]), i as u16 + 1);
    }
    // 30 at 20/s after a burst of 5: the client was paused at least once.
    let e = scrape(&broker);
    assert!(e.sum("mqttd_rate_limited_total", &[("kind", "publish")]) >= 1.0);
}

/// A subscriber that never reads: a tiny receive buffer, so the broker's side fills fast.
fn stalled_subscriber(addr: SocketAddr, filter: &str, qos: u8) -> Raw {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect_timeout(&addr.into(), raw::TIMEOUT).unwrap();
    let mut c = Raw::from_stream(TcpStream::from(socket), V::V5);
    c.send(&raw::connect(V::V5, &client_id("stalled")));
    let connack = c.read_packet().unwrap().unwrap();
    assert_eq!(connack_reason(&connack), 0);
    subscribe(&mut c, filter, qos);
    c
}

/// Publishes `rounds` rounds of `per_round` messages; after each round the attentive
/// subscriber must have every message of it (acknowledging QoS 1) before the next starts.
fn flood_in_rounds(
    publisher: &mut Raw,
    attentive: &mut Raw,
    topic: &str,
    qos: u8,
    rounds: u32,
    per_round: u32,
    size: usize,
) {
    let mut pkid = 0u16;
    for round in 0..rounds {
        let mut batch = Vec::new();
        for k in 0..per_round {
            pkid = pkid % 60_000 + 1;
            let id = if qos > 0 { pkid } else { 0 };
            let payload = numbered(round * per_round + k, size);
            batch.extend(raw::publish(
                V::V5,
                topic.as_bytes(),
                qos,
                id,
                &[],
                &payload,
            ));
        }
        publisher.send(&batch);
        if qos > 0 {
            for _ in 0..per_round {
                let ack = publisher.read_packet().unwrap().expect("PUBACK");
                assert_eq!(ack[0], 0x40, "{}", hex(&ack));
            }
        }
        for k in 0..per_round {
            let p = attentive.read_packet().unwrap().expect("PUBLISH");
            let (_, id, payload) = parse_publish(&p);
            assert_eq!(
                payload,
                numbered(round * per_round + k, size),
                "message lost or reordered"
            );
            if qos > 0 {
                attentive.send(&puback(id));
            }
        }
    }
}

#[test]
fn slow_qos1_consumer_is_disconnected_and_others_get_everything() {
    let broker = Broker::start_workers(
        1,
        &[
            "limits.connection_memory_budget=8192",
            "limits.max_inflight=16",
        ],
    );
    let mut stalled = stalled_subscriber(broker.addr, "flood/q1", 1);
    let (mut attentive, _) = Raw::connect(broker.addr, V::V5, &client_id("attentive"));
    subscribe(&mut attentive, "flood/q1", 1);
    let (mut publisher, _) = Raw::connect(broker.addr, V::V5, &client_id("pub"));
    flood_in_rounds(&mut publisher, &mut attentive, "flood/q1", 1, 100, 8, 200);
    // The stalled one got its window's worth, then DISCONNECT 0x97, then the close.
    let (bytes, end) = stalled.read_until_close();
    let (packets, _) = raw::split_packets(&bytes);
    let last = packets.last().expect("packets");
    assert_eq!(last[0], 0xE0, "last packet {}", hex(last));
    assert_eq!(body(last)[0], 0x97);
    let publishes = packets.iter().filter(|p| p[0] & 0xF0 == 0x30).count();
    assert_eq!(publishes, 16, "more than the inflight window was sent");
    assert!(matches!(end, End::Eof));
    let e = scrape(&broker);
    assert_eq!(e.sum("mqttd_slow_consumer_disconnects_total", &[]), 1.0);
    // The stalled session ended with its connection (clean start): its queue is counted.
    assert!(e.sum("mqttd_messages_dropped_total", &[("reason", "session_end")]) > 0.0);
    // Nobody left holds more than the budget.
    let within = e.sum("mqttd_connection_accounted_bytes_bucket", &[("le", "8192")]);
    assert_eq!(within, e.sum("mqttd_connection_accounted_bytes_count", &[]));
}

#[test]
fn qos0_to_a_stalled_subscriber_is_dropped_not_buffered() {
    let broker = Broker::start_workers(1, &["limits.connection_memory_budget=65536"]);
    let mut stalled = stalled_subscriber(broker.addr, "flood/q0", 0);
    let (mut attentive, _) = Raw::connect(broker.addr, V::V5, &client_id("attentive"));
    subscribe(&mut attentive, "flood/q0", 0);
    let (mut publisher, _) = Raw::connect(broker.addr, V::V5, &client_id("pub"));
    // 12 MB: more than the kernel buffers between the broker and the stalled client hold.
    const ROUNDS: u32 = 300;
    const PER_ROUND: u32 = 5;
    flood_in_rounds(
        &mut publisher,
        &mut attentive,
        "flood/q0",
        0,
        ROUNDS,
        PER_ROUND,
        8192,
    );
    // QoS 0 to the stalled client was dropped rather than buffered: when it finally reads,
    // it finds fewer messages than were published, and it is still connected.
    stalled.stream.shutdown(std::net::Shutdown::Write).ok();
    let (bytes, _) = stalled.read_until_close();
    let (packets, _) = raw::split_packets(&bytes);
    let got = packets.iter().filter(|p| p[0] & 0xF0 == 0x30).count() as u32;
    assert!(got < ROUNDS * PER_ROUND, "nothing was dropped ({got})");
    assert!(
        packets.iter().all(|p| p[0] & 0xF0 == 0x30),
        "not only PUBLISHes"
    );
    let dropped = scrape_until(&broker, "over-budget drops", |e| {
        let n = e.sum("mqttd_messages_dropped_total", &[("reason", "over_budget")]);
        (n > 0.0).then_some(n)
    });
    assert!(dropped as u32 + got <= ROUNDS * PER_ROUND);
}

#[test]
fn memory_high_watermark_refuses_new_connections() {
    // One byte: any worker is above it once it has measured itself (each second).
    let broker = Broker::start_workers(1, &["limits.memory_high_watermark_bytes=1"]);
    let deadline = Instant::now() + raw::TIMEOUT;
    loop {
        let (mut c, connack) = connect_answer(broker.addr, V::V5, &client_id("late"));
        match connack_reason(&connack) {
            // Accepted before the worker's first measurement: try again.
            0x00 => assert!(Instant::now() < deadline, "never refused"),
            0x97 => {
                let (_, end) = c.read_until_close();
                assert!(matches!(end, End::Eof));
                break;
            }
            other => panic!("unexpected CONNACK reason {other:#x}"),
        }
    }
    let e = scrape(&broker);
    assert!(e.sum("mqttd_connections_refused_total", &[("reason", "memory")]) >= 1.0);
    assert_eq!(e.sum("mqttd_memory_high_watermark_bytes", &[]), 1.0);
}
