//! MQTT over WebSocket (MQTT §6, RFC 6455), server side: an I/O-free codec.
//!
//! A readiness loop owns the socket. It reads bytes into a buffer and calls
//! [`WsCodec::decode`], which consumes what it can: the HTTP upgrade request first (answered
//! with `101 Switching Protocols` or an HTTP error), then frames, whose unmasked payload is
//! appended to the MQTT byte stream (`plain`) as soon as it arrives. MQTT bytes to send go
//! through [`WsCodec::encode`], one binary frame per call. The codec never does I/O and never
//! allocates on the frame path; everything it has to say to the peer (101, Pong, Close) is
//! appended to the caller's `out`.
//!
//! # Memory
//! A WebSocket connection can sit idle for hours, so the codec keeps only the position in the
//! current frame (remaining payload length, rotated mask, two flags): 16 bytes, no buffer.
//! Everything that must wait for more bytes stays in the caller's `input` instead:
//! - an incomplete upgrade request (bounded by [`WsConfig::max_request_bytes`]);
//! - an incomplete frame header (at most 14 bytes);
//! - an incomplete control frame (Ping, Pong, Close: at most 6 + 125 bytes). Keeping it in
//!   `input` rather than in the codec means no 125-byte buffer per connection; control frames
//!   are small and rare, so reparsing their header when the rest arrives costs nothing.
//!
//! Data frames are never buffered whole: a payload streams through in as many pieces as the
//! reads deliver, so the codec has no maximum frame size (the MQTT layer bounds packets).
//!
//! tungstenite's `WebSocket<Stream>` is not used: it owns the stream and keeps per-connection
//! read and write buffers (a 128 KiB read buffer by default), while mqttd's loop owns the
//! socket and an idle connection must cost well under 1 KB. From tungstenite we take only its
//! I/O-free pieces: [`FrameHeader`] parsing (it reports an incomplete header as `Ok(None)`,
//! which fits the incremental model) and formatting, the opcode and close-code enums, and
//! [`derive_accept_key`]. Its unmasking function is private, so `unmask` is written here.
//!
//! # Layout
//! [`WsCodec::decode`] runs the upgrade (`WsCodec::upgrade`, `check_request`) until it
//! succeeds, then the frame loop (`WsCodec::decode_frames`); the `put_*` helpers at the end
//! write frames and HTTP refusals into `out`.

use std::fmt;
use std::io::Cursor;

use bytes::{Buf, BufMut, BytesMut};
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Header lines httparse can hold; a request with more is refused with 431. Browsers send
/// 10 to 20; 64 leaves room for proxies' additions. The array lives on the stack only while
/// parsing (64 × 32 bytes).
const MAX_HEADERS: usize = 64;

/// Largest control-frame payload (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Close codes this codec sends (RFC 6455 §7.4.1).
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
const CLOSE_INVALID_PAYLOAD: u16 = 1007;

/// Subprotocols we speak, in order of preference: `mqtt` is MQTT 3.1.1 and 5's name
/// (MQTT §6), `mqttv3.1` is what MQTT 3.1 clients (and some older libraries) offer.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// The WebSocket listener settings the codec needs (the caller builds it from the broker
/// config).
#[derive(Debug, Clone)]
pub struct WsConfig {
    /// The only request path that is upgraded, e.g. `/mqtt`; a query string is ignored.
    pub path: String,
    /// Largest upgrade request (request line and headers), e.g. 8192: a client that sends
    /// more without ending its headers is refused with 431, so a slow or hostile client
    /// cannot make the caller hold an unbounded input buffer.
    pub max_request_bytes: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            path: "/mqtt".to_owned(),
            max_request_bytes: 8192,
        }
    }
}

/// What [`WsCodec::decode`] leaves the connection in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsStatus {
    /// Still waiting for the end of the HTTP upgrade request.
    Handshaking,
    /// Upgraded; MQTT bytes flow.
    Open,
    /// The peer sent a Close frame: our Close reply (if one was still due) is in `out`; write
    /// `out`, then close the TCP connection (no more input is decoded).
    Closed,
}

/// Why [`WsCodec::decode`] gave up on a connection. Either way `out` holds the last bytes for
/// the peer: write them, then close the TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsError {
    /// The upgrade request was refused: the HTTP error response is in `out`.
    BadUpgrade(&'static str),
    /// A protocol violation after the upgrade: a Close frame with this code is in `out`
    /// (1003 for a text frame, 1007 for a Close reason that is not UTF-8, 1002 otherwise).
    Protocol(u16, &'static str),
}

impl fmt::Display for WsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WsError::BadUpgrade(why) => write!(f, "websocket upgrade refused: {why}"),
            WsError::Protocol(code, why) => write!(f, "websocket protocol error {code}: {why}"),
        }
    }
}

impl std::error::Error for WsError {}

/// One connection's WebSocket state (server side).
#[derive(Debug)]
pub struct WsCodec {
    /// Payload bytes of the current data frame not yet decoded; 0 between frames (so a
    /// header is expected next). Control frames never set it: they are decoded whole.
    remaining: u64,
    /// The current frame's masking key, rotated so that `mask[0]` applies to the next payload
    /// byte: no separate offset to keep.
    mask: [u8; 4],
    status: WsStatus,
    /// A binary message began with FIN clear and its final continuation has not arrived yet:
    /// a continuation is expected, a new binary frame is not (RFC 6455 §5.4).
    fragmented: bool,
    /// We sent a Close frame: nothing more may be sent, and the peer's Close (its reply) is
    /// not answered.
    close_sent: bool,
}

impl Default for WsCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl WsCodec {
    pub fn new() -> WsCodec {
        WsCodec {
            remaining: 0,
            mask: [0; 4],
            status: WsStatus::Handshaking,
            fragmented: false,
            close_sent: false,
        }
    }

