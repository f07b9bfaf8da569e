//! Engine tests of protocol rules at the edges of the spec: which DISCONNECT reasons
//! publish the will, reserved bits, inflight messages the client can no longer take,
//! packets shrunk or withheld to fit the client's Maximum Packet Size.

use bytes::BytesMut;

use super::tests::{puback, publish_payload, publishes, will, Harness};
use super::ConnKey;
use crate::config::Config;
use crate::protocol::{ConnectProperties, Disconnect, DisconnectReasonCode, Packet, QoS};
use rumqttc::v5::mqttbytes::v5 as wire;

/// Connects a v5 client that allows packets of at most `max_packet` bytes.
fn connect_limited(
    h: &mut Harness,
    id: &str,
    clean: bool,
    expiry: u32,
    max_packet: u32,
) -> ConnKey {
    let key = h.engine.accept(h.driver, h.now, None);
    let mut props = ConnectProperties::new();
    props.session_expiry_interval = Some(expiry);
    props.max_packet_size = Some(max_packet);
    let connect = wire::Connect {
        keep_alive: 0,
        client_id: id.into(),
        clean_start: clean,
        properties: Some(props),
    };
    h.send(key, Packet::Connect(connect, None, None));
    key
}

/// A v5 client that ends with DISCONNECT `reason`: is its will published?
fn will_published_after(reason: DisconnectReasonCode) -> bool {
    let mut h = Harness::new();
    let watcher = h.connect("watcher", true, 0, None);
    h.subscribe(watcher, "wills/#", QoS::AtLeastOnce);
    let c = h.connect("c", true, 0, Some(will("wills/c", 0)));
    h.send(
        c,
        Packet::Disconnect(Disconnect {
            reason_code: reason,
            properties: None,
        }),
    );
    assert!(h.engine.is_closing(c));
    let got = h.received(watcher);
    let wills = publishes(&got);
    assert!(wills.iter().all(|p| p.topic == "wills/c"));
    !wills.is_empty()
}

#[test]
fn only_a_normal_disconnect_suppresses_the_will() {
    // v5 §3.14.4: the will is deleted only on Normal disconnection (0x00); 0x04 asks for
    // it, and any other reason a client gives is an abnormal end that publishes it.
    assert!(!will_published_after(
        DisconnectReasonCode::NormalDisconnection
    ));
    assert!(will_published_after(
        DisconnectReasonCode::DisconnectWithWillMessage
    ));
    assert!(will_published_after(DisconnectReasonCode::UnspecifiedError));
    assert!(will_published_after(
        DisconnectReasonCode::ImplementationSpecificError
    ));
}

#[test]
fn inflight_message_too_large_on_resume_is_discarded_and_the_queue_moves_up() {
    // v5 §3.1.2.11.4: a message over the client's Maximum Packet Size is discarded as if
    // it had been sent. On resume that includes what was inflight, or the window never
    // opens again.
    let mut config = Config::default();
    config.limits.max_inflight = 1;
    let mut h = Harness::with_config(config);
    let publisher = h.connect("pub", true, 0, None);
    let c = connect_limited(&mut h, "c", true, 100, 100_000);
    h.received(c);
    h.subscribe(c, "t/#", QoS::AtLeastOnce);
    publish_payload(&mut h, publisher, "t/big", QoS::AtLeastOnce, 1, 1000);
    let got = h.received(c);
    assert_eq!(
        publishes(&got).len(),
        1,
        "the big one goes out while it fits"
    );
    h.engine.connection_lost(c, h.now);
    // Queued behind the window of one while the client is away.
    publish_payload(&mut h, publisher, "t/small", QoS::AtLeastOnce, 2, 10);

    let c = connect_limited(&mut h, "c", false, 100, 200);
    let got = h.received(c);
    assert!(matches!(&got[0], Packet::ConnAck(a) if a.session_present));
    let sent = publishes(&got);
    assert_eq!(sent.len(), 1, "got {got:?}");
    assert_eq!(sent[0].topic, "t/small");
    assert!(!sent[0].dup);
    puback(&mut h, c, sent[0].pkid);
    let skey = h.engine.conns[c].session.expect("attached");
    assert!(h.engine.sessions[skey].inflight.is_empty());
    assert_eq!(h.engine.stats.dropped_too_large, 1);
}

