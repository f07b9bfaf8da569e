//! Minimal hand-rolled MQTT 3.1.1 (protocol level 4) and 5.0 (level 5) wire
//! encoding for the load generator.
//!
//! QoS 2 is covered both ways (PUBREC/PUBREL/PUBCOMP encoders; the acks share
//! [`decode_puback`]'s layout), as is the PUBLISH retain flag.
//!
//! Only what the benchmark needs is here: encoders for CONNECT, SUBSCRIBE,
//! PUBLISH, PUBACK and PINGREQ that append straight into a caller-owned,
//! reused [`BytesMut`] (so no allocation per message and many packets can be
//! batched into one `write`), and a streaming frame splitter ([`split_frame`])
//! plus borrowing decoders for the packets a client receives (CONNACK, SUBACK,
//! PUBLISH, PUBACK). Decoded packets borrow from the read buffer; nothing is
//! copied. MQTT 5 properties are written empty and skipped on read, except the
//! CONNACK Receive Maximum, which bounds the QoS 1 window.

use bytes::{BufMut, BytesMut};

/// Packet type nibbles (upper four bits of the first header byte).
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBACK: u8 = 9;
pub const DISCONNECT: u8 = 14;

/// MQTT protocol level: 4 = 3.1.1, 5 = 5.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    V4,
    V5,
}

impl Protocol {
    pub fn from_level(level: u8) -> anyhow::Result<Self> {
        match level {
            4 => Ok(Protocol::V4),
            5 => Ok(Protocol::V5),
            other => anyhow::bail!("unsupported MQTT protocol level {other} (use 4 or 5)"),
        }
    }

    pub fn level(self) -> u8 {
        match self {
            Protocol::V4 => 4,
            Protocol::V5 => 5,
        }
    }
}

/// Errors from the frame splitter / decoders.
#[derive(Debug, PartialEq, Eq)]
pub enum WireError {
    /// Remaining-length varint longer than 4 bytes.
    MalformedLength,
    /// Frame larger than the caller's limit.
    TooLarge(usize),
    /// Packet body shorter than its fields need.
    Truncated,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::MalformedLength => write!(f, "malformed remaining length"),
            WireError::TooLarge(n) => write!(f, "frame of {n} bytes exceeds limit"),
            WireError::Truncated => write!(f, "truncated packet body"),
        }
    }
}

impl std::error::Error for WireError {}

