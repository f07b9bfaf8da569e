//! Engine tests across workers: several engines joined by the in-memory loopback backend,
//! each driven like the single-engine `Harness` of `tests.rs` (clients are byte buffers,
//! time is a variable). The test decides when each worker's cluster inbox is drained, so
//! route replication, barriers, shared groups, peer loss and session handover are
//! exercised deterministically, without processes, sockets or sleeps.

use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::task::{Context, Waker};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::tests::{publishes, Harness};
use super::{ConnKey, Engine};
use crate::cluster::loopback::LoopbackNet;
use crate::cluster::{ClusterEvent, ClusterInbox, Lifecycle, StreamKind};
use crate::config::Config;
use crate::model::{NodeId, SessionImage};
use crate::protocol::{
    ConnectProperties, Filter, Packet, PubAck, PubAckReason, Publish, QoS, Subscribe,
    SubscribeReasonCode, Unsubscribe,
};
use rumqttc::mqttbytes::v4 as wire4;
use rumqttc::v5::mqttbytes::v5 as wire;

/// Rounds of inbox draining after which `settle` gives up: the events of one test step
/// settle in a handful, so more means the workers keep talking to each other forever.
const MAX_ROUNDS: usize = 1000;

/// One worker: its engine and driver (inside a single-engine `Harness`, so that harness's
/// client helpers serve here too) and the two backend parts the worker itself keeps.
struct Node {
    id: NodeId,
    h: Harness,
    inbox: Rc<ClusterInbox>,
    lifecycle: Box<dyn Lifecycle>,
}

/// A cluster of workers on one `LoopbackNet`, addressed by index (the order they were
/// created in). A worker that left is `None` until it is restarted.
struct Workers {
    net: Rc<RefCell<LoopbackNet>>,
    nodes: Vec<Option<Node>>,
    config: Config,
    now: Instant,
}

impl Workers {
    /// `n` workers on the local host, `NodeId::local(0..n)`, peers synced.
    fn new(n: u16) -> Workers {
        Workers::on(&(0..n).map(NodeId::local).collect::<Vec<_>>())
    }

    /// One worker per id (possibly on several hosts), peers synced.
    fn on(ids: &[NodeId]) -> Workers {
        Workers::with_config(ids, Config::default())
    }

    fn with_config(ids: &[NodeId], config: Config) -> Workers {
        let mut w = Workers {
            net: LoopbackNet::new(),
            nodes: Vec::new(),
            config,
            now: Instant::now(),
        };
        for &id in ids {
            let node = w.start(id);
            w.nodes.push(Some(node));
        }
        w.settle();
        w
    }

    /// A fresh process for `id`: joins the net (its peers hear `PeerJoined`) and gets an
    /// engine with one driver that adopts MQTT streams, as the worker sets it up. Reuses
    /// the `Harness` by swapping its standalone engine for one on the loopback backend.
    fn start(&self, id: NodeId) -> Node {
        self.start_with(id, LoopbackNet::join)
    }

    /// As `start`, with the net's `join` or `replace`.
    fn start_with(
        &self,
        id: NodeId,
        join: fn(&Rc<RefCell<LoopbackNet>>, NodeId) -> crate::cluster::Backend,
    ) -> Node {
        let backend = join(&self.net, id);
        let mut h = Harness::with_config(self.config.clone());
        h.engine = Engine::new(Rc::new(self.config.clone()), backend.cluster);
        h.driver = h.engine.add_driver("tcp", &[StreamKind::Mqtt]);
        h.now = self.now;
        Node {
            id,
            h,
            inbox: backend.inbox,
            lifecycle: backend.lifecycle,
        }
    }

    fn node(&mut self, i: usize) -> &mut Harness {
        &mut self.nodes[i].as_mut().expect("worker is down").h
    }

    fn id(&self, i: usize) -> NodeId {
        self.nodes[i].as_ref().expect("worker is down").id
    }

    /// Feeds worker `i` what its inbox holds now (not what that produces); the count.
    fn drain(&mut self, i: usize) -> usize {
        let Some(node) = self.nodes[i].as_mut() else {
            return 0;
        };
        let mut events = Vec::new();
        node.inbox.take(&mut events);
        let n = events.len();
        for event in events {
            node.h.engine.handle_cluster(event, self.now);
        }
        n
    }

    /// Drains every inbox, round after round, until all are empty: the cluster is quiet.
    fn settle(&mut self) {
        for _ in 0..MAX_ROUNDS {
            let handled: usize = (0..self.nodes.len()).map(|i| self.drain(i)).sum();
            if handled == 0 {
                return;
            }
        }
        panic!("cluster did not settle in {MAX_ROUNDS} rounds");
    }

    /// Worker `i`'s process is gone: its peers hear `PeerLeft`.
    fn leave(&mut self, i: usize) {
        let id = self.id(i);
        self.net.borrow_mut().leave(id);
        self.nodes[i] = None;
    }

    /// A new process for slot `i` (same node id, empty engine) joins; peers synced.
    fn restart(&mut self, i: usize, id: NodeId) {
        assert!(self.nodes[i].is_none(), "worker {i} is still up");
        let node = self.start(id);
        self.nodes[i] = Some(node);
        self.settle();
    }

