//! The writer: everything this worker sends to Redis, in the order the engine made it, a
//! pipeline per wake-up; and the heartbeat that keeps this worker registered and reaps
//! workers whose liveness key expired.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use redis::{Cmd, Value};

use super::super::wire::{self, Frame};
use super::conn::Conn;
use super::keys::{self, Keys};
use super::state::{Change, Shared, CAUGHT_UP, INBOX_BEHIND, INBOX_CAUGHT_UP};
use crate::model::{NodeId, SessionImage, StoreOp};

/// How often a destination whose inbox is backlogged is looked at again.
const BACKLOG_POLL: Duration = Duration::from_millis(20);

/// Claims a client id for a worker, atomically: the owner is replaced and the epoch (a
/// fencing token) incremented; returns the new epoch, the previous owner (if any) and,
/// when the session is wanted, the stored session (else it is deleted: a clean start).
/// KEYS: owner, session. ARGV: the claimant, "1" if it wants the session.
const CLAIM: &str = "local prev = redis.call('HGET', KEYS[1], 'owner') \
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1) \
redis.call('HSET', KEYS[1], 'owner', ARGV[1]) \
if ARGV[2] == '1' then return {epoch, prev, redis.call('HGETALL', KEYS[2])} end \
redis.call('DEL', KEYS[2]) \
return {epoch, prev}";

/// Takes over a dead worker's session: only if the dead worker still owns it (a client
/// that reconnected elsewhere meanwhile took it already). KEYS: owner, session. ARGV: the
/// dead worker, the adopter. Returns the new epoch and the stored session, or nil.
const ADOPT: &str = "if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return false end \
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1) \
redis.call('HSET', KEYS[1], 'owner', ARGV[2]) \
return {epoch, redis.call('HGETALL', KEYS[2])}";

/// Applies changes to a stored session, only if the writer still owns the client id (its
/// epoch is the latest): a worker that lost the id can never overwrite the new owner's
/// session. KEYS: owner, session. ARGV: epoch, then (op, field, value) triples: s = set
/// field, d = delete field, x = delete the session, t = expire in value ms (0: never).
const STORE: &str = "if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end \
for i = 2, #ARGV, 3 do \
  local op, f, v = ARGV[i], ARGV[i + 1], ARGV[i + 2] \
  if op == 's' then redis.call('HSET', KEYS[2], f, v) \
  elseif op == 'd' then redis.call('HDEL', KEYS[2], f) \
  elseif op == 'x' then redis.call('DEL', KEYS[2]) \
  elseif op == 't' then \
    if v == '0' then redis.call('PERSIST', KEYS[2]) else redis.call('PEXPIRE', KEYS[2], v) end \
  end \
end \
return 1";

/// What a command's reply is for, beyond success.
enum After {
    Nothing,
    /// `XLEN` of this destination's inbox.
    Backlog(NodeId),
    /// The claim of a parked CONNECT.
    Claim {
        ticket: u64,
        client_id: String,
        want_session: bool,
    },
}

/// One pipeline: kept until Redis has answered it, and what was not answered sent again
/// if it failed.
struct Batch {
    cmds: Vec<Cmd>,
    /// The replies so far (on a Redis Cluster, a shard's part may be written while
    /// another's failed).
    replies: Vec<Option<Value>>,
    /// For each command, what its reply is for.
    after: Vec<After>,
    /// Forwards confirmed once this batch is written.
    confirms: u64,
}

/// Appends `XADD P:log ...` for one change.
fn log_entry(keys: &Keys, length: u64, me: &str, op: &str, data: &[u8]) -> Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&keys.log)
        .arg("MAXLEN")
        .arg("~")
        .arg(length)
        .arg("*")
        .arg("n")
        .arg(me)
        .arg("op")
        .arg(op)
        .arg("d")
        .arg(data);
    cmd
}

/// The encoded route, as it is kept in the route set and on the change log.
pub(super) fn route_bytes(route: &crate::model::Route) -> Bytes {
    let mut out = BytesMut::new();
    super::super::wire::encode(
        &mut out,
        &super::super::wire::Frame::RouteAdd(route.clone()),
        std::time::Instant::now(),
    );
    out.freeze()
}

