//! Reading packets off a byte buffer and writing them into one, per protocol version.
//!
//! Reads split frames off the front of the caller's buffer, so payloads become `Bytes`
//! slices of it without a copy. Writes append to the connection's output buffer; PUBLISH,
//! the one packet on the hot path, is encoded here directly so that it costs no allocation.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5 as codec_v5;

use super::framing::{self, packet_type, FrameError, FrameHeader};
use super::{v4, Disconnect, DisconnectReasonCode, Packet, Publish, Version};

/// Why bytes from a client could not become a packet. Each maps to a v5 reason code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Frame(FrameError),
    /// The codec refused the body (bad UTF-8, truncated field, bad property, ...).
    Malformed(String),
    /// The first packet was not a CONNECT.
    NotConnect(u8),
    /// A CONNECT with a protocol name or level the broker does not speak.
    UnsupportedProtocol(u8),
    /// An AUTH packet, though no authentication method was agreed in CONNECT.
    UnexpectedAuth,
    /// A CONNECT whose version is known but whose contents are malformed.
    BadConnect {
        version: Version,
        why: String,
    },
}

impl DecodeError {
    /// The reason code a v5 client is told (in CONNACK or DISCONNECT).
    pub fn reason(&self) -> DisconnectReasonCode {
        match self {
            DecodeError::Frame(FrameError::TooLarge { .. }) => DisconnectReasonCode::PacketTooLarge,
            DecodeError::NotConnect(_) | DecodeError::UnexpectedAuth => {
                DisconnectReasonCode::ProtocolError
            }
            _ => DisconnectReasonCode::MalformedPacket,
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Frame(FrameError::Incomplete) => write!(f, "incomplete packet"),
            DecodeError::Frame(FrameError::MalformedLength) => {
                write!(f, "malformed remaining length")
            }
            DecodeError::Frame(FrameError::InvalidType(t)) => write!(f, "invalid packet type {t}"),
            DecodeError::Frame(FrameError::ReservedFlags { packet_type, flags }) => {
                write!(
                    f,
                    "reserved flags {flags:#06b} on packet type {packet_type}"
                )
            }
            DecodeError::Frame(FrameError::TooLarge { size }) => {
                write!(f, "packet of {size} bytes exceeds the maximum packet size")
            }
            DecodeError::Malformed(why) => write!(f, "malformed packet: {why}"),
            DecodeError::NotConnect(t) => write!(f, "first packet is type {t}, not CONNECT"),
            DecodeError::UnsupportedProtocol(level) => {
                write!(f, "unsupported protocol level {level}")
            }
            DecodeError::BadConnect { why, .. } => write!(f, "malformed CONNECT: {why}"),
            DecodeError::UnexpectedAuth => write!(f, "AUTH without an authentication method"),
        }
    }
}

/// A decoded CONNECT.
#[derive(Debug)]
pub struct ConnectFrame {
    /// The protocol version it asks for.
    pub version: Version,
    /// `Packet::Connect`. Its `Login` never carries the password (see `password`).
    pub packet: Packet,
    /// The password: Binary Data (3.1.1 §3.1.3.5, 5.0 §3.1.3.6), any bytes. The codec
    /// crate's `Login` holds a `String` and would refuse a CONNECT whose password is not
    /// UTF-8, so it is taken out of the frame before the codec sees it.
    pub password: Option<Bytes>,
}

/// Reads the first packet of a connection, which must be a CONNECT.
/// `Ok(None)`: more bytes are needed.
pub fn read_connect(
    buf: &mut BytesMut,
    max_packet_size: u32,
) -> Result<Option<ConnectFrame>, DecodeError> {
    let header = match framing::parse_header(buf, max_packet_size) {
        Ok(h) => h,
        Err(FrameError::Incomplete) => return Ok(None),
        Err(e) => return Err(DecodeError::Frame(e)),
    };
    if header.packet_type != packet_type::CONNECT {
        return Err(DecodeError::NotConnect(header.packet_type));
    }
    let version = connect_version(&buf[header.header_len..header.frame_len()])?;
    let bad_connect = |why: String| DecodeError::BadConnect { version, why };
    let mut frame = buf.split_to(header.frame_len());
    let password = take_password(&mut frame, header, version).map_err(bad_connect)?;
    // Parsed again: taking the password out shortens the frame.
    let header = framing::parse_header(&frame, u32::MAX)
        .map_err(|e| bad_connect(DecodeError::Frame(e).to_string()))?;
    let packet = decode(&mut frame, header, version).map_err(|e| bad_connect(e.to_string()))?;
    Ok(Some(ConnectFrame {
        version,
        packet,
        password,
    }))
}

