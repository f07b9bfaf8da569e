//! The `[tls]`, `[ws]` and `[wss]` sections: MQTT over TLS, over WebSocket, and over
//! WebSocket over TLS (see `transport/tls.rs`, `transport/ws.rs`).

use std::net::SocketAddr;

use serde::Deserialize;

/// MQTT over TLS (default port 8883). Its certificate settings serve `[wss]` too.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub enabled: bool,
    pub bind: SocketAddr,
    /// PEM certificate chain and private key, read at start and again on SIGUSR1. Both
    /// empty: a self-signed certificate (localhost, 127.0.0.1, ::1) generated at start into
    /// `cert_dir` (for trying things out; a client must be told to trust it).
    pub cert: String,
    pub key: String,
    /// Where a generated certificate goes; empty = as `quic.cert_dir`.
    pub cert_dir: String,
    /// PEM bundle of the CAs whose client certificates are accepted. Empty: clients are not
    /// asked for a certificate.
    pub client_ca: String,
    /// With `client_ca`: a client without a valid certificate is refused during the
    /// handshake. Without it, a certificate is optional (but checked when presented).
    pub require_certificate: bool,
    /// With `client_ca`: the client certificate's subject CN (or, without a CN, its first
    /// DNS or e-mail SAN) becomes the client's username, replacing the one in CONNECT.
    pub use_identity_as_username: bool,
    /// Lowest TLS version accepted: "1.2" or "1.3".
    pub min_version: String,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            enabled: false,
            bind: SocketAddr::from(([0, 0, 0, 0], 8883)),
            cert: String::new(),
            key: String::new(),
            cert_dir: String::new(),
            client_ca: String::new(),
            require_certificate: false,
            use_identity_as_username: false,
            min_version: "1.2".into(),
        }
    }
}

impl TlsConfig {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        if self.cert.is_empty() != self.key.is_empty() {
            anyhow::bail!("tls.cert and tls.key must be set together");
        }
        if self.client_ca.is_empty() && (self.require_certificate || self.use_identity_as_username)
        {
            anyhow::bail!(
                "tls.require_certificate and tls.use_identity_as_username need tls.client_ca"
            );
        }
        if !matches!(self.min_version.as_str(), "1.2" | "1.3") {
            anyhow::bail!("tls.min_version must be \"1.2\" or \"1.3\"");
        }
        Ok(())
    }
}

/// MQTT over WebSocket: `[ws]` (plain, default port 8083) and `[wss]` (over TLS, default
/// 8084, with the certificate settings of `[tls]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WsConfig {
    pub enabled: bool,
    pub bind: SocketAddr,
    /// The HTTP path of the upgrade request; any other path is answered 404.
    pub path: String,
    /// Largest HTTP upgrade request accepted (request line and headers); beyond it: 431.
    pub max_request_bytes: usize,
}

impl WsConfig {
    pub fn plain() -> WsConfig {
        WsConfig {
            enabled: false,
            bind: SocketAddr::from(([0, 0, 0, 0], 8083)),
            path: "/mqtt".into(),
            max_request_bytes: 8192,
        }
    }

    pub fn secure() -> WsConfig {
        WsConfig {
            bind: SocketAddr::from(([0, 0, 0, 0], 8084)),
            ..WsConfig::plain()
        }
    }

    pub(super) fn validate(&self, section: &str) -> anyhow::Result<()> {
        if !self.path.starts_with('/') {
            anyhow::bail!("{section}.path must start with '/'");
        }
        if self.max_request_bytes < 256 {
            anyhow::bail!("{section}.max_request_bytes must be at least 256");
        }
        Ok(())
    }
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig::plain()
    }
}

/// `[wss]`: the keys of `[ws]`, with the TLS port as the default address.
#[derive(Debug, Clone, PartialEq)]
pub struct WssConfig(pub WsConfig);

impl Default for WssConfig {
    fn default() -> Self {
        WssConfig(WsConfig::secure())
    }
}

impl<'de> Deserialize<'de> for WssConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut table = toml::Table::deserialize(d)?;
        let bind = WsConfig::secure().bind.to_string();
        table.entry("bind").or_insert(toml::Value::String(bind));
        table
            .try_into()
            .map(WssConfig)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn load(sets: &[&str]) -> anyhow::Result<Config> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::load(None, Vec::new(), &sets)
    }

    #[test]
    fn wss_keeps_its_own_default_port_when_partly_set() {
        let config = load(&["wss.enabled=true", "ws.enabled=true"]).unwrap();
        assert_eq!(config.wss.0.bind.port(), 8084);
        assert_eq!(config.ws.bind.port(), 8083);
        assert_eq!(config.tls.bind.port(), 8883);
        assert_eq!(config.wss.0.path, "/mqtt");
    }

    #[test]
    fn bad_tls_and_websocket_settings_are_refused() {
        assert!(load(&["tls.cert=\"a.pem\""]).is_err());
        assert!(load(&["tls.require_certificate=true"]).is_err());
        assert!(load(&["tls.use_identity_as_username=true"]).is_err());
        assert!(load(&["tls.min_version=\"1.1\""]).is_err());
        assert!(load(&["ws.path=\"mqtt\""]).is_err());
        assert!(load(&["wss.max_request_bytes=10"]).is_err());
        assert!(load(&["tls.client_ca=\"ca.pem\"", "tls.require_certificate=true"]).is_ok());
    }
}
