//! One worker: builds its cluster backend and engine, binds its listeners (SO_REUSEPORT,
//! so several workers can share the port), runs the transport drivers, the engine's timer
//! and the cluster's event feed, and drains on shutdown.
//!
//! Everything runs on one current-thread runtime inside a `LocalSet`: the engine is
//! shared by its connection tasks as `Rc<RefCell<_>>`, with no locks, because a worker is
//! one core by design (parallelism comes from running one worker process per core).

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};

use crate::cluster::{self, ClusterEvent, ClusterInbox, Lifecycle, WorkerIdentity};
use crate::config::Config;
use crate::engine::Engine;
use crate::transport::layer::{Framing, LayerFactory};
use crate::transport::quic;
use crate::transport::tcp::TcpReactor;
use crate::transport::tls::TlsAcceptor;
use crate::transport::ws::WsConfig as WsSettings;

/// How long a draining worker may spend handing its sessions to its successor (and
/// flushing what it queued for its peers). Within `cluster.drain_timeout_secs`, after
/// which the supervisor kills it.
const HANDOVER_DEADLINE: Duration = Duration::from_secs(20);

/// Sockets the supervisor owns for this worker's slot: they outlive this process, so
/// connections queued on them during a restart wait for the successor instead of being
/// reset. A socket not given is bound by the worker itself.
#[derive(Debug, Default)]
pub struct Inherited {
    pub tcp: Option<std::net::TcpListener>,
    /// The slot's UDP socket for QUIC.
    pub udp: Option<std::net::UdpSocket>,
    /// The slot's listening sockets for TLS, WebSocket and WebSocket over TLS.
    pub layered: Vec<(Framing, std::net::TcpListener)>,
}

pub struct Worker {
    tcp: std::net::TcpListener,
    /// The TLS and WebSocket listeners that are enabled, each with what its connections
    /// need.
    layered: Vec<(LayerFactory, std::net::TcpListener)>,
    /// SIGUSR1 (certificate reload), installed before the worker says it is ready: the
    /// signal's default action would kill the process.
    reload_signal: tokio::signal::unix::Signal,
    inbox: Rc<ClusterInbox>,
    /// MQTT over QUIC, when `quic.enabled`.
    quic: Option<quic::Driver>,
    engine: Rc<RefCell<Engine>>,
    /// The cluster backend's hooks around the engine's life.
    lifecycle: Box<dyn Lifecycle>,
}

impl Worker {
    /// Binds the listeners. Must be called inside the worker's `LocalSet`. `identity` is
    /// `None` for a broker of one worker, or this worker's place among its peers.
    ///
    /// `inherited`: the sockets the supervisor passed down (see [`Inherited`]).
    pub async fn bind(
        config: Config,
        identity: Option<WorkerIdentity>,
        inherited: Inherited,
    ) -> anyhow::Result<Worker> {
        let backend = cluster::build(&config, identity).context("starting the cluster backend")?;
        let config = Rc::new(config);
        let engine = Rc::new(RefCell::new(Engine::new(config.clone(), backend.cluster)));
        if backend.lifecycle.has_predecessor() {
            // Forwards for sessions still in the old process wait until they are in.
            engine.borrow_mut().begin_takeover();
        }
        tokio::task::spawn_local(feed_cluster_events(backend.inbox.clone(), engine.clone()));
        let tcp = match inherited.tcp {
            Some(listener) => listener,
            None => bind_tcp(config.listener.tcp, config.listener.backlog)
                .with_context(|| format!("binding {}", config.listener.tcp))?,
        };
        let quic = match (config.quic.enabled, inherited.udp) {
            (false, _) => None,
            (true, Some(udp)) => Some(quic::driver(&config, udp, &mut engine.borrow_mut())?),
            (true, None) => {
                let udp = bind_udp(config.quic.bind)
                    .with_context(|| format!("binding udp {}", config.quic.bind))?;
                Some(quic::driver(&config, udp, &mut engine.borrow_mut())?)
            }
        };
        let layered = bind_layered(&config, inherited.layered)?;
        let reload_signal =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                .context("listening for SIGUSR1")?;
        backend.lifecycle.ready().await;
        // Whatever the peers sent before they counted as joined is applied before the first
        // client is served.
        apply_cluster_events(&backend.inbox, &engine, &mut Vec::new());
        Ok(Worker {
            tcp,
            layered,
            reload_signal,
            inbox: backend.inbox,
            quic,
            engine,
            lifecycle: backend.lifecycle,
        })
    }

