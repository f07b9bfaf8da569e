//! `retained`: publish `--topics` M retained messages (one per topic under a
//! per-run prefix, so earlier runs do not count), then `--subscribers` K
//! clients each subscribe with one wildcard (`{prefix}/{run}/#`) and count
//! the retained messages they receive. Reports the publish rate, each
//! subscriber's time from SUBSCRIBE to its M-th message (p50…max), the
//! delivery rate, and missing / duplicate counts. Afterwards the topics are
//! cleared (empty retained publishes at QoS 1) unless `--keep`.
//!
//! This is the broker's retained-store scan plus burst delivery; QoS 1 and 2
//! acks are sent for every message, as a real subscriber would.

use crate::report::{self, opt, Latency, Report};
use crate::scenarios::{
    broker_sample, mqtt_connect, nanos_now, parse_payload_header, put_payload_header, resolve,
    Common, Conn, ReadBuf, Transport, MAX_FRAME, PAYLOAD_HEADER,
};
use crate::wire::{self, Protocol};
use anyhow::{bail, Context, Result};
use bytes::{BufMut, BytesMut};
use serde::Serialize;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args, Debug, Clone)]
pub struct RetainedArgs {
    #[command(flatten)]
    pub common: Common,
    /// Retained topics to publish (M).
    #[arg(long, default_value_t = 1000)]
    pub topics: usize,
    /// Subscribers that each subscribe to all of them with a wildcard (K).
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// QoS of the retained publishes and of the subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload bytes (>= 20).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Unacknowledged publishes in flight (QoS 1/2).
    #[arg(long, default_value_t = 64)]
    pub inflight: usize,
    /// Topic prefix.
    #[arg(long, default_value = "bench/retained")]
    pub topic_prefix: String,
    /// Seconds each subscriber waits for all M messages.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Leave the retained messages on the broker.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetainedReport {
    pub scenario: &'static str,
    pub target: String,
    pub transport: Transport,
    pub protocol: u8,
    pub qos: u8,
    pub topics: usize,
    pub subscribers: usize,
    pub payload_bytes: usize,
    pub publish_s: f64,
    pub publish_per_s: f64,
    /// Per subscriber: SUBSCRIBE sent → M-th retained message received.
    pub time_to_all: Latency,
    /// SUBSCRIBE of all subscribers → last one complete.
    pub receive_s: f64,
    pub received: u64,
    pub expected: u64,
    pub received_per_s: f64,
    pub missing: u64,
    pub duplicates: u64,
    pub subscriber_errors: usize,
    pub broker_pid: Option<u32>,
    pub broker_rss_bytes: Option<u64>,
    pub broker_cpu_s: Option<f64>,
}

impl Report for RetainedReport {
    fn title(&self) -> String {
        format!(
            "retained: {} MQTT v{} QoS {} | {} topics x {} subscribers, {} B",
            self.target, self.protocol, self.qos, self.topics, self.subscribers, self.payload_bytes
        )
    }

    fn rows(&self) -> Vec<(String, String)> {
        [
            (
                "publish",
                format!("{:.2} s ({:.0} msgs/s)", self.publish_s, self.publish_per_s),
            ),
            ("time to receive all", self.time_to_all.row()),
            (
                "receive",
                format!(
                    "{:.2} s ({:.0} msgs/s)",
                    self.receive_s, self.received_per_s
                ),
            ),
            (
                "expected / received",
                format!("{} / {}", self.expected, self.received),
            ),
            (
                "missing / duplicates",
                format!("{} / {}", self.missing, self.duplicates),
            ),
            ("subscriber errors", self.subscriber_errors.to_string()),
            (
                "broker CPU s",
                opt(self.broker_cpu_s.map(|v| format!("{v:.2}"))),
            ),
            (
                "broker RSS",
                opt(self.broker_rss_bytes.map(report::human_bytes)),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn headline(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("publish msgs/s", self.publish_per_s),
            ("received msgs/s", self.received_per_s),
            ("time to all p50 us", self.time_to_all.p50_us),
            ("time to all max us", self.time_to_all.max_us),
        ]
    }
}

pub fn run(args: RetainedArgs) -> Result<()> {
    if args.payload < PAYLOAD_HEADER {
        bail!("--payload must be at least {PAYLOAD_HEADER} bytes");
    }
    if args.topics == 0 || args.subscribers == 0 || args.inflight == 0 {
        bail!("--topics, --subscribers and --inflight must be positive");
    }
    crate::procfs::raise_nofile_limit();
    crate::scenarios::run_and_print(&args.common, |common| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, run_async(&args, common))
    })
}

