//! Pure projection math for the capacity planner: unit parsing, the linear
//! fit of broker RSS against connections, and the per-resource connection
//! limits for a target box. No I/O here, so everything is unit-tested.

use anyhow::{bail, Result};

/// Parse a memory size: plain bytes (`"1048576"`) or a number with a binary
/// suffix `K`/`M`/`G`/`T` (optionally followed by `B` or `iB`, any case):
/// `"91G"`, `"91GB"`, `"91GiB"`, `"512m"`, `"1.5T"`. Memory is sized in
/// powers of two (a "91 GB" box reports ~91 GiB in `free`).
pub fn parse_mem(s: &str) -> Result<f64> {
    let t = s.trim();
    let (num, suffix) = split_number(t)?;
    let mult = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0f64.powi(4),
        _ => bail!("cannot parse memory size {s:?} (e.g. 91G, 512M, 1.5T)"),
    };
    Ok(num * mult)
}

/// Parse a NIC speed and return BYTES per second. NIC speeds are quoted in
/// bits (decimal prefixes): `"10G"`, `"10Gbit"`, `"10Gbps"`, `"10gb"` all
/// mean 10 * 10^9 bit/s = 1.25 * 10^9 B/s. A capital `B` suffix means bytes:
/// `"1.25GB"`, `"1.25GB/s"`, `"1.25GBps"` = 1.25 * 10^9 B/s.
pub fn parse_nic_bytes_per_s(s: &str) -> Result<f64> {
    let t = s.trim();
    let (num, suffix) = split_number(t)?;
    let suffix = suffix.trim_end_matches("/s");
    let (prefix, unit) = match suffix.chars().next() {
        Some(c) if "kKmMgGtT".contains(c) => (Some(c.to_ascii_lowercase()), &suffix[1..]),
        _ => (None, suffix),
    };
    let mult = match prefix {
        None => 1.0,
        Some('k') => 1e3,
        Some('m') => 1e6,
        Some('g') => 1e9,
        Some('t') => 1e12,
        Some(_) => unreachable!(),
    };
    let bytes = match unit {
        // bits: bare prefix, b, bit, bits, bps
        "" | "b" | "bit" | "bits" | "bps" | "bit/s" => false,
        "B" | "Bps" | "byte" | "bytes" => true,
        _ => bail!("cannot parse NIC speed {s:?} (e.g. 10G = 10 Gbit/s, 1.25GB = bytes/s)"),
    };
    let v = num * mult;
    Ok(if bytes { v } else { v / 8.0 })
}

fn split_number(t: &str) -> Result<(f64, &str)> {
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(t.len());
    let num: f64 = t[..end]
        .replace('_', "")
        .parse()
        .map_err(|_| anyhow::anyhow!("cannot parse a number from {t:?}"))?;
    if !(num.is_finite() && num >= 0.0) {
        bail!("{t:?} must be a non-negative number");
    }
    Ok((num, t[end..].trim()))
}

/// Ordinary least squares `y = intercept + slope * x`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    pub slope: f64,
    pub intercept: f64,
    /// Coefficient of determination (1 = perfectly linear).
    pub r2: f64,
}

pub fn linear_fit(points: &[(f64, f64)]) -> Option<Fit> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let syy: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let intercept = my - slope * mx;
    let r2 = if syy == 0.0 {
        1.0
    } else {
        (sxy * sxy) / (sxx * syy)
    };
    Some(Fit {
        slope,
        intercept,
        r2,
    })
}

/// The target box and the assumed workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub cores: f64,
    pub mem_bytes: f64,
    pub fds: f64,
    pub nic_bytes_per_s: f64,
    /// Fraction of memory the broker may use (0.75 = keep 25 % free).
    pub mem_headroom: f64,
    /// Fraction of CPU the broker may use (0.7 = 70 %).
    pub cpu_headroom: f64,
    /// Fraction of NIC bandwidth the broker may use.
    pub nic_headroom: f64,
    /// Messages each connection receives per second (and, in aggregate, the
    /// same number published: one-to-one traffic as in `pubsub`).
    pub msgs_per_conn_per_s: f64,
    pub payload: usize,
    /// Which measured message cost the CPU projection uses.
    pub qos: u8,
    /// The connection count the headroom line is quoted against.
    pub goal: f64,
}

