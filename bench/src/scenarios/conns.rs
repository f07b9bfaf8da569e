//! `conns`: open N connections at R per second, hold them S seconds, and
//! report connect rate, CONNECT→CONNACK latency and failures by reason.
//!
//! Why child processes and source addresses: a process may hold at most
//! 20,000 fds here (hard limit, cannot be raised), and one source address
//! has ~28,000 ephemeral ports towards one broker port. So the parent
//! re-executes itself as hidden `conns-worker` children, each holding at most
//! `--per-proc` (19,000) connections from its own loopback source address
//! 127.0.0.(k+1) (bound before connect) — `conns --count 150000` becomes 8
//! children on 8 addresses without any flags. Children speak JSON lines on
//! stdout (`progress`, then `ready` with their failure counts and latency
//! histogram, then `done` after the hold) and exit when the parent closes
//! their stdin; the parent aggregates and samples the broker from /proc.
//!
//! Per-connection state after the handshake is just the socket (a tokio
//! `TcpStream`, ~100 B in user space plus the kernel's socket); the 128-byte
//! read buffer of the handshake is dropped. One task per child sends
//! PINGREQ to every held connection each keep-alive/2 and drains replies,
//! so holds longer than the keep-alive stay valid and broker-side closes
//! are counted (`dropped_during_hold`).

use crate::procfs::{self, TreeSample};
use crate::report::{self, hist_merge, hist_pairs, human_bytes, opt, Latency, Report};
use crate::scenarios::{
    broker_sample, classify, mqtt_connect, resolve, source_addr, Common, Conn, ReadBuf, Transport,
};
use crate::wire::Protocol;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct ConnsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Connection attempts per second over all children (0 = as fast as
    /// --concurrency allows).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds to hold the connections once all are up.
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
    /// Max connections per child process (fd limit 20,000 per process).
    #[arg(long, default_value_t = 19_000)]
    pub per_proc: usize,
    /// Loopback source addresses 127.0.0.1..N (default: one per child; 0 =
    /// let the kernel choose). Ignored for non-loopback brokers.
    #[arg(long)]
    pub source_addrs: Option<usize>,
    /// Handshakes in flight per child.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Seconds allowed for TCP connect + CONNACK before counting a timeout.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

/// Hidden child-process mode of `conns`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnsWorkerArgs {
    #[arg(long)]
    pub host: String,
    #[arg(long)]
    pub port: u16,
    #[arg(long)]
    pub count: usize,
    #[arg(long)]
    pub first: usize,
    #[arg(long)]
    pub bind: Option<IpAddr>,
    #[arg(long)]
    pub protocol: u8,
    #[arg(long)]
    pub keepalive: u16,
    #[arg(long)]
    pub rate: f64,
    #[arg(long)]
    pub concurrency: usize,
    #[arg(long)]
    pub timeout: f64,
    #[arg(long)]
    pub tag: String,
}

