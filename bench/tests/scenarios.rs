//! Runs every scenario briefly against a real mqttd started by the test and
//! checks that the counts add up (sent = received × subscribers, no loss or
//! duplicates at QoS 1 and 2, every connection accepted). No timing
//! thresholds: this box is shared and slow, only correctness is asserted.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

struct Broker {
    child: Child,
    port: u16,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn broker_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug/mqttd")
}

/// Start mqttd on an ephemeral port; None (test skipped) if it is not built.
fn start_broker() -> Option<Broker> {
    let path = broker_path();
    if !path.exists() {
        eprintln!(
            "SKIPPED: {} not found; build it first with `cargo build --workspace --bins`",
            path.display()
        );
        return None;
    }
    let mut child = Command::new(&path)
        .args([
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--log-level",
            "warn",
            "--set",
            "metrics.bind=\"127.0.0.1:0\"",
            "--set",
            "quic.bind=\"127.0.0.1:0\"",
            // Publishers up to 200 messages ahead (--max-lead) hold more than the 20 KB
            // per-connection model: these tests check the generator's counts, not the budget.
            "--set",
            "limits.connection_memory_budget=1048576",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mqttd");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read mqttd stdout");
    let addr = line
        .trim()
        .strip_prefix("mqttd listening tcp ")
        .unwrap_or_else(|| panic!("unexpected mqttd output {line:?}"));
    let port = addr.rsplit(':').next().unwrap().parse().unwrap();
    Some(Broker { child, port })
}

fn bench(broker: &Broker, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_mqttd-bench"))
        .args(args)
        .args([
            "--port",
            &broker.port.to_string(),
            "--json",
            "--progress",
            "never",
        ])
        .args(["--broker-pid", &broker.child.id().to_string()])
        .output()
        .expect("run mqttd-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mqttd-bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

fn check_flow(v: &Value, qos: u8, subs_per_pub: u64) {
    let published = u(v, "total_published");
    assert!(published > 0, "{v}");
    assert_eq!(u(v, "expected"), published * subs_per_pub, "{v}");
    assert!(v["broker"]["processes"].as_u64().unwrap() >= 1, "{v}");
    if qos > 0 {
        assert_eq!(u(v, "total_acked"), published, "{v}");
        assert_eq!(u(v, "delivered"), u(v, "expected"), "{v}");
        assert_eq!(v["lost"].as_i64(), Some(0), "{v}");
        assert_eq!(u(v, "duplicates"), 0, "{v}");
        assert_eq!(u(v, "reordered"), 0, "{v}");
    }
    assert_eq!(u(v, "connection_errors"), 0, "{v}");
}

const FLOW: &[&str] = &["--duration", "1", "--warmup", "0.2", "--max-lead", "200"];

#[test]
fn publish_scenarios_add_up() {
    let Some(b) = start_broker() else { return };
    for qos in ["0", "1", "2"] {
        let q: u8 = qos.parse().unwrap();
        let v = bench(
            &b,
            &[&["pairs", "--pairs", "4", "--qos", qos][..], FLOW].concat(),
        );
        assert_eq!(v["scenario"], "pairs");
        check_flow(&v, q, 1);
        let v = bench(
            &b,
            &[&["fanin", "--publishers", "4", "--qos", qos][..], FLOW].concat(),
        );
        check_flow(&v, q, 1);
        let v = bench(
            &b,
            &[&["fanout", "--subscribers", "4", "--qos", qos][..], FLOW].concat(),
        );
        check_flow(&v, q, 4);
    }
    // MQTT 5 and a paced rate through the `pubsub` alias.
    let v = bench(
        &b,
        &[
            &[
                "pubsub",
                "--pairs",
                "2",
                "--qos",
                "1",
                "--protocol",
                "5",
                "--rate",
                "200",
            ][..],
            FLOW,
        ]
        .concat(),
    );
    assert_eq!(v["scenario"], "pairs");
    check_flow(&v, 1, 1);
}

#[test]
fn retained_all_received() {
    let Some(b) = start_broker() else { return };
    for qos in ["0", "1", "2"] {
        let v = bench(
            &b,
            &[
                "retained",
                "--topics",
                "100",
                "--subscribers",
                "3",
                "--qos",
                qos,
            ],
        );
        assert_eq!(u(&v, "expected"), 300, "{v}");
        assert_eq!(u(&v, "received"), 300, "{v}");
        assert_eq!(u(&v, "missing"), 0, "{v}");
        assert_eq!(u(&v, "duplicates"), 0, "{v}");
        assert_eq!(v["time_to_all"]["count"].as_u64(), Some(3), "{v}");
    }
}

#[test]
fn conns_all_succeed_over_children() {
    let Some(b) = start_broker() else { return };
    // 3 children (20 per process) on 3 source addresses.
    let v = bench(
        &b,
        &[
            "conns",
            "--count",
            "60",
            "--per-proc",
            "20",
            "--timeout",
            "3",
            "--concurrency",
            "1",
            "--hold",
            "0.5",
        ],
    );
    assert_eq!(u(&v, "procs"), 3, "{v}");
    assert_eq!(u(&v, "requested"), 60, "{v}");
    assert_eq!(v["source_addrs"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(u(&v, "connected"), 60, "{v}");
    assert_eq!(u(&v, "failed"), 0, "{v}");
    assert_eq!(u(&v, "dropped_during_hold"), 0, "{v}");
    assert_eq!(v["connect_latency"]["count"].as_u64(), Some(60), "{v}");
    assert!(u(&v["broker_after"], "fds") >= 60, "{v}");
}

#[test]
fn storm_cycles_without_failures() {
    let Some(b) = start_broker() else { return };
    let v = bench(
        &b,
        &[
            "storm",
            "--clients",
            "1",
            "--duration",
            "1",
            "--timeout",
            "3",
        ],
    );
    assert!(u(&v, "cycles") > 0, "{v}");
    assert_eq!(u(&v, "failed"), 0, "{v}");
    assert_eq!(v["connect_latency"]["count"], v["cycles"], "{v}");
}
