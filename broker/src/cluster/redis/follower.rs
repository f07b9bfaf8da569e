//! The follower: keeps this worker's picture of the other hosts (their workers, routes and
//! retained messages) the same as Redis's, and tells the engine what changed.
//!
//! It loads the state once (`P:nodes`, each live worker's route set, `P:retained`), then
//! reads the change log (`P:log`) from the entry that was last when it loaded. It keeps a
//! mirror of what it told the engine, so a change seen twice (in the state loaded and on
//! the log) is told once, and a reload after a long outage tells only the difference.
//! After a short outage it resumes from the last entry it read, if Redis still has it.

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::time::Instant;

use ahash::{AHashMap, AHashSet};
use bytes::{Bytes, BytesMut};
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use redis::{Cmd, Value};

use super::super::wire::{self, Frame};
use super::conn::Conn;
use super::keys;
use super::state::Shared;
use crate::cluster::ClusterEvent;
use crate::model::{Message, NodeId, Route};

/// Milliseconds one `XREAD` waits for new entries.
const BLOCK_MS: u64 = 1000;
const READ_COUNT: usize = 1000;

/// What the engine has been told about the other hosts.
#[derive(Default)]
struct Mirror {
    routes: AHashMap<NodeId, HashSet<Route>>,
    retained: AHashSet<Bytes>,
}

pub(super) async fn run(shared: Rc<RefCell<Shared>>) {
    let cfg = shared.borrow().cfg.clone();
    let mut mirror = Mirror::default();
    let mut last: Option<String> = None;
    loop {
        let mut conn = super::writer::open(&shared, &cfg, "follower").await;
        let log = shared.borrow().keys.log.clone();
        let resumable = match &last {
            Some(id) => match conn
                .query::<StreamRangeReply>(redis::cmd("XRANGE").arg(&log).arg(id).arg(id))
                .await
            {
                Ok(r) => !r.ids.is_empty(),
                Err(e) => {
                    // Not an answer: the log may well still have it.
                    shared.borrow_mut().mark_down("follower", &e);
                    continue;
                }
            },
            None => false,
        };
        if !resumable {
            match load(&mut conn, &shared, &mut mirror).await {
                Ok(id) => last = Some(id),
                Err(e) => {
                    shared.borrow_mut().mark_down("follower", &e);
                    continue;
                }
            }
        }
        {
            let mut s = shared.borrow_mut();
            s.synced = true;
            s.synced_notify.notify_waiters();
        }
        let Some(mut from) = last.clone() else {
            continue;
        };
        loop {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(BLOCK_MS)
                .arg("STREAMS")
                .arg(&log)
                .arg(&from);
            match conn.query::<Option<StreamReadReply>>(&cmd).await {
                Ok(reply) => {
                    shared.borrow_mut().mark_up();
                    for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                        apply(&shared, &mut mirror, &entry);
                        from = entry.id;
                    }
                    last = Some(from.clone());
                }
                Err(e) => {
                    shared.borrow_mut().mark_down("follower", &e);
                    break;
                }
            }
        }
    }
}

fn bytes_of(entry: &StreamId, field: &str) -> Option<Bytes> {
    match entry.map.get(field)? {
        Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
        Value::SimpleString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        _ => None,
    }
}

/// Applies one change-log entry.
fn apply(shared: &Rc<RefCell<Shared>>, mirror: &mut Mirror, entry: &StreamId) {
    let (Some(node), Some(op), data) = (
        bytes_of(entry, "n").and_then(|n| keys::parse_name(&n)),
        bytes_of(entry, "op"),
        bytes_of(entry, "d").unwrap_or_default(),
    ) else {
        return;
    };
    let mut s = shared.borrow_mut();
    // This host's own workers reach each other through the mesh.
    if node.host == s.me.host {
        return;
    }
    let outer = s.outer.clone();
    match &op[..] {
        b"join" => {
            s.members.insert(node);
            mirror.routes.entry(node).or_default();
        }
        b"add" | b"del" | b"sync" => {
            s.members.insert(node);
            let routes = decode_routes(&data);
            let known = mirror.routes.entry(node).or_default();
            match &op[..] {
                b"add" => {
                    for route in routes {
                        if known.insert(route.clone()) {
                            outer.push(ClusterEvent::RouteAdded { from: node, route });
                        }
                    }
                }
                b"del" => {
                    for route in routes {
                        if known.remove(&route) {
                            outer.push(ClusterEvent::RouteRemoved { from: node, route });
                        }
                    }
                }
                _ => replace_routes(&outer, node, known, routes.into_iter().collect()),
            }
        }
        b"gone" => {
            mirror.routes.remove(&node);
            outer.push(ClusterEvent::PeerLeft(node));
            s.member_left(node);
        }
        b"ret" => {
            if let Some(msg) = decode_retained(&data) {
                retained(&outer, mirror, msg);
            }
        }
        b"bar" => {
            if let Ok(id) = <[u8; 8]>::try_from(&data[..]) {
                outer.push(ClusterEvent::BarrierRequested {
                    from: node,
                    id: u64::from_le_bytes(id),
                });
            }
        }
        _ => {}
    }
}

fn retained(outer: &crate::cluster::ClusterInbox, mirror: &mut Mirror, msg: Message) {
    if msg.payload.is_empty() {
        mirror.retained.remove(&msg.topic);
    } else {
        mirror.retained.insert(msg.topic.clone());
    }
    outer.push(ClusterEvent::Retained(msg));
}

