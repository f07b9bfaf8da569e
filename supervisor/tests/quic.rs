//! MQTT over QUIC against the real `mqttd`: a quinn client (`mqttd_bench::quic_client`,
//! MQTT 3.1.1 via rumqttc's codec) next to rumqttc TCP clients, so every test also checks
//! that QUIC and TCP clients share one broker. Every wait is bounded; no sleeps.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::clients::v4 as tcp;
use common::clients::{payload_str, DEADLINE};
use common::raw;
use common::Broker;
use mqttd_bench::quic_client::{
    self, quinn, LastWill, MqttStream, Packet, PubAck, PubComp, PubRec, PubRel, Publish, QoS,
    QuicConn, Subscribe,
};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn quic_addr(broker: &Broker) -> SocketAddr {
    broker
        .quic_addr
        .expect("the broker announced a QUIC address")
}

/// A QUIC connection on its own endpoint (own source port) with its control stream open.
async fn quic_connection(broker: &Broker) -> (quinn::Endpoint, QuicConn, MqttStream) {
    let endpoint = quic_client::endpoint(LOCALHOST).expect("client endpoint");
    let conn = QuicConn::connect(&endpoint, quic_addr(broker))
        .await
        .expect("QUIC handshake");
    let control = conn.open_stream().await.expect("control stream");
    (endpoint, conn, control)
}

/// A QUIC MQTT session: handshake, control stream, CONNECT/CONNACK.
async fn quic_session(broker: &Broker, id: &str) -> (quinn::Endpoint, QuicConn, MqttStream) {
    let (endpoint, conn, mut control) = quic_connection(broker).await;
    let ack = control.mqtt_connect(id, true, None).await.expect("CONNACK");
    assert_eq!(ack.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success);
    (endpoint, conn, control)
}

fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn tcp_qos(n: u8) -> tcp::QoS {
    match n {
        0 => tcp::QoS::AtMostOnce,
        1 => tcp::QoS::AtLeastOnce,
        _ => tcp::QoS::ExactlyOnce,
    }
}

async fn subscribe(stream: &mut MqttStream, pkid: u16, filter: &str, q: u8) {
    let mut sub = Subscribe::new(filter, qos(q));
    sub.pkid = pkid;
    stream.send(Packet::Subscribe(sub)).await.unwrap();
    match stream.expect(DEADLINE).await.unwrap() {
        Packet::SubAck(ack) => assert_eq!(ack.pkid, pkid, "SUBACK for {filter}"),
        other => panic!("expected SUBACK for {filter}, got {other:?}"),
    }
}

