//! Broker configuration: the typed form of `configs/mqttd.toml`.
//!
//! Values come, lowest precedence first, from the built-in defaults, the TOML file,
//! `MQTTD_<SECTION>__<KEY>` environment variables and `--set section.key=value` flags.
//! Layering happens on the untyped TOML table (see [`Config::load`]) so every key can be
//! overridden the same way without a flag per key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

mod metrics;
mod quic;
mod redis;
mod tls;
pub use metrics::MetricsConfig;
pub use quic::{Congestion, QuicConfig};
pub use redis::{RedisConfig, RedisUrls};
pub use tls::{TlsConfig, WsConfig, WssConfig};

/// Everything a worker needs to know. `Default` is the embedded, no-outside-service setup.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listener: ListenerConfig,
    pub limits: Limits,
    pub mqtt: MqttConfig,
    pub cluster: ClusterConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub quic: QuicConfig,
    pub redis: RedisConfig,
    pub tls: TlsConfig,
    pub ws: WsConfig,
    pub wss: WssConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// What carries state between workers: `embedded` (Unix sockets between the workers of
    /// one host, no outside service) or `redis` (the same within a host; Redis between
    /// hosts, see `[redis]`).
    pub backend: ClusterBackend,
    /// Worker processes; 0 = one per available core.
    pub workers: u16,
    /// Pin each worker to its own core (ignored when there are fewer cores than workers).
    pub pin_cores: bool,
    /// Seconds a draining worker (SIGTERM, rolling restart) gets before it is killed.
    pub drain_timeout_secs: u64,
    /// Milliseconds a SUBACK (new route) or a retained PUBLISH's acknowledgement waits for
    /// every peer to confirm a barrier; past it (a hung peer) it goes out anyway, logged
    /// and counted. Checked by the 1 s tick, so it may be up to a second late.
    pub barrier_timeout_ms: u64,
    /// Seconds a rolling restart's replacement worker gets to become ready; past it, it
    /// is killed, the old worker keeps serving, and the roll moves to the next slot.
    pub ready_timeout_secs: u64,
    /// Directory for the workers' Unix sockets; empty = a fresh directory under the
    /// system temp dir, removed at exit.
    pub mesh_dir: String,
}

/// The cluster backends (`cluster.backend`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClusterBackend {
    /// A Unix-socket mesh between the worker processes of one host.
    #[default]
    Embedded,
    /// The embedded mesh within a host, Redis (`[redis]`) between hosts.
    Redis,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            backend: ClusterBackend::Embedded,
            workers: 0,
            pin_cores: true,
            drain_timeout_secs: 30,
            barrier_timeout_ms: 5_000,
            ready_timeout_secs: 60,
            mesh_dir: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address of the plain MQTT-over-TCP listener. Port 0 picks a free port (tests).
    pub tcp: SocketAddr,
    /// listen(2) backlog.
    pub backlog: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Connections one worker accepts; the next CONNECT gets "server unavailable"/0x97.
    pub max_connections_per_worker: usize,
    /// Largest packet accepted from a client and, in v5, announced in CONNACK.
    pub max_packet_size: u32,
    /// QoS 1/2 PUBLISHes a client may have unacknowledged towards us (v5 Receive Maximum).
    pub receive_maximum: u16,
    /// Cap on QoS 1/2 PUBLISHes we keep unacknowledged towards one client.
    pub max_inflight: u16,
    /// Messages kept for one session while its client is offline or its window is full.
    /// Beyond it new QoS 1/2 messages for that session are dropped (and counted).
    pub max_queued_messages: usize,
    /// Topic aliases a v5 client may use towards us (announced in CONNACK).
    pub max_topic_alias: u16,
    /// Upper bound applied to a client's session expiry interval, seconds.
    pub max_session_expiry_secs: u32,
    /// A socket that has not sent a complete CONNECT within this time is closed.
    pub connect_timeout_secs: u64,
    /// Retained messages kept by the broker; a new topic beyond it is refused.
    pub max_retained_messages: usize,
    /// Connections the whole broker (all workers) accepts; 0 = only the per-worker limit.
    pub max_connections: usize,
    /// Bytes one connection may hold (buffers, inflight and queued messages, session,
    /// subscriptions, aliases); the 20 KB capacity model by default. Over it, QoS 0 messages
    /// to a connection that is not draining are dropped, and a connection still over it at
    /// two ticks in a row is disconnected as a slow consumer. 0 = no budget.
    pub connection_memory_budget: usize,
    /// Resident memory of one worker above which new connections are refused; 0 = off.
    pub memory_high_watermark_bytes: u64,
    /// PUBLISH packets per second one client may send (token bucket); 0 = unlimited.
    pub publish_rate: u32,
    /// PUBLISH packets a client may send at once before `publish_rate` applies.
    pub publish_burst: u32,
    /// PUBLISH payload bytes per second one client may send; 0 = unlimited.
    pub publish_bytes_rate: u32,
    /// Payload bytes a client may send at once before `publish_bytes_rate` applies.
    pub publish_bytes_burst: u32,
    /// What happens to a client over its publish rate.
    pub rate_limit_action: RateLimitAction,
    /// New connections per second from one IP address, over the whole broker; 0 = unlimited.
    pub connect_rate_per_ip: u32,
    /// Connections one IP address may open at once before `connect_rate_per_ip` applies.
    pub connect_burst_per_ip: u32,
}

