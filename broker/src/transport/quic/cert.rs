//! The QUIC listener's certificate: the configured PEM pair, or a self-signed one the
//! supervisor generates at start so a fresh machine serves QUIC with no set-up.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
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
/// sure the directory holds a usable self-signed certificate for localhost, 127.0.0.1 and
/// ::1 (key mode 0600), generating one if it holds none. An existing pair is kept, so a
/// client that trusts it keeps working across restarts, and brokers sharing the
/// directory (tests) never swap the pair under each other's workers: generation holds an
/// exclusive lock on the directory, and each file is written under a temporary name and
/// renamed. Returns the certificate's path.
pub fn prepare(config: &QuicConfig) -> anyhow::Result<PathBuf> {
    let (cert_path, key_path) = paths(config);
    if !config.cert.is_empty() {
        return Ok(cert_path);
    }
    let dir = config.cert_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let lock = std::fs::File::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).context("locking the certificate dir");
    }
    if server_tls(config).is_ok() {
        return Ok(cert_path);
    }
    let names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    // Ed25519: its signature, made once per handshake, costs a fraction of ECDSA P-256's.
    let key_pair =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).context("generating a key")?;
    let cert = rcgen::CertificateParams::new(names)
        .and_then(|params| params.self_signed(&key_pair))
        .context("generating a certificate")?;
    write_atomically(&key_path, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(cert_path)
}

fn write_atomically(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(data)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
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
