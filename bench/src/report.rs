//! Result reporting. Every scenario produces a serialisable report (the
//! [`Report`] trait) that is printed either as a human table followed by one
//! JSON line (the default, so scripts can `grep '^{'` the last line) or, with
//! `--json`, as exactly one JSON object and nothing else on stdout. With
//! `--compare` the same scenario ran against two brokers, and
//! [`print_compare`] prints both plus the ratio of the headline figures.
//!
//! Latencies live in HDR histograms (3 significant digits, so percentiles are
//! exact to 0.1 % whatever the spread); child processes ship theirs to the
//! parent as (value, count) pairs ([`hist_pairs`] / [`hist_merge`]), which
//! is lossless and small (one pair per distinct bucket).

use hdrhistogram::Histogram;
use serde::Serialize;

/// A scenario's result: JSON via serde, a human table, headline figures.
pub trait Report: Serialize {
    fn title(&self) -> String;
    fn rows(&self) -> Vec<(String, String)>;
    /// Figures compared by `--compare` (label, value).
    fn headline(&self) -> Vec<(&'static str, f64)>;
}

/// Percentile summary of a latency histogram recorded in nanoseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn from_nanos(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        let us = |v: u64| v as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }

    pub fn row(&self) -> String {
        if self.count == 0 {
            return "-".into();
        }
        format!(
            "p50 {} | p90 {} | p99 {} | p99.9 {} | max {}",
            human_us(self.p50_us),
            human_us(self.p90_us),
            human_us(self.p99_us),
            human_us(self.p999_us),
            human_us(self.max_us)
        )
    }
}

/// A latency histogram in nanoseconds, 1 ns .. 10 min, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Lossless compact form of a histogram: (bucket value, count) pairs.
pub fn hist_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Add (value, count) pairs from [`hist_pairs`] into `h`.
pub fn hist_merge(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(v, c) in pairs {
        h.saturating_record_n(v.max(1), c);
    }
}

pub fn human_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2} s", us / 1e6)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

/// Print a report: human table + JSON line, or only the JSON object.
pub fn print_report<R: Report>(r: &R, json_only: bool) {
    if !json_only {
        rows(&r.title(), &r.rows());
    }
    println!("{}", serde_json::to_string(r).expect("report serialises"));
}

/// One line of a comparison: label, A, B and A/B (None when B is 0).
pub fn ratios(
    a: &[(&'static str, f64)],
    b: &[(&'static str, f64)],
) -> Vec<(String, f64, f64, Option<f64>)> {
    a.iter()
        .filter_map(|(k, va)| {
            let vb = b.iter().find(|(kb, _)| kb == k)?.1;
            let r = (vb != 0.0 && vb.is_finite() && va.is_finite()).then(|| va / vb);
            Some((k.to_string(), *va, vb, r))
        })
        .collect()
}

/// Print both runs of `--compare` and the ratio table; with `json_only`
/// one object `{"scenario", "a", "b", "ratio": {label: a/b}}`.
pub fn print_compare<R: Report>(a: &R, b: &R, a_name: &str, b_name: &str, json_only: bool) {
    let lines = ratios(&a.headline(), &b.headline());
    if !json_only {
        rows(&a.title(), &a.rows());
        println!();
        rows(&b.title(), &b.rows());
        println!();
        let w = lines.iter().map(|l| l.0.len()).max().unwrap_or(0);
        let title = format!("ratio A/B (A = {a_name}, B = {b_name})");
        println!("{title}");
        println!("{}", "-".repeat(title.len().max(w + 40)));
        for (k, va, vb, r) in &lines {
            let r = r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into());
            println!("  {k:<w$}  {va:>14.2}  {vb:>14.2}  {r:>8}");
        }
    }
    let ratio: serde_json::Map<String, serde_json::Value> = lines
        .iter()
        .map(|(k, _, _, r)| {
            (
                k.clone(),
                r.map(serde_json::Value::from).unwrap_or_default(),
            )
        })
        .collect();
    let v = serde_json::json!({ "compare": true, "a_target": a_name, "b_target": b_name, "a": a, "b": b, "ratio": ratio });
    println!("{v}");
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

fn rows<K: AsRef<str>>(title: &str, rows: &[(K, String)]) {
    let rows: Vec<(&str, &String)> = rows.iter().map(|(k, v)| (k.as_ref(), v)).collect();
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("{title}");
    println!("{}", "-".repeat(title.len().max(w + 24)));
    for (k, v) in rows {
        println!("  {k:<w$}  {v}");
    }
}

pub fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

pub fn human_bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB ({b} B)", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB ({b} B)", b as f64 / 1024.0)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_summary_percentiles() {
        let mut h = new_hist();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let l = Latency::from_nanos(&h);
        assert_eq!(l.count, 1000);
        // 3 significant digits: within 0.1 %.
        assert!((l.p50_us - 500.0).abs() <= 0.5, "{l:?}");
        assert!((l.p90_us - 900.0).abs() <= 1.0, "{l:?}");
        assert!((l.p99_us - 990.0).abs() <= 1.0, "{l:?}");
        assert!((l.max_us - 1000.0).abs() <= 1.0, "{l:?}");
        assert_eq!(Latency::from_nanos(&new_hist()), Latency::default());
    }

    #[test]
    fn histogram_pairs_round_trip_and_merge() {
        let mut a = new_hist();
        let mut b = new_hist();
        for v in [10u64, 10, 2000, 3_000_000, 77] {
            a.record(v).unwrap();
        }
        for v in [5u64, 9_000_000_000] {
            b.record(v).unwrap();
        }
        let mut merged = new_hist();
        hist_merge(&mut merged, &hist_pairs(&a));
        assert_eq!(hist_pairs(&merged), hist_pairs(&a));
        // Through JSON, as children send them.
        let json = serde_json::to_string(&hist_pairs(&b)).unwrap();
        let back: Vec<(u64, u64)> = serde_json::from_str(&json).unwrap();
        hist_merge(&mut merged, &back);
        assert_eq!(merged.len(), 7);
        assert_eq!(merged.min(), 5);
        assert!(merged.equivalent(merged.max(), 9_000_000_000));
    }

    #[test]
    fn ratio_lines() {
        let a = [("msgs/s", 200.0), ("p99 us", 10.0), ("only a", 1.0)];
        let b = [("msgs/s", 100.0), ("p99 us", 0.0)];
        let r = ratios(&a, &b);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], ("msgs/s".to_string(), 200.0, 100.0, Some(2.0)));
        assert_eq!(r[1].3, None);
    }

    #[test]
    fn human_units() {
        assert_eq!(human_us(12.0), "12 us");
        assert_eq!(human_us(1500.0), "1.50 ms");
        assert_eq!(human_us(2_500_000.0), "2.50 s");
    }
}