    /// What a worker does when it drains: hands its persistent sessions to the backend
    /// (`Lifecycle::hand_over_sessions`), which keeps them for the test to pass on.
    fn export(net: &Rc<RefCell<LoopbackNet>>, node: &mut Node) -> Vec<SessionImage> {
        let now = node.h.now;
        let engine = &mut node.h.engine;
        let mut done = node
            .lifecycle
            .hand_over_sessions(Box::new(move || engine.export_sessions(now)));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            done.as_mut().poll(&mut cx).is_ready(),
            "loopback waits for nothing"
        );
        drop(done);
        net.borrow_mut().take_handed_over(node.id)
    }

    /// A client id whose home is worker `i`, as the cluster computes it now.
    fn client_id(&self, i: usize, prefix: &str) -> String {
        let node = self.nodes[i].as_ref().expect("worker is down");
        (0..)
            .map(|n| format!("{prefix}-{n}"))
            .find(|id| node.h.engine.cluster.home_of(id) == node.id)
            .unwrap()
    }

    /// A clean v5 client on worker `i` (its id lives there).
    fn connect(&mut self, i: usize, prefix: &str) -> ConnKey {
        let id = self.client_id(i, prefix);
        self.node(i).connect(&id, true, 0, None)
    }

    /// SUBSCRIBE, then the cluster settles (the SUBACK may wait for a barrier): granted.
    /// Returns what followed the SUBACK (retained messages).
    fn subscribe(&mut self, i: usize, key: ConnKey, filter: &str, qos: QoS) -> Vec<Packet> {
        self.send_subscribe(i, key, filter, qos);
        self.settle();
        let mut got = self.node(i).received(key);
        let rest = got.split_off(1.min(got.len()));
        assert_eq!(suback_codes(&got), [granted(qos)]);
        rest
    }

    fn send_subscribe(&mut self, i: usize, key: ConnKey, filter: &str, qos: QoS) {
        let subscribe = Subscribe::new(Filter::new(filter, qos), None);
        self.node(i).send(key, Packet::Subscribe(subscribe));
    }

    /// Sends a PUBLISH; the cluster is not settled (the test decides when).
    fn publish(&mut self, i: usize, key: ConnKey, topic: &str, payload: &str, qos: QoS, pkid: u16) {
        let p = Publish::new(topic, qos, Bytes::copy_from_slice(payload.as_bytes()), None);
        self.send_publish(i, key, Publish { pkid, ..p });
    }

    /// Sends a retained QoS 1 PUBLISH (an empty payload clears the topic's).
    fn publish_retained(&mut self, i: usize, key: ConnKey, topic: &str, payload: &str, pkid: u16) {
        let p = Publish::new(topic, QoS::AtLeastOnce, payload.to_owned(), None);
        self.send_publish(
            i,
            key,
            Publish {
                pkid,
                retain: true,
                ..p
            },
        );
    }

    fn send_publish(&mut self, i: usize, key: ConnKey, p: Publish) {
        self.node(i).send(key, Packet::Publish(p));
    }

    /// Payloads of the PUBLISHes worker `i` wrote to `key` since the last look.
    fn payloads(&mut self, i: usize, key: ConnKey) -> Vec<String> {
        payloads(&self.node(i).received(key))
    }

    /// Messages the engine of worker `i` forwarded to other workers so far.
    fn forwarded(&mut self, i: usize) -> u64 {
        self.node(i).engine.stats.forwarded
    }
}