/// Removes the password field from a whole CONNECT `frame` (clearing its flag and
/// rewriting the remaining length) and returns it. The payload is walked field by field
/// as MQTT-3.1.3-1 orders it; the password is the last one.
fn take_password(
    frame: &mut BytesMut,
    header: FrameHeader,
    version: Version,
) -> Result<Option<Bytes>, String> {
    let body = &frame[header.header_len..];
    let name_len = u16::from_be_bytes([body[0], body[1]]) as usize;
    // Name, level, flags, keep-alive (connect_version checked they are there).
    let flags_at = 2 + name_len + 1;
    let flags = body[flags_at];
    if flags & 0b0100_0000 == 0 {
        return Ok(None);
    }
    let truncated = || "truncated CONNECT".to_string();
    let mut at = flags_at + 3;
    let skip_properties = |at: usize| -> Option<usize> {
        let (len, n) = var_int(body.get(at..)?)?;
        Some(at + n + len)
    };
    let skip_field = |at: usize| -> Option<usize> {
        let len = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]) as usize;
        Some(at + 2 + len)
    };
    if version.is_v5() {
        at = skip_properties(at).ok_or_else(truncated)?;
    }
    at = skip_field(at).ok_or_else(truncated)?; // client id
    if flags & 0b100 != 0 {
        if version.is_v5() {
            at = skip_properties(at).ok_or_else(truncated)?;
        }
        at = skip_field(at).ok_or_else(truncated)?; // will topic
        at = skip_field(at).ok_or_else(truncated)?; // will payload
    }
    if flags & 0b1000_0000 != 0 {
        at = skip_field(at).ok_or_else(truncated)?; // user name
    }
    let end = skip_field(at).ok_or_else(truncated)?;
    if end > body.len() {
        return Err(truncated());
    }
    if end != body.len() {
        return Err("bytes after the password".into());
    }
    let password = Bytes::copy_from_slice(&body[at + 2..end]);
    let mut rebuilt = BytesMut::with_capacity(frame.len());
    rebuilt.put_u8(frame[0]);
    framing::put_var_int(&mut rebuilt, header.remaining_len - (end - at));
    let body_at = rebuilt.len();
    rebuilt.extend_from_slice(&body[..at]);
    rebuilt[body_at + flags_at] &= !0b0100_0000;
    *frame = rebuilt;
    Ok(Some(password))
}

/// Reads the protocol name, level and flags of a CONNECT body.
fn connect_version(body: &[u8]) -> Result<Version, DecodeError> {
    let malformed = || DecodeError::Malformed("truncated CONNECT".into());
    let name_len = u16::from_be_bytes([
        *body.first().ok_or_else(malformed)?,
        *body.get(1).ok_or_else(malformed)?,
    ]) as usize;
    let name = body.get(2..2 + name_len).ok_or_else(malformed)?;
    let level = *body.get(2 + name_len).ok_or_else(malformed)?;
    let flags = *body.get(3 + name_len).ok_or_else(malformed)?;
    if name != b"MQTT" {
        return Err(DecodeError::UnsupportedProtocol(level));
    }
    let version = match level {
        4 => Version::V311,
        5 => Version::V5,
        other => return Err(DecodeError::UnsupportedProtocol(other)),
    };
    // Bit 0 is reserved (MQTT-3.1.2-3); a will QoS of 3 is malformed (MQTT-3.1.2-14);
    // will QoS or retain without the will flag is malformed (MQTT-3.1.2-11, -13, -15).
    let will = flags & 0b100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0b10_0000 != 0;
    if flags & 1 != 0 || will_qos == 3 || (!will && (will_qos != 0 || will_retain)) {
        return Err(DecodeError::BadConnect {
            version,
            why: format!("bad CONNECT flags {flags:#010b}"),
        });
    }
    // 3.1.1 requires a user name for a password (MQTT-3.1.2-22).
    if version == Version::V311 && flags & 0b0100_0000 != 0 && flags & 0b1000_0000 == 0 {
        return Err(DecodeError::BadConnect {
            version,
            why: "password without user name".into(),
        });
    }
    Ok(version)
}

/// Reads the next packet of an established connection. `Ok(None)`: more bytes are needed.
pub fn read_packet(
    buf: &mut BytesMut,
    version: Version,
    max_packet_size: u32,
) -> Result<Option<Packet>, DecodeError> {
    let header = match framing::parse_header(buf, max_packet_size) {
        Ok(h) => h,
        Err(FrameError::Incomplete) => return Ok(None),
        Err(e) => return Err(DecodeError::Frame(e)),
    };
    decode(buf, header, version).map(Some)
}

fn decode(
    buf: &mut BytesMut,
    header: FrameHeader,
    version: Version,
) -> Result<Packet, DecodeError> {
    if header.packet_type == packet_type::AUTH && version == Version::V311 {
        return Err(DecodeError::Frame(FrameError::InvalidType(
            packet_type::AUTH,
        )));
    }
    if header.packet_type == packet_type::AUTH {
        // The codec crate cannot decode AUTH. mqttd offers no enhanced authentication, so
        // an AUTH is a protocol error whatever it says (MQTT-4.12.0-1).
        let _ = buf.split_to(header.frame_len());
        return Err(DecodeError::UnexpectedAuth);
    }
    check_reserved(&buf[header.header_len..header.frame_len()], header, version)?;
    if header.packet_type == packet_type::DISCONNECT && header.remaining_len <= 1 {
        // A v5 DISCONNECT may omit its reason code, or its property length (MQTT 5.0
        // §3.14.2.2.1); the codec crate refuses both short forms.
        let frame = buf.split_to(header.frame_len());
        let reason_code = match frame.get(header.header_len) {
            None => DisconnectReasonCode::NormalDisconnection,
            Some(&code) => DisconnectReasonCode::try_from(code).map_err(|_| {
                DecodeError::Malformed(format!("DISCONNECT reason code {code:#04x}"))
            })?,
        };
        return Ok(Packet::Disconnect(Disconnect {
            reason_code,
            properties: None,
        }));
    }
    let result = match version {
        Version::V5 => codec_v5::Packet::read(buf, None).map_err(|e| e.to_string()),
        Version::V311 => v4::read(buf),
    };
    match result {
        Ok(packet) => Ok(packet),
        // The codec split the whole frame off before failing, so `buf` stays aligned.
        Err(why) => Err(DecodeError::Malformed(why)),
    }
}

