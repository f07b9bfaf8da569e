//! One worker: binds its listener (SO_REUSEPORT, so several workers can share the port),
//! accepts connections, runs the engine's timer, and drains on shutdown.
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
use tokio::net::TcpListener;

use crate::cluster::Standalone;
use crate::config::Config;
use crate::engine::Engine;
use crate::transport;

/// How long a shutdown waits for connections to flush their DISCONNECT.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// Pause after an accept error such as EMFILE, so the loop never spins.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub struct Worker {
    listener: TcpListener,
    engine: Rc<RefCell<Engine>>,
}

impl Worker {
    /// Binds the listeners. Must be called inside the worker's `LocalSet`.
    pub async fn bind(config: Config) -> anyhow::Result<Worker> {
        let listener = bind_tcp(config.listener.tcp, config.listener.backlog)
            .with_context(|| format!("binding {}", config.listener.tcp))?;
        let engine = Engine::new(Rc::new(config), Box::new(Standalone));
        Ok(Worker {
            listener,
            engine: Rc::new(RefCell::new(engine)),
        })
    }

    /// The bound listeners as (kind, address), with real ports when port 0 was asked for.
    pub fn listen_addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        self.listener
            .local_addr()
            .map(|a| vec![("tcp", a)])
            .unwrap_or_default()
    }

    /// Serves until `shutdown` resolves, then disconnects every client and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let ticker = tokio::task::spawn_local(run_timers(self.engine.clone()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        tokio::task::spawn_local(transport::tcp::serve(self.engine.clone(), stream));
                    }
                    Err(e) => {
                        tracing::warn!("accept failed: {e}; backing off");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                _ = &mut shutdown => break,
            }
        }
        drop(self.listener);
        let open = self.engine.borrow().connection_count();
        tracing::info!(open, "shutting down: disconnecting clients");
        self.engine.borrow_mut().shutdown(Instant::now());
        let all_closed = async {
            while self.engine.borrow().connection_count() > 0 {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(DRAIN_DEADLINE, all_closed)
            .await
            .is_err()
        {
            tracing::warn!("drain deadline passed with connections still open");
        }
        ticker.abort();
        Ok(())
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
fn bind_tcp(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    TcpListener::from_std(socket.into())
}