fn payloads(packets: &[Packet]) -> Vec<String> {
    publishes(packets)
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

fn granted(qos: QoS) -> SubscribeReasonCode {
    SubscribeReasonCode::Success(qos)
}

fn suback_codes(packets: &[Packet]) -> Vec<SubscribeReasonCode> {
    match packets {
        [Packet::SubAck(ack)] => ack.return_codes.clone(),
        other => panic!("expected one SUBACK, got {other:?}"),
    }
}

fn pubacks(packets: &[Packet]) -> Vec<u16> {
    packets
        .iter()
        .map(|p| match p {
            Packet::PubAck(a) => a.pkid,
            other => panic!("expected PUBACK, got {other:?}"),
        })
        .collect()
}

/// A socket stand-in for `Engine::hand_off` (the loopback never reads it).
fn socket() -> OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

/// The bytes of a v5 CONNECT (what a driver reads first).
fn v5_connect(id: &str, clean: bool, expiry: u32) -> BytesMut {
    let mut props = ConnectProperties::new();
    props.session_expiry_interval = Some(expiry);
    let connect = wire::Connect {
        keep_alive: 0,
        client_id: id.into(),
        clean_start: clean,
        properties: Some(props),
    };
    let mut bytes = BytesMut::new();
    Packet::Connect(connect, None, None)
        .write(&mut bytes, None)
        .unwrap();
    bytes
}

/// The bytes of a 3.1.1 CONNECT.
fn v311_connect(id: &str) -> BytesMut {
    let mut connect = wire4::Connect::new(id);
    connect.keep_alive = 0;
    let mut bytes = BytesMut::new();
    wire4::Packet::Connect(connect)
        .write(&mut bytes, usize::MAX)
        .unwrap();
    bytes
}

#[test]
fn remote_subscription_becomes_a_route_and_unsubscribe_withdraws_it() {
    let mut w = Workers::new(2);
    let sub = w.connect(1, "sub");
    let publisher = w.connect(0, "pub");
    assert_eq!(w.node(0).engine.routes.len(), 0);
    w.subscribe(1, sub, "t/+", QoS::AtLeastOnce);
    assert_eq!(
        w.node(0).engine.routes.len(),
        1,
        "node 1's route, replicated"
    );

    w.publish(0, publisher, "t/1", "hello", QoS::AtLeastOnce, 1);
    assert_eq!(pubacks(&w.node(0).received(publisher)), [1]);
    w.settle();
    assert_eq!(w.net.borrow().forwarded, 1);
    let got = w.node(1).received(sub);
    let got = publishes(&got);
    assert_eq!(got.len(), 1, "exactly one delivery");
    assert_eq!(
        (&got[0].topic[..], &got[0].payload[..]),
        (&b"t/1"[..], &b"hello"[..])
    );
    assert_eq!(got[0].qos, QoS::AtLeastOnce);

    let unsubscribe = Unsubscribe {
        pkid: 2,
        filters: vec!["t/+".into()],
        properties: None,
    };
    w.node(1).send(sub, Packet::Unsubscribe(unsubscribe));
    assert!(matches!(w.node(1).received(sub).as_slice(), [Packet::UnsubAck(a)] if a.pkid == 2));
    w.settle();
    assert_eq!(w.node(0).engine.routes.len(), 0, "route withdrawn");
    w.publish(0, publisher, "t/1", "again", QoS::AtLeastOnce, 2);
    w.settle();
    assert_eq!(w.net.borrow().forwarded, 1, "nothing more forwarded");
    assert_eq!(w.forwarded(0), 1);
    assert!(w.node(1).received(sub).is_empty());
}

#[test]
fn suback_waits_until_every_peer_has_applied_the_route() {
    let mut w = Workers::new(3);
    let sub = w.connect(0, "sub");
    w.send_subscribe(0, sub, "b/#", QoS::AtLeastOnce);
    // Node 0 alone can do nothing about it: its peers have not applied the route yet.
    w.drain(0);
    assert!(
        w.node(0).received(sub).is_empty(),
        "SUBACK before any peer applied the route"
    );
    assert_eq!(w.drain(1), 2, "RouteAdded, BarrierRequested");
    w.drain(0);
    assert!(
        w.node(0).received(sub).is_empty(),
        "SUBACK with node 2 still behind"
    );
    assert_eq!(w.drain(2), 2);
    assert_eq!(w.node(2).engine.routes.len(), 1);
    assert_eq!(w.drain(0), 1, "BarrierDone");
    assert_eq!(
        suback_codes(&w.node(0).received(sub)),
        [granted(QoS::AtLeastOnce)]
    );
    w.settle();

    let publisher = w.connect(2, "pub");
    w.publish(2, publisher, "b/1", "after-suback", QoS::AtMostOnce, 0);
    w.settle();
    assert_eq!(w.payloads(0, sub), ["after-suback"]);
}

#[test]
fn retained_message_is_replicated_acknowledged_after_peers_and_cleared_everywhere() {
    let mut w = Workers::new(3);
    let publisher = w.connect(0, "pub");
    w.publish_retained(0, publisher, "r/1", "kept", 1);
    // A later PUBLISH's ack queues behind the held one (acks go in PUBLISH order).
    w.publish(0, publisher, "plain", "x", QoS::AtLeastOnce, 2);
    assert!(
        w.node(0).received(publisher).is_empty(),
        "PUBACK before peers stored it"
    );
    w.drain(1);
    w.drain(0);
    assert!(
        w.node(0).received(publisher).is_empty(),
        "PUBACK with node 2 behind"
    );
    w.drain(2);
    w.drain(0);
    assert_eq!(pubacks(&w.node(0).received(publisher)), [1, 2]);
    for i in 0..3 {
        assert_eq!(w.node(i).engine.retained_count(), 1, "worker {i}");
    }

    let late = w.connect(2, "late");
    let got = w.subscribe(2, late, "r/#", QoS::AtLeastOnce);
    let got = publishes(&got);
    assert_eq!(got.len(), 1);
    assert!(got[0].retain);
    assert_eq!(&got[0].payload[..], b"kept");

    w.publish_retained(0, publisher, "r/1", "", 3);
    w.settle();
    assert_eq!(pubacks(&w.node(0).received(publisher)), [3]);
    for i in 0..3 {
        assert_eq!(w.node(i).engine.retained_count(), 0, "worker {i}");
    }
    let later = w.connect(1, "later");
    let got = w.subscribe(1, later, "r/#", QoS::AtLeastOnce);
    assert!(got.is_empty(), "cleared retained message sent: {got:?}");
}

#[test]
fn shared_group_over_two_workers_gets_each_message_exactly_once() {
    let mut w = Workers::new(3);
    let a = w.connect(0, "member-a");
    let b = w.connect(1, "member-b");
    w.subscribe(0, a, "$share/g/t", QoS::AtLeastOnce);
    w.subscribe(1, b, "$share/g/t", QoS::AtLeastOnce);
    let publisher = w.connect(2, "pub");
    for n in 0..10u16 {
        w.publish(2, publisher, "t", &format!("m{n}"), QoS::AtLeastOnce, n + 1);
    }
    w.settle();
    let got_a = w.payloads(0, a);
    let got_b = w.payloads(1, b);
    let mut all: Vec<&String> = got_a.iter().chain(&got_b).collect();
    all.sort();
    all.dedup();
    assert_eq!(got_a.len() + got_b.len(), 10, "{got_a:?} {got_b:?}");
    assert_eq!(all.len(), 10, "duplicates: {got_a:?} {got_b:?}");
    // The route table picks the serving worker round-robin.
    assert_eq!((got_a.len(), got_b.len()), (5, 5));
    assert_eq!(w.forwarded(2), 10, "one frame per message");
}

#[test]
fn lost_peer_routes_go_its_barriers_complete_and_its_successor_gets_messages() {
    let mut w = Workers::new(3);
    let node1 = w.id(1);
    let old = w.connect(1, "old");
    w.subscribe(1, old, "p/#", QoS::AtMostOnce);
    let publisher = w.connect(0, "pub");
    let waiting = w.connect(0, "waiting");
    // A SUBACK on node 0 that node 2 confirms and node 1 never will.
    w.send_subscribe(0, waiting, "w/#", QoS::AtMostOnce);
    w.drain(2);
    w.drain(0);
    assert!(
        w.node(0).received(waiting).is_empty(),
        "SUBACK before node 1 confirmed"
    );

    w.leave(1);
    w.settle();
    assert_eq!(
        suback_codes(&w.node(0).received(waiting)),
        [granted(QoS::AtMostOnce)],
        "barrier completed by node 1 leaving"
    );
    assert_eq!(
        w.node(0).engine.routes.len(),
        1,
        "only node 0's own w/# route left"
    );
    w.publish(0, publisher, "p/1", "lost", QoS::AtMostOnce, 0);
    w.settle();
    assert_eq!(w.forwarded(0), 0, "node 1's routes are gone");

    w.restart(1, node1);
    let new = w.connect(1, "new");
    w.subscribe(1, new, "p/#", QoS::AtMostOnce);
    assert_eq!(
        w.node(1).engine.routes.len(),
        2,
        "synced w/# from node 0, own p/#"
    );
    w.publish(0, publisher, "p/1", "back", QoS::AtMostOnce, 0);
    w.settle();
    assert_eq!(w.payloads(1, new), ["back"]);
    assert_eq!(w.forwarded(0), 1);
}

#[test]
fn drained_session_moves_to_the_successor_with_its_queue_in_order() {
    let mut w = Workers::new(2);
    let node1 = w.id(1);
    let id = w.client_id(1, "persistent");
    let sub = w.node(1).connect(&id, false, 3600, None);
    w.subscribe(1, sub, "q", QoS::AtLeastOnce);
    let now = w.now;
    w.node(1).engine.connection_lost(sub, now);
    let publisher = w.connect(0, "pub");
    for n in 0..5u16 {
        w.publish(0, publisher, "q", &format!("{n}"), QoS::AtLeastOnce, n + 1);
    }
    w.settle();
    assert_eq!(w.forwarded(0), 5);

    // Rolling restart of node 1: the successor starts while the old process still runs;
    // node 0 keeps node 1's route, and the successor holds what comes meanwhile.
    let mut old = w.nodes[1].take().unwrap();
    let mut successor = w.start_with(node1, LoopbackNet::replace);
    successor.h.engine.begin_takeover();
    w.nodes[1] = Some(successor);
    w.settle();
    w.publish(0, publisher, "q", "5", QoS::AtLeastOnce, 6);
    w.settle();
    assert_eq!(w.forwarded(0), 6, "published during the roll: still routed");
    // The old one drains: its sessions go (its route withdrawal is ignored).
    let images = Workers::export(&w.net, &mut old);
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].client_id, id);
    assert_eq!(images[0].queue.len() + images[0].inflight.len(), 5);
    drop(old);
    w.settle();
    assert_eq!(
        w.node(0).engine.routes.len(),
        1,
        "kept while the successor imports"
    );
    let inbox = w.nodes[1].as_ref().unwrap().inbox.clone();
    for image in images {
        inbox.push(ClusterEvent::SessionImported(Box::new(image)));
    }
    w.settle();
    let now = w.now;
    w.node(1).engine.end_takeover(now);
    w.settle();
    assert_eq!(w.node(1).engine.session_count(), 1);
    assert_eq!(w.node(0).engine.routes.len(), 1, "re-announced, so kept");
    assert!(w.node(0).engine.stale_routes.is_empty(), "settled");

    let h = w.node(1);
    let key = h.engine.accept(h.driver, h.now, None);
    h.engine
        .handle_read(key, &mut v5_connect(&id, false, 3600), h.now);
    let got = h.received(key);
    assert!(
        matches!(&got[0], Packet::ConnAck(a) if a.code == wire::ConnectReturnCode::Success && a.session_present),
        "{:?}",
        got[0]
    );
    let resumed = publishes(&got);
    assert_eq!(
        payloads(&got),
        ["0", "1", "2", "3", "4", "5"],
        "lost 0, in order, no duplicates"
    );
    assert!(resumed.iter().all(|p| p.qos == QoS::AtLeastOnce && !p.dup));
    let mut pkids: Vec<u16> = resumed.iter().map(|p| p.pkid).collect();
    pkids.sort_unstable();
    pkids.dedup();
    assert_eq!(pkids.len(), 6);
    for pkid in pkids {
        let ack = PubAck {
            pkid,
            reason: PubAckReason::Success,
            properties: None,
        };
        h.send(key, Packet::PubAck(ack));
    }
    assert!(h.received(key).is_empty());

    // Live again: a new message reaches it through node 0.
    w.publish(0, publisher, "q", "6", QoS::AtLeastOnce, 7);
    w.settle();
    assert_eq!(w.payloads(1, key), ["6"]);
}

