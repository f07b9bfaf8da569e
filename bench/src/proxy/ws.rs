//! The client side of WebSocket (RFC 6455) for the proxy: the upgrade request and its check,
//! masked binary frames out, and an in-place deframer for the server's frames.
//!
//! Nothing here allocates per frame. Outgoing: the caller reads plain bytes into a buffer at
//! offset [`MAX_HEADER`], [`wrap`] writes the frame header right before them and masks them
//! in place, and the frame goes out in one write. Incoming: [`Deframer::decode`] strips the
//! headers in the read buffer itself, moving later payloads down next to the first one, so one
//! read becomes one write to the plain side however many frames it held. The proxy loop that
//! drives these functions lives in `super`.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest client frame header: 2 bytes, a 64-bit length, a 4-byte mask.
pub const MAX_HEADER: usize = 2 + 8 + 4;

/// Largest control-frame payload (RFC 6455 §5.5).
const MAX_CONTROL: usize = 125;

/// Largest 101 response we wait for.
const MAX_RESPONSE: usize = 8192;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Mask generator: xorshift64*, seeded per connection from the standard library's random
/// hash keys. The mask only has to keep a client from choosing the bytes a middlebox sees
/// (RFC 6455 §10.3); a bench proxy needs no cryptographic generator for that, and this one
/// costs a few instructions per frame.
pub struct MaskRng(u64);

impl MaskRng {
    pub fn new() -> MaskRng {
        use std::hash::{BuildHasher, Hasher};
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        MaskRng(seed | 1)
    }

    pub fn next_mask(&mut self) -> [u8; 4] {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 32) as u32).to_ne_bytes()
    }
}

/// XORs `data` with `mask` (the mask's byte 0 on `data[0]`), 8 bytes at a time.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let key = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word: [u8; 8] = (&*chunk).try_into().expect("chunks of 8");
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ key).to_ne_bytes());
    }
    // Chunks of 8 keep the mask's phase: the remainder starts on mask byte 0.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Turns `buf[MAX_HEADER..MAX_HEADER + len]` into one masked frame with `opcode` (FIN set):
/// writes the header right before the payload and masks the payload in place. Returns where
/// the frame starts; it ends at `MAX_HEADER + len`.
pub fn wrap(buf: &mut [u8], len: usize, opcode: u8, mask: [u8; 4]) -> usize {
    let mut header = [0u8; MAX_HEADER];
    header[0] = 0x80 | opcode;
    let mut n = 2;
    if len < 126 {
        header[1] = 0x80 | len as u8;
    } else if len <= u16::MAX as usize {
        header[1] = 0x80 | 126;
        header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        n = 4;
    } else {
        header[1] = 0x80 | 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        n = 10;
    }
    header[n..n + 4].copy_from_slice(&mask);
    n += 4;
    let start = MAX_HEADER - n;
    buf[start..MAX_HEADER].copy_from_slice(&header[..n]);
    apply_mask(&mut buf[MAX_HEADER..MAX_HEADER + len], mask);
    start
}

/// A control frame the server sent, for the caller to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Ping: answer with a Pong carrying the same payload (up to 125 bytes).
    Ping([u8; MAX_CONTROL], u8),
    /// Close with this status code (1005 when the frame had none): echo it and close.
    Close(u16),
}

/// What one [`Deframer::decode`] call found.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// `buf[out]` holds the MQTT bytes to write to the plain side.
    pub out: std::ops::Range<usize>,
    /// Bytes of `buf` used up; the rest (an incomplete header or control frame) must be kept
    /// at the start of the buffer for the next call.
    pub consumed: usize,
    /// A Ping or Close seen in this buffer (decoding stops after a Close).
    pub control: Option<Control>,
}

/// The server-to-client direction: payload bytes of the current data frame still to come.
#[derive(Debug, Default)]
pub struct Deframer {
    remaining: u64,
}

