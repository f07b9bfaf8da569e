//! `mqttd-bench`: load generator for mqttd (and any MQTT 3.1.1/5.0 broker).
//!
//! Scenarios (subcommands):
//! * `conns` — open N connections at R/s and hold them; connect rate,
//!   CONNECT→CONNACK latency, failures by reason. Spreads itself over child
//!   processes and loopback source addresses (fd and port limits).
//! * `storm` — connect/disconnect churn; cycles/s, latency, failures.
//! * `pairs` (alias `pubsub`), `fanin`, `fanout` — publish/subscribe
//!   throughput, publish→deliver latency, loss and duplicates, QoS 0/1/2.
//! * `retained` — M retained topics, K wildcard subscribers.
//! * `idle` — broker memory per idle connection (older, kept for its docs).
//! * `quic-conns`, `quic-pairs` — MQTT over QUIC (quinn client): handshakes/s, RSS per idle
//!   QUIC connection, pairs throughput over QUIC vs TCP with the same client code.
//! * `proxy` — not a scenario: accepts plain TCP and relays it to the broker over TLS,
//!   WebSocket or WSS, so the TCP scenarios measure those transports (bench/transports.sh).
//!
//! Each prints a table plus one JSON line, or with `--json` only one JSON
//! object; `--compare HOST:PORT` reruns against a second broker and prints
//! ratios. The scenarios above speak TCP; QUIC has its own two (below).

mod capacity;
mod procfs;
mod proxy;
mod report;
mod scenarios;
mod wire;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "mqttd-bench", version, about = "MQTT broker load generator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Open N connections at R/s, hold them; connect rate, latency, failures.
    Conns(scenarios::conns::ConnsArgs),
    /// Internal: child process of `conns`.
    #[command(hide = true)]
    ConnsWorker(scenarios::conns::ConnsWorkerArgs),
    /// Connect/disconnect churn: N clients loop CONNECT -> CONNACK -> DISCONNECT.
    Storm(scenarios::storm::StormArgs),
    /// N publisher -> subscriber pairs on distinct topics (one thread).
    #[command(visible_alias = "pubsub")]
    Pairs(scenarios::flows::FlowArgs),
    /// N publishers -> 1 subscriber on one topic.
    Fanin(scenarios::flows::FlowArgs),
    /// 1 publisher -> N subscribers on one topic.
    Fanout(scenarios::flows::FlowArgs),
    /// M retained topics, then K wildcard subscribers count what they get.
    Retained(scenarios::retained::RetainedArgs),
    /// Broker memory per idle connection.
    Idle(scenarios::idle::IdleArgs),
    /// Internal: child process of `idle`.
    #[command(hide = true)]
    IdleWorker(scenarios::idle::IdleWorkerArgs),
    /// Measure per-unit costs on a running broker and project the target box's limits.
    Capacity(capacity::CapacityArgs),
    /// MQTT over QUIC: handshakes/s, per broker CPU-second, broker RSS per idle connection.
    QuicConns(scenarios::quic::QuicConnsArgs),
    /// Publisher -> subscriber pairs over QUIC or TCP with the same client code.
    QuicPairs(scenarios::quic::QuicPairsArgs),
    /// Client-side transport proxy: plain TCP in, TLS / WebSocket / WSS (or TCP) to the broker.
    Proxy(proxy::ProxyArgs),
}

fn main() {
    let result = match Cli::parse().cmd {
        Cmd::Conns(a) => scenarios::conns::run(a),
        Cmd::ConnsWorker(a) => scenarios::conns::run_worker(a),
        Cmd::Storm(a) => scenarios::storm::run(a),
        Cmd::Pairs(a) => scenarios::flows::run(scenarios::flows::Shape::Pairs, a),
        Cmd::Fanin(a) => scenarios::flows::run(scenarios::flows::Shape::Fanin, a),
        Cmd::Fanout(a) => scenarios::flows::run(scenarios::flows::Shape::Fanout, a),
        Cmd::Retained(a) => scenarios::retained::run(a),
        Cmd::Idle(a) => scenarios::idle::run(a),
        Cmd::IdleWorker(a) => scenarios::idle::run_worker(a),
        Cmd::Capacity(a) => capacity::run(a),
        Cmd::QuicConns(a) => scenarios::quic::run_conns(a),
        Cmd::QuicPairs(a) => scenarios::quic::run_pairs(a),
        Cmd::Proxy(a) => proxy::run(a),
    };
    if let Err(e) = result {
        eprintln!("mqttd-bench: error: {e:#}");
        std::process::exit(1);
    }
}
