//! The worker set: starts one process per slot, restarts slots whose process dies (with
//! backoff), drains everything on SIGTERM/SIGINT and replaces workers one by one on SIGHUP.
//!
//! One event loop owns all state (slots, processes, timers); the per-process watcher
//! tasks (see `child.rs`) only report `Ready` / `Exited`. Keeping every decision in one
//! place is what makes the overlaps safe: a worker dying during a rolling restart, a
//! SIGTERM arriving mid-restart, a replacement that never gets ready.
//!
//! A slot holds up to three processes: `active` (serving), `incoming` (a rolling-restart
//! replacement not yet ready) and `outgoing` (the replaced one, draining). Only the exit
//! of an `active` or `incoming` process counts as a death to restart.
//!
//! A worker that exits before every worker was ready once aborts the start (exit 1): a
//! bad config or an unusable port would otherwise be retried forever behind a supervisor
//! that looks alive.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};

use crate::child::{describe, Child, Event, Launch, SlotSockets};
use crate::signals::{Signal, Signals};

mod view;

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A worker that stayed up this long is healthy again: its next restart is immediate-ish.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Slot {
    sockets: SlotSockets,
    active: Option<u64>,
    incoming: Option<u64>,
    outgoing: Option<u64>,
    /// Deaths restarted so far (the per-worker restart metric).
    restarts: u64,
    /// Rolling-restart replacements killed for not getting ready in time (a metric).
    ready_timeouts: u64,
    backoff: Duration,
    restart_at: Option<Instant>,
}

#[derive(Debug)]
struct Proc {
    child: Child,
    ready: bool,
    /// SIGKILL deadline of a draining process.
    kill_at: Option<Instant>,
    /// A rolling-restart replacement must be ready by then, or it is killed.
    ready_by: Option<Instant>,
    /// Killed for not getting ready: no longer the slot's, its exit is no death to restart.
    abandoned: bool,
}

pub struct WorkerSet {
    launch: Launch,
    drain_timeout: Duration,
    /// How long a rolling restart waits for a replacement to get ready
    /// (`cluster.ready_timeout_secs`): one that hangs must not stall the roll forever.
    ready_timeout: Duration,
    slots: Vec<Slot>,
    procs: HashMap<u64, Proc>,
    next_id: u64,
    events_tx: mpsc::UnboundedSender<(u64, Event)>,
    events_rx: mpsc::UnboundedReceiver<(u64, Event)>,
    /// Slot being replaced by a rolling restart.
    rolling: Option<u16>,
    /// A SIGHUP that arrived during a rolling restart: run another one after it.
    hup_queued: bool,
    shutting_down: bool,
    /// Every slot has been ready once and the broker was announced.
    announced: bool,
    /// Why startup was abandoned (a worker died before the first announcement).
    startup_error: Option<String>,
    /// The slots as the HTTP endpoint sees them (`spawn/view.rs`).
    view: watch::Sender<crate::metrics_http::View>,
}

impl WorkerSet {
    /// `listeners`: the sockets of each worker slot.
    pub fn new(
        launch: Launch,
        listeners: Vec<SlotSockets>,
        drain_timeout: Duration,
        ready_timeout: Duration,
    ) -> WorkerSet {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let slots = listeners
            .into_iter()
            .map(|sockets| Slot {
                sockets,
                active: None,
                incoming: None,
                outgoing: None,
                restarts: 0,
                ready_timeouts: 0,
                backoff: BACKOFF_FIRST,
                restart_at: None,
            })
            .collect();
        WorkerSet {
            launch,
            drain_timeout,
            ready_timeout,
            slots,
            procs: HashMap::new(),
            next_id: 0,
            events_tx,
            events_rx,
            rolling: None,
            hup_queued: false,
            shutting_down: false,
            announced: false,
            startup_error: None,
            view: watch::Sender::new(Default::default()),
        }
    }