/// Tells the engine the difference between what it knows of `node`'s routes and `now`.
fn replace_routes(
    outer: &crate::cluster::ClusterInbox,
    node: NodeId,
    known: &mut HashSet<Route>,
    now: HashSet<Route>,
) {
    for route in known.difference(&now) {
        outer.push(ClusterEvent::RouteRemoved {
            from: node,
            route: route.clone(),
        });
    }
    for route in now.difference(known) {
        outer.push(ClusterEvent::RouteAdded {
            from: node,
            route: route.clone(),
        });
    }
    *known = now;
}

fn decode_routes(data: &[u8]) -> Vec<Route> {
    let mut buf = BytesMut::from(data);
    let mut routes = Vec::new();
    while let Ok(Some(frame)) = wire::decode(&mut buf, Instant::now()) {
        if let Frame::RouteAdd(route) = frame {
            routes.push(route);
        }
    }
    routes
}

fn decode_retained(data: &[u8]) -> Option<Message> {
    match wire::decode(&mut BytesMut::from(data), Instant::now()) {
        Ok(Some(Frame::Retained(msg))) => Some(msg),
        _ => None,
    }
}

fn bulk_items(v: &Value) -> Vec<&[u8]> {
    match v {
        Value::Array(items) | Value::Set(items) => items
            .iter()
            .filter_map(|v| match v {
                Value::BulkString(b) => Some(&b[..]),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Loads the whole state and tells the engine how it differs from what it was told
/// before. Returns the change-log entry to read on from (the last one before the load, so
/// nothing written during it is missed).
async fn load(
    conn: &mut Conn,
    shared: &Rc<RefCell<Shared>>,
    mirror: &mut Mirror,
) -> redis::RedisResult<String> {
    let (keys, me) = {
        let s = shared.borrow();
        (s.keys.clone(), s.me)
    };
    let newest: StreamRangeReply = conn
        .query(
            redis::cmd("XREVRANGE")
                .arg(&keys.log)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1),
        )
        .await?;
    let from = newest
        .ids
        .first()
        .map_or_else(|| "0-0".to_string(), |e| e.id.clone());
    let (replies, _) = conn
        .run(&[redis::cmd("SMEMBERS").arg(&keys.nodes).clone()])
        .await?;
    let nodes: Vec<NodeId> = replies
        .first()
        .map(bulk_items)
        .unwrap_or_default()
        .into_iter()
        .filter_map(keys::parse_name)
        .filter(|n| n.host != me.host)
        .collect();
    // A worker whose liveness key expired stays a member until a survivor removes it, and
    // says so on the log (after `from`): the key may be missing only because its Redis (a
    // shard of a Redis Cluster) was down for longer than the TTL.
    let mut cmds: Vec<Cmd> = Vec::new();
    for &node in &nodes {
        cmds.push(redis::cmd("SMEMBERS").arg(keys.routes(node)).clone());
    }
    cmds.push(redis::cmd("HGETALL").arg(&keys.retained).clone());
    let (replies, _) = conn.run(&cmds).await?;
    let mut live: AHashMap<NodeId, HashSet<Route>> = AHashMap::new();
    for (i, &node) in nodes.iter().enumerate() {
        let routes = bulk_items(&replies[i])
            .into_iter()
            .flat_map(decode_routes)
            .collect();
        live.insert(node, routes);
    }
    let retained_reply = replies.last().cloned().unwrap_or(Value::Nil);

    let mut s = shared.borrow_mut();
    let outer = s.outer.clone();
    let gone: Vec<NodeId> = mirror
        .routes
        .keys()
        .filter(|n| !live.contains_key(n))
        .copied()
        .collect();
    for node in gone {
        mirror.routes.remove(&node);
        outer.push(ClusterEvent::PeerLeft(node));
        s.member_left(node);
    }
    for (node, routes) in live {
        s.members.insert(node);
        let known = mirror.routes.entry(node).or_default();
        replace_routes(&outer, node, known, routes);
    }
    // HGETALL: field, value, field, value ... (RESP2) or a map (RESP3).
    let mut present = AHashSet::new();
    let pairs: Vec<Vec<u8>> = match retained_reply {
        Value::Map(kv) => kv
            .into_iter()
            .flat_map(|(_, v)| match v {
                Value::BulkString(b) => Some(b),
                _ => None,
            })
            .collect(),
        other => bulk_items(&other)
            .chunks(2)
            .filter_map(|pair| pair.get(1).map(|v| v.to_vec()))
            .collect(),
    };
    for frame in pairs {
        if let Some(msg) = decode_retained(&frame) {
            present.insert(msg.topic.clone());
            retained(&outer, mirror, msg);
        }
    }
    // Cleared while this worker was not reading the log.
    let vanished: Vec<Bytes> = mirror
        .retained
        .iter()
        .filter(|t| !present.contains(*t))
        .cloned()
        .collect();
    for topic in vanished {
        mirror.retained.remove(&topic);
        outer.push(ClusterEvent::Retained(Message {
            topic,
            payload: Bytes::new(),
            qos: crate::protocol::QoS::AtMostOnce,
            retain: true,
            properties: None,
            expires_at: None,
            origin: None,
        }));
    }
    Ok(from)
}