/// One line a child prints on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Msg {
    Progress {
        ok: usize,
        failed: usize,
    },
    Ready {
        ok: usize,
        failures: BTreeMap<String, usize>,
        first_error: Option<String>,
        connect_s: f64,
        hist: Vec<(u64, u64)>,
    },
    Done {
        dropped: usize,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnsReport {
    pub scenario: &'static str,
    pub target: String,
    pub transport: Transport,
    pub protocol: u8,
    pub requested: usize,
    pub connected: usize,
    pub failed: usize,
    pub failures: BTreeMap<String, usize>,
    pub first_error: Option<String>,
    pub procs: usize,
    pub source_addrs: Vec<String>,
    pub rate_requested: f64,
    /// Wall time from the first attempt to the last connection up.
    pub connect_s: f64,
    pub connects_per_s: f64,
    /// CONNECT sent → CONNACK received.
    pub connect_latency: Latency,
    pub hold_s: f64,
    pub dropped_during_hold: usize,
    pub broker_pid: Option<u32>,
    pub broker_before: Option<TreeSample>,
    /// Sampled with all connections up (before the hold).
    pub broker_after: Option<TreeSample>,
    pub broker_rss_per_conn_bytes: Option<f64>,
    pub broker_cpu_us_per_connect: Option<f64>,
}

impl Report for ConnsReport {
    fn title(&self) -> String {
        format!(
            "conns: {} MQTT v{} | {} connections over {} procs, hold {} s",
            self.target, self.protocol, self.requested, self.procs, self.hold_s
        )
    }

    fn rows(&self) -> Vec<(String, String)> {
        let fails = if self.failures.is_empty() {
            "-".to_string()
        } else {
            self.failures
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (b0, b1) = (self.broker_before, self.broker_after);
        [
            (
                "connected / failed",
                format!("{} / {}", self.connected, self.failed),
            ),
            ("failures by reason", fails),
            ("first error", opt(self.first_error.as_ref())),
            (
                "connect time",
                format!(
                    "{:.2} s ({:.0} conn/s)",
                    self.connect_s, self.connects_per_s
                ),
            ),
            ("CONNECT -> CONNACK", self.connect_latency.row()),
            ("source addresses", self.source_addrs.join(", ")),
            ("dropped during hold", self.dropped_during_hold.to_string()),
            (
                "broker RSS before / after",
                opt(b0.zip(b1).map(|(a, b)| {
                    format!(
                        "{} / {}",
                        human_bytes(a.rss_bytes),
                        human_bytes(b.rss_bytes)
                    )
                })),
            ),
            (
                "broker RSS per connection",
                opt(self.broker_rss_per_conn_bytes.map(|v| format!("{v:.0} B"))),
            ),
            (
                "broker fds / procs",
                opt(b1.map(|b| format!("{} / {}", b.fds, b.processes))),
            ),
            (
                "broker CPU us per connect",
                opt(self.broker_cpu_us_per_connect.map(|v| format!("{v:.1}"))),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn headline(&self) -> Vec<(&'static str, f64)> {
        let mut h = vec![
            ("connected", self.connected as f64),
            ("connects/s", self.connects_per_s),
            ("connect p50 us", self.connect_latency.p50_us),
            ("connect p99 us", self.connect_latency.p99_us),
        ];
        if let Some(v) = self.broker_rss_per_conn_bytes {
            h.push(("broker RSS B/conn", v));
        }
        h
    }
}

pub fn run(args: ConnsArgs) -> Result<()> {
    if args.count == 0 || args.per_proc == 0 {
        bail!("--count and --per-proc must be positive");
    }
    crate::scenarios::run_and_print(&args.common, |c| run_once(&args, c))
}

fn run_once(args: &ConnsArgs, common: &Common) -> Result<ConnsReport> {
    let addr = resolve(&common.host, common.port)?;
    let procs = args.count.div_ceil(args.per_proc);
    let naddrs = args.source_addrs.unwrap_or(procs);
    let exe = std::env::current_exe()?;
    let tag = format!(
        "{}{}",
        std::process::id(),
        crate::scenarios::nanos_now() % 100_000
    );
    let broker_before = broker_sample(common.broker_pid)?;

    let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<Msg>)>();
    let mut children = Vec::new();
    let mut first = 0;
    let t0 = Instant::now();
    for k in 0..procs {
        let count = args.count / procs + usize::from(k < args.count % procs);
        let mut cmd = Command::new(&exe);
        cmd.arg("conns-worker")
            .args(["--host", &addr.ip().to_string()])
            .args(["--port", &addr.port().to_string()])
            .args(["--count", &count.to_string()])
            .args(["--first", &first.to_string()])
            .args(["--protocol", &common.protocol.to_string()])
            .args(["--keepalive", &common.keepalive.to_string()])
            .args(["--rate", &(args.rate / procs as f64).to_string()])
            .args(["--concurrency", &args.concurrency.to_string()])
            .args(["--timeout", &args.timeout.to_string()])
            .args(["--tag", &tag]);
        if let Some(ip) = source_addr(addr, naddrs, k) {
            cmd.args(["--bind", &ip.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning conns-worker")?;
        let out = child.stdout.take().expect("piped stdout");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let msg = line
                    .map_err(anyhow::Error::from)
                    .and_then(|l| serde_json::from_str::<Msg>(&l).map_err(Into::into));
                let stop = msg.is_err();
                if tx.send((k, msg)).is_err() || stop {
                    return;
                }
            }
            let _ = tx.send((k, Err(anyhow::anyhow!("conns-worker {k} exited early"))));
        });
        children.push(child);
        first += count;
    }
    drop(tx);

    let pb = common.bar(args.count as u64, "conns");
    let mut progress = vec![0usize; procs];
    let mut ready = 0;
    let mut ok = 0;
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut first_error = None;
    let mut hist = report::new_hist();
    let mut connect_s: f64 = 0.0;
    while ready < procs {
        let (k, msg) = rx.recv().context("all conns-workers gone")?;
        match msg? {
            Msg::Progress { ok, failed } => progress[k] = ok + failed,
            Msg::Ready {
                ok: n,
                failures: f,
                first_error: e,
                connect_s: cs,
                hist: h,
            } => {
                ready += 1;
                ok += n;
                progress[k] = n + f.values().sum::<usize>();
                for (r, c) in f {
                    *failures.entry(r).or_default() += c;
                }
                if first_error.is_none() {
                    first_error = e;
                }
                hist_merge(&mut hist, &h);
                connect_s = connect_s.max(cs);
            }
            Msg::Done { .. } => bail!("conns-worker {k} finished before being told to"),
        }
        pb.set_position(progress.iter().sum::<usize>() as u64);
    }
    pb.finish_and_clear();
    let _ = t0;
    let failed: usize = failures.values().sum();
    let broker_after = broker_sample(common.broker_pid)?;

    if args.hold > 0.0 {
        let pb = common.bar((args.hold * 10.0) as u64, "hold");
        let end = Instant::now() + Duration::from_secs_f64(args.hold);
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100).min(end - Instant::now()));
            pb.inc(1);
        }
        pb.finish_and_clear();
    }
    // Closing stdin tells the children to report and exit.
    for c in children.iter_mut() {
        drop(c.stdin.take());
    }
    let mut dropped = 0;
    let mut done = 0;
    while done < procs {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok((_, Ok(Msg::Done { dropped: d }))) => {
                dropped += d;
                done += 1;
            }
            Ok((_, Err(_))) => done += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    for mut c in children {
        let _ = c.wait();
    }

    let per_conn = broker_before
        .zip(broker_after)
        .filter(|_| ok > 0)
        .map(|(a, b)| (b.rss_bytes as f64 - a.rss_bytes as f64) / ok as f64);
    let cpu_per = broker_before
        .zip(broker_after)
        .filter(|_| ok > 0)
        .map(|(a, b)| (b.cpu_s - a.cpu_s) * 1e6 / ok as f64);
    Ok(ConnsReport {
        scenario: "conns",
        target: common.target(),
        transport: common.transport,
        protocol: common.protocol,
        requested: args.count,
        connected: ok,
        failed,
        failures,
        first_error,
        procs,
        source_addrs: (0..procs.min(naddrs.max(1)))
            .filter_map(|k| source_addr(addr, naddrs, k))
            .map(|a| a.to_string())
            .collect(),
        rate_requested: args.rate,
        connect_s,
        connects_per_s: if connect_s > 0.0 {
            ok as f64 / connect_s
        } else {
            0.0
        },
        connect_latency: Latency::from_nanos(&hist),
        hold_s: args.hold,
        dropped_during_hold: dropped,
        broker_pid: common.broker_pid,
        broker_before,
        broker_after,
        broker_rss_per_conn_bytes: per_conn,
        broker_cpu_us_per_connect: cpu_per,
    })
}

fn emit(m: &Msg) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(m)?)?;
    out.flush()?;
    Ok(())
}