    /// True once upgraded and until a Close was sent or received: MQTT bytes may be
    /// [`encode`](Self::encode)d.
    pub fn is_open(&self) -> bool {
        self.status == WsStatus::Open && !self.close_sent
    }

    /// Decodes `input` (bytes from the peer).
    ///
    /// Consumes everything it can: MQTT payload bytes (from binary and continuation frames,
    /// unmasked) are appended to `plain` as soon as they arrive, however a frame's payload is
    /// split; frame boundaries mean nothing to MQTT (a frame may hold several packets, a packet
    /// may span frames). Bytes for the peer (the 101 response, an HTTP error, Pong replies, a
    /// Close) are appended to `out`. Bytes that cannot be used yet (an incomplete upgrade
    /// request, frame header or control frame) are left at the start of `input` for the next
    /// call, with the next bytes read appended after them; everything else is removed.
    ///
    /// After `Closed` or an error the connection is finished: further calls return `Closed`
    /// and touch nothing.
    pub fn decode(
        &mut self,
        config: &WsConfig,
        input: &mut BytesMut,
        plain: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<WsStatus, WsError> {
        if self.status == WsStatus::Handshaking {
            match self.upgrade(config, input, out) {
                Ok(true) => self.status = WsStatus::Open,
                Ok(false) => return Ok(WsStatus::Handshaking),
                Err(e) => {
                    self.status = WsStatus::Closed;
                    return Err(e);
                }
            }
            // Bytes after the request (a client that did not wait for the 101) are frames.
        }
        if self.status == WsStatus::Closed {
            return Ok(WsStatus::Closed);
        }
        self.decode_frames(input, plain, out)
    }

    /// Wraps `plain` (MQTT bytes to send) into one unmasked binary frame appended to `out`.
    /// Only valid while [`is_open`](Self::is_open).
    pub fn encode(&self, plain: &[u8], out: &mut BytesMut) {
        debug_assert!(self.is_open(), "encode on a WebSocket that is not open");
        put_frame(out, OpCode::Data(Data::Binary), plain);
    }

    /// Appends a Close frame with `code` (e.g. 1000 normal, 1001 going away) to `out`. A
    /// no-op before the upgrade, after the connection closed, or if a Close was already sent.
    /// Input is still decoded afterwards, until the peer's Close returns `Closed`.
    pub fn close(&mut self, code: u16, out: &mut BytesMut) {
        if self.is_open() {
            put_close(out, Some(code), "");
            self.close_sent = true;
        }
    }

    /// Parses the upgrade request at the start of `input`. On success writes the 101
    /// response, removes the request from `input` and returns true; returns false while the
    /// request is incomplete (left in `input`). A refusal writes the HTTP error response.
    fn upgrade(
        &mut self,
        config: &WsConfig,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<bool, WsError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        // The request is reparsed from its start on every call until complete: httparse
        // keeps no state, and max_request_bytes bounds the repeated work of a client that
        // sends a byte at a time (the caller's handshake timeout bounds how long it tries).
        let len = match request.parse(input) {
            Ok(httparse::Status::Complete(len)) if len <= config.max_request_bytes => len,
            Ok(httparse::Status::Partial) if input.len() <= config.max_request_bytes => {
                return Ok(false)
            }
            Ok(_) => return Err(put_refusal(out, &TOO_LARGE, "upgrade request too large")),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(put_refusal(out, &TOO_LARGE, "too many header lines"))
            }
            Err(_) => return Err(put_refusal(out, &BAD_REQUEST, "malformed HTTP request")),
        };
        let Accepted { key, protocol } = check_request(&request, config)
            .map_err(|(refusal, why)| put_refusal(out, refusal, why))?;
        out.extend_from_slice(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: ",
        );
        // One String per connection, at the upgrade only.
        out.extend_from_slice(derive_accept_key(key).as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(protocol) = protocol {
            out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
            out.extend_from_slice(protocol.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        input.advance(len);
        Ok(true)
    }

    /// The frame loop: runs until `input` holds no complete unit (header, control frame, or
    /// payload byte), the peer closes, or the peer breaks the protocol.
    fn decode_frames(
        &mut self,
        input: &mut BytesMut,
        plain: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<WsStatus, WsError> {
        loop {
            if self.remaining > 0 {
                // Inside a data frame's payload: pass on whatever part of it has arrived.
                let n = self.remaining.min(input.len() as u64) as usize;
                if n == 0 {
                    return Ok(WsStatus::Open);
                }
                let start = plain.len();
                plain.extend_from_slice(&input[..n]);
                unmask(&mut plain[start..], self.mask);
                self.mask.rotate_left(n % 4);
                input.advance(n);
                self.remaining -= n as u64;
                continue;
            }
            if input.is_empty() {
                return Ok(WsStatus::Open);
            }
            let mut cursor = Cursor::new(&input[..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return Ok(WsStatus::Open), // incomplete header: wait
                // The only error a parse from memory can give: a reserved opcode.
                Err(_) => return Err(self.fail(CLOSE_PROTOCOL_ERROR, "unknown opcode", out)),
            };
            let header_len = cursor.position() as usize;
            // No extension was negotiated, so no reserved bit may be set (§5.2).
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(self.fail(CLOSE_PROTOCOL_ERROR, "reserved bits set", out));
            }
            let Some(mask) = header.mask else {
                return Err(self.fail(CLOSE_PROTOCOL_ERROR, "unmasked client frame", out));
            };
            if len > i64::MAX as u64 {
                return Err(self.fail(CLOSE_PROTOCOL_ERROR, "length with the top bit set", out));
            }
            match header.opcode {
                OpCode::Data(Data::Binary) => {
                    if self.fragmented {
                        let why = "new message inside a fragmented one";
                        return Err(self.fail(CLOSE_PROTOCOL_ERROR, why, out));
                    }
                    self.fragmented = !header.is_final;
                }
                OpCode::Data(Data::Continue) => {
                    if !self.fragmented {
                        let why = "continuation without a message";
                        return Err(self.fail(CLOSE_PROTOCOL_ERROR, why, out));
                    }
                    self.fragmented = !header.is_final;
                }
                OpCode::Data(Data::Text) => {
                    // MQTT §6: "MQTT Control Packets MUST be sent in WebSocket binary data
                    // frames"; the receiver closes the connection otherwise.
                    return Err(self.fail(CLOSE_UNSUPPORTED_DATA, "text frame", out));
                }
                OpCode::Data(Data::Reserved(_)) | OpCode::Control(Control::Reserved(_)) => {
                    return Err(self.fail(CLOSE_PROTOCOL_ERROR, "unknown opcode", out));
                }
                OpCode::Control(control) => {
                    if !header.is_final {
                        return Err(self.fail(CLOSE_PROTOCOL_ERROR, "fragmented control", out));
                    }
                    if len > MAX_CONTROL_PAYLOAD as u64 {
                        return Err(self.fail(CLOSE_PROTOCOL_ERROR, "control too long", out));
                    }
                    let end = header_len + len as usize;
                    if input.len() < end {
                        return Ok(WsStatus::Open); // the whole frame stays in input: wait
                    }
                    let mut buf = [0u8; MAX_CONTROL_PAYLOAD];
                    let payload = &mut buf[..len as usize];
                    payload.copy_from_slice(&input[header_len..end]);
                    unmask(payload, mask);
                    input.advance(end);
                    match control {
                        Control::Ping if !self.close_sent => {
                            put_frame(out, OpCode::Control(Control::Pong), payload)
                        }
                        Control::Close => return self.peer_closed(payload, out),
                        // A Pong: we never ping, and an unsolicited Pong is a heartbeat that
                        // needs no answer (§5.5.3). Or a Ping after our Close: nothing may
                        // follow a Close, not even a Pong (§5.5.1).
                        _ => {}
                    }
                    continue;
                }
            }
            // A data frame: its payload streams through from the next turn of the loop.
            input.advance(header_len);
            self.mask = mask;
            self.remaining = len;
        }
    }

    /// The peer's Close frame (payload unmasked): echo its status code, if it had one, unless
    /// this is the reply to our own Close (§5.5.1), and finish.
    fn peer_closed(&mut self, payload: &[u8], out: &mut BytesMut) -> Result<WsStatus, WsError> {
        let code = match payload {
            [] => None,
            [_] => return Err(self.fail(CLOSE_PROTOCOL_ERROR, "1-byte close payload", out)),
            [high, low, reason @ ..] => {
                let code = u16::from_be_bytes([*high, *low]);
                // 1005, 1006, 1015 and unassigned codes must never be sent (§7.4).
                if !CloseCode::from(code).is_allowed() {
                    return Err(self.fail(CLOSE_PROTOCOL_ERROR, "invalid close code", out));
                }
                if std::str::from_utf8(reason).is_err() {
                    let why = "close reason not UTF-8";
                    return Err(self.fail(CLOSE_INVALID_PAYLOAD, why, out));
                }
                Some(code)
            }
        };
        if !self.close_sent {
            put_close(out, code, "");
            self.close_sent = true;
        }
        self.status = WsStatus::Closed;
        Ok(WsStatus::Closed)
    }

    /// Ends the connection for a protocol violation: a Close frame with `code` goes to `out`
    /// (unless we already sent one) with `why` as its reason, to help whoever debugs the
    /// client.
    fn fail(&mut self, code: u16, why: &'static str, out: &mut BytesMut) -> WsError {
        if !self.close_sent {
            put_close(out, Some(code), why);
            self.close_sent = true;
        }
        self.status = WsStatus::Closed;
        WsError::Protocol(code, why)
    }
}

/// What an acceptable upgrade request asks for.
struct Accepted<'b> {
    /// Sec-WebSocket-Key, for the accept key.
    key: &'b [u8],
    /// The subprotocol to answer with, if the client offered any.
    protocol: Option<&'static str>,
}

/// Why a request is refused: the response and the reason for [`WsError::BadUpgrade`].
type Refused = (&'static Refusal, &'static str);

/// Checks an upgrade request (RFC 6455 §4.2.1, MQTT §6).
fn check_request<'b>(
    request: &httparse::Request<'_, 'b>,
    config: &WsConfig,
) -> Result<Accepted<'b>, Refused> {
    if request.method != Some("GET") {
        return Err((&METHOD_NOT_ALLOWED, "method is not GET"));
    }
    if request.version != Some(1) {
        return Err((&VERSION_NOT_SUPPORTED, "not HTTP/1.1"));
    }
    let path = request.path.unwrap_or("");
    let path = path.split_once('?').map_or(path, |(path, _query)| path);
    if path != config.path {
        return Err((&NOT_FOUND, "unknown path"));
    }
    let headers = |name: &'static str| {
        request
            .headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    // Upgrade and Connection are comma-separated lists that may be split over several lines
    // (Firefox sends "Connection: keep-alive, Upgrade").
    let has_token = |name, token: &str| {
        headers(name)
            .flat_map(list_items)
            .any(|item| item.eq_ignore_ascii_case(token.as_bytes()))
    };
    if !has_token("upgrade", "websocket") {
        return Err((&BAD_REQUEST, "no Upgrade: websocket"));
    }
    if !has_token("connection", "upgrade") {
        return Err((&BAD_REQUEST, "no Connection: upgrade"));
    }
    if !headers("sec-websocket-version").any(|v| v.trim_ascii() == b"13") {
        return Err((&UPGRADE_REQUIRED, "Sec-WebSocket-Version is not 13"));
    }
    let key = match headers("sec-websocket-key").next().map(<[u8]>::trim_ascii) {
        Some(key) if !key.is_empty() => key,
        _ => return Err((&BAD_REQUEST, "no Sec-WebSocket-Key")),
    };
    // No Sec-WebSocket-Protocol at all is accepted, as Mosquitto and EMQX do; offering only
    // protocols we do not speak is not: the client would not understand us.
    if headers("sec-websocket-protocol")
        .flat_map(list_items)
        .next()
        .is_none()
    {
        return Ok(Accepted {
            key,
            protocol: None,
        });
    }
    let offered = |name: &str| {
        headers("sec-websocket-protocol")
            .flat_map(list_items)
            .any(|p| p == name.as_bytes())
    };
    match SUBPROTOCOLS.into_iter().find(|p| offered(p)) {
        Some(protocol) => Ok(Accepted {
            key,
            protocol: Some(protocol),
        }),
        None => Err((&BAD_REQUEST, "no supported Sec-WebSocket-Protocol offered")),
    }
}

/// The non-empty items of a comma-separated header value, trimmed.
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
}

