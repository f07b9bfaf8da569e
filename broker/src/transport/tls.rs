//! TLS for the stream listeners (`[tls]` and `[wss]`): the server configuration, reloadable
//! in place, and one connection's TLS state driven by the readiness loop.
//!
//! A connection is a `rustls::server::UnbufferedServerConnection`: rustls's I/O-free core
//! without buffers of its own. Records are decrypted in place in the loop's read buffer and
//! encrypted straight into the connection's output buffer, so an idle TLS connection holds
//! only its keys and handshake-free state (the buffered `ServerConnection` keeps a 4 KiB
//! read buffer per connection for its whole life).

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use bytes::{Buf, BytesMut};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{UnbufferedServerConnection, WebPkiClientVerifier};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};

use crate::config::TlsConfig;

/// ALPN protocol ids offered for MQTT over TLS. A client that offers none is served too.
const MQTT_ALPN: &[u8] = b"mqtt";

/// The server side of every TLS connection of one listener: the current configuration,
/// replaced by [`TlsAcceptor::reload`] (connections keep the one they started with).
pub struct TlsAcceptor {
    settings: TlsConfig,
    /// MQTT over TLS offers ALPN `mqtt`; WebSocket over TLS none (browsers offer
    /// `http/1.1`, and an empty list lets rustls ignore ALPN).
    alpn: bool,
    current: RefCell<Arc<rustls::ServerConfig>>,
}

impl TlsAcceptor {
    /// Loads the certificate, key and client CAs named by `settings`.
    pub fn new(settings: &TlsConfig, alpn: bool) -> anyhow::Result<TlsAcceptor> {
        let current = RefCell::new(Arc::new(server_config(settings, alpn)?));
        Ok(TlsAcceptor {
            settings: settings.clone(),
            alpn,
            current,
        })
    }

    /// Reads the files again; on success new connections get the new certificate. On
    /// failure the old configuration stays and the error is returned (to be logged).
    pub fn reload(&self) -> anyhow::Result<()> {
        let config = server_config(&self.settings, self.alpn)?;
        *self.current.borrow_mut() = Arc::new(config);
        Ok(())
    }

    /// A new connection's TLS state.
    pub fn accept(&self) -> Result<TlsSession, rustls::Error> {
        let conn = UnbufferedServerConnection::new(self.current.borrow().clone())?;
        Ok(TlsSession { conn })
    }
}

/// (certificate, key) paths: the configured ones, or the generated self-signed pair.
pub fn cert_paths(settings: &TlsConfig) -> (PathBuf, PathBuf) {
    if settings.cert.is_empty() {
        let dir = cert_dir(settings);
        (dir.join("tls-cert.pem"), dir.join("tls-key.pem"))
    } else {
        (settings.cert.clone().into(), settings.key.clone().into())
    }
}

/// The directory of a generated pair: `tls.cert_dir`, else the QUIC default.
pub fn cert_dir(settings: &TlsConfig) -> PathBuf {
    if settings.cert_dir.is_empty() {
        crate::config::QuicConfig::default().cert_dir()
    } else {
        settings.cert_dir.clone().into()
    }
}

fn server_config(settings: &TlsConfig, alpn: bool) -> anyhow::Result<rustls::ServerConfig> {
    let (cert_path, key_path) = cert_paths(settings);
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificate {}", cert_path.display()))?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading key {}", key_path.display()))?;
    // AES-128-GCM-SHA256 first, chosen by us: SHA-256 has CPU instructions where SHA-384
    // (the key schedule of the AES-256 suite most clients list first) has none. (ChaCha20
    // saves no memory: ring sizes every AEAD key alike.)
    let mut provider = rustls::crypto::ring::default_provider();
    let first = [
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ];
    provider
        .cipher_suites
        .sort_by_key(|suite| !first.contains(&suite.suite()));
    let provider = Arc::new(provider);
    let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version.as_str() {
        "1.3" => &[&rustls::version::TLS13],
        _ => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .context("TLS versions")?;
    let builder = if settings.client_ca.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        let path = &settings.client_ca;
        for cert in CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading tls.client_ca {path}"))?
        {
            roots
                .add(cert)
                .with_context(|| format!("a CA certificate in {path}"))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let verifier = match settings.require_certificate {
            true => verifier,
            false => verifier.allow_unauthenticated(),
        };
        builder.with_client_cert_verifier(verifier.build().context("tls.client_ca")?)
    };
    let mut tls = builder
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    if alpn {
        tls.alpn_protocols = vec![MQTT_ALPN.to_vec()];
    }
    tls.ignore_client_order = true;
    // No session tickets or session cache: resumption state would live in one worker's
    // memory while the reconnect may land on any worker.
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(tls)
}