#[test]
fn handoff_to_another_host_is_refused_with_a_redirect() {
    let here = NodeId { host: 0, slot: 0 };
    let there = NodeId { host: 1, slot: 0 };
    let mut w = Workers::on(&[here, there]);
    let id = w.client_id(1, "elsewhere");

    // v5: "use another server", with the host the backend names.
    let h = w.node(0);
    let key = h.engine.accept(h.driver, h.now, None);
    h.engine
        .handle_read(key, &mut v5_connect(&id, true, 0), h.now);
    assert!(
        h.received(key).is_empty(),
        "CONNACK before the handoff was tried"
    );
    let handoff = h.engine.take_handoff(key).expect("a handoff");
    assert_eq!(handoff.to, there);
    assert!(
        h.engine
            .hand_off(handoff, StreamKind::Mqtt, socket())
            .is_err(),
        "socket kept"
    );
    match h.received(key).as_slice() {
        [Packet::ConnAck(ack)] => {
            assert_eq!(ack.code, wire::ConnectReturnCode::UseAnotherServer);
            let reference = ack
                .properties
                .as_ref()
                .and_then(|p| p.server_reference.as_deref());
            assert_eq!(reference, Some("host-1"));
        }
        other => panic!("expected CONNACK 0x9C, got {other:?}"),
    }
    assert!(h.engine.is_closing(key));
    assert_eq!(h.engine.stats.handed_off, 0);

    // 3.1.1 has no redirect: return code 3, "server unavailable".
    let key = h.engine.accept(h.driver, h.now, None);
    h.engine.handle_read(key, &mut v311_connect(&id), h.now);
    let handoff = h.engine.take_handoff(key).expect("a handoff");
    assert!(h
        .engine
        .hand_off(handoff, StreamKind::Mqtt, socket())
        .is_err());
    let out = h.engine.output(key).expect("connection still open");
    assert_eq!(&out[..], [0x20, 0x02, 0x00, 0x03]);
    let ack = wire4::Packet::read(out, usize::MAX).unwrap();
    let expected = wire4::ConnAck::new(wire4::ConnectReturnCode::ServiceUnavailable, false);
    assert_eq!(ack, wire4::Packet::ConnAck(expected));
    assert!(h.engine.is_closing(key));
    assert!(
        w.net.borrow().inbox(there).unwrap().is_empty(),
        "nothing crossed hosts"
    );
}

