//! The embedded cluster backend: a full mesh of Unix stream sockets between the worker
//! processes of one host. No outside service.
//!
//! Worker `i` listens on `{mesh_dir}/w{i}.sock` and opens one outbound link to every peer;
//! a link is one-way (frames from this worker to that peer), so each pair of workers has
//! two. Frames for a peer accumulate in its outbox while the engine works and leave in one
//! write per wake-up (batching). On connecting, a worker sends `Hello`, then (once its
//! engine answers [`ClusterEvent::PeerJoined`]) its routes and the retained messages; a
//! peer whose inbound link closes (process died, or a new incarnation replaced it) is
//! reported as [`ClusterEvent::PeerLeft`]. Frames read from peers become events in the
//! worker's inbox, in the order they were read. All workers are on one host:
//! [`NodeId::LOCAL_HOST`], slot = worker index.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use super::census::Census;
use super::fdpass;
use super::wire::{self, Frame};
use super::{
    Backend, Barriers, Cluster, ClusterEvent, ClusterInbox, HandedStream, HandoffError, Lifecycle,
    LocalFuture, WorkerIdentity,
};
use crate::model::{Message, NodeId, Route, SessionImage, SharedTarget, WorkerStats};
use crate::protocol::QoS;

/// Queued for a peer beyond this, it is behind: publishers whose messages go to it pause
/// until it is under `CAUGHT_UP` again (see `engine/flow.rs`).
const BEHIND: usize = 4 * 1024 * 1024;
const CAUGHT_UP: usize = 1024 * 1024;
/// Queued for a peer beyond this, QoS 0 forwards to it are dropped (counted). QoS 1/2 never
/// are: their publishers are paused, so the overshoot past `BEHIND` is bounded by one
/// message per publisher.
const MAX_OUTBOX: usize = 64 * 1024 * 1024;
/// How long a worker waits for its peers when it starts.
const JOIN_DEADLINE: Duration = Duration::from_secs(10);
/// How long a replacement waits for its predecessor's sessions (the predecessor first
/// drains its clients, which has a deadline of its own).
const TAKEOVER_DEADLINE: Duration = Duration::from_secs(60);
/// How long a draining worker waits for its peers to switch their links to its successor
/// (so it has received every message they sent it), and then for its own outboxes to be
/// written.
const SWITCH_DEADLINE: Duration = Duration::from_secs(3);
/// Bytes of messages per session frame in a handover (a session may hold far more than a
/// frame may carry).
const SESSION_CHUNK: usize = 8 * 1024 * 1024;

pub fn socket_path(dir: &Path, index: u16) -> PathBuf {
    dir.join(format!("w{index}.sock"))
}

/// One outbound link to a peer.
#[derive(Default)]
struct Link {
    connected: bool,
    out: BytesMut,
    /// Bytes taken from `out` by the writer and not yet written.
    writing: usize,
    /// `forward` reported this peer behind; [`ClusterEvent::PeerCaughtUp`] is due.
    behind: bool,
    /// The process at the other end has been replaced: tell it (`Superseded`), then
    /// reconnect to its successor.
    superseded: bool,
    /// Descriptors to send, each with the byte offset in `out` of its Handoff frame.
    fds: VecDeque<(usize, OwnedFd)>,
    notify: Rc<Notify>,
    /// Process id of the peer incarnation this link is connected to.
    peer_pid: Option<u32>,
    /// Connections waiting for this link to come (back) up: a peer restarting, or a new
    /// incarnation replacing it. Sent on connect; dropped (closing them) when too old.
    pending_handoffs: Vec<(Instant, HandedStream)>,
}

/// How long a connection may wait for the worker owning its client id to be reachable.
const HANDOFF_WAIT: Duration = Duration::from_secs(5);

/// The process this one replaces (a rolling restart), while its sessions are expected.
struct Predecessor {
    pid: u32,
    /// Its handover link is open.
    linked: bool,
    /// Its sessions are all in (its `HandoverEnd`), or its link closed.
    done: bool,
}

/// What each side of the mesh knows about a peer.
#[derive(Default)]
struct Peer {
    /// Process id from the latest Hello received from this peer.
    pid: Option<u32>,
    routes_received: bool,
    retained_received: bool,
}

