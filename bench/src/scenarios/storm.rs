//! `storm`: connect/disconnect churn. `--clients` loops run concurrently,
//! each doing TCP connect → CONNECT → CONNACK → DISCONNECT → wait for the
//! broker to close, again and again for `--duration` seconds. Reports
//! cycles per second, CONNECT→CONNACK and whole-cycle latency, and failures
//! by reason (see [`classify`]).
//!
//! Why wait for the broker's close: whoever closes first keeps the TIME_WAIT
//! entry. Letting the broker close first (as DISCONNECT asks) keeps the
//! generator's ephemeral ports free; clients are also spread over loopback
//! source addresses 127.0.0.1..N so a long storm does not exhaust the ~28k
//! ports of one address.

use crate::report::{self, opt, Latency, Report};
use crate::scenarios::{
    broker_sample, classify, mqtt_connect, resolve, source_addr, Common, ReadBuf, Transport,
};
use crate::wire::{self, Protocol};
use anyhow::{bail, Result};
use serde::Serialize;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args, Debug, Clone)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    /// Concurrent connect/disconnect loops.
    #[arg(long, default_value_t = 50)]
    pub clients: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Loopback source addresses to spread over (0 = kernel's choice).
    #[arg(long, default_value_t = 4)]
    pub source_addrs: usize,
    /// Reuse one client id per loop (session takeover path) instead of a
    /// fresh id per cycle.
    #[arg(long)]
    pub same_id: bool,
    /// Seconds allowed per handshake before counting a timeout.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StormReport {
    pub scenario: &'static str,
    pub target: String,
    pub transport: Transport,
    pub protocol: u8,
    pub clients: usize,
    pub duration_s: f64,
    pub cycles: u64,
    pub cycles_per_s: f64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    /// CONNECT sent → CONNACK received.
    pub connect_latency: Latency,
    /// TCP connect → broker closed after DISCONNECT.
    pub cycle_latency: Latency,
    pub broker_pid: Option<u32>,
    pub broker_cpu_s: Option<f64>,
    pub broker_cpu_us_per_cycle: Option<f64>,
    pub broker_rss_bytes: Option<u64>,
    pub broker_fds: Option<u64>,
}

impl Report for StormReport {
    fn title(&self) -> String {
        format!(
            "storm: {} MQTT v{} | {} clients, {:.1} s",
            self.target, self.protocol, self.clients, self.duration_s
        )
    }

