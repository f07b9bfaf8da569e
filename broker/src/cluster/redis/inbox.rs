//! The inbox reader: messages other hosts' workers wrote for this worker (`P:{h.s}:in`),
//! a batch of mesh frames per stream entry, handed to the engine in order; entries read
//! are deleted with the next read.
//!
//! It starts once this worker serves (a successor in a rolling restart reads after its
//! predecessor stopped, so the two never split the inbox) and stops when the worker
//! drains: what it read before is in the sessions handed on, and what it did not read
//! stays in Redis for the successor.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use redis::streams::StreamReadReply;
use redis::Value;

use super::super::wire::{self, Frame};
use super::keys;
use super::state::Shared;
use crate::cluster::ClusterEvent;
use crate::model::SessionImage;

/// Milliseconds one `XREAD` waits: also how long a drain may wait for the reader to stop.
const BLOCK_MS: u64 = 500;
const READ_COUNT: usize = 64;

pub(super) async fn run(shared: Rc<RefCell<Shared>>) {
    loop {
        let (serving, notify) = {
            let s = shared.borrow();
            (s.serving || s.inbox_stop, s.serving_notify.clone())
        };
        if serving {
            break;
        }
        notify.notified().await;
    }
    let cfg = shared.borrow().cfg.clone();
    let inbox = {
        let s = shared.borrow();
        s.keys.inbox(s.me)
    };
    let mut conn = super::writer::open(&shared, &cfg, "inbox").await;
    let mut from = "0-0".to_string();
    let mut read: Vec<String> = Vec::new();
    let mut arriving = None;
    loop {
        if shared.borrow().inbox_stop {
            break;
        }
        let held = {
            let s = shared.borrow();
            (!s.held.is_empty()).then(|| s.hold_released.clone())
        };
        if let Some(released) = held {
            // A destination here is behind: Redis keeps the messages meanwhile.
            let _ = tokio::time::timeout(Duration::from_millis(100), released.notified()).await;
            continue;
        }
        let mut cmds = Vec::with_capacity(2);
        if !read.is_empty() {
            cmds.push(redis::cmd("XDEL").arg(&inbox).arg(&read).clone());
        }
        cmds.push(
            redis::cmd("XREAD")
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(BLOCK_MS)
                .arg("STREAMS")
                .arg(&inbox)
                .arg(&from)
                .clone(),
        );
        let reply = match conn.run(&cmds).await {
            Ok((mut replies, _)) => replies.pop().unwrap_or(Value::Nil),
            Err(e) => {
                shared.borrow_mut().mark_down("inbox", &e);
                conn = super::writer::open(&shared, &cfg, "inbox").await;
                continue;
            }
        };
        read.clear();
        let Ok(Some(reply)) = redis::from_redis_value::<Option<StreamReadReply>>(reply) else {
            continue;
        };
        let mut s = shared.borrow_mut();
        s.mark_up();
        for entry in reply.keys.into_iter().flat_map(|k| k.ids) {
            let sender = match entry.map.get("n") {
                Some(Value::BulkString(n)) => keys::parse_name(n),
                _ => None,
            };
            if let (Some(from_node), Some(Value::BulkString(batch))) = (sender, entry.map.get("b"))
            {
                deliver(&mut s, from_node, batch, &mut arriving);
            }
            from = entry.id.clone();
            read.push(entry.id);
        }
    }
    if !read.is_empty() {
        let _ = conn
            .query::<i64>(redis::cmd("XDEL").arg(&inbox).arg(&read))
            .await;
    }
    shared.borrow_mut().inbox_stopped = true;
}

/// Hands one batch of frames from `from` to the engine. A session (a claimed client id's,
/// from its previous owner) may span batches: its parts are put together in `arriving`
/// and handed over whole at `HandoverEnd`.
fn deliver(
    s: &mut Shared,
    from: crate::model::NodeId,
    batch: &[u8],
    arriving: &mut Option<SessionImage>,
) {
    let mut buf = BytesMut::from(batch);
    let now = Instant::now();
    loop {
        match wire::decode(&mut buf, now) {
            Ok(Some(Frame::Release {
                client_id,
                send_session,
                epoch,
            })) => s.outer.push(ClusterEvent::Released {
                client_id,
                to: from,
                send_session,
                epoch,
            }),
            Ok(Some(Frame::NoSession(client_id))) => {
                s.outer.push(ClusterEvent::SessionAbsent(client_id))
            }
            Ok(Some(Frame::Session(image))) => *arriving = Some(*image),
            Ok(Some(Frame::SessionMore(more))) => {
                if let Some(image) = arriving.as_mut() {
                    image.inflight.extend(more.inflight);
                    image.queue.extend(more.queue);
                }
            }
            Ok(Some(Frame::HandoverEnd)) => {
                if let Some(image) = arriving.take() {
                    s.outer.push(ClusterEvent::SessionImported(Box::new(image)));
                }
            }
            Ok(Some(Frame::Publish { plain, shared, msg })) => {
                s.stats.messages_in += 1;
                s.outer.push(ClusterEvent::Forwarded {
                    from,
                    msg,
                    plain,
                    shared,
                });
            }
            Ok(Some(Frame::BarrierAck(id))) => s.remote_barrier_done(from, id),
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(worker = %from, "bad batch in the redis inbox: {}", e.0);
                break;
            }
        }
    }
}
