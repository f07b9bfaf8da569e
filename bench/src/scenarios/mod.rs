//! Load scenarios plus the small connection toolkit they share: the options
//! every scenario takes ([`Common`]), the transport seam ([`Transport`]), a
//! reusable read buffer with a frame cursor, the CONNECT/CONNACK and
//! SUBSCRIBE/SUBACK handshakes done over a raw non-blocking socket, failure
//! classification for connect figures, and the `--compare` driver.
//!
//! Scenarios: `conns` (+ its child-process mode, see [`conns`]), `storm`,
//! `pairs`/`fanin`/`fanout` (one engine, [`flows`]), `retained`, and the older
//! `idle`.

pub mod conns;
pub mod flows;
pub mod idle;
pub mod quic;
pub mod retained;
pub mod storm;

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
            Ok(0) => Err(closed().into()),
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
            return Err(closed().into());
        }
        self.filled(n);
        Ok(())
    }
}

/// The broker closed the connection (classified as "reset").
fn closed() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "connection closed by broker",
    )
}

/// Binds `sock` to source address `ip`, leaving the port to `connect`.
///
/// With a plain `bind(ip:0)` the kernel must find a port unused by *any* socket on that
/// address at bind time; once tens of thousands are taken (and more sit in TIME_WAIT from
/// earlier runs) that search slows and SYNs start colliding, which showed up as a
/// multi-second connect tail at 150k connections. `IP_BIND_ADDRESS_NO_PORT` defers the
/// choice to `connect`, which only needs the 4-tuple to be unique.
pub fn bind_source(sock: &TcpSocket, ip: IpAddr) -> Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("IP_BIND_ADDRESS_NO_PORT");
    }
    // Port 0: the kernel picks the port when connecting.
    sock.bind(SocketAddr::new(ip, 0))
        .with_context(|| format!("bind {ip}"))
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
            bind_source(&sock, ip)?;
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
    mqtt_connect_session(s, rb, proto, client_id, keep_alive, true).await
}

/// As [`mqtt_connect`]; `clean` false asks for a persistent session.
pub async fn mqtt_connect_session(
    s: &mut TcpStream,
    rb: &mut ReadBuf,
    proto: Protocol,
    client_id: &str,
    keep_alive: u16,
    clean: bool,
) -> Result<Option<u16>> {
    let mut out = BytesMut::with_capacity(64);
    wire::encode_connect_session(&mut out, proto, client_id, keep_alive, clean);
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
        return Err(ConnackRefused {
            code: ack.code,
            why,
        }
        .into());
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

/// A CONNACK with a non-zero return / reason code.
#[derive(Debug)]
pub struct ConnackRefused {
    pub code: u8,
    pub why: &'static str,
}

impl std::fmt::Display for ConnackRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CONNACK refused with code {:#x}{}", self.code, self.why)
    }
}

impl std::error::Error for ConnackRefused {}

/// Failure reason of a connection attempt, as counted by `conns` / `storm`:
/// `refused` (RST to SYN: nothing listening, backlog full), `reset` (closed
/// or reset after accept), `timeout` (no CONNACK in time), `connack_0xNN`
/// (broker said no), `addr_in_use` / `addr_not_available` (source ports
/// exhausted), `fd_limit`, otherwise `io_<kind>` / `other`.
pub fn classify(e: &anyhow::Error) -> String {
    if let Some(c) = e.downcast_ref::<ConnackRefused>() {
        return format!("connack_{:#04x}", c.code);
    }
    if e.downcast_ref::<tokio::time::error::Elapsed>().is_some() {
        return "timeout".into();
    }
    for cause in e.chain() {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            if io.raw_os_error() == Some(libc::EMFILE) || io.raw_os_error() == Some(libc::ENFILE) {
                return "fd_limit".into();
            }
            return match io.kind() {
                K::ConnectionRefused => "refused".into(),
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                    "reset".into()
                }
                K::TimedOut => "timeout".into(),
                K::AddrInUse => "addr_in_use".into(),
                K::AddrNotAvailable => "addr_not_available".into(),
                k => format!("io_{k:?}").to_lowercase(),
            };
        }
    }
    "other".into()
}

/// How connections reach the broker. Only TCP exists today: the broker has
/// no TLS or QUIC listener yet. New variants plug in here (and in
/// [`Transport::connect`]); the scenarios only call `connect`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Plain MQTT over TCP.
    #[default]
    Tcp,
}

/// A connected byte stream to the broker (today always TCP).
pub type Conn = TcpStream;

impl Transport {
    /// Connect, optionally from a given source address (bound before connect).
    pub async fn connect(self, addr: SocketAddr, bind: Option<IpAddr>) -> Result<Conn> {
        match self {
            Transport::Tcp => tcp_connect(addr, bind).await,
        }
    }
}

/// Options every scenario takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// MQTT protocol level: 4 (3.1.1) or 5 (5.0).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(4..=5))]
    pub protocol: u8,
    /// Transport. Only `tcp` for now: mqttd has no TLS or QUIC listener yet,
    /// so those are not offered (rather than faked).
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    pub transport: Transport,
    /// Broker PID: report CPU, RSS and open fds from /proc, summed over this
    /// process and its descendants (mqttd's supervisor and its workers).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Print only one JSON object on stdout (no table).
    #[arg(long)]
    pub json: bool,
    /// Run the same scenario against a second broker right after, and print
    /// both plus the ratio of the headline figures (A = --host/--port).
    #[arg(long, value_name = "HOST:PORT")]
    pub compare: Option<String>,
    /// PID of the --compare broker, for its /proc figures.
    #[arg(long)]
    pub compare_pid: Option<u32>,
    /// Keep-alive sent in CONNECT (seconds).
    #[arg(long, default_value_t = 600)]
    pub keepalive: u16,
    /// Progress bar on stderr: auto (when stderr is a terminal), always, never.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    Auto,
    Always,
    Never,
}