/// Number of bytes the remaining-length varint takes for `len`.
#[inline]
pub fn varint_len(len: usize) -> usize {
    match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

#[inline]
fn put_varint(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

#[inline]
fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

/// Append a CONNECT packet (clean session / clean start, no will, no login).
pub fn encode_connect(buf: &mut BytesMut, proto: Protocol, client_id: &str, keep_alive: u16) {
    encode_connect_session(buf, proto, client_id, keep_alive, true)
}

/// Append a CONNECT; `clean` false asks for a session that outlives the connection (3.1.1
/// clean session 0; v5 clean start 0 with a Session Expiry Interval of one hour).
pub fn encode_connect_session(
    buf: &mut BytesMut,
    proto: Protocol,
    client_id: &str,
    keep_alive: u16,
    clean: bool,
) {
    // v5 properties: the Session Expiry Interval (id 0x11, four bytes) when not clean.
    let expiry = proto == Protocol::V5 && !clean;
    // variable header: "MQTT" (6) + level (1) + flags (1) + keepalive (2) [+ props len (1)]
    let props = match (proto, expiry) {
        (Protocol::V5, true) => 6,
        (Protocol::V5, false) => 1,
        _ => 0,
    };
    let remaining = 10 + props + 2 + client_id.len();
    buf.reserve(1 + varint_len(remaining) + remaining);
    buf.put_u8(0x10);
    put_varint(buf, remaining);
    put_str(buf, b"MQTT");
    buf.put_u8(proto.level());
    buf.put_u8(if clean { 0x02 } else { 0x00 }); // clean session / clean start
    buf.put_u16(keep_alive);
    if expiry {
        buf.put_u8(5);
        buf.put_u8(0x11);
        buf.put_u32(3600);
    } else if proto == Protocol::V5 {
        buf.put_u8(0); // no properties
    }
    put_str(buf, client_id.as_bytes());
}

/// Append a SUBSCRIBE with a single topic filter.
pub fn encode_subscribe(buf: &mut BytesMut, proto: Protocol, pkid: u16, filter: &str, qos: u8) {
    let props = if proto == Protocol::V5 { 1 } else { 0 };
    let remaining = 2 + props + 2 + filter.len() + 1;
    buf.reserve(1 + varint_len(remaining) + remaining);
    buf.put_u8(0x82);
    put_varint(buf, remaining);
    buf.put_u16(pkid);
    if proto == Protocol::V5 {
        buf.put_u8(0);
    }
    put_str(buf, filter.as_bytes());
    // v5 subscription options: QoS in the low bits, no-local/RAP/retain-handling = 0
    buf.put_u8(qos & 0x03);
}

/// Total encoded size of a PUBLISH, handy for pre-sizing batch buffers.
#[inline]
pub fn publish_size(proto: Protocol, topic_len: usize, qos: u8, payload_len: usize) -> usize {
    let remaining = publish_remaining(proto, topic_len, qos, payload_len);
    1 + varint_len(remaining) + remaining
}

#[inline]
fn publish_remaining(proto: Protocol, topic_len: usize, qos: u8, payload_len: usize) -> usize {
    let pkid = if qos > 0 { 2 } else { 0 };
    let props = if proto == Protocol::V5 { 1 } else { 0 };
    2 + topic_len + pkid + props + payload_len
}

/// Append a PUBLISH header (everything up to the payload) and return nothing;
/// the caller must then append exactly `payload_len` payload bytes. This lets
/// the load generator write its timestamp/sequence straight into the buffer
/// without building a payload first.
#[inline]
pub fn encode_publish_header(
    buf: &mut BytesMut,
    proto: Protocol,
    topic: &[u8],
    qos: u8,
    pkid: u16,
    payload_len: usize,
) {
    encode_publish_header_flags(buf, proto, topic, qos, false, pkid, payload_len);
}

/// [`encode_publish_header`] with the retain flag.
#[inline]
pub fn encode_publish_header_flags(
    buf: &mut BytesMut,
    proto: Protocol,
    topic: &[u8],
    qos: u8,
    retain: bool,
    pkid: u16,
    payload_len: usize,
) {
    let remaining = publish_remaining(proto, topic.len(), qos, payload_len);
    buf.put_u8(0x30 | ((qos & 0x03) << 1) | u8::from(retain));
    put_varint(buf, remaining);
    put_str(buf, topic);
    if qos > 0 {
        buf.put_u16(pkid);
    }
    if proto == Protocol::V5 {
        buf.put_u8(0);
    }
}

/// Append a complete PUBLISH packet (convenience form of
/// [`encode_publish_header`]; the hot path writes payloads in place).
#[allow(dead_code)]
pub fn encode_publish(
    buf: &mut BytesMut,
    proto: Protocol,
    topic: &[u8],
    qos: u8,
    pkid: u16,
    payload: &[u8],
) {
    buf.reserve(publish_size(proto, topic.len(), qos, payload.len()));
    encode_publish_header(buf, proto, topic, qos, pkid, payload.len());
    buf.put_slice(payload);
}

/// Append a PUBACK (success; the v5 short form without reason code is valid).
#[inline]
pub fn encode_puback(buf: &mut BytesMut, pkid: u16) {
    buf.put_u8(0x40);
    buf.put_u8(2);
    buf.put_u16(pkid);
}

/// Append a PUBREC (QoS 2 receiver, step 1).
#[inline]
pub fn encode_pubrec(buf: &mut BytesMut, pkid: u16) {
    buf.put_u8(0x50);
    buf.put_u8(2);
    buf.put_u16(pkid);
}

/// Append a PUBREL (QoS 2 sender, step 2; fixed-header flags must be 0b0010).
#[inline]
pub fn encode_pubrel(buf: &mut BytesMut, pkid: u16) {
    buf.put_u8(0x62);
    buf.put_u8(2);
    buf.put_u16(pkid);
}

/// Append a PUBCOMP (QoS 2 receiver, step 3).
#[inline]
pub fn encode_pubcomp(buf: &mut BytesMut, pkid: u16) {
    buf.put_u8(0x70);
    buf.put_u8(2);
    buf.put_u16(pkid);
}

/// Append a PINGREQ.
pub fn encode_pingreq(buf: &mut BytesMut) {
    buf.put_u8(0xC0);
    buf.put_u8(0);
}

/// Append a DISCONNECT (normal disconnection in both versions).
pub fn encode_disconnect(buf: &mut BytesMut) {
    buf.put_u8(0xE0);
    buf.put_u8(0);
}

/// One complete frame located in a buffer: the first header byte, where the
/// body starts and the total frame length (header + body).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    pub header: u8,
    pub body_start: usize,
    pub frame_len: usize,
}

impl FrameInfo {
    #[inline]
    pub fn packet_type(&self) -> u8 {
        self.header >> 4
    }

    #[inline]
    pub fn body<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.body_start..self.frame_len]
    }
}

