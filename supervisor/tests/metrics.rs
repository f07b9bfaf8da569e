//! The HTTP endpoint: `/metrics` in the Prometheus text format (parsed strictly here), every
//! documented metric from every worker, values that follow traffic, restarts, a worker that
//! does not answer, `/health` and `/ready`; and the shipped Prometheus, alert and Grafana
//! configs (checked by promtool, and against what the endpoint exports).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::clients::v4;
use common::procs::worker_pids;
use common::prom::*;
use common::Broker;

const WORKERS: u16 = 2;

/// Per-worker gauges, each one sample per worker with only the `worker` label.
const GAUGES: &[&str] = &[
    "mqttd_connections",
    "mqttd_connection_limit",
    "mqttd_sessions",
    "mqttd_subscriptions",
    "mqttd_routes",
    "mqttd_retained_messages",
    "mqttd_queued_messages",
    "mqttd_inflight_messages",
    "mqttd_accounted_bytes",
    "mqttd_connection_model_bytes",
    "mqttd_connection_budget_bytes",
    "mqttd_memory_high_watermark_bytes",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
];

/// Per-worker counters: (name, the label every sample has besides `worker`, its values).
const COUNTERS: &[(&str, &str, &[&str])] = &[
    ("process_cpu_seconds_total", "", &[]),
    ("mqttd_connections_accepted_total", "", &[]),
    (
        "mqttd_connections_refused_total",
        "reason",
        &["connection_limit", "memory", "connect_rate"],
    ),
    ("mqttd_accept_errors_total", "", &[]),
    ("mqttd_messages_received_total", "qos", &["0", "1", "2"]),
    ("mqttd_messages_sent_total", "qos", &["0", "1", "2"]),
    ("mqttd_bytes_received_total", "", &[]),
    ("mqttd_bytes_sent_total", "", &[]),
    (
        "mqttd_messages_dropped_total",
        "reason",
        &[
            "qos0_backlog",
            "queue_full",
            "expired",
            "too_large",
            "session_end",
            "over_budget",
            "mesh_backlog",
        ],
    ),
    (
        "mqttd_forwarded_messages_total",
        "direction",
        &["out", "in"],
    ),
    ("mqttd_handoffs_total", "", &[]),
    ("mqttd_protocol_errors_total", "", &[]),
    ("mqttd_keepalive_timeouts_total", "", &[]),
    ("mqttd_barrier_timeouts_total", "", &[]),
    ("mqttd_takeovers_total", "", &[]),
    ("mqttd_rate_limited_total", "kind", &["connect", "publish"]),
    ("mqttd_slow_consumer_disconnects_total", "", &[]),
    ("mqttd_auth_failures_total", "", &[]),
];

const HISTOGRAM: &str = "mqttd_connection_accounted_bytes";
const BUCKETS: &[&str] = &[
    "256", "512", "1024", "2048", "4096", "8192", "16384", "20480", "32768", "65536", "+Inf",
];

// ---------------------------------------------------------------------------------------
// HTTP and the text format
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// The endpoint
// ---------------------------------------------------------------------------------------

