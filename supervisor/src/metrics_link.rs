//! The supervisor's end of one worker's metrics channel: a Unix stream socketpair whose
//! other end the worker inherits as fd 4 (protocol: `mqttd_broker::metrics`).
//!
//! One task per worker owns the socket and runs the exchanges one after another, so
//! concurrent scrapes never interleave on it, and a caller that gives up waiting (a worker
//! that does not answer in time) leaves the task to read the late reply to its end: the
//! next exchange starts on a frame boundary.

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

use mqttd_broker::metrics::SCRAPE_REQUEST;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

/// The descriptor number a worker finds its metrics channel at (3 is the TCP listener,
/// 5 is reserved for the QUIC socket).
pub const WORKER_METRICS_FD: RawFd = 4;

/// Scrapes waiting for a worker that is still answering an earlier one; beyond this a
/// scrape fails at once instead of queueing behind a stuck worker.
const QUEUE: usize = 4;
/// A reply larger than this is a broken worker, not metrics.
const MAX_REPLY: usize = 64 << 20;

type Reply = oneshot::Sender<io::Result<String>>;

/// A handle to one worker's metrics channel; clones share it.
#[derive(Debug, Clone)]
pub struct MetricsLink {
    requests: mpsc::Sender<Reply>,
}

/// The two ends of a new channel: (the worker's, the supervisor's). Both are
/// close-on-exec, so no other worker inherits them; the spawn moves the worker's to
/// [`WORKER_METRICS_FD`] (see [`stash_in_child`], [`place_in_child`]).
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    Ok((a.into(), b.into()))
}

impl MetricsLink {
    /// Starts the task that owns `channel` (the supervisor's end). It ends when the worker
    /// closes its end or every handle is dropped.
    pub fn start(channel: OwnedFd) -> io::Result<MetricsLink> {
        let stream = std::os::unix::net::UnixStream::from(channel);
        stream.set_nonblocking(true)?;
        let (reader, writer) = tokio::net::UnixStream::from_std(stream)?.into_split();
        let (requests, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(BufReader::new(reader), writer, rx));
        Ok(MetricsLink { requests })
    }

    /// The worker's exposition text, or an error if it does not answer within `timeout`.
    pub async fn scrape(&self, timeout: Duration) -> io::Result<String> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .try_send(tx)
            .map_err(|_| io::Error::other("worker busy or gone"))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(io::Error::other("metrics channel closed")),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time")),
        }
    }
}

async fn run(
    mut reader: BufReader<OwnedReadHalf>,
    mut writer: OwnedWriteHalf,
    mut requests: mpsc::Receiver<Reply>,
) {
    while let Some(reply) = requests.recv().await {
        let result = exchange(&mut reader, &mut writer).await;
        let broken = result.is_err();
        let _ = reply.send(result);
        if broken {
            // Out of step or closed: fail every later scrape rather than misread it.
            return;
        }
    }
}

async fn exchange(
    reader: &mut BufReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
) -> io::Result<String> {
    writer.write_all(SCRAPE_REQUEST.as_bytes()).await?;
    let mut header = String::new();
    (&mut *reader).take(64).read_line(&mut header).await?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {header:?}"));
    let (status, len) = header.trim_end().split_once(' ').ok_or_else(bad)?;
    let len: usize = len.parse().map_err(|_| bad())?;
    if len > MAX_REPLY {
        return Err(bad());
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).await?;
    let body = String::from_utf8(body).map_err(|_| bad())?;
    match status {
        "ok" => Ok(body),
        "err" => Err(io::Error::other(body)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake worker on the other end: answers each request with `reply`.
    async fn fake_worker(end: OwnedFd, reply: &'static str) {
        let stream = std::os::unix::net::UnixStream::from(end);
        stream.set_nonblocking(true).unwrap();
        let stream = tokio::net::UnixStream::from_std(stream).unwrap();
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            assert_eq!(format!("{line}\n"), SCRAPE_REQUEST);
            let frame = format!("ok {}\n{reply}", reply.len());
            w.write_all(frame.as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn exchanges_frames_and_reports_a_closed_worker() {
        let (worker, supervisor) = socketpair().unwrap();
        let link = MetricsLink::start(supervisor).unwrap();
        let server = tokio::spawn(fake_worker(worker, "a 1\nb 2\n"));
        for _ in 0..3 {
            let text = link.scrape(Duration::from_secs(5)).await.unwrap();
            assert_eq!(text, "a 1\nb 2\n");
        }
        server.abort();
        let _ = server.await;
        assert!(link.scrape(Duration::from_secs(5)).await.is_err());
    }

    #[tokio::test]
    async fn a_late_reply_does_not_shift_the_next_one() {
        let (worker, supervisor) = socketpair().unwrap();
        let link = MetricsLink::start(supervisor).unwrap();
        // Nobody answers yet: the scrape times out while the request stays sent.
        let err = link.scrape(Duration::from_millis(1)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        tokio::spawn(fake_worker(worker, "x 1\n"));
        // The late reply goes to the abandoned scrape, this one gets its own.
        assert_eq!(link.scrape(Duration::from_secs(5)).await.unwrap(), "x 1\n");
    }
}
