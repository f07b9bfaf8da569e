//! `capacity`: measure per-unit costs on a running broker and project the
//! connection ceiling of each resource on a target box.
//!
//! * [`measure`] opens idle connections in steps (child processes, one
//!   loopback source address each) and samples the broker's RSS, fds and CPU
//!   over its whole process tree; then runs short `pubsub` QoS 0/1 runs for
//!   CPU per delivered message.
//! * [`project`] (pure) fits RSS against connections and computes each
//!   resource's limit and the binding one.
//! * [`report`] renders the markdown; [`plot`] the RSS PNG.

pub mod measure;
pub mod plot;
pub mod project;
pub mod report;

use anyhow::{bail, Context, Result};
use std::net::IpAddr;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct CapacityArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Broker PID (the supervisor: its worker children are included). Use a
    /// freshly started broker: memory freed by earlier connections is reused
    /// and hides the growth.
    #[arg(long, required_unless_present = "worker")]
    pub broker_pid: Option<u32>,
    /// Idle connections to reach, opened in --steps equal steps.
    #[arg(long, default_value_t = 20_000)]
    pub connections: usize,
    /// Number of steps (RSS samples after the baseline).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Child processes holding the connections (default: connections / --per-proc).
    #[arg(long)]
    pub procs: Option<usize>,
    /// Connections per child process when --procs is not given (fd limit 20,000).
    #[arg(long, default_value_t = 10_000)]
    pub per_proc: usize,
    /// Let the kernel choose source addresses instead of 127.0.0.2, .3, … per child.
    #[arg(long)]
    pub no_bind: bool,
    /// Connections each child handshakes concurrently.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Keep-alive sent in CONNECT for the idle connections.
    #[arg(long, default_value_t = 600)]
    pub keepalive: u16,
    /// Max seconds to wait for the broker's RSS to settle after each step.
    #[arg(long, default_value_t = 20.0)]
    pub settle_timeout: f64,
    /// Publisher/subscriber pairs of the message-cost runs.
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Payload bytes of the message-cost runs and of the NIC projection.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Seconds of each message-cost run (QoS 0 and QoS 1); 0 skips them.
    #[arg(long, default_value_t = 5.0)]
    pub msg_duration: f64,

    /// Target box: cores.
    #[arg(long, default_value_t = 24.0)]
    pub target_cores: f64,
    /// Target box: memory (binary units: 91G = 91 GiB).
    #[arg(long, default_value = "91G")]
    pub target_mem: String,
    /// Target box: file descriptors available to the broker (all processes).
    #[arg(long, default_value_t = 2_000_000)]
    pub target_fds: u64,
    /// Target box: NIC speed in bits/s (10G = 10 Gbit/s; 1.25GB = bytes/s).
    #[arg(long, default_value = "10G")]
    pub target_nic: String,
    /// Messages delivered per connection per second in the projection.
    #[arg(long, default_value_t = 0.1)]
    pub msgs_per_conn_per_s: f64,
    /// QoS whose measured message cost the CPU projection uses.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Fraction of target memory the broker may use.
    #[arg(long, default_value_t = 0.75)]
    pub mem_headroom: f64,
    /// Fraction of target CPU the broker may use.
    #[arg(long, default_value_t = 0.7)]
    pub cpu_headroom: f64,
    /// Fraction of NIC bandwidth the broker may use.
    #[arg(long, default_value_t = 0.7)]
    pub nic_headroom: f64,
    /// Connection count to quote the headroom against.
    #[arg(long, default_value_t = 1_000_000)]
    pub goal: u64,

    /// Markdown report path.
    #[arg(long, default_value = "capacity.md")]
    pub report: PathBuf,
    /// PNG plot of broker RSS against connections.
    #[arg(long, default_value = "rss.png")]
    pub plot: PathBuf,
    /// Also print the measurement and projection as one JSON line.
    #[arg(long)]
    pub json: bool,

    /// Internal: run as a connection-holding child.
    #[arg(long, hide = true)]
    pub worker: bool,
    #[arg(long, hide = true)]
    pub worker_bind: Option<IpAddr>,
    #[arg(long, hide = true, default_value = "0")]
    pub worker_tag: String,
}

