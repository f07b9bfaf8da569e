//! Supervisor mode (`mqttd` without worker flags): reserves the port, prepares the mesh
//! directory, runs the worker set and prints `mqttd listening tcp ADDR` once every worker
//! is ready.

use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use mqttd_broker::config::{ClusterBackend, Config};
use socket2::{Domain, Protocol, Socket, Type};

use mqttd_broker::transport::layer::Framing;

use crate::child::{Launch, SlotSockets};
use crate::signals::Signals;
use crate::spawn::WorkerSet;

/// `user_args` are this process's own arguments, passed on to every worker unchanged
/// (so workers load the same config), followed by the worker flags.
pub fn run(config: Config, user_args: Vec<OsString>) -> anyhow::Result<()> {
    if config.cluster.backend == ClusterBackend::Redis {
        // Refuse to start (after a bounded wait) rather than run workers that cannot reach
        // the other hosts; the message names the URL.
        mqttd_broker::cluster::redis::check_reachable(&config.redis)?;
    }
    let count = worker_count(&config);
    // Port 0 becomes a concrete port here, and stays ours while we live (see `reserve`).
    let reservation =
        reserve(config.listener.tcp).with_context(|| format!("binding {}", config.listener.tcp))?;
    let addr = reservation
        .local_addr()?
        .as_socket()
        .context("listener address")?;
    let mesh = MeshDir::create(&config.cluster.mesh_dir)?;
    // One listening socket per worker slot, all in the port's SO_REUSEPORT group.
    let listeners = (0..count)
        .map(|_| mqttd_broker::worker::bind_tcp(addr, config.listener.backlog))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("listening on {addr}"))?;
    let quic = crate::quic::prepare(&config, count)?;
    let quic_addr = quic.as_ref().map(|q| q.addr);
    let quic_sockets = quic.map(|q| q.sockets.into_iter().map(Some).collect::<Vec<_>>());
    let quic_sockets = quic_sockets.unwrap_or_else(|| (0..count).map(|_| None).collect());
    let layered = crate::layered::prepare(&config, count)?;
    let announced: Vec<_> = layered.iter().map(|l| (l.framing, l.addr)).collect();
    let mut layered_sockets: Vec<Vec<_>> = (0..count).map(|_| Vec::new()).collect();
    for listener in layered {
        for (slot, socket) in layered_sockets.iter_mut().zip(listener.sockets) {
            slot.push((listener.framing, socket));
        }
    }
    let listeners: Vec<_> = listeners
        .into_iter()
        .zip(quic_sockets)
        .zip(layered_sockets)
        .map(|((tcp, quic), layered)| SlotSockets { tcp, quic, layered })
        .collect();

    let mut args = user_args;
    args.extend(
        [
            "--worker-count".into(),
            count.to_string(),
            "--mesh-dir".into(),
            mesh.path.display().to_string(),
            // Last, so it wins over the user's --bind / --set listener.tcp.
            "--bind".into(),
            addr.to_string(),
        ]
        .map(OsString::from),
    );
    // The concrete ports of the other listeners, for workers that bind their own.
    for (framing, addr) in &announced {
        args.push("--set".into());
        args.push(format!("{}.bind=\"{addr}\"", framing.name()).into());
    }
    let launch = Launch {
        exe: std::env::current_exe().context("locating the mqttd binary")?,
        args,
    };
    let drain = Duration::from_secs(config.cluster.drain_timeout_secs);
    let metrics = match config.metrics.enabled {
        true => Some(
            std::net::TcpListener::bind(config.metrics.bind)
                .with_context(|| format!("binding metrics {}", config.metrics.bind))?,
        ),
        false => None,
    };
    let metrics_addr = metrics.as_ref().map(|l| l.local_addr()).transpose()?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let result = runtime.block_on(async move {
        let signals = Signals::new().context("installing signal handlers")?;
        tracing::info!(
            workers = count,
            version = env!("CARGO_PKG_VERSION"),
            "supervisor starting"
        );
        let ready = Duration::from_secs(config.cluster.ready_timeout_secs);
        let workers = WorkerSet::new(launch, listeners, drain, ready);
        if let Some(listener) = metrics {
            crate::metrics_http::spawn(listener, workers.view())
                .context("serving the metrics endpoint")?;
        }
        workers
            .run(signals, || {
                announce(addr, quic_addr, &announced, metrics_addr)
            })
            .await
    });
    drop(reservation);
    drop(mesh);
    result
}

/// Tests and scripts read these lines to learn the ports when binding port 0. The TCP
/// line comes first (scripts that want only it read one line), then QUIC, then TLS and
/// WebSocket, then metrics.
fn announce(
    addr: SocketAddr,
    quic: Option<SocketAddr>,
    layered: &[(Framing, SocketAddr)],
    metrics: Option<SocketAddr>,
) {
    tracing::info!("listening on tcp {addr}");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "mqttd listening tcp {addr}");
    if let Some(quic) = quic {
        tracing::info!("listening on quic {quic}");
        let _ = writeln!(out, "mqttd listening quic {quic}");
    }
    for (framing, addr) in layered {
        let name = framing.name();
        tracing::info!("listening on {name} {addr}");
        let _ = writeln!(out, "mqttd listening {name} {addr}");
    }
    if let Some(metrics) = metrics {
        tracing::info!("metrics on http://{metrics}/metrics");
        let _ = writeln!(out, "mqttd listening metrics {metrics}");
    }
    let _ = out.flush();
}

/// `cluster.workers`, with 0 meaning one per available core.
fn worker_count(config: &Config) -> u16 {
    match config.cluster.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get().min(usize::from(u16::MAX)) as u16)
            .unwrap_or(1),
        n => n,
    }
}

/// A bound, non-listening socket on the listener address with SO_REUSEADDR and
/// SO_REUSEPORT: it turns port 0 into a concrete port that every worker then binds (with
/// SO_REUSEPORT too), and keeps that port from being taken by anyone else while workers
/// come and go. Not listening, it never receives a connection.
fn reserve(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// The directory of the workers' Unix sockets: `cluster.mesh_dir`, or a private fresh
/// one under the temp dir that is removed when this guard drops.
struct MeshDir {
    path: PathBuf,
    remove: bool,
}

impl MeshDir {
    fn create(configured: &str) -> anyhow::Result<MeshDir> {
        let (path, remove) = if configured.is_empty() {
            let path = std::env::temp_dir().join(format!("mqttd-{}", std::process::id()));
            // Left over by a killed supervisor that had our pid: nobody else uses it.
            let _ = std::fs::remove_dir_all(&path);
            (path, true)
        } else {
            (PathBuf::from(configured), false)
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating mesh dir {}", path.display()))?;
        Ok(MeshDir { path, remove })
    }
}

impl Drop for MeshDir {
    fn drop(&mut self) {
        if self.remove {
            remove_quietly(&self.path);
        }
    }
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing mesh dir {}: {e}", path.display());
        }
    }
}
