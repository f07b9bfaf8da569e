//! `pubsub` scenario: N subscriber connections, each subscribed to its own
//! topic `bench/{i}`, and N publisher connections each publishing to
//! `bench/{i}` as fast as the broker accepts (QoS 0), or keeping a window of
//! unacknowledged publishes (QoS 1). All 2N connections are driven by ONE
//! thread (a tokio current-thread runtime), matching the reference
//! "one-thread load generator, 100 pub/sub pairs, 64 B" measurements.
//!
//! Each payload starts with the send time (u64 nanoseconds since process
//! start, big-endian) followed by a per-publisher sequence number; the
//! subscriber side records end-to-end latency in an HDR histogram and checks
//! ordering. Publishes are encoded straight into a reused per-connection
//! buffer and written in batches; received frames are parsed in place.

use crate::procfs;
use crate::report::{self, PubSubReport};
use crate::scenarios::{mqtt_connect, mqtt_subscribe, resolve, tcp_connect, ReadBuf, MAX_FRAME};
use crate::wire::{self, Protocol};
use anyhow::{bail, Context, Result};
use bytes::{Buf, BufMut, BytesMut};
use hdrhistogram::Histogram;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

#[derive(clap::Args, Debug, Clone)]
pub struct PubSubArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Number of publisher/subscriber pairs (2x this many connections).
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Payload size in bytes (>= 8; the first 8 carry the send timestamp,
    /// the next 8 a sequence number when the payload has room).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// QoS for publishes and subscriptions (0 or 1).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Measured duration in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Warm-up seconds before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// MQTT protocol level: 4 (3.1.1) or 5 (5.0).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(4..=5))]
    pub protocol: u8,
    /// QoS 1: unacknowledged publishes allowed per publisher (clamped to the
    /// broker's v5 Receive Maximum).
    #[arg(long, default_value_t = 64)]
    pub inflight: usize,
    /// Broker PID: report broker CPU per message and RSS from /proc.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Keep-alive sent in CONNECT (subscribers send PINGREQ at half of it).
    #[arg(long, default_value_t = 600)]
    pub keepalive: u16,
    /// Topic prefix; pair i uses `{prefix}/{i}`.
    #[arg(long, default_value = "bench")]
    pub topic_prefix: String,
    /// Max messages a publisher may be ahead of what its subscriber has
    /// received (0 = unlimited, a pure open-loop flood). Without a bound the
    /// kernel socket buffers and the broker's queues absorb seconds of
    /// traffic, so latency figures would only measure queue depth. Needs
    /// --payload >= 16 (sequence number).
    #[arg(long, default_value_t = 0)]
    pub max_lead: u64,
    /// Max seconds to wait after the run for acks and in-flight deliveries.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
}

/// Bytes of queued publishes per publisher before we stop encoding more.
const HIGH_WATER: usize = 64 * 1024;
/// Refill the publisher's write buffer once it drops below this.
const LOW_WATER: usize = 16 * 1024;

static START: OnceLock<Instant> = OnceLock::new();

#[inline]
fn nanos_now() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warmup,
    Measure,
    Drain,
}

struct Stats {
    phase: Cell<Phase>,
    sent_measured: Cell<u64>,
    recv_measured: Cell<u64>,
    published: Cell<u64>,
    acked: Cell<u64>,
    received: Cell<u64>,
    out_of_order: Cell<u64>,
    hist: RefCell<Histogram<u64>>,
}