pub fn run(args: CapacityArgs) -> Result<()> {
    if args.worker {
        return measure::run_worker(&args);
    }
    let pid = args.broker_pid.context("--broker-pid is required")?;
    if args.connections < args.steps || args.steps == 0 {
        bail!("--connections must be at least --steps (and --steps positive)");
    }
    let target = project::Target {
        cores: args.target_cores,
        mem_bytes: project::parse_mem(&args.target_mem)?,
        fds: args.target_fds as f64,
        nic_bytes_per_s: project::parse_nic_bytes_per_s(&args.target_nic)?,
        mem_headroom: args.mem_headroom,
        cpu_headroom: args.cpu_headroom,
        nic_headroom: args.nic_headroom,
        msgs_per_conn_per_s: args.msgs_per_conn_per_s,
        payload: args.payload,
        qos: args.qos,
        goal: args.goal as f64,
    };

    let m = measure::measure(&args, pid)?;
    if m.connected == 0 {
        bail!("no connection could be opened ({} failed)", m.failed);
    }
    let rss_pts: Vec<(f64, f64)> = m
        .steps
        .iter()
        .map(|s| (s.conns as f64, s.rss_bytes as f64))
        .collect();
    let fd_pts: Vec<(f64, f64)> = m
        .steps
        .iter()
        .map(|s| (s.conns as f64, s.fds as f64))
        .collect();
    let fit = project::linear_fit(&rss_pts).context("too few distinct samples to fit")?;
    let fd_fit = project::linear_fit(&fd_pts).context("too few distinct samples to fit")?;
    let cost_of = |q: u8| {
        m.msg_runs
            .iter()
            .find(|r| r.qos == q)
            .map(|r| r.cpu_us_per_msg)
    };
    let costs = project::Costs {
        bytes_per_conn: fit.slope,
        base_rss_bytes: fit.intercept.max(0.0),
        fds_per_conn: fd_fit.slope,
        base_fds: fd_fit.intercept.max(0.0),
        cpu_s_per_connect: m.connect_cpu_s / m.connected as f64,
        cpu_us_per_msg_qos0: cost_of(0),
        cpu_us_per_msg_qos1: cost_of(1),
        wire_bytes_per_msg: project::wire_bytes_per_msg(
            measure::publish_frame(args.payload, args.qos),
            args.qos,
        ),
    };
    let proj = project::project(&costs, &target);

    let title = format!(
        "mqttd broker RSS vs idle connections ({} processes)",
        m.steps.last().map(|s| s.broker_procs).unwrap_or(1)
    );
    let labelled = plot::plot_rss(&args.plot, &rss_pts, &fit, &title)?;
    if !labelled {
        eprintln!("capacity: no TrueType font found (set MQTTD_BENCH_FONT): plot has no labels");
    }
    let plot_rel = relative_to(&args.plot, &args.report);
    let md = report::render(&report::ReportInput {
        m: &m,
        costs: &costs,
        target: &target,
        proj: &proj,
        fit,
        command: command_line(),
        date: utc_date(),
        mem_spec: args.target_mem.clone(),
        nic_spec: args.target_nic.clone(),
        plot: Some(plot_rel),
    });
    std::fs::write(&args.report, &md)
        .with_context(|| format!("writing {}", args.report.display()))?;

    print_summary(&costs, &target, &proj);
    println!(
        "report: {}  plot: {}",
        args.report.display(),
        args.plot.display()
    );
    if args.json {
        let v = serde_json::json!({
            "scenario": "capacity",
            "measurement": m,
            "bytes_per_conn": costs.bytes_per_conn,
            "base_rss_bytes": costs.base_rss_bytes,
            "rss_fit_r2": fit.r2,
            "fds_per_conn": costs.fds_per_conn,
            "cpu_us_per_connect": costs.cpu_s_per_connect * 1e6,
            "cpu_us_per_msg_qos0": costs.cpu_us_per_msg_qos0,
            "cpu_us_per_msg_qos1": costs.cpu_us_per_msg_qos1,
            "limits": proj.limits.iter().map(|l| serde_json::json!({
                "resource": l.resource.name(),
                "max_conns": if l.max_conns.is_finite() { Some(l.max_conns) } else { None },
                "use_at_goal": l.use_at_goal,
            })).collect::<Vec<_>>(),
            "binding": proj.binding().resource.name(),
            "max_conns": proj.max_conns(),
            "goal": target.goal,
            "goal_headroom": proj.goal_headroom(target.goal),
            "connects_per_s": proj.connects_per_s,
        });
        println!("{v}");
    }
    Ok(())
}