/// Per-unit costs measured on the running broker.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Costs {
    /// RSS bytes per idle connection (slope of the fit).
    pub bytes_per_conn: f64,
    /// RSS with no connections (intercept of the fit).
    pub base_rss_bytes: f64,
    pub fds_per_conn: f64,
    pub base_fds: f64,
    /// Broker CPU seconds per accepted connection (TCP accept + CONNECT).
    pub cpu_s_per_connect: f64,
    /// Broker CPU microseconds per delivered message, QoS 0 and QoS 1.
    pub cpu_us_per_msg_qos0: Option<f64>,
    pub cpu_us_per_msg_qos1: Option<f64>,
    /// Bytes each delivered message puts on the wire in EACH direction
    /// (it comes in once from the publisher and goes out once to the
    /// subscriber), including TCP/IP/Ethernet framing.
    pub wire_bytes_per_msg: f64,
}

/// Ethernet (14 + 4 FCS + 20 preamble/gap) + IPv4 (20) + TCP with
/// timestamps (32): what one small segment costs beyond its MQTT bytes.
pub const FRAME_OVERHEAD: f64 = 90.0;

/// Bytes on the wire per message in each direction for the given MQTT frame
/// size: the PUBLISH frame plus, at QoS 1, the 4-byte PUBACK travelling the
/// other way; each in its own segment (the worst case at low per-connection
/// rates, where nothing is batched).
pub fn wire_bytes_per_msg(publish_frame: usize, qos: u8) -> f64 {
    let puback = if qos > 0 { 4.0 + FRAME_OVERHEAD } else { 0.0 };
    publish_frame as f64 + FRAME_OVERHEAD + puback
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Memory,
    Fds,
    CpuMessages,
    Nic,
}

impl Resource {
    pub fn name(self) -> &'static str {
        match self {
            Resource::Memory => "memory",
            Resource::Fds => "file descriptors",
            Resource::CpuMessages => "CPU (message rate)",
            Resource::Nic => "NIC bandwidth",
        }
    }
}

/// One resource's ceiling on the number of connections.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    pub resource: Resource,
    /// Max connections this resource allows (infinite when the workload
    /// puts no load on it, e.g. a message rate of 0).
    pub max_conns: f64,
    /// Fraction of the usable resource (after headroom) the goal uses.
    pub use_at_goal: f64,
    /// How the figure was computed, for the report.
    pub formula: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    pub limits: Vec<Limit>,
    /// Index into `limits` of the smallest ceiling.
    pub binding: usize,
    /// Connections per second the box can accept at `cpu_headroom` CPU.
    pub connects_per_s: f64,
    /// Seconds to (re)connect `goal` clients at that rate.
    pub goal_reconnect_s: f64,
    /// The seeds' 20 KB/connection model on the same memory budget.
    pub seed_model_conns: f64,
    /// Memory for `goal` connections at the measured cost (incl. baseline).
    pub goal_mem_bytes: f64,
    /// Memory for `goal` connections on the seed model.
    pub goal_seed_mem_bytes: f64,
}

impl Projection {
    pub fn binding(&self) -> &Limit {
        &self.limits[self.binding]
    }

    pub fn max_conns(&self) -> f64 {
        self.binding().max_conns
    }

    /// max connections / goal: > 1 means the goal fits with that factor spare.
    pub fn goal_headroom(&self, goal: f64) -> f64 {
        self.max_conns() / goal
    }
}

/// The seeds' per-connection memory model ("~20 KB per connection").
pub const SEED_BYTES_PER_CONN: f64 = 20.0 * 1024.0;

fn ceiling(budget: f64, per_conn: f64) -> f64 {
    if per_conn <= 0.0 {
        f64::INFINITY
    } else {
        (budget / per_conn).max(0.0)
    }
}