    /// Runs the workers until a shutdown signal has drained them all. `announce` is called
    /// once, when every worker has reported ready for the first time.
    pub async fn run(
        mut self,
        mut signals: Signals,
        announce: impl FnOnce(),
    ) -> anyhow::Result<()> {
        for index in 0..self.slots.len() as u16 {
            if let Err(e) = self.start(index) {
                self.startup_error = Some(format!("starting worker {index}: {e}"));
                self.shutdown("startup failure");
                break;
            }
        }
        let mut announce = Some(announce);
        loop {
            self.publish_view();
            if self.shutting_down && self.procs.is_empty() {
                return match self.startup_error.take() {
                    Some(e) => Err(anyhow::anyhow!(e)),
                    None => Ok(()),
                };
            }
            let deadline = self.next_deadline();
            tokio::select! {
                Some((id, event)) = self.events_rx.recv() => self.on_event(id, event),
                signal = signals.recv() => match signal {
                    Signal::Shutdown(name) => self.shutdown(name),
                    Signal::Hangup => self.rolling_restart(),
                    Signal::ReloadCertificates => self.reload_certificates(),
                },
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.on_timer();
                }
            }
            if !self.announced && !self.shutting_down && self.all_ready() {
                self.announced = true;
                tracing::info!(workers = self.slots.len(), "all workers ready");
                if let Some(announce) = announce.take() {
                    announce();
                }
            }
        }
    }

    fn all_ready(&self) -> bool {
        self.slots.iter().all(|s| {
            s.active
                .and_then(|id| self.procs.get(&id))
                .is_some_and(|p| p.ready)
        })
    }

    /// Starts a process for `index`: as its `active` one if it has none, else (rolling
    /// restart) as its `incoming` one.
    fn start(&mut self, index: u16) -> std::io::Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        let restarts = self.slots[index as usize].restarts;
        let child = Child::spawn(
            &self.launch,
            index,
            &self.slots[index as usize].sockets,
            restarts,
            id,
            self.events_tx.clone(),
        )?;
        tracing::info!(index, pid = child.pid, "worker started");
        let slot = &mut self.slots[usize::from(index)];
        let ready_by = if slot.active.is_none() {
            slot.active = Some(id);
            None
        } else {
            slot.incoming = Some(id);
            Some(Instant::now() + self.ready_timeout)
        };
        self.procs.insert(
            id,
            Proc {
                child,
                ready: false,
                kill_at: None,
                ready_by,
                abandoned: false,
            },
        );
        Ok(())
    }

    fn on_event(&mut self, id: u64, event: Event) {
        match event {
            Event::Ready => self.on_ready(id),
            Event::Exited(status) => {
                let Some(proc) = self.procs.remove(&id) else {
                    return;
                };
                self.on_exit(id, proc, describe(&status));
            }
        }
    }

    fn on_ready(&mut self, id: u64) {
        let Some(proc) = self.procs.get_mut(&id) else {
            return;
        };
        proc.ready = true;
        proc.ready_by = None;
        let (index, pid) = (proc.child.index, proc.child.pid);
        if self.shutting_down || proc.abandoned {
            return;
        }
        let slot = &mut self.slots[usize::from(index)];
        if slot.incoming == Some(id) {
            // Rolling restart: the new process is bound, so the old one can go.
            slot.incoming = None;
            slot.outgoing = slot.active.replace(id);
            slot.restart_at = None;
            match slot.outgoing {
                Some(old) => {
                    let old_pid = self.procs.get(&old).map(|p| p.child.pid);
                    tracing::info!(
                        index,
                        pid,
                        old_pid,
                        "rolling restart: replacement ready, draining the old worker"
                    );
                    self.terminate(old);
                }
                None => self.next_rolling(index),
            }
        } else if self.announced {
            tracing::info!(
                index,
                pid,
                restarts = slot.restarts,
                "replacement worker ready"
            );
        } else {
            tracing::info!(index, pid, "worker ready");
        }
    }

    fn on_exit(&mut self, id: u64, proc: Proc, status: String) {
        let (index, pid) = (proc.child.index, proc.child.pid);
        if proc.abandoned {
            tracing::info!(index, pid, %status, "abandoned replacement worker exited");
            return;
        }
        let slot = &mut self.slots[usize::from(index)];
        let role = if slot.outgoing == Some(id) {
            slot.outgoing = None;
            "outgoing"
        } else if slot.incoming == Some(id) {
            slot.incoming = None;
            "incoming"
        } else if slot.active == Some(id) {
            slot.active = None;
            "active"
        } else {
            "unknown"
        };
        if self.shutting_down {
            tracing::info!(index, pid, %status, "worker exited");
            return;
        }
        if role == "outgoing" {
            tracing::info!(index, pid, %status, "rolling restart: old worker exited");
            if self.rolling == Some(index) {
                self.next_rolling(index);
            }
            return;
        }
        if !self.announced {
            tracing::error!(index, pid, %status, "worker exited during startup; giving up");
            self.startup_error = Some(format!("worker {index} exited during startup: {status}"));
            self.shutdown("startup failure");
            return;
        }
        let now = Instant::now();
        if proc.child.started.elapsed() >= BACKOFF_RESET_AFTER {
            slot.backoff = BACKOFF_FIRST;
        }
        slot.restarts += 1;
        let delay = slot.backoff;
        slot.backoff = (slot.backoff * 2).min(BACKOFF_MAX);
        slot.restart_at = Some(now + delay);
        tracing::warn!(
            index,
            pid,
            %status,
            restarts = slot.restarts,
            delay_ms = delay.as_millis() as u64,
            "worker died; restarting"
        );
    }

    fn next_deadline(&self) -> Option<Instant> {
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        let kills = self.procs.values().filter_map(|p| p.kill_at);
        let ready_bys = self.procs.values().filter_map(|p| p.ready_by);
        restarts.chain(kills).chain(ready_bys).min()
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        for index in 0..self.slots.len() as u16 {
            let slot = &mut self.slots[usize::from(index)];
            if slot.restart_at.is_some_and(|t| t <= now) {
                slot.restart_at = None;
                let wanted = slot.active.is_none()
                    || (self.rolling == Some(index)
                        && slot.incoming.is_none()
                        && slot.outgoing.is_none());
                if wanted {
                    self.start_or_retry(index);
                }
            }
        }
        let late: Vec<u64> = self
            .procs
            .iter()
            .filter(|(_, p)| p.ready_by.is_some_and(|t| t <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            self.abandon_replacement(id);
        }
        for proc in self.procs.values_mut() {
            if proc.kill_at.is_some_and(|t| t <= now) {
                proc.kill_at = None;
                tracing::warn!(
                    index = proc.child.index,
                    pid = proc.child.pid,
                    "worker did not drain in time: SIGKILL"
                );
                proc.child.signal(libc::SIGKILL);
            }
        }
    }

    /// A rolling-restart replacement did not get ready within `cluster.ready_timeout_secs`:
    /// SIGKILL (it is not serving, so there is nothing to drain), the old worker keeps the
    /// slot, and the roll goes on with the next slot rather than stall behind this one.
    fn abandon_replacement(&mut self, id: u64) {
        let Some(proc) = self.procs.get_mut(&id) else {
            return;
        };
        proc.ready_by = None;
        proc.abandoned = true;
        proc.child.signal(libc::SIGKILL);
        let (index, pid) = (proc.child.index, proc.child.pid);
        let slot = &mut self.slots[usize::from(index)];
        if slot.incoming == Some(id) {
            slot.incoming = None;
        }
        slot.ready_timeouts += 1;
        tracing::error!(
            index,
            pid,
            timeout_secs = self.ready_timeout.as_secs(),
            "rolling restart: replacement worker not ready in time; killed it, the old worker \
             keeps serving this slot"
        );
        if self.rolling == Some(index) {
            self.next_rolling(index);
        }
    }

    /// Starts a process for `index`; if that fails, tries again after the slot's backoff.
    fn start_or_retry(&mut self, index: u16) {
        if let Err(e) = self.start(index) {
            let slot = &mut self.slots[usize::from(index)];
            let delay = slot.backoff;
            slot.backoff = (slot.backoff * 2).min(BACKOFF_MAX);
            slot.restart_at = Some(Instant::now() + delay);
            tracing::warn!(index, "cannot start worker: {e}; retrying in {delay:?}");
        }
    }

    /// SIGTERM, then SIGKILL once the drain timeout has passed.
    fn terminate(&mut self, id: u64) {
        if let Some(proc) = self.procs.get_mut(&id) {
            proc.child.signal(libc::SIGTERM);
            proc.kill_at = Some(Instant::now() + self.drain_timeout);
        }
    }

    fn shutdown(&mut self, why: &str) {
        if self.shutting_down {
            // A second SIGTERM/SIGINT: do not wait for the drain.
            tracing::warn!("{why} during shutdown: killing the workers now");
            for proc in self.procs.values() {
                proc.child.signal(libc::SIGKILL);
            }
            return;
        }
        tracing::info!(workers = self.procs.len(), "{why}: draining the workers");
        self.shutting_down = true;
        self.rolling = None;
        for slot in &mut self.slots {
            slot.restart_at = None;
        }
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        for id in ids {
            self.terminate(id);
        }
    }

    /// Passes SIGUSR1 on to every ready worker: each reloads its TLS certificates.
    fn reload_certificates(&mut self) {
        tracing::info!("SIGUSR1: workers reload their TLS certificates");
        for proc in self.procs.values().filter(|p| p.ready) {
            proc.child.signal(libc::SIGUSR1);
        }
    }

    fn rolling_restart(&mut self) {
        if self.shutting_down {
            return;
        }
        if self.rolling.is_some() {
            tracing::info!("SIGHUP during a rolling restart: another one will follow");
            self.hup_queued = true;
            return;
        }
        tracing::info!(workers = self.slots.len(), "SIGHUP: rolling restart");
        self.step_rolling(0);
    }

    fn next_rolling(&mut self, done: u16) {
        self.step_rolling(done + 1);
    }

    /// Replaces the first slot from `from` on that has a ready worker; slots that are
    /// restarting anyway already run a fresh process and are skipped.
    fn step_rolling(&mut self, from: u16) {
        for index in from..self.slots.len() as u16 {
            let slot = &self.slots[usize::from(index)];
            let ready = slot
                .active
                .and_then(|id| self.procs.get(&id))
                .is_some_and(|p| p.ready);
            if ready && slot.incoming.is_none() && slot.outgoing.is_none() {
                self.rolling = Some(index);
                self.start_or_retry(index);
                return;
            }
        }
        self.rolling = None;
        tracing::info!("rolling restart complete");
        if std::mem::take(&mut self.hup_queued) {
            self.rolling_restart();
        }
    }
}
