//! The supervisor as a process tree: worker processes start, are replaced when killed,
//! drain on SIGTERM, are replaced one by one on SIGHUP, and die with the supervisor.
//! Worker PIDs are read from /proc (children of the supervisor); every wait has a deadline.

mod common;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::procs::{alive, children, flag};
use common::raw::{body, client_id, connect, hex, split_packets, End, Raw, V};
use common::Broker;

const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `probe` until it returns Some, panicking with `what` after [`DEADLINE`].
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn workers(broker: &Broker, n: usize) -> BTreeSet<u32> {
    wait_for(&format!("{n} worker processes"), || {
        let pids = children(broker.pid());
        (pids.len() == n).then_some(pids)
    })
}

/// A full MQTT handshake (v3.1.1 CONNECT -> CONNACK accepted).
fn handshake(broker: &Broker) {
    let (_raw, _connack) = Raw::connect(broker.addr, V::V3, &client_id("sup"));
}

/// A v3.1.1 handshake; false if the CONNECT is refused or the connection closed first.
fn try_handshake(broker: &Broker) -> bool {
    let mut raw = Raw::open(broker.addr, V::V3);
    raw.send_lossy(&connect(V::V3, &client_id("sup")));
    matches!(raw.read_packet(), Ok(Some(p)) if p == [0x20, 0x02, 0x00, 0x00])
}

#[test]
fn starts_the_requested_workers_and_accepts() {
    let broker = Broker::start_workers(3, &[]);
    let pids = workers(&broker, 3);
    let mut indexes: Vec<String> = pids
        .iter()
        .map(|&pid| flag(pid, "--worker-index").expect("--worker-index"))
        .collect();
    indexes.sort();
    assert_eq!(indexes, ["0", "1", "2"]);
    for &pid in &pids {
        assert_eq!(flag(pid, "--worker-count").as_deref(), Some("3"));
        // The concrete port, not the 0 the user asked for.
        assert_eq!(flag(pid, "--bind"), Some(broker.addr.to_string()));
    }
    for _ in 0..10 {
        handshake(&broker);
    }
}

#[test]
fn a_killed_worker_is_replaced() {
    let mut broker = Broker::start_workers(3, &[]);
    let before = workers(&broker, 3);
    let victim = *before.iter().next().unwrap();
    let index = flag(victim, "--worker-index");
    kill_pid(victim, "KILL");
    // The port accepts while the slot is empty: the other workers hold it.
    for _ in 0..20 {
        std::net::TcpStream::connect(broker.addr).expect("connect while a worker is down");
    }
    let after = wait_for("a replacement worker", || {
        let now = children(broker.pid());
        (now.len() == 3 && !now.contains(&victim)).then_some(now)
    });
    let new: Vec<u32> = after.difference(&before).copied().collect();
    assert_eq!(new.len(), 1, "before {before:?} after {after:?}");
    assert_eq!(flag(new[0], "--worker-index"), index, "same slot");
    // Client ids homed on the dead slot may get "server unavailable" until the replacement
    // has joined its peers; then every handshake succeeds again.
    wait_for("20 handshakes in a row after the restart", || {
        (0..20).all(|_| try_handshake(&broker)).then_some(())
    });
    broker.assert_alive();
}

#[test]
fn sigterm_drains_v5_clients_and_the_tree_exits() {
    let mut broker = Broker::start_workers(2, &[]);
    let pids = workers(&broker, 2);
    // Several clients, so (with SO_REUSEPORT spreading them) both workers have some.
    let mut clients: Vec<Raw> = (0..6)
        .map(|_| Raw::connect(broker.addr, V::V5, &client_id("drain")).0)
        .collect();
    let status = broker.terminate();
    assert!(status.success(), "supervisor exit status {status}");
    for raw in &mut clients {
        let (bytes, end) = raw.read_until_close();
        let (packets, _) = split_packets(&bytes);
        let disconnect = packets
            .iter()
            .find(|p| p[0] == 0xE0)
            .unwrap_or_else(|| panic!("no DISCONNECT, got {} then {end:?}", hex(&bytes)));
        assert_eq!(body(disconnect).first(), Some(&0x8B), "{}", hex(disconnect));
        assert!(matches!(end, End::Eof | End::Reset), "{end:?}");
    }
    wait_for("every worker to exit", || {
        pids.iter().all(|&p| !alive(p)).then_some(())
    });
}

/// What one connection attempt of the rolling-restart prober saw.
#[derive(Debug, Default, Clone, Copy)]
struct Probe {
    /// CONNECT answered by CONNACK.
    handshakes: u32,
    /// connect(2) failed with ECONNREFUSED: nobody was listening.
    refused: u32,
    /// connect(2) failed with ECONNRESET: the SYN was queued on a listener that closed.
    reset_in_queue: u32,
    /// Accepted, then closed before CONNACK by a worker that started draining.
    closed_by_drain: u32,
    /// CONNACK "server unavailable" (3.1.1 code 3).
    unavailable: u32,
}