/// Connects a 3.1.1 client with a will on `will_topic`; returns its key.
fn connect_v311_with_will(h: &mut Harness, id: &str, will_topic: &str) -> ConnKey {
    use rumqttc::mqttbytes::v4 as c4;
    let key = h.engine.accept(h.driver, h.now, None);
    let mut connect = c4::Connect::new(id);
    connect.last_will = Some(c4::LastWill::new(
        will_topic,
        "gone",
        rumqttc::mqttbytes::QoS::AtMostOnce,
        false,
    ));
    let mut bytes = BytesMut::new();
    c4::Packet::Connect(connect)
        .write(&mut bytes, usize::MAX)
        .unwrap();
    h.engine.handle_read(key, &mut bytes, h.now);
    let out = h.engine.output(key).expect("open");
    assert_eq!(&out[..], [0x20, 0x02, 0x00, 0x00], "3.1.1 CONNACK");
    out.clear();
    key
}

#[test]
fn v311_disconnect_with_a_body_is_malformed_and_the_will_goes_out() {
    // 3.1.1 §3.14: DISCONNECT has no variable header and no payload. One with a body is
    // malformed: the connection is closed as on a network error, so the will is due.
    let mut h = Harness::new();
    let watcher = h.connect("watcher", true, 0, None);
    h.subscribe(watcher, "wills/#", QoS::AtMostOnce);
    let c = connect_v311_with_will(&mut h, "old", "wills/old");
    let mut bad = BytesMut::from(&[0xE0, 0x01, 0x00][..]);
    h.engine.handle_read(c, &mut bad, h.now);
    assert!(h.engine.is_closing(c));
    assert_eq!(h.engine.stats.protocol_errors, 1);
    let got = h.received(watcher);
    assert_eq!(publishes(&got).len(), 1, "will not published: {got:?}");
}

#[test]
fn v5_subscribe_with_reserved_option_bits_is_refused_with_0x81() {
    let mut h = Harness::new();
    let c = h.connect("c", true, 0, None);
    // SUBSCRIBE pkid 1, no properties, "a/b" with options 0xC1 (bits 6-7 reserved).
    let mut bad = BytesMut::from(&[0x82, 0x09, 0, 1, 0, 0, 3, b'a', b'/', b'b', 0xC1][..]);
    h.engine.handle_read(c, &mut bad, h.now);
    match h.received(c).as_slice() {
        [Packet::Disconnect(d)] => assert_eq!(d.reason_code, DisconnectReasonCode::MalformedPacket),
        other => panic!("expected DISCONNECT 0x81, got {other:?}"),
    }
    assert!(h.engine.is_closing(c));
    assert_eq!(h.engine.stats.protocol_errors, 1);
    assert_eq!(h.engine.subscription_count(), 0);
}

/// A CONNECT (clean start, keep-alive 0) of protocol `level` with user name "u" and a
/// password that is not UTF-8.
fn connect_with_binary_password(level: u8) -> BytesMut {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0b1100_0010, 0, 0];
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(&[0, 1, b'c', 0, 1, b'u', 0, 3, 0xFF, 0xFE, 0x00]);
    let mut frame = BytesMut::from(&[0x10, body.len() as u8][..]);
    frame.extend_from_slice(&body);
    frame
}