/// Takes what is waiting into a batch; `None` when there is nothing to write.
fn take_batch(s: &mut Shared) -> Option<Batch> {
    let mut batch = Batch {
        cmds: Vec::new(),
        replies: Vec::new(),
        after: Vec::new(),
        confirms: s.confirmations_issued,
    };
    let length = s.cfg.log_length;
    let me = s.me;
    let mut stores: ahash::AHashMap<String, usize> = ahash::AHashMap::new();
    while let Some(change) = s.changes.pop_front() {
        let routes_key = s.keys.routes(me);
        match change {
            Change::RouteAdd(route) => {
                let enc = route_bytes(&route);
                batch
                    .cmds
                    .push(redis::cmd("SADD").arg(&routes_key).arg(&enc[..]).clone());
                batch
                    .cmds
                    .push(log_entry(&s.keys, length, &s.me_name, "add", &enc));
            }
            Change::RouteRemove(route) => {
                let enc = route_bytes(&route);
                batch
                    .cmds
                    .push(redis::cmd("SREM").arg(&routes_key).arg(&enc[..]).clone());
                batch
                    .cmds
                    .push(log_entry(&s.keys, length, &s.me_name, "del", &enc));
            }
            Change::SyncRoutes => {
                let mut all = BytesMut::new();
                let mut sadd = redis::cmd("SADD");
                sadd.arg(&routes_key);
                for route in &s.my_routes {
                    let enc = route_bytes(route);
                    sadd.arg(&enc[..]);
                    all.put_slice(&enc);
                }
                batch.cmds.push(redis::cmd("DEL").arg(&routes_key).clone());
                if !s.my_routes.is_empty() {
                    batch.cmds.push(sadd);
                }
                batch
                    .cmds
                    .push(log_entry(&s.keys, length, &s.me_name, "sync", &all));
            }
            Change::Join => {
                batch
                    .cmds
                    .push(log_entry(&s.keys, length, &s.me_name, "join", &[]));
            }
            Change::Retained {
                topic,
                frame,
                clear,
            } => {
                let cmd = if clear {
                    redis::cmd("HDEL")
                        .arg(&s.keys.retained)
                        .arg(&topic[..])
                        .clone()
                } else {
                    redis::cmd("HSET")
                        .arg(&s.keys.retained)
                        .arg(&topic[..])
                        .arg(&frame[..])
                        .clone()
                };
                batch.cmds.push(cmd);
                batch
                    .cmds
                    .push(log_entry(&s.keys, length, &s.me_name, "ret", &frame));
            }
            Change::Barrier(id) => {
                let id = id.to_le_bytes();
                batch
                    .cmds
                    .push(log_entry(&s.keys, length, &s.me_name, "bar", &id));
            }
            Change::Store {
                client_id,
                epoch,
                op,
            } => {
                // One script call per session per pipeline, however many changes.
                let at = match stores.get(&client_id) {
                    Some(&at) => at,
                    None => {
                        let mut cmd = redis::cmd("EVAL");
                        cmd.arg(STORE)
                            .arg(2)
                            .arg(s.keys.owner(&client_id))
                            .arg(s.keys.session(&client_id))
                            .arg(epoch);
                        batch.cmds.push(cmd);
                        stores.insert(client_id.clone(), batch.cmds.len() - 1);
                        batch.cmds.len() - 1
                    }
                };
                // The worker's index of its stored sessions, for a survivor to adopt them
                // if it dies.
                match &*op {
                    StoreOp::Meta { .. } => batch.cmds.push(
                        redis::cmd("SADD")
                            .arg(s.keys.sessions(me))
                            .arg(&client_id)
                            .clone(),
                    ),
                    StoreOp::Drop => batch.cmds.push(
                        redis::cmd("SREM")
                            .arg(s.keys.sessions(me))
                            .arg(&client_id)
                            .clone(),
                    ),
                    _ => {}
                }
                store_args(&mut batch.cmds[at], *op);
            }
            Change::Claim {
                ticket,
                client_id,
                want_session,
            } => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(CLAIM)
                    .arg(2)
                    .arg(s.keys.owner(&client_id))
                    .arg(s.keys.session(&client_id))
                    .arg(&s.me_name)
                    .arg(if want_session { "1" } else { "0" });
                batch.cmds.push(cmd);
                batch
                    .after
                    .resize_with(batch.cmds.len() - 1, || After::Nothing);
                batch.after.push(After::Claim {
                    ticket,
                    client_id,
                    want_session,
                });
            }
        }
    }
    batch.after.resize_with(batch.cmds.len(), || After::Nothing);
    let limit = s.cfg.batch_bytes;
    for (&to, outbox) in s.outboxes.iter_mut() {
        let inbox = s.keys.inbox(to);
        let had = !outbox.buf.is_empty();
        while !outbox.buf.is_empty() {
            let chunk = split_frames(&mut outbox.buf, limit);
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&inbox)
                .arg("*")
                .arg("n")
                .arg(&s.me_name)
                .arg("b")
                .arg(&chunk[..]);
            batch.cmds.push(cmd);
            batch.after.push(After::Nothing);
        }
        // How far behind its reader is: checked with every write, and polled while high.
        if had || outbox.inbox_backlog > INBOX_CAUGHT_UP {
            batch.cmds.push(redis::cmd("XLEN").arg(&inbox).clone());
            batch.after.push(After::Backlog(to));
        }
    }
    if batch.cmds.is_empty() {
        return None;
    }
    batch.replies = vec![None; batch.cmds.len()];
    Some(batch)
}

