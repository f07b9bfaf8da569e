//! One connection to Redis or to a Redis Cluster, opened again with backoff when it fails.
//!
//! Each task of the backend has its own: the writer (pipelines), and one per blocking
//! reader (`XREAD BLOCK` would stall a shared multiplexed connection).
//!
//! On a Redis Cluster a pipeline must stay in one slot: [`Conn::run`] sends the commands of
//! each slot as one pipeline (in order), every slot's at once, and the change log's last,
//! once the rest is written (see [`Conn::run_resuming`]). The cluster client follows
//! `MOVED` and `ASK`, reconnects to a node that went away and retries what failed within
//! `RESPONSE_TIMEOUT`; what still fails is an error, and the task opens a new connection.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Arg, Cmd, RedisResult, Value};

use crate::config::RedisConfig;

/// Replies may take this long: above the readers' `XREAD BLOCK` time. On a Redis Cluster,
/// also how long a command may be retried (a master restarting, a replica taking over).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Waits between a Redis Cluster client's retries of a command (milliseconds): growing
/// from 20 to at most 500, rather than the client's default of at least 1.28 s, so that
/// a heartbeat lands soon after its shard is back (before other hosts take it for dead).
const CLUSTER_RETRY_WAIT_MS: (u64, u64) = (20, 500);
/// How many times a blocking read ended by a failover is sent again at once.
const UNBLOCKED_RETRIES: u32 = 3;

pub(super) enum Conn {
    Single(MultiplexedConnection),
    Cluster {
        conn: ClusterConnection,
        /// The change log's slot: its entries announce changes to other keys, so they are
        /// written after the rest of a batch (as one pipeline to one Redis orders them).
        log: Slot,
    },
}

impl Conn {
    pub async fn open(cfg: &RedisConfig) -> RedisResult<Conn> {
        let urls = cfg.url.list();
        if cfg.url.is_cluster() {
            let (min_wait, max_wait) = CLUSTER_RETRY_WAIT_MS;
            let client = redis::cluster::ClusterClientBuilder::new(urls)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .min_retry_wait(min_wait)
                .max_retry_wait(max_wait)
                .build()?;
            Ok(Conn::Cluster {
                conn: client.get_async_connection().await?,
                log: Slot::for_key(super::keys::Keys::new(&cfg.prefix).log),
            })
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
        let mut attempt = 0;
        loop {
            let result = match self {
                Conn::Single(c) => cmd.query_async(c).await,
                Conn::Cluster { conn, .. } => cmd.query_async(conn).await,
            };
            match result {
                Err(e) if unblocked(&e) && attempt < UNBLOCKED_RETRIES => attempt += 1,
                result => return result,
            }
        }
    }

    /// Sends `cmds` in one round trip (on a Redis Cluster: one per slot, at once, and the
    /// change log's after) and returns their replies in order, with how long it took.
    pub async fn run(&mut self, cmds: &[Cmd]) -> RedisResult<(Vec<Value>, Duration)> {
        let mut replies = vec![None; cmds.len()];
        let rtt = self.run_resuming(cmds, &mut replies).await?;
        Ok((
            replies
                .into_iter()
                .map(|r| r.unwrap_or(Value::Nil))
                .collect(),
            rtt,
        ))
    }

    /// As [`Conn::run`], for a batch that may have been sent before: `replies` holds what
    /// was answered then (`Some`), and only the rest is sent. On a Redis Cluster a batch
    /// spans shards, and one of them failing leaves the others' part written: sending it
    /// again would write it twice. (Within one pipeline, or on one Redis, a failure says
    /// nothing of what was applied: all of it is sent again.) Errs if anything is still
    /// unanswered; `replies` keeps what was.
    pub async fn run_resuming(
        &mut self,
        cmds: &[Cmd],
        replies: &mut [Option<Value>],
    ) -> RedisResult<Duration> {
        debug_assert_eq!(cmds.len(), replies.len());
        let start = Instant::now();
        match self {
            Conn::Single(c) => {
                let mut pipe = redis::pipe();
                let todo: Vec<usize> = (0..cmds.len()).filter(|&i| replies[i].is_none()).collect();
                for &i in &todo {
                    pipe.add_command(cmds[i].clone());
                }
                if !todo.is_empty() {
                    let values = query_pipe(&pipe, c).await?;
                    for (i, value) in todo.into_iter().zip(values) {
                        replies[i] = Some(value);
                    }
                }
            }
            Conn::Cluster { conn, log } => {
                let (first, last): (Vec<_>, Vec<_>) = by_slot(cmds, replies)
                    .into_iter()
                    .partition(|(slot, _)| *slot != Some(*log));
                for phase in [first, last] {
                    let sent = phase.into_iter().map(|(_, indices)| {
                        let mut conn = conn.clone();
                        async move {
                            let mut pipe = redis::pipe();
                            for &i in &indices {
                                pipe.add_command(cmds[i].clone());
                            }
                            let values = query_pipe(&pipe, &mut conn).await;
                            (indices, values)
                        }
                    });
                    let mut failed = None;
                    for (indices, values) in join_all(sent).await {
                        match values {
                            Ok(values) => {
                                for (i, value) in indices.into_iter().zip(values) {
                                    replies[i] = Some(value);
                                }
                            }
                            Err(e) => failed = failed.or(Some(e)),
                        }
                    }
                    if let Some(e) = failed {
                        return Err(e);
                    }
                }
            }
        }
        Ok(start.elapsed())
    }
}

/// Sends a pipeline; again if a failover ended a blocking read in it (see [`unblocked`]).
async fn query_pipe(
    pipe: &redis::Pipeline,
    conn: &mut impl redis::aio::ConnectionLike,
) -> RedisResult<Vec<Value>> {
    let mut attempt = 0;
    loop {
        match pipe.query_async(conn).await {
            Err(e) if unblocked(&e) && attempt < UNBLOCKED_RETRIES => attempt += 1,
            result => return result,
        }
    }
}

/// Whether Redis ended a blocking command (`XREAD BLOCK`) because its master became a
/// replica (`-UNBLOCKED`, on a failover): nothing failed, and the command sent again goes
/// to the new master (the old one answers `MOVED`).
fn unblocked(e: &redis::RedisError) -> bool {
    e.code() == Some("UNBLOCKED")
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| e.code() == "UNBLOCKED"))
}

