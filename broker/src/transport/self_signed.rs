//! A self-signed certificate for localhost, 127.0.0.1 and ::1, so a fresh machine serves
//! QUIC (and TLS, when enabled without a certificate) with no set-up.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::Path;

use anyhow::Context;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Makes sure `cert` and `key` (in `dir`) hold a usable pair (key mode 0600), generating
/// one if they do not. An existing pair is kept, so a client that trusts it keeps working
/// across restarts, and brokers sharing the directory (tests) never swap the pair under
/// each other's workers: generation holds an exclusive lock on the directory, and each
/// file is written under a temporary name and renamed.
pub fn ensure(dir: &Path, cert: &Path, key: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let lock = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).context("locking the certificate dir");
    }
    let usable =
        CertificateDer::from_pem_file(cert).is_ok() && PrivateKeyDer::from_pem_file(key).is_ok();
    if usable {
        return Ok(());
    }
    let names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    // Ed25519: its signature, made once per handshake, costs a fraction of ECDSA P-256's.
    let key_pair =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).context("generating a key")?;
    let certificate = rcgen::CertificateParams::new(names)
        .and_then(|params| params.self_signed(&key_pair))
        .context("generating a certificate")?;
    write_atomically(key, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(cert, certificate.pem().as_bytes(), 0o644)
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
