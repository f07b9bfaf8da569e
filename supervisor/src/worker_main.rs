//! Worker mode: `mqttd --worker-index I --worker-count N --mesh-dir DIR ...`, started by the
//! supervisor (never by hand). Runs one `mqttd_broker::Worker` and tells the supervisor,
//! through stdout, when it is bound and joined to its peers.

use std::io::Write;

use std::os::fd::FromRawFd;

use anyhow::Context;
use mqttd_broker::cluster::WorkerIdentity;
use mqttd_broker::config::Config;
use mqttd_broker::transport::layer::Framing;
use mqttd_broker::worker::Inherited;
use mqttd_broker::Worker;

/// The line a worker prints on stdout once `Worker::bind` has returned. The supervisor
/// counts these to know when the broker as a whole is ready.
pub const READY_LINE: &str = "mqttd worker ready";

/// The descriptors the supervisor passed down, by number.
pub struct Fds {
    pub listener: Option<i32>,
    pub quic: Option<i32>,
    pub metrics: Option<i32>,
    pub layered: Vec<(Framing, i32)>,
}

/// `--layered-fd tls=6 ...` as (framing, fd).
pub fn parse_layered_fds(args: &[String]) -> anyhow::Result<Vec<(Framing, i32)>> {
    args.iter()
        .map(|arg| {
            let (name, fd) = arg
                .split_once('=')
                .context("--layered-fd expects name=fd")?;
            let framing = Framing::from_name(name).context("--layered-fd: unknown transport")?;
            Ok((framing, fd.parse().context("--layered-fd: fd number")?))
        })
        .collect()
}

pub fn run(config: Config, identity: WorkerIdentity, fds: Fds) -> anyhow::Result<()> {
    // Every log line of this process says which worker wrote it (stderr is shared).
    let span = tracing::info_span!("worker", index = identity.index);
    let _entered = span.enter();
    pin_core(&config, &identity);

    // One worker owns one core: a current-thread runtime, so the worker's state needs no locks.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        // SAFETY: the supervisor passed these descriptors (a listening TCP socket, a bound
        // UDP socket) to this process alone, at exec; nothing else here owns or closes them.
        let inherited = Inherited {
            tcp: fds
                .listener
                .map(|fd| unsafe { std::net::TcpListener::from_raw_fd(fd) }),
            udp: fds
                .quic
                .map(|fd| unsafe { std::net::UdpSocket::from_raw_fd(fd) }),
            layered: fds
                .layered
                .iter()
                .map(|&(framing, fd)| (framing, unsafe { std::net::TcpListener::from_raw_fd(fd) }))
                .collect(),
        };
        let worker = Worker::bind(config, Some(identity), inherited).await?;
        let restarts = std::env::var(crate::child::RESTARTS_ENV)
            .ok()
            .and_then(|v| v.parse().ok());
        worker.set_restarts(restarts.unwrap_or(0));
        if let Some(fd) = fds.metrics {
            // SAFETY: as for the listener: the supervisor's socketpair end, ours alone.
            worker.serve_metrics(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        }
        for (kind, addr) in worker.listen_addrs() {
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                "listening on {kind} {addr}"
            );
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "{READY_LINE}").context("telling the supervisor we are ready")?;
        out.flush().context("telling the supervisor we are ready")?;
        drop(out);
        worker.run(crate::signals::worker_shutdown()).await
    })
}

/// Pins this process (its main thread, and so every thread it starts later) to core
/// `index % cores` when `cluster.pin_cores` is on and every worker can have a core of its
/// own. A lone worker is not pinned: it gains nothing, and several one-worker brokers on a
/// machine (tests, small deployments) would all be stacked on the first core.
fn pin_core(config: &Config, identity: &WorkerIdentity) {
    if !config.cluster.pin_cores || identity.count < 2 {
        return;
    }
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if cores.is_empty() || usize::from(identity.count) > cores.len() {
        tracing::info!(
            cores = cores.len(),
            workers = identity.count,
            "not pinning: fewer cores than workers"
        );
        return;
    }
    let core = cores[usize::from(identity.index) % cores.len()];
    if core_affinity::set_for_current(core) {
        tracing::info!(core = core.id, "pinned to core");
    } else {
        tracing::warn!(core = core.id, "could not pin to core");
    }
}