/// Waits for a PUBLISH on `stream` (answering PINGRESPs is not needed: keep-alive 60 s) and
/// completes its QoS handshake as a client must.
async fn receive(stream: &mut MqttStream) -> Publish {
    let publish = match stream.expect(DEADLINE).await.unwrap() {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    match publish.qos {
        QoS::AtMostOnce => {}
        QoS::AtLeastOnce => {
            let ack = PubAck::new(publish.pkid);
            stream.send(Packet::PubAck(ack)).await.unwrap();
        }
        QoS::ExactlyOnce => {
            let rec = PubRec::new(publish.pkid);
            stream.send(Packet::PubRec(rec)).await.unwrap();
            match stream.expect(DEADLINE).await.unwrap() {
                Packet::PubRel(rel) => assert_eq!(rel.pkid, publish.pkid),
                other => panic!("expected PUBREL, got {other:?}"),
            }
            let comp = PubComp::new(publish.pkid);
            stream.send(Packet::PubComp(comp)).await.unwrap();
        }
    }
    publish
}

/// Publishes on `stream` and completes the handshake (PUBACK / PUBREC-PUBREL-PUBCOMP).
async fn publish(stream: &mut MqttStream, topic: &str, q: u8, pkid: u16, payload: &str) {
    let mut p = Publish::new(topic, qos(q), payload.as_bytes().to_vec());
    p.pkid = if q == 0 { 0 } else { pkid };
    publish_packet(stream, p).await;
}

async fn publish_packet(stream: &mut MqttStream, p: Publish) {
    let (q, pkid) = (p.qos as u8, p.pkid);
    stream.send(Packet::Publish(p)).await.unwrap();
    match q {
        0 => {}
        1 => match stream.expect(DEADLINE).await.unwrap() {
            Packet::PubAck(ack) => assert_eq!(ack.pkid, pkid),
            other => panic!("expected PUBACK, got {other:?}"),
        },
        _ => {
            match stream.expect(DEADLINE).await.unwrap() {
                Packet::PubRec(rec) => assert_eq!(rec.pkid, pkid),
                other => panic!("expected PUBREC, got {other:?}"),
            }
            stream
                .send(Packet::PubRel(PubRel::new(pkid)))
                .await
                .unwrap();
            match stream.expect(DEADLINE).await.unwrap() {
                Packet::PubComp(comp) => assert_eq!(comp.pkid, pkid),
                other => panic!("expected PUBCOMP, got {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_connect_gets_connack() {
    let broker = Broker::start();
    let (_e, conn, mut control) = quic_session(&broker, &raw::client_id("quic-connect")).await;
    control.send(Packet::PingReq).await.unwrap();
    assert!(matches!(
        control.expect(DEADLINE).await.unwrap(),
        Packet::PingResp
    ));
    control.send(Packet::Disconnect).await.unwrap();
    // The broker closes the session: the stream ends and the connection closes (code 0).
    assert!(control.recv().await.unwrap().is_none());
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, 0u32.into())
        }
        other => panic!("expected an application close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_subscriber_gets_tcp_publishes_at_each_qos() {
    let broker = Broker::start();
    let (_e, _conn, mut sub) = quic_session(&broker, &raw::client_id("quic-sub")).await;
    subscribe(&mut sub, 1, "qq/#", 2).await;
    let mut tcp_pub = tcp::connect(tcp::opts(&broker, &raw::client_id("tcp-pub"))).await;
    for q in 0..3u8 {
        let payload = format!("from-tcp-qos{q}");
        tcp_pub
            .publish(&format!("qq/{q}"), tcp_qos(q), false, payload.clone())
            .await;
        let got = receive(&mut sub).await;
        assert_eq!(got.topic, format!("qq/{q}"));
        assert_eq!(payload_str(&got.payload), payload);
        assert_eq!(got.qos, qos(q), "delivered at the publish QoS");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_subscriber_gets_quic_publishes_at_each_qos() {
    let broker = Broker::start();
    let mut tcp_sub = tcp::connect(tcp::opts(&broker, &raw::client_id("tcp-sub"))).await;
    tcp_sub.subscribe("qp/#", tcp::QoS::ExactlyOnce).await;
    let (_e, _conn, mut publ) = quic_session(&broker, &raw::client_id("quic-pub")).await;
    for q in 0..3u8 {
        let payload = format!("from-quic-qos{q}");
        publish(
            &mut publ,
            &format!("qp/{q}"),
            q,
            10 + u16::from(q),
            &payload,
        )
        .await;
        let got = tcp_sub.next_publish().await;
        assert_eq!(got.topic, format!("qp/{q}"));
        assert_eq!(payload_str(&got.payload), payload);
        assert_eq!(got.qos, tcp_qos(q));
    }
    // QUIC to QUIC as well.
    let (_e2, _c2, mut quic_sub) = quic_session(&broker, &raw::client_id("quic-sub2")).await;
    subscribe(&mut quic_sub, 1, "qp/#", 1).await;
    publish(&mut publ, "qp/x", 1, 20, "quic-to-quic").await;
    let got = receive(&mut quic_sub).await;
    assert_eq!(payload_str(&got.payload), "quic-to-quic");
}

/// A publisher that stops reading its control stream (STOP_SENDING, as when a client drops
/// the receive half) keeps its session: like a TCP client that shut down its read side, it
/// loses it only if the broker has something to send it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_that_stops_reading_keeps_publishing() {
    let broker = Broker::start();
    let mut tcp_sub = tcp::connect(tcp::opts(&broker, &raw::client_id("stop-sub"))).await;
    tcp_sub.subscribe("qs/#", tcp::QoS::AtMostOnce).await;
    let (_e, _conn, mut publ) = quic_session(&broker, &raw::client_id("stop-pub")).await;
    publ.recv
        .stop(0u32.into())
        .expect("stop the control stream's receive side");
    for i in 0..5 {
        let payload = format!("after-stop-{i}");
        publish(&mut publ, "qs/x", 0, 0, &payload).await;
        let got = tcp_sub.next_publish().await;
        assert_eq!(payload_str(&got.payload), payload);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_retained_message() {
    let broker = Broker::start();
    let mut tcp_pub = tcp::connect(tcp::opts(&broker, &raw::client_id("ret-pub"))).await;
    tcp_pub
        .publish("ret/q", tcp::QoS::AtLeastOnce, true, "kept")
        .await;
    let (_e, _conn, mut sub) = quic_session(&broker, &raw::client_id("ret-sub")).await;
    subscribe(&mut sub, 1, "ret/#", 1).await;
    let got = receive(&mut sub).await;
    assert!(got.retain, "delivered as retained");
    assert_eq!(payload_str(&got.payload), "kept");
    // And a retained message set over QUIC reaches a later TCP subscriber.
    let mut retained = Publish::new("ret2/from-quic", QoS::AtLeastOnce, b"kept2".to_vec());
    retained.retain = true;
    retained.pkid = 5;
    publish_packet(&mut sub, retained).await;
    let mut tcp_sub = tcp::connect(tcp::opts(&broker, &raw::client_id("ret-tcp"))).await;
    tcp_sub
        .subscribe("ret2/from-quic", tcp::QoS::AtLeastOnce)
        .await;
    let got = tcp_sub.next_publish().await;
    assert!(got.retain);
    assert_eq!(payload_str(&got.payload), "kept2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_will_published_on_connection_loss() {
    let broker = Broker::start();
    let mut watcher = tcp::connect(tcp::opts(&broker, &raw::client_id("will-watch"))).await;
    watcher.subscribe("will/quic", tcp::QoS::AtLeastOnce).await;
    let (_e, conn, mut control) = quic_connection(&broker).await;
    let will = LastWill::new("will/quic", "quic client lost", QoS::AtLeastOnce, false);
    control
        .mqtt_connect(&raw::client_id("will-quic"), true, Some(will))
        .await
        .unwrap();
    // Gone without DISCONNECT: the QUIC connection closes under the session.
    conn.abort();
    let got = watcher.next_publish().await;
    assert_eq!(got.topic, "will/quic");
    assert_eq!(payload_str(&got.payload), "quic client lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_between_tcp_and_quic() {
    let broker = Broker::start();
    let id = raw::client_id("takeover");
    // TCP first, then QUIC with the same client id: the TCP connection is closed.
    let mut first = tcp::connect(tcp::opts(&broker, &id)).await;
    let (_e, quic_conn, mut control) = quic_session(&broker, &id).await;
    let _ = first.events.expect_closed().await;
    // The QUIC session is the live one: it receives.
    subscribe(&mut control, 1, "take/#", 0).await;
    let mut other = tcp::connect(tcp::opts(&broker, &raw::client_id("take-pub"))).await;
    other
        .publish("take/1", tcp::QoS::AtLeastOnce, false, "to-quic")
        .await;
    assert_eq!(payload_str(&receive(&mut control).await.payload), "to-quic");
    // TCP again with the same id: now the QUIC connection is taken over and closed.
    let mut third = tcp::connect(tcp::opts(&broker, &id)).await;
    assert!(
        control.recv().await.unwrap().is_none(),
        "the QUIC session's stream ends"
    );
    let _ = tokio::time::timeout(DEADLINE, quic_conn.closed())
        .await
        .expect("QUIC connection closed after takeover");
    third.subscribe("take/#", tcp::QoS::AtMostOnce).await;
    other
        .publish("take/2", tcp::QoS::AtLeastOnce, false, "to-tcp")
        .await;
    assert_eq!(payload_str(&third.next_publish().await.payload), "to-tcp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_stream_routes_each_reply_to_its_stream() {
    let broker = Broker::start();
    let (_e, conn, mut control) = quic_session(&broker, &raw::client_id("multi")).await;
    let mut a = conn.open_stream().await.unwrap();
    let mut b = conn.open_stream().await.unwrap();
    let mut c = conn.open_stream().await.unwrap();
    // Each SUBACK comes back on the stream of its SUBSCRIBE.
    subscribe(&mut a, 1, "ms/a/#", 1).await;
    subscribe(&mut b, 2, "ms/b/#", 2).await;
    let mut tcp_pub = tcp::connect(tcp::opts(&broker, &raw::client_id("ms-pub"))).await;
    tcp_pub
        .publish("ms/b/1", tcp::QoS::ExactlyOnce, false, "to-b")
        .await;
    tcp_pub
        .publish("ms/a/1", tcp::QoS::AtLeastOnce, false, "to-a")
        .await;
    tcp_pub
        .publish("ms/none", tcp::QoS::AtMostOnce, false, "unsubscribed")
        .await;
    // Each PUBLISH on the stream whose subscription matched (QoS 2's PUBREL too), though
    // stream a is read only after b.
    assert_eq!(payload_str(&receive(&mut b).await.payload), "to-b");
    assert_eq!(payload_str(&receive(&mut a).await.payload), "to-a");
    // A client PUBLISH's acknowledgements come back on its stream; pings on control.
    publish(&mut c, "ms/c", 2, 7, "from-c").await;
    publish(&mut c, "ms/c", 1, 8, "from-c").await;
    control.send(Packet::PingReq).await.unwrap();
    assert!(matches!(
        control.expect(DEADLINE).await.unwrap(),
        Packet::PingResp
    ));
    // A later subscribe on another stream takes the topic over.
    subscribe(&mut c, 3, "ms/a/1", 0).await;
    tcp_pub
        .publish("ms/a/1", tcp::QoS::AtMostOnce, false, "to-c")
        .await;
    assert_eq!(payload_str(&receive(&mut c).await.payload), "to-c");
    // Nothing stray arrived anywhere: a ping on each stream's owner answers first.
    control.send(Packet::PingReq).await.unwrap();
    assert!(matches!(
        control.expect(DEADLINE).await.unwrap(),
        Packet::PingResp
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_stream_a_stalled_stream_does_not_block_the_others() {
    // Stream isolation is the relay's job; with the default 20 KB budget the engine would
    // (rightly) drop 64 KiB QoS 0 messages to a connection whose socket is backed up, the
    // "still moving" one included, since all streams share one engine connection.
    let broker = Broker::start_with(&["limits.connection_memory_budget=4194304"]);
    let (_e, conn, _control) = quic_session(&broker, &raw::client_id("stall")).await;
    let mut slow = conn.open_stream().await.unwrap();
    let mut fast = conn.open_stream().await.unwrap();
    subscribe(&mut slow, 1, "stall/slow", 0).await;
    subscribe(&mut fast, 2, "stall/fast", 0).await;
    let mut tcp_pub = tcp::connect(tcp::opts(&broker, &raw::client_id("stall-pub"))).await;
    // More than the client's stream window for the slow stream, which is never read...
    let big = vec![b'x'; 64 * 1024];
    for _ in 0..40 {
        tcp_pub
            .publish("stall/slow", tcp::QoS::AtMostOnce, false, big.clone())
            .await;
    }
    tcp_pub
        .publish("stall/fast", tcp::QoS::AtMostOnce, false, "still moving")
        .await;
    // ...and the other stream still gets its message.
    assert_eq!(
        payload_str(&receive(&mut fast).await.payload),
        "still moving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_quic_stream_closes_only_that_connection() {
    let broker = Broker::start();
    let (_e0, _c0, mut bystander) = quic_session(&broker, &raw::client_id("bystander")).await;
    subscribe(&mut bystander, 1, "mal/#", 0).await;
    for (v, expect) in [(raw::V::V5, Some(0x81u8)), (raw::V::V3, None)] {
        let (_e, conn, mut control) = quic_connection(&broker).await;
        control
            .send_raw(&raw::connect(v, &raw::client_id("malformed")))
            .await
            .unwrap();
        // A remaining length of five bytes.
        control
            .send_raw(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01])
            .await
            .unwrap();
        let got = control
            .read_to_end(DEADLINE)
            .await
            .expect("the broker ends the stream");
        let (packets, rest) = raw::split_packets(&got);
        assert!(rest.is_empty(), "{v:?}: trailing bytes {}", raw::hex(&rest));
        assert_eq!(packets[0][0] >> 4, 2, "{v:?}: CONNACK first");
        match expect {
            Some(reason) => {
                let last = packets.last().unwrap();
                assert_eq!(
                    last[0],
                    0xE0,
                    "{v:?}: DISCONNECT last, got {}",
                    raw::hex(last)
                );
                assert_eq!(raw::body(last)[0], reason, "{v:?}: reason code");
            }
            None => assert_eq!(packets.len(), 1, "{v:?}: 3.1.1 just closes"),
        }
        let _ = tokio::time::timeout(DEADLINE, conn.closed())
            .await
            .expect("connection closed");
    }
    // Nothing else was disturbed.
    let mut tcp_pub = tcp::connect(tcp::opts(&broker, &raw::client_id("mal-pub"))).await;
    tcp_pub
        .publish("mal/ok", tcp::QoS::AtLeastOnce, false, "fine")
        .await;
    assert_eq!(payload_str(&receive(&mut bystander).await.payload), "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_and_tcp_clients_on_two_workers_exchange_messages() {
    let broker = Broker::start_workers(2, &[]);
    // Eight QUIC clients, each on its own source port (so spread over both workers by the
    // kernel) and with its own client id (so homed on either worker).
    let mut subs = Vec::new();
    for i in 0..8 {
        let (e, c, mut s) = quic_session(&broker, &raw::client_id(&format!("w2-{i}"))).await;
        subscribe(&mut s, 1, &format!("w2/{i}"), 1).await;
        subs.push((e, c, s));
    }
    let mut tcp_pub = tcp::connect(tcp::opts(&broker, &raw::client_id("w2-tcp"))).await;
    let (_e, _c, mut quic_pub) = quic_session(&broker, &raw::client_id("w2-quic-pub")).await;
    for (i, (_, _, s)) in subs.iter_mut().enumerate() {
        tcp_pub
            .publish(&format!("w2/{i}"), tcp::QoS::AtLeastOnce, false, "via-tcp")
            .await;
        assert_eq!(
            payload_str(&receive(s).await.payload),
            "via-tcp",
            "client {i}"
        );
        publish(
            &mut quic_pub,
            &format!("w2/{i}"),
            1,
            1 + i as u16,
            "via-quic",
        )
        .await;
        assert_eq!(
            payload_str(&receive(s).await.payload),
            "via-quic",
            "client {i}"
        );
    }
    let mut tcp_sub = tcp::connect(tcp::opts(&broker, &raw::client_id("w2-tcp-sub"))).await;
    tcp_sub.subscribe("w2/back", tcp::QoS::AtLeastOnce).await;
    for (i, (_, _, s)) in subs.iter_mut().enumerate() {
        publish(s, "w2/back", 1, 100, &format!("from-{i}")).await;
        assert_eq!(
            payload_str(&tcp_sub.next_publish().await.payload),
            format!("from-{i}")
        );
    }
}

/// NAT rebinding on a broker of two workers: the client's QUIC socket moves to a new port,
/// so SO_REUSEPORT may hash its datagrams to the other worker. Either the connection goes
/// on (same worker: QUIC path migration) or the other worker answers with a stateless reset
/// the client accepts at once (every worker derives the same reset key) — never a silent
/// connection that hangs until the idle timeout. Repeated until both outcomes were seen or
/// enough rebinds were tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_change_migrates_or_resets_promptly() {
    let broker = Broker::start_workers(2, &[]);
    let (mut migrated, mut reset) = (0, 0);
    for attempt in 0..16 {
        let (endpoint, conn, mut control) =
            quic_session(&broker, &raw::client_id(&format!("rebind-{attempt}"))).await;
        let socket = std::net::UdpSocket::bind((LOCALHOST, 0)).unwrap();
        endpoint.rebind(socket).expect("rebind");
        control.send(Packet::PingReq).await.unwrap();
        match tokio::time::timeout(DEADLINE, control.recv()).await {
            Ok(Ok(Some(Packet::PingResp))) => migrated += 1,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let why = tokio::time::timeout(DEADLINE, conn.closed())
                    .await
                    .expect("closed");
                assert!(
                    matches!(why, quinn::ConnectionError::Reset),
                    "expected a stateless reset, got {why:?}"
                );
                reset += 1;
            }
            Ok(Ok(Some(other))) => panic!("unexpected {other:?}"),
            Err(_) => panic!("attempt {attempt}: no answer and no reset within {DEADLINE:?}"),
        }
        if migrated > 0 && reset > 0 {
            break;
        }
    }
    assert!(migrated > 0, "no rebind stayed on its worker in 16 tries");
    assert!(reset > 0, "no rebind moved to the other worker in 16 tries");
}

/// SIGTERM: a v5 client over QUIC gets DISCONNECT 0x8B (server shutting down) through the
/// relay before its connection closes, as over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_v5_disconnect_over_quic() {
    let mut broker = Broker::start();
    let (_e, conn, mut control) = quic_connection(&broker).await;
    control
        .send_raw(&raw::connect(raw::V::V5, &raw::client_id("quic-drain")))
        .await
        .unwrap();
    // Wait for the CONNACK before stopping the broker.
    let mut got = Vec::new();
    while raw::split_packets(&got).0.is_empty() {
        let more = tokio::time::timeout(DEADLINE, control.recv.read_chunk(4096, true))
            .await
            .expect("CONNACK in time")
            .unwrap()
            .expect("stream open");
        got.extend_from_slice(&more.bytes);
    }
    let terminate = tokio::task::spawn_blocking(move || {
        let status = broker.terminate();
        (broker, status)
    });
    let rest = control
        .read_to_end(DEADLINE)
        .await
        .expect("the broker ends the stream");
    got.extend_from_slice(&rest);
    let (packets, _) = raw::split_packets(&got);
    let last = packets.last().unwrap();
    assert_eq!(last[0], 0xE0, "DISCONNECT last, got {}", raw::hex(last));
    assert_eq!(raw::body(last)[0], 0x8B, "reason: server shutting down");
    let _ = tokio::time::timeout(DEADLINE, conn.closed())
        .await
        .expect("closed");
    let (_broker, status) = terminate.await.unwrap();
    assert!(status.success(), "clean exit: {status}");
}

/// A QUIC session, retried until `DEADLINE`: for the moments when a connection attempt may
/// be reset (a rolling restart's overlap, see docs/QUIC.md).
async fn quic_session_retrying(
    broker: &Broker,
    id: &str,
) -> (quinn::Endpoint, QuicConn, MqttStream) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let endpoint = quic_client::endpoint(LOCALHOST).expect("client endpoint");
        let attempt = async {
            let conn = QuicConn::connect(&endpoint, quic_addr(broker)).await?;
            let mut control = conn.open_stream().await?;
            control.mqtt_connect(id, true, None).await?;
            anyhow::Ok((conn, control))
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok((conn, control))) => return (endpoint, conn, control),
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "no QUIC session for {id} within {DEADLINE:?}: {:?}",
                other.map(|r| r.err())
            ),
        }
    }
}

/// SIGHUP (rolling restart): the slot's UDP socket passes to the new worker like its TCP
/// listener. A QUIC client of the old worker sees its session end (DISCONNECT or, if the
/// new worker read its datagrams, a stateless reset) and connects again to the new one;
/// while the old worker drains, both read the socket, so an attempt may be reset and is
/// retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_moves_quic_clients_to_the_new_worker() {
    let mut broker = Broker::start();
    let old_workers = common::procs::worker_pids(broker.pid());
    let (_e, conn, mut control) = quic_session(&broker, &raw::client_id("roll-old")).await;
    broker.signal("HUP");
    assert!(
        matches!(
            tokio::time::timeout(DEADLINE, control.recv()).await,
            Ok(Ok(None))
        ),
        "the old worker's session ends"
    );
    let _ = tokio::time::timeout(DEADLINE, conn.closed())
        .await
        .expect("closed");
    // Until an old worker has exited it shares its slot's UDP socket with its successor and
    // may read a new connection's datagram, which it answers with a stateless reset
    // (docs/QUIC.md): wait for the old workers to be gone before checking the new ones.
    for (_, pid) in old_workers {
        common::procs::wait_until_gone(pid, Duration::from_secs(20)).await;
    }
    // The new worker serves QUIC on the same port.
    let (_e2, _c2, mut sub) = quic_session_retrying(&broker, &raw::client_id("roll-new")).await;
    subscribe(&mut sub, 1, "roll/#", 1).await;
    let (_e3, _c3, mut publ) = quic_session_retrying(&broker, &raw::client_id("roll-pub")).await;
    publish(&mut publ, "roll/1", 1, 1, "after the restart").await;
    assert_eq!(
        payload_str(&receive(&mut sub).await.payload),
        "after the restart"
    );
    broker.assert_alive();
}

/// Socket descriptors the process `pid` holds (sockets only: the worker briefly opens
/// files such as `/proc/self/statm` on its own timer).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        })
        .count()
}

/// The direct path: a QUIC client whose client id lives on the worker it reached is served
/// by the QUIC driver itself, with no socketpair: the worker's descriptors do not grow per
/// QUIC connection (a TCP connection, for comparison, costs exactly one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_quic_clients_use_no_descriptor() {
    let broker = Broker::start_workers(1, &[]);
    let [(_, worker)] = common::procs::worker_pids(broker.pid())[..] else {
        panic!("expected one worker");
    };
    let before = open_fds(worker);
    let mut sessions = Vec::new();
    for i in 0..10 {
        let (e, c, mut control) = quic_session(&broker, &raw::client_id(&format!("fd-{i}"))).await;
        // A round trip: the worker has served this connection completely.
        control.send(Packet::PingReq).await.unwrap();
        assert!(matches!(
            control.expect(DEADLINE).await.unwrap(),
            Packet::PingResp
        ));
        sessions.push((e, c, control));
    }
    assert_eq!(open_fds(worker), before, "10 QUIC sessions held");
    // The accountant charges each QUIC connection its transport state (`driver.rs`,
    // QUIC_CONNECTION_BYTES = 11,400 B) on top of the engine's own.
    let accounted = common::prom::scrape(&broker).sum("mqttd_accounted_bytes", &[]);
    assert!(accounted >= 10.0 * 11_400.0, "accounted {accounted} B");
    let tcp = tcp::connect(tcp::opts(&broker, &raw::client_id("fd-tcp"))).await;
    assert_eq!(open_fds(worker), before + 1, "plus one TCP session");
    drop(tcp);
    drop(sessions);
}

/// The publish-rate throttle over the direct path: the driver stops feeding a paused
/// client's bytes to the engine and resumes on its timer; everything arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rate_throttle_over_quic_delivers_everything_in_order() {
    let broker = Broker::start_workers(1, &["limits.publish_rate=20", "limits.publish_burst=5"]);
    let mut tcp_sub = tcp::connect(tcp::opts(&broker, &raw::client_id("qrate-sub"))).await;
    tcp_sub.subscribe("qrate/t", tcp::QoS::AtLeastOnce).await;
    let (_e, _c, mut publ) = quic_session(&broker, &raw::client_id("qrate-pub")).await;
    const N: u16 = 30;
    for i in 1..=N {
        let mut p = Publish::new("qrate/t", QoS::AtLeastOnce, format!("m{i}").into_bytes());
        p.pkid = i;
        publ.send(Packet::Publish(p)).await.unwrap();
    }
    for i in 1..=N {
        let got = tcp_sub.next_publish().await;
        assert_eq!(payload_str(&got.payload), format!("m{i}"));
    }
    for i in 1..=N {
        match publ.expect(DEADLINE).await.unwrap() {
            Packet::PubAck(ack) => assert_eq!(ack.pkid, i),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    // 30 at 20/s after a burst of 5: the client was paused at least once.
    let e = common::prom::scrape(&broker);
    assert!(e.sum("mqttd_rate_limited_total", &[("kind", "publish")]) >= 1.0);
}