impl Deframer {
    /// Strips frame headers from `buf` in place. Data frames (binary, continuation, text)
    /// stream through as their bytes arrive; control frames are handled once complete.
    /// Decoding stops after a Ping (so each one is answered) and after a Close.
    pub fn decode(&mut self, buf: &mut [u8]) -> io::Result<Decoded> {
        let mut pos = 0;
        let mut out: Option<std::ops::Range<usize>> = None;
        loop {
            if self.remaining > 0 {
                if pos == buf.len() {
                    break;
                }
                let n =
                    (buf.len() - pos).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                out = Some(match out {
                    None => pos..pos + n,
                    Some(r) => {
                        buf.copy_within(pos..pos + n, r.end);
                        r.start..r.end + n
                    }
                });
                pos += n;
                self.remaining -= n as u64;
                continue;
            }
            let Some((opcode, header_len, len)) = parse_header(&buf[pos..])? else {
                break;
            };
            match opcode {
                OP_CONTINUATION | OP_TEXT | OP_BINARY => {
                    pos += header_len;
                    self.remaining = len;
                }
                OP_CLOSE | OP_PING | OP_PONG => {
                    let len = len as usize; // checked <= 125 by parse_header
                    if buf.len() - pos < header_len + len {
                        break; // the rest of the control frame has not arrived
                    }
                    let payload = &buf[pos + header_len..pos + header_len + len];
                    pos += header_len + len;
                    let control = match opcode {
                        OP_PING => {
                            let mut p = [0u8; MAX_CONTROL];
                            p[..len].copy_from_slice(payload);
                            Control::Ping(p, len as u8)
                        }
                        OP_CLOSE if len >= 2 => {
                            Control::Close(u16::from_be_bytes([payload[0], payload[1]]))
                        }
                        OP_CLOSE => Control::Close(1005),
                        _ => continue, // an unsolicited Pong
                    };
                    return Ok(Decoded {
                        out: out.unwrap_or(0..0),
                        consumed: pos,
                        control: Some(control),
                    });
                }
                op => return Err(protocol_error(format!("reserved opcode {op:#x}"))),
            }
        }
        Ok(Decoded {
            out: out.unwrap_or(0..0),
            consumed: pos,
            control: None,
        })
    }
}

/// (opcode, header length, payload length) of the frame at the start of `b`, or None when
/// the header is incomplete.
fn parse_header(b: &[u8]) -> io::Result<Option<(u8, usize, u64)>> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[0] & 0x70 != 0 {
        return Err(protocol_error("RSV bits set (no extension was negotiated)"));
    }
    if b[1] & 0x80 != 0 {
        return Err(protocol_error("masked frame from the server"));
    }
    let opcode = b[0] & 0x0F;
    let (header_len, len) = match b[1] & 0x7F {
        126 if b.len() < 4 => return Ok(None),
        126 => (4, u64::from(u16::from_be_bytes([b[2], b[3]]))),
        127 if b.len() < 10 => return Ok(None),
        127 => {
            let mut l = [0u8; 8];
            l.copy_from_slice(&b[2..10]);
            (10, u64::from_be_bytes(l))
        }
        l => (2, u64::from(l)),
    };
    if opcode >= OP_CLOSE && (len > MAX_CONTROL as u64 || b[0] & 0x80 == 0) {
        return Err(protocol_error(
            "control frame longer than 125 bytes or fragmented",
        ));
    }
    Ok(Some((opcode, header_len, len)))
}

fn protocol_error(why: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("websocket: {}", why.into()),
    )
}

/// Sends the upgrade request for `path` (Host `host`, subprotocol `mqtt`) and waits for a
/// valid 101. Reads into `buf`; returns how many bytes after the response are already there
/// (frames the server sent right away), moved to the start of `buf`.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    path: &str,
    buf: &mut [u8],
) -> io::Result<usize> {
    let key = tungstenite::handshake::client::generate_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await?;
    s.flush().await?;
    let mut end = 0;
    let head_len = loop {
        if let Some(i) = buf[..end].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if end >= MAX_RESPONSE {
            return Err(protocol_error("upgrade response headers too long"));
        }
        let n = s.read(&mut buf[end..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "websocket: connection closed during the upgrade",
            ));
        }
        end += n;
    };
    check_response(&buf[..head_len], &key)?;
    buf.copy_within(head_len..end, 0);
    Ok(end - head_len)
}

