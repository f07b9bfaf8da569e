//! Frames between workers on the mesh: `[u32 length][u8 kind][body]`, little-endian.
//!
//! Messages travel as MQTT 5 PUBLISH packets (encoded by the broker's own codec, so every
//! property survives the hop, with the expiry interval counted down). Many frames are
//! appended to one buffer and written with one syscall.

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::StreamKind;
use crate::model::{
    Delivery, InflightImage, Message, QueuedImage, Route, SessionImage, SharedTarget,
    SubscriptionImage, WillImage, WorkerStats,
};
use crate::protocol::{self, Packet, Publish, Version};
use topic_trie::SubscriptionOptions;

/// Largest frame accepted from a peer (a message of the largest packet size, plus headers).
const MAX_FRAME: usize = 256 * 1024 * 1024;

#[derive(Debug)]
pub enum Frame {
    /// First frame on a link: who is speaking.
    Hello {
        index: u16,
        pid: u32,
    },
    RouteAdd(Route),
    RouteRemove(Route),
    /// The sender's routes (sent after Hello) are complete.
    RoutesEnd,
    Publish {
        plain: bool,
        shared: Vec<SharedTarget>,
        msg: Message,
    },
    Retained(Message),
    /// The sender's retained messages (sent after its routes) are complete.
    RetainedEnd,
    Barrier(u64),
    BarrierAck(u64),
    /// A client connection: what its stream carries and the bytes already read from it.
    /// Its socket descriptor travels with this frame.
    Handoff {
        kind: StreamKind,
        /// The identity its transport proved (a TLS client certificate's), or empty.
        identity: Box<str>,
        bytes: Bytes,
    },
    Stats(WorkerStats),
    /// A persistent session moving from a draining worker to its successor, with the
    /// first of its messages.
    Session(Box<SessionImage>),
    /// More messages (queue and inflight, appended in order) of the session just sent:
    /// a session is sent in frames of bounded size, however much it holds.
    SessionMore(Box<SessionImage>),
    /// Every session has been sent.
    HandoverEnd,
    /// Last frame on a link to a process that a newer one replaced: the link closes
    /// because the sender switched to the newer process, not because it died.
    Superseded,
    /// A replacement has imported its predecessor's sessions and announced their routes:
    /// routes the predecessor announced and it did not are gone.
    Settled,
    /// The sender (on another host) claimed this client id: close its connection and, if
    /// `send_session`, answer with the session (`Session` frames) or `NoSession`.
    Release {
        client_id: String,
        send_session: bool,
        /// The claim's epoch (the latest claim of a client id owns it).
        epoch: u64,
    },
    /// The answer to a `Release` when the client id had no session.
    NoSession(String),
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const ROUTE_ADD: u8 = 2;
    pub const ROUTE_REMOVE: u8 = 3;
    pub const ROUTES_END: u8 = 4;
    pub const PUBLISH: u8 = 5;
    pub const RETAINED: u8 = 6;
    pub const RETAINED_END: u8 = 8;
    pub const BARRIER: u8 = 9;
    pub const BARRIER_ACK: u8 = 10;
    pub const HANDOFF: u8 = 11;
    pub const STATS: u8 = 12;
    pub const SESSION: u8 = 13;
    pub const SESSION_MORE: u8 = 14;
    pub const HANDOVER_END: u8 = 15;
    pub const SETTLED: u8 = 16;
    pub const SUPERSEDED: u8 = 17;
    pub const RELEASE: u8 = 18;
    pub const NO_SESSION: u8 = 19;
}

#[derive(Debug)]
pub struct WireError(pub String);