pub struct MeshState {
    me: WorkerIdentity,
    links: Vec<Link>,
    peers: Vec<Peer>,
    barriers: Barriers,
    /// Where frames read from peers go, as events for the engine.
    inbox: Rc<ClusterInbox>,
    /// Woken whenever join progress is made (see `MeshState::joined`).
    progress: Rc<Notify>,
    /// By slot: the engine holds this peer's messages (a destination is behind), so its
    /// inbound link is not read. Woken when a hold is released.
    held: Vec<bool>,
    hold_released: Rc<Notify>,
    /// By slot: inbound links open from that peer's processes.
    inbound: Vec<u32>,
    predecessor: Option<Predecessor>,
    dropped_forwards: u64,
}

impl MeshState {
    fn peer_indexes(&self) -> impl Iterator<Item = u16> + '_ {
        let me = self.me.index;
        (0..self.me.count).filter(move |&i| i != me)
    }

    fn push(&mut self, to: u16, f: &Frame) {
        let link = &mut self.links[to as usize];
        if link.connected {
            wire::encode(&mut link.out, f, Instant::now());
            link.notify.notify_one();
        }
    }

    fn broadcast(&mut self, f: &Frame) {
        let peers: Vec<u16> = self.peer_indexes().collect();
        for p in peers {
            self.push(p, f);
        }
    }

    /// Every peer is linked both ways and has sent its routes and retained messages.
    fn joined(&self) -> bool {
        self.peer_indexes().all(|p| {
            let peer = &self.peers[p as usize];
            self.links[p as usize].connected && peer.routes_received && peer.retained_received
        })
    }
}

fn queue_handoff(link: &mut Link, stream: HandedStream, now: Instant) {
    let offset = link.out.len();
    let frame = Frame::Handoff {
        kind: stream.kind,
        identity: stream.identity.unwrap_or_default(),
        bytes: stream.bytes,
    };
    wire::encode(&mut link.out, &frame, now);
    link.fds.push_back((offset, stream.socket));
}

fn node(slot: u16) -> NodeId {
    NodeId::local(slot)
}

/// The engine's handle on the mesh (implements [`Cluster`]).
pub struct EmbeddedCluster {
    state: Rc<RefCell<MeshState>>,
    me: NodeId,
    workers: u16,
    /// The broker-wide connection count; `None` if its file could not be mapped (then
    /// only the per-worker limit applies, and a warning says so).
    census: Option<Census>,
}

impl Cluster for EmbeddedCluster {
    fn local_node(&self) -> NodeId {
        self.me
    }

    fn local_workers(&self) -> u16 {
        self.workers
    }

    fn is_alone(&self) -> bool {
        self.workers <= 1
    }

    fn home_of(&self, client_id: &str) -> NodeId {
        node(super::home_worker(client_id, self.workers))
    }

    fn sys_publisher(&self) -> NodeId {
        node(0)
    }

    fn route_added(&mut self, route: &Route) {
        self.state
            .borrow_mut()
            .broadcast(&Frame::RouteAdd(route.clone()));
    }

    fn route_removed(&mut self, route: &Route) {
        self.state
            .borrow_mut()
            .broadcast(&Frame::RouteRemove(route.clone()));
    }

    /// Queued whether or not the link is up: a peer that is restarting gets what was
    /// queued for it on reconnecting (a successor holds it until it has imported the
    /// sessions it is for); a peer that died has it discarded with its routes.
    fn forward(&mut self, to: NodeId, msg: &Message, plain: bool, shared: &[SharedTarget]) -> bool {
        let mut state = self.state.borrow_mut();
        let Some(link) = state.links.get_mut(to.slot as usize) else {
            return false;
        };
        let queued = link.out.len() + link.writing;
        if queued > MAX_OUTBOX && msg.qos == QoS::AtMostOnce {
            state.dropped_forwards += 1;
            if state.dropped_forwards.is_power_of_two() {
                tracing::warn!(
                    to = to.slot,
                    dropped = state.dropped_forwards,
                    "peer not keeping up: QoS 0 forwards dropped"
                );
            }
            return true;
        }
        wire::encode_publish(&mut link.out, plain, shared, msg, Instant::now());
        link.notify.notify_one();
        if queued > BEHIND {
            link.behind = true;
        }
        link.behind
    }

    fn hold_peer(&mut self, peer: NodeId, hold: bool) {
        let mut state = self.state.borrow_mut();
        if let Some(held) = state.held.get_mut(peer.slot as usize) {
            *held = hold;
        }
        if !hold {
            state.hold_released.notify_waiters();
        }
    }

