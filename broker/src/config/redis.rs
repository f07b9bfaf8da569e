//! The `[redis]` section: where `cluster.backend = "redis"` keeps what spans hosts.

use anyhow::bail;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// One URL (`redis://host:port/db`) for a single Redis, or several seed nodes for a
    /// Redis Cluster.
    pub url: RedisUrls,
    /// Prefix of every key mqttd writes, so brokers can share a Redis.
    pub prefix: String,
    /// This host's id among the hosts on the Redis (a non-zero number, unique per host);
    /// 0 = derived from the host name and the TCP listener's port.
    pub host_id: u32,
    /// How long `mqttd` waits for Redis at start before refusing to start, seconds.
    pub connect_timeout_secs: u64,
    /// A worker refreshes its liveness key this often, milliseconds.
    pub heartbeat_ms: u64,
    /// A worker whose liveness key is this old is dead: a survivor removes its routes,
    /// milliseconds.
    pub liveness_ttl_ms: u64,
    /// Bytes of messages per Redis command (XADD) when forwarding to another host.
    pub batch_bytes: usize,
    /// Change-log entries Redis keeps (approximately); a host that was away longer than
    /// that reloads everything instead of replaying.
    pub log_length: u64,
}

/// `redis.url`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RedisUrls {
    One(String),
    Seeds(Vec<String>),
}

impl RedisUrls {
    pub fn list(&self) -> Vec<String> {
        match self {
            RedisUrls::One(u) => vec![u.clone()],
            RedisUrls::Seeds(v) => v.clone(),
        }
    }

    /// A Redis Cluster: more than one seed node given.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisUrls::Seeds(v) if v.len() > 1)
    }
}

impl std::fmt::Display for RedisUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.list().join(","))
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: RedisUrls::One("redis://127.0.0.1:6379".into()),
            prefix: "mqttd".into(),
            host_id: 0,
            connect_timeout_secs: 10,
            heartbeat_ms: 1_000,
            liveness_ttl_ms: 5_000,
            batch_bytes: 512 * 1024,
            log_length: 100_000,
        }
    }
}

impl RedisConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.url.list().is_empty() {
            bail!("redis.url must name at least one Redis");
        }
        if self.heartbeat_ms == 0 || self.liveness_ttl_ms < 2 * self.heartbeat_ms {
            // A liveness key that can expire between two refreshes would have live hosts
            // reaped.
            bail!("redis.liveness_ttl_ms must be at least twice redis.heartbeat_ms (> 0)");
        }
        if self.batch_bytes < 1024 || self.prefix.is_empty() {
            bail!("redis.batch_bytes must be at least 1024 and redis.prefix not empty");
        }
        Ok(())
    }
}
