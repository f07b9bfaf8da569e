//! `mqttd`: the broker's command line.
//!
//! One binary, two modes. Run by a user it is the **supervisor** (`supervisor.rs`): it
//! reads the configuration, reserves the port and runs `cluster.workers` worker processes
//! (`--workers N`; 0 = one per core), restarting them when they die, draining them on
//! SIGTERM/SIGINT and replacing them one at a time on SIGHUP. Each worker is this same
//! binary re-executed with the hidden `--worker-index/--worker-count/--mesh-dir` flags
//! (`worker_main.rs`), running one `mqttd_broker::Worker` on one core.
//!
//! Configuration comes from the file, the environment and `--set` flags in both modes:
//! workers get the supervisor's own arguments, so they load exactly the same config.

mod child;
mod layered;
mod metrics_http;
mod metrics_link;
mod quic;
mod signals;
mod spawn;
mod supervisor;
mod worker_main;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use mqttd_broker::cluster::WorkerIdentity;
use mqttd_broker::config::{Config, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "mqttd",
    version,
    about = "A multi-process MQTT 3.1.1 / 5.0 broker",
    // The supervisor appends its own --bind after the user's flags: the last one wins.
    args_override_self = true
)]
struct Cli {
    /// TOML configuration file (see configs/mqttd.toml). Without it the defaults apply.
    #[arg(short, long, env = "MQTTD_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the MQTT/TCP listener (shorthand for --set listener.tcp=ADDR).
    #[arg(short, long)]
    bind: Option<String>,
    /// Worker processes, 0 = one per core (shorthand for --set cluster.workers=N).
    #[arg(short, long)]
    workers: Option<u16>,
    /// Override any config key: --set limits.max_inflight=32 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Log filter (shorthand for --set log.level=...).
    #[arg(long)]
    log_level: Option<String>,
    /// Log format, human or json (shorthand for --set log.format=...).
    #[arg(long)]
    log_format: Option<String>,
    /// Worker mode: this process is worker I (set by the supervisor only).
    #[arg(long, hide = true, requires_all = ["worker_count", "mesh_dir"])]
    worker_index: Option<u16>,
    #[arg(long, hide = true, requires = "worker_index")]
    worker_count: Option<u16>,
    #[arg(long, hide = true, requires = "worker_index")]
    mesh_dir: Option<PathBuf>,
    /// Worker mode: the listening TCP socket inherited from the supervisor, by fd number.
    #[arg(long, hide = true, requires = "worker_index")]
    listen_fd: Option<i32>,
    /// Worker mode: the metrics channel inherited from the supervisor, by fd number.
    #[arg(long, hide = true, requires = "worker_index")]
    metrics_fd: Option<i32>,
    /// Worker mode: the slot's QUIC UDP socket inherited from the supervisor, by fd number.
    #[arg(long, hide = true, requires = "worker_index")]
    quic_fd: Option<i32>,
    /// Worker mode: the slot's TLS and WebSocket listeners inherited from the supervisor,
    /// as `tls=6` (transport=fd number), repeated.
    #[arg(long, hide = true, requires = "worker_index")]
    layered_fd: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut sets = cli.sets.clone();
    if let Some(bind) = &cli.bind {
        sets.push(format!("listener.tcp=\"{bind}\""));
    }
    if let Some(workers) = cli.workers {
        sets.push(format!("cluster.workers={workers}"));
    }
    if let Some(level) = &cli.log_level {
        sets.push(format!("log.level=\"{level}\""));
    }
    if let Some(format) = &cli.log_format {
        sets.push(format!("log.format=\"{format}\""));
    }
    let config = Config::load(cli.config.as_deref(), std::env::vars(), &sets)?;
    init_logging(&config)?;

    match (cli.worker_index, cli.worker_count, cli.mesh_dir) {
        (Some(index), Some(count), Some(mesh_dir)) => {
            anyhow::ensure!(
                index < count,
                "--worker-index {index} >= --worker-count {count}"
            );
            let identity = WorkerIdentity {
                index,
                count,
                mesh_dir,
            };
            let fds = worker_main::Fds {
                listener: cli.listen_fd,
                quic: cli.quic_fd,
                metrics: cli.metrics_fd,
                layered: worker_main::parse_layered_fds(&cli.layered_fd)?,
            };
            worker_main::run(config, identity, fds)
        }
        _ => supervisor::run(config, std::env::args_os().skip(1).collect()),
    }
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .with_context(|| format!("bad log.level {:?}", config.log.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
