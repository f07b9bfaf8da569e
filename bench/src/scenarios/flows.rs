//! `pairs`, `fanin` and `fanout`: one publish/subscribe engine, three
//! topologies.
//!
//! * `pairs` (alias `pubsub`, the original scenario): N publishers, N
//!   subscribers, publisher i → topic `{prefix}/i` → subscriber i.
//! * `fanin`: N publishers → one topic → one subscriber (broker ingress and
//!   one hot outbound queue).
//! * `fanout`: one publisher → one topic → N subscribers (the broker's
//!   per-subscriber delivery cost).
//!
//! All connections are driven by ONE thread (a tokio current-thread
//! runtime): a single-threaded generator is the reference setup of the
//! project's measurements, and one clock for send and receive time stamps
//! makes publish→deliver latency exact. Publishes are encoded straight into a
//! reused per-connection buffer and written in batches; received frames are
//! parsed in place.
//!
//! Every payload starts with a 20-byte header (send time, per-publisher
//! sequence number, publisher index). Subscribers record latency in an HDR
//! histogram and mark each (publisher, sequence) in a bitmap, which yields
//! exact duplicate, reordering and loss counts (expected deliveries =
//! published × subscribers per publisher). QoS 1 and 2 are real flows: the
//! publisher keeps a window of unacknowledged messages (PUBACK, or
//! PUBREC→PUBREL→PUBCOMP) and subscribers answer PUBACK / PUBREC, PUBCOMP.

use crate::procfs;
use crate::report::{self, opt, Latency, Report};
use crate::scenarios::{
    broker_sample, mqtt_connect, mqtt_connect_session, mqtt_subscribe, nanos_now,
    parse_payload_header, put_payload_header, resolve, Common, Conn, ReadBuf, MAX_FRAME,
    PAYLOAD_HEADER,
};
use crate::wire::{self, Protocol};
use anyhow::{bail, Context, Result};
use bytes::{Buf, BufMut, BytesMut};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::Interest;
use tokio::sync::{watch, Notify};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Pairs,
    Fanin,
    Fanout,
}

#[derive(clap::Args, Debug, Clone)]
pub struct FlowArgs {
    #[command(flatten)]
    pub common: Common,
    /// pairs: publisher/subscriber pairs; fanin: publishers; fanout:
    /// subscribers.
    #[arg(long, visible_aliases = ["pairs", "publishers", "subscribers"], default_value_t = 100)]
    pub clients: usize,
    /// Payload bytes (>= 20: send time, sequence number, publisher index).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// QoS of publishes and subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Messages per second per publisher (0 = as fast as the QoS window and
    /// the socket allow).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Warm-up seconds before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// QoS 1/2: unacknowledged publishes allowed per publisher (clamped to
    /// the broker's v5 Receive Maximum).
    #[arg(long, default_value_t = 64)]
    pub inflight: usize,
    /// Topic prefix.
    #[arg(long, default_value = "bench")]
    pub topic_prefix: String,
    /// Max messages a publisher may be ahead of its subscribers (0 =
    /// unlimited, an open-loop flood). Without a bound the socket buffers and
    /// broker queues absorb seconds of traffic and latency only measures
    /// queue depth.
    #[arg(long, default_value_t = 0)]
    pub max_lead: u64,
    /// Max seconds to wait after the run for acks and in-flight deliveries.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// Port the subscribers connect to (default: --port): another host of the same
    /// broker cluster, to measure what crosses hosts.
    #[arg(long)]
    pub subscriber_port: Option<u16>,
    /// Subscribers ask for persistent sessions (3.1.1 clean session 0; v5 one hour of
    /// session expiry): what a broker keeps in a session store is measured.
    #[arg(long)]
    pub persistent_subscribers: bool,
}

/// Bytes of queued publishes per publisher before we stop encoding more.
const HIGH_WATER: usize = 64 * 1024;
/// Refill the publisher's write buffer once it drops below this.
const LOW_WATER: usize = 16 * 1024;

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
    /// Every delivery, duplicates included.
    received: Cell<u64>,
    /// First deliveries of a (subscriber, publisher, seq).
    unique: Cell<u64>,
    hist: RefCell<Histogram<u64>>,
}

