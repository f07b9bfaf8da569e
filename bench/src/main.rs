//! `mqttd-bench`: load generator for mqttd (and any MQTT 3.1.1/5.0 broker).
//!
//! Scenarios:
//! * `pubsub` — N publisher/subscriber pairs on one thread; msgs/s, latency
//!   percentiles, delivery check, broker CPU per message.
//! * `idle` — many idle connections spread over child processes; broker
//!   RSS per connection.
//!
//! Every scenario prints a human table followed by one JSON line.

mod procfs;
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
    /// Throughput and latency with N publisher -> subscriber pairs, one thread.
    Pubsub(scenarios::pubsub::PubSubArgs),
    /// Broker memory per idle connection.
    Idle(scenarios::idle::IdleArgs),
    /// Internal: child process of `idle`.
    #[command(hide = true)]
    IdleWorker(scenarios::idle::IdleWorkerArgs),
}

fn main() {
    let result = match Cli::parse().cmd {
        Cmd::Pubsub(a) => scenarios::pubsub::run(a),
        Cmd::Idle(a) => scenarios::idle::run(a),
        Cmd::IdleWorker(a) => scenarios::idle::run_worker(a),
    };
    if let Err(e) = result {
        eprintln!("mqttd-bench: error: {e:#}");
        std::process::exit(1);
    }
}
