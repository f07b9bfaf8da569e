//! A small MQTT-over-QUIC client (quinn, ALPN `mqtt`) for the integration tests and the
//! bench. Packets are MQTT 3.1.1, encoded and decoded by `rumqttc::mqttbytes::v4`, so the
//! broker is checked against a codec it does not share. Certificates are not verified:
//! the broker's default one is self-signed.
//!
//! One [`QuicConn`] is one QUIC connection; each [`MqttStream`] is one bidirectional
//! stream: the first one opened is the control stream (single-stream mode: the whole
//! session), further ones are multi-stream data streams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::BytesMut;
/// The QUIC stack, for callers that need its types (`Endpoint`, `ConnectionError`).
pub use quinn;
pub use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, LastWill, Packet, PubAck, PubComp, PubRec, PubRel, Publish, Subscribe,
};
pub use rumqttc::mqttbytes::QoS;

/// The ALPN id of MQTT over QUIC.
pub const ALPN: &[u8] = b"mqtt";
const MAX_PACKET: usize = 16 << 20;

/// A client endpoint (one UDP socket) on an ephemeral port of `bind_ip`. Connections from
/// one endpoint share its source port, so with several broker workers they all land on the
/// same worker: use an endpoint per client to spread them.
pub fn endpoint(bind_ip: std::net::IpAddr) -> anyhow::Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // No client-side idle timeout: the broker's (tied to MQTT keep-alive) applies.
    transport.max_idle_timeout(None);
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client(SocketAddr::new(bind_ip, 0))?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// One QUIC connection to the broker.
pub struct QuicConn {
    pub conn: quinn::Connection,
}

impl QuicConn {
    /// QUIC handshake to `addr` (server name "localhost").
    pub async fn connect(endpoint: &quinn::Endpoint, addr: SocketAddr) -> anyhow::Result<QuicConn> {
        let conn = endpoint
            .connect(addr, "localhost")?
            .await
            .context("QUIC handshake")?;
        Ok(QuicConn { conn })
    }

    /// Opens a bidirectional stream (the first is the control stream).
    pub async fn open_stream(&self) -> anyhow::Result<MqttStream> {
        let (send, recv) = self.conn.open_bi().await?;
        Ok(MqttStream {
            send,
            recv,
            buf: BytesMut::new(),
        })
    }

    /// Closes the QUIC connection without an MQTT DISCONNECT: to the broker, a lost client.
    pub fn abort(&self) {
        self.conn.close(0u32.into(), b"gone");
    }

    /// Waits for the connection to end; returns the reason.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
    }
}

/// One bidirectional stream carrying MQTT packets.
pub struct MqttStream {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    buf: BytesMut,
}

impl MqttStream {
    pub async fn send(&mut self, packet: Packet) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        packet
            .write(&mut out, MAX_PACKET)
            .map_err(|e| anyhow::anyhow!("encoding: {e:?}"))?;
        self.send.write_all(&out).await?;
        Ok(())
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.send.write_all(bytes).await?;
        Ok(())
    }

    /// The next packet; `None` when the broker finished the stream (or the connection ended).
    pub async fn recv(&mut self) -> anyhow::Result<Option<Packet>> {
        loop {
            if !self.buf.is_empty() {
                match Packet::read(&mut self.buf, MAX_PACKET) {
                    Ok(packet) => return Ok(Some(packet)),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => bail!("decoding: {e:?}"),
                }
            }
            match self.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) | Err(_) => return Ok(None),
            }
        }
    }

    /// The next packet within `timeout`; an error if none came or the stream ended.
    pub async fn expect(&mut self, timeout: Duration) -> anyhow::Result<Packet> {
        match tokio::time::timeout(timeout, self.recv()).await {
            Ok(Ok(Some(packet))) => Ok(packet),
            Ok(Ok(None)) => bail!("stream ended"),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("no packet within {timeout:?}"),
        }
    }

    /// Every byte the broker sends until it finishes the stream or the connection ends
    /// (bounded by `timeout`), undecoded: for tests of what a client library would refuse.
    /// `Err` carries what arrived if the stream was still open at the deadline.
    pub async fn read_to_end(&mut self, timeout: Duration) -> Result<Vec<u8>, Vec<u8>> {
        let mut all = std::mem::take(&mut self.buf).to_vec();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.recv.read_chunk(64 * 1024, true)).await {
                Ok(Ok(Some(chunk))) => all.extend_from_slice(&chunk.bytes),
                Ok(Ok(None)) | Ok(Err(_)) => return Ok(all),
                Err(_) => return Err(all),
            }
        }
    }

    /// Sends CONNECT (keep-alive 60 s) and waits for the CONNACK.
    pub async fn mqtt_connect(
        &mut self,
        client_id: &str,
        clean_session: bool,
        will: Option<LastWill>,
    ) -> anyhow::Result<ConnAck> {
        let mut connect = Connect::new(client_id);
        connect.keep_alive = 60;
        connect.clean_session = clean_session;
        connect.last_will = will;
        self.send(Packet::Connect(connect)).await?;
        match self.expect(Duration::from_secs(10)).await? {
            Packet::ConnAck(ack) => Ok(ack),
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }
}

/// Accepts any server certificate (the signature is still checked).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
