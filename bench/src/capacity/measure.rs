//! Measurements on the running broker for the capacity planner.
//!
//! * Idle connections are opened in steps by child processes (re-executions
//!   of `mqttd-bench capacity --worker`, one per source address 127.0.0.2,
//!   127.0.0.3, …, because the per-process fd limit is 20,000). The parent
//!   tells every child how many more connections to open (`OPEN n` on its
//!   stdin, answered by `OK ok failed`), then waits for the broker's RSS to
//!   settle and samples RSS, open fds and CPU time summed over the broker's
//!   whole process tree (mqttd is a supervisor plus worker children).
//! * Message cost: a short `pubsub` run (re-exec of this binary, parsed from
//!   its JSON line) at QoS 0 and QoS 1, with the broker tree's CPU time
//!   sampled around it.

use super::CapacityArgs;
use crate::procfs;
use crate::wire::{self, Protocol};
use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// One sample after a step of connections.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Step {
    pub conns: usize,
    pub rss_bytes: u64,
    pub rss_settled: bool,
    pub fds: u64,
    pub broker_procs: usize,
}

/// One `pubsub` run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MsgRun {
    pub qos: u8,
    pub pairs: usize,
    pub payload: usize,
    pub delivered: u64,
    pub delivered_per_s: f64,
    pub broker_cpu_s: f64,
    pub cpu_us_per_msg: f64,
    pub lost: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Measurement {
    pub broker_pid: u32,
    /// The broker's command line (from /proc), e.g. its --workers.
    pub broker_cmdline: String,
    pub steps: Vec<Step>,
    pub requested: usize,
    pub connected: usize,
    pub failed: usize,
    pub worker_procs: usize,
    pub source_addrs: Vec<String>,
    /// Broker CPU seconds spent while the steps' connections were opened.
    pub connect_cpu_s: f64,
    /// Wall seconds spent opening them (excluding settle waits).
    pub connect_wall_s: f64,
    pub msg_runs: Vec<MsgRun>,
    /// Why a message run is missing, if one is.
    pub msg_errors: Vec<String>,
    pub host_loadavg_1m: f64,
    pub host_cpus: usize,
}

// ---------------------------------------------------------------- /proc tree

/// `pid` and all its descendants.
pub fn tree_pids(root: u32) -> Vec<u32> {
    let mut kids: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parse_ppid(&s))
            {
                kids.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(k) = kids.get(&out[i]) {
            out.extend(k);
        }
        i += 1;
    }
    out
}

fn parse_ppid(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Sum of VmRSS over the broker's process tree.
pub fn tree_rss(root: u32) -> Result<(u64, usize)> {
    let pids = tree_pids(root);
    let rss = procfs::rss_bytes(root)?
        + pids[1..]
            .iter()
            .filter_map(|&p| procfs::rss_bytes(p).ok())
            .sum::<u64>();
    Ok((rss, pids.len()))
}

/// Sum of user + system CPU seconds over the broker's process tree.
pub fn tree_cpu(root: u32) -> Result<f64> {
    let pids = tree_pids(root);
    Ok(procfs::cpu_seconds(root)?
        + pids[1..]
            .iter()
            .filter_map(|&p| procfs::cpu_seconds(p).ok())
            .sum::<f64>())
}

/// Open file descriptors over the broker's process tree.
pub fn tree_fds(root: u32) -> u64 {
    tree_pids(root)
        .iter()
        .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
        .map(|d| d.count() as u64)
        .sum()
}

/// Poll the tree's RSS until it moves by less than `tol` bytes over
/// `stable` consecutive samples, or `timeout` passes.
fn settle_tree_rss(root: u32, tol: u64, stable: u32, timeout: Duration) -> Result<(u64, bool)> {
    let start = Instant::now();
    let mut prev = tree_rss(root)?.0;
    let mut n = 0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = tree_rss(root)?.0;
        if now.abs_diff(prev) <= tol {
            n += 1;
            if n >= stable {
                return Ok((now, true));
            }
        } else {
            n = 0;
        }
        prev = now;
        if start.elapsed() >= timeout {
            return Ok((now, false));
        }
    }
}

/// 1-minute load average (0 if unreadable).
fn loadavg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()?
        .next()
        .with_context(|| format!("cannot resolve {host}"))
}

// ---------------------------------------------------------------- steps

struct Worker {
    child: Child,
    out: BufReader<ChildStdout>,
    opened: usize,
}

/// How many connections child `k` of `procs` holds once `total` are open.
pub fn share(total: usize, procs: usize, k: usize) -> usize {
    total / procs + usize::from(k < total % procs)
}