/// The fixed remaining lengths and the reserved bits of a body, which the codec crate
/// does not check: a packet breaking them is malformed (v5: DISCONNECT 0x81; 3.1.1: the
/// connection is closed). Anything the walk cannot follow is left to the codec to refuse.
fn check_reserved(body: &[u8], header: FrameHeader, version: Version) -> Result<(), DecodeError> {
    use packet_type::*;
    let v311 = version == Version::V311;
    let fixed_len = match header.packet_type {
        // No variable header and no payload (3.1.1 §3.12, §3.14; 5.0 §3.12).
        PINGREQ => Some(0),
        DISCONNECT if v311 => Some(0),
        // Only the packet identifier in 3.1.1 (§3.4-3.7); v5 may add a reason and properties.
        PUBACK | PUBREC | PUBREL | PUBCOMP if v311 => Some(2),
        _ => None,
    };
    if let Some(len) = fixed_len.filter(|&len| len != header.remaining_len) {
        return Err(DecodeError::Malformed(format!(
            "packet type {} with remaining length {} (must be {len})",
            header.packet_type, header.remaining_len
        )));
    }
    if header.packet_type == SUBSCRIBE {
        // 3.1.1: the upper 6 bits of the requested QoS byte (MQTT-3.8.3-4); v5: bits 6
        // and 7 of the subscription options (MQTT-3.8.3-5).
        let reserved = if v311 { 0b1111_1100 } else { 0b1100_0000 };
        if let Some(options) = subscription_options(body, version).find(|o| o & reserved != 0) {
            return Err(DecodeError::Malformed(format!(
                "reserved bits set in subscription options {options:#04x}"
            )));
        }
    }
    Ok(())
}

/// The options byte of each topic filter of a SUBSCRIBE body, as far as it can be walked.
fn subscription_options(body: &[u8], version: Version) -> impl Iterator<Item = u8> + '_ {
    // Packet identifier, then (v5) the property block.
    let mut at = Some(2);
    if version.is_v5() {
        at = body.get(2..).and_then(var_int).map(|(len, n)| 2 + n + len);
    }
    std::iter::from_fn(move || {
        let pos = at?;
        let len = u16::from_be_bytes([*body.get(pos)?, *body.get(pos + 1)?]) as usize;
        let options = *body.get(pos + 2 + len)?;
        at = Some(pos + 3 + len);
        Some(options)
    })
}

/// A variable byte integer at the start of `bytes`: (value, bytes it takes).
fn var_int(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, &b) in bytes.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Appends `packet` to `out` in the encoding of `version`. Packets a 3.1.1 client cannot
/// receive (DISCONNECT, AUTH) are skipped: for 3.1.1 the broker just closes the connection.
pub fn write_packet(out: &mut BytesMut, version: Version, packet: &Packet) {
    match (version, packet) {
        (Version::V311, Packet::Publish(p)) => write_publish_bytes(out, p, false),
        (Version::V5, Packet::Publish(p)) if p.properties.is_none() => {
            write_publish_bytes(out, p, true)
        }
        (Version::V5, packet) => {
            if let Err(e) = packet.write(out, None) {
                // Only possible for values the broker itself put out of range.
                tracing::error!("cannot encode {packet:?}: {e}");
            }
        }
        (Version::V311, packet) => v4::write(out, packet),
    }
}

/// Encodes a PUBLISH with no properties. `empty_v5_props` adds the v5 zero-length property block.
pub fn write_publish_bytes(out: &mut BytesMut, p: &Publish, empty_v5_props: bool) {
    let pkid_len = if p.qos as u8 > 0 { 2 } else { 0 };
    let remaining = 2 + p.topic.len() + pkid_len + usize::from(empty_v5_props) + p.payload.len();
    out.reserve(1 + framing::var_int_len(remaining) + remaining);
    let byte1 = (packet_type::PUBLISH << 4)
        | (u8::from(p.dup) << 3)
        | ((p.qos as u8) << 1)
        | u8::from(p.retain);
    out.put_u8(byte1);
    framing::put_var_int(out, remaining);
    out.put_u16(p.topic.len() as u16);
    out.put_slice(&p.topic);
    if pkid_len > 0 {
        out.put_u16(p.pkid);
    }
    if empty_v5_props {
        out.put_u8(0);
    }
    out.put_slice(&p.payload);
}