/// Appends one session change to a `STORE` call.
fn store_args(cmd: &mut Cmd, op: StoreOp) {
    let now = std::time::Instant::now();
    let mut frame = BytesMut::new();
    match op {
        StoreOp::Meta { image, online } => {
            let ttl_ms = match (online, image.expiry_secs) {
                (true, _) | (false, u32::MAX) => 0,
                (false, secs) => u64::from(secs.max(1)) * 1000,
            };
            wire::encode(&mut frame, &Frame::Session(Box::new(image)), now);
            cmd.arg("s").arg("meta").arg(&frame[..]);
            cmd.arg("t").arg("").arg(ttl_ms);
        }
        StoreOp::Message(entry) => {
            let field = format!("m{}", entry.seq);
            let image = SessionImage {
                client_id: String::new(),
                expiry_secs: 0,
                expires_in: None,
                subscriptions: Vec::new(),
                queue: Vec::new(),
                inflight: vec![entry],
                incoming_qos2: Vec::new(),
                will: None,
            };
            wire::encode(&mut frame, &Frame::SessionMore(Box::new(image)), now);
            cmd.arg("s").arg(field).arg(&frame[..]);
        }
        StoreOp::Remove(seq) => {
            cmd.arg("d").arg(format!("m{seq}")).arg("");
        }
        StoreOp::Drop => {
            cmd.arg("x").arg("").arg("");
        }
    }
}

/// A session as the store has it (the reply of `HGETALL P:session:{id}`): `None` if there
/// is none.
fn stored_session(reply: &Value) -> Option<SessionImage> {
    let now = std::time::Instant::now();
    let items: Vec<&[u8]> = match reply {
        Value::Array(items) => items
            .iter()
            .filter_map(|v| match v {
                Value::BulkString(b) => Some(&b[..]),
                _ => None,
            })
            .collect(),
        _ => return None,
    };
    let mut image = None;
    let mut entries = Vec::new();
    for pair in items.chunks(2) {
        let [field, value] = pair else { continue };
        match wire::decode(&mut BytesMut::from(*value), now) {
            Ok(Some(Frame::Session(meta))) if *field == b"meta" => image = Some(*meta),
            Ok(Some(Frame::SessionMore(more))) => entries.extend(more.inflight),
            _ => {}
        }
    }
    let mut image = image?;
    entries.sort_by_key(|e| e.seq);
    for e in entries {
        if e.pkid == 0 {
            image.queue.push(crate::model::QueuedImage {
                seq: e.seq,
                msg: e.msg,
                delivery: e.delivery,
            });
        } else {
            image.inflight.push(e);
        }
    }
    Some(image)
}

