//! One worker: binds its listener (SO_REUSEPORT, so several workers can share the port),
//! runs the TCP readiness loop and the engine's timer, and drains on shutdown.
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

use crate::cluster::{mesh, Standalone, WorkerIdentity};
use crate::config::Config;
use crate::engine::Engine;
use crate::transport::tcp::TcpReactor;

/// How long a draining worker may spend handing its sessions to its successor.
const HANDOVER_DEADLINE: Duration = Duration::from_secs(5);

pub struct Worker {
    tcp: std::net::TcpListener,
    engine: Rc<RefCell<Engine>>,
    identity: Option<WorkerIdentity>,
}

impl Worker {
    /// Binds the listeners. Must be called inside the worker's `LocalSet`. `identity` is
    /// `None` for a broker of one worker, or this worker's place among its peers.
    ///
    /// `inherited` is a listening socket the supervisor owns for this worker's slot: it
    /// outlives this process, so connections queued on it during a restart wait for the
    /// successor instead of being reset. Without it, the worker binds its own.
    pub async fn bind(
        config: Config,
        identity: Option<WorkerIdentity>,
        inherited: Option<std::net::TcpListener>,
    ) -> anyhow::Result<Worker> {
        let tcp = match inherited {
            Some(listener) => listener,
            None => bind_tcp(config.listener.tcp, config.listener.backlog)
                .with_context(|| format!("binding {}", config.listener.tcp))?,
        };
        let config = Rc::new(config);
        let engine = match identity.clone() {
            None => Rc::new(RefCell::new(Engine::new(
                config,
                Box::new(Standalone),
                0,
                1,
            ))),
            Some(me) => {
                let (index, count) = (me.index, me.count);
                mesh::join(me, |cluster| Engine::new(config, cluster, index, count))
                    .await
                    .context("joining the worker mesh")?
            }
        };
        Ok(Worker {
            tcp,
            engine,
            identity,
        })
    }

    /// How many times the supervisor restarted this worker's slot (reported in `$SYS`).
    pub fn set_restarts(&self, restarts: u64) {
        self.engine.borrow_mut().stats.restarts = restarts;
    }

    /// The bound listeners as (kind, address), with real ports when port 0 was asked for.
    pub fn listen_addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        self.tcp
            .local_addr()
            .map(|a| vec![("tcp", a)])
            .unwrap_or_default()
    }

    /// Serves until `shutdown` resolves, then disconnects every client and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let ticker = tokio::task::spawn_local(run_timers(self.engine.clone()));
        let reactor = TcpReactor::new(self.tcp, self.engine.clone())?;
        let result = reactor.run(shutdown).await;
        ticker.abort();
        if let Some(me) = &self.identity {
            let handover = mesh::hand_over_sessions(me, &self.engine);
            if tokio::time::timeout(HANDOVER_DEADLINE, handover)
                .await
                .is_err()
            {
                tracing::warn!("session handover to the successor timed out");
            }
        }
        result.context("TCP listener")
    }
}

/// Runs the engine's timers once a second (keep-alive, will delay, session expiry).
async fn run_timers(engine: Rc<RefCell<Engine>>) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        engine.borrow_mut().tick(Instant::now());
    }
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
