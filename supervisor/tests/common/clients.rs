//! Client-side helpers for the integration tests: rumqttc clients (3.1.1 and 5.0) whose event
//! loops run in their own task, and tiny raw-socket clients for what rumqttc refuses to send.
//!
//! Every wait is bounded by [`DEADLINE`]; a test never sleeps hoping something happened.
#![allow(dead_code, unused_imports)] // each test binary uses a different part of the helpers

use std::collections::VecDeque;
use std::fmt::Debug;
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::task::JoinHandle;

use super::Broker;

/// Generous bound on every wait for something the broker must do.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The events of one connection, in arrival order, plus the ones set aside by earlier waits.
/// `Err` is the error that ended the connection (the event loop is not polled after it).
pub struct Events<E, X> {
    rx: UnboundedReceiver<Result<E, X>>,
    stash: VecDeque<E>,
    closed: Option<X>,
    name: String,
}

impl<E: Debug, X: Debug> Events<E, X> {
    fn new(rx: UnboundedReceiver<Result<E, X>>, name: String) -> Self {
        Events {
            rx,
            stash: VecDeque::new(),
            closed: None,
            name,
        }
    }

    /// Waits (bounded) for the first event `pick` accepts. Events it rejects are kept, in
    /// order, for later waits. Panics if the connection ends or the deadline passes.
    pub async fn expect<T>(&mut self, what: &str, pick: impl FnMut(&E) -> Option<T>) -> T {
        match self.expect_within(DEADLINE, what, pick).await {
            Some(t) => t,
            None => panic!(
                "[{}] timed out after {DEADLINE:?} waiting for {what}; unconsumed events: {:?}",
                self.name, self.stash
            ),
        }
    }

    /// Like [`expect`](Self::expect) but returns `None` when `limit` passes.
    pub async fn expect_within<T>(
        &mut self,
        limit: Duration,
        what: &str,
        mut pick: impl FnMut(&E) -> Option<T>,
    ) -> Option<T> {
        if let Some(i) = self.stash.iter().position(|e| pick(e).is_some()) {
            let e = self.stash.remove(i).unwrap();
            return pick(&e);
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(err) = &self.closed {
                panic!(
                    "[{}] connection ended ({err:?}) while waiting for {what}",
                    self.name
                );
            }
            let next = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return None,
                Ok(None) => panic!(
                    "[{}] event loop task gone while waiting for {what}",
                    self.name
                ),
                Ok(Some(r)) => r,
            };
            match next {
                Ok(e) => match pick(&e) {
                    Some(t) => return Some(t),
                    None => self.stash.push_back(e),
                },
                Err(err) => self.closed = Some(err),
            }
        }
    }

    /// Waits (bounded) for the connection to end and returns the error that ended it.
    /// Events that arrive first are kept.
    pub async fn expect_closed(&mut self) -> X {
        if let Some(err) = self.closed.take() {
            return err;
        }
        loop {
            match tokio::time::timeout(DEADLINE, self.rx.recv()).await {
                Err(_) => panic!(
                    "[{}] connection still open after {DEADLINE:?}; events: {:?}",
                    self.name, self.stash
                ),
                Ok(None) => panic!("[{}] event loop task gone", self.name),
                Ok(Some(Ok(e))) => self.stash.push_back(e),
                Ok(Some(Err(err))) => return err,
            }
        }
    }

    /// Whether the connection has ended, waiting at most `limit` for it to. Events that
    /// arrive meanwhile are kept.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        if self.closed.is_some() {
            return true;
        }
        let until = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(until, self.rx.recv()).await {
                Err(_) => return false,
                Ok(None) => return true,
                Ok(Some(Ok(e))) => self.stash.push_back(e),
                Ok(Some(Err(err))) => {
                    self.closed = Some(err);
                    return true;
                }
            }
        }
    }

    /// Events received but not consumed yet.
    pub fn stashed(&self) -> &VecDeque<E> {
        &self.stash
    }
}

/// Runs an event loop in its own task until its first error, forwarding every event.
macro_rules! spawn_loop {
    ($el:expr, $name:expr) => {{
        let (tx, rx) = unbounded_channel();
        let mut el = $el;
        let task: JoinHandle<()> = tokio::spawn(async move {
            loop {
                let r = el.poll().await;
                let end = r.is_err();
                if tx.send(r).is_err() || end {
                    break;
                }
            }
            // `el` (and its socket) is dropped here.
        });
        (Events::new(rx, $name), task)
    }};
}

