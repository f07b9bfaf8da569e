//! Test harness: runs the real `mqttd` binary on a free port and stops it by PID.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod raw;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod clients;
pub mod procs;
pub mod prom;
pub mod redis;

/// A running broker process. Dropping it stops the process and checks it had not died.
pub struct Broker {
    child: Child,
    pub addr: SocketAddr,
    /// The HTTP metrics endpoint (`/metrics`, `/health`, `/ready`).
    pub metrics_addr: SocketAddr,
    /// The MQTT-over-QUIC (UDP) address, from `mqttd listening quic ADDR`.
    pub quic_addr: Option<SocketAddr>,
    /// The MQTT-over-TLS, WebSocket and WebSocket-over-TLS addresses of the listeners a test
    /// turned on (`tls.enabled=true`, ...), from `mqttd listening tls|ws|wss ADDR`.
    pub tls_addr: Option<SocketAddr>,
    pub ws_addr: Option<SocketAddr>,
    pub wss_addr: Option<SocketAddr>,
    /// Stopped on purpose by the test (by a signal): Drop does not call that a crash.
    stopped: bool,
    /// A second host of the same broker (`MQTTD_TEST_REDIS_HOSTS=2`): clients are spread
    /// over both, [`Broker::port`] answering each host in turn.
    second: Option<Box<Broker>>,
    turn: std::sync::atomic::AtomicUsize,
}