    fn retained(&mut self, msg: &Message) {
        self.state
            .borrow_mut()
            .broadcast(&Frame::Retained(msg.clone()));
    }

    fn barrier(&mut self) -> Option<u64> {
        let mut state = self.state.borrow_mut();
        let waiting: Vec<NodeId> = state
            .peer_indexes()
            .filter(|&p| state.links[p as usize].connected)
            .map(node)
            .collect();
        let id = state.barriers.start(waiting.clone())?;
        for p in waiting {
            state.push(p.slot, &Frame::Barrier(id));
        }
        Some(id)
    }

    fn barrier_reached(&mut self, from: NodeId, id: u64) {
        self.state
            .borrow_mut()
            .push(from.slot, &Frame::BarrierAck(id));
    }

    fn barrier_abandoned(&mut self, id: u64) {
        self.state.borrow_mut().barriers.abandon(id);
    }

    fn sync_peer(&mut self, peer: NodeId, routes: &[Route], retained: &[Rc<Message>]) {
        let mut state = self.state.borrow_mut();
        let Some(link) = state.links.get_mut(peer.slot as usize) else {
            return;
        };
        if !link.connected {
            // Down again already: the next connect asks for another sync.
            return;
        }
        let now = Instant::now();
        for route in routes {
            wire::encode(&mut link.out, &Frame::RouteAdd(route.clone()), now);
        }
        wire::encode(&mut link.out, &Frame::RoutesEnd, now);
        // Every sync carries the whole retained set, so a (re)joining peer has it all.
        for msg in retained {
            wire::encode(&mut link.out, &Frame::Retained((**msg).clone()), now);
        }
        wire::encode(&mut link.out, &Frame::RetainedEnd, now);
        link.notify.notify_one();
    }

    fn handoff(&mut self, to: NodeId, stream: HandedStream) -> Result<(), HandoffError> {
        let mut state = self.state.borrow_mut();
        if to.host != NodeId::LOCAL_HOST {
            // One host only: there is no other to pass a socket to.
            return Err(HandoffError::Elsewhere {
                stream,
                server_reference: None,
            });
        }
        let Some(link) = state.links.get_mut(to.slot as usize) else {
            return Err(HandoffError::Unreachable(stream));
        };
        let now = Instant::now();
        if !link.connected {
            // The owner is restarting or being replaced: the client waits for it (its
            // CONNACK comes from the new process) instead of being refused.
            link.pending_handoffs
                .retain(|(since, _)| now.duration_since(*since) < HANDOFF_WAIT);
            link.pending_handoffs.push((now, stream));
            return Ok(());
        }
        queue_handoff(link, stream, now);
        link.notify.notify_one();
        Ok(())
    }

    fn report_stats(&mut self, stats: &WorkerStats) {
        let mut state = self.state.borrow_mut();
        if state.me.index != 0 {
            state.push(0, &Frame::Stats(*stats));
        }
    }

    fn connections_changed(&mut self, admitted: usize) {
        if let Some(census) = &self.census {
            census.set_local(admitted);
        }
    }

    fn broker_connections(&self) -> Option<usize> {
        self.census.as_ref().map(Census::total)
    }

    fn dropped_forwards(&self) -> u64 {
        self.state.borrow().dropped_forwards
    }
}

/// The worker's handle on the mesh around the engine's life (implements [`Lifecycle`]).
struct MeshLifecycle {
    state: Rc<RefCell<MeshState>>,
}

