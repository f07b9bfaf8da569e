//! The `[quic]` section: MQTT over QUIC (see `transport/quic`).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// MQTT over QUIC. Every worker serves it on the same UDP port (SO_REUSEPORT).
///
/// The windows are small on purpose: most MQTT connections are idle, a window is a promise
/// the broker may have to keep in memory, and quinn allocates receive buffers on demand,
/// so a small window costs nothing while idle and bounds what one client can pile up.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QuicConfig {
    pub enabled: bool,
    /// UDP address (14567 is EMQX's MQTT-over-QUIC port). Port 0 picks a free port.
    pub bind: SocketAddr,
    /// PEM certificate chain and private key. Both empty: a self-signed certificate
    /// (localhost, 127.0.0.1, ::1) generated at start into `cert_dir`.
    pub cert: String,
    pub key: String,
    /// Where the generated certificate goes; empty = `$XDG_RUNTIME_DIR/mqttd` if set,
    /// else `/tmp/mqttd-<uid>`.
    pub cert_dir: String,
    /// QUIC idle timeout, seconds. 0 = derived from MQTT keep-alive: 1.5 × `mqtt.max_keep_alive`
    /// (or 1.5 × 65535 s, the longest keep-alive a client can ask for, when unbounded), so the
    /// MQTT keep-alive, not QUIC, decides when a silent client is gone.
    pub idle_timeout_secs: u64,
    /// Bytes a client may send on one stream ahead of the broker reading them.
    pub stream_receive_window: u32,
    /// Bytes a client may send on all streams of a connection ahead of the broker reading them.
    pub receive_window: u32,
    /// Bytes the broker buffers unacknowledged towards one client (all streams).
    pub send_window: u64,
    /// Bidirectional streams a client may have open at once (1 = single-stream mode only).
    pub max_streams: u32,
    /// UDP payload size the broker sends from the start (1200..=1452). 1452 fits any
    /// 1500-byte Ethernet path: a busy subscriber's messages travel in fewer datagrams, and
    /// no probing is needed after the handshake. On a narrower path quinn's black-hole
    /// detection falls back to 1200 after the first losses and path MTU discovery probes
    /// again later; 1200 is the conservative choice.
    pub initial_mtu: u16,
    pub congestion: Congestion,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    Cubic,
    Newreno,
    Bbr,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            enabled: true,
            bind: SocketAddr::from(([0, 0, 0, 0], 14567)),
            cert: String::new(),
            key: String::new(),
            cert_dir: String::new(),
            idle_timeout_secs: 0,
            stream_receive_window: 64 * 1024,
            receive_window: 256 * 1024,
            send_window: 256 * 1024,
            max_streams: 4,
            initial_mtu: 1452,
            congestion: Congestion::Cubic,
        }
    }
}

impl QuicConfig {
    /// The QUIC idle timeout, derived from `max_keep_alive` when not set explicitly.
    pub fn idle_timeout(&self, max_keep_alive: u16) -> Duration {
        if self.idle_timeout_secs > 0 {
            return Duration::from_secs(self.idle_timeout_secs);
        }
        let keep_alive = if max_keep_alive > 0 {
            max_keep_alive
        } else {
            u16::MAX
        };
        Duration::from_millis(u64::from(keep_alive) * 1500)
    }

    /// The directory a generated certificate is written to.
    pub fn cert_dir(&self) -> std::path::PathBuf {
        if !self.cert_dir.is_empty() {
            return self.cert_dir.clone().into();
        }
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(dir) if !dir.is_empty() => std::path::PathBuf::from(dir).join("mqttd"),
            // SAFETY: getuid cannot fail and has no preconditions.
            _ => std::env::temp_dir().join(format!("mqttd-{}", unsafe { libc::getuid() })),
        }
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        if self.cert.is_empty() != self.key.is_empty() {
            anyhow::bail!("quic.cert and quic.key must be set together");
        }
        if !(1200..=1452).contains(&self.initial_mtu) {
            anyhow::bail!("quic.initial_mtu must be within 1200..=1452");
        }
        if self.max_streams == 0 {
            anyhow::bail!("quic.max_streams must be at least 1");
        }
        if self.stream_receive_window < 1024 || self.receive_window < 1024 {
            anyhow::bail!(
                "quic.stream_receive_window and quic.receive_window must be at least 1024"
            );
        }
        Ok(())
    }
}