impl Common {
    pub fn target(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// A progress bar (or a hidden one): length `len`, `msg` prefix.
    pub fn bar(&self, len: u64, what: &str) -> indicatif::ProgressBar {
        use std::io::IsTerminal;
        let show = match self.progress {
            ProgressMode::Always => true,
            ProgressMode::Never => false,
            ProgressMode::Auto => std::io::stderr().is_terminal(),
        };
        if !show {
            return indicatif::ProgressBar::hidden();
        }
        let pb = indicatif::ProgressBar::with_draw_target(
            Some(len),
            indicatif::ProgressDrawTarget::stderr_with_hz(4),
        );
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
            )
            .expect("valid template"),
        );
        pb.set_prefix(what.to_string());
        pb
    }
}

/// Run `f` against the primary target and, with `--compare`, against the
/// second one, then print (table / JSON / comparison).
pub fn run_and_print<R: crate::report::Report>(
    common: &Common,
    mut f: impl FnMut(&Common) -> Result<R>,
) -> Result<()> {
    let a = f(common)?;
    match &common.compare {
        None => crate::report::print_report(&a, common.json),
        Some(hp) => {
            let (host, port) = hp
                .rsplit_once(':')
                .with_context(|| format!("--compare wants HOST:PORT, got {hp:?}"))?;
            let mut second = common.clone();
            second.host = host.trim_matches(['[', ']']).to_string();
            second.port = port.parse().context("--compare port")?;
            second.broker_pid = common.compare_pid;
            second.compare = None;
            let b = f(&second)?;
            crate::report::print_compare(&a, &b, &common.target(), &second.target(), common.json);
        }
    }
    Ok(())
}

/// Sample the broker tree if a pid was given.
pub fn broker_sample(pid: Option<u32>) -> Result<Option<crate::procfs::TreeSample>> {
    pid.map(crate::procfs::tree_sample).transpose()
}

/// Source address for connection `k` when spreading over `n` loopback
/// addresses 127.0.0.1 .. 127.0.0.n (None = let the kernel choose).
pub fn source_addr(target: SocketAddr, n: usize, k: usize) -> Option<IpAddr> {
    (n > 0 && target.ip().is_loopback() && target.is_ipv4())
        .then(|| IpAddr::from([127, 0, 0, (1 + k % n.min(254)) as u8]))
}

/// Payload header every publishing scenario writes: send time (ns since the
/// generator started), per-publisher sequence number, publisher index.
pub const PAYLOAD_HEADER: usize = 20;

pub fn put_payload_header(buf: &mut BytesMut, ts: u64, seq: u64, publisher: u32) {
    use bytes::BufMut;
    buf.put_u64(ts);
    buf.put_u64(seq);
    buf.put_u32(publisher);
}

/// (timestamp, seq, publisher) from a payload written by [`put_payload_header`].
#[inline]
pub fn parse_payload_header(p: &[u8]) -> Option<(u64, u64, u32)> {
    if p.len() < PAYLOAD_HEADER {
        return None;
    }
    Some((
        u64::from_be_bytes(p[0..8].try_into().ok()?),
        u64::from_be_bytes(p[8..16].try_into().ok()?),
        u32::from_be_bytes(p[16..20].try_into().ok()?),
    ))
}

static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Nanoseconds since the generator started (payload timestamps; one process
/// publishes and receives, so one clock).
#[inline]
pub fn nanos_now() -> u64 {
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_header_round_trip() {
        let mut b = BytesMut::new();
        put_payload_header(&mut b, 123_456_789, 42, 7);
        b.extend_from_slice(&[0; 10]);
        assert_eq!(parse_payload_header(&b), Some((123_456_789, 42, 7)));
        assert_eq!(parse_payload_header(&b[..19]), None);
    }

    #[test]
    fn failure_classes() {
        let io = |k| anyhow::Error::from(std::io::Error::from(k));
        use std::io::ErrorKind as K;
        assert_eq!(classify(&io(K::ConnectionRefused)), "refused");
        assert_eq!(classify(&io(K::ConnectionReset)), "reset");
        assert_eq!(classify(&closed().into()), "reset");
        assert_eq!(classify(&io(K::AddrNotAvailable)), "addr_not_available");
        let c: anyhow::Error = ConnackRefused {
            code: 0x87,
            why: "",
        }
        .into();
        assert_eq!(classify(&c.context("connecting")), "connack_0x87");
        assert_eq!(classify(&anyhow::anyhow!("weird")), "other");
    }

    #[test]
    fn source_addresses_only_for_loopback() {
        let lo: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let remote: SocketAddr = "10.0.0.1:1883".parse().unwrap();
        assert_eq!(source_addr(lo, 3, 4), Some(IpAddr::from([127, 0, 0, 2])));
        assert_eq!(source_addr(lo, 0, 4), None);
        assert_eq!(source_addr(remote, 3, 4), None);
    }
}
