//! Ordering and exactly-once/at-least-once delivery under load: one publisher, one subscriber,
//! 1000 messages on one topic.

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
