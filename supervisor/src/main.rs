//! `mqttd`: the broker's command line.
//!
//! Reads the configuration (file, environment, `--set` flags), sets up logging and runs the
//! broker. In this version the broker is one worker running in this process; the
//! multi-process supervisor (one SO_REUSEPORT worker per core) builds on the same
//! `mqttd_broker::Worker`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use mqttd_broker::config::{Config, LogFormat};
use mqttd_broker::Worker;

#[derive(Debug, Parser)]
#[command(
    name = "mqttd",
    version,
    about = "A multi-process MQTT 3.1.1 / 5.0 broker"
)]
struct Cli {
    /// TOML configuration file (see configs/mqttd.toml). Without it the defaults apply.
    #[arg(short, long, env = "MQTTD_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the MQTT/TCP listener (shorthand for --set listener.tcp=ADDR).
    #[arg(short, long)]
    bind: Option<String>,
    /// Override any config key: --set limits.max_inflight=32 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Log filter (shorthand for --set log.level=...).
    #[arg(long)]
    log_level: Option<String>,
    /// Log format, human or json (shorthand for --set log.format=...).
    #[arg(long)]
    log_format: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut sets = cli.sets.clone();
    if let Some(bind) = &cli.bind {
        sets.push(format!("listener.tcp=\"{bind}\""));
    }
    if let Some(level) = &cli.log_level {
        sets.push(format!("log.level=\"{level}\""));
    }
    if let Some(format) = &cli.log_format {
        sets.push(format!("log.format=\"{format}\""));
    }
    let config = Config::load(cli.config.as_deref(), std::env::vars(), &sets)?;
    init_logging(&config)?;

    // One worker owns one core: a current-thread runtime, so the worker's state needs no locks.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let worker = Worker::bind(config, None).await?;
        for (kind, addr) in worker.listen_addrs() {
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                "listening on {kind} {addr}"
            );
            // Tests and scripts read this line to learn the port when binding port 0.
            println!("mqttd listening {kind} {addr}");
        }
        use std::io::Write;
        std::io::stdout().flush().ok();
        worker.run(shutdown_signal()).await
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
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
