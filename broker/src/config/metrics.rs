//! The `[metrics]` section.

use std::net::SocketAddr;

use serde::Deserialize;

/// The `[metrics]` config section: the supervisor's HTTP endpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics`, `/health` and `/ready` over HTTP.
    pub enabled: bool,
    /// Address of the HTTP endpoint; port 0 picks one (printed as `mqttd listening metrics ADDR`).
    pub bind: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            bind: SocketAddr::from(([0, 0, 0, 0], 9100)),
        }
    }
}
