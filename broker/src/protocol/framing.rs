//! The MQTT fixed header, parsed and checked once for both protocol versions.
//!
//! ```text
//! byte 1     packet type (bits 7-4) | flags (bits 3-0)
//! byte 2..5  remaining length, variable byte integer (1 to 4 bytes)
//! ```
//! Checking here, before any body is decoded, lets the broker refuse an oversize packet
//! without buffering it and refuse reserved flag bits the codec crate would let through.

/// A fixed header that passed every check: the full frame is `header_len + remaining_len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub packet_type: u8,
    pub flags: u8,
    pub header_len: usize,
    pub remaining_len: usize,
}

impl FrameHeader {
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining_len
    }
}

/// Packet type numbers (MQTT 5.0 §2.1.2).
pub mod packet_type {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
    pub const AUTH: u8 = 15;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Not enough bytes yet for a whole frame; read more.
    Incomplete,
    /// The remaining length uses more than 4 bytes.
    MalformedLength,
    /// Packet type 0 (reserved) or a type a client never sends.
    InvalidType(u8),
    /// Flag bits the spec fixes were set otherwise (or PUBLISH QoS 3).
    ReservedFlags { packet_type: u8, flags: u8 },
    /// The whole packet would exceed the broker's maximum packet size.
    TooLarge { size: usize },
}

/// Parses and checks the fixed header at the start of `buf`.
///
/// `Incomplete` is returned only when the header itself or the body is not all there; every
/// other check is done as soon as the header's bytes are, so a bad length or an oversize
/// packet is refused before its body arrives.
pub fn parse_header(buf: &[u8], max_packet_size: u32) -> Result<FrameHeader, FrameError> {
    let Some(&byte1) = buf.first() else {
        return Err(FrameError::Incomplete);
    };
    let packet_type = byte1 >> 4;
    let flags = byte1 & 0x0F;
    check_flags(packet_type, flags)?;

    let mut remaining_len = 0usize;
    let mut header_len = 1;
    loop {
        let Some(&byte) = buf.get(header_len) else {
            return Err(FrameError::Incomplete);
        };
        remaining_len |= ((byte & 0x7F) as usize) << (7 * (header_len - 1));
        header_len += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if header_len > 4 {
            return Err(FrameError::MalformedLength);
        }
    }
    let header = FrameHeader {
        packet_type,
        flags,
        header_len,
        remaining_len,
    };
    if header.frame_len() > max_packet_size as usize {
        return Err(FrameError::TooLarge {
            size: header.frame_len(),
        });
    }
    if buf.len() < header.frame_len() {
        return Err(FrameError::Incomplete);
    }
    Ok(header)
}

/// The flag bits MQTT fixes per packet type (3.1.1 §2.2.2, 5.0 §2.1.3).
fn check_flags(packet_type: u8, flags: u8) -> Result<(), FrameError> {
    use packet_type::*;
    let ok = match packet_type {
        PUBLISH => (flags >> 1) & 0b11 != 0b11,
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => flags == 0b0010,
        CONNECT..=DISCONNECT | AUTH => flags == 0,
        _ => return Err(FrameError::InvalidType(packet_type)),
    };
    if ok {
        Ok(())
    } else {
        Err(FrameError::ReservedFlags { packet_type, flags })
    }
}

/// Appends a variable byte integer (remaining length, property lengths).
pub fn put_var_int(out: &mut bytes::BytesMut, mut value: usize) {
    use bytes::BufMut;
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// Bytes a variable byte integer takes.
pub fn var_int_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lengths_of_every_width() {
        for len in [0usize, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            let mut buf = bytes::BytesMut::new();
            buf.extend_from_slice(&[0x30]);
            put_var_int(&mut buf, len);
            assert_eq!(buf.len() - 1, var_int_len(len));
            buf.resize(buf.len() + len, 0);
            let h = parse_header(&buf, u32::MAX).unwrap();
            assert_eq!(h.remaining_len, len);
            assert_eq!(h.frame_len(), buf.len());
        }
    }

    #[test]
    fn five_byte_length_is_malformed() {
        let buf = [0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
        assert_eq!(
            parse_header(&buf, u32::MAX),
            Err(FrameError::MalformedLength)
        );
    }

    #[test]
    fn incomplete_until_the_whole_frame_is_there() {
        assert_eq!(parse_header(&[], 100), Err(FrameError::Incomplete));
        assert_eq!(parse_header(&[0x30], 100), Err(FrameError::Incomplete));
        assert_eq!(
            parse_header(&[0x30, 0x80], 100),
            Err(FrameError::Incomplete)
        );
        assert_eq!(
            parse_header(&[0x30, 2, 0], 100),
            Err(FrameError::Incomplete)
        );
        assert!(parse_header(&[0x30, 2, 0, 0], 100).is_ok());
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        assert_eq!(
            parse_header(&[0x30, 0x80, 0x01], 100),
            Err(FrameError::TooLarge { size: 131 })
        );
    }

    #[test]
    fn reserved_flags_are_refused() {
        assert!(parse_header(&[0x82, 0], 100).is_ok());
        assert_eq!(
            parse_header(&[0x80, 0], 100),
            Err(FrameError::ReservedFlags {
                packet_type: 8,
                flags: 0
            })
        );
        assert_eq!(
            parse_header(&[0xC1, 0], 100),
            Err(FrameError::ReservedFlags {
                packet_type: 12,
                flags: 1
            })
        );
        assert_eq!(
            parse_header(&[0x36, 0], 100),
            Err(FrameError::ReservedFlags {
                packet_type: 3,
                flags: 6
            })
        );
        assert_eq!(
            parse_header(&[0x00, 0], 100),
            Err(FrameError::InvalidType(0))
        );
        assert!(parse_header(&[0x62, 2, 0, 1], 100).is_ok());
        assert!(parse_header(&[0x3D, 0], 100).is_ok());
    }
}
