//! Multi-stream MQTT over QUIC, I/O-free: which QUIC stream each packet belongs on.
//!
//! The engine sees one byte stream per client (fed by the relay). A QUIC client may
//! open several bidirectional streams; the first is the **control stream** (CONNECT, CONNACK,
//! PINGREQ/PINGRESP, DISCONNECT, AUTH), the others are **data streams** carrying PUBLISH and
//! SUBSCRIBE, so a slow topic does not hold up the others. Inbound, whole packets from every
//! stream are interleaved into the engine's byte stream at packet boundaries ([`Framer`]).
//! Outbound, [`Mux::route`] sends each packet from the engine back where it belongs:
//!
//! | packet from the engine | stream |
//! |---|---|
//! | CONNACK, PINGRESP, DISCONNECT, AUTH | control |
//! | SUBACK, UNSUBACK | the one that carried the SUBSCRIBE / UNSUBSCRIBE with that packet id |
//! | PUBACK, PUBREC, PUBCOMP | the one that carried the client's PUBLISH / PUBREL with that id |
//! | PUBLISH | the one whose SUBSCRIBE filter matches the topic (latest subscribe wins) |
//! | PUBREL (broker → client QoS 2) | the one its PUBLISH went to |
//! | anything else, or no match | control |
//!
//! Nothing is recorded while a connection has only its control stream (single-stream mode,
//! the common case): everything goes to the control stream anyway, so an idle single-stream
//! connection holds no mux state at all.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};

use crate::protocol::framing::{packet_type, parse_header, FrameError};

/// A stream of one connection, numbered in the order the client opened them: 0 is control.
/// Numbers are never reused, so a route recorded for a closed stream cannot leak into another.
pub type StreamNo = u64;
pub const CONTROL: StreamNo = 0;

/// Cuts one direction of one stream into whole MQTT packets.
#[derive(Debug, Default)]
pub struct Framer {
    /// An incomplete packet's bytes so far (empty, and unallocated, between packets).
    partial: BytesMut,
    /// A header failed the framing checks: from then on bytes pass through unframed, and
    /// the engine, which runs the same checks, refuses the connection with the right reason.
    malformed: bool,
}

impl Framer {
    /// Adds `chunk`; returns the packets it completed, as one contiguous run (maybe empty).
    pub fn push(&mut self, chunk: Bytes, max_packet_size: u32) -> Bytes {
        if self.malformed {
            return chunk;
        }
        let mut data = if self.partial.is_empty() {
            chunk
        } else {
            let mut partial = std::mem::take(&mut self.partial);
            partial.extend_from_slice(&chunk);
            partial.freeze()
        };
        let mut whole = 0;
        loop {
            match parse_header(&data[whole..], max_packet_size) {
                Ok(header) => whole += header.frame_len(),
                Err(FrameError::Incomplete) => break,
                Err(_) => {
                    self.malformed = true;
                    return data;
                }
            }
        }
        let run = data.split_to(whole);
        if !data.is_empty() {
            self.partial.extend_from_slice(&data);
        }
        run
    }

    /// Bytes of an incomplete packet held.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

/// Iterates the packets of a run [`Framer::push`] returned.
pub fn packets(run: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = parse_header(&run[at..], u32::MAX).ok()?;
        let packet = run.slice(at..at + header.frame_len());
        at += header.frame_len();
        Some(packet)
    })
}

/// The routing state of one connection's streams.
#[derive(Debug, Default)]
pub struct Mux {
    /// Protocol level from the CONNECT (4 = 3.1.1, 5 = 5.0): v5 packets carry properties.
    version: u8,
    /// Some client stream other than control was opened: from then on routes are recorded.
    multi: bool,
    /// Client-chosen packet id → stream of its PUBLISH / PUBREL / SUBSCRIBE / UNSUBSCRIBE.
    client_ids: HashMap<u16, StreamNo>,
    /// Broker-chosen id of a QoS 2 PUBLISH sent on a data stream → that stream (for PUBREL).
    broker_qos2: HashMap<u16, StreamNo>,
    /// Subscribed filters (share prefix removed) and their streams, latest last.
    filters: Vec<(Box<str>, StreamNo)>,
}