#[test]
fn handoff_within_a_host_is_adopted_by_the_home_worker() {
    let mut w = Workers::new(2);
    let id = w.client_id(1, "moved");
    let bytes = v5_connect(&id, true, 0);
    let h = w.node(0);
    let key = h.engine.accept(h.driver, h.now, None);
    h.engine.handle_read(key, &mut bytes.clone(), h.now);
    let handoff = h.engine.take_handoff(key).expect("a handoff");
    assert_eq!((handoff.to, &handoff.bytes[..]), (w.id(1), &bytes[..]));
    let h = w.node(0);
    assert!(h
        .engine
        .hand_off(handoff, StreamKind::Mqtt, socket())
        .is_ok());
    assert_eq!(
        (h.engine.connection_count(), h.engine.stats.handed_off),
        (0, 1)
    );
    w.settle();

    // Node 1's driver adopts the stream and reads the CONNECT bytes first.
    let h = w.node(1);
    let adopted = h.engine.take_adopted(h.driver);
    assert_eq!(adopted.len(), 1);
    let key = h.engine.accept(h.driver, h.now, None);
    h.engine
        .handle_read(key, &mut BytesMut::from(&adopted[0].bytes[..]), h.now);
    assert!(matches!(
        h.received(key).as_slice(),
        [Packet::ConnAck(a)] if a.code == wire::ConnectReturnCode::Success
    ));
    assert_eq!(h.engine.session_count(), 1);
}

// Barrier corner cases: what a client was told must hold on every worker, whatever it
// sends while its SUBSCRIBE waits.

/// A SUBSCRIBE whose route is already counted on this worker, because an earlier SUBSCRIBE
/// announced it and still waits for its barrier, waits for that barrier too: otherwise its
/// client would hold a SUBACK while node 1 has not applied the route.
#[test]
fn second_subscriber_to_an_unconfirmed_route_waits_for_its_barrier() {
    let mut w = Workers::new(2);
    let first = w.connect(0, "first");
    let second = w.connect(0, "second");
    let publisher = w.connect(1, "pub");
    w.send_subscribe(0, first, "x", QoS::AtMostOnce);
    w.send_subscribe(0, second, "x", QoS::AtMostOnce);
    let early = w.node(0).received(second);
    w.publish(1, publisher, "x", "after-suback", QoS::AtMostOnce, 0);
    w.settle();
    let got = w.payloads(0, second);
    assert!(
        early.is_empty() || got == ["after-suback"],
        "SUBACK {early:?} before node 1 had the route; then got {got:?}"
    );
}