#[test]
fn every_metric_is_exported_for_every_worker() {
    let broker = Broker::start_workers(WORKERS, &["limits.max_connections_per_worker=1234"]);
    let e = scrape(&broker);
    for w in 0..WORKERS {
        let w = w.to_string();
        let worker = [("worker", w.as_str())];
        for name in GAUGES {
            assert_eq!(e.types[*name], "gauge", "{name}");
            e.value(name, &worker);
        }
        for (name, label, values) in COUNTERS {
            assert_eq!(e.types[*name], "counter", "{name}");
            let mine: Vec<&Sample> = e
                .samples_of(name)
                .filter(|s| s.labels["worker"] == w)
                .collect();
            assert!(!mine.is_empty(), "{name} has no sample for worker {w}");
            for s in &mine {
                let mut keys: Vec<&str> = s.labels.keys().map(String::as_str).collect();
                keys.retain(|k| *k != "worker");
                let expected: Vec<&str> = if label.is_empty() {
                    vec![]
                } else {
                    vec![label]
                };
                assert_eq!(keys, expected, "labels of {name}");
            }
            for v in *values {
                e.value(name, &[("worker", &w), (label, v)]);
            }
        }
        assert_eq!(e.types[HISTOGRAM], "histogram");
        for le in BUCKETS {
            e.value(
                &format!("{HISTOGRAM}_bucket"),
                &[("worker", &w), ("le", le)],
            );
        }
        e.value(&format!("{HISTOGRAM}_sum"), &worker);
        e.value(&format!("{HISTOGRAM}_count"), &worker);

        assert_eq!(e.value("mqttd_connection_limit", &worker), 1234.0);
        assert_eq!(e.value("mqttd_connection_model_bytes", &worker), 20480.0);
        assert_eq!(e.value("mqttd_connection_budget_bytes", &worker), 20480.0);
        assert!(e.value("process_resident_memory_bytes", &worker) > 0.0);
        assert!(e.value("process_open_fds", &worker) > 0.0);
        assert!(e.value("process_max_fds", &worker) >= e.value("process_open_fds", &worker));
        assert_eq!(e.value("mqttd_worker_restarts_total", &worker), 0.0);
        assert_eq!(e.value("mqttd_worker_ready_timeouts_total", &worker), 0.0);
        assert_eq!(e.value("mqttd_worker_up", &worker), 1.0);
    }
    // Supervisor-level metrics carry no worker label.
    assert_eq!(e.value("mqttd_workers_configured", &[]), f64::from(WORKERS));
    assert_eq!(e.value("mqttd_workers_up", &[]), f64::from(WORKERS));
    assert_eq!(e.value("mqttd_scrape_errors_total", &[]), 0.0);
    e.value(
        "mqttd_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
    );
    // Every per-worker family has exactly WORKERS samples per label set.
    for name in GAUGES {
        assert_eq!(e.samples_of(name).count(), usize::from(WORKERS), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_follow_the_traffic() {
    let broker = Broker::start_workers(WORKERS, &[]);
    let before = scrape(&broker);
    let delta = |e: &Exposition, name: &str, labels: &[(&str, &str)]| {
        e.sum(name, labels) - before.sum(name, labels)
    };

    let mut sub = v4::connect(v4::persistent(&broker, "metrics-sub")).await;
    sub.subscribe("metrics/t", v4::QoS::AtLeastOnce).await;
    let mut publisher = v4::connect(v4::opts(&broker, "metrics-pub")).await;
    let idle_a = v4::connect(v4::opts(&broker, "metrics-idle-a")).await;
    let idle_b = v4::connect(v4::opts(&broker, "metrics-idle-b")).await;
    for i in 0..3 {
        publisher
            .publish("metrics/t", v4::QoS::AtMostOnce, false, format!("q0-{i}"))
            .await;
    }
    for i in 0..2 {
        publisher
            .publish("metrics/t", v4::QoS::AtLeastOnce, false, format!("q1-{i}"))
            .await;
    }
    for _ in 0..5 {
        sub.next_publish().await;
    }

    let e = scrape(&broker);
    assert_eq!(e.sum("mqttd_connections", &[]), 4.0);
    assert_eq!(e.sum("mqttd_sessions", &[]), 4.0);
    assert_eq!(e.sum("mqttd_subscriptions", &[]), 1.0);
    assert!(e.sum("mqttd_routes", &[]) >= 1.0);
    assert_eq!(
        delta(&e, "mqttd_messages_received_total", &[("qos", "0")]),
        3.0
    );
    assert_eq!(
        delta(&e, "mqttd_messages_received_total", &[("qos", "1")]),
        2.0
    );
    assert_eq!(
        delta(&e, "mqttd_messages_received_total", &[("qos", "2")]),
        0.0
    );
    assert_eq!(delta(&e, "mqttd_messages_sent_total", &[("qos", "0")]), 3.0);
    assert_eq!(delta(&e, "mqttd_messages_sent_total", &[("qos", "1")]), 2.0);
    assert!(delta(&e, "mqttd_connections_accepted_total", &[]) >= 4.0);
    assert!(delta(&e, "mqttd_bytes_received_total", &[]) > 0.0);
    assert!(delta(&e, "mqttd_bytes_sent_total", &[]) > 0.0);
    // A connection accepted by the worker that does not own its client id moves; a message
    // crosses workers when publisher and subscriber live on different ones.
    let forwarded = delta(
        &e,
        "mqttd_forwarded_messages_total",
        &[("direction", "out")],
    );
    assert_eq!(
        forwarded,
        delta(&e, "mqttd_forwarded_messages_total", &[("direction", "in")])
    );

    // Offline: QoS 1 messages wait in the persistent session's queue.
    sub.disconnect().await;
    idle_a.disconnect().await;
    for i in 0..2 {
        publisher
            .publish(
                "metrics/t",
                v4::QoS::AtLeastOnce,
                false,
                format!("later-{i}"),
            )
            .await;
    }
    scrape_until(&broker, "2 queued messages and 2 connections", |e| {
        (e.sum("mqttd_queued_messages", &[]) == 2.0 && e.sum("mqttd_connections", &[]) == 2.0)
            .then_some(())
    });
    let e = scrape(&broker);
    assert_eq!(
        e.sum("mqttd_sessions", &[]),
        3.0,
        "the persistent session stays"
    );
    assert_eq!(e.sum("mqttd_inflight_messages", &[]), 0.0);
    drop(idle_b);
}

#[test]
fn health_and_ready() {
    let broker = Broker::start_workers(WORKERS, &[]);
    let health = http(broker.metrics_addr, "GET", "/health");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    assert_eq!(http(broker.metrics_addr, "GET", "/ready").status, 200);
    assert_eq!(
        http(broker.metrics_addr, "GET", "/ready?verbose").status,
        200
    );
    assert_eq!(http(broker.metrics_addr, "GET", "/nope").status, 404);
    let post = http(broker.metrics_addr, "POST", "/metrics");
    assert_eq!(post.status, 405);
    assert_eq!(post.headers["allow"], "GET, HEAD");
}

#[test]
fn a_killed_worker_counts_a_restart() {
    let broker = Broker::start_workers(WORKERS, &[]);
    let (_, victim) = worker_pids(broker.pid())
        .into_iter()
        .find(|(index, _)| *index == 1)
        .expect("worker 1");
    kill(victim, "KILL");
    // Every scrape meanwhile is a valid exposition (`scrape` parses it strictly).
    scrape_until(&broker, "worker 1's restart to be counted and ready", |e| {
        (e.value("mqttd_worker_restarts_total", &[("worker", "1")]) == 1.0
            && e.value("mqttd_workers_up", &[]) == 2.0
            && e.value("mqttd_worker_up", &[("worker", "1")]) == 1.0)
            .then_some(())
    });
    let e = scrape(&broker);
    assert_eq!(
        e.value("mqttd_worker_restarts_total", &[("worker", "0")]),
        0.0
    );
    // The replacement's own metrics are there again.
    e.value("mqttd_connections", &[("worker", "1")]);
    assert_eq!(http(broker.metrics_addr, "GET", "/ready").status, 200);
}

/// SIGCONTs a stopped worker even if the test fails, so the broker can drain.
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        kill(self.0, "CONT");
    }
}

#[test]
fn a_worker_that_does_not_answer_is_left_out_and_counted() {
    let broker = Broker::start_workers(WORKERS, &[]);
    let (_, pid) = worker_pids(broker.pid())
        .into_iter()
        .find(|(index, _)| *index == 1)
        .expect("worker 1");
    kill(pid, "STOP");
    let stopped = Continue(pid);
    // A stopped process cannot answer: the scrape gives up on it after its timeout.
    let e = scrape(&broker);
    assert_eq!(e.value("mqttd_worker_up", &[("worker", "1")]), 0.0);
    assert_eq!(e.value("mqttd_worker_up", &[("worker", "0")]), 1.0);
    assert!(e.value("mqttd_scrape_errors_total", &[]) >= 1.0);
    e.value("mqttd_connections", &[("worker", "0")]);
    assert_eq!(e.samples_of("mqttd_connections").count(), 1);
    // Still alive and ready as far as the supervisor knows.
    assert_eq!(e.value("mqttd_workers_up", &[]), 2.0);
    drop(stopped);
    scrape_until(&broker, "worker 1 to answer again", |e| {
        (e.value("mqttd_worker_up", &[("worker", "1")]) == 1.0).then_some(())
    });
}

fn kill(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

// ---------------------------------------------------------------------------------------
// configs/: Prometheus, alerts, Grafana
// ---------------------------------------------------------------------------------------

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

/// `promtool`, or None when it is not installed and not required (tests/run-all.sh
/// installs it and sets MQTTD_REQUIRE_PROMTOOL=1, so the suite never skips this there).
fn promtool() -> Option<&'static str> {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("MQTTD_REQUIRE_PROMTOOL").is_none(),
            "promtool not found (apt-get install prometheus)"
        );
        eprintln!("SKIPPED: promtool not found (apt-get install prometheus)");
        return None;
    }
    Some("promtool")
}