impl Lifecycle for MeshLifecycle {
    /// Waits (bounded) until every peer is linked both ways and has sent its routes and
    /// retained messages.
    fn ready(&self) -> LocalFuture<'_, ()> {
        Box::pin(async move {
            let progress = self.state.borrow().progress.clone();
            let joined = async {
                loop {
                    let notified = progress.notified();
                    tokio::pin!(notified);
                    // Registered before the check, so progress made in between is not missed.
                    notified.as_mut().enable();
                    if self.state.borrow().joined() {
                        return;
                    }
                    notified.await;
                }
            };
            if tokio::time::timeout(JOIN_DEADLINE, joined).await.is_err() {
                tracing::warn!(
                    worker = self.state.borrow().me.index,
                    "not every peer answered within {JOIN_DEADLINE:?}; serving anyway"
                );
            }
        })
    }

    fn has_predecessor(&self) -> bool {
        self.state.borrow().predecessor.is_some()
    }

    fn take_over(&self) -> LocalFuture<'_, ()> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + TAKEOVER_DEADLINE;
            loop {
                let progress = self.state.borrow().progress.clone();
                let notified = progress.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                {
                    let st = self.state.borrow();
                    let Some(pred) = &st.predecessor else {
                        return;
                    };
                    // Gone without having connected (killed, crashed): nothing will come.
                    let alive = unsafe { libc::kill(pred.pid as i32, 0) } == 0;
                    if pred.done || (!pred.linked && !alive) {
                        return;
                    }
                }
                let check = tokio::time::Instant::now() + Duration::from_millis(100);
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep_until(check.min(deadline)) => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!("predecessor's sessions did not arrive within {TAKEOVER_DEADLINE:?}; serving without them");
                    return;
                }
            }
        })
    }

    fn hand_over_sessions<'a>(
        &'a self,
        export: Box<dyn FnOnce() -> Vec<SessionImage> + 'a>,
    ) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            let me = self.state.borrow().me.clone();
            let Some((stream, successor)) = connect_successor(&me).await else {
                // The whole broker is stopping: nowhere to hand anything to.
                return;
            };
            // Every message a peer sent here before switching to the successor is in (the
            // export takes the sessions with them).
            wait_until(&self.state, SWITCH_DEADLINE, |st| {
                st.inbound.iter().all(|&n| n == 0)
            })
            .await;
            hand_over_sessions(&me, &stream, successor, export).await;
            // Messages this worker forwarded (and acknowledged to their publishers) leave
            // before it exits.
            let flushed = wait_until(&self.state, SWITCH_DEADLINE, |st| {
                st.links
                    .iter()
                    .all(|l| !l.connected || (l.out.is_empty() && l.writing == 0))
            })
            .await;
            if !flushed {
                tracing::warn!("exiting with messages for peers still unsent");
            }
        })
    }
}

