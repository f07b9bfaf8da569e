//! `mqttd-bench proxy`: a client-side transport proxy, so the TCP-only scenarios (`pairs`,
//! `fanin`, ...) can measure a broker over TLS, WebSocket or WebSocket over TLS unchanged.
//!
//! ```text
//! mqttd-bench pairs --port P  --TCP-->  proxy --listen 127.0.0.1:P  --tls|ws|wss|tcp-->  broker
//! ```
//!
//! Each accepted connection gets one upstream connection and one task that moves bytes both
//! ways until either side closes. `tcp` is a plain copy, so a run through it gives the proxy's
//! own cost, to subtract from the TLS and WebSocket runs.
//!
//! `--preconnect N` opens N upstream connections (TCP, TLS handshake, WebSocket upgrade) all
//! at once before listening, and hands them to the first N clients. The scenarios connect
//! their clients one after the other, so a broker that is slow to answer a handshake makes
//! the set-up slow: Mosquitto 2.0 answers a WebSocket upgrade only when its main loop next
//! wakes, up to 200 ms on an idle broker, which is 40 s for `pairs --pairs 100`.
//!
//! The proxy shares the machine with the broker while it is measured, so it keeps its cost
//! down: one task per connection (both directions polled by it, no channel between tasks on
//! the data path), 64 KiB reads, one write per read (for WebSocket: one frame per read, not
//! per MQTT packet; incoming frames are unwrapped in place and their payloads written with
//! one write per read), no allocation per read. The WebSocket pieces are in [`ws`].

mod ws;

use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

/// Read size per direction. MQTT packets in a throughput run are small, so a read usually
/// holds many: large reads mean few syscalls, TLS records and WebSocket frames.
const BUF: usize = 64 * 1024;

/// Connection errors printed on stderr; later ones are only counted.
const MAX_ERRORS_SHOWN: usize = 20;

