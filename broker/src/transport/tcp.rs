//! MQTT over TCP: one small task per connection, driven by readiness.
//!
//! An idle connection holds no buffers: reads go into one per-worker scratch buffer (only an
//! incomplete packet is copied out and kept), and the output buffer is released after each
//! complete flush. The task is a hand-written `poll` so that its future stays a few words
//! instead of holding several pending sub-futures per connection.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;

use crate::engine::{ConnKey, Engine};

/// Bytes read per `read(2)`. Large enough to take many small packets per syscall.
const READ_CHUNK: usize = 64 * 1024;
/// Reads per wake-up before yielding to other connections (fairness under load).
const READ_BUDGET: usize = 16;

thread_local! {
    /// The worker's read buffer, shared by all its connections (one runtime thread per worker).
    static SCRATCH: RefCell<BytesMut> = RefCell::new(BytesMut::with_capacity(READ_CHUNK));
}

/// Serves one accepted TCP connection until it closes.
pub async fn serve(engine: Rc<RefCell<Engine>>, stream: TcpStream) {
    let key = engine.borrow_mut().accept(Instant::now());
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!("set_nodelay: {e}");
    }
    poll_fn(|cx| poll_connection(&mut engine.borrow_mut(), key, &stream, cx)).await;
    engine.borrow_mut().connection_lost(key, Instant::now());
}

/// One turn of a connection: read and handle what arrived, write what is pending, and
/// finish when the engine is done with the connection or the socket is gone.
fn poll_connection(
    engine: &mut Engine,
    key: ConnKey,
    stream: &TcpStream,
    cx: &mut Context<'_>,
) -> Poll<()> {
    for turn in 0.. {
        if engine.is_closing(key) {
            break;
        }
        if turn == READ_BUDGET {
            cx.waker().wake_by_ref();
            break;
        }
        match stream.poll_read_ready(cx) {
            Poll::Pending => break,
            Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(())) => {}
        }
        match read_once(engine, key, stream) {
            Ok(true) => {}
            Ok(false) => return Poll::Ready(()), // EOF
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::debug!(conn = key, "read error: {e}");
                return Poll::Ready(());
            }
        }
    }
    match flush(engine, key, stream, cx) {
        Ok(()) => {}
        Err(e) => {
            tracing::debug!(conn = key, "write error: {e}");
            return Poll::Ready(());
        }
    }
    let drained = engine.output(key).is_none_or(|out| out.is_empty());
    if engine.is_closing(key) && (drained || engine.should_abort(key)) {
        return Poll::Ready(());
    }
    engine.set_waker(key, cx.waker());
    Poll::Pending
}

/// Reads once into the worker's scratch buffer and hands the bytes to the engine.
/// `Ok(false)` on end of stream.
fn read_once(engine: &mut Engine, key: ConnKey, stream: &TcpStream) -> io::Result<bool> {
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        engine.prepare_read(key, &mut buf);
        let before = buf.len();
        buf.reserve(READ_CHUNK);
        let result = stream.try_read_buf(&mut *buf);
        // Always give the buffer back to the engine: it keeps any partial packet.
        let now = Instant::now();
        match result {
            Ok(0) => Ok(false),
            Ok(_) => {
                engine.handle_read(key, &mut buf, now);
                Ok(true)
            }
            Err(e) => {
                if before > 0 {
                    engine.handle_read(key, &mut buf, now);
                }
                Err(e)
            }
        }
    })
}

/// Writes as much pending output as the socket takes, in as few syscalls as possible.
fn flush(
    engine: &mut Engine,
    key: ConnKey,
    stream: &TcpStream,
    cx: &mut Context<'_>,
) -> io::Result<()> {
    let mut written = 0;
    loop {
        let Some(out) = engine.output(key) else {
            return Ok(());
        };
        if out.is_empty() {
            break;
        }
        match stream.poll_write_ready(cx) {
            Poll::Pending => break,
            Poll::Ready(result) => result?,
        }
        match stream.try_write(out) {
            Ok(n) => {
                out.advance(n);
                written += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    if written > 0 {
        engine.output_flushed(key, written);
    }
    Ok(())
}