fn promtool_ok(args: &[&str]) {
    let Some(promtool) = promtool() else { return };
    let out = std::process::Command::new(promtool)
        .args(args)
        .current_dir(configs())
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_prometheus_config_and_alert_rules() {
    promtool_ok(&["check", "config", "prometheus.yml"]);
    promtool_ok(&["check", "rules", "alerts.yml"]);
    promtool_ok(&["test", "rules", "alerts_test.yml"]);
}

/// The dashboard's queries are valid PromQL: each becomes a recording rule (its template
/// variables replaced by match-anything) in a rules file that promtool checks.
#[test]
fn promtool_parses_every_dashboard_query() {
    let mut queries = Vec::new();
    exprs(&dashboard(), &mut queries);
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let q = q.replace("$instance", ".*").replace("$worker", ".*");
        let q = serde_json::Value::String(q).to_string(); // a JSON string is YAML
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {q}\n"
        ));
    }
    let path = std::env::temp_dir().join(format!("mqttd-dashboard-{}.yml", std::process::id()));
    std::fs::write(&path, rules).unwrap();
    promtool_ok(&["check", "rules", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
}

fn dashboard() -> serde_json::Value {
    let path = configs().join("grafana/mqttd.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("dashboard JSON")
}

/// `mqttd_*` and `process_*` identifiers in a PromQL expression (or any text).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        let starts = (bytes[i..].starts_with(b"mqttd_") || bytes[i..].starts_with(b"process_"))
            && (i == 0 || !ident(bytes[i - 1]));
        if starts {
            let end = (i..bytes.len())
                .find(|&j| !ident(bytes[j]))
                .unwrap_or(bytes.len());
            names.insert(text[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics() {
    let broker = Broker::start_workers(WORKERS, &[]);
    let exported = scrape(&broker).names();

    let mut queries = Vec::new();
    exprs(&dashboard(), &mut queries);
    assert!(queries.len() >= 10, "the dashboard has its panels' queries");
    let mut used: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    assert!(used.contains("mqttd_connections"));
    let alerts = std::fs::read_to_string(configs().join("alerts.yml")).unwrap();
    let alert_exprs: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect();
    assert!(alert_exprs.len() >= 10, "alerts.yml has its rules");
    for e in &alert_exprs {
        assert!(
            !matches!(e.trim(), "|" | ">"),
            "keep alert expressions on one line"
        );
    }
    let alert_names: BTreeSet<String> = alert_exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(alert_names.contains("process_cpu_seconds_total"));
    used.extend(alert_names);

    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
}
