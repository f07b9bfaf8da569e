//! MQTT over QUIC figures, next to the same measurement over TCP.
//!
//! * `quic-conns` — open N QUIC sessions (handshake, control stream, CONNECT/CONNACK) with
//!   C in flight, hold them, and report handshakes/s, handshakes per broker CPU-second
//!   (the per-core figure, independent of how many cores the client took) and the broker's
//!   RSS growth per idle connection.
//! * `quic-pairs` — N publisher → subscriber pairs on distinct topics, QoS 0, over QUIC or
//!   (`--transport tcp`) TCP with the very same client code: msgs/s and publish → deliver
//!   latency percentiles. A publisher stays at most `--max-lead` messages ahead of its
//!   subscriber, so latency measures the broker rather than queue depth.
//!
//! The QUIC client is `mqttd_bench::quic_client` (quinn); connections are spread over
//! `--endpoints` client UDP sockets.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Buf, BufMut, BytesMut};
use hdrhistogram::Histogram;
use mqttd_bench::quic_client::{self, QuicConn};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::procfs;
use crate::report::{human_bytes, Latency};
use crate::scenarios::resolve;
use crate::wire::{self, Protocol};

#[derive(clap::Args, Debug, Clone)]
pub struct QuicConnsArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The broker's QUIC (UDP) port.
    #[arg(long, default_value_t = 14567)]
    pub port: u16,
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Handshakes in flight.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Client UDP sockets the connections are spread over.
    #[arg(long, default_value_t = 8)]
    pub endpoints: usize,
    /// Seconds to hold the connections (after the RSS sample).
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
    /// Broker PID: CPU and RSS of it and its descendants from /proc.
    #[arg(long)]
    pub broker_pid: Option<u32>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairsTransport {
    Quic,
    Tcp,
}

#[derive(clap::Args, Debug, Clone)]
pub struct QuicPairsArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The broker's QUIC port (`--transport quic`) or TCP port (`--transport tcp`).
    #[arg(long)]
    pub port: u16,
    #[arg(long, value_enum, default_value_t = PairsTransport::Quic)]
    pub transport: PairsTransport,
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Payload bytes (>= 16: send time and sequence number).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Messages a publisher may be ahead of its subscriber.
    #[arg(long, default_value_t = 1000)]
    pub max_lead: u64,
    /// Client runtime threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[arg(long)]
    pub broker_pid: Option<u32>,
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?)
}