/// The answer to a client publishing faster than its rate limit.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitAction {
    /// Stop reading from the client until its bucket refills (TCP pushes back on it).
    Throttle,
    /// Close the connection (v5: DISCONNECT 0x96 Message rate too high).
    Disconnect,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// If non-zero, the keep-alive the broker imposes on v5 clients (Server Keep Alive).
    pub server_keep_alive: u16,
    /// Keep-alive upper bound; a v5 client asking for more (or for 0) gets this value.
    /// 0 means "no bound": the client's value is used as is.
    pub max_keep_alive: u16,
    pub retain_available: bool,
    pub wildcard_subscriptions: bool,
    pub shared_subscriptions: bool,
    pub subscription_identifiers: bool,
    /// Largest QoS the broker grants (0, 1 or 2).
    pub maximum_qos: u8,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing `EnvFilter` directive, e.g. "info" or "mqttd_broker=debug".
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            tcp: SocketAddr::from(([0, 0, 0, 0], 1883)),
            backlog: 4096,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections_per_worker: 100_000,
            max_packet_size: 1024 * 1024,
            receive_maximum: 64,
            max_inflight: 64,
            max_queued_messages: 1000,
            max_topic_alias: 64,
            max_session_expiry_secs: u32::MAX,
            connect_timeout_secs: 10,
            max_retained_messages: 1_000_000,
            max_connections: 0,
            connection_memory_budget: 20 * 1024,
            memory_high_watermark_bytes: 0,
            publish_rate: 0,
            publish_burst: 100,
            publish_bytes_rate: 0,
            publish_bytes_burst: 1024 * 1024,
            rate_limit_action: RateLimitAction::Throttle,
            connect_rate_per_ip: 0,
            connect_burst_per_ip: 100,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            server_keep_alive: 0,
            max_keep_alive: 0,
            retain_available: true,
            wildcard_subscriptions: true,
            shared_subscriptions: true,
            subscription_identifiers: true,
            maximum_qos: 2,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Human,
        }
    }
}

impl Limits {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}

/// Prefix of environment variables that override config keys: `MQTTD_LIMITS__MAX_INFLIGHT=10`.
pub const ENV_PREFIX: &str = "MQTTD_";

impl Config {
    /// Builds the config from an optional file, environment overrides and `key=value` overrides.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> anyhow::Result<Config> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config {}", path.display()))?;
                text.parse::<toml::Table>()
                    .with_context(|| format!("parsing config {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let path = format!("{}.{}", section.to_lowercase(), key.to_lowercase());
            set_path(&mut table, &path, &value).with_context(|| format!("env {name}"))?;
        }
        for item in sets {
            let Some((path, value)) = item.split_once('=') else {
                bail!("--set expects key=value, got {item:?}");
            };
            set_path(&mut table, path.trim(), value.trim())
                .with_context(|| format!("--set {item}"))?;
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .context("invalid configuration")?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.mqtt.maximum_qos > 2 {
            bail!("mqtt.maximum_qos must be 0, 1 or 2");
        }
        if self.limits.receive_maximum == 0 || self.limits.max_inflight == 0 {
            bail!("limits.receive_maximum and limits.max_inflight must be at least 1");
        }
        if self.cluster.barrier_timeout_ms == 0 || self.cluster.ready_timeout_secs == 0 {
            // Zero would give up on every barrier, or kill every rolling-restart replacement,
            // before it had any chance: never what is meant.
            bail!("cluster.barrier_timeout_ms and cluster.ready_timeout_secs must be at least 1");
        }
        if self.limits.max_packet_size < 64 {
            bail!("limits.max_packet_size must be at least 64 bytes");
        }
        self.quic.validate()?;
        self.tls.validate()?;
        self.ws.validate("ws")?;
        self.wss.0.validate("wss")?;
        if self.cluster.backend == ClusterBackend::Redis {
            self.redis.validate()?;
        }
        Ok(())
    }
}

/// Sets `a.b.c` in a TOML table. The value is parsed as TOML (so `10`, `true`, `"x"` work);
/// anything that does not parse is taken as a bare string (so `info` works too).
fn set_path(table: &mut toml::Table, path: &str, raw: &str) -> anyhow::Result<()> {
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else {
        bail!("empty key");
    };
    let mut node = table;
    for part in parts {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("{part} is not a section"),
        };
    }
    node.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_embedded_setup() {
        let c = Config::load(None, Vec::new(), &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.listener.tcp.port(), 1883);
    }

    #[test]
    fn shipped_config_file_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/mqttd.toml");
        let c = Config::load(Some(&path), Vec::new(), &[]).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn env_then_set_override_in_order() {
        let env = vec![
            ("MQTTD_LIMITS__MAX_INFLIGHT".to_string(), "7".to_string()),
            ("MQTTD_LOG__FORMAT".to_string(), "json".to_string()),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let sets = vec![
            "limits.max_inflight=9".to_string(),
            "listener.tcp=\"127.0.0.1:0\"".to_string(),
            "log.level=debug".to_string(),
        ];
        let c = Config::load(None, env, &sets).unwrap();
        assert_eq!(c.limits.max_inflight, 9);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, "debug");
        assert_eq!(c.listener.tcp.port(), 0);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(Config::load(None, Vec::new(), &["limits.nope=1".into()]).is_err());
        assert!(Config::load(None, Vec::new(), &["mqtt.maximum_qos=3".into()]).is_err());
        assert!(Config::load(None, Vec::new(), &["novalue".into()]).is_err());
        let zero = ["cluster.barrier_timeout_ms=0".into()];
        assert!(Config::load(None, Vec::new(), &zero).is_err());
        let zero = ["cluster.ready_timeout_secs=0".into()];
        assert!(Config::load(None, Vec::new(), &zero).is_err());
        let set = [
            "cluster.barrier_timeout_ms=250".into(),
            "cluster.ready_timeout_secs=5".into(),
        ];
        let c = Config::load(None, Vec::new(), &set).unwrap();
        assert_eq!(
            (c.cluster.barrier_timeout_ms, c.cluster.ready_timeout_secs),
            (250, 5)
        );
    }
}
