//! Engine tests without sockets or clocks: clients are byte buffers, time is a variable.
//! (End-to-end tests over real sockets with real clients live in `supervisor/tests`.)

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::{ConnKey, DriverId, Engine};
use crate::cluster::loopback::LoopbackNet;
use crate::cluster::{Standalone, StreamKind};
use crate::config::Config;
use crate::model::NodeId;
use crate::protocol::{
    ConnectProperties, DisconnectReasonCode, Filter, LastWill, LastWillProperties, Packet, PubAck,
    PubAckReason, Publish, QoS, Subscribe,
};
use rumqttc::v5::mqttbytes::v5 as wire;

pub(super) struct Harness {
    pub(super) engine: Engine,
    /// The driver the test plays (connections are accepted on it).
    pub(super) driver: DriverId,
    pub(super) now: Instant,
    /// Keep-alive asked for by the next `connect` (0: none, so time jumps cut no one off).
    keep_alive: u16,
}

impl Harness {
    pub(super) fn new() -> Harness {
        Harness::with_config(Config::default())
    }

    pub(super) fn with_config(config: Config) -> Harness {
        let mut engine = Engine::new(Rc::new(config), Box::new(Standalone));
        let driver = engine.add_driver("tcp", &[StreamKind::Mqtt]);
        Harness {
            engine,
            driver,
            now: Instant::now(),
            keep_alive: 0,
        }
    }

    /// Feeds `packet` to the engine as a driver does: behind whatever bytes of `key` the
    /// engine kept from earlier reads (`prepare_read`).
    pub(super) fn send(&mut self, key: ConnKey, packet: Packet) {
        let mut bytes = BytesMut::new();
        self.engine.prepare_read(key, &mut bytes);
        packet.write(&mut bytes, None).unwrap();
        self.engine.handle_read(key, &mut bytes, self.now);
    }

    /// Everything the engine has written to `key` since the last call, decoded as v5.
    /// Like a driver that wrote it all, it then tells the engine the output was flushed.
    pub(super) fn received(&mut self, key: ConnKey) -> Vec<Packet> {
        let Some(out) = self.engine.output(key) else {
            return Vec::new();
        };
        let mut packets = Vec::new();
        let len = out.len();
        while !out.is_empty() {
            packets.push(wire::Packet::read(out, None).unwrap());
        }
        self.engine.output_flushed(key, len);
        packets
    }