/// Splits off the first frames of `buf`, at most `limit` bytes of them (at least one
/// frame, however large).
fn split_frames(buf: &mut BytesMut, limit: usize) -> Bytes {
    let mut end = 0;
    while end + 4 <= buf.len() {
        let len = (&buf[end..end + 4]).get_u32_le() as usize;
        if end > 0 && end + 4 + len > limit {
            break;
        }
        end += 4 + len;
    }
    buf.split_to(end.min(buf.len())).freeze()
}

/// Writes what the engine queued for Redis, one pipeline at a time, until the worker ends.
/// A pipeline that fails is sent again once Redis is back, but for the parts a Redis
/// Cluster's shards did answer (so nothing queued is lost; a change or batch Redis had
/// applied before failing may then arrive twice).
pub(super) async fn run(shared: Rc<RefCell<Shared>>) {
    let cfg = shared.borrow().cfg.clone();
    let wake = shared.borrow().wake_writer.clone();
    let mut conn = open(&shared, &cfg, "writer").await;
    let mut pending: Option<Batch> = None;
    loop {
        if pending.is_none() {
            pending = take_batch(&mut shared.borrow_mut());
        }
        let Some(batch) = pending.as_mut() else {
            let polling = shared
                .borrow()
                .outboxes
                .values()
                .any(|o| o.inbox_backlog > INBOX_CAUGHT_UP);
            if polling {
                let _ = tokio::time::timeout(BACKLOG_POLL, wake.notified()).await;
            } else {
                wake.notified().await;
            }
            continue;
        };
        shared.borrow_mut().in_flight = true;
        let result = conn.run_resuming(&batch.cmds, &mut batch.replies).await;
        shared.borrow_mut().in_flight = false;
        match result {
            Ok(rtt) => {
                let replies: Vec<Value> = batch.replies.drain(..).flatten().collect();
                written(&mut shared.borrow_mut(), batch, &replies, rtt);
                pending = None;
            }
            Err(e) => {
                shared.borrow_mut().mark_down("write", &e);
                conn = open(&shared, &cfg, "writer").await;
            }
        }
    }
}

/// Redis has `batch`: what it confirms is told to the engine.
fn written(s: &mut Shared, batch: &Batch, replies: &[Value], rtt: Duration) {
    s.mark_up();
    s.stats
        .observe_round_trip(rtt.as_micros() as u64, batch.cmds.len());
    for (reply, after) in replies.iter().zip(&batch.after) {
        match (after, reply) {
            (After::Backlog(to), Value::Int(len)) => {
                if let Some(outbox) = s.outboxes.get_mut(to) {
                    outbox.inbox_backlog = *len as u64;
                }
            }
            (
                After::Claim {
                    ticket,
                    client_id,
                    want_session,
                },
                reply,
            ) => claimed(s, *ticket, client_id, *want_session, reply),
            _ => {}
        }
    }
    s.confirmed(batch.confirms);
    caught_up(s);
}

/// A claim's reply: the previous owner, if on another host, is told to let go (and to
/// send the session if the new connection resumes it); the parked CONNECT goes on.
fn claimed(s: &mut Shared, ticket: u64, client_id: &str, want_session: bool, reply: &Value) {
    let (epoch, previous, stored) = match reply {
        Value::Array(items) => (
            match items.first() {
                Some(Value::Int(e)) => *e as u64,
                _ => 0,
            },
            match items.get(1) {
                Some(Value::BulkString(name)) => keys::parse_name(name),
                _ => None,
            },
            items.get(2).and_then(stored_session).map(Box::new),
        ),
        _ => (0, None, None),
    };
    // A previous owner is told to let go: on this host too (a session adopted from a dead
    // host lives on whichever worker adopted it). One no longer registered (its host
    // died) sends nothing: the stored copy is the session.
    let previous =
        previous.filter(|&p| p != s.me && (p.host == s.me.host || s.members.contains(&p)));
    if let Some(owner) = previous {
        let outbox = s.outboxes.entry(owner).or_default();
        let release = Frame::Release {
            client_id: client_id.to_string(),
            send_session: want_session,
            epoch,
        };
        wire::encode(&mut outbox.buf, &release, std::time::Instant::now());
        s.wake_writer.notify_one();
    }
    s.outer.push(crate::cluster::ClusterEvent::Claimed {
        ticket,
        epoch,
        previous,
        stored,
    });
}

