//! `idle` scenario: measure broker memory per idle connection.
//!
//! The parent re-executes itself as `--procs` hidden `idle-worker` children
//! (the per-process open-file limit is 20,000 here), each opening its share of
//! connections from its own loopback source address (127.0.0.2, 127.0.0.3, …,
//! bound before connect so ephemeral ports do not run out). Every connection
//! sends CONNECT (keep-alive 600 s), optionally one SUBSCRIBE, and then sits
//! idle. The parent samples the broker's VmRSS before and after (waiting for
//! it to settle) and reports (after - before) / connections.

use crate::procfs;
use crate::report::{self, IdleReport};
use crate::scenarios::{mqtt_connect, mqtt_subscribe, resolve, tcp_connect, ReadBuf};
use crate::wire::Protocol;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Total idle connections to open.
    #[arg(long, default_value_t = 15_000)]
    pub connections: usize,
    /// Broker PID whose VmRSS is measured. Use a freshly started broker:
    /// memory freed by earlier connections is reused and hides the growth.
    #[arg(long)]
    pub broker_pid: u32,
    /// Child processes to spread the connections over.
    #[arg(long, default_value_t = 4)]
    pub procs: usize,
    /// Source addresses to use, 127.0.0.2 upwards (default: one per child).
    /// Use 0 to let the kernel choose (no bind before connect).
    #[arg(long)]
    pub addrs: Option<usize>,
    /// MQTT protocol level: 4 (3.1.1) or 5 (5.0).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(4..=5))]
    pub protocol: u8,
    /// Give each connection one subscription (`idle/{n}`, QoS 0).
    #[arg(long)]
    pub subscribe: bool,
    /// Keep-alive sent in CONNECT.
    #[arg(long, default_value_t = 600)]
    pub keepalive: u16,
    /// Connections each child handshakes concurrently.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Max seconds to wait for the broker's RSS to settle.
    #[arg(long, default_value_t = 60.0)]
    pub settle_timeout: f64,
    /// Seconds to keep the connections open after measuring.
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
}

/// Hidden child-process mode of `idle`.
#[derive(clap::Args, Debug, Clone)]
pub struct IdleWorkerArgs {
    #[arg(long)]
    pub host: String,
    #[arg(long)]
    pub port: u16,
    #[arg(long)]
    pub count: usize,
    /// Index of the first connection (client ids are unique across children).
    #[arg(long)]
    pub first: usize,
    #[arg(long)]
    pub bind: Option<IpAddr>,
    #[arg(long)]
    pub protocol: u8,
    #[arg(long)]
    pub subscribe: bool,
    #[arg(long)]
    pub keepalive: u16,
    #[arg(long)]
    pub concurrency: usize,
    /// Tag making client ids unique per run.
    #[arg(long)]
    pub tag: String,
}