fn add(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

/// Per pair: the subscriber's next expected sequence number, and a wake-up
/// for a publisher blocked on --max-lead.
struct Pair {
    next_seq: Cell<u64>,
    progress: Notify,
}

struct Cfg {
    max_lead: u64,
    /// QoS 1 window per publisher (unacked publishes).
    window: usize,
    proto: Protocol,
    qos: u8,
    payload: usize,
    keepalive: u16,
}

pub fn run(args: PubSubArgs) -> Result<()> {
    START.get_or_init(Instant::now);
    if args.payload < 8 {
        bail!("--payload must be at least 8 bytes (send timestamp)");
    }
    if args.pairs == 0 || args.inflight == 0 {
        bail!("--pairs and --inflight must be positive");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(&rt, run_async(args))?;
    report.print();
    Ok(())
}

async fn run_async(args: PubSubArgs) -> Result<PubSubReport> {
    let addr = resolve(&args.host, args.port)?;
    let proto = Protocol::from_level(args.protocol)?;
    let stats = Rc::new(Stats {
        phase: Cell::new(Phase::Warmup),
        sent_measured: Cell::new(0),
        recv_measured: Cell::new(0),
        published: Cell::new(0),
        acked: Cell::new(0),
        received: Cell::new(0),
        out_of_order: Cell::new(0),
        hist: RefCell::new(Histogram::new_with_bounds(1, 600_000_000_000, 3)?),
    });
    let pid = std::process::id();

    // Subscribers first, so nothing published is missed.
    let mut subs = Vec::with_capacity(args.pairs);
    for i in 0..args.pairs {
        let mut s = tcp_connect(addr, None)
            .await
            .with_context(|| format!("connecting subscriber {i} to {addr}"))?;
        let mut rb = ReadBuf::new(64 * 1024);
        mqtt_connect(
            &mut s,
            &mut rb,
            proto,
            &format!("mb{pid}-s{i}"),
            args.keepalive,
        )
        .await?;
        let topic = format!("{}/{i}", args.topic_prefix);
        mqtt_subscribe(&mut s, &mut rb, proto, &topic, args.qos).await?;
        subs.push((s, rb));
    }
    let mut pubs = Vec::with_capacity(args.pairs);
    let mut window = args.inflight;
    for i in 0..args.pairs {
        let mut s = tcp_connect(addr, None)
            .await
            .with_context(|| format!("connecting publisher {i} to {addr}"))?;
        let mut rb = ReadBuf::new(16 * 1024);
        let recv_max = mqtt_connect(
            &mut s,
            &mut rb,
            proto,
            &format!("mb{pid}-p{i}"),
            args.keepalive,
        )
        .await?;
        if let Some(m) = recv_max {
            window = window.min(m.max(1) as usize);
        }
        pubs.push((s, rb, format!("{}/{i}", args.topic_prefix).into_bytes()));
    }
    if window < args.inflight && args.qos > 0 {
        eprintln!(
            "note: broker Receive Maximum limits the QoS 1 window to {window} (asked {})",
            args.inflight
        );
    }
    let window = if args.qos > 0 { window } else { 0 };

    let cfg = Rc::new(Cfg {
        max_lead: if args.payload >= 16 { args.max_lead } else { 0 },
        proto,
        qos: args.qos,
        payload: args.payload,
        keepalive: args.keepalive,
        window,
    });
    let (stop_pub_tx, stop_pub_rx) = watch::channel(false);
    let (stop_sub_tx, stop_sub_rx) = watch::channel(false);
    let pairs: Vec<Rc<Pair>> = (0..args.pairs)
        .map(|_| {
            Rc::new(Pair {
                next_seq: Cell::new(0),
                progress: Notify::new(),
            })
        })
        .collect();
    let mut sub_tasks = Vec::new();
    for ((s, rb), pair) in subs.into_iter().zip(&pairs) {
        sub_tasks.push(tokio::task::spawn_local(subscriber(
            s,
            rb,
            pair.clone(),
            cfg.clone(),
            stats.clone(),
            stop_sub_rx.clone(),
        )));
    }
    let mut pub_tasks = Vec::new();
    for ((s, rb, topic), pair) in pubs.into_iter().zip(&pairs) {
        pub_tasks.push(tokio::task::spawn_local(publisher(
            s,
            rb,
            topic,
            pair.clone(),
            cfg.clone(),
            stats.clone(),
            stop_pub_rx.clone(),
        )));
    }

    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let broker_cpu0 = args.broker_pid.map(procfs::cpu_seconds).transpose()?;
    let self_cpu0 = report::self_cpu_seconds();
    let loadavg = report::loadavg_1m();
    stats.phase.set(Phase::Measure);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    stats.phase.set(Phase::Drain);
    let elapsed = t0.elapsed().as_secs_f64();
    let self_cpu = report::self_cpu_seconds() - self_cpu0;
    let broker_cpu = match (args.broker_pid, broker_cpu0) {
        (Some(p), Some(c0)) => Some(procfs::cpu_seconds(p)? - c0),
        _ => None,
    };
    let broker_rss = args.broker_pid.map(procfs::rss_bytes).transpose()?;

    // Drain: stop publishing, wait for acks and in-flight deliveries.
    let _ = stop_pub_tx.send(true);
    let deadline = Instant::now() + Duration::from_secs_f64(args.drain_timeout);
    let mut errors = Vec::new();
    for t in pub_tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => errors.push(format!("publisher: {e:#}")),
            Ok(Err(e)) => errors.push(format!("publisher task: {e}")),
            Err(_) => errors.push("publisher: drain timed out".into()),
        }
    }
    let mut last = (stats.received.get(), Instant::now());
    let mut drain_complete = true;
    while stats.received.get() < stats.published.get() {
        if Instant::now() >= deadline {
            drain_complete = false;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = stats.received.get();
        if r != last.0 {
            last = (r, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(1) {
            break; // no progress for a second: the rest is lost
        }
    }
    let _ = stop_sub_tx.send(true);
    for t in sub_tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("subscriber: {e:#}")),
            Err(e) => errors.push(format!("subscriber task: {e}")),
        }
    }
    if !errors.is_empty() {
        eprintln!("{} connection errors, first: {}", errors.len(), errors[0]);
    }

    let hist = stats.hist.borrow();
    let us = |v: u64| v as f64 / 1000.0;
    let received = stats.recv_measured.get();
    Ok(PubSubReport {
        scenario: "pubsub",
        host: args.host.clone(),
        port: args.port,
        protocol: args.protocol,
        qos: args.qos,
        pairs: args.pairs,
        payload_bytes: args.payload,
        inflight: window,
        max_lead: cfg.max_lead,
        drain_complete,
        warmup_s: args.warmup,
        duration_s: elapsed,
        sent: stats.sent_measured.get(),
        received,
        sent_per_s: stats.sent_measured.get() as f64 / elapsed,
        received_per_s: received as f64 / elapsed,
        latency_p50_us: us(hist.value_at_quantile(0.50)),
        latency_p99_us: us(hist.value_at_quantile(0.99)),
        latency_p999_us: us(hist.value_at_quantile(0.999)),
        latency_max_us: us(hist.max()),
        total_published: stats.published.get(),
        total_acked: stats.acked.get(),
        total_received: stats.received.get(),
        lost: stats.published.get() as i64 - stats.received.get() as i64,
        out_of_order: stats.out_of_order.get(),
        broker_pid: args.broker_pid,
        broker_cpu_s: broker_cpu,
        broker_cpu_util: broker_cpu.map(|c| c / elapsed),
        broker_cpu_us_per_msg: broker_cpu
            .filter(|_| received > 0)
            .map(|c| c * 1e6 / received as f64),
        broker_rss_bytes: broker_rss,
        generator_cpu_s: self_cpu,
        host_loadavg_1m: loadavg,
    })
}