    /// How many times the supervisor restarted this worker's slot (reported in `$SYS`).
    pub fn set_restarts(&self, restarts: u64) {
        self.engine.borrow_mut().stats.restarts = restarts;
    }

    /// Answers the supervisor's metric scrapes on `channel` (fd 4; see [`crate::metrics`]).
    /// Must be called inside the worker's `LocalSet`.
    pub fn serve_metrics(&self, channel: std::os::fd::OwnedFd) {
        tokio::task::spawn_local(crate::metrics::serve(channel, self.engine.clone()));
    }

    /// The bound listeners as (kind, address), with real ports when port 0 was asked for.
    pub fn listen_addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        let tcp = self.tcp.local_addr().map(|a| ("tcp", a));
        let quic = self
            .quic
            .iter()
            .map(|d| Ok::<_, std::io::Error>(("quic", d.local_addr())));
        let layered = self
            .layered
            .iter()
            .map(|(factory, l)| l.local_addr().map(|a| (factory.framing.name(), a)));
        std::iter::once(tcp)
            .chain(quic)
            .chain(layered)
            .filter_map(Result::ok)
            .collect()
    }

    /// Serves until `shutdown` resolves, then disconnects every client and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        // Ready means bound and joined, so the supervisor drains the process this one
        // replaces; its sessions come next, and no client is served before they are in
        // (connections wait in the listen queue, handed-over ones in the engine).
        self.lifecycle.take_over().await;
        apply_cluster_events(&self.inbox, &self.engine, &mut Vec::new());
        self.engine.borrow_mut().end_takeover(Instant::now());
        let ticker = tokio::task::spawn_local(run_timers(self.engine.clone()));
        let quic = self
            .quic
            .map(|driver| Rc::new(quic::spawn(driver, self.engine.clone())));
        let accepting = quic.clone();
        let shutdown = async move {
            shutdown.await;
            if let Some(quic) = &accepting {
                quic.stop_accepting();
            }
        };
        // Every listener's reactor stops accepting and drains on shutdown.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let shutdown = async move {
            shutdown.await;
            let _ = stop.send(true);
        };
        let acceptors: Vec<_> = self
            .layered
            .iter()
            .filter_map(|(f, _)| f.tls.clone())
            .collect();
        let reloader = tokio::task::spawn_local(reload_certificates_on_sigusr1(
            self.reload_signal,
            acceptors,
        ));
        let mut reactors = Vec::new();
        for (factory, listener) in self.layered {
            let reactor = TcpReactor::new(listener, self.engine.clone(), factory)?;
            let mut stopped = stopped.clone();
            reactors.push(tokio::task::spawn_local(async move {
                reactor
                    .run(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .await
            }));
        }
        let reactor = TcpReactor::new(self.tcp, self.engine.clone(), LayerFactory::plain())?;
        let result = reactor.run(shutdown).await;
        for reactor in reactors {
            match reactor.await {
                Ok(Err(e)) => tracing::warn!("listener: {e}"),
                Err(e) => tracing::warn!("listener task: {e}"),
                Ok(Ok(())) => {}
            }
        }
        reloader.abort();
        ticker.abort();
        if let Some(quic) = quic.and_then(|q| Rc::try_unwrap(q).ok()) {
            quic.drain().await;
        }
        let engine = self.engine.clone();
        let inbox = self.inbox.clone();
        let export = Box::new(move || {
            // What peers sent before switching to the successor goes with the sessions.
            apply_cluster_events(&inbox, &engine, &mut Vec::new());
            engine.borrow_mut().export_sessions(Instant::now())
        });
        let handover = self.lifecycle.hand_over_sessions(export);
        if tokio::time::timeout(HANDOVER_DEADLINE, handover)
            .await
            .is_err()
        {
            tracing::warn!("session handover to the successor timed out");
        }
        result.context("TCP listener")
    }
}