pub fn run(args: IdleArgs) -> Result<()> {
    if args.procs == 0 || args.connections == 0 {
        bail!("--procs and --connections must be positive");
    }
    let pid = args.broker_pid;
    let exe = std::env::current_exe()?;
    let naddrs = args.addrs.unwrap_or(args.procs);
    let addr_of = |k: usize| -> Option<IpAddr> {
        (naddrs > 0).then(|| IpAddr::from([127, 0, 0, (2 + k % naddrs) as u8]))
    };

    eprintln!("waiting for broker RSS to settle before connecting...");
    let (before, _) = procfs::settle_rss(
        pid,
        Duration::from_millis(250),
        4,
        16 * 1024,
        Duration::from_secs(10),
    )?;

    let loadavg = report::loadavg_1m();
    let tag = format!("{}", std::process::id());
    let t0 = Instant::now();
    let mut children = Vec::new();
    let per = args.connections / args.procs;
    let extra = args.connections % args.procs;
    let mut first = 0;
    for k in 0..args.procs {
        let count = per + usize::from(k < extra);
        let mut cmd = Command::new(&exe);
        cmd.arg("idle-worker")
            .args(["--host", &args.host])
            .args(["--port", &args.port.to_string()])
            .args(["--count", &count.to_string()])
            .args(["--first", &first.to_string()])
            .args(["--protocol", &args.protocol.to_string()])
            .args(["--keepalive", &args.keepalive.to_string()])
            .args(["--concurrency", &args.concurrency.to_string()])
            .args(["--tag", &tag]);
        if let Some(ip) = addr_of(k) {
            cmd.args(["--bind", &ip.to_string()]);
        }
        if args.subscribe {
            cmd.arg("--subscribe");
        }
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning idle-worker")?;
        children.push(child);
        first += count;
    }

    // Each child prints "READY <ok> <failed>" once its connections are up.
    let mut ok = 0usize;
    let mut failed = 0usize;
    for child in children.iter_mut() {
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped stdout")).read_line(&mut line)?;
        let mut it = line.split_whitespace();
        if it.next() != Some("READY") {
            bail!("idle-worker failed to report (got {line:?})");
        }
        ok += it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        failed += it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    }
    let connect_s = t0.elapsed().as_secs_f64();
    eprintln!("{ok} connections up ({failed} failed) in {connect_s:.2} s; waiting for broker RSS to settle...");

    let (after, settled) = procfs::settle_rss(
        pid,
        Duration::from_millis(500),
        6,
        64 * 1024,
        Duration::from_secs_f64(args.settle_timeout),
    )?;
    if args.hold > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(args.hold));
    }

    // Closing stdin tells the children to exit (and drop their sockets).
    for child in children.iter_mut() {
        drop(child.stdin.take());
    }
    for mut child in children {
        let _ = child.wait();
    }

    let report = IdleReport {
        scenario: "idle",
        host: args.host.clone(),
        port: args.port,
        protocol: args.protocol,
        subscribe: args.subscribe,
        procs: args.procs,
        source_addrs: (0..args.procs.min(naddrs))
            .filter_map(addr_of)
            .map(|a| a.to_string())
            .collect(),
        requested: args.connections,
        connected: ok,
        failed,
        connect_s,
        connects_per_s: ok as f64 / connect_s,
        broker_pid: pid,
        rss_before_bytes: before,
        rss_after_bytes: after,
        rss_settled: settled,
        host_loadavg_1m: loadavg,
        bytes_per_connection: if ok > 0 {
            (after as f64 - before as f64) / ok as f64
        } else {
            0.0
        },
    };
    report.print();
    Ok(())
}

pub fn run_worker(args: IdleWorkerArgs) -> Result<()> {
    let limit = procfs::raise_nofile_limit();
    if (limit as usize) < args.count + 16 {
        eprintln!(
            "warning: open-file limit {limit} is below the {} connections asked of this worker",
            args.count
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let (streams, failed, first_err) = local.block_on(&rt, open_all(&args))?;
    if let Some(e) = first_err {
        eprintln!("idle-worker: {failed} connections failed, first error: {e:#}");
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY {} {}", streams.len(), failed)?;
    out.flush()?;
    drop(out);
    // Sit idle until the parent closes our stdin.
    let mut sink = [0u8; 64];
    while std::io::stdin().read(&mut sink).unwrap_or(0) > 0 {}
    drop(streams);
    Ok(())
}

type Opened = (Vec<tokio::net::TcpStream>, usize, Option<anyhow::Error>);

async fn open_all(args: &IdleWorkerArgs) -> Result<Opened> {
    let addr = resolve(&args.host, args.port)?;
    let proto = Protocol::from_level(args.protocol)?;
    let mut streams = Vec::with_capacity(args.count);
    let mut failed = 0;
    let mut first_err = None;
    let mut next = 0;
    while next < args.count {
        let batch = args.concurrency.max(1).min(args.count - next);
        let mut handles = Vec::with_capacity(batch);
        for j in next..next + batch {
            let n = args.first + j;
            let id = format!("mbi{}-{n}", args.tag);
            let bind = args.bind;
            let (subscribe, keepalive) = (args.subscribe, args.keepalive);
            handles.push(tokio::task::spawn_local(async move {
                let mut s = tcp_connect(addr, bind).await?;
                let mut rb = ReadBuf::new(256);
                mqtt_connect(&mut s, &mut rb, proto, &id, keepalive).await?;
                if subscribe {
                    mqtt_subscribe(&mut s, &mut rb, proto, &format!("idle/{n}"), 0).await?;
                }
                anyhow::Ok(s)
            }));
        }
        for h in handles {
            match h.await? {
                Ok(s) => streams.push(s),
                Err(e) => {
                    failed += 1;
                    first_err.get_or_insert(e);
                }
            }
        }
        next += batch;
    }
    Ok((streams, failed, first_err))
}
