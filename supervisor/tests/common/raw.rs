//! Raw MQTT bytes over a blocking `std` TCP socket, for tests that must send what no client
//! library would. Every read is bounded by [`TIMEOUT`].

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The longest any test waits for the broker to react.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Protocol version of a raw connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V {
    /// MQTT 3.1.1 (protocol level 4).
    V3,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

/// A unique client id per call (tests in one binary run in parallel).
pub fn client_id(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn hex(bytes: &[u8]) -> String {
    let parts: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
    format!("[{}]", parts.join(" "))
}

// ---------------------------------------------------------------- encoding

pub fn put_var_int(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// A two-byte-length-prefixed string / binary field.
pub fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// Fixed header (`byte1` + remaining length) followed by `body`.
pub fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    put_var_int(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// CONNECT with an explicit protocol name, level and flags; keep-alive 60 s, no properties.
pub fn connect_raw(name: &[u8], level: u8, flags: u8, client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, name);
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&60u16.to_be_bytes());
    if level == 5 {
        body.push(0); // property length
    }
    put_str(&mut body, client_id.as_bytes());
    packet(0x10, &body)
}

/// A well-formed clean-start CONNECT.
pub fn connect(v: V, client_id: &str) -> Vec<u8> {
    connect_raw(b"MQTT", level(v), 0x02, client_id)
}

pub fn level(v: V) -> u8 {
    match v {
        V::V3 => 4,
        V::V5 => 5,
    }
}

/// PUBLISH with `byte1` given verbatim (so tests can set any flags); `props` is the v5
/// property block content (its length is added here), ignored for 3.1.1.
pub fn publish_byte1(
    v: V,
    byte1: u8,
    topic: &[u8],
    pkid: Option<u16>,
    props: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, topic);
    if let Some(id) = pkid {
        body.extend_from_slice(&id.to_be_bytes());
    }
    if v == V::V5 {
        put_var_int(&mut body, props.len());
        body.extend_from_slice(props);
    }
    body.extend_from_slice(payload);
    packet(byte1, &body)
}

pub fn publish(v: V, topic: &[u8], qos: u8, pkid: u16, props: &[u8], payload: &[u8]) -> Vec<u8> {
    let id = (qos > 0).then_some(pkid);
    publish_byte1(v, 0x30 | (qos << 1), topic, id, props, payload)
}

/// SUBSCRIBE (`byte1` verbatim) to one filter with the given options byte.
pub fn subscribe_byte1(v: V, byte1: u8, pkid: u16, filter: &[u8], options: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v == V::V5 {
        body.push(0);
    }
    put_str(&mut body, filter);
    body.push(options);
    packet(byte1, &body)
}

pub fn subscribe(v: V, pkid: u16, filter: &[u8], qos: u8) -> Vec<u8> {
    subscribe_byte1(v, 0x82, pkid, filter, qos)
}

// ---------------------------------------------------------------- decoding

/// Splits a byte stream into complete packets (each with its fixed header); any
/// incomplete tail is returned separately.
pub fn split_packets(mut bytes: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut packets = Vec::new();
    while let Some((hlen, rlen)) = frame_len(bytes) {
        if bytes.len() < hlen + rlen {
            break;
        }
        packets.push(bytes[..hlen + rlen].to_vec());
        bytes = &bytes[hlen + rlen..];
    }
    (packets, bytes.to_vec())
}

/// (fixed header length, remaining length) if the fixed header is complete and valid.
pub fn frame_len(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut rlen = 0usize;
    for i in 1..5 {
        let b = *bytes.get(i)?;
        rlen |= ((b & 0x7F) as usize) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Some((i + 1, rlen));
        }
    }
    None
}

/// The body of a complete packet (after its fixed header).
pub fn body(packet: &[u8]) -> &[u8] {
    let (hlen, _) = frame_len(packet).expect("complete packet");
    &packet[hlen..]
}