/// An UNSUBSCRIBE that arrives while the same filter's SUBSCRIBE waits for its barrier
/// cancels it: the client that unsubscribed last is not subscribed, and its UNSUBACK
/// follows the SUBACK.
#[test]
fn unsubscribe_after_a_parked_subscribe_leaves_no_subscription() {
    let mut w = Workers::new(2);
    let c = w.connect(0, "c");
    let publisher = w.connect(1, "pub");
    w.send_subscribe(0, c, "x", QoS::AtMostOnce);
    let unsubscribe = Unsubscribe {
        pkid: 9,
        filters: vec!["x".into()],
        properties: None,
    };
    w.node(0).send(c, Packet::Unsubscribe(unsubscribe));
    assert!(
        w.node(0).received(c).is_empty(),
        "both acks wait for the barrier"
    );
    w.settle();
    match w.node(0).received(c).as_slice() {
        [Packet::SubAck(_), Packet::UnsubAck(u)] => {
            assert_eq!(u.pkid, 9);
            assert_eq!(u.reasons, [wire::UnsubAckReason::Success]);
        }
        other => panic!("expected SUBACK then UNSUBACK, got {other:?}"),
    }
    w.publish(1, publisher, "x", "after-unsubscribe", QoS::AtMostOnce, 0);
    w.settle();
    assert_eq!(w.payloads(0, c), Vec::<String>::new());
    assert_eq!(w.node(0).engine.subscription_count(), 0);
}

/// A SUBACK parked for a connection that is lost goes with it, not to the connection that
/// reuses its slot for the same session (a packet id that client never used).
#[test]
fn suback_parked_for_a_lost_connection_is_not_sent_to_its_successor() {
    let mut w = Workers::new(2);
    let id = w.client_id(0, "resumer");
    let old = w.node(0).connect(&id, false, 600, None);
    let subscribe = Subscribe::new(Filter::new("x", QoS::AtMostOnce), None);
    let subscribe = Subscribe {
        pkid: 7,
        ..subscribe
    };
    w.node(0).send(old, Packet::Subscribe(subscribe));
    let h = w.node(0);
    h.engine.connection_lost(old, h.now);
    let new = h.engine.accept(h.driver, h.now, None);
    assert_eq!(new, old, "the slot is reused");
    h.engine
        .handle_read(new, &mut v5_connect(&id, false, 600), h.now);
    assert!(matches!(h.received(new).as_slice(), [Packet::ConnAck(a)] if a.session_present));
    w.settle();
    let got = w.node(0).received(new);
    assert!(got.is_empty(), "the new connection got {got:?}");
}

/// While worker 1 is away (a rolling restart), its clients still belong to it: a
/// connection for one is handed over and waits, and worker 1's successor adopts it.
#[test]
fn client_of_an_absent_worker_waits_for_its_successor() {
    let mut w = Workers::new(2);
    let id = w.client_id(1, "homeless");
    let slot = w.id(1);
    w.leave(1);
    w.settle();
    let h = w.node(0);
    let key = h.engine.accept(h.driver, h.now, None);
    h.engine
        .handle_read(key, &mut v5_connect(&id, true, 0), h.now);
    let handoff = h.engine.take_handoff(key).expect("handed to worker 1");
    assert_eq!(handoff.to, slot);
    assert!(h
        .engine
        .hand_off(handoff, StreamKind::Mqtt, socket())
        .is_ok());
    assert_eq!(h.engine.session_count(), 0);
    assert_eq!(h.engine.connection_count(), 0);
    w.restart(1, slot);
    let h = w.node(1);
    let adopted = h.engine.take_adopted(h.driver);
    assert_eq!(
        adopted.len(),
        1,
        "the successor adopts the waiting connection"
    );
}

#[test]
fn session_behind_holds_the_peer_link_until_it_catches_up_and_drops_nothing() {
    let mut w = Workers {
        config: {
            let mut c = Config::default();
            c.limits.max_inflight = 1;
            c.limits.max_queued_messages = 4;
            c
        },
        ..Workers::new(0)
    };
    for i in 0..2 {
        let node = w.start(NodeId::local(i));
        w.nodes.push(Some(node));
    }
    w.settle();
    let sub = w.connect(1, "sub");
    w.subscribe(1, sub, "t", QoS::AtLeastOnce);
    let publisher = w.connect(0, "pub");
    for pkid in 1..=10 {
        w.publish(0, publisher, "t", &pkid.to_string(), QoS::AtLeastOnce, pkid);
    }
    w.settle();
    // One inflight, the queue past half its limit: node 1 holds node 0's link (a mesh
    // stops reading it) instead of dropping what node 0 acknowledged.
    let (n0, n1) = (w.id(0), w.id(1));
    assert!(w.net.borrow().held.contains(&(n1, n0)));
    let mut got = Vec::new();
    for _ in 0..20 {
        let packets = w.node(1).received(sub);
        for p in publishes(&packets) {
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
            let ack = PubAck::new(p.pkid, None);
            w.node(1).send(sub, Packet::PubAck(ack));
        }
    }
    let expected: Vec<String> = (1..=10).map(|n: u16| n.to_string()).collect();
    assert_eq!(got, expected, "every acknowledged message, in order");
    assert!(w.net.borrow().held.is_empty(), "released once it caught up");
    assert_eq!(w.node(1).engine.stats.dropped_queue_full, 0);
    assert!(w.node(1).engine.stats.peer_links_held > 0);
}