/// Streaming frame splitter: if `buf` starts with a complete MQTT frame,
/// return its location; `Ok(None)` means more bytes are needed. The caller
/// advances its cursor by `frame_len` after handling the frame.
#[inline]
pub fn split_frame(buf: &[u8], max_frame: usize) -> Result<Option<FrameInfo>, WireError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut len: usize = 0;
    let mut shift = 0;
    let mut i = 1;
    loop {
        if i >= buf.len() {
            return Ok(None);
        }
        if i > 4 {
            return Err(WireError::MalformedLength);
        }
        let b = buf[i];
        len |= ((b & 0x7f) as usize) << shift;
        shift += 7;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let frame_len = i + len;
    if frame_len > max_frame {
        return Err(WireError::TooLarge(frame_len));
    }
    if buf.len() < frame_len {
        return Ok(None);
    }
    Ok(Some(FrameInfo {
        header: buf[0],
        body_start: i,
        frame_len,
    }))
}

#[inline]
fn read_u16(b: &[u8], at: usize) -> Result<u16, WireError> {
    if b.len() < at + 2 {
        return Err(WireError::Truncated);
    }
    Ok(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// Read a v5 property-length varint at `at`; returns (value, bytes used).
fn read_varint(b: &[u8], at: usize) -> Result<(usize, usize), WireError> {
    let mut v = 0usize;
    let mut shift = 0;
    for i in 0..4 {
        let byte = *b.get(at + i).ok_or(WireError::Truncated)?;
        v |= ((byte & 0x7f) as usize) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok((v, i + 1));
        }
    }
    Err(WireError::MalformedLength)
}

/// A received PUBLISH, borrowing topic and payload from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct PublishRef<'a> {
    pub qos: u8,
    pub retain: bool,
    pub pkid: u16,
    pub topic: &'a [u8],
    pub payload: &'a [u8],
}

/// Decode a PUBLISH body (`header` is the first fixed-header byte).
#[inline]
pub fn decode_publish(
    proto: Protocol,
    header: u8,
    body: &[u8],
) -> Result<PublishRef<'_>, WireError> {
    let qos = (header >> 1) & 0x03;
    let tlen = read_u16(body, 0)? as usize;
    let mut at = 2 + tlen;
    if body.len() < at {
        return Err(WireError::Truncated);
    }
    let topic = &body[2..at];
    let mut pkid = 0;
    if qos > 0 {
        pkid = read_u16(body, at)?;
        at += 2;
    }
    if proto == Protocol::V5 {
        let (plen, used) = read_varint(body, at)?;
        at += used + plen;
        if body.len() < at {
            return Err(WireError::Truncated);
        }
    }
    Ok(PublishRef {
        qos,
        retain: header & 1 == 1,
        pkid,
        topic,
        payload: &body[at..],
    })
}

/// Decode a PUBACK body: packet id and reason code (0 when absent / v4).
#[inline]
pub fn decode_puback(body: &[u8]) -> Result<(u16, u8), WireError> {
    let pkid = read_u16(body, 0)?;
    let reason = body.get(2).copied().unwrap_or(0);
    Ok((pkid, reason))
}

/// Decoded CONNACK.
#[derive(Debug, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// v4 return code or v5 reason code; 0 = accepted.
    pub code: u8,
    /// v5 Receive Maximum property, if the server sent one.
    pub receive_maximum: Option<u16>,
}