/// Appends one frame; the length is patched in once the body is written.
fn frame(out: &mut BytesMut, kind: u8, body: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.put_u32_le(0);
    out.put_u8(kind);
    body(out);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16_le(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_route(out: &mut BytesMut, r: &Route) {
    put_str(out, &r.filter);
    match &r.group {
        Some(g) => {
            out.put_u8(1);
            put_str(out, g);
        }
        None => out.put_u8(0),
    }
}

fn put_message(out: &mut BytesMut, msg: &Message, now: Instant) {
    let mut properties = msg.properties.as_deref().cloned();
    if let Some(left) = msg.remaining_expiry(now) {
        properties
            .get_or_insert_with(Default::default)
            .message_expiry_interval = Some(left);
    }
    let publish = Publish {
        dup: false,
        qos: msg.qos,
        retain: msg.retain,
        topic: msg.topic.clone(),
        // Never read back for routing; non-zero because QoS 1/2 PUBLISHes need one.
        pkid: 1,
        payload: msg.payload.clone(),
        properties,
    };
    protocol::write_packet(out, Version::V5, &Packet::Publish(publish));
}

/// Encodes `frame` (for the hot path, [`encode_publish`] avoids building a `Frame`).
pub fn encode(out: &mut BytesMut, f: &Frame, now: Instant) {
    match f {
        Frame::Hello { index, pid } => frame(out, kind::HELLO, |o| {
            o.put_u16_le(*index);
            o.put_u32_le(*pid);
        }),
        Frame::RouteAdd(r) => frame(out, kind::ROUTE_ADD, |o| put_route(o, r)),
        Frame::RouteRemove(r) => frame(out, kind::ROUTE_REMOVE, |o| put_route(o, r)),
        Frame::RoutesEnd => frame(out, kind::ROUTES_END, |_| {}),
        Frame::Publish { plain, shared, msg } => encode_publish(out, *plain, shared, msg, now),
        Frame::Retained(msg) => frame(out, kind::RETAINED, |o| put_message(o, msg, now)),
        Frame::RetainedEnd => frame(out, kind::RETAINED_END, |_| {}),
        Frame::Barrier(id) => frame(out, kind::BARRIER, |o| o.put_u64_le(*id)),
        Frame::BarrierAck(id) => frame(out, kind::BARRIER_ACK, |o| o.put_u64_le(*id)),
        Frame::Handoff {
            kind: handed,
            identity,
            bytes,
        } => frame(out, kind::HANDOFF, |o| {
            o.put_u8(*handed as u8);
            put_str(o, identity);
            o.put_slice(bytes);
        }),
        Frame::Session(image) => frame(out, kind::SESSION, |o| put_session(o, image, now)),
        Frame::SessionMore(image) => frame(out, kind::SESSION_MORE, |o| put_session(o, image, now)),
        Frame::HandoverEnd => frame(out, kind::HANDOVER_END, |_| {}),
        Frame::Settled => frame(out, kind::SETTLED, |_| {}),
        Frame::Superseded => frame(out, kind::SUPERSEDED, |_| {}),
        Frame::Release {
            client_id,
            send_session,
            epoch,
        } => frame(out, kind::RELEASE, |o| {
            o.put_u8(u8::from(*send_session));
            o.put_u64_le(*epoch);
            put_str(o, client_id);
        }),
        Frame::NoSession(client_id) => frame(out, kind::NO_SESSION, |o| put_str(o, client_id)),
        Frame::Stats(s) => frame(out, kind::STATS, |o| {
            for v in [
                s.clients_connected,
                s.sessions,
                s.subscriptions,
                s.retained,
                s.messages_received,
                s.messages_sent,
                s.bytes_received,
                s.bytes_sent,
                s.forwarded,
                s.restarts,
            ] {
                o.put_u64_le(v);
            }
        }),
    }
}

fn put_delivery(out: &mut BytesMut, d: &Delivery) {
    out.put_u8(d.qos);
    out.put_u8(u8::from(d.retain));
    out.put_u16_le(d.subscription_ids.len() as u16);
    for id in &d.subscription_ids {
        out.put_u32_le(*id);
    }
}

/// A message with its length in front (several follow each other in a session frame).
fn put_sized_message(out: &mut BytesMut, msg: &Message, now: Instant) {
    let start = out.len();
    out.put_u32_le(0);
    put_message(out, msg, now);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

fn put_session(out: &mut BytesMut, s: &SessionImage, now: Instant) {
    put_str(out, &s.client_id);
    out.put_u32_le(s.expiry_secs);
    out.put_u8(u8::from(s.expires_in.is_some()));
    out.put_u32_le(s.expires_in.unwrap_or(0));
    out.put_u32_le(s.subscriptions.len() as u32);
    for SubscriptionImage { filter, options: o } in &s.subscriptions {
        put_str(out, filter);
        out.put_u8(o.qos);
        out.put_u8(u8::from(o.no_local) | (u8::from(o.retain_as_published) << 1));
        out.put_u8(o.retain_handling);
        out.put_u8(u8::from(o.subscription_id.is_some()));
        out.put_u32_le(o.subscription_id.unwrap_or(0));
    }
    out.put_u32_le(s.queue.len() as u32);
    for QueuedImage { seq, msg, delivery } in &s.queue {
        out.put_u64_le(*seq);
        put_delivery(out, delivery);
        put_sized_message(out, msg, now);
    }
    out.put_u32_le(s.inflight.len() as u32);
    for m in &s.inflight {
        out.put_u64_le(m.seq);
        out.put_u16_le(m.pkid);
        out.put_u8(u8::from(m.awaiting_comp));
        put_delivery(out, &m.delivery);
        let msg = &m.msg;
        put_sized_message(out, msg, now);
    }
    out.put_u32_le(s.incoming_qos2.len() as u32);
    for id in &s.incoming_qos2 {
        out.put_u16_le(*id);
    }
    out.put_u8(u8::from(s.will.is_some()));
    if let Some(will) = &s.will {
        out.put_u32_le(will.delay_secs);
        out.put_u32_le(will.due_in);
        put_sized_message(out, &will.msg, now);
    }
}

pub fn encode_publish(
    out: &mut BytesMut,
    plain: bool,
    shared: &[SharedTarget],
    msg: &Message,
    now: Instant,
) {
    frame(out, kind::PUBLISH, |o| {
        o.put_u8(u8::from(plain));
        o.put_u16_le(shared.len() as u16);
        for target in shared {
            put_str(o, &target.group);
            put_str(o, &target.filter);
        }
        put_message(o, msg, now);
    })
}

struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.0.remaining() < n {
            return Err(WireError("truncated frame".into()));
        }
        Ok(())
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        Ok(self.0.get_u16_le())
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.0.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.0.get_u64_le())
    }
    fn str(&mut self) -> Result<Box<str>, WireError> {
        let len = self.u16()? as usize;
        self.need(len)?;
        let bytes = self.0.split_to(len);
        std::str::from_utf8(&bytes)
            .map(Box::from)
            .map_err(|_| WireError("bad UTF-8".into()))
    }
    fn route(&mut self) -> Result<Route, WireError> {
        let filter = self.str()?;
        let group = if self.u8()? == 1 {
            Some(self.str()?)
        } else {
            None
        };
        Ok(Route { filter, group })
    }
    fn delivery(&mut self) -> Result<Delivery, WireError> {
        let qos = self.u8()?;
        let retain = self.u8()? == 1;
        let n = self.u16()? as usize;
        let mut subscription_ids = Vec::with_capacity(n);
        for _ in 0..n {
            subscription_ids.push(self.u32()?);
        }
        Ok(Delivery {
            qos,
            retain,
            subscription_ids,
        })
    }

    fn sized_message(&mut self, now: Instant) -> Result<Message, WireError> {
        let len = self.u32()? as usize;
        self.need(len)?;
        Reader(self.0.split_to(len)).message(now)
    }

    fn session(&mut self, now: Instant) -> Result<SessionImage, WireError> {
        let client_id = self.str()?.into_string();
        let expiry_secs = self.u32()?;
        let has_expiry = self.u8()? == 1;
        let expires_in = Some(self.u32()?).filter(|_| has_expiry);
        let mut subscriptions = Vec::new();
        for _ in 0..self.u32()? {
            let filter = self.str()?.into_string();
            let qos = self.u8()?;
            let flags = self.u8()?;
            let retain_handling = self.u8()?;
            let has_id = self.u8()? == 1;
            let id = self.u32()?;
            let opts = SubscriptionOptions {
                qos,
                no_local: flags & 1 != 0,
                retain_as_published: flags & 2 != 0,
                retain_handling,
                subscription_id: Some(id).filter(|_| has_id),
            };
            subscriptions.push(SubscriptionImage {
                filter,
                options: opts,
            });
        }
        let mut queue = Vec::new();
        for _ in 0..self.u32()? {
            let seq = self.u64()?;
            let d = self.delivery()?;
            queue.push(QueuedImage {
                seq,
                msg: self.sized_message(now)?,
                delivery: d,
            });
        }
        let mut inflight = Vec::new();
        for _ in 0..self.u32()? {
            let seq = self.u64()?;
            let pkid = self.u16()?;
            let comp = self.u8()? == 1;
            let d = self.delivery()?;
            inflight.push(InflightImage {
                seq,
                pkid,
                awaiting_comp: comp,
                msg: self.sized_message(now)?,
                delivery: d,
            });
        }
        let mut incoming_qos2 = Vec::new();
        for _ in 0..self.u32()? {
            incoming_qos2.push(self.u16()?);
        }
        let will = if self.u8()? == 1 {
            let delay_secs = self.u32()?;
            let due_in = self.u32()?;
            Some(WillImage {
                msg: self.sized_message(now)?,
                delay_secs,
                due_in,
            })
        } else {
            None
        };
        Ok(SessionImage {
            client_id,
            expiry_secs,
            expires_in,
            subscriptions,
            queue,
            inflight,
            incoming_qos2,
            will,
        })
    }

    fn message(&mut self, now: Instant) -> Result<Message, WireError> {
        let mut buf = BytesMut::from(&self.0[..]);
        let packet = protocol::read_packet(&mut buf, Version::V5, u32::MAX)
            .map_err(|e| WireError(e.to_string()))?;
        let Some(Packet::Publish(p)) = packet else {
            return Err(WireError("expected a PUBLISH".into()));
        };
        let mut properties = p.properties;
        let expires_at = properties
            .as_ref()
            .and_then(|pr| pr.message_expiry_interval)
            .map(|s| now + Duration::from_secs(s as u64));
        if let Some(pr) = properties.as_mut() {
            pr.topic_alias = None;
        }
        Ok(Message {
            // Copied: the frame buffer is shared by everything read with it.
            topic: Bytes::copy_from_slice(&p.topic),
            payload: Bytes::copy_from_slice(&p.payload),
            qos: p.qos,
            retain: p.retain,
            properties: properties.map(Box::new),
            expires_at,
            origin: None,
        })
    }
}