fn add(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

/// Per publisher: deliveries of its messages (over all its subscribers), and
/// a wake-up for a publisher blocked on --max-lead.
struct PubState {
    deliveries: Cell<u64>,
    progress: Notify,
}

struct Cfg {
    max_lead: u64,
    window: usize,
    proto: Protocol,
    qos: u8,
    payload: usize,
    keepalive: u16,
    rate: f64,
    subs_per_pub: u64,
}

/// Which sequence numbers of one publisher a subscriber has seen: a bitmap
/// (1 bit per message), so duplicates are exact, not inferred from order.
#[derive(Default, Debug)]
pub struct SeqTracker {
    bits: Vec<u64>,
    pub unique: u64,
    pub duplicates: u64,
    pub reordered: u64,
    next: u64,
}

impl SeqTracker {
    /// Record one delivery; true if it is the first of this sequence number.
    pub fn record(&mut self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if w >= self.bits.len() {
            self.bits.resize(w + 1, 0);
        }
        if self.bits[w] & (1 << b) != 0 {
            self.duplicates += 1;
            return false;
        }
        self.bits[w] |= 1 << b;
        self.unique += 1;
        if seq < self.next {
            self.reordered += 1;
        } else {
            self.next = seq + 1;
        }
        true
    }
}

type Trackers = Rc<RefCell<HashMap<u32, SeqTracker>>>;

#[derive(Debug, Clone, Serialize)]
pub struct BrokerFigures {
    pub processes: usize,
    pub cpu_s: f64,
    pub cpu_util: f64,
    pub cpu_us_per_msg: Option<f64>,
    pub rss_bytes: u64,
    pub fds: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlowReport {
    pub scenario: Shape,
    pub target: String,
    pub transport: crate::scenarios::Transport,
    pub protocol: u8,
    pub qos: u8,
    pub publishers: usize,
    pub subscribers: usize,
    pub payload_bytes: usize,
    pub rate_per_publisher: f64,
    pub inflight: usize,
    pub max_lead: u64,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Messages published during the measured window.
    pub sent: u64,
    /// Deliveries during the measured window.
    pub received: u64,
    pub sent_per_s: f64,
    pub received_per_s: f64,
    pub latency: Latency,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    /// Whole run (warm-up + measure + drain).
    pub total_published: u64,
    /// QoS 1: PUBACKs; QoS 2: PUBCOMPs.
    pub total_acked: u64,
    /// total_published × subscribers per publisher.
    pub expected: u64,
    /// Distinct (subscriber, publisher, seq) deliveries.
    pub delivered: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// expected - delivered (QoS 0 may legitimately drop).
    pub lost: i64,
    /// False when the drain deadline passed while deliveries still arrived:
    /// then `lost` includes messages merely still queued.
    pub drain_complete: bool,
    pub connection_errors: usize,
    pub broker_pid: Option<u32>,
    pub broker: Option<BrokerFigures>,
    pub generator_cpu_s: f64,
    /// 1-minute load average when measuring started.
    pub host_loadavg_1m: f64,
}

impl Report for FlowReport {
    fn title(&self) -> String {
        let rate = if self.rate_per_publisher > 0.0 {
            format!("{} msg/s each", self.rate_per_publisher)
        } else {
            "unpaced".into()
        };
        format!(
            "{:?}: {} MQTT v{} QoS {} | {} pub -> {} sub, {} B, {rate}, {} s (+{} s warm-up)",
            self.scenario,
            self.target,
            self.protocol,
            self.qos,
            self.publishers,
            self.subscribers,
            self.payload_bytes,
            self.duration_s,
            self.warmup_s
        )
        .to_lowercase()
    }

    fn rows(&self) -> Vec<(String, String)> {
        let b = self.broker.as_ref();
        let mut lost = self.lost.to_string();
        if !self.drain_complete {
            lost += " (drain timed out: still queued, not necessarily lost)";
        }
        [
            ("received msgs/s", format!("{:.0}", self.received_per_s)),
            ("sent msgs/s", format!("{:.0}", self.sent_per_s)),
            ("latency", self.latency.row()),
            (
                "published / acked",
                format!("{} / {}", self.total_published, self.total_acked),
            ),
            (
                "expected / delivered",
                format!("{} / {}", self.expected, self.delivered),
            ),
            ("lost", lost),
            (
                "duplicates / reordered",
                format!("{} / {}", self.duplicates, self.reordered),
            ),
            ("connection errors", self.connection_errors.to_string()),
            (
                "window / max lead",
                format!("{} / {}", self.inflight, self.max_lead),
            ),
            ("broker CPU s", opt(b.map(|b| format!("{:.2}", b.cpu_s)))),
            (
                "broker CPU util",
                opt(b.map(|b| format!("{:.0} %", b.cpu_util * 100.0))),
            ),
            (
                "broker CPU us/msg",
                opt(b.and_then(|b| b.cpu_us_per_msg).map(|v| format!("{v:.3}"))),
            ),
            (
                "broker RSS / fds / procs",
                opt(b.map(|b| {
                    format!(
                        "{} / {} / {}",
                        report::human_bytes(b.rss_bytes),
                        b.fds,
                        b.processes
                    )
                })),
            ),
            ("generator CPU s", format!("{:.2}", self.generator_cpu_s)),
            ("host load avg (1m)", format!("{:.2}", self.host_loadavg_1m)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn headline(&self) -> Vec<(&'static str, f64)> {
        let mut h = vec![
            ("received msgs/s", self.received_per_s),
            ("sent msgs/s", self.sent_per_s),
            ("latency p50 us", self.latency.p50_us),
            ("latency p99 us", self.latency.p99_us),
        ];
        if let Some(c) = self.broker.as_ref().and_then(|b| b.cpu_us_per_msg) {
            h.push(("broker CPU us/msg", c));
        }
        h
    }
}

pub fn run(shape: Shape, args: FlowArgs) -> Result<()> {
    nanos_now();
    if args.payload < PAYLOAD_HEADER {
        bail!(
            "--payload must be at least {PAYLOAD_HEADER} bytes (time stamp, sequence, publisher)"
        );
    }
    if args.clients == 0 || args.inflight == 0 {
        bail!("--clients and --inflight must be positive");
    }
    if args.rate < 0.0 {
        bail!("--rate must be >= 0");
    }
    procfs::raise_nofile_limit();
    crate::scenarios::run_and_print(&args.common, |common| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, run_async(shape, &args, common))
    })
}

async fn run_async(shape: Shape, args: &FlowArgs, common: &Common) -> Result<FlowReport> {
    let addr = resolve(&common.host, common.port)?;
    let sub_addr = resolve(&common.host, args.subscriber_port.unwrap_or(common.port))?;
    let proto = Protocol::from_level(common.protocol)?;
    let n = args.clients;
    let (npubs, nsubs) = match shape {
        Shape::Pairs => (n, n),
        Shape::Fanin => (n, 1),
        Shape::Fanout => (1, n),
    };
    let prefix = &args.topic_prefix;
    let topic_of_pub = |i: usize| match shape {
        Shape::Pairs => format!("{prefix}/{i}"),
        Shape::Fanin => format!("{prefix}/fanin"),
        Shape::Fanout => format!("{prefix}/fanout"),
    };
    let filter_of_sub = |i: usize| match shape {
        Shape::Pairs => format!("{prefix}/{i}"),
        Shape::Fanin => format!("{prefix}/fanin"),
        Shape::Fanout => format!("{prefix}/fanout"),
    };
    let subs_per_pub = if shape == Shape::Fanout { n as u64 } else { 1 };
    let stats = Rc::new(Stats {
        phase: Cell::new(Phase::Warmup),
        sent_measured: Cell::new(0),
        recv_measured: Cell::new(0),
        published: Cell::new(0),
        acked: Cell::new(0),
        received: Cell::new(0),
        unique: Cell::new(0),
        hist: RefCell::new(report::new_hist()),
    });
    let tag = format!("{}{}", std::process::id(), nanos_now() % 100_000);
    let pb = common.bar((npubs + nsubs) as u64, "connect");

    // Subscribers first, so nothing published is missed.
    let mut subs = Vec::with_capacity(nsubs);
    for i in 0..nsubs {
        let mut s = common
            .transport
            .connect(sub_addr, None)
            .await
            .with_context(|| format!("connecting subscriber {i} to {sub_addr}"))?;
        let mut rb = ReadBuf::new(64 * 1024);
        mqtt_connect_session(
            &mut s,
            &mut rb,
            proto,
            &format!("mb{tag}-s{i}"),
            common.keepalive,
            !args.persistent_subscribers,
        )
        .await?;
        mqtt_subscribe(&mut s, &mut rb, proto, &filter_of_sub(i), args.qos).await?;
        subs.push((s, rb));
        pb.inc(1);
    }
    let mut pubs = Vec::with_capacity(npubs);
    let mut window = args.inflight;
    for i in 0..npubs {
        let mut s = common
            .transport
            .connect(addr, None)
            .await
            .with_context(|| format!("connecting publisher {i} to {addr}"))?;
        let mut rb = ReadBuf::new(4 * 1024);
        let recv_max = mqtt_connect(
            &mut s,
            &mut rb,
            proto,
            &format!("mb{tag}-p{i}"),
            common.keepalive,
        )
        .await?;
        if let Some(m) = recv_max {
            window = window.min(m.max(1) as usize);
        }
        pubs.push((s, rb, topic_of_pub(i).into_bytes()));
        pb.inc(1);
    }
    pb.finish_and_clear();
    if window < args.inflight && args.qos > 0 {
        eprintln!(
            "note: broker Receive Maximum limits the QoS window to {window} (asked {})",
            args.inflight
        );
    }
    let window = if args.qos > 0 { window } else { 0 };
    let cfg = Rc::new(Cfg {
        max_lead: args.max_lead,
        window,
        proto,
        qos: args.qos,
        payload: args.payload,
        keepalive: common.keepalive,
        rate: args.rate,
        subs_per_pub,
    });
    let pub_states: Rc<[PubState]> = (0..npubs)
        .map(|_| PubState {
            deliveries: Cell::new(0),
            progress: Notify::new(),
        })
        .collect();
    let (stop_pub_tx, stop_pub_rx) = watch::channel(false);
    let (stop_sub_tx, stop_sub_rx) = watch::channel(false);
    let mut trackers = Vec::with_capacity(nsubs);
    let mut sub_tasks = Vec::new();
    for (s, rb) in subs {
        let t: Trackers = Rc::default();
        trackers.push(t.clone());
        sub_tasks.push(tokio::task::spawn_local(subscriber(
            s,
            rb,
            t,
            pub_states.clone(),
            cfg.clone(),
            stats.clone(),
            stop_sub_rx.clone(),
        )));
    }
    let mut pub_tasks = Vec::new();
    for (i, (s, rb, topic)) in pubs.into_iter().enumerate() {
        pub_tasks.push(tokio::task::spawn_local(publisher(
            s,
            rb,
            i as u32,
            topic,
            pub_states.clone(),
            cfg.clone(),
            stats.clone(),
            stop_pub_rx.clone(),
        )));
    }

    let total = args.warmup + args.duration;
    let pb = common.bar((total * 10.0).ceil() as u64, shape_name(shape));
    let run_start = Instant::now();
    let tick = |pb: &indicatif::ProgressBar| {
        let e = run_start.elapsed().as_secs_f64();
        pb.set_position((e * 10.0) as u64);
        pb.set_message(format!(
            "{:.0} msgs/s",
            stats.received.get() as f64 / e.max(1e-3)
        ));
    };
    let warm_end = run_start + Duration::from_secs_f64(args.warmup);
    while Instant::now() < warm_end {
        tokio::time::sleep(Duration::from_millis(250).min(warm_end - Instant::now())).await;
        tick(&pb);
    }
    let broker0 = broker_sample(common.broker_pid)?;
    let self_cpu0 = report::self_cpu_seconds();
    let loadavg = report::loadavg_1m();
    stats.phase.set(Phase::Measure);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(args.duration);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250).min(end - Instant::now())).await;
        tick(&pb);
    }
    stats.phase.set(Phase::Drain);
    let elapsed = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let self_cpu = report::self_cpu_seconds() - self_cpu0;
    let broker1 = broker_sample(common.broker_pid)?;

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
    let expected = stats.published.get() * subs_per_pub;
    let mut last = (stats.unique.get(), Instant::now());
    let mut drain_complete = true;
    while stats.unique.get() < expected {
        if Instant::now() >= deadline {
            drain_complete = false;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = stats.unique.get();
        if r != last.0 {
            last = (r, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(1) {
            break; // no progress for a second: the rest is lost
        }
    }
    // A moment for late duplicates (QoS 1 redelivery) to show up.
    tokio::time::sleep(Duration::from_millis(50)).await;
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

    let (mut delivered, mut duplicates, mut reordered) = (0, 0, 0);
    for t in &trackers {
        for s in t.borrow().values() {
            delivered += s.unique;
            duplicates += s.duplicates;
            reordered += s.reordered;
        }
    }
    let hist = stats.hist.borrow();
    let latency = Latency::from_nanos(&hist);
    let received = stats.recv_measured.get();
    let broker = match (broker0, broker1) {
        (Some(a), Some(b)) => {
            let cpu = b.cpu_s - a.cpu_s;
            Some(BrokerFigures {
                processes: b.processes,
                cpu_s: cpu,
                cpu_util: cpu / elapsed,
                cpu_us_per_msg: (received > 0).then(|| cpu * 1e6 / received as f64),
                rss_bytes: b.rss_bytes,
                fds: b.fds,
            })
        }
        _ => None,
    };
    Ok(FlowReport {
        scenario: shape,
        target: common.target(),
        transport: common.transport,
        protocol: common.protocol,
        qos: args.qos,
        publishers: npubs,
        subscribers: nsubs,
        payload_bytes: args.payload,
        rate_per_publisher: args.rate,
        inflight: window,
        max_lead: args.max_lead,
        warmup_s: args.warmup,
        duration_s: elapsed,
        sent: stats.sent_measured.get(),
        received,
        sent_per_s: stats.sent_measured.get() as f64 / elapsed,
        received_per_s: received as f64 / elapsed,
        latency,
        latency_p50_us: latency.p50_us,
        latency_p99_us: latency.p99_us,
        total_published: stats.published.get(),
        total_acked: stats.acked.get(),
        expected,
        delivered,
        duplicates,
        reordered,
        lost: expected as i64 - delivered as i64,
        drain_complete,
        connection_errors: errors.len(),
        broker_pid: common.broker_pid,
        broker,
        generator_cpu_s: self_cpu,
        host_loadavg_1m: loadavg,
    })
}

fn shape_name(s: Shape) -> &'static str {
    match s {
        Shape::Pairs => "pairs",
        Shape::Fanin => "fanin",
        Shape::Fanout => "fanout",
    }
}

/// Try to write the pending bytes; returns an error only on a real I/O error.
#[inline]
fn flush_some(s: &Conn, wb: &mut BytesMut) -> Result<()> {
    while !wb.is_empty() {
        match s.try_write(wb) {
            Ok(n) => wb.advance(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    s: Conn,
    mut rb: ReadBuf,
    index: u32,
    topic: Vec<u8>,
    pubs: Rc<[PubState]>,
    cfg: Rc<Cfg>,
    stats: Rc<Stats>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let me = &pubs[index as usize];
    let window = cfg.window;
    // Top the window up only once a quarter of it is free, so acks arriving
    // one by one do not each cost a write of a single publish.
    let refill_at = (window / 4).max(1);
    let frame = wire::publish_size(cfg.proto, topic.len(), cfg.qos, cfg.payload);
    let mut wb = BytesMut::with_capacity(HIGH_WATER + frame);
    let pad = cfg.payload - PAYLOAD_HEADER;
    let mut seq: u64 = 0;
    let mut pkid: u16 = 0;
    let mut inflight = 0usize;
    let mut stopping = false;
    let start = tokio::time::Instant::now();
    let lead = |seq: u64| seq.saturating_sub(me.deliveries.get() / cfg.subs_per_pub);
    loop {
        let mut rate_wait = None;
        if !stopping && wb.len() < LOW_WATER {
            let mut n = ((HIGH_WATER - wb.len()) / frame).max(1);
            if cfg.qos > 0 {
                let free = window - inflight;
                n = if free < refill_at { 0 } else { n.min(free) };
            }
            if cfg.max_lead > 0 {
                n = n.min(cfg.max_lead.saturating_sub(lead(seq)) as usize);
            }
            if cfg.rate > 0.0 && n > 0 {
                let allowed = (cfg.rate * start.elapsed().as_secs_f64()) as u64 + 1;
                if allowed <= seq {
                    rate_wait = Some(start + Duration::from_secs_f64(seq as f64 / cfg.rate));
                    n = 0;
                } else {
                    n = n.min((allowed - seq) as usize);
                }
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
                    put_payload_header(&mut wb, ts, seq, index);
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
                flush_some(&s, &mut wb)?;
            }
        }
        if stopping && wb.is_empty() && inflight == 0 {
            return Ok(());
        }
        let lead_ok = cfg.max_lead == 0 || lead(seq) < cfg.max_lead;
        let window_ok = cfg.qos == 0 || window - inflight >= refill_at;
        let can_encode = !stopping && window_ok && lead_ok && rate_wait.is_none();
        let interest = if wb.is_empty() && !can_encode {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        let wake = rate_wait.unwrap_or(start);
        tokio::select! {
            biased;
            _ = stop.changed(), if !stopping => { stopping = true; }
            _ = me.progress.notified(), if !stopping && window_ok && !lead_ok => {}
            _ = tokio::time::sleep_until(wake), if !stopping && rate_wait.is_some() => {}
            r = s.ready(interest) => {
                let r = r?;
                if r.is_readable() && rb.try_read_from(&s)? {
                    let mut done = 0u64;
                    while let Some(f) = wire::split_frame(rb.data(), MAX_FRAME)? {
                        let body = f.body(rb.data());
                        match f.packet_type() {
                            wire::PUBACK | wire::PUBCOMP => {
                                let (_, reason) = wire::decode_puback(body)?;
                                if reason >= 0x80 {
                                    bail!("PUBACK/PUBCOMP with error reason {reason:#x}");
                                }
                                done += 1;
                            }
                            wire::PUBREC => {
                                let (id, reason) = wire::decode_puback(body)?;
                                if reason >= 0x80 {
                                    bail!("PUBREC with error reason {reason:#x}");
                                }
                                wire::encode_pubrel(&mut wb, id);
                            }
                            wire::DISCONNECT => bail!("broker sent DISCONNECT"),
                            _ => {}
                        }
                        rb.consume(f.frame_len);
                    }
                    if done > 0 {
                        inflight = inflight.saturating_sub(done as usize);
                        add(&stats.acked, done);
                    }
                }
                flush_some(&s, &mut wb)?;
            }
        }
    }
}

async fn subscriber(
    s: Conn,
    mut rb: ReadBuf,
    trackers: Trackers,
    pubs: Rc<[PubState]>,
    cfg: Rc<Cfg>,
    stats: Rc<Stats>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut wb = BytesMut::with_capacity(16 * 1024);
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
                // Acks for everything parsed from one read go out in one write.
                if r.is_readable() && rb.try_read_from(&s)? {
                    let now = nanos_now();
                    let measuring = stats.phase.get() == Phase::Measure;
                    let mut hist = stats.hist.borrow_mut();
                    let mut tr = trackers.borrow_mut();
                    let (mut n, mut fresh) = (0u64, 0u64);
                    while let Some(f) = wire::split_frame(rb.data(), MAX_FRAME)? {
                        match f.packet_type() {
                            wire::PUBLISH => {
                                let p = wire::decode_publish(cfg.proto, f.header, f.body(rb.data()))?;
                                if let Some((ts, seq, from)) = parse_payload_header(p.payload) {
                                    if measuring {
                                        hist.saturating_record(now.saturating_sub(ts).max(1));
                                    }
                                    if tr.entry(from).or_default().record(seq) {
                                        fresh += 1;
                                        if let Some(ps) = pubs.get(from as usize) {
                                            add(&ps.deliveries, 1);
                                            if cfg.max_lead > 0 {
                                                ps.progress.notify_one();
                                            }
                                        }
                                    }
                                }
                                match p.qos {
                                    1 => wire::encode_puback(&mut wb, p.pkid),
                                    2 => wire::encode_pubrec(&mut wb, p.pkid),
                                    _ => {}
                                }
                                n += 1;
                            }
                            wire::PUBREL => {
                                let (id, _) = wire::decode_puback(f.body(rb.data()))?;
                                wire::encode_pubcomp(&mut wb, id);
                            }
                            wire::DISCONNECT => bail!("broker sent DISCONNECT"),
                            _ => {}
                        }
                        rb.consume(f.frame_len);
                    }
                    add(&stats.received, n);
                    add(&stats.unique, fresh);
                    if measuring {
                        add(&stats.recv_measured, n);
                    }
                }
                flush_some(&s, &mut wb)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_tracker_counts_duplicates_reordering_and_gaps() {
        let mut t = SeqTracker::default();
        for s in [0u64, 1, 2, 5, 3, 3, 200, 0] {
            t.record(s);
        }
        assert_eq!(t.unique, 6); // 0 1 2 3 5 200
        assert_eq!(t.duplicates, 2); // second 3, second 0
        assert_eq!(t.reordered, 1); // 3 after 5
        assert!(!t.record(200));
        assert!(t.record(4));
        assert_eq!(t.unique, 7);
    }
}