pub fn project(c: &Costs, t: &Target) -> Projection {
    let mut limits = Vec::new();

    let mem_budget = t.mem_bytes * t.mem_headroom - c.base_rss_bytes;
    limits.push(Limit {
        resource: Resource::Memory,
        max_conns: ceiling(mem_budget, c.bytes_per_conn),
        use_at_goal: (c.base_rss_bytes + t.goal * c.bytes_per_conn)
            / (t.mem_bytes * t.mem_headroom),
        formula: format!(
            "({} x {:.2} - {} baseline) / {:.0} B",
            fmt_bytes(t.mem_bytes),
            t.mem_headroom,
            fmt_bytes(c.base_rss_bytes),
            c.bytes_per_conn
        ),
    });

    let fd_budget = t.fds - c.base_fds;
    limits.push(Limit {
        resource: Resource::Fds,
        max_conns: ceiling(fd_budget, c.fds_per_conn),
        use_at_goal: (c.base_fds + t.goal * c.fds_per_conn) / t.fds,
        formula: format!(
            "({} - {:.0} baseline) / {:.2} fd",
            fmt_count(t.fds),
            c.base_fds,
            c.fds_per_conn
        ),
    });

    let msg_cost = if t.qos == 0 {
        c.cpu_us_per_msg_qos0
    } else {
        c.cpu_us_per_msg_qos1
    };
    if let Some(us) = msg_cost {
        let cpu_budget_us = t.cores * t.cpu_headroom * 1e6;
        let per_conn = t.msgs_per_conn_per_s * us;
        limits.push(Limit {
            resource: Resource::CpuMessages,
            max_conns: ceiling(cpu_budget_us, per_conn),
            use_at_goal: t.goal * per_conn / cpu_budget_us,
            formula: format!(
                "{} cores x {:.2} x 1e6 us / ({} msg/s x {:.2} us QoS {})",
                t.cores, t.cpu_headroom, t.msgs_per_conn_per_s, us, t.qos
            ),
        });
    }

    let nic_budget = t.nic_bytes_per_s * t.nic_headroom;
    let per_conn = t.msgs_per_conn_per_s * c.wire_bytes_per_msg;
    limits.push(Limit {
        resource: Resource::Nic,
        max_conns: ceiling(nic_budget, per_conn),
        use_at_goal: t.goal * per_conn / nic_budget,
        formula: format!(
            "{:.2} Gbit/s x {:.2} / ({} msg/s x {:.0} B each way)",
            t.nic_bytes_per_s * 8.0 / 1e9,
            t.nic_headroom,
            t.msgs_per_conn_per_s,
            c.wire_bytes_per_msg
        ),
    });

    let binding = binding_index(&limits);
    let connects_per_s = ceiling(t.cores * t.cpu_headroom, c.cpu_s_per_connect);
    Projection {
        binding,
        connects_per_s,
        goal_reconnect_s: t.goal / connects_per_s,
        seed_model_conns: ceiling(t.mem_bytes * t.mem_headroom, SEED_BYTES_PER_CONN),
        goal_mem_bytes: c.base_rss_bytes + t.goal * c.bytes_per_conn,
        goal_seed_mem_bytes: t.goal * SEED_BYTES_PER_CONN,
        limits,
    }
}

/// The resource with the smallest connection ceiling (first one on ties).
pub fn binding_index(limits: &[Limit]) -> usize {
    let mut best = 0;
    for (i, l) in limits.iter().enumerate() {
        if l.max_conns < limits[best].max_conns {
            best = i;
        }
    }
    best
}