#[test]
fn delayed_will_moves_with_its_session_and_fires_on_the_successor() {
    let mut w = Workers::new(2);
    let node1 = w.id(1);
    let watcher = w.connect(0, "watcher");
    w.subscribe(0, watcher, "wills", QoS::AtLeastOnce);
    let id = w.client_id(1, "mortal");
    let will = super::tests::will("wills", 30);
    let client = w.node(1).connect(&id, false, 3600, Some(will));
    let now = w.now;
    // Gone without DISCONNECT: the will is due in 30 s.
    w.node(1).engine.connection_lost(client, now);
    w.settle();
    assert!(w.payloads(0, watcher).is_empty());

    let mut old = w.nodes[1].take().unwrap();
    let mut successor = w.start_with(node1, LoopbackNet::replace);
    successor.h.engine.begin_takeover();
    w.nodes[1] = Some(successor);
    w.settle();
    let images = Workers::export(&w.net, &mut old);
    assert_eq!(images[0].will.as_ref().map(|w| w.due_in), Some(30));
    drop(old);
    let inbox = w.nodes[1].as_ref().unwrap().inbox.clone();
    for image in images {
        inbox.push(ClusterEvent::SessionImported(Box::new(image)));
    }
    w.settle();
    let now = w.now;
    w.node(1).engine.end_takeover(now);
    w.settle();
    w.node(1).advance(29);
    w.settle();
    assert!(w.payloads(0, watcher).is_empty(), "not before its delay");
    w.node(1).advance(2);
    w.settle();
    assert_eq!(
        w.payloads(0, watcher),
        ["gone"],
        "published by the successor"
    );
}

impl Workers {
    /// Sends `packets` to worker `i` in one read, as a client that pipelines them does.
    fn send_pipelined(&mut self, i: usize, key: ConnKey, packets: Vec<Packet>) {
        let h = self.node(i);
        let mut bytes = BytesMut::new();
        h.engine.prepare_read(key, &mut bytes);
        for packet in packets {
            packet.write(&mut bytes, None).unwrap();
        }
        h.engine.handle_read(key, &mut bytes, h.now);
    }
}

/// A SUBSCRIBE with a v5 subscription identifier.
fn subscribe_with_id(pkid: u16, filter: &str, id: usize) -> Packet {
    let properties = wire::SubscribeProperties {
        id: Some(id),
        user_properties: Vec::new(),
    };
    let s = Subscribe::new(Filter::new(filter, QoS::AtLeastOnce), Some(properties));
    Packet::Subscribe(Subscribe { pkid, ..s })
}

/// The client's own PUBLISH, sent right behind a SUBSCRIBE that waits for its barrier,
/// takes effect after it (MQTT-4.6: packets take effect in the order sent): the client
/// gets the SUBACK, then its message, even though the route was still being confirmed.
#[test]
fn publish_behind_a_parked_subscribe_reaches_that_subscription() {
    let mut w = Workers::new(2);
    let c = w.connect(0, "c");
    let p = Publish::new("x", QoS::AtLeastOnce, Bytes::from_static(b"own"), None);
    w.send_pipelined(
        0,
        c,
        vec![
            subscribe_with_id(1, "x", 5),
            Packet::Publish(Publish { pkid: 2, ..p }),
        ],
    );
    w.settle();
    match w.node(0).received(c).as_slice() {
        [Packet::SubAck(s), Packet::Publish(m), Packet::PubAck(a)]
        | [Packet::SubAck(s), Packet::PubAck(a), Packet::Publish(m)] => {
            assert_eq!(s.pkid, 1);
            assert_eq!(&m.payload[..], b"own");
            assert_eq!(a.pkid, 2);
        }
        other => panic!("expected SUBACK, own PUBLISH and PUBACK, got {other:?}"),
    }
}

/// Paho's `test_subscribe_identifiers` on two workers: two pipelined SUBSCRIBEs with
/// identifiers 2 and 3, both new routes, then a PUBLISH matching both: one delivery
/// carrying both identifiers, whichever barrier completes when.
#[test]
fn pipelined_subscribes_with_identifiers_then_publish_carry_both_identifiers() {
    let mut w = Workers::new(2);
    let c = w.connect(0, "b");
    let p = Publish::new("t", QoS::AtLeastOnce, Bytes::from_static(b"ids"), None);
    w.send_pipelined(
        0,
        c,
        vec![
            subscribe_with_id(1, "t", 2),
            subscribe_with_id(2, "t/#", 3),
            Packet::Publish(Publish { pkid: 3, ..p }),
        ],
    );
    w.settle();
    let got = w.node(0).received(c);
    let subacks: Vec<u16> = got
        .iter()
        .filter_map(|p| match p {
            Packet::SubAck(s) => Some(s.pkid),
            _ => None,
        })
        .collect();
    assert_eq!(subacks, [1, 2], "SUBACKs in order: {got:?}");
    let msgs = publishes(&got);
    assert_eq!(msgs.len(), 1, "one delivery: {got:?}");
    let mut ids = msgs[0]
        .properties
        .as_ref()
        .map(|p| p.subscription_identifiers.clone())
        .unwrap_or_default();
    ids.sort_unstable();
    assert_eq!(ids, [2, 3]);
}

/// Pipelined SUBSCRIBE(x), UNSUBSCRIBE(x), SUBSCRIBE(x) in one read, the first waiting
/// for its barrier: acks in order, and the last packet wins (subscribed).
#[test]
fn subscribe_unsubscribe_subscribe_in_one_read_ends_subscribed() {
    let mut w = Workers::new(2);
    let c = w.connect(0, "c");
    let publisher = w.connect(1, "pub");
    let unsubscribe = Unsubscribe {
        pkid: 2,
        filters: vec!["x".into()],
        properties: None,
    };
    w.send_pipelined(
        0,
        c,
        vec![
            subscribe_with_id(1, "x", 1),
            Packet::Unsubscribe(unsubscribe),
            subscribe_with_id(3, "x", 1),
        ],
    );
    w.settle();
    match w.node(0).received(c).as_slice() {
        [Packet::SubAck(a), Packet::UnsubAck(u), Packet::SubAck(b)] => {
            assert_eq!((a.pkid, u.pkid, b.pkid), (1, 2, 3));
            assert_eq!(u.reasons, [wire::UnsubAckReason::Success]);
        }
        other => panic!("expected SUBACK, UNSUBACK, SUBACK, got {other:?}"),
    }
    w.publish(1, publisher, "x", "after", QoS::AtMostOnce, 0);
    w.settle();
    assert_eq!(w.payloads(0, c), ["after"]);
}