fn endpoints(n: usize, target: SocketAddr) -> Result<Vec<quinn::Endpoint>> {
    let ip: IpAddr = if target.is_ipv4() {
        [0, 0, 0, 0].into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    (0..n.max(1)).map(|_| quic_client::endpoint(ip)).collect()
}

pub fn run_conns(args: QuicConnsArgs) -> Result<()> {
    let addr = resolve(&args.host, args.port)?;
    let rt = runtime(2)?;
    rt.block_on(async move {
        let endpoints = endpoints(args.endpoints, addr)?;
        let before = args.broker_pid.map(procfs::tree_sample).transpose()?;
        let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(args.count);
        for i in 0..args.count {
            let permit = sem.clone().acquire_owned().await?;
            let endpoint = endpoints[i % endpoints.len()].clone();
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let result = async {
                    let conn = QuicConn::connect(&endpoint, addr).await?;
                    let mut control = conn.open_stream().await?;
                    control
                        .mqtt_connect(&format!("qc-{}-{i}", std::process::id()), true, None)
                        .await?;
                    anyhow::Ok((conn, control))
                }
                .await;
                drop(permit);
                (t0.elapsed(), result)
            }));
        }
        let mut held = Vec::with_capacity(args.count);
        let mut hist = Histogram::<u64>::new(3)?;
        let mut failures = 0usize;
        for task in tasks {
            let (took, result) = task.await?;
            match result {
                Ok(session) => {
                    hist.record(took.as_nanos() as u64)?;
                    held.push(session);
                }
                Err(e) => {
                    if failures == 0 {
                        eprintln!("first failure: {e:#}");
                    }
                    failures += 1;
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let after = args.broker_pid.map(procfs::tree_sample).transpose()?;
        let ok = held.len();
        println!(
            "quic-conns: {ok} sessions in {elapsed:.2} s = {:.0} handshakes/s (CONNECT→CONNACK incl.), {failures} failed",
            ok as f64 / elapsed
        );
        println!("  latency    {}", Latency::from_nanos(&hist).row());
        let mut json = serde_json::json!({
            "scenario": "quic-conns", "sessions": ok, "failed": failures,
            "seconds": elapsed, "per_sec": ok as f64 / elapsed,
            "p50_ms": hist.value_at_quantile(0.5) as f64 / 1e6,
            "p99_ms": hist.value_at_quantile(0.99) as f64 / 1e6,
        });
        if let (Some(pid), Some(b), Some(a)) = (args.broker_pid, before, after) {
            let cpu = a.cpu_s - b.cpu_s;
            println!(
                "  broker CPU {cpu:.2} s = {:.0} handshakes per broker CPU-second",
                ok as f64 / cpu
            );
            // Let allocations settle before the RSS sample (quinn frees handshake state
            // over the next ticks).
            tokio::time::sleep(Duration::from_secs(3)).await;
            let settled = procfs::tree_sample(pid)?;
            let per = settled.rss_bytes.saturating_sub(b.rss_bytes) as f64 / ok.max(1) as f64;
            println!(
                "  broker RSS {} → {} = {:.0} B per idle QUIC connection; fds {} → {}",
                human_bytes(b.rss_bytes),
                human_bytes(settled.rss_bytes),
                per,
                b.fds,
                settled.fds
            );
            json["broker_cpu_s"] = cpu.into();
            json["per_broker_cpu_s"] = (ok as f64 / cpu).into();
            json["rss_per_conn_bytes"] = per.into();
        }
        println!("{json}");
        if args.hold > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
        }
        for (conn, _) in &held {
            conn.abort();
        }
        for e in &endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
        }
        anyhow::Ok(())
    })
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// Connects one MQTT 3.1.1 session over the chosen transport.
async fn session(
    transport: PairsTransport,
    addr: SocketAddr,
    endpoint: Option<&quinn::Endpoint>,
    id: &str,
) -> Result<(Reader, Writer, Option<QuicConn>)> {
    let (mut r, mut w, conn): (Reader, Writer, _) = match transport {
        PairsTransport::Tcp => {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w), None)
        }
        PairsTransport::Quic => {
            let conn = QuicConn::connect(endpoint.context("endpoint")?, addr).await?;
            let (send, recv) = conn.conn.open_bi().await?;
            (Box::new(recv), Box::new(send), Some(conn))
        }
    };
    let mut out = BytesMut::new();
    wire::encode_connect(&mut out, Protocol::V4, id, 60);
    w.write_all(&out).await?;
    let mut buf = BytesMut::new();
    let (header, _) = read_frame(&mut r, &mut buf).await?;
    if header >> 4 != wire::CONNACK {
        bail!("expected CONNACK");
    }
    Ok((r, w, conn))
}

async fn read_frame(r: &mut Reader, buf: &mut BytesMut) -> Result<(u8, BytesMut)> {
    loop {
        if let Some(f) = wire::split_frame(buf, 1 << 20)? {
            let frame = buf.split_to(f.frame_len);
            let mut body = frame;
            body.advance(f.body_start);
            return Ok((f.header, body));
        }
        buf.reserve(4096);
        if r.read_buf(buf).await? == 0 {
            bail!("connection closed");
        }
    }
}

