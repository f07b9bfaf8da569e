//! Ordering and exactly-once/at-least-once delivery under load: one publisher, one subscriber,
//! 1000 messages on one topic; and a client's pipelined packets taking effect in the order
//! sent on a broker of two workers, where a SUBSCRIBE to a new route waits for a barrier.

mod common;

use common::clients::payload_str;
use common::Broker;

const COUNT: usize = 1000;

mod v311 {
    use super::*;
    use common::clients::v4::*;

    /// Publishes COUNT messages (payload = index) from a separate task, then "done".
    /// `inflight`: how many QoS 1/2 PUBLISHes the publisher leaves unacknowledged (rumqttc's
    /// default is 100; 3.1.1 has no Receive Maximum to negotiate it down).
    async fn run(broker: &Broker, qos: QoS, tag: &str, inflight: u16) {
        let mut sub = connect(opts(broker, &format!("order-sub-{tag}"))).await;
        sub.subscribe("order/t", qos).await;

        let mut o = opts(broker, &format!("order-pub-{tag}"));
        o.set_inflight(inflight);
        let mut publ = connect(o).await;
        let client = publ.client.clone();
        // rumqttc's request channel is bounded; the event loop runs in its own task, so the
        // publisher task just keeps feeding it.
        let feeder = tokio::spawn(async move {
            for i in 0..COUNT {
                client
                    .publish("order/t", qos, false, i.to_string())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("publisher connection ended before message {i} (see broker log)")
                    });
            }
            client
                .publish("order/t", qos, false, "done")
                .await
                .expect("publish");
        });

        for i in 0..COUNT {
            let m = sub.next_publish().await;
            let payload = payload_str(&m.payload);
            assert_eq!(
                payload,
                i.to_string(),
                "message {i} out of order or duplicated/missing"
            );
            assert_eq!(m.qos, qos);
            assert!(
                !m.dup,
                "message {i} arrived with DUP on a healthy connection"
            );
        }
        let last = sub.next_publish().await;
        assert_eq!(
            payload_str(&last.payload),
            "done",
            "nothing may arrive twice"
        );
        feeder.await.unwrap();
        // All publishes were acknowledged to the publisher (PUBACK / PUBCOMP), one per message.
        let mut acks = 0;
        while acks < COUNT + 1 {
            publ.events
                .expect("publisher acknowledgement", |e| match (qos, e) {
                    (QoS::AtLeastOnce, Event::Incoming(Incoming::PubAck(_))) => Some(()),
                    (QoS::ExactlyOnce, Event::Incoming(Incoming::PubComp(_))) => Some(()),
                    _ => None,
                })
                .await;
            acks += 1;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn qos1_thousand_messages_in_order_once() {
        let broker = Broker::start();
        run(&broker, QoS::AtLeastOnce, "q1", 100).await;
    }

    /// rumqttc's default publisher window (100 unacknowledged QoS 2 PUBLISHes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn qos2_thousand_messages_in_order_once() {
        let broker = Broker::start();
        run(&broker, QoS::ExactlyOnce, "q2", 100).await;
    }

    /// Same with the publisher keeping at most 10 unacknowledged, below every broker limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn qos2_thousand_messages_in_order_once_publisher_window_10() {
        let broker = Broker::start();
        run(&broker, QoS::ExactlyOnce, "q2-w10", 10).await;
    }

    /// With a tiny broker inflight window most messages wait in the session queue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn qos1_in_order_through_a_small_inflight_window() {
        let broker = Broker::start_with(&["limits.max_inflight=2"]);
        run(&broker, QoS::AtLeastOnce, "q1-small", 100).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn qos2_in_order_through_a_small_inflight_window() {
        let broker = Broker::start_with(&["limits.max_inflight=2"]);
        run(&broker, QoS::ExactlyOnce, "q2-small", 10).await;
    }
}

mod v5 {
    use super::*;
    use common::clients::v5::*;

