//! Malformed and forbidden input, sent as raw bytes to the real `mqttd` process.
//!
//! Each test (1) sends bad bytes on one connection, (2) checks the exact reaction the spec
//! asks for — MQTT 5: DISCONNECT (or, for a CONNECT whose version is known, CONNACK) with
//! the right reason code, then close; MQTT 3.1.1: close (or CONNACK where the spec says so) —
//! and (3) checks a well-behaved bystander connected beforehand can still publish and
//! receive, and the broker process is still alive.

mod common;

use std::net::SocketAddr;

use common::raw::{
    body, client_id, connack_u16, connect, connect_raw, hex, level, packet, publish, publish_byte1,
    split_packets, subscribe, subscribe_byte1, End, Raw, V,
};
use common::Broker;

// ---------------------------------------------------------------- expectations

/// What the misbehaving connection must see.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Closed with nothing sent (3.1.1, or before the version is known).
    Close,
    /// A v5 DISCONNECT with one of these reason codes, then close.
    Disconnect(&'static [u8]),
    /// A CONNACK in the encoding of `V` with this reason / return code, then close.
    Connack(V, u8),
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Close => write!(f, "[] then EOF"),
            Expect::Disconnect(codes) => {
                let codes: Vec<String> = codes.iter().map(|c| format!("{c:#04X}")).collect();
                write!(f, "[E0 len {} props...] then EOF", codes.join("|"))
            }
            Expect::Connack(V::V3, code) => write!(f, "[20 02 00 {code:02X}] then EOF"),
            Expect::Connack(V::V5, code) => write!(f, "[20 len 00 {code:02X} props...] then EOF"),
        }
    }
}

/// Checks what the connection received (`bytes`, then `end`) against `expect`.
fn verify(bytes: &[u8], end: &End, expect: Expect) -> Result<(), String> {
    if *end != End::Eof {
        return Err(format!("connection ended with {end:?}, not EOF"));
    }
    let (packets, tail) = split_packets(bytes);
    if !tail.is_empty() {
        return Err(format!("incomplete packet at the end: {}", hex(&tail)));
    }
    let one = |what: &str| -> Result<&Vec<u8>, String> {
        match packets.as_slice() {
            [p] => Ok(p),
            _ => Err(format!(
                "expected exactly one packet ({what}), got {}",
                packets.len()
            )),
        }
    };
    match expect {
        Expect::Close if bytes.is_empty() => Ok(()),
        Expect::Close => Err("expected nothing before the close".into()),
        Expect::Disconnect(codes) => {
            let p = one("DISCONNECT")?;
            if p[0] != 0xE0 {
                return Err(format!(
                    "packet type byte {:#04X}, not DISCONNECT 0xE0",
                    p[0]
                ));
            }
            match body(p).first() {
                Some(code) if codes.contains(code) => Ok(()),
                Some(code) => Err(format!("DISCONNECT reason {code:#04X}")),
                None => Err("DISCONNECT without a reason code (0x00 Normal)".into()),
            }
        }
        Expect::Connack(V::V3, code) => {
            let p = one("CONNACK")?;
            if p.as_slice() == [0x20, 0x02, 0x00, code] {
                Ok(())
            } else {
                Err("wrong 3.1.1 CONNACK".into())
            }
        }
        Expect::Connack(V::V5, code) => {
            let p = one("CONNACK")?;
            let b = body(p);
            if p[0] == 0x20 && b.len() >= 3 && b[0] == 0 && b[1] == code {
                Ok(())
            } else {
                Err("wrong v5 CONNACK".into())
            }
        }
    }
}

// ---------------------------------------------------------------- the bystander

/// A well-behaved client connected before the bad one, subscribed to its own topic.
struct Bystander {
    raw: Raw,
    topic: String,
    next: u16,
}

impl Bystander {
    fn join(addr: SocketAddr, v: V) -> Bystander {
        let id = client_id("bystander");
        let (mut raw, _) = Raw::connect(addr, v, &id);
        let topic = format!("bystander/{id}");
        raw.send(&subscribe(v, 1, topic.as_bytes(), 0));
        let suback = raw
            .read_packet()
            .expect("read SUBACK")
            .expect("SUBACK, got EOF");
        assert!(
            suback[0] == 0x90 && suback.last() == Some(&0x00),
            "bystander SUBSCRIBE refused: {}",
            hex(&suback)
        );
        Bystander {
            raw,
            topic,
            next: 10,
        }
    }