/// An HTTP error response to an upgrade request.
struct Refusal {
    /// Status code and reason phrase.
    status: &'static str,
    /// Header lines the status calls for, each ending in CRLF.
    headers: &'static str,
}

const BAD_REQUEST: Refusal = Refusal {
    status: "400 Bad Request",
    headers: "",
};
const NOT_FOUND: Refusal = Refusal {
    status: "404 Not Found",
    headers: "",
};
/// RFC 9110 §15.5.6: a 405 lists the methods that are allowed.
const METHOD_NOT_ALLOWED: Refusal = Refusal {
    status: "405 Method Not Allowed",
    headers: "Allow: GET\r\n",
};
/// RFC 6455 §4.2.2: the versions the server speaks come with the 426.
const UPGRADE_REQUIRED: Refusal = Refusal {
    status: "426 Upgrade Required",
    headers: "Sec-WebSocket-Version: 13\r\n",
};
const TOO_LARGE: Refusal = Refusal {
    status: "431 Request Header Fields Too Large",
    headers: "",
};
const VERSION_NOT_SUPPORTED: Refusal = Refusal {
    status: "505 HTTP Version Not Supported",
    headers: "",
};

/// Writes `refusal` as a complete HTTP response that tells the client the connection ends.
fn put_refusal(out: &mut BytesMut, refusal: &Refusal, why: &'static str) -> WsError {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(refusal.status.as_bytes());
    out.extend_from_slice(b"\r\nConnection: close\r\nContent-Length: 0\r\n");
    out.extend_from_slice(refusal.headers.as_bytes());
    out.extend_from_slice(b"\r\n");
    WsError::BadUpgrade(why)
}