pub fn run_pairs(args: QuicPairsArgs) -> Result<()> {
    if args.payload < 16 {
        bail!("--payload must be at least 16");
    }
    let addr = resolve(&args.host, args.port)?;
    let rt = runtime(args.threads)?;
    rt.block_on(async move {
        let endpoints = match args.transport {
            PairsTransport::Quic => endpoints(8, addr)?,
            PairsTransport::Tcp => Vec::new(),
        };
        let epoch = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let measuring = Arc::new(AtomicBool::new(false));
        let mut subs = Vec::new();
        let mut pubs = Vec::new();
        let mut conns = Vec::new();
        let mut ready = Vec::new();
        for i in 0..args.pairs {
            let topic = format!("qbench/{}/{i}", std::process::id());
            let ep = endpoints.get(i % endpoints.len().max(1));
            let (mut sr, mut sw, sc) = session(
                args.transport,
                addr,
                ep,
                &format!("qbs-{}-{i}", std::process::id()),
            )
            .await?;
            let mut out = BytesMut::new();
            wire::encode_subscribe(&mut out, Protocol::V4, 1, &topic, 0);
            sw.write_all(&out).await?;
            let mut buf = BytesMut::new();
            let (header, _) = read_frame(&mut sr, &mut buf).await?;
            if header >> 4 != wire::SUBACK {
                bail!("expected SUBACK");
            }
            let ep = endpoints.get((i + 1) % endpoints.len().max(1));
            let (_pr, pw, pc) = session(
                args.transport,
                addr,
                ep,
                &format!("qbp-{}-{i}", std::process::id()),
            )
            .await?;
            conns.extend(sc);
            conns.extend(pc);
            ready.push((sr, buf, sw, pw, topic));
        }
        // Traffic starts once every pair is connected: publishers flooding a busy broker
        // would otherwise starve the handshakes of the pairs still connecting.
        for (sr, buf, sw, pw, topic) in ready {
            let received = Arc::new(AtomicU64::new(0));
            let notify = Arc::new(tokio::sync::Notify::new());
            subs.push(tokio::spawn(subscriber(
                sr,
                buf,
                sw,
                received.clone(),
                notify.clone(),
                stop.clone(),
                measuring.clone(),
                epoch,
            )));
            pubs.push(tokio::spawn(publisher(
                pw,
                topic,
                args.payload,
                args.max_lead,
                received,
                notify,
                stop.clone(),
                epoch,
            )));
        }
        tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
        let cpu_before = args.broker_pid.map(procfs::tree_sample).transpose()?;
        measuring.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
        measuring.store(false, Ordering::Relaxed);
        let measured = t0.elapsed().as_secs_f64();
        let cpu_after = args.broker_pid.map(procfs::tree_sample).transpose()?;
        stop.store(true, Ordering::Relaxed);
        let mut hist = Histogram::<u64>::new(3)?;
        let mut count = 0u64;
        for s in subs {
            if let Ok((n, h)) = s.await {
                count += n;
                hist.add(h)?;
            }
        }
        for p in pubs {
            p.abort();
        }
        let rate = count as f64 / measured;
        let transport = format!("{:?}", args.transport).to_lowercase();
        println!(
            "quic-pairs ({transport}): {} pairs, {}-byte QoS 0: {rate:.0} msgs/s delivered",
            args.pairs, args.payload
        );
        println!("  latency    {}", Latency::from_nanos(&hist).row());
        let mut json = serde_json::json!({
            "scenario": "quic-pairs", "transport": transport, "pairs": args.pairs,
            "payload": args.payload, "msgs_per_sec": rate,
            "p50_us": hist.value_at_quantile(0.5) as f64 / 1e3,
            "p99_us": hist.value_at_quantile(0.99) as f64 / 1e3,
        });
        if let (Some(b), Some(a)) = (cpu_before, cpu_after) {
            let cpu = (a.cpu_s - b.cpu_s) / measured;
            println!("  broker CPU {:.0}% of one core", cpu * 100.0);
            json["broker_cores"] = cpu.into();
        }
        println!("{json}");
        for c in &conns {
            c.abort();
        }
        anyhow::Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
async fn subscriber(
    mut r: Reader,
    mut buf: BytesMut,
    _w: Writer,
    received: Arc<AtomicU64>,
    notify: Arc<tokio::sync::Notify>,
    stop: Arc<AtomicBool>,
    measuring: Arc<AtomicBool>,
    epoch: Instant,
) -> (u64, Histogram<u64>) {
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let mut count = 0u64;
    let mut seen = 0u64;
    while !stop.load(Ordering::Relaxed) {
        while let Ok(Some(f)) = wire::split_frame(&buf, 1 << 20) {
            if f.packet_type() == wire::PUBLISH {
                if let Ok(p) = wire::decode_publish(Protocol::V4, f.header, f.body(&buf)) {
                    seen += 1;
                    if measuring.load(Ordering::Relaxed) && p.payload.len() >= 16 {
                        let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
                        let now = epoch.elapsed().as_nanos() as u64;
                        let _ = hist.record(now.saturating_sub(sent).max(1));
                        count += 1;
                    }
                }
            }
            buf.advance(f.frame_len);
        }
        received.store(seen, Ordering::Relaxed);
        notify.notify_one();
        buf.reserve(64 * 1024);
        // Bounded, so the task sees `stop` even when no more messages come.
        match tokio::time::timeout(Duration::from_millis(50), r.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    (count, hist)
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    mut w: Writer,
    topic: String,
    payload: usize,
    max_lead: u64,
    received: Arc<AtomicU64>,
    notify: Arc<tokio::sync::Notify>,
    stop: Arc<AtomicBool>,
    epoch: Instant,
) -> Result<()> {
    let mut seq = 0u64;
    let mut out = BytesMut::with_capacity(64 * 1024);
    while !stop.load(Ordering::Relaxed) {
        let lead = seq.saturating_sub(received.load(Ordering::Relaxed));
        if lead >= max_lead {
            let _ = tokio::time::timeout(Duration::from_millis(5), notify.notified()).await;
            continue;
        }
        let batch = (max_lead - lead).min(32);
        for _ in 0..batch {
            wire::encode_publish_header(&mut out, Protocol::V4, topic.as_bytes(), 0, 0, payload);
            out.put_u64(epoch.elapsed().as_nanos() as u64);
            out.put_u64(seq);
            out.put_bytes(0, payload - 16);
            seq += 1;
        }
        w.write_all(&out).await?;
        out.clear();
    }
    Ok(())
}