/// What a TLS connection's input came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsStatus {
    /// Handshake or traffic goes on.
    Open,
    /// The client sent close_notify: no more input will come.
    PeerClosed,
}

/// One connection's TLS state.
pub struct TlsSession {
    conn: UnbufferedServerConnection,
}

impl TlsSession {
    /// Decrypts every complete record at the front of `incoming` (removing them; a partial
    /// record stays), appending application bytes to `plain` and the records the handshake
    /// answers with to `out`. On an error the fatal alert, if any, is in `out` as well.
    pub fn decode(
        &mut self,
        incoming: &mut BytesMut,
        plain: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<TlsStatus, rustls::Error> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut incoming[..]);
            let mut progressed = discard > 0;
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    incoming.advance(discard);
                    self.flush_alerts(incoming, out);
                    return Err(e);
                }
            };
            let mut status = TlsStatus::Open;
            match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record?;
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    progressed = true;
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    encode_with(out, |buf| match data.encode(buf) {
                        Ok(n) => Ok(n),
                        Err(EncodeError::InsufficientSize(e)) => Err(Some(e.required_size)),
                        Err(EncodeError::AlreadyEncoded) => Ok(0),
                    });
                    progressed = true;
                }
                // The loop writes `out` after this call, in order.
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    progressed = true;
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    status = TlsStatus::PeerClosed;
                }
                // Waiting for more input, or nothing left to read.
                _ => {}
            }
            incoming.advance(discard);
            if status == TlsStatus::PeerClosed || !progressed {
                return Ok(status);
            }
        }
    }

    /// Encrypts `plain` into `out`. Nothing is taken before the handshake completes
    /// (returns 0: the bytes wait in the engine's output).
    pub fn encode(&mut self, plain: &[u8], out: &mut BytesMut) -> Result<usize, rustls::Error> {
        if plain.is_empty() {
            return Ok(0);
        }
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
        let Ok(ConnectionState::WriteTraffic(mut traffic)) = state else {
            return Ok(0);
        };
        let mut result = Ok(plain.len());
        encode_with(out, |buf| match traffic.encrypt(plain, buf) {
            Ok(n) => Ok(n),
            Err(EncryptError::InsufficientSize(e)) => Err(Some(e.required_size)),
            Err(e) => {
                result = Err(rustls::Error::General(e.to_string()));
                Ok(0)
            }
        });
        result
    }

    /// Appends close_notify to `out` (once the handshake is done; before, the connection is
    /// simply closed).
    pub fn close(&mut self, out: &mut BytesMut) {
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::WriteTraffic(mut traffic)) = state {
            encode_with(out, |buf| match traffic.queue_close_notify(buf) {
                Ok(n) => Ok(n),
                Err(EncryptError::InsufficientSize(e)) => Err(Some(e.required_size)),
                Err(_) => Ok(0),
            });
        }
    }

    /// Handshake done: application data flows.
    pub fn is_open(&self) -> bool {
        !self.conn.is_handshaking()
    }

    /// The client certificate's identity: its subject CN, or without one its first DNS or
    /// e-mail SAN.
    pub fn peer_identity(&self) -> Option<String> {
        let cert = self.conn.peer_certificates()?.first()?;
        certificate_identity(cert)
    }

    /// Encodes the alerts an error left queued. rustls may still be in the middle of
    /// `incoming` (records it deframed but did not process): it must see the same bytes
    /// again, or it panics.
    fn flush_alerts(&mut self, incoming: &mut BytesMut, out: &mut BytesMut) {
        for _ in 0..4 {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut incoming[..]);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode_with(out, |buf| match data.encode(buf) {
                        Ok(n) => Ok(n),
                        Err(EncodeError::InsufficientSize(e)) => Err(Some(e.required_size)),
                        Err(EncodeError::AlreadyEncoded) => Ok(0),
                    });
                }
                Ok(ConnectionState::TransmitTlsData(data)) => data.done(),
                _ => {
                    incoming.advance(discard);
                    return;
                }
            }
            incoming.advance(discard);
        }
    }
}

/// Runs `encode` over spare room at the end of `out`, growing it to the size `encode` asks
/// for (`Err(Some(n))`) once.
fn encode_with(
    out: &mut BytesMut,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) {
    let start = out.len();
    let mut room = 512;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return;
            }
            Err(Some(needed)) if needed > room => room = needed,
            Err(_) => {
                out.truncate(start);
                return;
            }
        }
    }
}

/// The subject CN of a DER certificate, or its first DNS / e-mail SAN.
fn certificate_identity(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
    {
        return Some(cn.to_string());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(s)
        | x509_parser::extensions::GeneralName::RFC822Name(s) => Some(s.to_string()),
        _ => None,
    })
}