/// The commands not answered yet, by slot (in order within each), in the order each slot
/// first appears; a command without a key (`None`) is one on its own.
fn by_slot(cmds: &[Cmd], replies: &[Option<Value>]) -> Vec<(Option<Slot>, Vec<usize>)> {
    let mut groups: Vec<(Option<Slot>, Vec<usize>)> = Vec::new();
    let mut of_slot: HashMap<Slot, usize> = HashMap::new();
    for (i, cmd) in cmds.iter().enumerate() {
        if replies[i].is_some() {
            continue;
        }
        match slot_of(cmd) {
            Some(slot) => {
                let group = *of_slot.entry(slot).or_insert_with(|| {
                    groups.push((Some(slot), Vec::new()));
                    groups.len() - 1
                });
                groups[group].1.push(i);
            }
            None => groups.push((None, vec![i])),
        }
    }
    groups
}

/// The slot of the key a command is routed by (as the cluster client routes it), for the
/// commands this backend sends: the first argument, but the first stream of `XREAD` and
/// the first key of `EVAL`.
fn slot_of(cmd: &Cmd) -> Option<Slot> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            Arg::Simple(a) => Some(a),
            _ => None,
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    let key = match &name[..] {
        b"XREAD" | b"XREADGROUP" => {
            let streams = args
                .iter()
                .position(|a| a.eq_ignore_ascii_case(b"STREAMS"))?;
            args.get(streams + 1)?
        }
        b"EVAL" | b"EVALSHA" | b"FCALL" => {
            let keys: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
            if keys == 0 {
                return None;
            }
            args.get(3)?
        }
        _ => args.get(1)?,
    };
    Some(Slot::for_key(key))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_grouped_by_the_slot_of_their_key() {
        let keys = super::super::keys::Keys::new("m");
        let a = crate::model::NodeId { host: 1, slot: 0 };
        let b = crate::model::NodeId { host: 2, slot: 0 };
        let cmds = vec![
            redis::cmd("SADD").arg(keys.routes(a)).arg("r").clone(),
            redis::cmd("XADD")
                .arg(&keys.log)
                .arg("*")
                .arg("k")
                .arg("v")
                .clone(),
            redis::cmd("XADD")
                .arg(keys.inbox(b))
                .arg("*")
                .arg("k")
                .arg("v")
                .clone(),
            redis::cmd("SREM").arg(keys.routes(a)).arg("r").clone(),
            redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(10)
                .arg("STREAMS")
                .arg(keys.inbox(a))
                .arg("0-0")
                .clone(),
            redis::cmd("EVAL").arg("return 1").arg(0).clone(),
            redis::cmd("XLEN").arg(keys.inbox(b)).clone(),
        ];
        let mut replies = vec![None; cmds.len()];
        let groups: Vec<Vec<usize>> = by_slot(&cmds, &replies)
            .into_iter()
            .map(|(_, g)| g)
            .collect();
        // a's route set and inbox share a hash tag, so a slot.
        assert_eq!(groups, vec![vec![0, 3, 4], vec![1], vec![2, 6], vec![5]]);
        assert_eq!(slot_of(&cmds[1]), Some(Slot::for_key("m:log")));
        // Answered commands are not sent again.
        replies[2] = Some(Value::Okay);
        replies[6] = Some(Value::Int(1));
        let groups: Vec<Vec<usize>> = by_slot(&cmds, &replies)
            .into_iter()
            .map(|(_, g)| g)
            .collect();
        assert_eq!(groups, vec![vec![0, 3, 4], vec![1], vec![5]]);
    }
}