pub fn measure(args: &CapacityArgs, pid: u32) -> Result<Measurement> {
    let exe = std::env::current_exe()?;
    let procs = args
        .procs
        .unwrap_or_else(|| args.connections.div_ceil(args.per_proc.max(1)))
        .max(1);
    let steps = args.steps.max(1);
    let tag = std::process::id().to_string();
    let bind_of = |k: usize| -> Option<IpAddr> {
        (!args.no_bind).then(|| IpAddr::from([127, 0, 0, (2 + k % 250) as u8]))
    };
    let host_loadavg_1m = loadavg_1m();

    eprintln!("capacity: waiting for broker RSS to settle (pid {pid} and its children)...");
    let (rss0, settled0) = settle_tree_rss(pid, 16 * 1024, 4, Duration::from_secs(10))?;
    let mut samples = vec![Step {
        conns: 0,
        rss_bytes: rss0,
        rss_settled: settled0,
        fds: tree_fds(pid),
        broker_procs: tree_pids(pid).len(),
    }];
    eprintln!(
        "capacity: step 0/{steps}: 0 connections, RSS {}, {} fds, {} broker processes",
        super::project::fmt_bytes(rss0 as f64),
        samples[0].fds,
        samples[0].broker_procs
    );

    let mut workers = Vec::with_capacity(procs);
    for k in 0..procs {
        let mut cmd = Command::new(&exe);
        cmd.args(["capacity", "--worker"])
            .args(["--host", &args.host])
            .args(["--port", &args.port.to_string()])
            .args(["--worker-tag", &format!("{tag}-{k}")])
            .args(["--keepalive", &args.keepalive.to_string()])
            .args(["--concurrency", &args.concurrency.to_string()]);
        if let Some(ip) = bind_of(k) {
            cmd.args(["--worker-bind", &ip.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning capacity worker")?;
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        workers.push(Worker {
            child,
            out,
            opened: 0,
        });
    }

    let mut connect_cpu_s = 0.0;
    let mut connect_wall_s = 0.0;
    let mut connected = 0usize;
    let mut failed = 0usize;
    let result = (|| -> Result<()> {
        for s in 1..=steps {
            let total = args.connections * s / steps;
            let cpu0 = tree_cpu(pid)?;
            let t0 = Instant::now();
            for (k, w) in workers.iter_mut().enumerate() {
                let want = share(total, procs, k) - w.opened;
                let stdin = w.child.stdin.as_mut().expect("piped stdin");
                writeln!(stdin, "OPEN {want}")?;
                stdin.flush()?;
                w.opened += want;
            }
            for w in workers.iter_mut() {
                let mut line = String::new();
                w.out.read_line(&mut line)?;
                let mut it = line.split_whitespace();
                if it.next() != Some("OK") {
                    bail!("capacity worker failed to report (got {line:?})");
                }
                connected += it.next().and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
                failed += it.next().and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
            }
            connect_wall_s += t0.elapsed().as_secs_f64();
            connect_cpu_s += tree_cpu(pid)? - cpu0;
            let (rss, settled) = settle_tree_rss(
                pid,
                64 * 1024,
                4,
                Duration::from_secs_f64(args.settle_timeout),
            )?;
            let step = Step {
                conns: connected,
                rss_bytes: rss,
                rss_settled: settled,
                fds: tree_fds(pid),
                broker_procs: tree_pids(pid).len(),
            };
            eprintln!(
                "capacity: step {s}/{steps}: {} connections ({failed} failed), RSS {}{}, {} fds",
                step.conns,
                super::project::fmt_bytes(rss as f64),
                if settled { "" } else { " (not settled)" },
                step.fds
            );
            samples.push(step);
        }
        Ok(())
    })();

    // Closing stdin tells the workers to drop their connections and exit.
    for w in workers.iter_mut() {
        drop(w.child.stdin.take());
    }
    for mut w in workers {
        let _ = w.child.wait();
    }
    result?;

    let mut msg_runs = Vec::new();
    let mut msg_errors = Vec::new();
    if args.msg_duration > 0.0 {
        // Let the broker finish tearing the idle connections down first.
        std::thread::sleep(Duration::from_secs(2));
        for qos in [0u8, 1] {
            match msg_run(args, pid, qos) {
                Ok(r) => {
                    eprintln!(
                        "capacity: QoS {qos}: {} delivered ({:.0}/s), broker CPU {:.2} s => {:.2} us/msg",
                        r.delivered, r.delivered_per_s, r.broker_cpu_s, r.cpu_us_per_msg
                    );
                    msg_runs.push(r);
                }
                Err(e) => {
                    eprintln!("capacity: QoS {qos} message run failed: {e:#}");
                    msg_errors.push(format!("QoS {qos}: {e:#}"));
                }
            }
        }
    }

    Ok(Measurement {
        broker_pid: pid,
        broker_cmdline: std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                b.split(|&c| c == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default(),
        steps: samples,
        requested: args.connections,
        connected,
        failed,
        worker_procs: procs,
        source_addrs: (0..procs)
            .filter_map(bind_of)
            .map(|a| a.to_string())
            .collect(),
        connect_cpu_s,
        connect_wall_s,
        msg_runs,
        msg_errors,
        host_loadavg_1m,
        host_cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    })
}

// ---------------------------------------------------------------- messages

/// Run `mqttd-bench pubsub` (alias of `pairs`; this binary) and charge the broker tree's CPU
/// time to the messages it delivered.
fn msg_run(args: &CapacityArgs, pid: u32, qos: u8) -> Result<MsgRun> {
    let exe = std::env::current_exe()?;
    let cpu0 = tree_cpu(pid)?;
    let out = Command::new(&exe)
        .arg("pubsub")
        .args(["--host", &args.host])
        .args(["--port", &args.port.to_string()])
        .args(["--pairs", &args.pairs.to_string()])
        .args(["--qos", &qos.to_string()])
        .args(["--payload", &args.payload.to_string()])
        .args(["--duration", &args.msg_duration.to_string()])
        .args(["--warmup", "1"])
        // Closed loop: a publisher may run at most this far ahead of its
        // subscriber, so the broker is not charged for a flood it drops.
        .args(["--max-lead", "1000"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running pubsub")?;
    let cpu = tree_cpu(pid)? - cpu0;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("pubsub exited with {}", out.status);
    }
    parse_pubsub_json(&stdout, qos, cpu, args)
}

/// Pull the delivered-message figures out of `pubsub`'s JSON line.
pub fn parse_pubsub_json(stdout: &str, qos: u8, cpu: f64, args: &CapacityArgs) -> Result<MsgRun> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON line in pubsub output")?;
    let v: serde_json::Value = serde_json::from_str(line).context("parsing pubsub JSON")?;
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
    // Whole-run deliveries (warm-up + measure + drain): the CPU sample spans
    // the whole child process too.
    // `delivered` (unique deliveries, `pairs` reports) or `total_received`
    // (older `pubsub` reports); `received` (measured window only) last.
    let delivered = num("delivered")
        .or_else(|| num("total_received"))
        .or_else(|| num("received"))
        .context("pubsub JSON has no received count")? as u64;
    if delivered == 0 {
        bail!("pubsub delivered no messages");
    }
    Ok(MsgRun {
        qos,
        pairs: args.pairs,
        payload: args.payload,
        delivered,
        delivered_per_s: num("received_per_s").unwrap_or(0.0),
        broker_cpu_s: cpu,
        cpu_us_per_msg: cpu * 1e6 / delivered as f64,
        lost: num("lost").unwrap_or(0.0) as i64,
    })
}

/// MQTT frame size of one benchmark PUBLISH (`bench/{i}` topics).
pub fn publish_frame(payload: usize, qos: u8) -> usize {
    wire::publish_size(Protocol::V4, "bench/99999".len(), qos, payload)
}

// ---------------------------------------------------------------- worker

/// Hidden child mode: hold idle connections, opening more on `OPEN n`.
pub fn run_worker(args: &CapacityArgs) -> Result<()> {
    let limit = procfs::raise_nofile_limit();
    let addr = resolve(&args.host, args.port)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut held: Vec<TcpStream> = Vec::new();
    let mut next_id = 0usize;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let Some(n) = line
            .strip_prefix("OPEN ")
            .and_then(|v| v.trim().parse::<usize>().ok())
        else {
            continue;
        };
        if held.len() + n + 16 > limit as usize {
            eprintln!(
                "capacity worker: open-file limit {limit} is below the {} connections asked",
                held.len() + n
            );
        }
        let (ok, failed, first_err) = rt.block_on(open_batch(
            addr,
            args.worker_bind,
            &args.worker_tag,
            &mut next_id,
            n,
            args,
        ));
        if let Some(e) = first_err {
            eprintln!("capacity worker: {failed} connections failed, first error: {e:#}");
        }
        let got = ok.len();
        held.extend(ok);
        writeln!(out, "OK {got} {failed}")?;
        out.flush()?;
    }
    drop(held);
    Ok(())
}

type Batch = (Vec<TcpStream>, usize, Option<anyhow::Error>);

async fn open_batch(
    addr: SocketAddr,
    bind: Option<IpAddr>,
    tag: &str,
    next_id: &mut usize,
    n: usize,
    args: &CapacityArgs,
) -> Batch {
    let mut set = tokio::task::JoinSet::new();
    let mut ok = Vec::with_capacity(n);
    let mut failed = 0;
    let mut first_err = None;
    let mut started = 0;
    let conc = args.concurrency.max(1);
    while started < n || !set.is_empty() {
        while started < n && set.len() < conc {
            let id = format!("cap{tag}-{}", *next_id);
            *next_id += 1;
            started += 1;
            let keepalive = args.keepalive;
            set.spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    connect_one(addr, bind, id, keepalive),
                )
                .await
                .context("connect timed out")?
            });
        }
        match set.join_next().await {
            Some(Ok(Ok(s))) => ok.push(s),
            Some(Ok(Err(e))) => {
                failed += 1;
                first_err.get_or_insert(e);
            }
            Some(Err(e)) => {
                failed += 1;
                first_err.get_or_insert(e.into());
            }
            None => {}
        }
    }
    (ok, failed, first_err)
}

