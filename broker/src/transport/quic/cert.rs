//! The QUIC listener's certificate: the configured PEM pair, or a self-signed one the
//! supervisor generates at start so a fresh machine serves QUIC with no set-up.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::QuicConfig;

/// File names of the generated pair inside `quic.cert_dir`.
pub const GENERATED_CERT: &str = "quic-cert.pem";
pub const GENERATED_KEY: &str = "quic-key.pem";

/// (certificate, key) paths the workers load: the configured ones, or the generated ones.
pub fn paths(config: &QuicConfig) -> (PathBuf, PathBuf) {
    if config.cert.is_empty() {
        let dir = config.cert_dir();
        (dir.join(GENERATED_CERT), dir.join(GENERATED_KEY))
    } else {
        (config.cert.clone().into(), config.key.clone().into())
    }
}

/// Called once by the supervisor before the workers start: with no configured pair, makes
/// sure the directory holds a usable self-signed certificate (see
/// [`crate::transport::self_signed::ensure`]). Returns the certificate's path.
pub fn prepare(config: &QuicConfig) -> anyhow::Result<PathBuf> {
    let (cert_path, key_path) = paths(config);
    if config.cert.is_empty() {
        crate::transport::self_signed::ensure(&config.cert_dir(), &cert_path, &key_path)?;
    }
    Ok(cert_path)
}

/// The rustls server configuration for `config`'s certificate, ALPN `mqtt`, TLS 1.3 only.
pub fn server_tls(config: &QuicConfig) -> anyhow::Result<rustls::ServerConfig> {
    let (cert_path, key_path) = paths(config);
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificate {}", cert_path.display()))?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading key {}", key_path.display()))?;
    // AES-128-GCM-SHA256 first and chosen by us: QUIC's own Initial keys are that suite
    // already, and SHA-256 has CPU instructions where SHA-384 has none (the SHA-384
    // key schedule was 8% of a handshake's CPU).
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    tls.alpn_protocols = vec![super::ALPN.to_vec()];
    tls.ignore_client_order = true;
    // No session tickets: resumption state would live in one worker's memory, while the
    // reconnect may land on any worker; every ticket is bytes and CPU for nothing.
    tls.send_tls13_tickets = 0;
    Ok(tls)
}