/// Publish one retained message per topic index, `inflight` at a time,
/// completing QoS 1/2 handshakes. `payload` None = empty (clears).
async fn publish_all(
    s: &mut Conn,
    rb: &mut ReadBuf,
    proto: Protocol,
    qos: u8,
    inflight: usize,
    topics: &[String],
    payload: Option<usize>,
) -> Result<()> {
    let mut wb = BytesMut::with_capacity(64 * 1024);
    let mut next = 0;
    let mut pending = 0usize;
    while next < topics.len() || pending > 0 {
        while next < topics.len() && (qos == 0 || pending < inflight) && wb.len() < 64 * 1024 {
            let len = payload.unwrap_or(0);
            let pkid = (next % 65_535) as u16 + 1;
            wb.reserve(len + topics[next].len() + 16);
            wire::encode_publish_header_flags(
                &mut wb,
                proto,
                topics[next].as_bytes(),
                qos,
                true,
                pkid,
                len,
            );
            if len > 0 {
                put_payload_header(&mut wb, nanos_now(), next as u64, 0);
                wb.put_bytes(0, len - PAYLOAD_HEADER);
            }
            next += 1;
            if qos > 0 {
                pending += 1;
            }
        }
        s.write_all(&wb).await?;
        wb.clear();
        if qos == 0 {
            continue;
        }
        // Read at least one frame's worth of acks.
        loop {
            let mut progressed = false;
            while let Some(f) = wire::split_frame(rb.data(), MAX_FRAME)? {
                match f.packet_type() {
                    wire::PUBACK | wire::PUBCOMP => {
                        pending = pending.saturating_sub(1);
                        progressed = true;
                    }
                    wire::PUBREC => {
                        let (id, _) = wire::decode_puback(f.body(rb.data()))?;
                        wire::encode_pubrel(&mut wb, id);
                    }
                    wire::DISCONNECT => bail!("broker sent DISCONNECT"),
                    _ => {}
                }
                rb.consume(f.frame_len);
            }
            if !wb.is_empty() {
                s.write_all(&wb).await?;
                wb.clear();
            }
            if progressed && (pending < inflight || pending == 0) {
                break;
            }
            let n = s.read(rb.spare()).await?;
            if n == 0 {
                bail!("connection closed by broker while publishing retained messages");
            }
            rb.filled(n);
        }
    }
    Ok(())
}

struct SubResult {
    received: u64,
    duplicates: u64,
    time_to_all: Option<Duration>,
}

#[allow(clippy::too_many_arguments)]
async fn subscribe_and_count(
    addr: SocketAddr,
    transport: Transport,
    proto: Protocol,
    qos: u8,
    id: String,
    keepalive: u16,
    filter: String,
    m: usize,
    timeout: Duration,
) -> Result<SubResult> {
    let mut s = transport.connect(addr, None).await?;
    let mut rb = ReadBuf::new(64 * 1024);
    mqtt_connect(&mut s, &mut rb, proto, &id, keepalive).await?;
    let mut wb = BytesMut::with_capacity(16 * 1024);
    wire::encode_subscribe(&mut wb, proto, 1, &filter, qos);
    let start = Instant::now();
    s.write_all(&wb).await?;
    wb.clear();
    let mut seen = crate::scenarios::flows::SeqTracker::default();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut time_to_all = None;
    while time_to_all.is_none() {
        let n = match tokio::time::timeout_at(deadline, s.read(rb.spare())).await {
            Err(_) => break,
            Ok(r) => r?,
        };
        if n == 0 {
            bail!("connection closed by broker");
        }
        rb.filled(n);
        while let Some(f) = wire::split_frame(rb.data(), MAX_FRAME)? {
            match f.packet_type() {
                wire::PUBLISH => {
                    let p = wire::decode_publish(proto, f.header, f.body(rb.data()))?;
                    if p.retain {
                        if let Some((_, seq, _)) = parse_payload_header(p.payload) {
                            seen.record(seq);
                        }
                    }
                    match p.qos {
                        1 => wire::encode_puback(&mut wb, p.pkid),
                        2 => wire::encode_pubrec(&mut wb, p.pkid),
                        _ => {}
                    }
                }
                wire::PUBREL => {
                    let (id, _) = wire::decode_puback(f.body(rb.data()))?;
                    wire::encode_pubcomp(&mut wb, id);
                }
                wire::SUBACK => {
                    let (_, code) = wire::decode_suback(proto, f.body(rb.data()))?;
                    if code >= 0x80 {
                        bail!("SUBACK for {filter} refused with code {code:#x}");
                    }
                }
                wire::DISCONNECT => bail!("broker sent DISCONNECT"),
                _ => {}
            }
            rb.consume(f.frame_len);
        }
        if !wb.is_empty() {
            s.write_all(&wb).await?;
            wb.clear();
        }
        if seen.unique >= m as u64 {
            time_to_all = Some(start.elapsed());
        }
    }
    wire::encode_disconnect(&mut wb);
    let _ = s.write_all(&wb).await;
    Ok(SubResult {
        received: seen.unique,
        duplicates: seen.duplicates,
        time_to_all,
    })
}