/// Writes the header of a final, unmasked server frame (servers never mask, §5.1).
fn put_header(out: &mut BytesMut, opcode: OpCode, len: usize) {
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    out.reserve(header.len(len as u64) + len);
    header
        .format(len as u64, &mut (&mut *out).writer())
        .expect("writing to a BytesMut cannot fail");
}

fn put_frame(out: &mut BytesMut, opcode: OpCode, payload: &[u8]) {
    put_header(out, opcode, payload.len());
    out.extend_from_slice(payload);
}

/// A Close frame: empty without a code, else the code and a reason of at most 123 bytes.
fn put_close(out: &mut BytesMut, code: Option<u16>, reason: &str) {
    let opcode = OpCode::Control(Control::Close);
    let Some(code) = code else {
        return put_header(out, opcode, 0);
    };
    debug_assert!(reason.len() <= MAX_CONTROL_PAYLOAD - 2);
    put_header(out, opcode, 2 + reason.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
}

/// XORs `buf` with the repeating 4-byte `mask` (starting at `mask[0]`), 8 bytes at a time.
/// Written here because tungstenite's `apply_mask` is private.
fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let [a, b, c, d] = mask;
    let wide = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // A multiple of 8 bytes was done, so the remainder starts at mask[0] again.
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    /// An MQTT 3.1.1 CONNECT, client id "ws", clean session, keep-alive 60.
    const CONNECT: &[u8] = b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02ws";
    const PINGREQ: &[u8] = b"\xc0\x00";

    /// Chrome 120's upgrade request, header for header (Host, Origin and key adapted).
    const CHROME: &str = "GET /mqtt HTTP/1.1\r\n\
        Host: broker.example:8083\r\n\
        Connection: Upgrade\r\n\
        Pragma: no-cache\r\n\
        Cache-Control: no-cache\r\n\
        User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
        Chrome/120.0.0.0 Safari/537.36\r\n\
        Upgrade: websocket\r\n\
        Origin: https://app.example\r\n\
        Sec-WebSocket-Version: 13\r\n\
        Accept-Encoding: gzip, deflate, br\r\n\
        Accept-Language: en-US,en;q=0.9\r\n\
        Cookie: session=abc\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
        Sec-WebSocket-Protocol: mqtt\r\n\
        \r\n";

    fn config() -> WsConfig {
        WsConfig {
            path: "/mqtt".into(),
            max_request_bytes: 8192,
        }
    }

    /// A minimal upgrade request with `extra` header lines (each ending in CRLF).
    fn request(extra: &str) -> String {
        format!(
            "GET /mqtt HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
        )
    }

    /// A masked client frame, built by hand (not with the code under test).
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![first];
        match payload.len() {
            n @ 0..=125 => frame.push(0x80 | n as u8),
            n @ 126..=65535 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&MASK);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        frame
    }

    fn binary(payload: &[u8]) -> Vec<u8> {
        client_frame(0x82, payload)
    }

    /// Parses one server frame by hand: (first byte, payload, bytes used).
    fn server_frame(bytes: &[u8]) -> (u8, &[u8], usize) {
        assert_eq!(bytes[1] & 0x80, 0, "server frames are not masked");
        let (len, at) = match bytes[1] {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        (bytes[0], &bytes[at..at + len], at + len)
    }

    /// A codec past the upgrade, with its 101 cleared from `out`.
    fn open() -> WsCodec {
        let mut codec = WsCodec::new();
        let (mut input, mut plain, mut out) = buffers(&request(""));
        let status = codec.decode(&config(), &mut input, &mut plain, &mut out);
        assert_eq!(status, Ok(WsStatus::Open));
        codec
    }

    fn buffers(input: &str) -> (BytesMut, BytesMut, BytesMut) {
        (
            BytesMut::from(input.as_bytes()),
            BytesMut::new(),
            BytesMut::new(),
        )
    }

    /// Feeds `bytes` to an open codec in one call: (status, plain, out, leftover input).
    fn feed(codec: &mut WsCodec, bytes: &[u8]) -> (Result<WsStatus, WsError>, Vec<u8>, Vec<u8>) {
        let mut input = BytesMut::from(bytes);
        let (mut plain, mut out) = (BytesMut::new(), BytesMut::new());
        let status = codec.decode(&config(), &mut input, &mut plain, &mut out);
        (status, plain.to_vec(), out.to_vec())
    }

    fn status_line(out: &[u8]) -> &str {
        let text = std::str::from_utf8(out).unwrap();
        text.split("\r\n").next().unwrap()
    }

    /// Asserts that `bytes` make an open codec fail with `code` and a Close with that code.
    fn assert_protocol_error(bytes: &[u8], code: u16) {
        let mut codec = open();
        let (status, plain, out) = feed(&mut codec, bytes);
        assert!(
            matches!(status, Err(WsError::Protocol(c, _)) if c == code),
            "{status:?}"
        );
        // Payload of frames before the bad one streams through; these cases have little.
        assert!(plain.len() <= 4);
        let (first, payload, used) = server_frame(&out);
        assert_eq!((first, used), (0x88, out.len()));
        assert_eq!(payload[..2], code.to_be_bytes());
        assert!(!codec.is_open());
        // Finished: nothing more is decoded.
        assert_eq!(
            feed(&mut codec, &binary(b"x")),
            (Ok(WsStatus::Closed), vec![], vec![])
        );
    }

    #[test]
    fn chrome_upgrade_gets_101_with_accept_key_and_mqtt() {
        let mut codec = WsCodec::new();
        let (mut input, mut plain, mut out) = buffers(CHROME);
        assert!(!codec.is_open());
        let status = codec.decode(&config(), &mut input, &mut plain, &mut out);
        assert_eq!(status, Ok(WsStatus::Open));
        let expected = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {ACCEPT}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        );
        assert_eq!(std::str::from_utf8(&out).unwrap(), expected);
        assert!(input.is_empty() && plain.is_empty());
        assert!(codec.is_open());
    }

    #[test]
    fn firefox_connection_list_and_mqttv31_only() {
        let mut codec = WsCodec::new();
        let req = "GET /mqtt?client=1 HTTP/1.1\r\nHost: b\r\nupgrade: WebSocket\r\n\
                   Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Protocol: mqttv3.1\r\n\r\n";
        let (mut input, mut plain, mut out) = buffers(req);
        let status = codec.decode(&config(), &mut input, &mut plain, &mut out);
        assert_eq!(status, Ok(WsStatus::Open));
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            text.contains("\r\nSec-WebSocket-Protocol: mqttv3.1\r\n"),
            "{text}"
        );
    }

    #[test]
    fn mqtt_preferred_among_protocols_over_several_lines() {
        let mut codec = WsCodec::new();
        let req =
            request("Sec-WebSocket-Protocol: wamp, mqttv3.1\r\nSec-WebSocket-Protocol: mqtt\r\n");
        let (mut input, mut plain, mut out) = buffers(&req);
        let status = codec.decode(&config(), &mut input, &mut plain, &mut out);
        assert_eq!(status, Ok(WsStatus::Open));
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            text.contains("\r\nSec-WebSocket-Protocol: mqtt\r\n"),
            "{text}"
        );
    }

    #[test]
    fn no_protocol_header_is_accepted_without_one() {
        let mut codec = WsCodec::new();
        let (mut input, mut plain, mut out) = buffers(&request(""));
        let status = codec.decode(&config(), &mut input, &mut plain, &mut out);
        assert_eq!(status, Ok(WsStatus::Open));
        let expected = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
        );
        assert_eq!(std::str::from_utf8(&out).unwrap(), expected);
    }

    #[test]
    fn bad_upgrades_get_their_status() {
        let good = request("");
        let many_headers: String = (0..70).map(|i| format!("X-H{i}: v\r\n")).collect();
        let cases: Vec<(String, &str)> = vec![
            (good.replacen("GET", "POST", 1), "405 Method Not Allowed"),
            (good.replacen("/mqtt", "/other", 1), "404 Not Found"),
            (good.replacen("/mqtt", "/mqtt/x", 1), "404 Not Found"),
            (
                good.replacen("HTTP/1.1", "HTTP/1.0", 1),
                "505 HTTP Version Not Supported",
            ),
            (
                good.replacen("Upgrade: websocket\r\n", "", 1),
                "400 Bad Request",
            ),
            (
                good.replacen("Upgrade: websocket", "Upgrade: h2c", 1),
                "400 Bad Request",
            ),
            (
                good.replacen("Connection: Upgrade", "Connection: keep-alive", 1),
                "400 Bad Request",
            ),
            (
                good.replacen("Version: 13", "Version: 8", 1),
                "426 Upgrade Required",
            ),
            (
                good.replacen("Sec-WebSocket-Version: 13\r\n", "", 1),
                "426 Upgrade Required",
            ),
            (
                good.replacen(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "", 1),
                "400 Bad Request",
            ),
            (
                request("Sec-WebSocket-Protocol: wamp, graphql-ws\r\n"),
                "400 Bad Request",
            ),
            (
                request(&many_headers),
                "431 Request Header Fields Too Large",
            ),
            (
                "GET /mqtt HTTP/1.1\r\nBad Header\r\n\r\n".into(),
                "400 Bad Request",
            ),
            (
                format!("GET /mqtt HTTP/1.1\r\nX: {}", "a".repeat(9000)),
                "431 Request Header Fields Too Large",
            ),
        ];
        for (req, status) in cases {
            let mut codec = WsCodec::new();
            let (mut input, mut plain, mut out) = buffers(&req);
            let result = codec.decode(&config(), &mut input, &mut plain, &mut out);
            assert!(
                matches!(result, Err(WsError::BadUpgrade(_))),
                "{req}: {result:?}"
            );
            assert_eq!(status_line(&out), format!("HTTP/1.1 {status}"), "{req}");
            let text = std::str::from_utf8(&out).unwrap();
            assert!(
                text.contains("\r\nConnection: close\r\nContent-Length: 0\r\n"),
                "{text}"
            );
            assert!(text.ends_with("\r\n\r\n"));
            if status.starts_with("426") {
                assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"));
            }
            if status.starts_with("405") {
                assert!(text.contains("\r\nAllow: GET\r\n"));
            }
            assert!(!codec.is_open());
            // Finished: later input is not decoded.
            out.clear();
            let again = codec.decode(&config(), &mut input, &mut plain, &mut out);
            assert_eq!(again, Ok(WsStatus::Closed));
            assert!(out.is_empty() && plain.is_empty());
        }
    }

    #[test]
    fn request_one_byte_at_a_time() {
        let mut codec = WsCodec::new();
        let (mut input, mut plain, mut out) = (BytesMut::new(), BytesMut::new(), BytesMut::new());
        let bytes = CHROME.as_bytes();
        for (i, byte) in bytes.iter().enumerate() {
            input.extend_from_slice(&[*byte]);
            let status = codec.decode(&config(), &mut input, &mut plain, &mut out);
            if i + 1 < bytes.len() {
                assert_eq!(status, Ok(WsStatus::Handshaking), "at byte {i}");
                assert_eq!(input.len(), i + 1, "incomplete request stays in input");
                assert!(out.is_empty());
            } else {
                assert_eq!(status, Ok(WsStatus::Open));
            }
        }
        assert!(input.is_empty());
        assert_eq!(status_line(&out), "HTTP/1.1 101 Switching Protocols");
    }

    #[test]
    fn request_and_first_frames_in_one_buffer() {
        let mut codec = WsCodec::new();
        let mut bytes = request("Sec-WebSocket-Protocol: mqtt\r\n").into_bytes();
        bytes.extend_from_slice(&binary(CONNECT));
        bytes.extend_from_slice(&binary(PINGREQ)[..3]); // and the start of the next frame
        let mut input = BytesMut::from(&bytes[..]);
        let (mut plain, mut out) = (BytesMut::new(), BytesMut::new());
        let status = codec.decode(&config(), &mut input, &mut plain, &mut out);
        assert_eq!(status, Ok(WsStatus::Open));
        assert_eq!(status_line(&out), "HTTP/1.1 101 Switching Protocols");
        assert_eq!(&plain[..], CONNECT);
        assert_eq!(
            &input[..],
            &binary(PINGREQ)[..3],
            "incomplete header left in input"
        );
    }

    #[test]
    fn connect_split_across_a_fragmented_message() {
        let mut codec = open();
        let mut bytes = client_frame(0x02, &CONNECT[..3]); // binary, FIN clear
        bytes.extend(client_frame(0x00, &CONNECT[3..9])); // continuation
        bytes.extend(client_frame(0x80, &CONNECT[9..])); // continuation, FIN
        bytes.extend(binary(PINGREQ)); // a new message may start now
        let (status, plain, out) = feed(&mut codec, &bytes);
        assert_eq!(status, Ok(WsStatus::Open));
        assert_eq!(plain, [CONNECT, PINGREQ].concat());
        assert!(out.is_empty());
    }

    #[test]
    fn connect_split_across_messages() {
        let mut codec = open();
        let bytes = [
            binary(&CONNECT[..1]),
            binary(&CONNECT[1..10]),
            binary(&CONNECT[10..]),
        ];
        let (status, plain, _) = feed(&mut codec, &bytes.concat());
        assert_eq!(status, Ok(WsStatus::Open));
        assert_eq!(plain, CONNECT);
    }

    #[test]
    fn two_packets_in_one_frame() {
        let mut codec = open();
        let (status, plain, _) = feed(&mut codec, &binary(&[CONNECT, PINGREQ].concat()));
        assert_eq!(status, Ok(WsStatus::Open));
        assert_eq!(plain, [CONNECT, PINGREQ].concat());
    }

    #[test]
    fn ping_between_fragments_is_answered() {
        let mut codec = open();
        let mut bytes = client_frame(0x02, &CONNECT[..5]);
        bytes.extend(client_frame(0x89, b"hi"));
        bytes.extend(client_frame(0x80, &CONNECT[5..]));
        let (status, plain, out) = feed(&mut codec, &bytes);
        assert_eq!(status, Ok(WsStatus::Open));
        assert_eq!(plain, CONNECT);
        assert_eq!(server_frame(&out), (0x8a, &b"hi"[..], out.len()));
    }

    #[test]
    fn payload_one_byte_per_call_streams_through() {
        let mut codec = open();
        let frame = binary(CONNECT);
        let header_len = frame.len() - CONNECT.len();
        let (mut input, mut plain, mut out) = (BytesMut::new(), BytesMut::new(), BytesMut::new());
        for (i, byte) in frame.iter().enumerate() {
            input.extend_from_slice(&[*byte]);
            let status = codec.decode(&config(), &mut input, &mut plain, &mut out);
            assert_eq!(status, Ok(WsStatus::Open));
            if i + 1 < header_len {
                assert_eq!(input.len(), i + 1, "incomplete header stays in input");
                assert!(plain.is_empty());
            } else {
                assert!(input.is_empty(), "byte {i} consumed");
                assert_eq!(
                    &plain[..],
                    &CONNECT[..i + 1 - header_len],
                    "byte {i} passed on"
                );
            }
        }
        assert_eq!(&plain[..], CONNECT);
        assert!(out.is_empty());
    }

    #[test]
    fn frames_split_at_every_position() {
        let small: Vec<u8> = (0..100u8).collect();
        let medium: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let large: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        for payload in [&small, &medium, &large] {
            let frame = binary(payload);
            // Every split inside the header and the first payload bytes, then a few later.
            let splits = (0..=20).chain([frame.len() / 2, frame.len() - 1, frame.len()]);
            for split in splits {
                let mut codec = open();
                let (mut input, mut plain, mut out) = (
                    BytesMut::from(&frame[..split]),
                    BytesMut::new(),
                    BytesMut::new(),
                );
                let status = codec.decode(&config(), &mut input, &mut plain, &mut out);
                assert_eq!(status, Ok(WsStatus::Open));
                assert!(input.len() <= 14, "only a partial header may be left");
                input.extend_from_slice(&frame[split..]);
                let status = codec.decode(&config(), &mut input, &mut plain, &mut out);
                assert_eq!(status, Ok(WsStatus::Open));
                assert!(input.is_empty() && out.is_empty());
                assert_eq!(
                    &plain[..],
                    &payload[..],
                    "split at {split} of {}",
                    payload.len()
                );
            }
        }
    }

    #[test]
    fn irregular_pieces_keep_the_mask_in_step() {
        let payload: Vec<u8> = (0..1000u32).map(|i| (i * 31 + 5) as u8).collect();
        let frame = binary(&payload);
        let mut codec = open();
        let (mut input, mut plain, mut out) = (BytesMut::new(), BytesMut::new(), BytesMut::new());
        let mut at = 0;
        for size in [1, 3, 5, 7, 9, 11, 13, 2, 17, 33].iter().cycle() {
            let end = (at + size).min(frame.len());
            input.extend_from_slice(&frame[at..end]);
            assert_eq!(
                codec.decode(&config(), &mut input, &mut plain, &mut out),
                Ok(WsStatus::Open)
            );
            at = end;
            if at == frame.len() {
                break;
            }
        }
        assert_eq!(&plain[..], &payload[..]);
    }

    #[test]
    fn sixteen_and_sixty_four_bit_lengths() {
        for len in [126, 65_535, 65_536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut codec = open();
            let (status, plain, _) = feed(&mut codec, &binary(&payload));
            assert_eq!(status, Ok(WsStatus::Open));
            assert_eq!(plain, payload);
        }
    }

    #[test]
    fn zero_length_frames_are_fine() {
        let mut codec = open();
        let mut bytes = binary(b"");
        bytes.extend(client_frame(0x02, b""));
        bytes.extend(client_frame(0x80, CONNECT));
        bytes.extend(client_frame(0x89, b""));
        let (status, plain, out) = feed(&mut codec, &bytes);
        assert_eq!(status, Ok(WsStatus::Open));
        assert_eq!(plain, CONNECT);
        assert_eq!(out, [0x8a, 0x00], "empty pong");
    }

    #[test]
    fn ping_gets_pong_with_its_payload() {
        let mut codec = open();
        let payload: Vec<u8> = (0..125).collect();
        let (status, plain, out) = feed(&mut codec, &client_frame(0x89, &payload));
        assert_eq!(status, Ok(WsStatus::Open));
        assert!(plain.is_empty());
        assert_eq!(server_frame(&out), (0x8a, &payload[..], out.len()));
    }

    #[test]
    fn split_ping_waits_in_input_then_gets_pong() {
        let mut codec = open();
        let frame = client_frame(0x89, b"hello ping");
        for split in 1..frame.len() {
            let (mut input, mut plain, mut out) = (
                BytesMut::from(&frame[..split]),
                BytesMut::new(),
                BytesMut::new(),
            );
            let status = codec.decode(&config(), &mut input, &mut plain, &mut out);
            assert_eq!(status, Ok(WsStatus::Open));
            assert_eq!(
                &input[..],
                &frame[..split],
                "incomplete control frame left in input"
            );
            assert!(out.is_empty());
            input.extend_from_slice(&frame[split..]);
            let status = codec.decode(&config(), &mut input, &mut plain, &mut out);
            assert_eq!(status, Ok(WsStatus::Open));
            assert!(input.is_empty() && plain.is_empty());
            assert_eq!(server_frame(&out), (0x8a, &b"hello ping"[..], out.len()));
        }
    }

    #[test]
    fn pong_is_ignored() {
        let mut codec = open();
        let mut bytes = client_frame(0x8a, b"unsolicited");
        bytes.extend(binary(PINGREQ));
        let (status, plain, out) = feed(&mut codec, &bytes);
        assert_eq!(status, Ok(WsStatus::Open));
        assert_eq!(plain, PINGREQ);
        assert!(out.is_empty());
    }

    #[test]
    fn close_is_echoed_and_ends_decoding() {
        let mut codec = open();
        let mut bytes = client_frame(0x88, b"\x03\xe8bye");
        bytes.extend(binary(PINGREQ)); // after the Close: not decoded
        let (status, plain, out) = feed(&mut codec, &bytes);
        assert_eq!(status, Ok(WsStatus::Closed));
        assert!(plain.is_empty());
        assert_eq!(server_frame(&out), (0x88, &[0x03, 0xe8][..], out.len()));
        assert!(!codec.is_open());
        assert_eq!(
            feed(&mut codec, &binary(PINGREQ)),
            (Ok(WsStatus::Closed), vec![], vec![])
        );
    }

    #[test]
    fn close_without_code_gets_empty_close() {
        let mut codec = open();
        let (status, _, out) = feed(&mut codec, &client_frame(0x88, b""));
        assert_eq!(status, Ok(WsStatus::Closed));
        assert_eq!(out, [0x88, 0x00]);
    }

    #[test]
    fn bad_close_payloads_are_protocol_errors() {
        assert_protocol_error(&client_frame(0x88, b"\x03"), 1002);
        assert_protocol_error(&client_frame(0x88, b"\x03\xed"), 1002); // 1005 is never sent
        assert_protocol_error(&client_frame(0x88, b"\x03\xe8\xff\xfe"), 1007);
    }

    #[test]
    fn our_close_then_peer_close_reply() {
        let mut codec = open();
        let mut out = BytesMut::new();
        codec.close(1001, &mut out);
        assert_eq!(&out[..], [0x88, 0x02, 0x03, 0xe9]);
        assert!(!codec.is_open());
        codec.close(1000, &mut out);
        assert_eq!(out.len(), 4, "only one Close is sent");
        // Data still in flight from the peer is decoded, a Ping is not answered any more,
        // and the peer's Close (its reply) is not answered either.
        let mut bytes = binary(PINGREQ);
        bytes.extend(client_frame(0x89, b"p"));
        bytes.extend(client_frame(0x88, b"\x03\xe9"));
        let (status, plain, out) = feed(&mut codec, &bytes);
        assert_eq!(status, Ok(WsStatus::Closed));
        assert_eq!(plain, PINGREQ);
        assert!(out.is_empty());
    }

    #[test]
    fn close_before_upgrade_is_a_no_op() {
        let mut codec = WsCodec::new();
        let mut out = BytesMut::new();
        codec.close(1000, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn text_frame_is_closed_with_1003() {
        assert_protocol_error(&client_frame(0x81, b"{}"), 1003);
    }

    #[test]
    fn protocol_violations_are_closed_with_1002() {
        let mut unmasked = vec![0x82, 0x02];
        unmasked.extend_from_slice(PINGREQ);
        assert_protocol_error(&unmasked, 1002);
        assert_protocol_error(&client_frame(0xc2, PINGREQ), 1002); // RSV1
        assert_protocol_error(&client_frame(0x92, PINGREQ), 1002); // RSV3
        assert_protocol_error(&client_frame(0x83, b""), 1002); // reserved data opcode
        assert_protocol_error(&client_frame(0x8b, b""), 1002); // reserved control opcode
        assert_protocol_error(&client_frame(0x09, b""), 1002); // fragmented ping
        assert_protocol_error(&client_frame(0x89, &[0; 126]), 1002); // ping too long
        assert_protocol_error(&client_frame(0x80, PINGREQ), 1002); // continuation alone
        let mut interleaved = client_frame(0x02, &CONNECT[..4]);
        interleaved.extend(binary(&CONNECT[4..]));
        assert_protocol_error(&interleaved, 1002); // new message inside a fragmented one
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        huge.extend_from_slice(&MASK);
        assert_protocol_error(&huge, 1002);
    }

    #[test]
    fn oversized_control_header_fails_before_its_payload() {
        // A Ping announcing 126 bytes is refused from its header alone.
        let frame = client_frame(0x89, &[0; 126]);
        assert_protocol_error(&frame[..8], 1002);
    }

    #[test]
    fn encode_round_trips() {
        let codec = open();
        for (len, header_len) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let mut out = BytesMut::new();
            codec.encode(&payload, &mut out);
            let (first, parsed, used) = server_frame(&out);
            assert_eq!(first, 0x82, "FIN, binary");
            assert_eq!(parsed, &payload[..]);
            assert_eq!((used, out.len()), (header_len + len, header_len + len));
            // And tungstenite's parser agrees.
            let mut cursor = Cursor::new(&out[..]);
            let (header, parsed_len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert_eq!(
                (parsed_len, cursor.position()),
                (len as u64, header_len as u64)
            );
            assert!(header.is_final && header.mask.is_none());
            assert_eq!(header.opcode, OpCode::Data(Data::Binary));
        }
    }

    #[test]
    fn unmask_matches_the_bytewise_definition() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
            let mut fast = data.clone();
            unmask(&mut fast, MASK);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ MASK[i % 4])
                .collect();
            assert_eq!(fast, slow, "length {len}");
        }
    }

    #[test]
    fn codec_is_small() {
        // The whole per-connection WebSocket state while idle: no buffer, 16 bytes on 64-bit.
        assert!(
            std::mem::size_of::<WsCodec>() <= 16,
            "{}",
            std::mem::size_of::<WsCodec>()
        );
    }
}