/// Connects in a loop (TCP, then a v3.1.1 CONNECT) until `stop`; counts outcomes.
fn probe_loop(addr: std::net::SocketAddr, stop: &AtomicBool, handshakes: &AtomicU32) -> Probe {
    let mut seen = Probe::default();
    while !stop.load(Ordering::Relaxed) && seen.handshakes < 1_000_000 {
        let stream = match std::net::TcpStream::connect(addr) {
            Ok(stream) => stream,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                seen.refused += 1;
                continue;
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                seen.reset_in_queue += 1;
                continue;
            }
            Err(e) => panic!("connect: {e}"),
        };
        let mut raw = Raw::from_stream(stream, V::V3);
        let answer = raw
            .try_send(&connect(V::V3, &client_id("hup")))
            .and_then(|()| raw.read_packet());
        match answer {
            Ok(Some(p)) if p == [0x20, 0x02, 0x00, 0x00] => {
                seen.handshakes += 1;
                handshakes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(p)) if p == [0x20, 0x02, 0x00, 0x03] => seen.unavailable += 1,
            Ok(Some(p)) => panic!("unexpected answer {}", hex(&p)),
            Ok(None) | Err(_) => seen.closed_by_drain += 1,
        }
    }
    seen
}

#[test]
fn sighup_replaces_every_worker_and_the_port_keeps_accepting() {
    let mut broker = Broker::start_workers(2, &[]);
    let before = workers(&broker, 2);
    let addr = broker.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let handshakes = Arc::new(AtomicU32::new(0));
    let prober = {
        let (stop, handshakes) = (stop.clone(), handshakes.clone());
        std::thread::spawn(move || probe_loop(addr, &stop, &handshakes))
    };
    // The loop is running before the restart begins.
    wait_for("the connect loop to start", || {
        (handshakes.load(Ordering::Relaxed) >= 20).then_some(())
    });
    broker.signal("HUP");
    let after = wait_for("every worker to be replaced", || {
        let now = children(broker.pid());
        (now.len() == 2 && now.is_disjoint(&before)).then_some(now)
    });
    stop.store(true, Ordering::Relaxed);
    let seen = prober.join().expect("prober");
    eprintln!("rolling restart: {seen:?}");
    // A replacement is bound before its predecessor drains: something always listens.
    assert_eq!(seen.refused, 0, "connections refused: {seen:?}");
    assert!(seen.handshakes > 20, "{seen:?}");
    // Every worker slot is served throughout: the old worker until its successor is ready.
    assert_eq!(
        seen.unavailable, 0,
        "CONNACK 'server unavailable': {seen:?}"
    );
    // The supervisor owns each slot's listening socket, so a worker exiting closes no
    // listener: connections queued during the swap wait for the successor.
    assert_eq!(seen.reset_in_queue, 0, "queued connections reset: {seen:?}");
    let mut indexes: Vec<String> = after
        .iter()
        .map(|&p| flag(p, "--worker-index").unwrap())
        .collect();
    indexes.sort();
    assert_eq!(indexes, ["0", "1"]);
    handshake(&broker);
    broker.assert_alive();
}

/// A rolling restart whose replacements never get ready (the binary on disk was replaced by
/// one that hangs before its ready line) does not stall: each replacement is killed after
/// `cluster.ready_timeout_secs` and counted, the old workers keep serving, and the roll
/// goes on to the next slot (both slots time out).
#[test]
fn sighup_replacement_that_never_gets_ready_is_killed_and_the_roll_goes_on() {
    let dir = std::env::temp_dir().join(format!("mqttd-ready-timeout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("mqttd");
    std::fs::copy(env!("CARGO_BIN_EXE_mqttd"), &exe).unwrap();
    let mut broker = Broker::start_exe(&exe, 2, &["cluster.ready_timeout_secs=1"]);
    let before = workers(&broker, 2);
    // The "new release": a program that never prints the ready line.
    let hang = dir.join("mqttd.new");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&hang, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&hang, &exe).unwrap();
    broker.signal("HUP");
    common::prom::scrape_until(&broker, "a ready timeout on both slots", |e| {
        let n = |w: &str| e.value("mqttd_worker_ready_timeouts_total", &[("worker", w)]);
        (n("0") == 1.0 && n("1") == 1.0).then_some(())
    });
    // The hung replacements are gone (SIGKILL); the original workers still serve.
    wait_for("only the original workers", || {
        (children(broker.pid()) == before).then_some(())
    });
    handshake(&broker);
    broker.assert_alive();
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_mesh_dir_is_private_and_removed_at_exit() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut broker = Broker::start_workers(2, &[]);
    let pids = workers(&broker, 2);
    let dir = PathBuf::from(flag(*pids.iter().next().unwrap(), "--mesh-dir").unwrap());
    assert_eq!(
        dir,
        std::env::temp_dir().join(format!("mqttd-{}", broker.pid()))
    );
    let mode = std::fs::metadata(&dir)
        .expect("mesh dir exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    assert!(broker.terminate().success());
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn workers_die_with_a_killed_supervisor() {
    let mut broker = Broker::start_workers(2, &[]);
    let pids = workers(&broker, 2);
    let dir = PathBuf::from(flag(*pids.iter().next().unwrap(), "--mesh-dir").unwrap());
    broker.signal("KILL");
    broker.wait_exit();
    wait_for("orphaned workers to exit", || {
        pids.iter().all(|&p| !alive(p)).then_some(())
    });
    // A killed supervisor cannot clean up (the next one with its pid would).
    let _ = std::fs::remove_dir_all(dir);
    // The port is free again: nothing of the broker is left holding it.
    wait_for("the port to be released", || {
        std::net::TcpStream::connect(broker.addr)
            .is_err()
            .then_some(())
    });
}

fn kill_pid(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}
