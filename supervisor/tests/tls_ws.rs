//! MQTT over TLS, WebSocket and WebSocket over TLS against the real `mqttd`, with rumqttc
//! (rustls on ring, tungstenite) as the client. Certificates are made at run time by rcgen
//! into a temporary directory. Every QoS 1/2 exchange is counted by sequence number; every
//! wait is bounded; no sleeps.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use common::clients::{payload_str, v4, v5, DEADLINE};
use common::{prom, Broker};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Messages per counted stream.
const N: u32 = 40;

// ------------------------------------------------------------------------------ certificates

/// A certificate and its key.
struct Issued {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Issued {
    fn ca(cn: &str) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Issued { cert, key }
    }

    /// A leaf signed by `self`: a server certificate for 127.0.0.1 and localhost, or a
    /// client certificate with subject CN `cn`.
    fn issue(&self, cn: &str, server: bool) -> Issued {
        let names = match server {
            true => vec!["127.0.0.1".to_string(), "localhost".to_string()],
            false => Vec::new(),
        };
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![match server {
            true => ExtendedKeyUsagePurpose::ServerAuth,
            false => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf certificate");
        Issued { cert, key }
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key.serialize_der()).into()
    }
}

/// A server CA with its server certificate, and a client CA with client "alice", as PEM
/// files in a directory removed on drop.
struct Pki {
    dir: PathBuf,
    ca: Issued,
    alice: Issued,
}

impl Pki {
    fn new() -> Pki {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mqttd-tls-ws-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cert dir");
        let ca = Issued::ca("mqttd test CA");
        let server = ca.issue("localhost", true);
        let client_ca = Issued::ca("mqttd test client CA");
        let alice = client_ca.issue("alice", false);
        let write =
            |name: &str, text: String| std::fs::write(dir.join(name), text).expect("write PEM");
        write("server.pem", server.cert.pem());
        write("server-key.pem", server.key.serialize_pem());
        write("client-ca.pem", client_ca.cert.pem());
        Pki { dir, ca, alice }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// `--set`s for the tls, ws and wss listeners on free ports with the server certificate.
    fn listeners(&self) -> Vec<String> {
        let mut sets: Vec<String> = ["tls", "ws", "wss"]
            .iter()
            .flat_map(|l| {
                [
                    format!("{l}.enabled=true"),
                    format!("{l}.bind=\"127.0.0.1:0\""),
                ]
            })
            .collect();
        sets.push(format!("tls.cert=\"{}\"", self.path("server.pem")));
        sets.push(format!("tls.key=\"{}\"", self.path("server-key.pem")));
        sets
    }

    /// A rustls client configuration (ring) trusting only the server CA, presenting `client`
    /// if given.
    fn client_config(&self, client: Option<&Issued>) -> TlsConfiguration {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.cert.der().clone()).expect("CA root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots);
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some(c) => {
                let chain: Vec<CertificateDer<'static>> = vec![c.cert.der().clone()];
                builder
                    .with_client_auth_cert(chain, c.key_der())
                    .expect("client certificate")
            }
        };
        config.alpn_protocols = vec![b"mqtt".to_vec()];
        TlsConfiguration::Rustls(Arc::new(config))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(pki: &Pki, workers: u16, extra: &[String]) -> Broker {
    let sets: Vec<String> = pki
        .listeners()
        .into_iter()
        .chain(extra.iter().cloned())
        .collect();
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    Broker::start_workers(workers, &sets)
}

// ------------------------------------------------------------------------------ clients

#[derive(Clone, Copy, Debug)]
enum Via {
    Tls,
    Ws,
    Wss,
}

/// 3.1.1 options for a connection through `via`.
fn v4_opts(broker: &Broker, pki: &Pki, id: &str, via: Via) -> v4::MqttOptions {
    let (host, port, transport) = match via {
        Via::Tls => {
            let addr = broker.tls_addr.expect("tls listener");
            let t = Transport::tls_with_config(pki.client_config(None));
            ("127.0.0.1".to_string(), addr.port(), t)
        }
        Via::Ws => {
            let addr = broker.ws_addr.expect("ws listener");
            (format!("ws://{addr}/mqtt"), addr.port(), Transport::Ws)
        }
        Via::Wss => {
            let addr = broker.wss_addr.expect("wss listener");
            let t = Transport::wss_with_config(pki.client_config(None));
            (format!("wss://{addr}/mqtt"), addr.port(), t)
        }
    };
    let mut o = v4::MqttOptions::new(id, host, port);
    o.set_keep_alive(std::time::Duration::from_secs(30));
    o.set_transport(transport);
    o
}

fn v4_qos(n: u8) -> v4::QoS {
    match n {
        0 => v4::QoS::AtMostOnce,
        1 => v4::QoS::AtLeastOnce,
        _ => v4::QoS::ExactlyOnce,
    }
}

/// The sequence numbers (payloads) received, per topic.
struct Counted {
    got: BTreeMap<String, Vec<u32>>,
}

impl Counted {
    fn new() -> Counted {
        Counted {
            got: BTreeMap::new(),
        }
    }

    fn add(&mut self, topic: &str, payload: &[u8]) {
        let seq = payload_str(payload).parse().expect("numbered payload");
        self.got.entry(topic.to_string()).or_default().push(seq);
    }

    /// Per topic, the numbers of `seqs` not received (yet).
    fn lost(&self, topics: &[String], seqs: Range<u32>) -> BTreeMap<String, Vec<u32>> {
        topics
            .iter()
            .map(|t| {
                let seen: BTreeSet<u32> = self.got.get(t).into_iter().flatten().copied().collect();
                (
                    t.clone(),
                    seqs.clone().filter(|i| !seen.contains(i)).collect(),
                )
            })
            .filter(|(_, lost): &(String, Vec<u32>)| !lost.is_empty())
            .collect()
    }

    /// QoS 2: every number of 0..n once, no duplicate.
    fn assert_exactly_once(&self, topic: &str, n: u32) {
        let mut got = self.got[topic].clone();
        got.sort_unstable();
        assert_eq!(got, (0..n).collect::<Vec<_>>(), "{topic}: duplicates");
    }
}

/// Receives until every topic of `topics` has every number of `seqs`; panics naming the
/// lost ones when a message is more than [`DEADLINE`] in coming.
async fn count_v4(conn: &mut v4::Conn, topics: &[String], seqs: Range<u32>) -> Counted {
    let mut counted = Counted::new();
    while !counted.lost(topics, seqs.clone()).is_empty() {
        match conn.next_publish_within(DEADLINE).await {
            Some(p) => counted.add(&p.topic, &p.payload),
            None => panic!("[{}] lost: {:?}", conn.id, counted.lost(topics, seqs)),
        }
    }
    counted
}

async fn count_v5(conn: &mut v5::Conn, topics: &[String], seqs: Range<u32>) -> Counted {
    let mut counted = Counted::new();
    while !counted.lost(topics, seqs.clone()).is_empty() {
        match conn.next_publish_within(DEADLINE).await {
            Some(p) => counted.add(&payload_str(&p.topic), &p.payload),
            None => panic!("[{}] lost: {:?}", conn.id, counted.lost(topics, seqs)),
        }
    }
    counted
}

fn topics(prefix: &str) -> Vec<String> {
    (0..3).map(|q| format!("{prefix}/{q}")).collect()
}

// ------------------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v311_over_tls_qos012_counted() {
    let pki = Pki::new();
    let broker = start(&pki, common::test_workers(), &[]);
    let mut sub = v4::connect(v4_opts(&broker, &pki, "tls-sub", Via::Tls)).await;
    sub.subscribe("tls/#", v4::QoS::ExactlyOnce).await;
    let mut publisher = v4::connect(v4_opts(&broker, &pki, "tls-pub", Via::Tls)).await;
    for q in 0..3u8 {
        for i in 0..N {
            let topic = format!("tls/{q}");
            publisher
                .publish(&topic, v4_qos(q), false, i.to_string())
                .await;
        }
    }
    let counted = count_v4(&mut sub, &topics("tls"), 0..N).await;
    counted.assert_exactly_once("tls/2", N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v5_over_tls_qos012_counted() {
    let pki = Pki::new();
    let broker = start(&pki, common::test_workers(), &[]);
    let opts = |id: &str| {
        let addr = broker.tls_addr.expect("tls listener");
        let mut o = v5::MqttOptions::new(id, "127.0.0.1", addr.port());
        o.set_transport(Transport::tls_with_config(pki.client_config(None)));
        o
    };
    let mut sub = v5::connect(opts("tls5-sub")).await;
    sub.subscribe("tls5/#", v5::QoS::ExactlyOnce).await;
    let mut publisher = v5::connect(opts("tls5-pub")).await;
    let qos = [
        v5::QoS::AtMostOnce,
        v5::QoS::AtLeastOnce,
        v5::QoS::ExactlyOnce,
    ];
    for (q, qos) in qos.into_iter().enumerate() {
        for i in 0..N {
            let topic = format!("tls5/{q}");
            publisher.publish(&topic, qos, false, i.to_string()).await;
        }
    }
    let counted = count_v5(&mut sub, &topics("tls5"), 0..N).await;
    counted.assert_exactly_once("tls5/2", N);
}

/// rumqttc over ws and wss exchanges counted QoS 1 messages with a TCP client, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_over_websocket_qos1_counted() {
    let pki = Pki::new();
    let broker = start(&pki, common::test_workers(), &[]);
    for via in [Via::Ws, Via::Wss] {
        let name = format!("{via:?}").to_lowercase();
        let mut ws = v4::connect(v4_opts(&broker, &pki, &format!("{name}-c"), via)).await;
        ws.subscribe(&format!("{name}/in"), v4::QoS::AtLeastOnce)
            .await;
        let mut tcp = v4::connect(v4::opts(&broker, &format!("{name}-tcp"))).await;
        tcp.subscribe(&format!("{name}/out"), v4::QoS::AtLeastOnce)
            .await;
        for i in 0..N {
            let qos = v4::QoS::AtLeastOnce;
            tcp.publish(&format!("{name}/in"), qos, false, i.to_string())
                .await;
            ws.publish(&format!("{name}/out"), qos, false, i.to_string())
                .await;
        }
        count_v4(&mut ws, &[format!("{name}/in")], 0..N).await;
        count_v4(&mut tcp, &[format!("{name}/out")], 0..N).await;
        ws.disconnect().await;
        tcp.disconnect().await;
    }
}

/// `--set`s requiring a client certificate of the client CA.
fn require_client_certificate(pki: &Pki) -> [String; 2] {
    [
        format!("tls.client_ca=\"{}\"", pki.path("client-ca.pem")),
        "tls.require_certificate=true".to_string(),
    ]
}

fn tls_opts(broker: &Broker, pki: &Pki, id: &str, client: Option<&Issued>) -> v4::MqttOptions {
    let port = broker.tls_addr.expect("tls listener").port();
    let mut o = v4::MqttOptions::new(id, "127.0.0.1", port);
    o.set_transport(Transport::tls_with_config(pki.client_config(client)));
    o
}

/// With a client CA and `require_certificate`, rustls presenting a certificate of that CA
/// connects and exchanges counted QoS 1 messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_of_the_client_ca_connects() {
    let pki = Pki::new();
    let broker = start(
        &pki,
        common::test_workers(),
        &require_client_certificate(&pki),
    );
    let mut alice = v4::connect(tls_opts(&broker, &pki, "alice", Some(&pki.alice))).await;
    alice.subscribe("cert/t", v4::QoS::AtLeastOnce).await;
    for i in 0..N {
        alice
            .publish("cert/t", v4::QoS::AtLeastOnce, false, i.to_string())
            .await;
    }
    count_v4(&mut alice, &["cert/t".to_string()], 0..N).await;
}

/// A rustls client without a certificate is refused (no CONNACK, counted as a handshake
/// error), and the listener goes on serving. rustls sends its empty Certificate and its
/// Finished as separate records in one flight (OpenSSL packs them into one record, which is
/// why the paho and mosquitto tests do not see this).
///
/// Fails on the current broker: after the refusal `TlsSession::flush_alerts` calls
/// `process_tls_records(&mut [])` while rustls still holds the unprocessed Finished from the
/// previous buffer; rustls panics (deframer/buffers.rs `slice_from_range`), which ends the
/// worker's whole TLS listener task: its connections drop and new ones are never accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_survives_a_client_without_certificate() {
    let pki = Pki::new();
    let broker = start(&pki, 1, &require_client_certificate(&pki));
    let refused = v4::try_connect(tls_opts(&broker, &pki, "no-cert", None)).await;
    assert!(
        refused.is_err(),
        "a client without a certificate got a CONNACK"
    );
    let alice = v4::try_connect(tls_opts(&broker, &pki, "alice", Some(&pki.alice))).await;
    assert!(
        alice.is_ok(),
        "the TLS listener stopped serving after refusing a client: {:?}",
        alice.err()
    );
    prom::scrape_until(&broker, "one tls_handshake error", |e| {
        let labels = [("transport", "tls"), ("reason", "tls_handshake")];
        (e.sum("mqttd_transport_errors_total", &labels) == 1.0).then_some(())
    });
}

/// Four workers: a persistent session resumed over wss eight times (more while none has
/// crossed workers yet), each connection on a worker SO_REUSEPORT picks, gets every QoS 1
/// message published while it was away. Most resumes reach a worker that does not hold the
/// session, which relays the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_session_resumed_across_four_workers() {
    let pki = Pki::new();
    let broker = start(&pki, 4, &[]);
    let session = || {
        let mut o = v4_opts(&broker, &pki, "wss-handoff", Via::Wss);
        o.set_clean_session(false);
        o
    };
    let mut first = v4::connect(session()).await;
    first.subscribe("handoff/t", v4::QoS::AtLeastOnce).await;
    first.disconnect().await;
    let mut publisher = v4::connect(v4::opts(&broker, "handoff-pub")).await;
    let per_round = 5;
    let handoffs = || prom::scrape(&broker).sum("mqttd_handoffs_total", &[]);
    let mut round = 0;
    while round < 8 || (handoffs() == 0.0 && round < 40) {
        for i in 0..per_round {
            let seq = round * per_round + i;
            publisher
                .publish("handoff/t", v4::QoS::AtLeastOnce, false, seq.to_string())
                .await;
        }
        let mut c = v4::connect(session()).await;
        assert!(c.connack.session_present, "round {round}: session lost");
        let seqs = round * per_round..(round + 1) * per_round;
        count_v4(&mut c, &["handoff/t".to_string()], seqs).await;
        c.disconnect().await;
        round += 1;
    }
    assert!(handoffs() >= 1.0, "no resume crossed workers");
}