/// Worker processes per broker in tests: `MQTTD_TEST_WORKERS`, default 1 (until
/// cross-worker routing lands, clients on different workers cannot see each other).
pub fn test_workers() -> u16 {
    std::env::var("MQTTD_TEST_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with(&[])
    }

    /// Starts mqttd with extra `--set key=value` overrides, e.g. `limits.max_inflight=2`,
    /// and [`test_workers`] workers.
    pub fn start_with(sets: &[&str]) -> Broker {
        Broker::start_workers(test_workers(), sets)
    }

    /// Starts mqttd with `workers` worker processes; returns once it printed
    /// `mqttd listening tcp ADDR` and `mqttd listening metrics ADDR` (every worker is ready).
    pub fn start_workers(workers: u16, sets: &[&str]) -> Broker {
        Broker::start_exe(env!("CARGO_BIN_EXE_mqttd").as_ref(), workers, sets)
    }

    /// As [`Broker::start_workers`], running the binary at `exe` (the supervisor re-execs
    /// that path for every worker it starts later).
    ///
    /// With `MQTTD_TEST_REDIS_URL` set (tests/run-all.sh) the broker runs in Redis mode, on
    /// a key prefix of its own (the brokers of tests running at once are not hosts of one
    /// cluster); with `MQTTD_TEST_REDIS_HOSTS=2` as well, it is two hosts on that prefix,
    /// and clients are spread over both ([`Broker::port`]).
    pub fn start_exe(exe: &std::path::Path, workers: u16, sets: &[&str]) -> Broker {
        static BROKERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = BROKERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("test-{}-{n}", std::process::id());
        let mut broker = Broker::start_host(exe, workers, sets, &prefix);
        let two = std::env::var("MQTTD_TEST_REDIS_HOSTS").is_ok_and(|h| h == "2");
        if two && std::env::var("MQTTD_TEST_REDIS_URL").is_ok() {
            broker.second = Some(Box::new(Broker::start_host(exe, workers, sets, &prefix)));
        }
        broker
    }

    fn start_host(exe: &std::path::Path, workers: u16, sets: &[&str], prefix: &str) -> Broker {
        let mut cmd = Command::new(exe);
        cmd.args([
            "--bind",
            "127.0.0.1:0",
            "--log-level",
            "mqttd_broker=debug,info",
            "--workers",
            &workers.to_string(),
            "--set",
            "metrics.bind=\"127.0.0.1:0\"",
            "--set",
            "quic.bind=\"127.0.0.1:0\"",
        ]);
        let redis = std::env::var("MQTTD_TEST_REDIS_URL").ok();
        if let Some(url) = &redis {
            cmd.args(["--set", "cluster.backend=\"redis\""]);
            cmd.args(["--set", &format!("redis.url=\"{url}\"")]);
            cmd.args(["--set", &format!("redis.prefix=\"{prefix}\"")]);
        }
        for s in sets {
            cmd.args(["--set", s]);
        }
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mqttd");
        // Owned by the guard from here on, so a failed start still kills the process.
        let mut broker = Broker {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            quic_addr: None,
            tls_addr: None,
            ws_addr: None,
            wss_addr: None,
            stopped: false,
            second: None,
            turn: std::sync::atomic::AtomicUsize::new(0),
        };
        let stdout = broker.child.stdout.take().expect("stdout");
        // Once every worker is ready the broker prints "mqttd listening tcp ADDR", then the
        // QUIC, TLS, WebSocket and metrics lines (QUIC and metrics unless a test turned them
        // off, the others if it turned them on); read until all are known.
        let set_to = |key: &str, value: &str| {
            sets.iter()
                .any(|s| s.replace(' ', "") == format!("{key}={value}"))
        };
        let off = |key: &str| set_to(key, "false");
        let (mut tcp, mut quic, mut metrics) = (false, off("quic.enabled"), off("metrics.enabled"));
        let [mut tls, mut ws, mut wss] =
            ["tls", "ws", "wss"].map(|name| !set_to(&format!("{name}.enabled"), "true"));
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        loop {
            line.clear();
            let n = reader.read_line(&mut line).expect("read mqttd stdout");
            assert!(n > 0, "mqttd exited before listening");
            let l = line.trim();
            if let Some(addr) = l.strip_prefix("mqttd listening tcp ") {
                broker.addr = addr.parse().expect("listen address");
                tcp = true;
            } else if let Some(addr) = l.strip_prefix("mqttd listening quic ") {
                broker.quic_addr = Some(addr.parse().expect("quic address"));
                quic = true;
            } else if let Some(addr) = l.strip_prefix("mqttd listening tls ") {
                broker.tls_addr = Some(addr.parse().expect("tls address"));
                tls = true;
            } else if let Some(addr) = l.strip_prefix("mqttd listening ws ") {
                broker.ws_addr = Some(addr.parse().expect("ws address"));
                ws = true;
            } else if let Some(addr) = l.strip_prefix("mqttd listening wss ") {
                broker.wss_addr = Some(addr.parse().expect("wss address"));
                wss = true;
            } else if let Some(addr) = l.strip_prefix("mqttd listening metrics ") {
                broker.metrics_addr = addr.parse().expect("metrics address");
                metrics = true;
            }
            if tcp && quic && tls && ws && wss && metrics {
                // Keep draining stdout so the broker never blocks on a full pipe.
                std::thread::spawn(move || for _ in reader.lines() {});
                return broker;
            }
        }
    }

    /// The MQTT port, of each host in turn when the broker has two.
    pub fn port(&self) -> u16 {
        match &self.second {
            Some(second) => {
                let turn = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if turn & 1 == 0 {
                    self.addr.port()
                } else {
                    second.addr.port()
                }
            }
            None => self.addr.port(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics if the broker process has exited.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("mqttd died: {status}");
        }
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.wait_exit()
    }

    /// Sends `kill -SIG` (e.g. "HUP", "KILL") to the supervisor.
    pub fn signal(&mut self, sig: &str) {
        if sig == "KILL" || sig == "TERM" || sig == "INT" {
            self.stopped = true;
        }
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits (bounded) for the supervisor to exit; returns its exit status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "mqttd did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let crashed = self.child.try_wait().ok().flatten();
        if crashed.is_none() {
            // SIGTERM first, so the supervisor drains its workers and removes its mesh dir;
            // SIGKILL (below) only if that takes too long.
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(status) = crashed {
            if !std::thread::panicking() && !status.success() && !self.stopped {
                panic!("mqttd had died during the test: {status}");
            }
        }
    }
}