pub fn decode_connack(proto: Protocol, body: &[u8]) -> Result<ConnAck, WireError> {
    if body.len() < 2 {
        return Err(WireError::Truncated);
    }
    let mut ack = ConnAck {
        session_present: body[0] & 1 == 1,
        code: body[1],
        receive_maximum: None,
    };
    if proto == Protocol::V5 && body.len() > 2 {
        let (plen, used) = read_varint(body, 2)?;
        let start = 2 + used;
        let end = start + plen;
        let props = body.get(start..end).ok_or(WireError::Truncated)?;
        walk_properties(props, |id, value| {
            if id == 0x21 && value.len() == 2 {
                ack.receive_maximum = Some(u16::from_be_bytes([value[0], value[1]]));
            }
        })?;
    }
    Ok(ack)
}

/// Decode a SUBACK body: packet id and the first return/reason code.
pub fn decode_suback(proto: Protocol, body: &[u8]) -> Result<(u16, u8), WireError> {
    let pkid = read_u16(body, 0)?;
    let mut at = 2;
    if proto == Protocol::V5 {
        let (plen, used) = read_varint(body, at)?;
        at += used + plen;
    }
    let code = *body.get(at).ok_or(WireError::Truncated)?;
    Ok((pkid, code))
}

/// Iterate v5 properties, calling `f(id, value_bytes)`. Only fixed-size and
/// length-prefixed types are understood; user properties are skipped whole.
fn walk_properties(mut p: &[u8], mut f: impl FnMut(u8, &[u8])) -> Result<(), WireError> {
    while !p.is_empty() {
        let id = p[0];
        let rest = &p[1..];
        let len = match id {
            // byte
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            // two-byte integer
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            // four-byte integer
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            // variable byte integer
            0x0B => read_varint(rest, 0)?.1,
            // UTF-8 string / binary data
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
                2 + read_u16(rest, 0)? as usize
            }
            // user property: string pair
            0x26 => {
                let k = 2 + read_u16(rest, 0)? as usize;
                k + 2 + read_u16(rest, k)? as usize
            }
            _ => return Err(WireError::Truncated),
        };
        let value = rest.get(..len).ok_or(WireError::Truncated)?;
        f(id, value);
        p = &rest[len..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::{v4, QoS};

    fn read_v4(buf: &mut BytesMut) -> v4::Packet {
        v4::Packet::read(buf, 1 << 20).expect("rumqttc decodes our frame")
    }

    #[test]
    fn our_encoding_decodes_with_rumqttc_v4() {
        let mut buf = BytesMut::new();
        encode_connect(&mut buf, Protocol::V4, "bench-pub-7", 600);
        encode_subscribe(&mut buf, Protocol::V4, 1, "bench/7", 1);
        encode_publish(&mut buf, Protocol::V4, b"bench/7", 1, 42, b"hello world");
        encode_publish(&mut buf, Protocol::V4, b"bench/7", 0, 0, &[0u8; 200]);
        encode_puback(&mut buf, 42);
        encode_pubrec(&mut buf, 43);
        encode_pubrel(&mut buf, 43);
        encode_pubcomp(&mut buf, 43);
        encode_pingreq(&mut buf);

        match read_v4(&mut buf) {
            v4::Packet::Connect(c) => {
                assert_eq!(c.client_id, "bench-pub-7");
                assert_eq!(c.keep_alive, 600);
                assert!(c.clean_session);
            }
            p => panic!("expected CONNECT, got {p:?}"),
        }
        match read_v4(&mut buf) {
            v4::Packet::Subscribe(s) => {
                assert_eq!(s.pkid, 1);
                assert_eq!(s.filters.len(), 1);
                assert_eq!(s.filters[0].path, "bench/7");
                assert_eq!(s.filters[0].qos, QoS::AtLeastOnce);
            }
            p => panic!("expected SUBSCRIBE, got {p:?}"),
        }
        match read_v4(&mut buf) {
            v4::Packet::Publish(p) => {
                assert_eq!(p.topic, "bench/7");
                assert_eq!(p.qos, QoS::AtLeastOnce);
                assert_eq!(p.pkid, 42);
                assert_eq!(&p.payload[..], b"hello world");
            }
            p => panic!("expected PUBLISH, got {p:?}"),
        }
        match read_v4(&mut buf) {
            v4::Packet::Publish(p) => {
                assert_eq!(p.qos, QoS::AtMostOnce);
                assert_eq!(p.payload.len(), 200); // two-byte remaining length
            }
            p => panic!("expected PUBLISH, got {p:?}"),
        }
        assert_eq!(read_v4(&mut buf), v4::Packet::PubAck(v4::PubAck::new(42)));
        assert_eq!(read_v4(&mut buf), v4::Packet::PubRec(v4::PubRec::new(43)));
        assert_eq!(read_v4(&mut buf), v4::Packet::PubRel(v4::PubRel::new(43)));
        assert_eq!(read_v4(&mut buf), v4::Packet::PubComp(v4::PubComp::new(43)));
        assert_eq!(read_v4(&mut buf), v4::Packet::PingReq);
        assert!(buf.is_empty());
    }

    #[test]
    fn rumqttc_encoding_splits_and_decodes_here() {
        let mut buf = BytesMut::new();
        v4::ConnAck::new(v4::ConnectReturnCode::Success, false)
            .write(&mut buf)
            .unwrap();
        v4::SubAck::new(3, vec![v4::SubscribeReasonCode::Success(QoS::AtLeastOnce)])
            .write(&mut buf)
            .unwrap();
        let mut p = v4::Publish::new("bench/12", QoS::AtLeastOnce, vec![7u8; 300]);
        p.pkid = 9;
        p.write(&mut buf).unwrap();
        v4::PubAck::new(9).write(&mut buf).unwrap();
        let all = buf.freeze();

        // Feed the stream one byte at a time to exercise partial frames.
        let mut frames = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        for &b in all.iter() {
            pending.push(b);
            if let Some(f) = split_frame(&pending, 1 << 20).unwrap() {
                assert_eq!(f.frame_len, pending.len());
                frames.push((f.header, f.body(&pending).to_vec()));
                pending.clear();
            }
        }
        assert!(pending.is_empty());
        assert_eq!(frames.len(), 4);

        assert_eq!(frames[0].0 >> 4, CONNACK);
        let ack = decode_connack(Protocol::V4, &frames[0].1).unwrap();
        assert_eq!((ack.session_present, ack.code), (false, 0));

        assert_eq!(frames[1].0 >> 4, SUBACK);
        assert_eq!(decode_suback(Protocol::V4, &frames[1].1).unwrap(), (3, 1));

        assert_eq!(frames[2].0 >> 4, PUBLISH);
        let p = decode_publish(Protocol::V4, frames[2].0, &frames[2].1).unwrap();
        assert_eq!((p.qos, p.pkid, p.topic), (1, 9, &b"bench/12"[..]));
        assert_eq!(p.payload, &[7u8; 300][..]);

        assert_eq!(frames[3].0 >> 4, PUBACK);
        assert_eq!(decode_puback(&frames[3].1).unwrap(), (9, 0));
    }

    #[test]
    fn v5_publish_and_connack_round_trip() {
        let mut buf = BytesMut::new();
        encode_publish(&mut buf, Protocol::V5, b"a/b", 1, 513, b"xyz");
        assert_eq!(buf.len(), publish_size(Protocol::V5, 3, 1, 3));
        let f = split_frame(&buf, 1024).unwrap().unwrap();
        let p = decode_publish(Protocol::V5, f.header, f.body(&buf)).unwrap();
        assert_eq!(
            (p.qos, p.pkid, p.topic, p.payload),
            (1, 513, &b"a/b"[..], &b"xyz"[..])
        );

        // CONNACK with Receive Maximum = 20 and a user property.
        let body = [
            0u8, 0, 13, 0x21, 0, 20, 0x26, 0, 1, b'k', 0, 4, b'v', b'a', b'l', b'!',
        ];
        let ack = decode_connack(Protocol::V5, &body).unwrap();
        assert_eq!(ack.receive_maximum, Some(20));
        assert_eq!(ack.code, 0);
    }

    #[test]
    fn splitter_rejects_bad_length() {
        assert_eq!(
            split_frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], 1 << 30),
            Err(WireError::MalformedLength)
        );
        assert_eq!(split_frame(&[0x30, 0x05, 0, 0], 1024), Ok(None));
        assert!(matches!(
            split_frame(&[0x30, 0x80, 0x80, 0x01], 1024),
            Err(WireError::TooLarge(_))
        ));
    }
}