/// TCP connect (from `bind` if given), CONNECT, wait for an accepting CONNACK.
async fn connect_one(
    addr: SocketAddr,
    bind: Option<IpAddr>,
    id: String,
    keepalive: u16,
) -> Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = bind {
        crate::scenarios::bind_source(&sock, ip)?;
    }
    let mut s = sock.connect(addr).await?;
    s.set_nodelay(true)?;
    let mut out = BytesMut::with_capacity(64);
    wire::encode_connect(&mut out, Protocol::V4, &id, keepalive);
    s.write_all(&out).await?;
    let mut buf = [0u8; 64];
    let mut len = 0;
    loop {
        let r = s.read(&mut buf[len..]).await?;
        if r == 0 {
            bail!("connection closed by broker before CONNACK");
        }
        len += r;
        if let Some(f) = wire::split_frame(&buf[..len], buf.len())? {
            if f.packet_type() != wire::CONNACK {
                bail!("expected CONNACK, got packet type {}", f.packet_type());
            }
            let ack = wire::decode_connack(Protocol::V4, f.body(&buf[..len]))?;
            if ack.code != 0 {
                bail!("CONNACK refused with code {:#x}", ack.code);
            }
            return Ok(s);
        }
        if len == buf.len() {
            bail!("oversized CONNACK");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for total in [0, 1, 7, 20_000, 19_999] {
            for procs in 1..5 {
                let s: usize = (0..procs).map(|k| share(total, procs, k)).sum();
                assert_eq!(s, total);
            }
        }
        // shares only grow from step to step, so OPEN deltas are never negative
        for k in 0..3 {
            assert!(share(2000, 3, k) <= share(4000, 3, k));
        }
    }

    #[test]
    fn pubsub_json_is_parsed_from_either_report_shape() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: CapacityArgs,
        }
        let args = P::parse_from(["x", "--broker-pid", "1"]).a;
        let new = "table\n{\"scenario\":\"pairs\",\"delivered\":2000,\"received\":1000,\"received_per_s\":100.0,\"lost\":0}\n";
        let r = parse_pubsub_json(new, 1, 0.004, &args).unwrap();
        assert_eq!(r.delivered, 2000);
        assert!((r.cpu_us_per_msg - 2.0).abs() < 1e-9);
        let old = "{\"scenario\":\"pubsub\",\"total_received\":4000,\"received\":10}";
        assert_eq!(
            parse_pubsub_json(old, 0, 1.0, &args).unwrap().delivered,
            4000
        );
        assert!(parse_pubsub_json("no json", 0, 1.0, &args).is_err());
        assert!(parse_pubsub_json("{\"delivered\":0}", 0, 1.0, &args).is_err());
    }

    #[test]
    fn ppid_parsing_handles_spaces_in_comm() {
        assert_eq!(parse_ppid("123 (a b) c) S 45 1 2"), Some(45));
        assert_eq!(parse_ppid("1 (init) S 0 1 1"), Some(0));
    }

    #[test]
    fn own_process_tree_is_found() {
        let me = std::process::id();
        assert_eq!(tree_pids(me)[0], me);
        assert!(tree_rss(me).unwrap().0 > 0);
        assert!(tree_fds(me) > 0);
    }
}