fn read_var_int(b: &[u8]) -> Option<(usize, usize)> {
    let mut v = 0usize;
    for i in 0..4 {
        let x = *b.get(i)?;
        v |= ((x & 0x7F) as usize) << (7 * i);
        if x & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// A v5 property value as raw bytes, looked up in a property block (without its length).
pub fn find_property(mut props: &[u8], id: u8) -> Option<Vec<u8>> {
    while let Some((&pid, rest)) = props.split_first() {
        let len = match pid {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            0x0B => read_var_int(rest)?.1,
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
                2 + u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize
            }
            0x26 => {
                let k = 2 + u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
                let v = 2 + u16::from_be_bytes([*rest.get(k)?, *rest.get(k + 1)?]) as usize;
                k + v
            }
            _ => return None,
        };
        let value = rest.get(..len)?;
        if pid == id {
            return Some(value.to_vec());
        }
        props = &rest[len..];
    }
    None
}

/// The property block (content only) of a v5 CONNACK.
pub fn connack_properties(connack: &[u8]) -> Vec<u8> {
    let b = body(connack);
    let (len, n) = read_var_int(&b[2..]).expect("CONNACK property length");
    b[2 + n..2 + n + len].to_vec()
}

/// A u16 property of a v5 CONNACK, if present.
pub fn connack_u16(connack: &[u8], id: u8) -> Option<u16> {
    find_property(&connack_properties(connack), id).map(|v| u16::from_be_bytes([v[0], v[1]]))
}

// ---------------------------------------------------------------- connection

/// How the peer's side of a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Orderly close: read returned 0.
    Eof,
    /// Connection reset (RST).
    Reset,
    /// Still open when the deadline passed.
    Timeout,
    Error(String),
}

pub struct Raw {
    pub stream: TcpStream,
    pub v: V,
    buf: Vec<u8>,
}

impl Raw {
    /// A TCP connection with no MQTT traffic yet.
    pub fn open(addr: SocketAddr, v: V) -> Raw {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect to mqttd");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_write_timeout(Some(TIMEOUT))
            .expect("write timeout");
        Raw {
            stream,
            v,
            buf: Vec::new(),
        }
    }

    /// Wraps an already connected stream.
    pub fn from_stream(stream: TcpStream, v: V) -> Raw {
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_write_timeout(Some(TIMEOUT))
            .expect("write timeout");
        Raw {
            stream,
            v,
            buf: Vec::new(),
        }
    }

    /// Opens, sends a clean-start CONNECT and checks the CONNACK is a success; returns it too.
    pub fn connect(addr: SocketAddr, v: V, client_id: &str) -> (Raw, Vec<u8>) {
        let mut raw = Raw::open(addr, v);
        raw.send(&connect(v, client_id));
        let connack = raw
            .read_packet()
            .unwrap_or_else(|e| panic!("reading CONNACK: {e}"))
            .expect("CONNACK, got EOF");
        let ok = match v {
            V::V3 => connack == [0x20, 0x02, 0x00, 0x00],
            V::V5 => connack[0] == 0x20 && body(&connack)[1] == 0x00,
        };
        assert!(ok, "CONNECT refused: {}", hex(&connack));
        (raw, connack)
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to mqttd");
    }

    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends and ignores errors (the broker may already have closed).
    pub fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Reads more bytes into the buffer before `deadline`. Ok(0): EOF.
    fn fill(&mut self, deadline: Instant) -> io::Result<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next complete packet (fixed header included). Ok(None): EOF at a packet
    /// boundary; errors on timeout, reset or EOF inside a packet.
    pub fn read_packet(&mut self) -> io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some((hlen, rlen)) = frame_len(&self.buf) {
                if self.buf.len() >= hlen + rlen {
                    return Ok(Some(self.buf.drain(..hlen + rlen).collect()));
                }
            }
            if self.fill(deadline)? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF inside a packet: {}", hex(&self.buf)),
                ));
            }
        }
    }

    /// Everything the broker sends until it closes (or [`TIMEOUT`] passes), and how it ended.
    pub fn read_until_close(&mut self) -> (Vec<u8>, End) {
        let deadline = Instant::now() + TIMEOUT;
        let end = loop {
            match self.fill(deadline) {
                Ok(0) => break End::Eof,
                Ok(_) => {}
                Err(e) => {
                    break match e.kind() {
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
                            End::Reset
                        }
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => End::Timeout,
                        _ => End::Error(e.to_string()),
                    }
                }
            }
        };
        (std::mem::take(&mut self.buf), end)
    }
}
