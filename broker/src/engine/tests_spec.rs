//! Engine tests of protocol rules at the edges of the spec: which DISCONNECT reasons
//! publish the will, reserved bits, inflight messages the client can no longer take,
//! packets shrunk or withheld to fit the client's Maximum Packet Size.

use bytes::Bytes;

use super::tests::{publishes, will, Harness};
use super::ConnKey;
use crate::config::Config;
use crate::protocol::{
    ConnectProperties, Disconnect, DisconnectReasonCode, Packet, PubAck, PubAckReason, Publish, QoS,
};
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

fn publish_payload(h: &mut Harness, key: ConnKey, topic: &str, pkid: u16, len: usize) {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, Bytes::from(vec![b'x'; len]), None);
    p.pkid = pkid;
    h.send(key, Packet::Publish(p));
}

fn puback(h: &mut Harness, key: ConnKey, pkid: u16) {
    h.send(
        key,
        Packet::PubAck(PubAck {
            pkid,
            reason: PubAckReason::Success,
            properties: None,
        }),
    );
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
    publish_payload(&mut h, publisher, "t/big", 1, 1000);
    let got = h.received(c);
    assert_eq!(
        publishes(&got).len(),
        1,
        "the big one goes out while it fits"
    );
    h.engine.connection_lost(c, h.now);
    // Queued behind the window of one while the client is away.
    publish_payload(&mut h, publisher, "t/small", 2, 10);

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