/// `1.5 GiB`, `20.0 KiB`, `512 B`.
pub fn fmt_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v.abs() >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `1,234,567`; `unlimited` for infinity.
pub fn fmt_count(v: f64) -> String {
    if !v.is_finite() {
        return "unlimited".into();
    }
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

    fn target() -> Target {
        Target {
            cores: 24.0,
            mem_bytes: 91.0 * GIB,
            fds: 2_000_000.0,
            nic_bytes_per_s: 1.25e9,
            mem_headroom: 0.75,
            cpu_headroom: 0.7,
            nic_headroom: 0.7,
            msgs_per_conn_per_s: 0.1,
            payload: 64,
            qos: 1,
            goal: 1_000_000.0,
        }
    }

    fn costs() -> Costs {
        Costs {
            bytes_per_conn: 4096.0,
            base_rss_bytes: 10.0 * 1024.0 * 1024.0,
            fds_per_conn: 1.0,
            base_fds: 20.0,
            cpu_s_per_connect: 20e-6,
            cpu_us_per_msg_qos0: Some(2.0),
            cpu_us_per_msg_qos1: Some(4.0),
            wire_bytes_per_msg: 250.0,
        }
    }

    #[test]
    fn parses_memory_sizes_in_binary_units() {
        assert_eq!(parse_mem("91G").unwrap(), 91.0 * GIB);
        assert_eq!(parse_mem("91GB").unwrap(), 91.0 * GIB);
        assert_eq!(parse_mem("91 GiB").unwrap(), 91.0 * GIB);
        assert_eq!(parse_mem("512m").unwrap(), 512.0 * 1024.0 * 1024.0);
        assert_eq!(parse_mem("1.5T").unwrap(), 1.5 * 1024.0 * GIB);
        assert_eq!(parse_mem("4096").unwrap(), 4096.0);
        assert_eq!(parse_mem("20K").unwrap(), 20480.0);
        assert!(parse_mem("91X").is_err());
        assert!(parse_mem("G").is_err());
        assert!(parse_mem("").is_err());
    }

    #[test]
    fn nic_speeds_are_bits_unless_capital_b() {
        // 10G NIC = 10 Gbit/s = 1.25 GB/s
        assert_eq!(parse_nic_bytes_per_s("10G").unwrap(), 1.25e9);
        assert_eq!(parse_nic_bytes_per_s("10Gbit").unwrap(), 1.25e9);
        assert_eq!(parse_nic_bytes_per_s("10Gbps").unwrap(), 1.25e9);
        assert_eq!(parse_nic_bytes_per_s("10gb").unwrap(), 1.25e9);
        assert_eq!(parse_nic_bytes_per_s("10Gbit/s").unwrap(), 1.25e9);
        assert_eq!(parse_nic_bytes_per_s("1G").unwrap(), 125e6);
        assert_eq!(parse_nic_bytes_per_s("100M").unwrap(), 12.5e6);
        // explicit bytes
        assert_eq!(parse_nic_bytes_per_s("1.25GB").unwrap(), 1.25e9);
        assert_eq!(parse_nic_bytes_per_s("1.25GB/s").unwrap(), 1.25e9);
        assert_eq!(parse_nic_bytes_per_s("125MBps").unwrap(), 125e6);
        assert!(parse_nic_bytes_per_s("10Q").is_err());
    }

    #[test]
    fn linear_fit_recovers_slope_and_intercept() {
        let pts: Vec<(f64, f64)> = (0..10)
            .map(|i| (i as f64 * 1000.0, 5e6 + 3000.0 * i as f64 * 1000.0))
            .collect();
        let f = linear_fit(&pts).unwrap();
        assert!((f.slope - 3000.0).abs() < 1e-6);
        assert!((f.intercept - 5e6).abs() < 1e-3);
        assert!((f.r2 - 1.0).abs() < 1e-12);
        assert!(linear_fit(&pts[..1]).is_none());
        assert!(linear_fit(&[(1.0, 1.0), (1.0, 2.0)]).is_none());
    }

    #[test]
    fn memory_limit_uses_headroom_and_baseline() {
        let p = project(&costs(), &target());
        let mem = &p.limits[0];
        assert_eq!(mem.resource, Resource::Memory);
        let want = (91.0 * GIB * 0.75 - 10.0 * 1024.0 * 1024.0) / 4096.0;
        assert!((mem.max_conns - want).abs() < 1e-6);
        // seed model: 91 GiB x 0.75 / 20 KiB
        assert!((p.seed_model_conns - 91.0 * GIB * 0.75 / 20480.0).abs() < 1e-6);
        assert!((p.goal_seed_mem_bytes - 1e6 * 20480.0).abs() < 1e-6);
    }

    #[test]
    fn fd_limit_binds_when_it_is_smallest() {
        let mut c = costs();
        c.fds_per_conn = 1.0;
        let mut t = target();
        t.fds = 500_000.0;
        let p = project(&c, &t);
        assert_eq!(p.binding().resource, Resource::Fds);
        assert!((p.max_conns() - (500_000.0 - 20.0)).abs() < 1e-6);
        assert!(p.goal_headroom(1e6) < 1.0);
    }

    #[test]
    fn cpu_binds_at_high_message_rate_and_uses_selected_qos() {
        let mut t = target();
        t.msgs_per_conn_per_s = 10.0;
        let mut c = costs();
        c.wire_bytes_per_msg = 100.0;
        let p = project(&c, &t);
        assert_eq!(p.binding().resource, Resource::CpuMessages);
        // 24 x 0.7 x 1e6 / (10 x 4.0 us)
        assert!((p.max_conns() - 24.0 * 0.7 * 1e6 / 40.0).abs() < 1e-6);
        t.qos = 0;
        let p0 = project(&c, &t);
        assert!((p0.limits[2].max_conns - 24.0 * 0.7 * 1e6 / 20.0).abs() < 1e-6);
    }

    #[test]
    fn nic_binds_with_large_messages_on_a_slow_nic() {
        let mut c = costs();
        c.wire_bytes_per_msg = 10_000.0;
        c.cpu_us_per_msg_qos1 = Some(0.01);
        let mut t = target();
        t.nic_bytes_per_s = parse_nic_bytes_per_s("1G").unwrap();
        t.msgs_per_conn_per_s = 1.0;
        let p = project(&c, &t);
        assert_eq!(p.binding().resource, Resource::Nic);
        assert!((p.max_conns() - 125e6 * 0.7 / 10_000.0).abs() < 1e-6);
    }

    #[test]
    fn memory_binds_by_default_and_cpu_row_skipped_without_measurement() {
        let mut c = costs();
        c.cpu_us_per_msg_qos1 = None;
        let mut t = target();
        t.fds = 100e6;
        let p = project(&c, &t);
        assert!(p.limits.iter().all(|l| l.resource != Resource::CpuMessages));
        assert_eq!(p.binding().resource, Resource::Memory);
    }

    #[test]
    fn zero_rate_means_no_message_ceiling() {
        let mut t = target();
        t.msgs_per_conn_per_s = 0.0;
        let p = project(&costs(), &t);
        let nic = p
            .limits
            .iter()
            .find(|l| l.resource == Resource::Nic)
            .unwrap();
        assert!(nic.max_conns.is_infinite());
        assert_ne!(p.binding().resource, Resource::Nic);
    }

    #[test]
    fn connect_rate_at_cpu_headroom() {
        let p = project(&costs(), &target());
        // 24 x 0.7 / 20 us = 840,000 connects/s
        assert!((p.connects_per_s - 840_000.0).abs() < 1e-3);
        assert!((p.goal_reconnect_s - 1e6 / 840_000.0).abs() < 1e-9);
    }

    #[test]
    fn binding_is_first_minimum() {
        let l = |r, m| Limit {
            resource: r,
            max_conns: m,
            use_at_goal: 0.0,
            formula: String::new(),
        };
        let v = vec![
            l(Resource::Memory, 5.0),
            l(Resource::Fds, 3.0),
            l(Resource::Nic, 3.0),
        ];
        assert_eq!(binding_index(&v), 1);
    }

    #[test]
    fn wire_bytes_include_framing_and_puback() {
        assert_eq!(wire_bytes_per_msg(80, 0), 80.0 + FRAME_OVERHEAD);
        assert_eq!(wire_bytes_per_msg(80, 1), 80.0 + 4.0 + 2.0 * FRAME_OVERHEAD);
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_count(1_234_567.4), "1,234,567");
        assert_eq!(fmt_count(999.0), "999");
        assert_eq!(fmt_count(f64::INFINITY), "unlimited");
        assert_eq!(fmt_bytes(512.0), "512 B");
        assert_eq!(fmt_bytes(20480.0), "20.0 KiB");
        assert_eq!(fmt_bytes(91.0 * GIB), "91.0 GiB");
    }
}