fn print_summary(c: &project::Costs, t: &project::Target, p: &project::Projection) {
    use project::{fmt_bytes, fmt_count};
    println!("capacity: measured per-unit costs");
    println!(
        "  memory per idle connection   {:.0} B (baseline {})",
        c.bytes_per_conn,
        fmt_bytes(c.base_rss_bytes)
    );
    println!("  fds per connection           {:.3}", c.fds_per_conn);
    println!(
        "  CPU per connect              {:.1} us",
        c.cpu_s_per_connect * 1e6
    );
    let us = |v: Option<f64>| v.map(|v| format!("{v:.2} us")).unwrap_or("-".into());
    println!(
        "  CPU per message QoS 0 / 1    {} / {}",
        us(c.cpu_us_per_msg_qos0),
        us(c.cpu_us_per_msg_qos1)
    );
    println!("projection for the target box:");
    for (i, l) in p.limits.iter().enumerate() {
        println!(
            "  {:<20} {:>14} connections{}",
            l.resource.name(),
            fmt_count(l.max_conns),
            if i == p.binding { "  <- binding" } else { "" }
        );
    }
    println!(
        "  connect storm        {:>14} connections/s at {:.0} % CPU",
        fmt_count(p.connects_per_s),
        t.cpu_headroom * 100.0
    );
    println!(
        "  max {} connections ({}); headroom for {}: {:.2}x",
        fmt_count(p.max_conns()),
        p.binding().resource.name(),
        fmt_count(t.goal),
        p.goal_headroom(t.goal)
    );
}

/// `plot` as referenced from the report's directory (same dir: file name).
fn relative_to(plot: &std::path::Path, report: &std::path::Path) -> String {
    let pdir = plot.parent().filter(|p| !p.as_os_str().is_empty());
    let rdir = report.parent().filter(|p| !p.as_os_str().is_empty());
    if pdir == rdir {
        if let Some(name) = plot.file_name() {
            return name.to_string_lossy().into_owned();
        }
    }
    plot.display().to_string()
}

fn command_line() -> String {
    let mut args = std::env::args();
    let exe = args
        .next()
        .map(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or(a)
        })
        .unwrap_or_default();
    std::iter::once(exe)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Today's UTC date as YYYY-MM-DD.
fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    civil_from_days((secs / 86_400) as i64)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> String {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), "1970-01-01");
        assert_eq!(civil_from_days(19_723), "2024-01-01");
        assert_eq!(civil_from_days(19_782), "2024-02-29");
    }

    #[test]
    fn plot_path_relative_to_report() {
        use std::path::Path;
        assert_eq!(
            relative_to(Path::new("docs/a.png"), Path::new("docs/r.md")),
            "a.png"
        );
        assert_eq!(relative_to(Path::new("a.png"), Path::new("r.md")), "a.png");
        assert_eq!(
            relative_to(Path::new("/tmp/a.png"), Path::new("docs/r.md")),
            "/tmp/a.png"
        );
    }
}