/// The enabled TLS and WebSocket listeners: the sockets the supervisor passed down, or
/// bound here; each with its layers' settings (certificates are loaded now, so a bad one
/// stops the worker at start with a message that names the file).
fn bind_layered(
    config: &Config,
    mut inherited: Vec<(Framing, std::net::TcpListener)>,
) -> anyhow::Result<Vec<(LayerFactory, std::net::TcpListener)>> {
    let mut layered = Vec::new();
    for (framing, enabled, addr) in layered_listeners(config) {
        if !enabled {
            continue;
        }
        let listener = match inherited.iter().position(|(f, _)| *f == framing) {
            Some(at) => inherited.swap_remove(at).1,
            None => bind_tcp(addr, config.listener.backlog)
                .with_context(|| format!("binding {} {addr}", framing.name()))?,
        };
        let tls = match framing {
            Framing::Tls | Framing::Wss => {
                let acceptor = TlsAcceptor::new(&config.tls, framing == Framing::Tls)
                    .with_context(|| format!("{} listener", framing.name()))?;
                Some(Rc::new(acceptor))
            }
            _ => None,
        };
        let ws = match framing {
            Framing::Ws => Some(&config.ws),
            Framing::Wss => Some(&config.wss.0),
            _ => None,
        };
        let ws = ws.map(|c| {
            Rc::new(WsSettings {
                path: c.path.clone(),
                max_request_bytes: c.max_request_bytes,
            })
        });
        layered.push((LayerFactory { framing, tls, ws }, listener));
    }
    Ok(layered)
}

/// The TLS and WebSocket listeners as (framing, enabled, address).
pub fn layered_listeners(config: &Config) -> [(Framing, bool, SocketAddr); 3] {
    [
        (Framing::Tls, config.tls.enabled, config.tls.bind),
        (Framing::Ws, config.ws.enabled, config.ws.bind),
        (Framing::Wss, config.wss.0.enabled, config.wss.0.bind),
    ]
}

/// SIGUSR1: every TLS listener reads its certificate, key and client CAs again. New
/// connections get the new ones; established connections are not touched.
async fn reload_certificates_on_sigusr1(
    mut usr1: tokio::signal::unix::Signal,
    acceptors: Vec<Rc<TlsAcceptor>>,
) {
    while usr1.recv().await.is_some() {
        for acceptor in &acceptors {
            match acceptor.reload() {
                Ok(()) => tracing::info!("TLS certificates reloaded"),
                Err(e) => {
                    tracing::error!("TLS certificates not reloaded (the old ones stay): {e:#}")
                }
            }
        }
    }
}

/// Feeds the cluster backend's events to the engine as they arrive, a batch per wake-up.
async fn feed_cluster_events(inbox: Rc<ClusterInbox>, engine: Rc<RefCell<Engine>>) {
    // Swapped with the inbox's queue on every batch, so neither allocates once warm.
    let mut events = Vec::new();
    loop {
        std::future::poll_fn(|cx| inbox.poll_ready(cx)).await;
        apply_cluster_events(&inbox, &engine, &mut events);
    }
}

fn apply_cluster_events(
    inbox: &ClusterInbox,
    engine: &RefCell<Engine>,
    events: &mut Vec<ClusterEvent>,
) {
    inbox.take(events);
    if events.is_empty() {
        return;
    }
    let now = Instant::now();
    let mut engine = engine.borrow_mut();
    for event in events.drain(..) {
        engine.handle_cluster(event, now);
    }
}

/// Runs the engine's timers once a second (keep-alive, will delay, session expiry) and
/// tells it the process's resident memory (for `limits.memory_high_watermark_bytes`).
async fn run_timers(engine: Rc<RefCell<Engine>>) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let mut engine = engine.borrow_mut();
        if let Some(rss) = resident_memory() {
            engine.set_resident_memory(rss);
        }
        engine.tick(Instant::now());
    }
}

/// This process's resident set size in bytes, from `/proc/self/statm` (Linux).
pub fn resident_memory() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// A listening TCP socket with SO_REUSEPORT, so every worker process binds the same port
/// and the kernel spreads incoming connections across them.
pub fn bind_tcp(addr: SocketAddr, backlog: u32) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Socket buffer sizes asked for the QUIC UDP socket.
const UDP_BUFFER_BYTES: usize = 8 << 20;

/// A UDP socket with SO_REUSEPORT for QUIC: every worker binds the same port and the
/// kernel spreads datagrams over them by a hash of the addresses (see docs/QUIC.md on
/// what that means when a client's address changes).
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // One socket carries every QUIC connection of the worker: the default ~200 KB queue
    // overflows under bursts (dropped datagrams become retransmissions and latency
    // spikes). The kernel caps this at net.core.rmem_max / wmem_max.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