async fn run_async(args: &RetainedArgs, common: &Common) -> Result<RetainedReport> {
    let addr = resolve(&common.host, common.port)?;
    let proto = Protocol::from_level(common.protocol)?;
    let run = format!("{}-{}", std::process::id(), nanos_now() % 1_000_000);
    let topics: Vec<String> = (0..args.topics)
        .map(|i| format!("{}/{run}/{i}", args.topic_prefix))
        .collect();
    let b0 = broker_sample(common.broker_pid)?;

    let mut p = common.transport.connect(addr, None).await?;
    let mut prb = ReadBuf::new(16 * 1024);
    let recv_max = mqtt_connect(
        &mut p,
        &mut prb,
        proto,
        &format!("mbr{run}-pub"),
        common.keepalive,
    )
    .await?;
    let window = args
        .inflight
        .min(recv_max.map_or(usize::MAX, |m| m.max(1) as usize));
    let t0 = Instant::now();
    publish_all(
        &mut p,
        &mut prb,
        proto,
        args.qos,
        window,
        &topics,
        Some(args.payload),
    )
    .await
    .context("publishing retained messages")?;
    let publish_s = t0.elapsed().as_secs_f64();
    if args.qos == 0 {
        // QoS 0 has no ack: a PINGREQ round trip orders us after the broker
        // has read every publish (processing order on one connection).
        let mut wb = BytesMut::new();
        wire::encode_pingreq(&mut wb);
        p.write_all(&wb).await?;
        loop {
            if let Some(f) = wire::split_frame(prb.data(), MAX_FRAME)? {
                let t = f.packet_type();
                prb.consume(f.frame_len);
                if t == 13 {
                    break;
                }
                continue;
            }
            let n = p.read(prb.spare()).await?;
            if n == 0 {
                bail!("connection closed by broker");
            }
            prb.filled(n);
        }
    }

    let pb = common.bar(args.subscribers as u64, "retained");
    let filter = format!("{}/{run}/#", args.topic_prefix);
    let timeout = Duration::from_secs_f64(args.timeout);
    let t1 = Instant::now();
    let tasks: Vec<_> = (0..args.subscribers)
        .map(|k| {
            tokio::task::spawn_local(subscribe_and_count(
                addr,
                common.transport,
                proto,
                args.qos,
                format!("mbr{run}-s{k}"),
                common.keepalive,
                filter.clone(),
                args.topics,
                timeout,
            ))
        })
        .collect();
    let mut hist = report::new_hist();
    let (mut received, mut duplicates, mut errors) = (0u64, 0u64, 0usize);
    for t in tasks {
        match t.await? {
            Ok(r) => {
                received += r.received;
                duplicates += r.duplicates;
                if let Some(d) = r.time_to_all {
                    hist.saturating_record(d.as_nanos().max(1) as u64);
                }
            }
            Err(e) => {
                errors += 1;
                eprintln!("retained subscriber: {e:#}");
            }
        }
        pb.inc(1);
    }
    let receive_s = t1.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let b1 = broker_sample(common.broker_pid)?;
    if !args.keep {
        publish_all(&mut p, &mut prb, proto, 1, window, &topics, None)
            .await
            .context("clearing retained messages")?;
    }
    let mut wb = BytesMut::new();
    wire::encode_disconnect(&mut wb);
    let _ = p.write_all(&wb).await;

    let expected = (args.topics * args.subscribers) as u64;
    Ok(RetainedReport {
        scenario: "retained",
        target: common.target(),
        transport: common.transport,
        protocol: common.protocol,
        qos: args.qos,
        topics: args.topics,
        subscribers: args.subscribers,
        payload_bytes: args.payload,
        publish_s,
        publish_per_s: args.topics as f64 / publish_s.max(1e-9),
        time_to_all: Latency::from_nanos(&hist),
        receive_s,
        received,
        expected,
        received_per_s: received as f64 / receive_s.max(1e-9),
        missing: expected.saturating_sub(received),
        duplicates,
        subscriber_errors: errors,
        broker_pid: common.broker_pid,
        broker_rss_bytes: b1.map(|b| b.rss_bytes),
        broker_cpu_s: b0.zip(b1).map(|(a, b)| b.cpu_s - a.cpu_s),
    })
}
