//! One worker's metrics in the Prometheus text exposition format 0.0.4, and the task that
//! hands them to the supervisor, which serves the whole broker's `/metrics`.
//!
//! [`WorkerMetrics`] is a plain snapshot: `Engine::metrics` (engine/gauges.rs) fills it
//! from the engine while the engine is borrowed, [`ProcessMetrics::read`] adds what
//! `/proc/self` says, and [`WorkerMetrics::render`] writes the text without any borrow.
//! Samples carry no `worker` label: the supervisor adds `worker="i"` when it merges the
//! workers' families (supervisor/src/metrics_http.rs).
//!
//! # Scrape protocol
//!
//! The supervisor gives every worker process one end of a Unix stream socketpair, at
//! fd 4 (`--metrics-fd 4`). It sends one request at a time and waits for its reply:
//!
//! ```text
//! request:  metrics\n
//! reply:    ok <len>\n<len bytes of exposition text>
//!       or  err <len>\n<len bytes of error message>     (an unknown request)
//! ```
//!
//! `<len>` is decimal. The worker stops serving when the supervisor closes its end.

use std::cell::RefCell;
use std::fmt::{Display, Write as _};
use std::os::fd::OwnedFd;
use std::rc::Rc;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::engine::{Engine, Stats};
use crate::model::{StoreStats, ROUND_TRIP_MICROS_BUCKETS};

pub use crate::config::MetricsConfig;

/// Memory one connection may cost in the capacity model (the seeds' 20 KB per connection).
pub const CONNECTION_MODEL_BYTES: u64 = crate::engine::MODEL_BYTES as u64;

pub use crate::histogram::{Histogram, ACCOUNTED_BYTES_BUCKETS};

/// The request line of the scrape protocol.
pub const SCRAPE_REQUEST: &str = "metrics\n";

/// What one worker exports. Counters come from the engine's [`Stats`]; the fields marked
/// "filled by the accountant" are the limits and memory accounting.
#[derive(Debug, Clone, Default)]
pub struct WorkerMetrics {
    /// Connections whose CONNECT was accepted.
    pub connections: u64,
    pub connection_limit: u64,
    pub sessions: u64,
    pub subscriptions: u64,
    /// Entries of the cluster route table (this worker's replica).
    pub routes: u64,
    pub retained_messages: u64,
    /// Messages waiting in session queues (offline, or window full).
    pub queued_messages: u64,
    /// QoS 1/2 messages sent and not yet acknowledged.
    pub inflight_messages: u64,
    /// `limits.memory_high_watermark_bytes` (0 = off).
    pub memory_high_watermark_bytes: u64,
    /// Refused connections by reason.
    pub connections_refused: Vec<(&'static str, u64)>,
    pub stats: Stats,
    /// Bytes the accountant charges to this worker's connections.
    pub accounted_bytes: u64,
    /// Bytes one connection may use before the accountant acts.
    pub connection_budget_bytes: u64,
    /// Accounted bytes of each current connection: a snapshot rebuilt per scrape (the
    /// dashboard takes quantiles of the raw buckets, not of their rate).
    pub connection_accounted_bytes: Histogram,
    /// Rate-limit hits by kind.
    pub rate_limited: Vec<(&'static str, u64)>,
    pub slow_consumer_disconnects: u64,
    pub auth_failures: u64,
    /// The Redis link, in `cluster.backend = "redis"`.
    pub store: Option<StoreStats>,
    /// Per listener (transport driver).
    pub transports: Vec<TransportMetrics>,
}

/// One transport driver's connections (`transport` label: tcp, tls, ws, wss, quic).
#[derive(Debug, Clone, Default)]
pub struct TransportMetrics {
    pub transport: &'static str,
    /// Open connections (with or without a CONNECT yet).
    pub connections: u64,
    pub accepted: u64,
    /// Connections its protocol layers gave up on, by reason.
    pub errors: Vec<(&'static str, u64)>,
}

/// The worker process as `/proc/self` shows it. A value that cannot be read is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessMetrics {
    pub resident_memory_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub cpu_seconds: f64,
}

impl ProcessMetrics {
    pub fn read() -> ProcessMetrics {
        // SAFETY: sysconf and getrlimit only write to the struct we pass.
        let (page, ticks, max_fds) = unsafe {
            let mut limit: libc::rlimit = std::mem::zeroed();
            let max_fds = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur
            } else {
                0
            };
            (
                libc::sysconf(libc::_SC_PAGESIZE).max(0) as u64,
                libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
                max_fds,
            )
        };
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let resident_pages: u64 = field(&statm, 1).unwrap_or(0);
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // "pid (comm) state ppid ...": comm may hold spaces, so count after its ')'.
        // utime and stime are fields 14 and 15 of the line, 11 and 12 after the ')'.
        let after_comm = stat.rfind(')').map_or("", |at| &stat[at + 1..]);
        let utime: u64 = field(after_comm, 11).unwrap_or(0);
        let stime: u64 = field(after_comm, 12).unwrap_or(0);
        // The listing holds the descriptor that reads it: not counted.
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|dir| dir.count().saturating_sub(1) as u64)
            .unwrap_or(0);
        ProcessMetrics {
            resident_memory_bytes: resident_pages * page,
            open_fds,
            max_fds,
            cpu_seconds: (utime + stime) as f64 / ticks,
        }
    }
}