/// Polls `done` on the mesh state until it holds or `deadline` passes; whether it held.
/// (For the drain only: the states waited for have no event of their own.)
async fn wait_until(
    state: &Rc<RefCell<MeshState>>,
    deadline: Duration,
    done: impl Fn(&MeshState) -> bool,
) -> bool {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if done(&state.borrow()) {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts the mesh backend: binds this worker's socket and starts the link tasks. Must run
/// inside the worker's `LocalSet`. [`Lifecycle::ready`] then waits for the peers.
pub fn start(me: WorkerIdentity) -> std::io::Result<Backend> {
    let path = socket_path(&me.mesh_dir, me.index);
    // A process still listening there is the one this one replaces: it hands its sessions
    // over once it has drained.
    let predecessor = std::os::unix::net::UnixStream::connect(&path)
        .and_then(|probe| {
            probe.set_nonblocking(true)?;
            UnixStream::from_std(probe)?.peer_cred()
        })
        .ok()
        .and_then(|cred| cred.pid())
        .map(|pid| Predecessor {
            pid: pid as u32,
            linked: false,
            done: false,
        });
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let count = me.count as usize;
    let inbox = Rc::new(ClusterInbox::default());
    let state = Rc::new(RefCell::new(MeshState {
        me: me.clone(),
        links: (0..count).map(|_| Link::default()).collect(),
        peers: (0..count).map(|_| Peer::default()).collect(),
        barriers: Barriers::default(),
        inbox: inbox.clone(),
        progress: Rc::new(Notify::new()),
        held: vec![false; count],
        hold_released: Rc::new(Notify::new()),
        inbound: vec![0; count],
        predecessor,
        dropped_forwards: 0,
    }));
    let census = Census::open(&me.mesh_dir, me.index, me.count)
        .inspect_err(|e| tracing::warn!("broker-wide connection count unavailable: {e}"))
        .ok();
    tokio::task::spawn_local(accept_links(listener, state.clone()));
    for peer in (0..me.count).filter(|&p| p != me.index) {
        tokio::task::spawn_local(run_link(peer, state.clone()));
    }
    Ok(Backend {
        cluster: Box::new(EmbeddedCluster {
            state: state.clone(),
            me: node(me.index),
            workers: me.count,
            census,
        }),
        inbox,
        lifecycle: Box::new(MeshLifecycle { state }),
    })
}

/// Keeps the outbound link to `peer` connected and writes its outbox.
async fn run_link(peer: u16, state: Rc<RefCell<MeshState>>) {
    let path = socket_path(&state.borrow().me.mesh_dir, peer);
    let mut backoff = Duration::from_millis(10);
    loop {
        let stream = match UnixStream::connect(&path).await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .map(|p| p as u32);
        let notify = {
            let mut st = state.borrow_mut();
            let index = st.me.index;
            let link = &mut st.links[peer as usize];
            link.connected = true;
            link.peer_pid = peer_pid;
            let now = Instant::now();
            // Hello first, then whatever was queued while the link was down (for a
            // restarting peer: forwards it must not miss).
            let mut out = BytesMut::new();
            wire::encode(
                &mut out,
                &Frame::Hello {
                    index,
                    pid: std::process::id(),
                },
                now,
            );
            let shift = out.len();
            out.extend_from_slice(&link.out);
            link.out = out;
            for (offset, _) in link.fds.iter_mut() {
                *offset += shift;
            }
            for (since, stream) in std::mem::take(&mut link.pending_handoffs) {
                if now.duration_since(since) < HANDOFF_WAIT {
                    queue_handoff(link, stream, now);
                }
            }
            let notify = link.notify.clone();
            // The engine answers with its routes and retained messages (`sync_peer`).
            st.inbox.push(ClusterEvent::PeerJoined(node(peer)));
            st.progress.notify_waiters();
            notify
        };
        tracing::debug!(peer, ?peer_pid, "mesh link up");
        if let Err(e) = write_link(peer, &stream, &state, &notify).await {
            tracing::debug!(peer, "mesh link down: {e}");
        }
        let mut st = state.borrow_mut();
        let link = &mut st.links[peer as usize];
        link.connected = false;
        // What the writer had taken went to the old process (or with it); what is queued
        // stays for the next one (see `forward`).
        link.writing = 0;
        link.peer_pid = None;
    }
}

/// Writes whatever the outbox holds, until the link fails or is to be replaced.
async fn write_link(
    peer: u16,
    stream: &UnixStream,
    state: &Rc<RefCell<MeshState>>,
    notify: &Notify,
) -> std::io::Result<()> {
    loop {
        let taken = {
            let mut st = state.borrow_mut();
            let link = &mut st.links[peer as usize];
            if !link.connected {
                return Err(std::io::Error::other("link reset"));
            }
            if std::mem::take(&mut link.superseded) {
                None
            } else {
                link.writing = link.out.len();
                Some((std::mem::take(&mut link.out), std::mem::take(&mut link.fds)))
            }
        };
        let Some((mut out, mut fds)) = taken else {
            // So the old process does not take the closing link for our death.
            let mut bye = BytesMut::new();
            wire::encode(&mut bye, &Frame::Superseded, Instant::now());
            write_all(stream, &bye).await?;
            return Err(std::io::Error::other("peer replaced"));
        };
        if out.is_empty() {
            notify.notified().await;
            continue;
        }
        let mut sent = 0usize;
        while let Some((offset, fd)) = fds.pop_front() {
            // Bytes before the Handoff frame, then the frame's first byte with the descriptor.
            write_all(stream, &out[..offset - sent]).await?;
            out.advance(offset - sent);
            sent = offset;
            // Only up to the next Handoff frame: each descriptor must ride on its own frame.
            let upto = fds.front().map_or(out.len(), |(next, _)| next - sent);
            loop {
                stream.writable().await?;
                match stream.try_io(Interest::WRITABLE, || {
                    fdpass::send_with_fd(stream.as_raw_fd(), &out[..upto], &fd)
                }) {
                    Ok(n) => {
                        out.advance(n);
                        sent += n;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            // `fd` drops here: the peer has its own copy now.
        }
        write_all(stream, &out).await?;
        let mut st = state.borrow_mut();
        let link = &mut st.links[peer as usize];
        link.writing = 0;
        let caught_up = link.behind && link.out.len() < CAUGHT_UP;
        // Give the emptied buffer back if nothing new arrived meanwhile (keeps its capacity).
        if link.out.is_empty() {
            out.clear();
            link.out = out;
        }
        if caught_up {
            link.behind = false;
            st.inbox.push(ClusterEvent::PeerCaughtUp(node(peer)));
        }
    }
}

async fn write_all(stream: &UnixStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn accept_links(listener: UnixListener, state: Rc<RefCell<MeshState>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::task::spawn_local(read_link(stream, state.clone()));
            }
            Err(e) => {
                tracing::warn!("mesh accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads frames from one inbound link and passes them on as events.
async fn read_link(stream: UnixStream, state: Rc<RefCell<MeshState>>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut pending_fds: VecDeque<OwnedFd> = VecDeque::new();
    let mut peer: Option<(u16, u32)> = None;
    // The peer switched this link to our successor: its closing is not the peer's death.
    let mut superseded = false;
    loop {
        buf.reserve(64 * 1024);
        let read = loop {
            if let Err(e) = stream.readable().await {
                break Err(e);
            }
            let spare = buf.spare_capacity_mut();
            // SAFETY: recvmsg only writes into the slice; the length is advanced by what it wrote.
            let slice = unsafe {
                std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<u8>(), spare.len())
            };
            match stream.try_io(Interest::READABLE, || {
                fdpass::recv_with_fds(stream.as_raw_fd(), slice, &mut fds)
            }) {
                Ok(n) => break Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => break Err(e),
            }
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        unsafe { buf.set_len(buf.len() + n) };
        pending_fds.extend(fds.drain(..));
        let now = Instant::now();
        loop {
            let frame = match wire::decode(&mut buf, now) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(?peer, "bad mesh frame: {}", e.0);
                    return link_closed(peer, superseded, &state);
                }
            };
            if matches!(frame, Frame::Superseded) {
                superseded = true;
                continue;
            }
            apply(frame, &mut peer, &mut pending_fds, &state);
        }
        if let Some((slot, _)) = peer {
            wait_while_held(slot, &state).await;
        }
    }
    link_closed(peer, superseded, &state);
}

/// While the engine holds `slot`'s messages, its link is not read (the kernel's socket
/// buffer fills, then the peer's outbox, and the peer pauses its publishers).
async fn wait_while_held(slot: u16, state: &Rc<RefCell<MeshState>>) {
    loop {
        let released = state.borrow().hold_released.clone();
        let notified = released.notified();
        tokio::pin!(notified);
        // Registered before the check, so a release in between is not missed.
        notified.as_mut().enable();
        if !state.borrow().held[slot as usize] {
            return;
        }
        notified.await;
    }
}

fn apply(
    frame: Frame,
    peer: &mut Option<(u16, u32)>,
    fds: &mut VecDeque<OwnedFd>,
    state: &Rc<RefCell<MeshState>>,
) {
    let mut st = state.borrow_mut();
    if let Frame::Hello { index, pid } = frame {
        if index == st.me.index {
            // Our predecessor (rolling restart), about to hand over its sessions.
            *peer = Some((index, pid));
            if let Some(pred) = &mut st.predecessor {
                pred.linked = true;
            }
            return;
        }
        if index >= st.me.count {
            tracing::error!(index, "Hello from a worker index out of range");
            return;
        }
        *peer = Some((index, pid));
        st.inbound[index as usize] += 1;
        if st.peers[index as usize].pid == Some(pid) {
            return;
        }
        // A new incarnation: what the previous one announced stays until it settles.
        st.inbox.push(ClusterEvent::PeerReplaced(node(index)));
        let known = &mut st.peers[index as usize];
        known.pid = Some(pid);
        known.routes_received = false;
        known.retained_received = false;
        let link = &mut st.links[index as usize];
        if link.connected && link.peer_pid.is_some_and(|p| p != pid) {
            // Our outbound link still points at the old incarnation: reconnect.
            link.superseded = true;
            link.notify.notify_one();
        }
        return;
    }
    let Some((slot, pid)) = *peer else {
        tracing::error!("mesh frame before Hello");
        return;
    };
    let from = node(slot);
    // A process a newer one replaced (draining): its withdrawals are its sessions leaving
    // for the successor, not subscriptions ending.
    let superseded = slot != st.me.index && st.peers[slot as usize].pid != Some(pid);
    let event = match frame {
        // Release and NoSession travel between hosts (the Redis backend), never here.
        Frame::Hello { .. } | Frame::Superseded | Frame::Release { .. } | Frame::NoSession(_) => {
            return
        }
        Frame::RouteAdd(route) => ClusterEvent::RouteAdded { from, route },
        Frame::RouteRemove(_) if superseded => return,
        Frame::RouteRemove(route) => ClusterEvent::RouteRemoved { from, route },
        Frame::RoutesEnd => {
            st.peers[slot as usize].routes_received = true;
            st.progress.notify_waiters();
            return;
        }
        Frame::Publish { plain, shared, msg } => ClusterEvent::Forwarded {
            from,
            msg,
            plain,
            shared,
        },
        Frame::Retained(msg) => ClusterEvent::Retained(msg),
        Frame::RetainedEnd => {
            st.peers[slot as usize].retained_received = true;
            st.progress.notify_waiters();
            return;
        }
        Frame::Barrier(id) => ClusterEvent::BarrierRequested { from, id },
        Frame::BarrierAck(id) => {
            if !st.barriers.confirmed(id, from) {
                return;
            }
            ClusterEvent::BarrierDone(id)
        }
        Frame::Handoff {
            kind,
            identity,
            bytes,
        } => match fds.pop_front() {
            Some(socket) => ClusterEvent::Adopt(HandedStream {
                kind,
                socket,
                identity: (!identity.is_empty()).then_some(identity),
                bytes,
            }),
            None => {
                tracing::error!(from = slot, "handoff frame without a descriptor");
                return;
            }
        },
        Frame::Stats(stats) => ClusterEvent::PeerStats { from, stats },
        Frame::Session(image) => ClusterEvent::SessionImported(image),
        Frame::SessionMore(image) => ClusterEvent::SessionContinued(image),
        Frame::HandoverEnd => {
            if let Some(pred) = &mut st.predecessor {
                pred.done = true;
            }
            st.progress.notify_waiters();
            return;
        }
        Frame::Settled if superseded => return,
        Frame::Settled => ClusterEvent::PeerSettled(from),
    };
    st.inbox.push(event);
}

/// An inbound link closed: if it was the peer's current incarnation and it did not
/// switch to our successor (`superseded`), the peer is gone.
fn link_closed(peer: Option<(u16, u32)>, superseded: bool, state: &Rc<RefCell<MeshState>>) {
    let Some((index, pid)) = peer else {
        return;
    };
    let mut st = state.borrow_mut();
    if index == st.me.index {
        // Our predecessor's handover link: whatever it sent is all there will be.
        if let Some(pred) = &mut st.predecessor {
            pred.done = true;
        }
        st.progress.notify_waiters();
        return;
    }
    st.inbound[index as usize] -= 1;
    if superseded || st.peers[index as usize].pid != Some(pid) {
        return; // an older incarnation; the current one is linked
    }
    st.peers[index as usize] = Peer::default();
    // What was queued for it was for a process that is gone (its sessions with it).
    let link = &mut st.links[index as usize];
    link.out.clear();
    link.fds.clear();
    link.behind = false;
    let done = st.barriers.forget(node(index));
    st.inbox.push(ClusterEvent::PeerLeft(node(index)));
    for id in done {
        st.inbox.push(ClusterEvent::BarrierDone(id));
    }
}

/// After a drain: sends this worker's persistent sessions to its successor (connected on
/// `stream`), the process now listening on this worker's socket (a rolling restart).
async fn hand_over_sessions(
    me: &WorkerIdentity,
    stream: &UnixStream,
    successor: u32,
    export: Box<dyn FnOnce() -> Vec<SessionImage> + '_>,
) {
    let images = export();
    let count = images.len();
    let now = Instant::now();
    let mut out = BytesMut::new();
    let hello = Frame::Hello {
        index: me.index,
        pid: std::process::id(),
    };
    wire::encode(&mut out, &hello, now);
    let frames = images.into_iter().flat_map(session_frames);
    let sent = async {
        // One frame encoded at a time: a session of any size moves in bounded memory.
        for frame in frames.chain(std::iter::once(Frame::HandoverEnd)) {
            wire::encode(&mut out, &frame, now);
            drop(frame);
            write_all(stream, &out).await?;
            out.clear();
        }
        Ok::<(), std::io::Error>(())
    };
    match sent.await {
        Ok(()) => tracing::info!(
            sessions = count,
            successor,
            "sessions handed to the successor"
        ),
        Err(e) => tracing::warn!(sessions = count, "handing sessions over failed: {e}"),
    }
}

/// The process now listening on this worker's socket, if it is another one (a rolling
/// restart's successor), connected, with its pid.
async fn connect_successor(me: &WorkerIdentity) -> Option<(UnixStream, u32)> {
    let path = socket_path(&me.mesh_dir, me.index);
    let stream = UnixStream::connect(&path).await.ok()?;
    let pid = stream.peer_cred().ok()?.pid()? as u32;
    (pid != std::process::id()).then_some((stream, pid))
}

/// A session as frames of at most about `SESSION_CHUNK` bytes of messages each (but at
/// least one message): `Session` with the inflight messages and the first of the queue,
/// then `SessionMore`s with the rest of the queue, in order.
pub(super) fn session_frames(mut image: SessionImage) -> Vec<Frame> {
    let size = |msg: &Message| msg.topic.len() + msg.payload.len() + 64;
    let mut queue = std::mem::take(&mut image.queue).into_iter().peekable();
    let mut inflight = std::mem::take(&mut image.inflight).into_iter().peekable();
    let client_id = image.client_id.clone();
    let mut frames = Vec::new();
    let mut head = Some(image);
    loop {
        let mut part = match head.take() {
            Some(image) => image,
            None => SessionImage {
                // A continuation names its session; the rest of its fields are unused.
                client_id: client_id.clone(),
                expiry_secs: 0,
                expires_in: None,
                subscriptions: Vec::new(),
                queue: Vec::new(),
                inflight: Vec::new(),
                incoming_qos2: Vec::new(),
                will: None,
            },
        };
        let mut bytes = 0;
        while let Some(m) =
            inflight.next_if(|m| bytes == 0 || bytes + size(&m.msg) <= SESSION_CHUNK)
        {
            bytes += size(&m.msg);
            part.inflight.push(m);
        }
        while let Some(q) = queue.next_if(|q| bytes == 0 || bytes + size(&q.msg) <= SESSION_CHUNK) {
            bytes += size(&q.msg);
            part.queue.push(q);
        }
        frames.push(if frames.is_empty() {
            Frame::Session(Box::new(part))
        } else {
            Frame::SessionMore(Box::new(part))
        });
        if queue.peek().is_none() && inflight.peek().is_none() {
            return frames;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::model::{Delivery, QueuedImage, WillImage};

    fn message(seq: u32, len: usize) -> Message {
        Message {
            topic: Bytes::from_static(b"big"),
            payload: Bytes::from([seq.to_le_bytes().to_vec(), vec![0; len]].concat()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
            expires_at: None,
            origin: None,
        }
    }

    /// A session larger than a frame may carry moves in frames of bounded size, each
    /// decodable, its messages in order, its will with it.
    #[test]
    fn large_session_is_sent_in_bounded_frames_in_order() {
        let megabyte = 1024 * 1024;
        let image = SessionImage {
            client_id: "c".into(),
            expiry_secs: 3600,
            expires_in: Some(3500),
            subscriptions: Vec::new(),
            queue: (0..40)
                .map(|seq| QueuedImage {
                    seq: u64::from(seq),
                    msg: message(seq, megabyte),
                    delivery: Delivery {
                        qos: 1,
                        ..Delivery::default()
                    },
                })
                .collect(),
            inflight: Vec::new(),
            incoming_qos2: vec![7],
            will: Some(WillImage {
                msg: message(99, 10),
                delay_secs: 60,
                due_in: 42,
            }),
        };
        let frames = session_frames(image);
        assert!(frames.len() >= 5, "40 MB in 8 MB frames: {}", frames.len());
        let now = Instant::now();
        let mut seqs = Vec::new();
        for (i, frame) in frames.iter().enumerate() {
            let mut buf = BytesMut::new();
            wire::encode(&mut buf, frame, now);
            assert!(
                buf.len() <= SESSION_CHUNK + megabyte,
                "frame {i}: {}",
                buf.len()
            );
            let image = match (i, wire::decode(&mut buf, now).unwrap().unwrap()) {
                (0, Frame::Session(image)) => {
                    assert_eq!(image.incoming_qos2, [7]);
                    let will = image.will.as_ref().expect("the will moves");
                    assert_eq!((will.delay_secs, will.due_in), (60, 42));
                    image
                }
                (1.., Frame::SessionMore(image)) => image,
                (i, other) => panic!("frame {i}: {other:?}"),
            };
            assert_eq!(image.client_id, "c");
            for q in &image.queue {
                seqs.push(u32::from_le_bytes(q.msg.payload[..4].try_into().unwrap()));
            }
        }
        assert_eq!(seqs, (0..40).collect::<Vec<_>>());
    }
}
