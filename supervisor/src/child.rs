//! One worker process as the supervisor sees it: how it is started (re-exec of this very
//! binary in worker mode) and a task that watches its stdout for the ready line and
//! reports its exit.
//!
//! Re-exec rather than fork: the supervisor runs a tokio runtime, and forking a process
//! with a runtime (threads, epoll, signal pipes) is unsound; a fresh exec also lets a
//! rolling restart (SIGHUP) pick up a new binary installed at the same path.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd as _, RawFd};
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use mqttd_broker::transport::layer::Framing;

use crate::metrics_link::{self, MetricsLink, WORKER_METRICS_FD};
use crate::worker_main::READY_LINE;

/// Environment variable telling a worker how many times its slot was restarted.
pub const RESTARTS_ENV: &str = "MQTTD_WORKER_RESTARTS";

/// The descriptor number a worker finds its slot's listening socket at.
const INHERITED_LISTENER_FD: RawFd = 3;
/// The descriptor number of the slot's QUIC UDP socket (4 belongs to the metrics helper).
const INHERITED_QUIC_FD: RawFd = 5;
/// The descriptor numbers of the slot's TLS and WebSocket listeners, in their order.
const INHERITED_LAYERED_FDS: [RawFd; 3] = [6, 7, 8];

/// The sockets of one worker slot. The supervisor owns them, so they outlive every worker
/// that serves them: connections (and datagrams) queued during a restart wait for the
/// next process instead of being reset.
#[derive(Debug)]
pub struct SlotSockets {
    pub tcp: std::net::TcpListener,
    pub quic: Option<std::net::UdpSocket>,
    /// The enabled TLS and WebSocket listeners.
    pub layered: Vec<(Framing, std::net::TcpListener)>,
}

/// How to start a worker: the program and the arguments every worker gets; the slot's
/// `--worker-index` is added per launch.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Resolved once at startup, so a binary replaced on disk is what restarts run.
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

/// What a worker's watcher task reports, tagged with the launch id.
#[derive(Debug)]
pub enum Event {
    Ready,
    Exited(io::Result<ExitStatus>),
}

/// A running worker process (until its `Event::Exited` arrives).
#[derive(Debug)]
pub struct Child {
    pub index: u16,
    pub pid: u32,
    pub started: Instant,
    /// The worker's metrics channel (its end is the worker's fd 4).
    pub metrics: MetricsLink,
    signals: mpsc::UnboundedSender<libc::c_int>,
}