fn field<T: std::str::FromStr>(line: &str, index: usize) -> Option<T> {
    line.split_whitespace().nth(index)?.parse().ok()
}

/// Writes families: `# HELP`, `# TYPE`, then the samples.
struct Exposition<'a> {
    out: &'a mut String,
}

impl Exposition<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = write!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        self
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                // Label values here are fixed identifiers: nothing to escape.
                let _ = write!(self.out, "{label}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.family(name, kind, help).sample(name, &[], value);
    }

    fn labelled(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        values: &[(&str, u64)],
    ) {
        self.family(name, kind, help);
        for (v, n) in values {
            self.sample(name, &[(label, v)], n);
        }
    }
}

impl WorkerMetrics {
    /// Appends every family to `out`, in the text exposition format 0.0.4.
    pub fn render(&self, process: &ProcessMetrics, out: &mut String) {
        let s = &self.stats;
        let mut w = Exposition { out };
        let gauges: [(&str, &str, u64); 12] = [
            ("mqttd_connections", "Client connections whose CONNECT was accepted.", self.connections),
            ("mqttd_connection_limit", "Connections one worker accepts (limits.max_connections_per_worker).", self.connection_limit),
            ("mqttd_sessions", "Sessions, online and offline.", self.sessions),
            ("mqttd_subscriptions", "Subscriptions, plain and shared.", self.subscriptions),
            ("mqttd_routes", "Entries of this worker's replica of the cluster route table.", self.routes),
            ("mqttd_retained_messages", "Retained messages.", self.retained_messages),
            ("mqttd_queued_messages", "Messages waiting in session queues.", self.queued_messages),
            ("mqttd_inflight_messages", "QoS 1/2 messages sent and not yet acknowledged.", self.inflight_messages),
            ("mqttd_accounted_bytes", "Memory the accountant charges to this worker's connections.", self.accounted_bytes),
            ("mqttd_connection_model_bytes", "Memory per connection in the capacity model.", CONNECTION_MODEL_BYTES),
            ("mqttd_connection_budget_bytes", "Memory one connection may use.", self.connection_budget_bytes),
            ("mqttd_memory_high_watermark_bytes", "Worker memory above which load is shed (limits.memory_high_watermark_bytes; 0 = off).", self.memory_high_watermark_bytes),
        ];
        for (name, help, value) in gauges {
            w.single(name, "gauge", help, value);
        }
        w.single(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            process.resident_memory_bytes,
        );
        w.single(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            process.open_fds,
        );
        w.single(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            process.max_fds,
        );
        w.single(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            process.cpu_seconds,
        );

        let counters: [(&str, &str, u64); 12] = [
            (
                "mqttd_connections_accepted_total",
                "TCP connections accepted.",
                s.connections_accepted,
            ),
            (
                "mqttd_accept_errors_total",
                "accept(2) failures (EMFILE, ENFILE, ...).",
                s.accept_errors,
            ),
            (
                "mqttd_bytes_received_total",
                "Bytes read from clients.",
                s.bytes_received,
            ),
            (
                "mqttd_bytes_sent_total",
                "Bytes written to clients.",
                s.bytes_sent,
            ),
            (
                "mqttd_handoffs_total",
                "Connections handed to the worker owning their client id.",
                s.handed_off,
            ),
            (
                "mqttd_protocol_errors_total",
                "Connections closed for a protocol violation or a malformed packet.",
                s.protocol_errors,
            ),
            (
                "mqttd_keepalive_timeouts_total",
                "Connections closed by the keep-alive timer.",
                s.keepalive_timeouts,
            ),
            (
                "mqttd_barrier_timeouts_total",
                "Cluster barriers given up after cluster.barrier_timeout_ms: a peer did not confirm.",
                s.barrier_timeouts,
            ),
            (
                "mqttd_claim_timeouts_total",
                "CONNECTs that went on without their client id claimed across hosts in time (Redis down, old owner gone).",
                s.claim_timeouts,
            ),
            (
                "mqttd_takeovers_total",
                "Connections taken over by a new connection with the same client id.",
                s.takeovers,
            ),
            (
                "mqttd_slow_consumer_disconnects_total",
                "Clients disconnected for not reading their messages.",
                self.slow_consumer_disconnects,
            ),
            (
                "mqttd_auth_failures_total",
                "CONNECTs refused for bad credentials.",
                self.auth_failures,
            ),
        ];
        for (name, help, value) in counters {
            w.single(name, "counter", help, value);
        }
        render_transports(&mut w, &self.transports);
        w.labelled(
            "mqttd_connections_refused_total",
            "counter",
            "CONNECTs refused, by reason.",
            "reason",
            &self.connections_refused,
        );
        let by_qos = |counts: &[u64; 3]| [("0", counts[0]), ("1", counts[1]), ("2", counts[2])];
        w.labelled(
            "mqttd_messages_received_total",
            "counter",
            "PUBLISH packets received from clients, by QoS.",
            "qos",
            &by_qos(&s.messages_received),
        );
        w.labelled(
            "mqttd_messages_sent_total",
            "counter",
            "PUBLISH packets sent to clients, by QoS.",
            "qos",
            &by_qos(&s.messages_sent),
        );
        w.labelled(
            "mqttd_messages_dropped_total",
            "counter",
            "Messages not delivered, by reason.",
            "reason",
            &[
                ("qos0_backlog", s.dropped_qos0_backlog),
                ("queue_full", s.dropped_queue_full),
                ("expired", s.dropped_expired),
                ("too_large", s.dropped_too_large),
                ("session_end", s.dropped_on_session_end),
                ("over_budget", s.dropped_over_budget),
                ("mesh_backlog", s.dropped_mesh_backlog),
            ],
        );
        w.labelled(
            "mqttd_forwarded_messages_total",
            "counter",
            "Messages sent to (out) and received from (in) other workers.",
            "direction",
            &[("out", s.forwarded), ("in", s.forwarded_in)],
        );
        w.labelled(
            "mqttd_backpressure_pauses_total",
            "counter",
            "Sources paused because a destination was behind, by source.",
            "source",
            &[("client", s.publishers_paused), ("peer", s.peer_links_held)],
        );
        w.labelled(
            "mqttd_rate_limited_total",
            "counter",
            "Rate-limit hits, by kind.",
            "kind",
            &self.rate_limited,
        );

        let h = &self.connection_accounted_bytes;
        let name = "mqttd_connection_accounted_bytes";
        w.family(
            name,
            "histogram",
            "Memory the accountant charges to each connection.",
        );
        let mut cumulative = 0;
        for (bound, n) in ACCOUNTED_BYTES_BUCKETS.iter().zip(h.buckets) {
            cumulative += n;
            w.sample(
                "mqttd_connection_accounted_bytes_bucket",
                &[("le", &bound.to_string())],
                cumulative,
            );
        }
        w.sample(
            "mqttd_connection_accounted_bytes_bucket",
            &[("le", "+Inf")],
            h.count(),
        );
        w.sample("mqttd_connection_accounted_bytes_sum", &[], h.sum);
        w.sample("mqttd_connection_accounted_bytes_count", &[], h.count());
        if let Some(store) = &self.store {
            render_store(&mut w, store);
        }
    }
}