/// Unique-enough names so that tests sharing nothing never collide.
pub fn payload_str(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ------------------------------------------------------------------------------------------
// MQTT 3.1.1 (rumqttc's "v4" client)
// ------------------------------------------------------------------------------------------

pub mod v4 {
    use super::*;
    pub use rumqttc::{
        AsyncClient, ConnAck, ConnectReturnCode, ConnectionError, Event, EventLoop, Incoming,
        LastWill, MqttOptions, Outgoing, Publish, QoS, SubAck, SubscribeReasonCode,
    };

    pub fn opts(broker: &Broker, id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", broker.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(1024 * 1024, 1024 * 1024);
        o
    }

    pub fn persistent(broker: &Broker, id: &str) -> MqttOptions {
        let mut o = opts(broker, id);
        o.set_clean_session(false);
        o
    }

    pub struct Conn {
        pub client: AsyncClient,
        pub events: Events<Event, ConnectionError>,
        pub connack: ConnAck,
        task: Option<JoinHandle<()>>,
        pub id: String,
    }

    /// Connects; `Err` is the error that ended the attempt (e.g. CONNACK refused).
    pub async fn try_connect(o: MqttOptions) -> Result<Conn, ConnectionError> {
        let id = o.client_id();
        let (client, el) = AsyncClient::new(o, 100);
        let (mut events, task) = spawn_loop!(el, format!("v4 {id}"));
        let first = tokio::time::timeout(DEADLINE, events.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("[{id}] no CONNACK within {DEADLINE:?}"))
            .expect("event loop task gone");
        match first {
            Ok(Event::Incoming(Incoming::ConnAck(connack))) => Ok(Conn {
                client,
                events,
                connack,
                task: Some(task),
                id,
            }),
            Ok(other) => panic!("[{id}] first event is not CONNACK: {other:?}"),
            Err(e) => Err(e),
        }
    }

    pub async fn connect(o: MqttOptions) -> Conn {
        let id = o.client_id();
        match try_connect(o).await {
            Ok(c) => c,
            Err(e) => panic!("[{id}] connect failed: {e:?}"),
        }
    }

    impl Conn {
        pub async fn next_publish(&mut self) -> Publish {
            self.events
                .expect("PUBLISH", |e| match e {
                    Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
                    _ => None,
                })
                .await
        }

        /// The next PUBLISH if one arrives within `limit`.
        pub async fn next_publish_within(&mut self, limit: Duration) -> Option<Publish> {
            self.events
                .expect_within(limit, "PUBLISH", |e| match e {
                    Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
                    _ => None,
                })
                .await
        }

        /// Subscribes and waits for the SUBACK.
        pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> SubAck {
            self.client
                .subscribe(filter, qos)
                .await
                .expect("subscribe request");
            self.events
                .expect("SUBACK", |e| match e {
                    Event::Incoming(Incoming::SubAck(s)) => Some(s.clone()),
                    _ => None,
                })
                .await
        }

        pub async fn unsubscribe(&mut self, filter: &str) {
            self.client
                .unsubscribe(filter)
                .await
                .expect("unsubscribe request");
            self.events
                .expect("UNSUBACK", |e| match e {
                    Event::Incoming(Incoming::UnsubAck(_)) => Some(()),
                    _ => None,
                })
                .await
        }

        /// Publishes and waits until the broker has it: PUBACK (QoS 1), PUBCOMP (QoS 2), or the
        /// packet being written (QoS 0).
        pub async fn publish(
            &mut self,
            topic: &str,
            qos: QoS,
            retain: bool,
            payload: impl Into<Vec<u8>>,
        ) {
            self.client
                .publish(topic, qos, retain, payload.into())
                .await
                .expect("publish request");
            self.events
                .expect("publish acknowledgement", |e| match (qos, e) {
                    (QoS::AtMostOnce, Event::Outgoing(Outgoing::Publish(_))) => Some(()),
                    (QoS::AtLeastOnce, Event::Incoming(Incoming::PubAck(_))) => Some(()),
                    (QoS::ExactlyOnce, Event::Incoming(Incoming::PubComp(_))) => Some(()),
                    _ => None,
                })
                .await
        }

        /// Sends DISCONNECT and waits for the broker to close the connection (it must).
        pub async fn disconnect(mut self) {
            self.client.disconnect().await.expect("disconnect request");
            self.events
                .expect("DISCONNECT sent", |e| {
                    matches!(e, Event::Outgoing(Outgoing::Disconnect)).then_some(())
                })
                .await;
            let _ = self.events.expect_closed().await;
            if let Some(t) = self.task.take() {
                let _ = t.await;
            }
        }

        /// Closes the TCP connection without DISCONNECT (the event loop is dropped).
        pub async fn kill(mut self) {
            if let Some(t) = self.task.take() {
                t.abort();
                let _ = t.await;
            }
        }
    }

    impl Drop for Conn {
        fn drop(&mut self) {
            if let Some(t) = self.task.take() {
                t.abort();
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// MQTT 5.0 (rumqttc::v5)
// ------------------------------------------------------------------------------------------

pub mod v5 {
    use super::*;
    pub use rumqttc::v5::mqttbytes::v5::{
        ConnAck, ConnAckProperties, ConnectProperties, ConnectReturnCode, Disconnect,
        DisconnectReasonCode, Filter, LastWill, LastWillProperties, Packet, PubAck, Publish,
        PublishProperties, RetainForwardRule, SubAck, Subscribe, SubscribeProperties,
        SubscribeReasonCode,
    };
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::{
        AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, StateError,
    };
    pub use rumqttc::Outgoing;

    pub fn opts(broker: &Broker, id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", broker.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(Some(1024 * 1024));
        o
    }

    /// clean_start=false with the given session expiry interval.
    pub fn persistent(broker: &Broker, id: &str, expiry: u32) -> MqttOptions {
        let mut o = opts(broker, id);
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(expiry));
        o
    }

    pub struct Conn {
        pub client: AsyncClient,
        pub events: Events<Event, ConnectionError>,
        pub connack: ConnAck,
        task: Option<JoinHandle<()>>,
        pub id: String,
    }

    pub async fn try_connect(o: MqttOptions) -> Result<Conn, ConnectionError> {
        let id = o.client_id();
        let (client, el) = AsyncClient::new(o, 100);
        let (mut events, task) = spawn_loop!(el, format!("v5 {id}"));
        let first = tokio::time::timeout(DEADLINE, events.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("[{id}] no CONNACK within {DEADLINE:?}"))
            .expect("event loop task gone");
        match first {
            Ok(Event::Incoming(Incoming::ConnAck(connack))) => Ok(Conn {
                client,
                events,
                connack,
                task: Some(task),
                id,
            }),
            Ok(other) => panic!("[{id}] first event is not CONNACK: {other:?}"),
            Err(e) => Err(e),
        }
    }

    pub async fn connect(o: MqttOptions) -> Conn {
        let id = o.client_id();
        match try_connect(o).await {
            Ok(c) => c,
            Err(e) => panic!("[{id}] connect failed: {e:?}"),
        }
    }

    impl Conn {
        /// The next PUBLISH as it came off the wire (a topic alias is *not* resolved here).
        pub async fn next_publish(&mut self) -> Publish {
            self.events
                .expect("PUBLISH", |e| match e {
                    Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
                    _ => None,
                })
                .await
        }

        pub async fn next_publish_within(&mut self, limit: Duration) -> Option<Publish> {
            self.events
                .expect_within(limit, "PUBLISH", |e| match e {
                    Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
                    _ => None,
                })
                .await
        }

        pub async fn expect_suback(&mut self) -> SubAck {
            self.events
                .expect("SUBACK", |e| match e {
                    Event::Incoming(Incoming::SubAck(s)) => Some(s.clone()),
                    _ => None,
                })
                .await
        }

        pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> SubAck {
            self.client
                .subscribe(filter, qos)
                .await
                .expect("subscribe request");
            self.expect_suback().await
        }

        /// Subscribes with explicit options (no local, retain as published, retain handling)
        /// and an optional subscription identifier.
        pub async fn subscribe_filter(&mut self, filter: Filter, id: Option<usize>) -> SubAck {
            match id {
                Some(id) => self
                    .client
                    .subscribe_many_with_properties(
                        [filter],
                        SubscribeProperties {
                            id: Some(id),
                            user_properties: vec![],
                        },
                    )
                    .await
                    .expect("subscribe request"),
                None => self
                    .client
                    .subscribe_many([filter])
                    .await
                    .expect("subscribe request"),
            }
            self.expect_suback().await
        }

        pub async fn unsubscribe(&mut self, filter: &str) {
            self.client
                .unsubscribe(filter)
                .await
                .expect("unsubscribe request");
            self.events
                .expect("UNSUBACK", |e| match e {
                    Event::Incoming(Incoming::UnsubAck(_)) => Some(()),
                    _ => None,
                })
                .await
        }

        /// Publishes and waits for PUBACK / PUBCOMP (or the packet being written for QoS 0).
        pub async fn publish_props(
            &mut self,
            topic: &str,
            qos: QoS,
            retain: bool,
            payload: impl Into<Vec<u8>>,
            props: Option<PublishProperties>,
        ) {
            let payload: Vec<u8> = payload.into();
            match props {
                Some(p) => {
                    self.client
                        .publish_with_properties(topic, qos, retain, payload, p)
                        .await
                }
                None => self.client.publish(topic, qos, retain, payload).await,
            }
            .expect("publish request");
            self.events
                .expect("publish acknowledgement", |e| match (qos, e) {
                    (QoS::AtMostOnce, Event::Outgoing(Outgoing::Publish(_))) => Some(()),
                    (QoS::AtLeastOnce, Event::Incoming(Incoming::PubAck(_))) => Some(()),
                    (QoS::ExactlyOnce, Event::Incoming(Incoming::PubComp(_))) => Some(()),
                    _ => None,
                })
                .await
        }

        pub async fn publish(
            &mut self,
            topic: &str,
            qos: QoS,
            retain: bool,
            payload: impl Into<Vec<u8>>,
        ) {
            self.publish_props(topic, qos, retain, payload, None).await
        }

        /// Sends DISCONNECT (normal) and waits for the broker to close the connection.
        pub async fn disconnect(mut self) {
            self.client.disconnect().await.expect("disconnect request");
            self.events
                .expect("DISCONNECT sent", |e| {
                    matches!(e, Event::Outgoing(Outgoing::Disconnect)).then_some(())
                })
                .await;
            let _ = self.events.expect_closed().await;
            if let Some(t) = self.task.take() {
                let _ = t.await;
            }
        }

        /// Closes the TCP connection without DISCONNECT.
        pub async fn kill(mut self) {
            if let Some(t) = self.task.take() {
                t.abort();
                let _ = t.await;
            }
        }
    }

    impl Drop for Conn {
        fn drop(&mut self) {
            if let Some(t) = self.task.take() {
                t.abort();
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Raw MQTT 5 client: rumqttc's own packet codec over a plain socket, for packets its client
// refuses to send (invalid filters, DISCONNECT with a reason code, ...).
// ------------------------------------------------------------------------------------------

pub mod raw5 {
    use super::*;
    use bytes::BytesMut;
    use rumqttc::v5::mqttbytes::v5::{Connect, ConnectProperties, LastWill, Login, Packet};
    use rumqttc::v5::mqttbytes::Error as CodecError;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub struct Raw {
        pub stream: TcpStream,
        buf: BytesMut,
    }

    pub fn connect_packet(
        id: &str,
        clean_start: bool,
        props: Option<ConnectProperties>,
        will: Option<LastWill>,
    ) -> Packet {
        Packet::Connect(
            Connect {
                keep_alive: 30,
                client_id: id.to_string(),
                clean_start,
                properties: props,
            },
            will,
            None::<Login>,
        )
    }

    impl Raw {
        pub async fn open(broker: &Broker) -> Raw {
            let stream = TcpStream::connect(broker.addr).await.expect("tcp connect");
            stream.set_nodelay(true).unwrap();
            Raw {
                stream,
                buf: BytesMut::new(),
            }
        }

        /// Opens a socket, sends `connect` and returns the CONNACK packet.
        pub async fn connect(broker: &Broker, connect: Packet) -> (Raw, Packet) {
            let mut raw = Raw::open(broker).await;
            raw.send(&connect).await;
            let connack = raw.recv().await.expect("connection closed before CONNACK");
            (raw, connack)
        }

        pub async fn send(&mut self, p: &Packet) {
            let mut out = BytesMut::new();
            p.write(&mut out, None).expect("encode");
            self.stream.write_all(&out).await.expect("write");
        }

        pub async fn send_bytes(&mut self, b: &[u8]) {
            self.stream.write_all(b).await.expect("write");
        }

        /// Next packet, or `None` once the broker closed the connection. Bounded by DEADLINE.
        pub async fn recv(&mut self) -> Option<Packet> {
            tokio::time::timeout(DEADLINE, self.recv_inner())
                .await
                .unwrap_or_else(|_| panic!("raw client: nothing received within {DEADLINE:?}"))
        }

        async fn recv_inner(&mut self) -> Option<Packet> {
            loop {
                // A DISCONNECT may omit its reason code (normal disconnection); the codec refuses it.
                if self.buf.len() >= 2 && self.buf[0] == 0xE0 && self.buf[1] == 0 {
                    let _ = self.buf.split_to(2);
                    return Some(Packet::Disconnect(
                        rumqttc::v5::mqttbytes::v5::Disconnect::new(
                            rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::NormalDisconnection,
                        ),
                    ));
                }
                match Packet::read(&mut self.buf, None) {
                    Ok(p) => return Some(p),
                    Err(CodecError::InsufficientBytes(_)) => {}
                    Err(e) => panic!("raw client: undecodable packet from broker: {e:?}"),
                }
                let mut chunk = [0u8; 4096];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        }
    }
}
