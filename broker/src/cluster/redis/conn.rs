//! One connection to Redis or to a Redis Cluster, opened again with backoff when it fails.
//!
//! Each task of the backend has its own: the writer (pipelines), and one per blocking
//! reader (`XREAD BLOCK` would stall a shared multiplexed connection). On a Redis Cluster a
//! pipeline must stay in one slot, so commands there go out one by one, concurrently.

use std::time::{Duration, Instant};

use futures_util::stream::{FuturesOrdered, StreamExt as _};
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, RedisResult, Value};

use crate::config::RedisConfig;

/// Replies may take this long: above the readers' `XREAD BLOCK` time.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

pub(super) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    pub async fn open(cfg: &RedisConfig) -> RedisResult<Conn> {
        let urls = cfg.url.list();
        if cfg.url.is_cluster() {
            let client = redis::cluster::ClusterClientBuilder::new(urls)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .build()?;
            Ok(Conn::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(urls[0].as_str())?;
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(RESPONSE_TIMEOUT));
            Ok(Conn::Single(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            ))
        }
    }

    /// Opens a connection, retrying with backoff until it works. `failed` is told of each
    /// failure (to mark Redis down and log once).
    pub async fn open_retrying(
        cfg: &RedisConfig,
        mut failed: impl FnMut(&redis::RedisError),
    ) -> Conn {
        let mut backoff = BACKOFF_MIN;
        loop {
            match Conn::open(cfg).await {
                Ok(conn) => return conn,
                Err(e) => failed(&e),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    pub async fn query<T: redis::FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }

    /// Sends `cmds` in one round trip (on a Redis Cluster: concurrently) and returns their
    /// replies in order, with how long it took.
    pub async fn run(&mut self, cmds: &[Cmd]) -> RedisResult<(Vec<Value>, Duration)> {
        let start = Instant::now();
        let replies = match self {
            Conn::Single(c) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd.clone());
                }
                pipe.query_async::<Vec<Value>>(c).await?
            }
            Conn::Cluster(c) => {
                let mut pending: FuturesOrdered<_> = cmds
                    .iter()
                    .map(|cmd| {
                        let mut c = c.clone();
                        async move { cmd.query_async::<Value>(&mut c).await }
                    })
                    .collect();
                let mut replies = Vec::with_capacity(cmds.len());
                while let Some(reply) = pending.next().await {
                    replies.push(reply?);
                }
                replies
            }
        };
        Ok((replies, start.elapsed()))
    }
}

/// Blocks (at most `redis.connect_timeout_secs`) until Redis answers a PING: `mqttd` in
/// Redis mode does not start without it, and says which URL it could not reach.
pub fn check_reachable(cfg: &RedisConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Duration::from_secs(cfg.connect_timeout_secs);
    let attempt = async {
        let mut backoff = BACKOFF_MIN;
        let until = Instant::now() + deadline;
        loop {
            let failure = match Conn::open(cfg).await {
                Ok(mut conn) => match conn.query::<String>(&redis::cmd("PING")).await {
                    Ok(_) => return Ok(()),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if Instant::now() + backoff > until {
                return Err(failure);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    };
    runtime.block_on(attempt).map_err(|why| {
        anyhow::anyhow!(
            "redis.url {} unreachable for {}s: {why}",
            cfg.url,
            cfg.connect_timeout_secs
        )
    })
}