    /// Publishes QoS 1 to its own subscription and waits for both the PUBACK and the message.
    fn assert_works(&mut self) {
        self.next += 1;
        let pkid = self.next;
        let payload = format!("bystander still served {pkid}");
        let v = self.raw.v;
        self.raw.send(&publish(
            v,
            self.topic.as_bytes(),
            1,
            pkid,
            &[],
            payload.as_bytes(),
        ));
        let (mut acked, mut received) = (false, false);
        while !(acked && received) {
            let p = match self.raw.read_packet() {
                Ok(Some(p)) => p,
                Ok(None) => panic!("bystander was disconnected (EOF)"),
                Err(e) => panic!("bystander got no PUBACK/PUBLISH: {e}"),
            };
            match p[0] & 0xF0 {
                0x40 if body(&p)[..2] == pkid.to_be_bytes() => acked = true,
                0x30 if p.ends_with(payload.as_bytes()) => received = true,
                0xE0 => panic!("bystander got DISCONNECT: {}", hex(&p)),
                _ => {} // anything else (e.g. a fuzz message) is not ours
            }
        }
    }
}

// ---------------------------------------------------------------- the scenario

/// Starts a broker (with `sets`), joins a bystander, opens the bad connection (after a
/// successful CONNECT if `connect_first`), lets `act` misbehave on it, then checks the
/// reaction, the bystander and the broker.
fn scenario(
    name: &str,
    v: V,
    sets: &[&str],
    connect_first: bool,
    act: impl FnOnce(&mut Raw, &[u8]),
    expect: Expect,
) {
    let mut broker = Broker::start_with(sets);
    let mut bystander = Bystander::join(broker.addr, v);
    let (mut bad, connack) = if connect_first {
        Raw::connect(broker.addr, v, &client_id("bad"))
    } else {
        (Raw::open(broker.addr, v), Vec::new())
    };
    act(&mut bad, &connack);
    let (bytes, end) = bad.read_until_close();
    if let Err(why) = verify(&bytes, &end, expect) {
        panic!(
            "{name} ({v:?}): {why}\n  expected: {expect}\n  received: {} then {end:?}",
            hex(&bytes)
        );
    }
    bystander.assert_works();
    broker.assert_alive();
}

/// The common shape: a connected client sends `bad` and must see `expect`.
fn after_connect(name: &str, v: V, bad: &[u8], expect: Expect) {
    scenario(name, v, &[], true, |c, _| c.send(bad), expect);
}

/// The expectation for "malformed packet": v5 DISCONNECT 0x81, 3.1.1 close.
fn malformed(v: V) -> Expect {
    match v {
        V::V5 => Expect::Disconnect(&[0x81]),
        V::V3 => Expect::Close,
    }
}

// ---------------------------------------------------------------- first packet not CONNECT

// MQTT-3.1.0-1 (both versions): the first packet must be CONNECT, else close. The version
// is unknown, so no CONNACK or DISCONNECT can be sent.

#[test]
fn first_packet_publish_closes() {
    for v in [V::V3, V::V5] {
        let bad = publish(V::V3, b"a/b", 0, 0, &[], b"hello");
        scenario(
            "PUBLISH before CONNECT",
            v,
            &[],
            false,
            |c, _| c.send(&bad),
            Expect::Close,
        );
    }
}

#[test]
fn first_packet_pingreq_closes() {
    for v in [V::V3, V::V5] {
        scenario(
            "PINGREQ before CONNECT",
            v,
            &[],
            false,
            |c, _| c.send(&[0xC0, 0x00]),
            Expect::Close,
        );
    }
}

// ---------------------------------------------------------------- second CONNECT

// MQTT-3.1.0-2: a second CONNECT is a protocol error (v5 0x82).

#[test]
fn second_connect_v5() {
    let bad = connect(V::V5, &client_id("second"));
    after_connect("second CONNECT", V::V5, &bad, Expect::Disconnect(&[0x82]));
}

#[test]
fn second_connect_v3() {
    let bad = connect(V::V3, &client_id("second"));
    after_connect("second CONNECT", V::V3, &bad, Expect::Close);
}

// ---------------------------------------------------------------- reserved fixed-header flags

// MQTT-2.1.3-1 / 3.1.1 MQTT-2.2.2-2: wrong reserved flags are a malformed packet.