pub fn run_worker(args: ConnsWorkerArgs) -> Result<()> {
    let limit = procfs::raise_nofile_limit();
    if (limit as usize) < args.count + 16 {
        eprintln!(
            "conns-worker: warning: open-file limit {limit} is below the {} connections asked",
            args.count
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, worker(args))
}

async fn worker(args: ConnsWorkerArgs) -> Result<()> {
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;
    let addr = resolve(&args.host, args.port)?;
    let proto = Protocol::from_level(args.protocol)?;
    let streams: Rc<RefCell<Vec<Conn>>> = Rc::new(RefCell::new(Vec::with_capacity(args.count)));
    let failures: Rc<RefCell<BTreeMap<String, usize>>> = Rc::default();
    let first_error: Rc<RefCell<Option<String>>> = Rc::default();
    let hist = Rc::new(RefCell::new(report::new_hist()));
    let failed = Rc::new(Cell::new(0usize));
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let timeout = Duration::from_secs_f64(args.timeout);
    let t0 = Instant::now();
    let mut last_progress = Instant::now();
    let mut handles = Vec::new();
    for j in 0..args.count {
        if args.rate > 0.0 {
            let at = t0 + Duration::from_secs_f64(j as f64 / args.rate);
            tokio::time::sleep_until(at.into()).await;
        }
        let permit = sem.clone().acquire_owned().await?;
        let id = format!("mbc{}-{}", args.tag, args.first + j);
        let (streams2, failures, first_error, hist, failed2) = (
            streams.clone(),
            failures.clone(),
            first_error.clone(),
            hist.clone(),
            failed.clone(),
        );
        let bind = args.bind;
        let keepalive = args.keepalive;
        handles.push(tokio::task::spawn_local(async move {
            let r = tokio::time::timeout(timeout, async {
                let mut s = Transport::Tcp.connect(addr, bind).await?;
                let mut rb = ReadBuf::new(128);
                let sent = Instant::now();
                mqtt_connect(&mut s, &mut rb, proto, &id, keepalive).await?;
                anyhow::Ok((s, sent.elapsed()))
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
            match r {
                Ok((s, lat)) => {
                    hist.borrow_mut()
                        .saturating_record(lat.as_nanos().max(1) as u64);
                    streams2.borrow_mut().push(s);
                }
                Err(e) => {
                    failed2.set(failed2.get() + 1);
                    *failures.borrow_mut().entry(classify(&e)).or_default() += 1;
                    first_error
                        .borrow_mut()
                        .get_or_insert_with(|| format!("{e:#}"));
                }
            }
            drop(permit);
        }));
        if last_progress.elapsed() >= Duration::from_millis(250) {
            last_progress = Instant::now();
            emit(&Msg::Progress {
                ok: streams.borrow().len(),
                failed: failed.get(),
            })?;
        }
    }
    for h in handles {
        h.await?;
    }
    let connect_s = t0.elapsed().as_secs_f64();
    let ok = streams.borrow().len();
    emit(&Msg::Ready {
        ok,
        failures: failures.borrow().clone(),
        first_error: first_error.borrow().clone(),
        connect_s,
        hist: hist_pairs(&hist.borrow()),
    })?;

    // Hold: keep-alive pings until the parent closes our stdin.
    let (eof_tx, mut eof_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        while std::io::stdin().read(&mut sink).unwrap_or(0) > 0 {}
        let _ = eof_tx.send(());
    });
    let every = Duration::from_secs((args.keepalive as u64 / 2).max(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut dead = vec![false; ok];
    loop {
        tokio::select! {
            _ = &mut eof_rx => break,
            _ = tick.tick() => {
                if args.keepalive == 0 {
                    continue;
                }
                let streams = streams.borrow();
                for (i, s) in streams.iter().enumerate() {
                    if dead[i] {
                        continue;
                    }
                    let mut buf = [0u8; 64];
                    loop {
                        match s.try_read(&mut buf) {
                            Ok(0) => { dead[i] = true; break; }
                            Ok(_) => continue,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(_) => { dead[i] = true; break; }
                        }
                    }
                    if !dead[i] && s.try_write(&[0xC0, 0]).is_err() {
                        dead[i] = true;
                    }
                }
            }
        }
    }
    // A last check for connections the broker closed during the hold.
    for (i, s) in streams.borrow().iter().enumerate() {
        let mut buf = [0u8; 64];
        loop {
            match s.try_read(&mut buf) {
                Ok(0) => {
                    dead[i] = true;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    dead[i] = true;
                    break;
                }
            }
        }
    }
    emit(&Msg::Done {
        dropped: dead.iter().filter(|d| **d).count(),
    })?;
    Ok(())
}