impl Mux {
    /// The client opened another stream: routes are recorded from now on.
    pub fn data_stream_opened(&mut self) {
        self.multi = true;
    }

    /// A data stream ended: what was routed to it goes to the control stream instead.
    pub fn stream_closed(&mut self, stream: StreamNo) {
        self.client_ids.retain(|_, s| *s != stream);
        self.broker_qos2.retain(|_, s| *s != stream);
        self.filters.retain(|(_, s)| *s != stream);
    }

    /// Notes what a whole packet the client sent on `stream` means for later routing.
    pub fn client_packet(&mut self, stream: StreamNo, packet: &[u8]) {
        let Ok(header) = parse_header(packet, u32::MAX) else {
            return;
        };
        let body = &packet[header.header_len..];
        if header.packet_type == packet_type::CONNECT {
            // Protocol name (a 2-byte length and the name), then the level.
            let name_len = be16(body, 0).unwrap_or(0) as usize;
            self.version = body.get(2 + name_len).copied().unwrap_or(0);
            return;
        }
        if !self.multi {
            return;
        }
        match header.packet_type {
            packet_type::PUBLISH if header.flags & 0b0110 != 0 => {
                let id = read_str(body, 0).and_then(|(_, at)| be16(body, at));
                if let Some(id) = id {
                    self.client_ids.insert(id, stream);
                }
            }
            packet_type::PUBREL => {
                if let Some(id) = be16(body, 0) {
                    self.client_ids.insert(id, stream);
                }
            }
            packet_type::SUBSCRIBE => {
                if let Some(id) = be16(body, 0) {
                    self.client_ids.insert(id, stream);
                }
                for filter in self.subscribe_filters(body) {
                    self.filters.retain(|(f, _)| **f != *filter);
                    self.filters.push((filter.into(), stream));
                }
            }
            packet_type::UNSUBSCRIBE => {
                if let Some(id) = be16(body, 0) {
                    self.client_ids.insert(id, stream);
                }
                let mut at = self.after_properties(body, 2);
                while let Some((filter, next)) = read_str(body, at) {
                    let filter = unshare(filter);
                    self.filters.retain(|(f, _)| **f != *filter);
                    at = next;
                }
            }
            _ => {}
        }
    }

    /// The stream a whole packet from the engine goes to.
    pub fn route(&mut self, packet: &[u8]) -> StreamNo {
        if !self.multi {
            return CONTROL;
        }
        let Ok(header) = parse_header(packet, u32::MAX) else {
            return CONTROL;
        };
        let body = &packet[header.header_len..];
        let id = be16(body, 0);
        match header.packet_type {
            packet_type::SUBACK
            | packet_type::UNSUBACK
            | packet_type::PUBACK
            | packet_type::PUBCOMP => id.and_then(|id| self.client_ids.remove(&id)),
            // The client's PUBREL (and so our PUBCOMP) is still to come: keep the route.
            packet_type::PUBREC => id.and_then(|id| self.client_ids.get(&id).copied()),
            packet_type::PUBREL => id.and_then(|id| self.broker_qos2.remove(&id)),
            packet_type::PUBLISH => {
                let (topic, at) = match read_str(body, 0) {
                    Some(found) => found,
                    None => return CONTROL,
                };
                let stream = self
                    .filters
                    .iter()
                    .rev()
                    .find(|(filter, _)| topic_trie::filter_matches(filter, topic))
                    .map(|(_, s)| *s);
                let qos = (header.flags >> 1) & 0b11;
                if let (Some(stream), 2, Some(id)) = (stream, qos, be16(body, at)) {
                    self.broker_qos2.insert(id, stream);
                }
                stream
            }
            _ => None,
        }
        .unwrap_or(CONTROL)
    }

