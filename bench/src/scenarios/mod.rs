//! Load scenarios plus the small connection toolkit they share: a reusable
//! read buffer with a frame cursor, and the CONNECT/CONNACK and
//! SUBSCRIBE/SUBACK handshakes done over a raw non-blocking socket.

pub mod idle;
pub mod pubsub;

use crate::wire::{self, Protocol};
use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Largest frame we accept from the broker.
pub const MAX_FRAME: usize = 1 << 20;

/// Fixed-capacity read buffer: bytes live in `buf[start..end]`; frames are
/// parsed in place and the cursor advanced, so reading allocates nothing.
pub struct ReadBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    pub fn new(cap: usize) -> Self {
        ReadBuf {
            buf: vec![0u8; cap].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Unparsed bytes.
    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    #[inline]
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Free space to read into, compacting (or growing for a huge frame) first.
    #[inline]
    pub fn spare(&mut self) -> &mut [u8] {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let mut bigger = vec![0u8; self.buf.len() * 2].into_boxed_slice();
                bigger[..self.end].copy_from_slice(&self.buf[..self.end]);
                self.buf = bigger;
            }
        }
        &mut self.buf[self.end..]
    }

    #[inline]
    pub fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// Non-blocking read from the socket; Ok(false) = would block.
    #[inline]
    pub fn try_read_from(&mut self, s: &TcpStream) -> Result<bool> {
        match s.try_read(self.spare()) {
            Ok(0) => bail!("connection closed by broker"),
            Ok(n) => {
                self.filled(n);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn read_more(&mut self, s: &mut TcpStream) -> Result<()> {
        let n = s.read(self.spare()).await?;
        if n == 0 {
            bail!("connection closed by broker");
        }
        self.filled(n);
        Ok(())
    }
}

/// Open a TCP connection, optionally from a specific source address.
pub async fn tcp_connect(addr: SocketAddr, bind: Option<IpAddr>) -> Result<TcpStream> {
    let stream = match bind {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let sock = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            // Port 0: the kernel picks a free port on that source address.
            sock.bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("bind {ip}"))?;
            sock.connect(addr).await?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Wait for one complete frame and return (header, body copy range) —
/// only used during handshakes, where a little copying does not matter.
async fn next_frame(s: &mut TcpStream, rb: &mut ReadBuf) -> Result<(u8, Vec<u8>)> {
    loop {
        if let Some(f) = wire::split_frame(rb.data(), MAX_FRAME)? {
            let out = (f.header, f.body(rb.data()).to_vec());
            rb.consume(f.frame_len);
            return Ok(out);
        }
        rb.read_more(s).await?;
    }
}

/// Send CONNECT and wait for a successful CONNACK. Returns the server's v5
/// Receive Maximum if it sent one.
pub async fn mqtt_connect(
    s: &mut TcpStream,
    rb: &mut ReadBuf,
    proto: Protocol,
    client_id: &str,
    keep_alive: u16,
) -> Result<Option<u16>> {
    let mut out = BytesMut::with_capacity(64);
    wire::encode_connect(&mut out, proto, client_id, keep_alive);
    s.write_all(&out).await?;
    let (header, body) = next_frame(s, rb).await?;
    if header >> 4 != wire::CONNACK {
        bail!("expected CONNACK, got packet type {}", header >> 4);
    }
    let ack = wire::decode_connack(proto, &body)?;
    if ack.code != 0 {
        let why = match (proto, ack.code) {
            // A 3.1.1-only broker answers a v5 CONNECT with the v4 code 1.
            (_, 1) | (Protocol::V5, 0x84) => {
                " (unacceptable protocol version: does the broker speak this MQTT level?)"
            }
            (Protocol::V4, 2) | (Protocol::V5, 0x85) => " (client identifier rejected)",
            (Protocol::V4, 3) | (Protocol::V5, 0x88) => " (server unavailable)",
            (Protocol::V4, 5) | (Protocol::V5, 0x87) => " (not authorized)",
            _ => "",
        };
        bail!("CONNACK refused with code {:#x}{why}", ack.code);
    }
    Ok(ack.receive_maximum)
}

/// Subscribe to one filter and wait for a successful SUBACK.
pub async fn mqtt_subscribe(
    s: &mut TcpStream,
    rb: &mut ReadBuf,
    proto: Protocol,
    filter: &str,
    qos: u8,
) -> Result<()> {
    let mut out = BytesMut::with_capacity(64);
    wire::encode_subscribe(&mut out, proto, 1, filter, qos);
    s.write_all(&out).await?;
    loop {
        let (header, body) = next_frame(s, rb).await?;
        if header >> 4 != wire::SUBACK {
            continue; // e.g. a retained PUBLISH racing the SUBACK
        }
        let (_, code) = wire::decode_suback(proto, &body)?;
        if code >= 0x80 {
            bail!("SUBACK for {filter} refused with code {code:#x}");
        }
        return Ok(());
    }
}

/// Resolve host:port (IPv4/IPv6 literal or name) to one socket address.
pub fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()?
        .next()
        .with_context(|| format!("cannot resolve {host}"))
}