/// Try to write the pending bytes; returns an error only on a real I/O error.
#[inline]
fn flush_some(s: &TcpStream, wb: &mut BytesMut) -> Result<()> {
    while !wb.is_empty() {
        match s.try_write(wb) {
            Ok(n) => wb.advance(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn publisher(
    s: TcpStream,
    mut rb: ReadBuf,
    topic: Vec<u8>,
    pair: Rc<Pair>,
    cfg: Rc<Cfg>,
    stats: Rc<Stats>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let window = cfg.window;
    // QoS 1: top the window up only once a quarter of it is free, so acks
    // arriving one by one do not each cost a write of a single publish.
    let refill_at = (window / 4).max(1);
    let frame = wire::publish_size(cfg.proto, topic.len(), cfg.qos, cfg.payload);
    let mut wb = BytesMut::with_capacity(HIGH_WATER + frame);
    let with_seq = cfg.payload >= 16;
    let pad = cfg.payload - if with_seq { 16 } else { 8 };
    let mut seq: u64 = 0;
    let mut pkid: u16 = 0;
    let mut inflight = 0usize;
    let mut stopping = false;
    loop {
        if !stopping && wb.len() < LOW_WATER {
            let mut n = (HIGH_WATER - wb.len()) / frame;
            if cfg.qos > 0 {
                n = n.min(window - inflight);
                if n < refill_at {
                    n = 0;
                }
            }
            if cfg.max_lead > 0 {
                let lead = seq.saturating_sub(pair.next_seq.get());
                n = n.min(cfg.max_lead.saturating_sub(lead) as usize);
            }
            if n > 0 {
                let ts = nanos_now();
                wb.reserve(n * frame);
                for _ in 0..n {
                    pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
                    wire::encode_publish_header(
                        &mut wb,
                        cfg.proto,
                        &topic,
                        cfg.qos,
                        pkid,
                        cfg.payload,
                    );
                    wb.put_u64(ts);
                    if with_seq {
                        wb.put_u64(seq);
                    }
                    wb.put_bytes(0, pad);
                    seq += 1;
                }
                if cfg.qos > 0 {
                    inflight += n;
                }
                add(&stats.published, n as u64);
                if stats.phase.get() == Phase::Measure {
                    add(&stats.sent_measured, n as u64);
                }
                // Opportunistic write: usually the socket has room.
                flush_some(&s, &mut wb)?;
            }
        }
        if stopping && wb.is_empty() && inflight == 0 {
            return Ok(());
        }
        // Ask for writability while there is something to write or room in
        // the window to encode more (QoS 0: always, until stopping).
        let lead_ok = cfg.max_lead == 0 || seq.saturating_sub(pair.next_seq.get()) < cfg.max_lead;
        let window_ok = cfg.qos == 0 || window - inflight >= refill_at;
        let can_encode = !stopping && window_ok && lead_ok;
        let interest = if wb.is_empty() && !can_encode {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        tokio::select! {
            biased;
            _ = stop.changed(), if !stopping => { stopping = true; }
            _ = pair.progress.notified(), if !stopping && window_ok && !lead_ok => {}
            r = s.ready(interest) => {
                let r = r?;
                if r.is_readable() && rb.try_read_from(&s)? {
                    let mut acks = 0u64;
                    while let Some(f) = wire::split_frame(rb.data(), MAX_FRAME)? {
                        if f.packet_type() == wire::PUBACK {
                            let (_, reason) = wire::decode_puback(f.body(rb.data()))?;
                            if reason >= 0x80 {
                                bail!("PUBACK with error reason {reason:#x}");
                            }
                            acks += 1;
                        } else if f.packet_type() == wire::DISCONNECT {
                            bail!("broker sent DISCONNECT");
                        }
                        rb.consume(f.frame_len);
                    }
                    if acks > 0 {
                        inflight = inflight.saturating_sub(acks as usize);
                        add(&stats.acked, acks);
                    }
                }
                if r.is_writable() {
                    flush_some(&s, &mut wb)?;
                }
            }
        }
    }
}

async fn subscriber(
    s: TcpStream,
    mut rb: ReadBuf,
    pair: Rc<Pair>,
    cfg: Rc<Cfg>,
    stats: Rc<Stats>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut wb = BytesMut::with_capacity(16 * 1024);
    let mut next_seq: u64 = 0;
    let with_seq = cfg.payload >= 16;
    let ping_every = Duration::from_secs((cfg.keepalive as u64 / 2).max(1));
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    loop {
        let interest = if wb.is_empty() {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        tokio::select! {
            biased;
            _ = stop.changed() => {
                wire::encode_disconnect(&mut wb);
                let _ = flush_some(&s, &mut wb);
                return Ok(());
            }
            _ = ping.tick() => {
                if cfg.keepalive > 0 {
                    wire::encode_pingreq(&mut wb);
                    flush_some(&s, &mut wb)?;
                }
            }
            r = s.ready(interest) => {
                let r = r?;
                // PUBACKs for everything parsed from one read go out in one
                // write. (Holding them back longer to batch more was tried:
                // against Mosquitto's 20-message outbound window it halves
                // throughput some runs.)
                if r.is_readable() && rb.try_read_from(&s)? {
                    let now = nanos_now();
                    let measuring = stats.phase.get() == Phase::Measure;
                    let mut hist = stats.hist.borrow_mut();
                    let mut n = 0u64;
                    while let Some(f) = wire::split_frame(rb.data(), MAX_FRAME)? {
                        if f.packet_type() == wire::PUBLISH {
                            let p = wire::decode_publish(cfg.proto, f.header, f.body(rb.data()))?;
                            if p.payload.len() >= 8 {
                                let ts = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
                                if measuring {
                                    hist.saturating_record(now.saturating_sub(ts).max(1));
                                }
                                if with_seq && p.payload.len() >= 16 {
                                    let seq = u64::from_be_bytes(p.payload[8..16].try_into().unwrap());
                                    if seq < next_seq {
                                        add(&stats.out_of_order, 1);
                                    } else {
                                        next_seq = seq + 1;
                                    }
                                }
                            }
                            if p.qos > 0 {
                                wire::encode_puback(&mut wb, p.pkid);
                            }
                            n += 1;
                        } else if f.packet_type() == wire::DISCONNECT {
                            bail!("broker sent DISCONNECT");
                        }
                        rb.consume(f.frame_len);
                    }
                    add(&stats.received, n);
                    if n > 0 {
                        pair.next_seq.set(next_seq);
                        pair.progress.notify_one();
                    }
                    if measuring {
                        add(&stats.recv_measured, n);
                    }
                }
                flush_some(&s, &mut wb)?;
            }
        }
    }
}