/// Checks a 101 response: status, Upgrade, Sec-WebSocket-Accept, and (if the server chose
/// one) the subprotocol `mqtt`.
fn check_response(head: &[u8], key: &str) -> io::Result<()> {
    let text = std::str::from_utf8(head).map_err(|_| protocol_error("non-UTF-8 response"))?;
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 101") {
        return Err(protocol_error(format!("upgrade refused: {status:?}")));
    }
    let (mut upgrade, mut accept) = (false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = value == tungstenite::handshake::derive_accept_key(key.as_bytes());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") && value != "mqtt" {
            return Err(protocol_error(format!(
                "server chose subprotocol {value:?}"
            )));
        }
    }
    if !upgrade || !accept {
        return Err(protocol_error(
            "101 without Upgrade: websocket or a valid Sec-WebSocket-Accept",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n <= 0xFFFF => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `input` to a deframer in pieces of `step` bytes, as reads would; returns the
    /// plain bytes and the controls seen.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, Vec<Control>) {
        let mut d = Deframer::default();
        let mut buf = vec![0u8; 1 << 18];
        let (mut end, mut fed) = (0, 0);
        let (mut plain, mut controls) = (Vec::new(), Vec::new());
        while fed < input.len() || end > 0 {
            let n = step.min(input.len() - fed);
            buf[end..end + n].copy_from_slice(&input[fed..fed + n]);
            end += n;
            fed += n;
            loop {
                let r = d.decode(&mut buf[..end]).expect("valid frames");
                plain.extend_from_slice(&buf[r.out.clone()]);
                buf.copy_within(r.consumed..end, 0);
                end -= r.consumed;
                match r.control {
                    Some(c) => controls.push(c),
                    None => break,
                }
            }
            if n == 0 {
                break; // input exhausted, an incomplete frame stays
            }
        }
        (plain, controls)
    }

    #[test]
    fn mask_matches_bytewise() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in [0, 1, 7, 8, 9, 63, 64, 1000] {
            let orig: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut fast = orig.clone();
            apply_mask(&mut fast, mask);
            let slow: Vec<u8> = orig
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow, "len {len}");
        }
    }

    #[test]
    fn wrap_writes_header_and_masks() {
        for len in [5usize, 126, 70_000] {
            let mut buf = vec![0u8; MAX_HEADER + len];
            buf[MAX_HEADER..].fill(0xAA);
            let mask = [1, 2, 3, 4];
            let start = wrap(&mut buf, len, OP_BINARY, mask);
            let f = &buf[start..];
            assert_eq!(f[0], 0x82);
            assert_eq!(f[1] & 0x80, 0x80);
            let (hl, l) = match f[1] & 0x7F {
                126 => (4, u16::from_be_bytes([f[2], f[3]]) as usize),
                127 => (
                    10,
                    u64::from_be_bytes(f[2..10].try_into().unwrap()) as usize,
                ),
                l => (2, l as usize),
            };
            assert_eq!(l, len);
            assert_eq!(&f[hl..hl + 4], &mask);
            let mut p = f[hl + 4..].to_vec();
            apply_mask(&mut p, mask);
            assert!(p.iter().all(|&b| b == 0xAA));
        }
    }

    #[test]
    fn deframes_split_and_coalesced_frames() {
        let big: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let mut input = Vec::new();
        let mut expect = Vec::new();
        for (i, p) in [&b"hello"[..], &[9u8; 300][..], &big[..], b"", b"x"]
            .iter()
            .enumerate()
        {
            input.extend(server_frame(
                if i == 1 { OP_CONTINUATION } else { OP_BINARY },
                i != 0,
                p,
            ));
            expect.extend_from_slice(p);
        }
        input.extend(server_frame(OP_PING, true, b"are you there"));
        input.extend(server_frame(OP_BINARY, true, b"tail"));
        expect.extend_from_slice(b"tail");
        input.extend(server_frame(OP_CLOSE, true, &1000u16.to_be_bytes()));
        for step in [1, 2, 3, 13, 4096, 1 << 17] {
            let (plain, controls) = run(&input, step);
            assert_eq!(plain, expect, "step {step}");
            let mut ping = [0u8; MAX_CONTROL];
            ping[..13].copy_from_slice(b"are you there");
            assert_eq!(
                controls,
                vec![Control::Ping(ping, 13), Control::Close(1000)]
            );
        }
    }

    #[test]
    fn rejects_masked_and_reserved() {
        let mut d = Deframer::default();
        assert!(d.decode(&mut [0x82, 0x81, 0, 0, 0, 0, 0]).is_err());
        assert!(d.decode(&mut [0x83, 0x00]).is_err());
        assert!(d.decode(&mut [0x89, 126, 0, 200]).is_err());
    }

    #[test]
    fn response_check() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";
        assert!(check_response(ok.as_bytes(), key).is_ok());
        assert!(check_response(ok.replace("s3pP", "xxxx").as_bytes(), key).is_err());
        assert!(check_response(b"HTTP/1.1 404 Not Found\r\n\r\n", key).is_err());
    }
}