    fn rows(&self) -> Vec<(String, String)> {
        let fails = self
            .failures
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        [
            (
                "cycles / failed",
                format!("{} / {}", self.cycles, self.failed),
            ),
            ("cycles/s", format!("{:.0}", self.cycles_per_s)),
            (
                "failures by reason",
                if fails.is_empty() { "-".into() } else { fails },
            ),
            ("first error", opt(self.first_error.as_ref())),
            ("CONNECT -> CONNACK", self.connect_latency.row()),
            ("whole cycle", self.cycle_latency.row()),
            (
                "broker CPU s",
                opt(self.broker_cpu_s.map(|v| format!("{v:.2}"))),
            ),
            (
                "broker CPU us/cycle",
                opt(self.broker_cpu_us_per_cycle.map(|v| format!("{v:.1}"))),
            ),
            (
                "broker RSS",
                opt(self.broker_rss_bytes.map(report::human_bytes)),
            ),
            ("broker fds", opt(self.broker_fds)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn headline(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("cycles/s", self.cycles_per_s),
            ("connect p50 us", self.connect_latency.p50_us),
            ("connect p99 us", self.connect_latency.p99_us),
            ("cycle p99 us", self.cycle_latency.p99_us),
        ]
    }
}

pub fn run(args: StormArgs) -> Result<()> {
    if args.clients == 0 {
        bail!("--clients must be positive");
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

#[derive(Default)]
struct Tally {
    cycles: Cell<u64>,
    failures: RefCell<BTreeMap<String, u64>>,
    first_error: RefCell<Option<String>>,
    connect: RefCell<Option<hdrhistogram::Histogram<u64>>>,
    cycle: RefCell<Option<hdrhistogram::Histogram<u64>>>,
}

async fn run_async(args: &StormArgs, common: &Common) -> Result<StormReport> {
    let addr = resolve(&common.host, common.port)?;
    let proto = Protocol::from_level(common.protocol)?;
    let tally = Rc::new(Tally::default());
    *tally.connect.borrow_mut() = Some(report::new_hist());
    *tally.cycle.borrow_mut() = Some(report::new_hist());
    let b0 = broker_sample(common.broker_pid)?;
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(args.duration);
    let timeout = Duration::from_secs_f64(args.timeout);
    let tag = format!(
        "{}{}",
        std::process::id(),
        crate::scenarios::nanos_now() % 100_000
    );
    let mut tasks = Vec::new();
    for k in 0..args.clients {
        let tally = tally.clone();
        let bind = source_addr(addr, args.source_addrs, k);
        let id = format!("mbs{tag}-{k}");
        let (transport, keepalive, same_id) = (common.transport, common.keepalive, args.same_id);
        tasks.push(tokio::task::spawn_local(async move {
            let mut cycle = 0u64;
            while Instant::now() < end {
                let start = Instant::now();
                cycle += 1;
                let id = if same_id {
                    id.clone()
                } else {
                    format!("{id}-{cycle}")
                };
                let r = tokio::time::timeout(timeout, async {
                    let mut s = transport.connect(addr, bind).await?;
                    let mut rb = ReadBuf::new(128);
                    let sent = Instant::now();
                    mqtt_connect(&mut s, &mut rb, proto, &id, keepalive).await?;
                    let connack = sent.elapsed();
                    let mut out = bytes::BytesMut::with_capacity(2);
                    wire::encode_disconnect(&mut out);
                    s.write_all(&out).await?;
                    // Wait for the broker's close (EOF or reset both count).
                    let mut sink = [0u8; 64];
                    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                    anyhow::Ok(connack)
                })
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r);
                match r {
                    Ok(connack) => {
                        tally.cycles.set(tally.cycles.get() + 1);
                        if let Some(h) = tally.connect.borrow_mut().as_mut() {
                            h.saturating_record(connack.as_nanos().max(1) as u64);
                        }
                        if let Some(h) = tally.cycle.borrow_mut().as_mut() {
                            h.saturating_record(start.elapsed().as_nanos().max(1) as u64);
                        }
                    }
                    Err(e) => {
                        *tally.failures.borrow_mut().entry(classify(&e)).or_default() += 1;
                        tally
                            .first_error
                            .borrow_mut()
                            .get_or_insert_with(|| format!("{e:#}"));
                        // Do not spin on a dead broker.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    let pb = common.bar((args.duration * 10.0).ceil() as u64, "storm");
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250).min(end - Instant::now())).await;
        pb.set_position((t0.elapsed().as_secs_f64() * 10.0) as u64);
        pb.set_message(format!("{} cycles", tally.cycles.get()));
    }
    // Cycles still in flight a second after the end are abandoned (not counted).
    let grace = tokio::time::Instant::now() + Duration::from_secs(1);
    for t in tasks {
        let abort = t.abort_handle();
        if tokio::time::timeout_at(grace, t).await.is_err() {
            abort.abort();
        }
    }
    pb.finish_and_clear();
    let elapsed = t0.elapsed().as_secs_f64();
    let b1 = broker_sample(common.broker_pid)?;
    let cycles = tally.cycles.get();
    let failures = tally.failures.borrow().clone();
    let cpu = b0.zip(b1).map(|(a, b)| b.cpu_s - a.cpu_s);
    let first_error = tally.first_error.borrow().clone();
    let connect = tally.connect.borrow();
    let cycle = tally.cycle.borrow();
    Ok(StormReport {
        scenario: "storm",
        target: common.target(),
        transport: common.transport,
        protocol: common.protocol,
        clients: args.clients,
        duration_s: elapsed,
        cycles,
        cycles_per_s: cycles as f64 / elapsed,
        failed: failures.values().sum(),
        failures,
        first_error,
        connect_latency: Latency::from_nanos(connect.as_ref().expect("set")),
        cycle_latency: Latency::from_nanos(cycle.as_ref().expect("set")),
        broker_pid: common.broker_pid,
        broker_cpu_s: cpu,
        broker_cpu_us_per_cycle: cpu.filter(|_| cycles > 0).map(|c| c * 1e6 / cycles as f64),
        broker_rss_bytes: b1.map(|b| b.rss_bytes),
        broker_fds: b1.map(|b| b.fds),
    })
}