/// Splits the next whole frame off `buf`. `Ok(None)`: more bytes are needed.
pub fn decode(buf: &mut BytesMut, now: Instant) -> Result<Option<Frame>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(WireError(format!("bad frame length {len}")));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    let mut r = Reader(buf.split_to(len).freeze());
    let frame = match r.u8()? {
        kind::HELLO => Frame::Hello {
            index: r.u16()?,
            pid: r.u32()?,
        },
        kind::ROUTE_ADD => Frame::RouteAdd(r.route()?),
        kind::ROUTE_REMOVE => Frame::RouteRemove(r.route()?),
        kind::ROUTES_END => Frame::RoutesEnd,
        kind::PUBLISH => {
            let plain = r.u8()? == 1;
            let n = r.u16()? as usize;
            let mut shared = Vec::with_capacity(n);
            for _ in 0..n {
                shared.push(SharedTarget {
                    group: r.str()?,
                    filter: r.str()?,
                });
            }
            Frame::Publish {
                plain,
                shared,
                msg: r.message(now)?,
            }
        }
        kind::RETAINED => Frame::Retained(r.message(now)?),
        kind::RETAINED_END => Frame::RetainedEnd,
        kind::BARRIER => Frame::Barrier(r.u64()?),
        kind::BARRIER_ACK => Frame::BarrierAck(r.u64()?),
        kind::HANDOFF => {
            let handed = r.u8()?;
            let kind = StreamKind::from_u8(handed)
                .ok_or_else(|| WireError(format!("unknown stream kind {handed}")))?;
            let identity = r.str()?;
            Frame::Handoff {
                kind,
                identity,
                bytes: r.0.clone(),
            }
        }
        kind::SESSION => Frame::Session(Box::new(r.session(now)?)),
        kind::SESSION_MORE => Frame::SessionMore(Box::new(r.session(now)?)),
        kind::HANDOVER_END => Frame::HandoverEnd,
        kind::SETTLED => Frame::Settled,
        kind::SUPERSEDED => Frame::Superseded,
        kind::RELEASE => Frame::Release {
            send_session: r.u8()? == 1,
            epoch: r.u64()?,
            client_id: r.str()?.into(),
        },
        kind::NO_SESSION => Frame::NoSession(r.str()?.into()),
        kind::STATS => Frame::Stats(WorkerStats {
            clients_connected: r.u64()?,
            sessions: r.u64()?,
            subscriptions: r.u64()?,
            retained: r.u64()?,
            messages_received: r.u64()?,
            messages_sent: r.u64()?,
            bytes_received: r.u64()?,
            bytes_sent: r.u64()?,
            forwarded: r.u64()?,
            restarts: r.u64()?,
        }),
        other => return Err(WireError(format!("unknown frame kind {other}"))),
    };
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{PublishProperties, QoS};

    #[test]
    fn frames_round_trip() {
        let now = Instant::now();
        let msg = Message {
            topic: Bytes::from_static(b"a/b"),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Some(Box::new(PublishProperties {
                content_type: Some("text/plain".into()),
                user_properties: vec![("k".into(), "v".into())],
                ..Default::default()
            })),
            expires_at: Some(now + Duration::from_secs(30)),
            origin: Some(crate::model::SessionKey(3)),
        };
        let mut out = BytesMut::new();
        encode(&mut out, &Frame::Hello { index: 2, pid: 99 }, now);
        let route = Route {
            filter: "x/+".into(),
            group: Some("g".into()),
        };
        encode(&mut out, &Frame::RouteAdd(route.clone()), now);
        let target = SharedTarget {
            group: "g".into(),
            filter: "a/+".into(),
        };
        encode_publish(&mut out, true, &[target], &msg, now);
        encode(&mut out, &Frame::Barrier(7), now);
        // Byte by byte: nothing decodes until a frame is whole.
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for b in out.iter() {
            buf.put_u8(*b);
            while let Some(f) = decode(&mut buf, now).unwrap() {
                frames.push(f);
            }
        }
        assert!(matches!(frames[0], Frame::Hello { index: 2, pid: 99 }));
        assert!(matches!(&frames[1], Frame::RouteAdd(r) if *r == route));
        match &frames[2] {
            Frame::Publish {
                plain,
                shared,
                msg: m,
            } => {
                assert!(*plain);
                assert_eq!(shared.len(), 1);
                assert_eq!(
                    (&m.topic, &m.payload, m.qos, m.retain),
                    (&msg.topic, &msg.payload, msg.qos, true)
                );
                let p = m.properties.as_ref().unwrap();
                assert_eq!(p.content_type.as_deref(), Some("text/plain"));
                assert_eq!(p.message_expiry_interval, Some(30));
                assert_eq!(m.origin, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(frames[3], Frame::Barrier(7)));
    }
}