    async fn run(broker: &Broker, qos: QoS, tag: &str) {
        let mut sub = connect(opts(broker, &format!("order5-sub-{tag}"))).await;
        sub.subscribe("order5/t", qos).await;
        let publ = connect(opts(broker, &format!("order5-pub-{tag}"))).await;
        let client = publ.client.clone();
        let feeder = tokio::spawn(async move {
            for i in 0..COUNT {
                client
                    .publish("order5/t", qos, false, i.to_string())
                    .await
                    .expect("publish");
            }
            client
                .publish("order5/t", qos, false, "done")
                .await
                .expect("publish");
        });
        for i in 0..COUNT {
            let m = sub.next_publish().await;
            assert_eq!(
                payload_str(&m.payload),
                i.to_string(),
                "message {i} out of order or duplicated/missing"
            );
            assert_eq!(m.qos, qos);
        }
        assert_eq!(payload_str(&sub.next_publish().await.payload), "done");
        feeder.await.unwrap();
        drop(publ);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v5_qos1_thousand_messages_in_order_once() {
        let broker = Broker::start();
        run(&broker, QoS::AtLeastOnce, "q1").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v5_qos2_thousand_messages_in_order_once() {
        let broker = Broker::start();
        run(&broker, QoS::ExactlyOnce, "q2").await;
    }

    /// The subscriber's Receive Maximum (not the broker's window) is the bottleneck.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v5_qos1_in_order_with_client_receive_maximum_1() {
        let broker = Broker::start();
        let mut o = opts(&broker, "order5-rm1-sub");
        o.set_receive_maximum(Some(1));
        let mut sub = connect(o).await;
        sub.subscribe("order5/rm", QoS::AtLeastOnce).await;
        let publ = connect(opts(&broker, "order5-rm1-pub")).await;
        let client = publ.client.clone();
        let feeder = tokio::spawn(async move {
            for i in 0..COUNT {
                client
                    .publish("order5/rm", QoS::AtLeastOnce, false, i.to_string())
                    .await
                    .expect("publish");
            }
        });
        for i in 0..COUNT {
            let m = sub.next_publish().await;
            assert_eq!(
                payload_str(&m.payload),
                i.to_string(),
                "message {i} out of order or duplicated/missing"
            );
        }
        feeder.await.unwrap();
    }
}

/// Pipelined packets of one client on two workers: every new route's SUBSCRIBE waits for a
/// cluster barrier, and what the client sent behind it must not overtake it.
mod pipelined {
    use super::*;
    use common::raw::{self, body, client_id, packet, put_str, put_var_int, Raw, V};

    /// SUBSCRIBE with a subscription identifier (a one-byte variable integer), QoS 1.
    fn subscribe_with_id(pkid: u16, filter: &str, id: u8) -> Vec<u8> {
        let mut b = pkid.to_be_bytes().to_vec();
        put_var_int(&mut b, 2);
        b.extend_from_slice(&[0x0B, id]);
        put_str(&mut b, filter.as_bytes());
        b.push(1);
        packet(0x82, &b)
    }

    fn unsubscribe(v: V, pkid: u16, filter: &str) -> Vec<u8> {
        let mut b = pkid.to_be_bytes().to_vec();
        if v == V::V5 {
            b.push(0);
        }
        put_str(&mut b, filter.as_bytes());
        packet(0xA2, &b)
    }

    fn next(c: &mut Raw) -> Vec<u8> {
        c.read_packet().expect("read").expect("packet, got EOF")
    }

    /// Packet type and packet id of an ack.
    fn ack(p: &[u8]) -> (u8, u16) {
        let b = body(p);
        (p[0] >> 4, u16::from_be_bytes([b[0], b[1]]))
    }

    /// Topic, payload and subscription identifiers of a v5 QoS 1 PUBLISH whose only
    /// properties are one-byte subscription identifiers.
    fn v5_publish(p: &[u8]) -> (String, String, Vec<u8>) {
        assert_eq!(p[0] >> 4, 3, "PUBLISH expected: {}", raw::hex(p));
        let b = body(p);
        let tlen = u16::from_be_bytes([b[0], b[1]]) as usize;
        let topic = String::from_utf8_lossy(&b[2..2 + tlen]).into_owned();
        let mut at = 2 + tlen + 2; // packet id (QoS 1)
        let plen = b[at] as usize; // short property block: one-byte length
        at += 1;
        let props = &b[at..at + plen];
        let ids = props
            .chunks(2)
            .map(|kv| {
                assert_eq!(kv[0], 0x0B, "only subscription ids: {}", raw::hex(props));
                kv[1]
            })
            .collect();
        let payload = String::from_utf8_lossy(&b[at + plen..]).into_owned();
        (topic, payload, ids)
    }