    pub(super) fn connect(
        &mut self,
        id: &str,
        clean: bool,
        expiry: u32,
        will: Option<LastWill>,
    ) -> ConnKey {
        let key = self.engine.accept(self.driver, self.now, None);
        let mut props = ConnectProperties::new();
        props.session_expiry_interval = Some(expiry);
        let connect = wire::Connect {
            keep_alive: self.keep_alive,
            client_id: id.into(),
            clean_start: clean,
            properties: Some(props),
        };
        self.send(key, Packet::Connect(connect, will, None));
        match self.received(key).as_slice() {
            [Packet::ConnAck(ack)] => assert_eq!(ack.code, wire::ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        key
    }

    pub(super) fn subscribe(&mut self, key: ConnKey, filter: &str, qos: QoS) {
        self.send(
            key,
            Packet::Subscribe(Subscribe::new(Filter::new(filter, qos), None)),
        );
        assert!(matches!(self.received(key).as_slice(), [Packet::SubAck(_)]));
    }

    pub(super) fn publish(&mut self, key: ConnKey, topic: &str, qos: QoS, pkid: u16) {
        let mut p = Publish::new(topic, qos, Bytes::from_static(b"x"), None);
        p.pkid = pkid;
        self.send(key, Packet::Publish(p));
    }

    pub(super) fn advance(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        self.engine.tick(self.now);
    }
}

/// A PUBLISH of `len` bytes.
pub(super) fn publish_payload(
    h: &mut Harness,
    key: ConnKey,
    topic: &str,
    qos: QoS,
    pkid: u16,
    len: usize,
) {
    let mut p = Publish::new(topic, qos, Bytes::from(vec![b'x'; len]), None);
    p.pkid = pkid;
    h.send(key, Packet::Publish(p));
}

pub(super) fn puback(h: &mut Harness, key: ConnKey, pkid: u16) {
    h.send(
        key,
        Packet::PubAck(PubAck {
            pkid,
            reason: PubAckReason::Success,
            properties: None,
        }),
    );
}

pub(super) fn publishes(packets: &[Packet]) -> Vec<&Publish> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect()
}

pub(super) fn will(topic: &str, delay: u32) -> LastWill {
    let props = LastWillProperties {
        delay_interval: Some(delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    LastWill::new(topic, "gone", QoS::AtLeastOnce, false, Some(props))
}

#[test]
fn qos_is_downgraded_to_the_subscription() {
    let mut h = Harness::new();
    let sub = h.connect("sub", true, 0, None);
    let publisher = h.connect("pub", true, 0, None);
    h.subscribe(sub, "t/+", QoS::AtMostOnce);
    h.publish(publisher, "t/1", QoS::ExactlyOnce, 7);
    assert!(matches!(h.received(publisher).as_slice(), [Packet::PubRec(r)] if r.pkid == 7));
    let got = h.received(sub);
    let got = publishes(&got);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].qos, QoS::AtMostOnce);
}

#[test]
fn keep_alive_timeout_disconnects_and_publishes_the_will() {
    let mut h = Harness::new();
    let watcher = h.connect("watcher", true, 0, None);
    h.subscribe(watcher, "wills/#", QoS::AtLeastOnce);
    h.keep_alive = 10;
    let silent = h.connect("silent", true, 0, Some(will("wills/silent", 0)));
    // Keep-alive 10 s: still fine at 14 s (< 1.5 x), cut off at 16 s.
    h.advance(14);
    assert!(!h.engine.is_closing(silent));
    h.advance(2);
    assert!(h.engine.is_closing(silent));
    match h.received(silent).as_slice() {
        [Packet::Disconnect(d)] => {
            assert_eq!(d.reason_code, DisconnectReasonCode::KeepAliveTimeout)
        }
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
    let got = h.received(watcher);
    assert_eq!(publishes(&got)[0].topic, "wills/silent");
}

#[test]
fn will_delay_is_cancelled_by_a_reconnect_and_fires_otherwise() {
    let mut h = Harness::new();
    let watcher = h.connect("watcher", true, 0, None);
    h.subscribe(watcher, "wills/#", QoS::AtLeastOnce);

    let c = h.connect("a", false, 100, Some(will("wills/a", 5)));
    h.engine.connection_lost(c, h.now);
    h.advance(3);
    let _back = h.connect("a", false, 100, None);
    h.advance(10);
    assert!(
        publishes(&h.received(watcher)).is_empty(),
        "will sent despite reconnect"
    );

    let c = h.connect("b", false, 100, Some(will("wills/b", 5)));
    h.engine.connection_lost(c, h.now);
    h.advance(3);
    assert!(
        publishes(&h.received(watcher)).is_empty(),
        "will sent before its delay"
    );
    h.advance(3);
    let got = h.received(watcher);
    assert_eq!(publishes(&got)[0].topic, "wills/b");
}

#[test]
fn offline_session_expires_after_its_interval() {
    let mut h = Harness::new();
    let c = h.connect("p", false, 30, None);
    h.subscribe(c, "q", QoS::AtLeastOnce);
    h.engine.connection_lost(c, h.now);
    h.advance(29);
    assert_eq!(h.engine.session_count(), 1);
    h.advance(2);
    assert_eq!(h.engine.session_count(), 0);
    assert_eq!(h.engine.subscription_count(), 0);
}

#[test]
fn unacknowledged_qos1_is_resent_with_dup_on_resume() {
    let mut h = Harness::new();
    let sub = h.connect("s", false, 60, None);
    h.subscribe(sub, "q", QoS::AtLeastOnce);
    let publisher = h.connect("p", true, 0, None);
    h.publish(publisher, "q", QoS::AtLeastOnce, 1);
    let first = h.received(sub);
    let first = publishes(&first)[0].clone();
    assert!(!first.dup);
    h.engine.connection_lost(sub, h.now);
    let key = h.engine.accept(h.driver, h.now, None);
    let connect = wire::Connect {
        keep_alive: 10,
        client_id: "s".into(),
        clean_start: false,
        properties: None,
    };
    h.send(key, Packet::Connect(connect, None, None));
    let got = h.received(key);
    assert!(matches!(&got[0], Packet::ConnAck(a) if a.session_present));
    let again = publishes(&got);
    assert_eq!(again.len(), 1);
    assert!(again[0].dup);
    assert_eq!(again[0].pkid, first.pkid);
    // Acknowledged now: nothing more on the next resume.
    h.send(
        key,
        Packet::PubAck(PubAck {
            pkid: first.pkid,
            reason: PubAckReason::Success,
            properties: None,
        }),
    );
    assert!(h.received(key).is_empty());
}

#[test]
fn second_connection_takes_the_session_over() {
    let mut h = Harness::new();
    let first = h.connect("dup", false, 60, None);
    let _second = h.connect("dup", false, 60, None);
    assert!(h.engine.is_closing(first));
    match h.received(first).as_slice() {
        [Packet::Disconnect(d)] => {
            assert_eq!(d.reason_code, DisconnectReasonCode::SessionTakenOver)
        }
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    assert_eq!(h.engine.session_count(), 1);
}

#[test]
fn offline_queue_is_bounded() {
    let mut config = Config::default();
    config.limits.max_queued_messages = 2;
    let mut h = Harness::with_config(config);
    let sub = h.connect("s", false, 60, None);
    h.subscribe(sub, "q", QoS::AtLeastOnce);
    h.engine.connection_lost(sub, h.now);
    let publisher = h.connect("p", true, 0, None);
    for pkid in 1..=4 {
        h.publish(publisher, "q", QoS::AtLeastOnce, pkid);
    }
    assert_eq!(h.engine.stats.dropped_queue_full, 2);
}

/// Idle memory per connection is a headline figure: these structs are per connection and
/// per session, so growing them is a decision to make knowingly (docs/PERFORMANCE.md).
#[test]
fn per_connection_structs_stay_small() {
    let conn = std::mem::size_of::<super::Conn>();
    assert!(conn <= 168, "Conn grew to {conn}");
    assert!(std::mem::size_of::<super::Session>() <= 240, "Session grew");
}

/// Each driver sees only its own connections: a second driver's connections go on its own
/// dirty list, and their handoffs are not in the first driver's list.
#[test]
fn each_driver_has_its_own_dirty_list_and_handoffs() {
    let mut h = Harness::new();
    let other = h.engine.add_driver("quic", &[]);
    let first = h.connect("dirty-first", true, 0, None);
    let second = h
        .engine
        .accept(other, h.now, Some(std::net::IpAddr::from([127, 0, 0, 1])));
    let connect = wire::Connect {
        keep_alive: 0,
        client_id: "dirty-second".into(),
        clean_start: true,
        properties: None,
    };
    h.send(second, Packet::Connect(connect, None, None));
    let mut keys = Vec::new();
    h.engine.take_dirty(other, &mut keys);
    assert_eq!(keys, [second], "the CONNACK");
    h.engine.take_dirty(h.driver, &mut keys);
    assert!(!keys.contains(&second));
    h.received(second);
    h.subscribe(second, "d/#", QoS::AtMostOnce);
    h.received(second);
    h.engine.take_dirty(other, &mut keys);
    h.engine.take_dirty(h.driver, &mut keys);
    h.publish(first, "d/1", QoS::AtMostOnce, 0);
    h.engine.take_dirty(other, &mut keys);
    assert_eq!(keys, [second], "the delivery");
    h.engine.take_dirty(h.driver, &mut keys);
    assert!(!keys.contains(&second));
    assert_eq!(h.engine.driver_connections(other), 1);

    // Worker 0 of 2: a client id living on worker 1 leaves, from the second driver's list.
    let net = LoopbackNet::new();
    let backend = LoopbackNet::join(&net, NodeId::local(0));
    let _peer = LoopbackNet::join(&net, NodeId::local(1));
    let mut engine = Engine::new(Rc::new(Config::default()), backend.cluster);
    let tcp = engine.add_driver("tcp", &[StreamKind::Mqtt]);
    let quic = engine.add_driver("quic", &[]);
    let id = (0..)
        .map(|i| format!("away-{i}"))
        .find(|id| crate::cluster::home_worker(id, 2) == 1)
        .unwrap();
    let key = engine.accept(quic, h.now, Some(std::net::IpAddr::from([127, 0, 0, 1])));
    let connect = wire::Connect {
        keep_alive: 0,
        client_id: id,
        clean_start: true,
        properties: None,
    };
    let mut bytes = BytesMut::new();
    Packet::Connect(connect, None, None)
        .write(&mut bytes, None)
        .unwrap();
    let sent = Bytes::copy_from_slice(&bytes);
    engine.handle_read(key, &mut bytes, h.now);
    assert!(engine.take_handoffs(tcp).is_empty());
    let handoff = engine.take_handoff(key).expect("a handoff");
    assert_eq!(
        (handoff.key, handoff.to, handoff.bytes),
        (key, NodeId::local(1), sent)
    );
    assert_eq!(engine.driver_connections(tcp), 0);
    assert_eq!(engine.connection_count(), 1);
}
#[test]
fn print_session_size() {
    eprintln!("SESSION {}", std::mem::size_of::<super::Session>());
}