impl Child {
    /// Starts worker `index` and a task that sends `(id, Event)` to `events`: `Ready` when
    /// the worker prints [`READY_LINE`], then exactly one `Exited`.
    pub fn spawn(
        launch: &Launch,
        index: u16,
        sockets: &SlotSockets,
        restarts: u64,
        id: u64,
        events: mpsc::UnboundedSender<(u64, Event)>,
    ) -> io::Result<Child> {
        let listener = sockets.tcp.as_raw_fd();
        let quic = sockets.quic.as_ref().map(|s| s.as_raw_fd());
        let layered: Vec<(Framing, RawFd)> = sockets
            .layered
            .iter()
            .map(|(framing, l)| (*framing, l.as_raw_fd()))
            .collect();
        let layered_args: Vec<String> = layered
            .iter()
            .zip(INHERITED_LAYERED_FDS)
            .map(|((framing, _), fd)| format!("--layered-fd={}={fd}", framing.name()))
            .collect();
        let (metrics_fd, metrics_end) = metrics_link::socketpair()?;
        let metrics_raw = metrics_fd.as_raw_fd();
        // Before the spawn: nothing can fail between it and the watcher task below.
        let metrics = MetricsLink::start(metrics_end)?;
        let mut cmd = Command::new(&launch.exe);
        // How often this slot was restarted, for the worker's `$SYS` restart counter.
        cmd.env(RESTARTS_ENV, restarts.to_string());
        cmd.args(&launch.args)
            .arg("--listen-fd")
            .arg(INHERITED_LISTENER_FD.to_string())
            .arg("--metrics-fd")
            .arg(WORKER_METRICS_FD.to_string())
            .args(quic.map(|_| format!("--quic-fd={INHERITED_QUIC_FD}")))
            .args(&layered_args)
            .arg("--worker-index")
            .arg(index.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let supervisor = std::process::id();
        // SAFETY: runs in the forked child before exec; prctl and getppid are
        // async-signal-safe and nothing here allocates.
        unsafe {
            cmd.pre_exec(move || {
                // The kernel sends the worker SIGTERM (a graceful drain) when the supervisor
                // dies, even by SIGKILL, so no worker outlives it holding the port. The
                // signal fires when the *thread* that forked exits: workers are only ever
                // spawned from the supervisor's main thread, which lives as long as it does.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The supervisor may have died between fork and prctl.
                if libc::getppid() as u32 != supervisor {
                    return Err(io::Error::other("supervisor exited during spawn"));
                }
                // The slot's sockets and the metrics channel, at fixed numbers and
                // inheritable. Copied out of the way first, so placing one cannot overwrite
                // another (dup2 also clears close-on-exec on the placed copy).
                let listener = out_of_the_way(listener)?;
                let quic = quic.map(out_of_the_way).transpose()?;
                let mut moved = [-1; 3];
                for (slot, (_, fd)) in moved.iter_mut().zip(&layered) {
                    *slot = out_of_the_way(*fd)?;
                }
                let metrics = out_of_the_way(metrics_raw)?;
                place(listener, INHERITED_LISTENER_FD)?;
                if let Some(quic) = quic {
                    place(quic, INHERITED_QUIC_FD)?;
                }
                for (fd, at) in moved.iter().zip(INHERITED_LAYERED_FDS) {
                    if *fd >= 0 {
                        place(*fd, at)?;
                    }
                }
                place(metrics, WORKER_METRICS_FD)?;
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        // The worker has its copy now; ours must go, or its exit would never close the channel.
        drop(metrics_fd);
        let pid = child.id().expect("a just-spawned child has a pid");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (signals, mut signal_rx) = mpsc::unbounded_channel::<libc::c_int>();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut stdout_open = true;
            let status = loop {
                tokio::select! {
                    biased;
                    line = lines.next_line(), if stdout_open => match line {
                        Ok(Some(line)) if line.trim_end() == READY_LINE => {
                            let _ = events.send((id, Event::Ready));
                        }
                        Ok(Some(line)) => tracing::info!(index, pid, "worker stdout: {line}"),
                        Ok(None) | Err(_) => stdout_open = false,
                    },
                    Some(sig) = signal_rx.recv() => {
                        // The pid cannot have been reused: only this task reaps the child,
                        // and it has not (the wait branch below has not completed).
                        // SAFETY: kill(2) with a pid we own and a valid signal number.
                        unsafe { libc::kill(pid as libc::pid_t, sig) };
                    }
                    status = child.wait() => break status,
                }
            };
            let _ = events.send((id, Event::Exited(status)));
        });
        Ok(Child {
            index,
            pid,
            started: Instant::now(),
            metrics,
            signals,
        })
    }

    /// Sends `sig` to the process unless it has already exited.
    pub fn signal(&self, sig: libc::c_int) {
        let _ = self.signals.send(sig);
    }
}

/// A close-on-exec copy of `fd` numbered above every fixed worker descriptor, so the
/// `dup2`s that place the inherited sockets never overwrite one another (and `dup2` never
/// meets equal numbers, where it would leave close-on-exec set). Runs between fork and
/// exec: fcntl is async-signal-safe.
fn out_of_the_way(fd: RawFd) -> io::Result<RawFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor this process owns.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(copy)
}

/// Puts `fd` at number `at`, inheritable. Runs between fork and exec: dup2 is
/// async-signal-safe.
fn place(fd: RawFd, at: RawFd) -> io::Result<()> {
    // SAFETY: dup2 onto a fixed number; `fd` (>= 64, see `out_of_the_way`) is never `at`.
    if unsafe { libc::dup2(fd, at) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// "exit status 3" / "killed by signal 9", for log lines.
pub fn describe(status: &io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        Err(e) => format!("wait failed: {e}"),
    }
}