#[derive(clap::Args, Debug)]
pub struct ProxyArgs {
    /// Where the load generator connects (plain MQTT over TCP).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The broker's listener for --transport, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    to: String,
    /// How to reach the broker.
    #[arg(long, value_enum)]
    transport: Upstream,
    /// PEM file with the CA certificate(s) to trust (tls, wss); for mqttd's self-signed
    /// certificate, the certificate itself.
    #[arg(long)]
    cafile: Option<PathBuf>,
    /// TLS server name (SNI, and the name the certificate must carry).
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// HTTP path of the WebSocket upgrade (ws, wss).
    #[arg(long, default_value = "/mqtt")]
    path: String,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Upstream connections to open (concurrently) before listening, for the first clients.
    #[arg(long, default_value_t = 0)]
    preconnect: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// Plain TCP: a byte copy (the proxy's own cost).
    Tcp,
    /// MQTT over TLS (ALPN `mqtt`).
    Tls,
    /// MQTT over WebSocket (subprotocol `mqtt`).
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

/// How to reach the broker, ready for each connection.
enum Via {
    Tcp,
    Tls(TlsConnector, ServerName<'static>),
    Ws,
    Wss(TlsConnector, ServerName<'static>),
}

struct Target {
    addr: SocketAddr,
    via: Via,
    /// The `Host` header of the upgrade request: `--to` as given.
    host: String,
    path: String,
}

pub fn run(args: ProxyArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: ProxyArgs) -> Result<()> {
    let addr = tokio::net::lookup_host(&args.to)
        .await
        .with_context(|| format!("resolving {}", args.to))?
        .next()
        .with_context(|| format!("{} resolves to no address", args.to))?;
    let tls = |alpn: &[u8]| -> Result<(TlsConnector, ServerName<'static>)> {
        let name = ServerName::try_from(args.server_name.clone())
            .with_context(|| format!("--server-name {:?}", args.server_name))?;
        Ok((tls_connector(args.cafile.as_deref(), alpn)?, name))
    };
    let via = match args.transport {
        Upstream::Tcp => Via::Tcp,
        Upstream::Tls => {
            let (c, name) = tls(b"mqtt")?;
            Via::Tls(c, name)
        }
        Upstream::Ws => Via::Ws,
        // What a browser offers: the WebSocket upgrade is HTTP/1.1.
        Upstream::Wss => {
            let (c, name) = tls(b"http/1.1")?;
            Via::Wss(c, name)
        }
    };
    let target = Arc::new(Target {
        addr,
        via,
        host: args.to.clone(),
        path: args.path.clone(),
    });
    let pool = preconnect(&target, args.preconnect).await?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "proxy listening {}", listener.local_addr()?)?;
        out.flush()?;
    }
    let errors = Arc::new(Errors::default());
    loop {
        let plain = match listener.accept().await {
            Ok((plain, _)) => plain,
            Err(e) => {
                // Out of fds, most likely: back off rather than spin.
                eprintln!("proxy: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ready = pool.lock().ok().and_then(|mut p| p.pop());
        let (target, errors) = (target.clone(), errors.clone());
        tokio::spawn(async move {
            let result = match ready {
                Some(up) => relay(plain, up).await,
                None => match open(&target).await {
                    Ok(up) => relay(plain, up).await,
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = result {
                errors.report(&e);
            }
        });
    }
}

/// Connection errors, printed on stderr up to a limit.
#[derive(Default)]
struct Errors {
    shown: AtomicUsize,
    missing_close_notify: AtomicBool,
}

impl Errors {
    fn report(&self, e: &io::Error) {
        // tokio-rustls's error for a TLS peer that closes TCP without close_notify: seen at
        // the end of every connection when the broker does not send one. Data up to there was
        // relayed, so this is noted once rather than for every connection.
        if e.kind() == io::ErrorKind::UnexpectedEof {
            if !self.missing_close_notify.swap(true, Ordering::Relaxed) {
                eprintln!("proxy: {e} (noted once, later ones not shown)");
            }
            return;
        }
        let n = self.shown.fetch_add(1, Ordering::Relaxed);
        if n < MAX_ERRORS_SHOWN {
            eprintln!("proxy: connection error: {e}");
        } else if n == MAX_ERRORS_SHOWN {
            eprintln!("proxy: more connection errors, not shown");
        }
    }
}

/// A TLS client configuration (ring) trusting the certificates in `cafile`.
fn tls_connector(cafile: Option<&std::path::Path>, alpn: &[u8]) -> Result<TlsConnector> {
    let cafile = cafile.context("--cafile is required for --transport tls and wss")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cafile)
        .with_context(|| format!("reading {}", cafile.display()))?
    {
        roots
            .add(cert.with_context(|| format!("parsing {}", cafile.display()))?)
            .context("adding a trusted certificate")?;
    }
    if roots.is_empty() {
        anyhow::bail!("{} holds no certificate", cafile.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// An upstream connection ready to carry MQTT: connected, TLS and WebSocket handshakes done.
struct Ready {
    stream: Stream,
    /// WebSocket only: the read buffer for the server's frames, with the bytes that came
    /// right after the 101 response at its start, and their count.
    ws: Option<(Box<[u8]>, usize)>,
}

enum Stream {
    Tcp(TcpStream),
    /// Boxed: rustls's connection state is over 1 KB.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Opens one upstream connection and does its handshakes.
async fn open(t: &Target) -> io::Result<Ready> {
    let tcp = TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    let stream = match &t.via {
        Via::Tcp | Via::Ws => Stream::Tcp(tcp),
        Via::Tls(connector, name) | Via::Wss(connector, name) => {
            Stream::Tls(Box::new(connector.connect(name.clone(), tcp).await?))
        }
    };
    if !matches!(t.via, Via::Ws | Via::Wss(..)) {
        return Ok(Ready { stream, ws: None });
    }
    let mut buf = vec![0u8; BUF].into_boxed_slice();
    let (stream, early) = match stream {
        Stream::Tcp(mut s) => {
            let early = ws::handshake(&mut s, &t.host, &t.path, &mut buf).await?;
            (Stream::Tcp(s), early)
        }
        Stream::Tls(mut s) => {
            let early = ws::handshake(&mut *s, &t.host, &t.path, &mut buf).await?;
            (Stream::Tls(s), early)
        }
    };
    Ok(Ready {
        stream,
        ws: Some((buf, early)),
    })
}

/// Opens `n` upstream connections concurrently, for the first `n` clients.
async fn preconnect(t: &Arc<Target>, n: usize) -> Result<std::sync::Mutex<Vec<Ready>>> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let t = t.clone();
        tasks.spawn(async move { open(&t).await });
    }
    let mut pool = Vec::with_capacity(n);
    while let Some(ready) = tasks.join_next().await {
        pool.push(ready?.context("--preconnect")?);
    }
    Ok(std::sync::Mutex::new(pool))
}

/// One accepted connection: move bytes until either side closes.
async fn relay(plain: TcpStream, up: Ready) -> io::Result<()> {
    plain.set_nodelay(true)?;
    match (up.stream, up.ws) {
        (Stream::Tcp(s), None) => copy(plain, s).await,
        (Stream::Tls(s), None) => copy(plain, *s).await,
        (Stream::Tcp(s), Some((buf, early))) => ws_relay(plain, s, buf, early).await,
        (Stream::Tls(s), Some((buf, early))) => ws_relay(plain, *s, buf, early).await,
    }
}

/// Byte copy both ways. tokio's copy flushes only when a read would block, so a TLS record
/// carries everything one read returned (and more when reads come quickly).
async fn copy<S: AsyncRead + AsyncWrite + Unpin>(
    mut plain: TcpStream,
    mut up: S,
) -> io::Result<()> {
    tokio::io::copy_bidirectional_with_sizes(&mut plain, &mut up, BUF, BUF)
        .await
        .map(|_| ())
}

/// A Ping's payload (up to 125 bytes) and its length, for the direction that writes.
type Ping = ([u8; 125], u8);

/// Why a WebSocket relay ended.
enum End {
    /// The load generator closed its connection: send Close 1000.
    PlainClosed,
    /// The server sent Close with this code: echo it.
    ServerClosed(u16),
    /// The server's TCP (or TLS) stream ended without a Close frame.
    ServerGone,
}

/// WebSocket both ways over `up` (TCP or TLS), after the upgrade; `down_buf[..early]` holds
/// frames that arrived with the 101.
async fn ws_relay<S: AsyncRead + AsyncWrite + Unpin>(
    mut plain: TcpStream,
    up: S,
    mut down_buf: Box<[u8]>,
    early: usize,
) -> io::Result<()> {
    let mut up_buf = vec![0u8; ws::MAX_HEADER + BUF].into_boxed_slice();
    let mut rng = ws::MaskRng::new();
    let (mut up_read, mut up_write) = tokio::io::split(up);
    let (mut plain_read, mut plain_write) = plain.split();
    // Pongs must go out on the upstream writer, which the other direction drives.
    let (ping_tx, mut ping_rx) = mpsc::channel::<Ping>(4);
    let end = tokio::select! {
        end = plain_to_ws(&mut plain_read, &mut up_write, &mut up_buf, &mut ping_rx, &mut rng) => end,
        end = ws_to_plain(&mut up_read, &mut plain_write, &mut down_buf, early, &ping_tx) => end,
    }?;
    let close = match end {
        End::PlainClosed => Some(1000),
        // 1005 means "no code": echo a Close without one.
        End::ServerClosed(1005) => None,
        End::ServerClosed(code) => Some(code),
        End::ServerGone => return Ok(()),
    };
    let code = close.map(u16::to_be_bytes);
    // The other side may be gone already; the connection ends either way.
    let _ = send_control(
        &mut up_write,
        ws::OP_CLOSE,
        code.as_ref().map_or(&[], |c| &c[..]),
        &mut rng,
    )
    .await;
    let _ = up_write.shutdown().await;
    Ok(())
}

/// Load generator → broker: one masked binary frame per read.
async fn plain_to_ws<R, W>(
    r: &mut R,
    w: &mut W,
    buf: &mut [u8],
    pings: &mut mpsc::Receiver<Ping>,
    rng: &mut ws::MaskRng,
) -> io::Result<End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        tokio::select! {
            n = r.read(&mut buf[ws::MAX_HEADER..]) => {
                let n = n?;
                if n == 0 {
                    return Ok(End::PlainClosed);
                }
                let start = ws::wrap(buf, n, ws::OP_BINARY, rng.next_mask());
                w.write_all(&buf[start..ws::MAX_HEADER + n]).await?;
                w.flush().await?;
            }
            Some((payload, len)) = pings.recv() => {
                send_control(w, ws::OP_PONG, &payload[..usize::from(len)], rng).await?;
            }
        }
    }
}

/// Broker → load generator: frames unwrapped in place, one write per read. `buf[..early]`
/// holds bytes that arrived with the 101 response.
async fn ws_to_plain<R, W>(
    r: &mut R,
    w: &mut W,
    buf: &mut [u8],
    early: usize,
    pings: &mpsc::Sender<Ping>,
) -> io::Result<End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut deframer = ws::Deframer::default();
    let mut end = early;
    loop {
        loop {
            let d = deframer.decode(&mut buf[..end])?;
            if !d.out.is_empty() {
                w.write_all(&buf[d.out]).await?;
            }
            // Usually nothing is left: only an incomplete header or control frame stays.
            buf.copy_within(d.consumed..end, 0);
            end -= d.consumed;
            match d.control {
                None => break,
                // A full queue means Pongs are pending already: answering the last Ping
                // only is allowed (RFC 6455 §5.5.3).
                Some(ws::Control::Ping(payload, len)) => {
                    let _ = pings.try_send((payload, len));
                }
                Some(ws::Control::Close(code)) => return Ok(End::ServerClosed(code)),
            }
        }
        let n = r.read(&mut buf[end..]).await?;
        if n == 0 {
            return Ok(End::ServerGone);
        }
        end += n;
    }
}

/// Writes one masked control frame (payload at most 125 bytes).
async fn send_control<W: AsyncWrite + Unpin>(
    w: &mut W,
    opcode: u8,
    payload: &[u8],
    rng: &mut ws::MaskRng,
) -> io::Result<()> {
    let mut frame = [0u8; ws::MAX_HEADER + 125];
    frame[ws::MAX_HEADER..ws::MAX_HEADER + payload.len()].copy_from_slice(payload);
    let start = ws::wrap(&mut frame, payload.len(), opcode, rng.next_mask());
    w.write_all(&frame[start..ws::MAX_HEADER + payload.len()])
        .await?;
    w.flush().await
}
