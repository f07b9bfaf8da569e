//! Result reporting: every scenario produces a serialisable report that is
//! printed as a human-readable table followed by exactly one JSON line
//! (`{"scenario":...}`), so scripts (and the future capacity planner) can
//! `grep '^{'` the last line and parse it.

use serde::Serialize;

/// Figures from the `pubsub` scenario.
#[derive(Debug, Clone, Serialize)]
pub struct PubSubReport {
    pub scenario: &'static str,
    pub host: String,
    pub port: u16,
    pub protocol: u8,
    pub qos: u8,
    pub pairs: usize,
    pub payload_bytes: usize,
    pub inflight: usize,
    /// Publisher lead bound over its subscriber (0 = unlimited flood).
    pub max_lead: u64,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Messages written by publishers during the measured window.
    pub sent: u64,
    /// Messages received by subscribers during the measured window.
    pub received: u64,
    pub sent_per_s: f64,
    pub received_per_s: f64,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    pub latency_p999_us: f64,
    pub latency_max_us: f64,
    /// Whole run (warm-up + measure + drain): messages published, and for QoS 1 acknowledged.
    pub total_published: u64,
    pub total_acked: u64,
    pub total_received: u64,
    /// total_published - total_received after draining (QoS 0 may legitimately drop).
    pub lost: i64,
    /// False when the drain deadline passed while deliveries were still
    /// arriving: then `lost` includes messages merely still queued.
    pub drain_complete: bool,
    /// Messages whose per-publisher sequence number went backwards (duplicates / reordering).
    pub out_of_order: u64,
    pub broker_pid: Option<u32>,
    pub broker_cpu_s: Option<f64>,
    pub broker_cpu_util: Option<f64>,
    pub broker_cpu_us_per_msg: Option<f64>,
    pub broker_rss_bytes: Option<u64>,
    pub generator_cpu_s: f64,
    /// 1-minute load average when measuring started: on a shared 2-core box
    /// anything much above 2 means other work competed for the CPUs.
    pub host_loadavg_1m: f64,
}

/// Figures from the `idle` scenario.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub scenario: &'static str,
    pub host: String,
    pub port: u16,
    pub protocol: u8,
    pub subscribe: bool,
    pub procs: usize,
    pub source_addrs: Vec<String>,
    pub requested: usize,
    pub connected: usize,
    pub failed: usize,
    pub connect_s: f64,
    pub connects_per_s: f64,
    pub broker_pid: u32,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub rss_settled: bool,
    pub bytes_per_connection: f64,
    pub host_loadavg_1m: f64,
}

fn rows(title: &str, rows: &[(&str, String)]) {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("{title}");
    println!("{}", "-".repeat(title.len().max(w + 24)));
    for (k, v) in rows {
        println!("  {k:<w$}  {v}");
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB ({b} B)", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB ({b} B)", b as f64 / 1024.0)
    }
}

impl PubSubReport {
    pub fn print(&self) {
        let title = format!(
            "pubsub: {}:{} MQTT v{} QoS {} | {} pairs, {} B payload, {} s (+{} s warm-up)",
            self.host,
            self.port,
            self.protocol,
            self.qos,
            self.pairs,
            self.payload_bytes,
            self.duration_s,
            self.warmup_s
        );
        rows(
            &title,
            &[
                ("received msgs/s", format!("{:.0}", self.received_per_s)),
                ("sent msgs/s", format!("{:.0}", self.sent_per_s)),
                ("latency p50", format!("{:.0} us", self.latency_p50_us)),
                ("latency p99", format!("{:.0} us", self.latency_p99_us)),
                ("latency p99.9", format!("{:.0} us", self.latency_p999_us)),
                ("latency max", format!("{:.0} us", self.latency_max_us)),
                (
                    "published / acked / received",
                    format!(
                        "{} / {} / {}",
                        self.total_published, self.total_acked, self.total_received
                    ),
                ),
                (
                    "lost",
                    format!(
                        "{}{}",
                        self.lost,
                        if self.drain_complete {
                            ""
                        } else {
                            " (drain timed out: still queued, not necessarily lost)"
                        }
                    ),
                ),
                ("out of order", self.out_of_order.to_string()),
                (
                    "QoS1 window / max lead",
                    format!("{} / {}", self.inflight, self.max_lead),
                ),
                (
                    "broker CPU s",
                    opt(self.broker_cpu_s.map(|v| format!("{v:.2}"))),
                ),
                (
                    "broker CPU util",
                    opt(self.broker_cpu_util.map(|v| format!("{:.0} %", v * 100.0))),
                ),
                (
                    "broker CPU us/msg",
                    opt(self.broker_cpu_us_per_msg.map(|v| format!("{v:.3}"))),
                ),
                ("broker RSS", opt(self.broker_rss_bytes.map(human_bytes))),
                ("generator CPU s", format!("{:.2}", self.generator_cpu_s)),
                ("host load avg (1m)", format!("{:.2}", self.host_loadavg_1m)),
            ],
        );
        println!(
            "{}",
            serde_json::to_string(self).expect("report serialises")
        );
    }
}

impl IdleReport {
    pub fn print(&self) {
        let title = format!(
            "idle: {}:{} MQTT v{} | {} connections{} over {} procs",
            self.host,
            self.port,
            self.protocol,
            self.requested,
            if self.subscribe {
                " + 1 subscription each"
            } else {
                ""
            },
            self.procs
        );
        rows(
            &title,
            &[
                (
                    "connected / failed",
                    format!("{} / {}", self.connected, self.failed),
                ),
                (
                    "connect time",
                    format!(
                        "{:.2} s ({:.0} conn/s)",
                        self.connect_s, self.connects_per_s
                    ),
                ),
                ("source addresses", self.source_addrs.join(", ")),
                ("broker RSS before", human_bytes(self.rss_before_bytes)),
                (
                    "broker RSS after",
                    format!(
                        "{}{}",
                        human_bytes(self.rss_after_bytes),
                        if self.rss_settled {
                            ""
                        } else {
                            " (not settled)"
                        }
                    ),
                ),
                ("host load avg (1m)", format!("{:.2}", self.host_loadavg_1m)),
                (
                    "bytes per idle connection",
                    format!("{:.0}", self.bytes_per_connection),
                ),
            ],
        );
        println!(
            "{}",
            serde_json::to_string(self).expect("report serialises")
        );
    }
}

/// CPU seconds consumed by this process so far (for "is the generator the bottleneck?").
pub fn self_cpu_seconds() -> f64 {
    crate::procfs::cpu_seconds(std::process::id()).unwrap_or(0.0)
}

/// 1-minute load average from /proc/loadavg (0 if unreadable).
pub fn loadavg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}