#[test]
fn a_password_is_binary_data_and_need_not_be_utf8() {
    // 3.1.1 §3.1.3.5 and 5.0 §3.1.3.6: Password is Binary Data, any bytes at all.
    for (level, connack) in [(4u8, &[0x20, 2, 0, 0][..]), (5, &[0x20])] {
        let mut h = Harness::new();
        let key = h.engine.accept(h.driver, h.now, None);
        let mut bytes = connect_with_binary_password(level);
        h.engine.handle_read(key, &mut bytes, h.now);
        assert!(!h.engine.is_closing(key), "level {level}: refused");
        let out = h.engine.output(key).expect("open");
        assert!(out.starts_with(connack), "level {level}: {out:02X?}");
        if level == 5 {
            assert_eq!(out[3], 0x00, "v5 CONNACK reason {:#04x}", out[3]);
        }
        assert_eq!(h.engine.stats.protocol_errors, 0);
    }
}

/// A second CONNECT from `key`: a protocol error the broker answers with a DISCONNECT
/// carrying a Reason String.
fn second_connect(h: &mut Harness, key: ConnKey) {
    let connect = wire::Connect {
        keep_alive: 0,
        client_id: "again".into(),
        clean_start: true,
        properties: None,
    };
    h.send(key, Packet::Connect(connect, None, None));
}

#[test]
fn disconnect_drops_its_reason_string_to_fit_the_clients_maximum_packet_size() {
    // MQTT-3.1.2-24/-25: nothing larger than the client allows; the Reason String and
    // User Properties are what the server leaves out to fit.
    let mut h = Harness::new();
    let roomy = connect_limited(&mut h, "roomy", true, 0, 1000);
    h.received(roomy);
    second_connect(&mut h, roomy);
    let full = h.engine.output(roomy).expect("open").len();
    assert!(
        full > 16,
        "the full DISCONNECT ({full} bytes) must not fit 16"
    );

    let c = connect_limited(&mut h, "c", true, 0, 16);
    h.received(c);
    second_connect(&mut h, c);
    let out = h.engine.output(c).expect("open");
    assert!(
        out.len() <= 16,
        "DISCONNECT of {} bytes to a client allowing 16",
        out.len()
    );
    // The broker's own reader: it knows the short forms of a v5 DISCONNECT.
    match crate::protocol::read_packet(out, crate::protocol::Version::V5, u32::MAX) {
        Ok(Some(Packet::Disconnect(d))) => {
            assert_eq!(d.reason_code, DisconnectReasonCode::ProtocolError);
            assert!(d
                .properties
                .as_ref()
                .is_none_or(|p| p.reason_string.is_none()));
        }
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
    assert!(h.engine.is_closing(c));
}

#[test]
fn a_packet_that_cannot_fit_the_clients_maximum_is_not_sent() {
    // A SUBACK has no optional property to drop here: 15 return codes make 20 bytes.
    let mut h = Harness::new();
    let c = connect_limited(&mut h, "c", true, 0, 16);
    h.received(c);
    let filters: Vec<_> = (0..15)
        .map(|i| crate::protocol::Filter::new(format!("t/{i}"), QoS::AtMostOnce))
        .collect();
    let subscribe = crate::protocol::Subscribe {
        pkid: 1,
        filters,
        properties: None,
    };
    h.send(c, Packet::Subscribe(subscribe));
    assert!(h.received(c).is_empty(), "a SUBACK over the limit was sent");
    assert!(!h.engine.is_closing(c));
    let skey = h.engine.conns[c].session.expect("attached");
    assert_eq!(
        h.engine.sessions[skey].subscriptions.len(),
        15,
        "{:?}",
        h.engine.stats
    );
}

#[test]
fn a_connack_that_cannot_fit_the_clients_maximum_is_not_sent() {
    // This broker's CONNACK carries at least Receive Maximum, Maximum Packet Size and
    // Topic Alias Maximum: 16 bytes. A client allowing fewer cannot be answered.
    let mut h = Harness::new();
    let c = connect_limited(&mut h, "c", true, 0, 15);
    assert!(h.received(c).is_empty());
    assert!(h.engine.is_closing(c));
    let c = connect_limited(&mut h, "d", true, 0, 16);
    assert!(matches!(h.received(c).as_slice(), [Packet::ConnAck(_)]));
}