    /// MQTT-3.10.4-2 across workers: SUBSCRIBE(x) then UNSUBSCRIBE(x) in one write. The
    /// UNSUBACK comes after the SUBACK and x is no longer subscribed: a message to x,
    /// published before one to a topic the client does subscribe, never arrives.
    #[test]
    fn subscribe_then_unsubscribe_in_one_write_leaves_no_subscription() {
        let broker = Broker::start_workers(2, &[]);
        for v in [V::V3, V::V5] {
            let (mut c, _) = Raw::connect(broker.addr, v, &client_id("pipe-unsub"));
            let x = format!("pipe/x/{v:?}");
            let y = format!("pipe/y/{v:?}");
            let mut both = raw::subscribe(v, 1, x.as_bytes(), 0);
            both.extend(unsubscribe(v, 2, &x));
            c.send(&both);
            assert_eq!(ack(&next(&mut c)), (9, 1), "SUBACK first");
            assert_eq!(ack(&next(&mut c)), (11, 2), "then UNSUBACK");
            c.send(&raw::subscribe(v, 3, y.as_bytes(), 0));
            assert_eq!(ack(&next(&mut c)), (9, 3));

            let (mut p, _) = Raw::connect(broker.addr, v, &client_id("pipe-unsub-pub"));
            let mut msgs = raw::publish(v, x.as_bytes(), 0, 0, &[], b"to x");
            msgs.extend(raw::publish(v, y.as_bytes(), 0, 0, &[], b"to y"));
            p.send(&msgs);
            // One publisher's messages reach a subscriber in order (one path between two
            // workers): had x still been subscribed, "to x" would come first.
            let got = next(&mut c);
            assert!(
                got.ends_with(b"to y"),
                "x still subscribed: got {}",
                raw::hex(&got)
            );
        }
    }

    /// Paho's `test_subscribe_identifiers` on two workers: SUBSCRIBE(t, id 2) and
    /// SUBSCRIBE(t/#, id 3), then the client's own PUBLISH to t, in one write. The message
    /// comes back once, with both identifiers.
    #[test]
    fn pipelined_subscribes_then_publish_carry_every_subscription_identifier() {
        let broker = Broker::start_workers(2, &[]);
        let (mut c, _) = Raw::connect(broker.addr, V::V5, &client_id("pipe-ids"));
        let mut all = subscribe_with_id(1, "pipe/ids", 2);
        all.extend(subscribe_with_id(2, "pipe/ids/#", 3));
        all.extend(raw::publish(V::V5, b"pipe/ids", 1, 3, &[], b"sub ids"));
        c.send(&all);
        assert_eq!(ack(&next(&mut c)), (9, 1));
        assert_eq!(ack(&next(&mut c)), (9, 2));
        let (mut puback, mut message) = (None, None);
        while puback.is_none() || message.is_none() {
            let p = next(&mut c);
            match p[0] >> 4 {
                4 => puback = Some(ack(&p).1),
                3 => {
                    assert!(message.is_none(), "a second delivery: {}", raw::hex(&p));
                    message = Some(v5_publish(&p));
                    // Acknowledged, so nothing is resent.
                    let pkid = &body(&p)[2 + b"pipe/ids".len()..][..2];
                    c.send(&packet(0x40, &[pkid[0], pkid[1], 0]));
                }
                _ => panic!("unexpected {}", raw::hex(&p)),
            }
        }
        assert_eq!(puback, Some(3));
        let (topic, payload, mut ids) = message.unwrap();
        ids.sort_unstable();
        assert_eq!((topic.as_str(), payload.as_str()), ("pipe/ids", "sub ids"));
        assert_eq!(ids, [2, 3]);
    }
}
