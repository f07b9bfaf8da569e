//! Markdown capacity report: measured per-unit costs, the projection per
//! resource for the target box, the binding resource, and the seeds' guessed
//! model next to the measured one. `render` is pure (tested below).

use super::measure::Measurement;
use super::project::{fmt_bytes, fmt_count, Costs, Fit, Projection, Target, SEED_BYTES_PER_CONN};
use std::fmt::Write;

pub struct ReportInput<'a> {
    pub m: &'a Measurement,
    pub costs: &'a Costs,
    pub target: &'a Target,
    pub proj: &'a Projection,
    pub fit: Fit,
    /// The command line that produced the report.
    pub command: String,
    /// UTC date, YYYY-MM-DD.
    pub date: String,
    /// The target as typed (`91G`, `10G`), shown next to the parsed values.
    pub mem_spec: String,
    pub nic_spec: String,
    /// Relative path of the RSS plot, if one was written.
    pub plot: Option<String>,
}

fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.1} %", v * 100.0)
    } else {
        "-".into()
    }
}

fn us(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2} µs"))
        .unwrap_or_else(|| "not measured".into())
}

pub fn render(r: &ReportInput) -> String {
    let (m, c, t, p) = (r.m, r.costs, r.target, r.proj);
    let goal = fmt_count(t.goal);
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# mqttd capacity report\n");
    let _ = writeln!(
        w,
        "Generated {} by `mqttd-bench capacity`: per-unit costs measured on a running broker, \
         projected onto the target box. Replaces the guessed per-connection figures of the \
         capacity seeds (../shared/seeds/000, 002, 004) with measurements.\n",
        r.date
    );
    let _ = writeln!(w, "```\n{}\n```\n", r.command);
    let _ = writeln!(
        w,
        "Measured on a {}-CPU host (1-min load average {:.2} at start) against broker pid {} \
         (`{}`, {} processes: supervisor + workers; RSS, CPU and fds are summed over all of them). \
         {} idle connections requested in {} steps from {} child processes ({}); {} connected, {} failed.\n",
        m.host_cpus,
        m.host_loadavg_1m,
        m.broker_pid,
        m.broker_cmdline,
        m.steps.last().map(|s| s.broker_procs).unwrap_or(1),
        fmt_count(m.requested as f64),
        m.steps.len().saturating_sub(1),
        m.worker_procs,
        if m.source_addrs.is_empty() {
            "kernel-chosen source address".to_string()
        } else {
            format!("source addresses {}", m.source_addrs.join(", "))
        },
        fmt_count(m.connected as f64),
        m.failed
    );

    // ------------------------------------------------------------ costs
    let _ = writeln!(w, "## Measured per-unit costs\n");
    let _ = writeln!(w, "| cost | measured | how |");
    let _ = writeln!(w, "|---|---|---|");
    let _ = writeln!(
        w,
        "| memory per idle connection | **{:.0} B**{} | slope of broker RSS vs connections, least squares over {} samples, R² = {:.4} |",
        c.bytes_per_conn,
        if c.bytes_per_conn >= 1024.0 {
            format!(" ({})", fmt_bytes(c.bytes_per_conn))
        } else {
            String::new()
        },
        m.steps.len(),
        r.fit.r2
    );
    let _ = writeln!(
        w,
        "| broker baseline RSS | {} | intercept of the same fit |",
        fmt_bytes(c.base_rss_bytes)
    );
    let _ = writeln!(
        w,
        "| file descriptors per connection | {:.3} | slope of open fds (all broker processes) vs connections; baseline {:.0} |",
        c.fds_per_conn, c.base_fds
    );
    let _ = writeln!(
        w,
        "| CPU per connect | {:.1} µs | broker CPU {:.2} s / {} connections opened during the steps (TCP accept + CONNECT/CONNACK); observed {:.0} connects/s here |",
        c.cpu_s_per_connect * 1e6,
        m.connect_cpu_s,
        fmt_count(m.connected as f64),
        if m.connect_wall_s > 0.0 {
            m.connected as f64 / m.connect_wall_s
        } else {
            0.0
        }
    );
    for q in [0u8, 1] {
        let run = m.msg_runs.iter().find(|x| x.qos == q);
        let how = match run {
            Some(x) => format!(
                "`pubsub` {} pairs, {} B payload: broker CPU {:.2} s / {} delivered ({:.0} msg/s, lost {})",
                x.pairs,
                x.payload,
                x.broker_cpu_s,
                fmt_count(x.delivered as f64),
                x.delivered_per_s,
                x.lost
            ),
            None => "no run".into(),
        };
        let v = if q == 0 {
            c.cpu_us_per_msg_qos0
        } else {
            c.cpu_us_per_msg_qos1
        };
        let _ = writeln!(
            w,
            "| CPU per delivered message, QoS {q} | {} | {how} |",
            us(v)
        );
    }
    let _ = writeln!(
        w,
        "| wire bytes per message (each direction) | {:.0} B | {} B payload PUBLISH frame + TCP/IP/Ethernet framing{} |",
        c.wire_bytes_per_msg,
        t.payload,
        if t.qos > 0 {
            " + PUBACK segment"
        } else {
            ""
        }
    );
    if !m.msg_errors.is_empty() {
        let _ = writeln!(w, "\nMessage runs that failed: {}", m.msg_errors.join("; "));
    }

    let _ = writeln!(w, "\n### Samples\n");
    let _ = writeln!(
        w,
        "| connections | broker RSS | RSS above baseline per connection | fit residual | open fds |"
    );
    let _ = writeln!(w, "|---:|---:|---:|---:|---:|");
    let base = m.steps.first().map(|s| s.rss_bytes as f64).unwrap_or(0.0);
    for st in &m.steps {
        let per = if st.conns > 0 {
            format!("{:.0} B", (st.rss_bytes as f64 - base) / st.conns as f64)
        } else {
            "-".into()
        };
        let resid = st.rss_bytes as f64 - (r.fit.intercept + r.fit.slope * st.conns as f64);
        let _ = writeln!(
            w,
            "| {} | {}{} | {} | {:+.0} KiB | {} |",
            fmt_count(st.conns as f64),
            fmt_bytes(st.rss_bytes as f64),
            if st.rss_settled { "" } else { " (unsettled)" },
            per,
            resid / 1024.0,
            st.fds
        );
    }
    if let Some(plot) = &r.plot {
        let _ = writeln!(w, "\n![broker RSS against connections]({plot})");
    }

    // ------------------------------------------------------------ projection
    let _ = writeln!(w, "\n## Target box and workload\n");
    let _ = writeln!(w, "| | |\n|---|---|");
    let _ = writeln!(w, "| cores | {} |", t.cores);
    let _ = writeln!(
        w,
        "| memory | {} = {} (usable {:.0} % = {}) |",
        r.mem_spec,
        fmt_bytes(t.mem_bytes),
        t.mem_headroom * 100.0,
        fmt_bytes(t.mem_bytes * t.mem_headroom)
    );
    let _ = writeln!(w, "| file descriptors | {} |", fmt_count(t.fds));
    let _ = writeln!(
        w,
        "| NIC | {} = {:.2} Gbit/s = {:.0} MB/s per direction (usable {:.0} %) |",
        r.nic_spec,
        t.nic_bytes_per_s * 8.0 / 1e9,
        t.nic_bytes_per_s / 1e6,
        t.nic_headroom * 100.0
    );
    let _ = writeln!(
        w,
        "| CPU budget | {:.0} % of all cores |",
        t.cpu_headroom * 100.0
    );
    let _ = writeln!(
        w,
        "| traffic | {} msg/s delivered per connection (one-to-one, {} B payload, QoS {}) |",
        t.msgs_per_conn_per_s, t.payload, t.qos
    );

    let _ = writeln!(w, "\n## Projection per resource\n");
    let _ = writeln!(
        w,
        "| resource | max connections | use at {goal} | computed as |"
    );
    let _ = writeln!(w, "|---|---:|---:|---|");
    for (i, l) in p.limits.iter().enumerate() {
        let name = if i == p.binding {
            format!("**{}** (binding)", l.resource.name())
        } else {
            l.resource.name().to_string()
        };
        let _ = writeln!(
            w,
            "| {name} | {} | {} | {} |",
            fmt_count(l.max_conns),
            pct(l.use_at_goal),
            l.formula
        );
    }
    let b = p.binding();
    let head = p.goal_headroom(t.goal);
    let _ = writeln!(
        w,
        "\n**Binding resource: {}.** Projected maximum: **{} connections** on the target box. ",
        b.resource.name(),
        fmt_count(b.max_conns)
    );
    let verdict = if head >= 1.0 {
        format!(
            "{goal} connections fit with {:.1}x headroom (they use {} of the usable {}).",
            head,
            pct(b.use_at_goal),
            b.resource.name()
        )
    } else {
        format!(
            "{goal} connections do NOT fit: the box reaches {} of the goal ({} of the usable {} needed).",
            pct(head),
            pct(b.use_at_goal),
            b.resource.name()
        )
    };
    let _ = writeln!(w, "{verdict}\n");
    let _ = writeln!(
        w,
        "Connect storm: at {:.0} % CPU the box accepts about **{} connections/s** ({:.1} µs of CPU each), \
         so reconnecting {goal} clients after a restart takes about {:.1} s.\n",
        t.cpu_headroom * 100.0,
        fmt_count(p.connects_per_s),
        c.cpu_s_per_connect * 1e6,
        p.goal_reconnect_s
    );

    // ------------------------------------------------------------ seeds
    let _ = writeln!(w, "## Seed model vs measured\n");
    let _ = writeln!(
        w,
        "The seeds size memory from guessed per-connection costs (seed 004: \"~20 KB per connection\" typical, \
         \"~9 KB\" minimal, \"91 GB RAM ÷ 20 KB = ~4.5 million connections\"). Same memory budget \
         ({} usable), same {goal}-connection goal:\n",
        fmt_bytes(t.mem_bytes * t.mem_headroom)
    );
    let _ = writeln!(
        w,
        "| model | bytes per connection | connections in usable memory | memory for {goal} |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|");
    let budget = t.mem_bytes * t.mem_headroom;
    for (name, per) in [
        ("seed: typical (20 KB)", SEED_BYTES_PER_CONN),
        ("seed: minimal (9 KB)", 9.0 * 1024.0),
    ] {
        let _ = writeln!(
            w,
            "| {name} | {:.0} B | {} | {} |",
            per,
            fmt_count(budget / per),
            fmt_bytes(t.goal * per)
        );
    }
    let _ = writeln!(
        w,
        "| **measured** (idle, RSS) | **{:.0} B** | **{}** | **{}** |",
        c.bytes_per_conn,
        fmt_count(p.limits[0].max_conns),
        fmt_bytes(p.goal_mem_bytes)
    );
    let ratio = SEED_BYTES_PER_CONN / c.bytes_per_conn;
    let _ = writeln!(
        w,
        "\nThe seed's 20 KB model {} per-connection memory {:.1}x{}.\n",
        if ratio >= 1.0 {
            "overstates"
        } else {
            "understates"
        },
        if ratio >= 1.0 { ratio } else { 1.0 / ratio },
        if ratio >= 1.0 {
            " for idle connections"
        } else {
            ""
        }
    );

    let _ = writeln!(w, "## Assumptions and limits\n");
    let _ = writeln!(
        w,
        "- Memory is for idle connections (CONNECT done, no subscriptions, no queued messages); \
         subscriptions, in-flight QoS 1 windows and offline queues add to it.\n\
         - RSS summed over processes counts pages shared between them (the binary's text) once per process; \
         it is in the baseline, not the per-connection slope.\n\
         - CPU costs are per core of this machine and assume the target's cores are as fast and the broker \
         scales linearly with workers (one SO_REUSEPORT worker per core).\n\
         - Message CPU is measured at saturation in one-to-one pairs, where batching makes each message cheaper \
         than at a low per-connection rate; the NIC figure assumes every message travels in its own segment.\n\
         - Keep-alive PINGREQ/PINGRESP traffic and TLS are not included.\n\
         - A per-process fd limit applies to each worker: the target's workers times that limit must cover the \
         connection count, in addition to the total above."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::super::measure::{MsgRun, Step};
    use super::super::project::{linear_fit, project, Resource};
    use super::*;

    fn sample() -> (Measurement, Costs, Target) {
        let steps: Vec<Step> = (0..=4)
            .map(|i| Step {
                conns: i * 5000,
                rss_bytes: 8_000_000 + (i as u64) * 5000 * 3000,
                rss_settled: true,
                fds: 30 + (i as u64) * 5000,
                broker_procs: 3,
            })
            .collect();
        let m = Measurement {
            broker_pid: 42,
            broker_cmdline: "mqttd --workers 2".into(),
            steps,
            requested: 20_000,
            connected: 20_000,
            failed: 0,
            worker_procs: 2,
            source_addrs: vec!["127.0.0.2".into(), "127.0.0.3".into()],
            connect_cpu_s: 0.5,
            connect_wall_s: 2.0,
            msg_runs: vec![MsgRun {
                qos: 1,
                pairs: 100,
                payload: 64,
                delivered: 1_000_000,
                delivered_per_s: 200_000.0,
                broker_cpu_s: 4.0,
                cpu_us_per_msg: 4.0,
                lost: 0,
            }],
            msg_errors: vec![],
            host_loadavg_1m: 0.5,
            host_cpus: 2,
        };
        let c = Costs {
            bytes_per_conn: 3000.0,
            base_rss_bytes: 8_000_000.0,
            fds_per_conn: 1.0,
            base_fds: 30.0,
            cpu_s_per_connect: 25e-6,
            cpu_us_per_msg_qos0: None,
            cpu_us_per_msg_qos1: Some(4.0),
            wire_bytes_per_msg: 260.0,
        };
        let t = Target {
            cores: 24.0,
            mem_bytes: 91.0 * 1024.0 * 1024.0 * 1024.0,
            fds: 50_000_000.0,
            nic_bytes_per_s: 1.25e9,
            mem_headroom: 0.75,
            cpu_headroom: 0.7,
            nic_headroom: 0.7,
            msgs_per_conn_per_s: 0.1,
            payload: 64,
            qos: 1,
            goal: 1_000_000.0,
        };
        (m, c, t)
    }

    fn render_sample(t: &Target) -> String {
        let (m, c, _) = sample();
        let pts: Vec<(f64, f64)> = m
            .steps
            .iter()
            .map(|s| (s.conns as f64, s.rss_bytes as f64))
            .collect();
        let fit = linear_fit(&pts).unwrap();
        let p = project(&c, t);
        render(&ReportInput {
            m: &m,
            costs: &c,
            target: t,
            proj: &p,
            fit,
            command: "mqttd-bench capacity --broker-pid 42".into(),
            date: "2025-01-01".into(),
            mem_spec: "91G".into(),
            nic_spec: "10G".into(),
            plot: Some("capacity-rss.png".into()),
        })
    }

    #[test]
    fn report_has_every_section_and_table() {
        let (_, _, t) = sample();
        let md = render_sample(&t);
        for needle in [
            "# mqttd capacity report",
            "## Measured per-unit costs",
            "## Projection per resource",
            "## Seed model vs measured",
            "| memory per idle connection | **3000 B**",
            "| CPU per connect | 25.0 µs",
            "| CPU per delivered message, QoS 1 | 4.00 µs",
            "| CPU per delivered message, QoS 0 | not measured",
            "R² = 1.0000",
            "![broker RSS against connections](capacity-rss.png)",
            "| seed: typical (20 KB) | 20480 B |",
            "10G = 10.00 Gbit/s = 1250 MB/s",
            "127.0.0.2, 127.0.0.3",
            "mqttd-bench capacity --broker-pid 42",
            "2025-01-01",
            "(`mqttd --workers 2`, 3 processes",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in:\n{md}");
        }
        // 5 samples
        assert!(md.matches(" KiB | ").count() >= 5);
    }

    #[test]
    fn report_names_binding_resource_and_goal_headroom() {
        let (_, _, t) = sample();
        let md = render_sample(&t);
        let p = {
            let (_, c, _) = sample();
            project(&c, &t)
        };
        assert_eq!(p.binding().resource, Resource::Memory);
        assert!(md.contains("| **memory** (binding) |"));
        assert!(md.contains("**Binding resource: memory.**"));
        assert!(md.contains(&format!("**{} connections**", fmt_count(p.max_conns()))));
        assert!(md.contains("1,000,000 connections fit with"));
        assert!(md.contains("overstates per-connection memory 6.8x"));
    }

    #[test]
    fn report_says_when_goal_does_not_fit() {
        let (_, _, mut t) = sample();
        t.fds = 500_000.0;
        let md = render_sample(&t);
        assert!(md.contains("**Binding resource: file descriptors.**"));
        assert!(md.contains("1,000,000 connections do NOT fit"));
    }
}