fn subscribe_flags_zero(v: V) {
    let bad = subscribe_byte1(v, 0x80, 1, b"a/b", 0);
    after_connect("SUBSCRIBE with flags 0000", v, &bad, malformed(v));
}

#[test]
fn subscribe_flags_zero_v5() {
    subscribe_flags_zero(V::V5);
}

#[test]
fn subscribe_flags_zero_v3() {
    subscribe_flags_zero(V::V3);
}

#[test]
fn pubrel_flags_zero_v5() {
    after_connect(
        "PUBREL with flags 0000",
        V::V5,
        &[0x60, 0x02, 0x00, 0x01],
        malformed(V::V5),
    );
}

#[test]
fn pubrel_flags_zero_v3() {
    after_connect(
        "PUBREL with flags 0000",
        V::V3,
        &[0x60, 0x02, 0x00, 0x01],
        malformed(V::V3),
    );
}

#[test]
fn pingreq_flags_v5() {
    after_connect("PINGREQ 0xC1", V::V5, &[0xC1, 0x00], malformed(V::V5));
}

#[test]
fn pingreq_flags_v3() {
    after_connect("PINGREQ 0xC1", V::V3, &[0xC1, 0x00], malformed(V::V3));
}

// ---------------------------------------------------------------- reserved bits, fixed lengths

// MQTT-3.8.3-4 (3.1.1): the upper 6 bits of a requested QoS byte are reserved;
// MQTT-3.8.3-5 (v5): bits 6 and 7 of the subscription options are. Non-zero: malformed.

#[test]
fn subscribe_options_reserved_bits_v5() {
    let bad = subscribe(V::V5, 1, b"a/b", 0xC1);
    after_connect("SUBSCRIBE options 0xC1", V::V5, &bad, malformed(V::V5));
}

#[test]
fn subscribe_options_reserved_bits_v3() {
    let bad = subscribe(V::V3, 1, b"a/b", 0xF1);
    after_connect("SUBSCRIBE options 0xF1", V::V3, &bad, malformed(V::V3));
}

// PINGREQ has no variable header and no payload (both versions); a 3.1.1 PUBACK is
// exactly its packet identifier. (A 3.1.1 DISCONNECT with a body: engine tests, since
// only the will tells its close from a normal one.)

#[test]
fn pingreq_remaining_length_one_v5() {
    let bad = [0xC0, 0x01, 0x00];
    after_connect("PINGREQ of length 1", V::V5, &bad, malformed(V::V5));
}

#[test]
fn pingreq_remaining_length_one_v3() {
    let bad = [0xC0, 0x01, 0x00];
    after_connect("PINGREQ of length 1", V::V3, &bad, malformed(V::V3));
}

#[test]
fn puback_remaining_length_three_v3() {
    let bad = [0x40, 0x03, 0x00, 0x01, 0x00];
    after_connect("PUBACK of length 3", V::V3, &bad, malformed(V::V3));
}

// MQTT-3.10.3-2: an UNSUBSCRIBE must name at least one topic filter (v5: protocol error).

#[test]
fn unsubscribe_without_filters_v5() {
    let bad = [0xA2, 0x03, 0x00, 0x01, 0x00];
    let expect = Expect::Disconnect(&[0x82]);
    after_connect("UNSUBSCRIBE without filters", V::V5, &bad, expect);
}

#[test]
fn unsubscribe_without_filters_v3() {
    let bad = [0xA2, 0x02, 0x00, 0x01];
    after_connect("UNSUBSCRIBE without filters", V::V3, &bad, Expect::Close);
}

// MQTT-3.3.1-4: a PUBLISH with both QoS bits set is malformed.
fn publish_qos3(v: V) {
    let bad = publish_byte1(v, 0x36, b"a/b", Some(1), &[], b"x");
    after_connect("PUBLISH QoS 3", v, &bad, malformed(v));
}

#[test]
fn publish_qos3_v5() {
    publish_qos3(V::V5);
}

#[test]
fn publish_qos3_v3() {
    publish_qos3(V::V3);
}

// ---------------------------------------------------------------- CONNECT reserved flag

// MQTT-3.1.2-3: the reserved CONNECT flag must be 0, else malformed. v5 knows the version,
// so it answers CONNACK 0x81 (§3.1.4); 3.1.1 just closes.

