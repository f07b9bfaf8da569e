//! The reactor's read and write paths for connections with [`Layers`] (TLS, WebSocket):
//! socket bytes are decoded into the engine's read buffer, the engine's output is encoded
//! into the loop's scratch and written, and only what the socket would not take stays
//! with the connection.

use std::io::{self, Write};
use std::time::Instant;

use bytes::Buf;

use super::{read_into, TcpReactor, READ_BUDGET};
use crate::engine::ConnKey;
use crate::transport::layer::Decoded;

impl TcpReactor {
    /// Reads `key` until the socket is drained or the budget is used.
    pub(super) fn read_layered(&mut self, key: ConnKey) {
        for _ in 0..READ_BUDGET {
            {
                let mut engine = self.engine.borrow_mut();
                if let Some(until) = engine.read_paused_until(key, Instant::now()) {
                    self.paused_reads.push((until, key));
                    return;
                }
                if engine.is_closing(key) {
                    return;
                }
            }
            let (Some(stream), Some(layers)) = (
                self.streams.get_mut(key).and_then(Option::as_mut),
                self.layers.get_mut(key).and_then(Option::as_mut),
            ) else {
                return;
            };
            layers.prepare_read(&mut self.raw);
            let result = read_into(stream, &mut self.raw);
            let (eof, blocked) = match &result {
                Ok(0) => (true, false),
                Ok(_) => (false, false),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => (false, true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => (false, false),
                Err(e) => {
                    tracing::debug!(conn = key, "read error: {e}");
                    return self.close(key);
                }
            };
            // Even with nothing new read, decoding keeps what is left for next time.
            let now = Instant::now();
            let mut engine = self.engine.borrow_mut();
            engine.prepare_read(key, &mut self.scratch);
            let decoded = layers.decode(&mut self.raw, &mut self.scratch, &mut self.mid);
            if let Some(identity) = layers.take_identity() {
                engine.set_peer_identity(key, identity);
            }
            let replies = !layers.out.is_empty();
            engine.handle_read(key, &mut self.scratch, now);
            if let Decoded::Failed(failure) = decoded {
                engine.transport_error(self.driver, failure.name());
            }
            let paused = blocked
                .then(|| engine.read_paused_until(key, now))
                .flatten();
            drop(engine);
            if decoded == Decoded::Finished {
                // The client said goodbye (close_notify, a Close frame): so do we.
                layers.queue_close();
            }
            if decoded != Decoded::Open {
                return self.finish(key);
            }
            if replies {
                self.dirty.push(key);
            }
            if eof {
                return self.close(key);
            }
            if blocked {
                if let Some(until) = paused {
                    self.paused_reads.push((until, key));
                }
                self.account(key);
                return;
            }
        }
        self.unfinished_reads.push(key);
    }

    /// The client is done at the protocol level (or broke it): what the layers still have
    /// to say (a Close reply, an alert, an HTTP error) is written, then the socket lingers.
    fn finish(&mut self, key: ConnKey) {
        if let (Some(stream), Some(layers)) = (
            self.streams.get_mut(key).and_then(Option::as_mut),
            self.layers.get_mut(key).and_then(Option::as_mut),
        ) {
            let _ = layers.write_out(|bytes| stream.write(bytes));
        }
        self.linger(key);
    }

    /// Writes what the layers still hold, then encodes and writes the engine's output
    /// chunk by chunk; closes the connection the engine is done with (after the layers'
    /// goodbye: WebSocket Close, TLS close_notify).
    pub(super) fn flush_layered(&mut self, key: ConnKey) {
        let (Some(stream), Some(layers)) = (
            self.streams.get_mut(key).and_then(Option::as_mut),
            self.layers.get_mut(key).and_then(Option::as_mut),
        ) else {
            return;
        };
        let mut engine = self.engine.borrow_mut();
        let (mut blocked, mut failed) = match layers.write_out(|bytes| stream.write(bytes)) {
            Ok(done) => (!done, false),
            Err(_) => (false, true),
        };
        let mut taken = 0;
        while !blocked && !failed {
            let Some(out) = engine.output(key).filter(|out| !out.is_empty()) else {
                break;
            };
            self.encoded.clear();
            let n = match layers.encode(out, &mut self.encoded, &mut self.mid) {
                Ok(0) => break, // a handshake is still going on
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(conn = key, "encoding output: {e}");
                    failed = true;
                    break;
                }
            };
            out.advance(n);
            taken += n;
            match write_all(stream, &self.encoded) {
                Ok(written) if written == self.encoded.len() => {}
                Ok(written) => {
                    layers.out.extend_from_slice(&self.encoded[written..]);
                    blocked = true;
                }
                Err(e) => {
                    tracing::debug!(conn = key, "write error: {e}");
                    failed = true;
                }
            }
        }
        if taken > 0 {
            engine.output_flushed(key, taken);
        }
        let drained = !blocked && engine.output(key).is_none_or(|out| out.is_empty());
        let closing = engine.is_closing(key);
        let abort = engine.should_abort(key);
        let resumed = engine.take_read_resumed(key);
        drop(engine);
        if resumed {
            self.unfinished_reads.push(key);
        }
        if failed || (closing && abort) {
            self.close(key);
        } else if closing && drained {
            layers.queue_close();
            let _ = layers.write_out(|bytes| stream.write(bytes));
            self.linger(key);
        } else if blocked {
            self.account(key);
        }
    }
}

/// Writes `bytes` until done or the socket is full; returns how many were written.
fn write_all(stream: &mut mio::net::TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut at = 0;
    while at < bytes.len() {
        match stream.write(&bytes[at..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}