    /// Offset past the v5 properties that start at `at` (3.1.1 has none).
    fn after_properties(&self, body: &[u8], at: usize) -> usize {
        if self.version != 5 {
            return at;
        }
        let mut len = 0usize;
        for i in 0..4 {
            let Some(&byte) = body.get(at + i) else {
                return body.len();
            };
            len |= usize::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                return at + i + 1 + len;
            }
        }
        body.len()
    }

    /// The topic filters of a SUBSCRIBE body, share prefixes removed.
    fn subscribe_filters<'a>(&self, body: &'a [u8]) -> Vec<&'a str> {
        let mut at = self.after_properties(body, 2);
        let mut filters = Vec::new();
        while let Some((filter, next)) = read_str(body, at) {
            filters.push(unshare(filter));
            at = next + 1; // the subscription options byte
        }
        filters
    }
}

/// `$share/group/filter` → `filter`: a shared subscription's messages match the filter.
fn unshare(filter: &str) -> &str {
    match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
        None => filter,
    }
}

fn be16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]))
}

/// A length-prefixed UTF-8 string at `at`, and the offset after it.
fn read_str(buf: &[u8], at: usize) -> Option<(&str, usize)> {
    let len = be16(buf, at)? as usize;
    let bytes = buf.get(at + 2..at + 2 + len)?;
    Some((std::str::from_utf8(bytes).ok()?, at + 2 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(first: u8, body: &[u8]) -> Vec<u8> {
        assert!(body.len() < 128);
        let mut v = vec![first, body.len() as u8];
        v.extend_from_slice(body);
        v
    }

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn connect(level: u8) -> Vec<u8> {
        let mut body = string("MQTT");
        body.extend_from_slice(&[level, 0x02, 0, 60]);
        if level == 5 {
            body.push(0);
        }
        body.extend(string("c"));
        frame(0x10, &body)
    }

    fn subscribe(v5: bool, id: u16, filter: &str, qos: u8) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        if v5 {
            body.push(0);
        }
        body.extend(string(filter));
        body.push(qos);
        frame(0x82, &body)
    }

    fn publish(qos: u8, topic: &str, id: u16) -> Vec<u8> {
        let mut body = string(topic);
        if qos > 0 {
            body.extend_from_slice(&id.to_be_bytes());
        }
        body.extend_from_slice(b"payload");
        frame(0x30 | (qos << 1), &body)
    }

    fn ack(kind: u8, id: u16) -> Vec<u8> {
        let first = if kind == packet_type::PUBREL {
            0x62
        } else {
            kind << 4
        };
        frame(first, &id.to_be_bytes())
    }

    #[test]
    fn framer_splits_whole_packets_and_keeps_the_tail() {
        let mut framer = Framer::default();
        let mut all = publish(0, "a", 0);
        all.extend(publish(1, "b/c", 7));
        let cut = all.len() - 3;
        let run = framer.push(Bytes::copy_from_slice(&all[..cut]), 1 << 20);
        assert_eq!(&run[..], &publish(0, "a", 0)[..]);
        assert_eq!(framer.pending(), cut - run.len());
        let run = framer.push(Bytes::copy_from_slice(&all[cut..]), 1 << 20);
        assert_eq!(&run[..], &publish(1, "b/c", 7)[..]);
        assert_eq!(framer.pending(), 0);
        assert_eq!(packets(&Bytes::from(all)).count(), 2);
    }

    #[test]
    fn framer_byte_by_byte() {
        let mut framer = Framer::default();
        let packet = subscribe(false, 3, "x/#", 1);
        let mut out = Vec::new();
        for b in &packet {
            out.extend_from_slice(&framer.push(Bytes::copy_from_slice(&[*b]), 1 << 20));
        }
        assert_eq!(out, packet);
    }

    #[test]
    fn framer_passes_malformed_bytes_through_for_the_engine_to_refuse() {
        let mut framer = Framer::default();
        // Remaining length with five continuation bytes.
        let bad = Bytes::from_static(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]);
        assert_eq!(framer.push(bad.clone(), 1 << 20), bad);
        assert_eq!(framer.push(Bytes::from_static(b"more"), 1 << 20), "more");
        // Too large is refused from the header alone, before the body arrives.
        let mut framer = Framer::default();
        let big = Bytes::from_static(&[0x30, 0xFF, 0x7F]);
        assert_eq!(framer.push(big.clone(), 1024), big);
    }

    #[test]
    fn single_stream_records_nothing() {
        let mut mux = Mux::default();
        mux.client_packet(CONTROL, &connect(4));
        mux.client_packet(CONTROL, &subscribe(false, 1, "a/#", 1));
        assert!(mux.filters.is_empty() && mux.client_ids.is_empty());
        assert_eq!(mux.route(&publish(1, "a/b", 1)), CONTROL);
    }

    #[test]
    fn acks_follow_their_packet_ids() {
        for level in [4, 5] {
            let v5 = level == 5;
            let mut mux = Mux::default();
            mux.client_packet(CONTROL, &connect(level));
            mux.data_stream_opened();
            mux.client_packet(1, &subscribe(v5, 10, "s/+", 1));
            mux.client_packet(2, &publish(1, "t", 11));
            mux.client_packet(3, &publish(2, "t", 12));
            assert_eq!(mux.route(&ack(packet_type::SUBACK, 10)), 1);
            assert_eq!(mux.route(&ack(packet_type::PUBACK, 11)), 2);
            assert_eq!(mux.route(&ack(packet_type::PUBREC, 12)), 3);
            mux.client_packet(3, &ack(packet_type::PUBREL, 12));
            assert_eq!(mux.route(&ack(packet_type::PUBCOMP, 12)), 3);
            // Consumed: an id reused later on the control stream is not misrouted.
            assert!(mux.client_ids.is_empty());
            assert_eq!(mux.route(&ack(packet_type::PUBACK, 11)), CONTROL);
            assert_eq!(mux.route(&frame(0xD0, &[])), CONTROL); // PINGRESP
            assert_eq!(mux.route(&frame(0x20, &[0, 0])), CONTROL); // CONNACK
        }
    }

    #[test]
    fn publishes_follow_the_latest_matching_subscribe() {
        let mut mux = Mux::default();
        mux.client_packet(CONTROL, &connect(5));
        mux.data_stream_opened();
        mux.client_packet(1, &subscribe(true, 1, "a/#", 2));
        mux.client_packet(2, &subscribe(true, 2, "$share/g/b/+", 0));
        assert_eq!(mux.route(&publish(0, "a/x", 0)), 1);
        assert_eq!(mux.route(&publish(0, "b/y", 0)), 2);
        assert_eq!(mux.route(&publish(0, "c", 0)), CONTROL);
        // Broker → client QoS 2: the PUBREL follows its PUBLISH.
        assert_eq!(mux.route(&publish(2, "a/z", 44)), 1);
        assert_eq!(mux.route(&ack(packet_type::PUBREL, 44)), 1);
        // A later overlapping subscribe on another stream wins.
        mux.client_packet(3, &subscribe(true, 3, "a/x", 0));
        assert_eq!(mux.route(&publish(0, "a/x", 0)), 3);
        assert_eq!(mux.route(&publish(0, "a/other", 0)), 1);
        // Closing a stream sends its traffic back to control.
        mux.stream_closed(3);
        assert_eq!(mux.route(&publish(0, "a/x", 0)), 1);
        mux.stream_closed(1);
        assert_eq!(mux.route(&publish(0, "a/x", 0)), CONTROL);
    }

    #[test]
    fn unsubscribe_removes_the_route() {
        let mut mux = Mux::default();
        mux.client_packet(CONTROL, &connect(4));
        mux.data_stream_opened();
        mux.client_packet(1, &subscribe(false, 1, "a", 0));
        let mut body = 2u16.to_be_bytes().to_vec();
        body.extend(string("a"));
        mux.client_packet(1, &frame(0xA2, &body));
        assert_eq!(mux.route(&ack(packet_type::UNSUBACK, 2)), 1);
        assert_eq!(mux.route(&publish(0, "a", 0)), CONTROL);
    }

    #[test]
    fn garbage_never_panics() {
        let mut mux = Mux::default();
        mux.data_stream_opened();
        for packet in [
            &[0x82u8, 1, 0][..],
            &[0x30, 2, 0, 9],
            &[0x62, 0],
            &[0x10, 1, 0],
        ] {
            mux.client_packet(1, packet);
            let _ = mux.route(packet);
        }
    }
}