/// The Redis link's families (`cluster.backend = "redis"` only).
fn render_transports(w: &mut Exposition<'_>, transports: &[TransportMetrics]) {
    let name = "mqttd_transport_connections";
    w.family(name, "gauge", "Open connections, by listener transport.");
    for t in transports {
        w.sample(name, &[("transport", t.transport)], t.connections);
    }
    let name = "mqttd_transport_connections_accepted_total";
    w.family(
        name,
        "counter",
        "Connections accepted, by listener transport.",
    );
    for t in transports {
        w.sample(name, &[("transport", t.transport)], t.accepted);
    }
    let name = "mqttd_transport_errors_total";
    w.family(
        name,
        "counter",
        "Connections closed for breaking their transport's protocol (TLS handshake, WebSocket upgrade or framing), by transport and reason.",
    );
    for t in transports {
        for (reason, n) in &t.errors {
            w.sample(name, &[("transport", t.transport), ("reason", reason)], n);
        }
    }
}

fn render_store(w: &mut Exposition<'_>, s: &StoreStats) {
    let gauges: [(&str, &str, u64); 3] = [
        (
            "mqttd_redis_up",
            "1 when Redis answered the last command sent to it.",
            u64::from(s.up),
        ),
        (
            "mqttd_redis_pipeline_depth",
            "Commands in the latest pipeline sent to Redis.",
            s.pipeline_depth,
        ),
        (
            "mqttd_redis_queued_bytes",
            "Bytes waiting to be written to Redis (forwards to other hosts, changes).",
            s.queued_bytes,
        ),
    ];
    for (name, help, value) in gauges {
        w.single(name, "gauge", help, value);
    }
    let counters: [(&str, &str, u64); 3] = [
        (
            "mqttd_redis_commands_total",
            "Commands sent to Redis (pipelined).",
            s.commands,
        ),
        (
            "mqttd_redis_reconnects_total",
            "Connections to Redis opened again after a failure.",
            s.reconnects,
        ),
        (
            "mqttd_redis_round_trips_total",
            "Round trips to Redis (a pipeline is one).",
            s.round_trips,
        ),
    ];
    for (name, help, value) in counters {
        w.single(name, "counter", help, value);
    }
    w.labelled(
        "mqttd_redis_messages_total",
        "counter",
        "Messages written to Redis for other hosts (out) and read from it (in).",
        "direction",
        &[("out", s.messages_out), ("in", s.messages_in)],
    );
    let name = "mqttd_redis_round_trip_seconds";
    w.family(name, "histogram", "Latency of round trips to Redis.");
    let mut cumulative = 0;
    for (bound, n) in ROUND_TRIP_MICROS_BUCKETS.iter().zip(s.round_trip_buckets) {
        cumulative += n;
        let le = format!("{}", *bound as f64 / 1e6);
        w.sample(
            "mqttd_redis_round_trip_seconds_bucket",
            &[("le", &le)],
            cumulative,
        );
    }
    w.sample(
        "mqttd_redis_round_trip_seconds_bucket",
        &[("le", "+Inf")],
        s.round_trips,
    );
    w.sample(
        "mqttd_redis_round_trip_seconds_sum",
        &[],
        s.round_trip_micros_sum as f64 / 1e6,
    );
    w.sample("mqttd_redis_round_trip_seconds_count", &[], s.round_trips);
}

