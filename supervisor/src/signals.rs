//! Unix signals for both modes, as async streams (tokio's handlers, so no work happens in
//! a signal handler and nothing is lost between two `recv` calls).

use std::io;

use tokio::signal::unix::{signal, Signal as Stream, SignalKind};

/// What the supervisor was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: drain every worker and exit.
    Shutdown(&'static str),
    /// SIGHUP: replace the workers one at a time.
    Hangup,
    /// SIGUSR1: every worker reloads its TLS certificates in place (no connection drops).
    ReloadCertificates,
}

pub struct Signals {
    term: Stream,
    int: Stream,
    hup: Stream,
    usr1: Stream,
}

impl Signals {
    /// Installs the handlers. Call before starting workers so no signal is missed.
    pub fn new() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }

    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Shutdown("SIGTERM"),
            _ = self.int.recv() => Signal::Shutdown("SIGINT"),
            _ = self.hup.recv() => Signal::Hangup,
            _ = self.usr1.recv() => Signal::ReloadCertificates,
        }
    }
}

/// A worker's shutdown trigger: resolves on SIGTERM (sent by the supervisor, or by the
/// kernel through `PR_SET_PDEATHSIG` when the supervisor dies) or SIGINT (Ctrl-C reaches
/// the whole process group). SIGHUP is ignored: it is the supervisor's rolling-restart
/// signal, and a terminal hang-up must not kill workers behind the supervisor's back.
pub async fn worker_shutdown() {
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot listen for signals: {e}");
            return std::future::pending().await;
        }
    };
    loop {
        match signals.recv().await {
            Signal::Shutdown(name) => {
                tracing::info!("{name}: shutting down");
                return;
            }
            Signal::Hangup => {
                tracing::info!("SIGHUP ignored by a worker (send it to the supervisor)")
            }
            // Handled by the worker's TLS listeners (`worker.rs`).
            Signal::ReloadCertificates => {}
        }
    }
}