fn connect_reserved_flag(v: V, expect: Expect) {
    let bad = connect_raw(b"MQTT", level(v), 0x03, &client_id("reserved"));
    scenario(
        "CONNECT reserved flag bit 0",
        v,
        &[],
        false,
        |c, _| c.send(&bad),
        expect,
    );
}

#[test]
fn connect_reserved_flag_v5() {
    connect_reserved_flag(V::V5, Expect::Connack(V::V5, 0x81));
}

#[test]
fn connect_reserved_flag_v3() {
    connect_reserved_flag(V::V3, Expect::Close);
}

// ---------------------------------------------------------------- remaining length

// §1.5.5 / 3.1.1 §2.2.3: at most 4 length bytes; a 5th is malformed.

#[test]
fn remaining_length_five_bytes_v5() {
    let bad = [0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
    after_connect("5-byte remaining length", V::V5, &bad, malformed(V::V5));
}

#[test]
fn remaining_length_five_bytes_v3() {
    let bad = [0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
    after_connect("5-byte remaining length", V::V3, &bad, malformed(V::V3));
}

// ---------------------------------------------------------------- topics and filters

// Ill-formed UTF-8 or U+0000 in a string: malformed (MQTT-1.5.4-1/-2; 3.1.1 MQTT-1.5.3-1/-2:
// close). For a PUBLISH topic, v5 0x90 (Topic Name invalid) is also a fair answer.

#[test]
fn publish_topic_invalid_utf8_v5() {
    let bad = publish(V::V5, &[b'a', b'/', 0xC3, 0x28], 0, 0, &[], b"x");
    after_connect(
        "PUBLISH topic C3 28",
        V::V5,
        &bad,
        Expect::Disconnect(&[0x81, 0x90]),
    );
}

#[test]
fn publish_topic_invalid_utf8_v3() {
    let bad = publish(V::V3, &[b'a', b'/', 0xC3, 0x28], 0, 0, &[], b"x");
    after_connect("PUBLISH topic C3 28", V::V3, &bad, Expect::Close);
}

#[test]
fn publish_topic_null_char_v5() {
    let bad = publish(V::V5, b"a/\0/b", 0, 0, &[], b"x");
    after_connect(
        "PUBLISH topic with U+0000",
        V::V5,
        &bad,
        Expect::Disconnect(&[0x81, 0x90]),
    );
}

#[test]
fn publish_topic_null_char_v3() {
    let bad = publish(V::V3, b"a/\0/b", 0, 0, &[], b"x");
    after_connect("PUBLISH topic with U+0000", V::V3, &bad, Expect::Close);
}

#[test]
fn subscribe_filter_invalid_utf8_v5() {
    let bad = subscribe(V::V5, 1, &[b'a', b'/', 0xC3, 0x28], 0);
    after_connect("SUBSCRIBE filter C3 28", V::V5, &bad, malformed(V::V5));
}

#[test]
fn subscribe_filter_invalid_utf8_v3() {
    let bad = subscribe(V::V3, 1, &[b'a', b'/', 0xC3, 0x28], 0);
    after_connect("SUBSCRIBE filter C3 28", V::V3, &bad, malformed(V::V3));
}

#[test]
fn subscribe_filter_null_char_v5() {
    let bad = subscribe(V::V5, 1, b"a/\0/b", 0);
    after_connect(
        "SUBSCRIBE filter with U+0000",
        V::V5,
        &bad,
        malformed(V::V5),
    );
}

#[test]
fn subscribe_filter_null_char_v3() {
    let bad = subscribe(V::V3, 1, b"a/\0/b", 0);
    after_connect(
        "SUBSCRIBE filter with U+0000",
        V::V3,
        &bad,
        malformed(V::V3),
    );
}

// MQTT-3.3.2-2: a topic name must not contain wildcards (v5: 0x90 Topic Name invalid).

#[test]
fn publish_topic_wildcard_v5() {
    for topic in [&b"a/+"[..], b"a/#"] {
        let bad = publish(V::V5, topic, 0, 0, &[], b"x");
        after_connect(
            "PUBLISH to a wildcard topic",
            V::V5,
            &bad,
            Expect::Disconnect(&[0x90]),
        );
    }
}

#[test]
fn publish_topic_wildcard_v3() {
    for topic in [&b"a/+"[..], b"a/#"] {
        let bad = publish(V::V3, topic, 0, 0, &[], b"x");
        after_connect("PUBLISH to a wildcard topic", V::V3, &bad, Expect::Close);
    }
}

// ---------------------------------------------------------------- oversize

// v5 §3.1.2.11.4 / §4.13: a packet above the server's Maximum Packet Size gets DISCONNECT
// 0x95. Only the fixed header (remaining length 2000) and 3 bytes are sent: the reaction
// must come from the header alone.

fn oversize_header_only(v: V, expect: Expect) {
    let header_only = [0x30, 0xD0, 0x0F, 0x00, 0x03, b'a'];
    scenario(
        "2000-byte PUBLISH over a 1024 limit, header only",
        v,
        &["limits.max_packet_size=1024"],
        true,
        |c, _| c.send(&header_only),
        expect,
    );
}

#[test]
fn oversize_publish_header_only_v5() {
    oversize_header_only(V::V5, Expect::Disconnect(&[0x95]));
}

#[test]
fn oversize_publish_header_only_v3() {
    oversize_header_only(V::V3, Expect::Close);
}

// ---------------------------------------------------------------- protocol level

// 3.1.1 MQTT-3.1.2-2: an unsupported level gets CONNACK 0x01 then close. The client's
// version is unknown, so the 3.1(.1) CONNACK form (which 3.1, 3.1.1 and 5 parse) is expected.

#[test]
fn unsupported_protocol_mqisdp_level3() {
    let bad = connect_raw(b"MQIsdp", 3, 0x02, &client_id("mqisdp"));
    scenario(
        "CONNECT MQIsdp level 3",
        V::V3,
        &[],
        false,
        |c, _| c.send(&bad),
        Expect::Connack(V::V3, 0x01),
    );
}

#[test]
fn unsupported_protocol_level6() {
    let bad = connect_raw(b"MQTT", 6, 0x02, &client_id("level6"));
    scenario(
        "CONNECT MQTT level 6",
        V::V5,
        &[],
        false,
        |c, _| c.send(&bad),
        Expect::Connack(V::V3, 0x01),
    );
}

// ---------------------------------------------------------------- topic aliases (v5)

// MQTT-3.3.2-8/-9: alias 0 or above the server's Topic Alias Maximum -> DISCONNECT 0x94.

#[test]
fn topic_alias_zero_v5() {
    let bad = publish(V::V5, b"a/b", 0, 0, &[0x23, 0x00, 0x00], b"x");
    after_connect("topic alias 0", V::V5, &bad, Expect::Disconnect(&[0x94]));
}

#[test]
fn topic_alias_above_maximum_v5() {
    scenario(
        "topic alias above the maximum",
        V::V5,
        &[],
        true,
        |c, connack| {
            let max = connack_u16(connack, 0x22).unwrap_or(0);
            let alias = (max + 1).to_be_bytes();
            c.send(&publish(
                V::V5,
                b"a/b",
                0,
                0,
                &[0x23, alias[0], alias[1]],
                b"x",
            ));
        },
        Expect::Disconnect(&[0x94]),
    );
}

// §3.3.4: an empty topic with an alias the server has no mapping for is a protocol error.
#[test]
fn topic_alias_unknown_with_empty_topic_v5() {
    let bad = publish(V::V5, b"", 0, 0, &[0x23, 0x00, 0x01], b"x");
    after_connect(
        "unknown topic alias, empty topic",
        V::V5,
        &bad,
        Expect::Disconnect(&[0x82]),
    );
}

// ---------------------------------------------------------------- receive maximum (v5)

// MQTT-3.3.4-9: more unreleased QoS 2 PUBLISHes than the server's Receive Maximum -> 0x93.
#[test]
fn qos2_receive_maximum_exceeded_v5() {
    scenario(
        "receive maximum exceeded",
        V::V5,
        &[],
        true,
        |c, connack| {
            let max = connack_u16(connack, 0x21).unwrap_or(u16::MAX);
            assert!(
                max < 1000,
                "CONNACK Receive Maximum {max}: too many to test"
            );
            let mut all = Vec::new();
            for pkid in 1..=max {
                all.extend(publish(V::V5, b"rm/t", 2, pkid, &[], b"x"));
            }
            c.send(&all);
            for pkid in 1..=max {
                let p = c
                    .read_packet()
                    .expect("read PUBREC")
                    .expect("PUBREC, got EOF");
                assert!(
                    p[0] == 0x50 && body(&p)[..2] == pkid.to_be_bytes(),
                    "expected PUBREC {pkid}, got {}",
                    hex(&p)
                );
            }
            c.send(&publish(V::V5, b"rm/t", 2, max + 1, &[], b"x"));
        },
        Expect::Disconnect(&[0x93]),
    );
}

// The same, with the client still sending after the violation (a pipelining client does
// not wait for acknowledgements): closing at once with its bytes unread would send RST,
// and the client could lose the DISCONNECT 0x93 before reading it. The broker shuts down
// its write side after the DISCONNECT and drains the client's input: DISCONNECT, then EOF.
#[test]
fn receive_maximum_exceeded_while_pipelining_v5() {
    scenario(
        "receive maximum exceeded, client still sending",
        V::V5,
        &[],
        true,
        |c, connack| {
            let max = connack_u16(connack, 0x21).unwrap_or(u16::MAX);
            assert!(
                max < 1000,
                "CONNACK Receive Maximum {max}: too many to test"
            );
            let mut all = Vec::new();
            for pkid in 1..=max + 1 {
                all.extend(publish(V::V5, b"rm/t", 2, pkid, &[], b"x"));
            }
            // Far more than one read of the broker (64 KiB), far less than it drains (1 MiB).
            let filler = publish(V::V5, b"rm/t", 0, 0, &[], &[b'f'; 1000]);
            for _ in 0..512 {
                all.extend_from_slice(&filler);
            }
            let mut writer = c.stream.try_clone().expect("clone the stream");
            let sending = std::thread::spawn(move || {
                use std::io::Write;
                let result = writer.write_all(&all);
                let _ = writer.shutdown(std::net::Shutdown::Write);
                result
            });
            for pkid in 1..=max {
                let p = c
                    .read_packet()
                    .expect("read PUBREC")
                    .expect("PUBREC, got EOF");
                assert!(
                    p[0] == 0x50 && body(&p)[..2] == pkid.to_be_bytes(),
                    "expected PUBREC {pkid}, got {}",
                    hex(&p)
                );
            }
            let sent = sending.join().expect("writer thread");
            assert!(sent.is_ok(), "the broker refused input: {sent:?}");
        },
        Expect::Disconnect(&[0x93]),
    );
}

// ---------------------------------------------------------------- server-only packets

// A client must not send CONNACK or SUBACK (§2.1.2 direction; 3.1.1 §4.8: close).
// v5: protocol error 0x82 or malformed 0x81.

#[test]
fn connack_from_client_v5() {
    after_connect(
        "CONNACK from a client",
        V::V5,
        &[0x20, 0x03, 0x00, 0x00, 0x00],
        Expect::Disconnect(&[0x82, 0x81]),
    );
}

#[test]
fn connack_from_client_v3() {
    after_connect(
        "CONNACK from a client",
        V::V3,
        &[0x20, 0x02, 0x00, 0x00],
        Expect::Close,
    );
}

#[test]
fn suback_from_client_v5() {
    after_connect(
        "SUBACK from a client",
        V::V5,
        &[0x90, 0x04, 0x00, 0x01, 0x00, 0x00],
        Expect::Disconnect(&[0x82, 0x81]),
    );
}

#[test]
fn suback_from_client_v3() {
    after_connect(
        "SUBACK from a client",
        V::V3,
        &[0x90, 0x03, 0x00, 0x01, 0x00],
        Expect::Close,
    );
}

// AUTH when the CONNECT had no Authentication Method: the method is omitted, which
// §3.15.2.2.2 calls a protocol error (0x82). 3.1.1 has no packet type 15: close.

#[test]
fn auth_without_method_v5() {
    // Reason 0x18 (Continue authentication), empty property block.
    after_connect(
        "AUTH without an authentication method",
        V::V5,
        &[0xF0, 0x02, 0x18, 0x00],
        Expect::Disconnect(&[0x82]),
    );
}

#[test]
fn auth_short_form_v5() {
    // §3.15.2.1: remaining length 0 means reason 0x00 and no properties.
    after_connect(
        "AUTH (short form) without an authentication method",
        V::V5,
        &[0xF0, 0x00],
        Expect::Disconnect(&[0x82]),
    );
}

#[test]
fn auth_packet_type_v3() {
    after_connect(
        "packet type 15 on 3.1.1",
        V::V3,
        &[0xF0, 0x02, 0x18, 0x00],
        Expect::Close,
    );
}

// ---------------------------------------------------------------- truncated bodies

// The remaining length is respected but a field inside claims more bytes than are left.

#[test]
fn subscribe_truncated_filter_v5() {
    // pkid 1, no properties, filter length 32 but 5 bytes left.
    let bad = packet(
        0x82,
        &[0x00, 0x01, 0x00, 0x00, 0x20, b'a', b'a', b'a', b'a', b'a'],
    );
    after_connect(
        "SUBSCRIBE filter longer than the packet",
        V::V5,
        &bad,
        malformed(V::V5),
    );
}

#[test]
fn subscribe_truncated_filter_v3() {
    let bad = packet(
        0x82,
        &[0x00, 0x01, 0x00, 0x20, b'a', b'a', b'a', b'a', b'a', b'a'],
    );
    after_connect(
        "SUBSCRIBE filter longer than the packet",
        V::V3,
        &bad,
        malformed(V::V3),
    );
}

#[test]
fn publish_truncated_topic_v5() {
    let bad = packet(0x30, &[0x00, 0x10, b'a', b'b', b'c']);
    after_connect(
        "PUBLISH topic longer than the packet",
        V::V5,
        &bad,
        malformed(V::V5),
    );
}

#[test]
fn publish_truncated_topic_v3() {
    let bad = packet(0x30, &[0x00, 0x10, b'a', b'b', b'c']);
    after_connect(
        "PUBLISH topic longer than the packet",
        V::V3,
        &bad,
        malformed(V::V3),
    );
}

// ---------------------------------------------------------------- fuzz

/// xorshift64: tiny, seeded, deterministic.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One garbage input: pure noise, a plausible header with a noise body, or a mutated
/// valid packet (so the decoder gets past the fixed header now and then).
fn garbage(rng: &mut XorShift, v: V) -> Vec<u8> {
    match rng.below(3) {
        0 => {
            let n = 1 + rng.below(64) as usize;
            rng.bytes(n)
        }
        1 => {
            const BYTE1: [u8; 14] = [
                0x10, 0x30, 0x32, 0x35, 0x40, 0x50, 0x62, 0x70, 0x82, 0xA2, 0xC0, 0xE0, 0xF0, 0x20,
            ];
            let byte1 = BYTE1[rng.below(BYTE1.len() as u64) as usize];
            let n = rng.below(48) as usize;
            let b = rng.bytes(n);
            packet(byte1, &b)
        }
        _ => {
            let mut p = match rng.below(3) {
                0 => publish(
                    v,
                    b"fuzz/t",
                    rng.below(3) as u8,
                    1 + rng.below(100) as u16,
                    &[],
                    b"payload",
                ),
                1 => subscribe(v, 1 + rng.below(100) as u16, b"fuzz/+", rng.below(3) as u8),
                _ => connect(v, "fuzz"),
            };
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(p.len() as u64) as usize;
                p[i] = rng.next() as u8;
            }
            p
        }
    }
}

#[test]
fn fuzz_random_garbage_after_connect() {
    let mut broker = Broker::start();
    let mut bystander = Bystander::join(broker.addr, V::V5);
    let mut bystander3 = Bystander::join(broker.addr, V::V3);
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut disconnects = 0;
    for i in 0..200 {
        let v = if i % 2 == 0 { V::V5 } else { V::V3 };
        let (mut c, _) = Raw::connect(broker.addr, v, &client_id("fuzz"));
        let bad = garbage(&mut rng, v);
        c.send_lossy(&bad);
        // Whatever the bytes were, end of input must end the connection.
        c.shutdown_write();
        let (bytes, end) = c.read_until_close();
        assert!(
            matches!(end, End::Eof | End::Reset),
            "fuzz #{i} ({v:?}) sent {}: connection not closed after EOF: received {} then {end:?}",
            hex(&bad),
            hex(&bytes)
        );
        let (packets, _) = split_packets(&bytes);
        if let Some(last) = packets.iter().position(|p| p[0] == 0xE0) {
            // 3.1.1 has no server DISCONNECT; in v5 it is the last packet.
            assert!(
                v == V::V5 && last + 1 == packets.len(),
                "fuzz #{i} ({v:?}) sent {}: misplaced DISCONNECT in {}",
                hex(&bad),
                hex(&bytes)
            );
            disconnects += 1;
        }
        broker.assert_alive();
    }
    eprintln!("fuzz: {disconnects} of 100 v5 connections were refused with DISCONNECT");
    bystander.assert_works();
    bystander3.assert_works();
    broker.assert_alive();
}