/// Answers the supervisor's scrapes on `channel` (see the module docs) until it closes.
/// Runs as a local task of the worker: the engine is borrowed only while a snapshot is
/// taken, never across an await.
pub async fn serve(channel: OwnedFd, engine: Rc<RefCell<Engine>>) {
    if let Err(e) = serve_inner(channel, engine).await {
        tracing::warn!("metrics channel: {e}");
    }
}

async fn serve_inner(channel: OwnedFd, engine: Rc<RefCell<Engine>>) -> std::io::Result<()> {
    let stream = std::os::unix::net::UnixStream::from(channel);
    stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let (status, body) = if line == SCRAPE_REQUEST {
            let snapshot = engine.borrow().metrics();
            let mut text = String::with_capacity(8 * 1024);
            snapshot.render(&ProcessMetrics::read(), &mut text);
            ("ok", text)
        } else {
            ("err", format!("unknown request {:?}", line.trim_end()))
        };
        let mut reply = format!("{status} {}\n", body.len()).into_bytes();
        reply.extend_from_slice(body.as_bytes());
        writer.write_all(&reply).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_bounds() {
        let mut h = Histogram::default();
        for v in [0, 256, 257, 20480, 65536, 65537] {
            h.observe(v);
        }
        assert_eq!(h.buckets, [2, 1, 0, 0, 0, 0, 0, 1, 0, 1, 1]);
        assert_eq!(h.count(), 6);
        assert_eq!(h.sum, 256 + 257 + 20480 + 65536 + 65537);
    }

    #[test]
    fn renders_every_family_once_with_help_and_type() {
        let mut m = WorkerMetrics::default();
        m.stats.messages_received = [3, 2, 1];
        m.connection_accounted_bytes.observe(1000);
        let mut text = String::new();
        m.render(&ProcessMetrics::read(), &mut text);
        assert!(text.contains("mqttd_messages_received_total{qos=\"1\"} 2\n"));
        assert!(text.contains("mqttd_connection_accounted_bytes_bucket{le=\"512\"} 0\n"));
        assert!(text.contains("mqttd_connection_accounted_bytes_bucket{le=\"1024\"} 1\n"));
        assert!(text.contains("mqttd_connection_accounted_bytes_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains("mqttd_connection_model_bytes 20480\n"));
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let mut unique = types.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(types.len(), unique.len());
        assert_eq!(
            text.lines().filter(|l| l.starts_with("# HELP ")).count(),
            types.len()
        );
    }

    #[test]
    fn process_metrics_come_from_proc_self() {
        let p = ProcessMetrics::read();
        assert!(p.resident_memory_bytes > 0);
        assert!(p.open_fds >= 3, "stdin, stdout, stderr at least");
        assert!(p.max_fds >= p.open_fds);
    }
}