/// Destinations reported behind that are no longer: their publishers may go on.
fn caught_up(s: &mut Shared) {
    let mut done = Vec::new();
    for (&to, outbox) in s.outboxes.iter_mut() {
        if outbox.behind && outbox.buf.len() < CAUGHT_UP && outbox.inbox_backlog <= INBOX_CAUGHT_UP
        {
            outbox.behind = false;
            done.push(to);
        }
    }
    for to in done {
        s.outer.push(crate::cluster::ClusterEvent::PeerCaughtUp(to));
    }
}

/// Whether `to` is behind: too much queued here, or too much unread in its inbox.
pub(super) fn is_behind(queued: usize, inbox_backlog: u64) -> bool {
    queued > super::state::BEHIND || inbox_backlog > INBOX_BEHIND
}

pub(super) async fn open(
    shared: &Rc<RefCell<Shared>>,
    cfg: &crate::config::RedisConfig,
    what: &str,
) -> Conn {
    let conn = Conn::open_retrying(cfg, |e| shared.borrow_mut().mark_down(what, e)).await;
    shared.borrow_mut().mark_up();
    conn
}

/// Keeps this worker registered (`P:nodes`, and a liveness key that expires unless
/// refreshed) and removes workers whose key expired: their routes and inbox go, and the
/// change log says they are gone. Whoever removes a worker from `P:nodes` first does it,
/// so it is done once however many survivors notice.
///
/// A worker is removed only once its key has been seen missing for a liveness TTL, Redis
/// answering all along: a Redis that was down longer than the TTL (a restarting master
/// of a Redis Cluster is, for two seconds at least) comes back with the keys expired, and
/// their workers, alive, need a heartbeat to set them again.
pub(super) async fn heartbeat(shared: Rc<RefCell<Shared>>) {
    let cfg = shared.borrow().cfg.clone();
    let (keys, me, me_name) = {
        let s = shared.borrow();
        (s.keys.clone(), s.me, s.me_name.clone())
    };
    let mut conn = open(&shared, &cfg, "heartbeat").await;
    let mut interval = tokio::time::interval(Duration::from_millis(cfg.heartbeat_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let pid = std::process::id();
    let mut suspects = HashMap::new();
    loop {
        interval.tick().await;
        let register = [
            redis::cmd("SET")
                .arg(keys.alive(me))
                .arg(pid)
                .arg("PX")
                .arg(cfg.liveness_ttl_ms)
                .clone(),
            redis::cmd("SADD").arg(&keys.nodes).arg(&me_name).clone(),
            redis::cmd("SMEMBERS").arg(&keys.nodes).clone(),
        ];
        let replies = match conn.run(&register).await {
            Ok((replies, _)) => replies,
            Err(e) => {
                shared.borrow_mut().mark_down("heartbeat", &e);
                suspects.clear();
                conn = open(&shared, &cfg, "heartbeat").await;
                continue;
            }
        };
        if !shared.borrow().registered {
            let mut s = shared.borrow_mut();
            s.registered = true;
            s.synced_notify.notify_waiters();
        }
        if let Some(Value::Int(1)) = replies.get(1) {
            // New here (first start, or reaped while unreachable): say so, then what we
            // route, so every follower has us.
            let mut s = shared.borrow_mut();
            s.change(Change::Join);
            s.change(Change::SyncRoutes);
        }
        let nodes: Vec<NodeId> = match replies.get(2) {
            Some(Value::Array(items)) | Some(Value::Set(items)) => items
                .iter()
                .filter_map(|v| match v {
                    Value::BulkString(b) => keys::parse_name(b),
                    _ => None,
                })
                .filter(|&n| n != me)
                .collect(),
            _ => Vec::new(),
        };
        if let Err(e) = reap(&mut conn, &shared, &nodes, &mut suspects).await {
            shared.borrow_mut().mark_down("reaper", &e);
            suspects.clear();
        }
    }
}

async fn reap(
    conn: &mut Conn,
    shared: &Rc<RefCell<Shared>>,
    nodes: &[NodeId],
    suspects: &mut HashMap<NodeId, Instant>,
) -> redis::RedisResult<()> {
    let (keys, log_length, me, me_name) = {
        let s = shared.borrow();
        (s.keys.clone(), s.cfg.log_length, s.me, s.me_name.clone())
    };
    let keys = &keys;
    suspects.retain(|n, _| nodes.contains(n));
    if nodes.is_empty() {
        return Ok(());
    }
    let exists: Vec<Cmd> = nodes
        .iter()
        .map(|&n| redis::cmd("EXISTS").arg(keys.alive(n)).clone())
        .collect();
    let (alive, _) = conn.run(&exists).await?;
    let now = Instant::now();
    let grace = Duration::from_millis(shared.borrow().cfg.liveness_ttl_ms);
    for (&node, alive) in nodes.iter().zip(alive) {
        if alive != Value::Int(0) {
            suspects.remove(&node);
            continue;
        }
        if now.duration_since(*suspects.entry(node).or_insert(now)) < grace {
            continue;
        }
        suspects.remove(&node);
        let name = keys::name(node);
        let removed: i64 = conn
            .query(redis::cmd("SREM").arg(&keys.nodes).arg(&name))
            .await?;
        if removed != 1 {
            continue; // another survivor got there first
        }
        tracing::warn!(worker = %name, "worker's liveness key expired: its routes removed");
        let gone = [
            redis::cmd("DEL").arg(keys.routes(node)).clone(),
            redis::cmd("DEL").arg(keys.inbox(node)).clone(),
            log_entry(keys, log_length, &name, "gone", me_name.as_bytes()),
            redis::cmd("SMEMBERS").arg(keys.sessions(node)).clone(),
        ];
        let (replies, _) = conn.run(&gone).await?;
        let orphans: Vec<String> = match replies.last() {
            Some(Value::Array(ids)) | Some(Value::Set(ids)) => ids
                .iter()
                .filter_map(|v| match v {
                    Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        adopt(conn, shared, node, me, &me_name, &orphans).await?;
        conn.query::<i64>(redis::cmd("DEL").arg(keys.sessions(node)))
            .await?;
    }
    Ok(())
}

/// Takes over the stored sessions of dead worker `dead`: this worker's engine gets them
/// (offline: their wills and expiry run here, their subscriptions collect messages).
async fn adopt(
    conn: &mut Conn,
    shared: &Rc<RefCell<Shared>>,
    dead: NodeId,
    me: NodeId,
    me_name: &str,
    client_ids: &[String],
) -> redis::RedisResult<()> {
    if client_ids.is_empty() {
        return Ok(());
    }
    let keys = shared.borrow().keys.clone();
    let dead_name = keys::name(dead);
    let cmds: Vec<Cmd> = client_ids
        .iter()
        .map(|id| {
            redis::cmd("EVAL")
                .arg(ADOPT)
                .arg(2)
                .arg(keys.owner(id))
                .arg(keys.session(id))
                .arg(&dead_name)
                .arg(me_name)
                .clone()
        })
        .collect();
    let (replies, _) = conn.run(&cmds).await?;
    let mut adopted = Vec::new();
    for (id, reply) in client_ids.iter().zip(replies) {
        let Value::Array(items) = reply else { continue };
        let epoch = match items.first() {
            Some(Value::Int(e)) => *e as u64,
            _ => continue,
        };
        if let Some(image) = items.get(1).and_then(stored_session) {
            adopted.push(id.clone());
            shared
                .borrow()
                .outer
                .push(crate::cluster::ClusterEvent::SessionAdopted {
                    image: Box::new(image),
                    epoch,
                });
        }
    }
    if !adopted.is_empty() {
        tracing::info!(worker = %dead_name, sessions = adopted.len(), "adopted a dead worker's sessions");
        conn.query::<i64>(redis::cmd("SADD").arg(keys.sessions(me)).arg(&adopted))
            .await?;
    }
    Ok(())
}