/// A client that pipelines SUBSCRIBE, PUBLISH and closes its socket before the SUBSCRIBE's
/// barrier completes: the PUBLISH read behind the SUBSCRIBE is not lost with it.
#[test]
fn packets_held_behind_a_parked_subscribe_take_effect_when_the_connection_is_lost() {
    let mut w = Workers::new(2);
    let listener = w.connect(1, "listener");
    w.subscribe(1, listener, "y", QoS::AtMostOnce);
    let c = w.connect(0, "c");
    let p = Publish::new(
        "y",
        QoS::AtMostOnce,
        Bytes::from_static(b"last words"),
        None,
    );
    w.send_pipelined(0, c, vec![subscribe_with_id(1, "x", 1), Packet::Publish(p)]);
    let h = w.node(0);
    assert_eq!(
        h.engine.stats.forwarded, 0,
        "the PUBLISH waits behind the SUBSCRIBE"
    );
    h.engine.connection_lost(c, h.now);
    w.settle();
    assert_eq!(w.payloads(1, listener), ["last words"]);
}

/// A peer that is connected but never answers (hung) holds a new route's SUBACK, the
/// packets behind it and a retained PUBLISH's PUBACK only until `cluster.barrier_timeout_ms`:
/// then they go out, and each barrier given up is counted. Its late answer changes nothing.
#[test]
fn barriers_a_hung_peer_never_confirms_time_out() {
    assert_eq!(Config::default().cluster.barrier_timeout_ms, 5_000);
    let mut config = Config::default();
    let timeout_ms = 2_500;
    config.cluster.barrier_timeout_ms = timeout_ms;
    let mut w = Workers::with_config(&[NodeId::local(0), NodeId::local(1)], config);
    let c = w.connect(0, "c");
    let p = Publish::new("x", QoS::AtMostOnce, Bytes::from_static(b"own"), None);
    w.send_pipelined(0, c, vec![subscribe_with_id(1, "x", 1), Packet::Publish(p)]);
    w.publish_retained(0, c, "r", "kept", 2);
    // Worker 1 never drains its inbox: it is hung.
    w.drain(0);
    let h = w.node(0);
    assert!(h.received(c).is_empty(), "all of it waits for the barriers");
    h.advance(1); // the first tick starts the clock
    assert!(h.received(c).is_empty(), "not before the timeout");
    h.now += std::time::Duration::from_millis(timeout_ms - 1);
    h.engine.tick(h.now);
    assert!(h.received(c).is_empty(), "not before the timeout");
    h.now += std::time::Duration::from_millis(1);
    h.engine.tick(h.now);
    match h.received(c).as_slice() {
        [Packet::SubAck(s), Packet::Publish(m)] => {
            assert_eq!(s.pkid, 1);
            assert_eq!(&m.payload[..], b"own");
        }
        other => panic!("expected SUBACK, own PUBLISH, got {other:?}"),
    }
    assert_eq!(h.engine.stats.barrier_timeouts, 1);
    // The retained PUBLISH, read behind the SUBSCRIBE, waits for a barrier of its own.
    h.advance(1);
    assert!(h.received(c).is_empty(), "PUBACK not before the timeout");
    h.now += std::time::Duration::from_millis(timeout_ms);
    h.engine.tick(h.now);
    assert!(matches!(h.received(c).as_slice(), [Packet::PubAck(a)] if a.pkid == 2));
    assert_eq!(
        h.engine.stats.barrier_timeouts, 2,
        "one per barrier given up"
    );

    // The peer wakes up: its late confirmations find nothing waiting.
    w.settle();
    assert!(w.node(0).received(c).is_empty());
    assert_eq!(w.node(0).engine.stats.barrier_timeouts, 2);
}

/// Paho's `test_subscribe_options` and `test_request_response` on four workers: a peer
/// that has applied a new route forwards a message for it while the subscriber's worker
/// still waits for the other peers' confirmations. The subscription is live on its own
/// worker from the start, so the message is delivered (MQTT-3.8.4 lets it precede the
/// SUBACK), not dropped for want of a subscription.
#[test]
fn message_forwarded_before_the_suback_reaches_the_new_subscription() {
    let mut w = Workers::new(3);
    let sub = w.connect(1, "sub");
    let publisher = w.connect(0, "pub");
    w.send_subscribe(1, sub, "x", QoS::AtLeastOnce);
    assert_eq!(w.drain(0), 2, "worker 0 applies the route and confirms");
    w.publish(0, publisher, "x", "early", QoS::AtLeastOnce, 1);
    assert_eq!(w.forwarded(0), 1, "worker 0 forwards it to worker 1");
    w.drain(1); // worker 0's confirmation and the message; worker 2 has not answered
    assert_eq!(w.payloads(1, sub), ["early"]);
    w.settle();
    assert_eq!(
        suback_codes(&w.node(1).received(sub)),
        [granted(QoS::AtLeastOnce)]
    );
}
