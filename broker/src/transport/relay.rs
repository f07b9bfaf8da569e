//! A TLS or WebSocket connection whose client id lives on another worker. Its layers'
//! state cannot move to another process (rustls has no way to import a session), so the
//! connection stays here and its MQTT bytes are relayed through a Unix socketpair whose
//! other end goes to the home worker like any handed-over TCP socket (as QUIC does).
//!
//! Each relay is a task of its own, not an entry in the readiness loop: relaying is the
//! uncommon path (a client resuming a session another worker holds), the task is a
//! plain copy loop, and an idle relay holds no buffer (they are taken per wake-up).

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt as _;

use super::layer::{Decoded, Layers};
use crate::cluster::StreamKind;
use crate::engine::{DriverId, Engine, PendingHandoff};

/// Bytes read per wake-up from either side.
const READ_CHUNK: usize = 16 * 1024;

/// Hands `handoff`'s connection to its home worker through a socketpair and starts the
/// relay. `Err` gives the connection back when the engine refused the client instead (its
/// CONNACK says why; the reactor flushes it). Without a socketpair (EMFILE) the client
/// is dropped, as a failed accept would.
pub(super) fn hand_off(
    engine: &Rc<RefCell<Engine>>,
    driver: DriverId,
    handoff: PendingHandoff,
    stream: mio::net::TcpStream,
    layers: Box<Layers>,
) -> Result<(), (mio::net::TcpStream, Box<Layers>)> {
    let key = handoff.key;
    let pair = UnixStream::pair().and_then(|(ours, theirs)| {
        ours.set_nonblocking(true)?;
        theirs.set_nonblocking(true)?;
        Ok((ours, theirs))
    });
    let engine_rc = engine;
    let mut engine = engine.borrow_mut();
    let (ours, theirs) = match pair {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!("handoff socketpair: {e}");
            engine.stats.accept_errors += 1;
            engine.connection_lost(key, Instant::now());
            return Ok(());
        }
    };
    match engine.hand_off(handoff, StreamKind::Mqtt, OwnedFd::from(theirs)) {
        Ok(()) => {
            let engine = Rc::clone(engine_rc);
            tokio::task::spawn_local(async move {
                let failure = Rc::new(std::cell::Cell::new(None));
                let result = relay(stream, layers, ours, failure.clone()).await;
                if let Some(reason) = failure.get() {
                    engine.borrow_mut().transport_error(driver, reason);
                }
                if let Err(e) = result {
                    tracing::debug!("relay ended: {e}");
                }
            });
            Ok(())
        }
        Err(_theirs) => Err((stream, layers)),
    }
}

/// Moves bytes both ways until either side closes; dropping both sockets then tells the
/// other side (the home worker reads EOF, as from a client that went away).
async fn relay(
    stream: mio::net::TcpStream,
    mut layers: Box<Layers>,
    home: UnixStream,
    failure: Rc<std::cell::Cell<Option<&'static str>>>,
) -> io::Result<()> {
    let mut client =
        tokio::net::TcpStream::from_std(std::net::TcpStream::from(OwnedFd::from(stream)))?;
    let mut home = tokio::net::UnixStream::from_std(home)?;
    client.write_all(&layers.out).await?;
    layers.out.clear();
    loop {
        tokio::select! {
            ready = client.readable() => {
                ready?;
                let mut raw = BytesMut::new();
                layers.prepare_read(&mut raw);
                raw.reserve(READ_CHUNK);
                let eof = match client.try_read_buf(&mut raw) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                    Err(e) => return Err(e),
                };
                let (mut plain, mut mid) = (BytesMut::new(), BytesMut::new());
                let decoded = layers.decode(&mut raw, &mut plain, &mut mid);
                home.write_all(&plain).await?;
                client.write_all(&layers.out).await?;
                layers.out = BytesMut::new();
                if let Decoded::Failed(f) = decoded {
                    failure.set(Some(f.name()));
                }
                if eof || decoded != Decoded::Open {
                    return Ok(());
                }
            }
            ready = home.readable() => {
                ready?;
                let mut from_home = BytesMut::with_capacity(READ_CHUNK);
                let eof = match home.try_read_buf(&mut from_home) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                    Err(e) => return Err(e),
                };
                let (mut encoded, mut mid) = (BytesMut::new(), BytesMut::new());
                while !from_home.is_empty() {
                    encoded.clear();
                    let n = layers.encode(&from_home, &mut encoded, &mut mid).map_err(io::Error::other)?;
                    if n == 0 {
                        break;
                    }
                    from_home.advance(n);
                    client.write_all(&encoded).await?;
                }
                if eof {
                    // The home worker closed the connection: the layers say goodbye.
                    layers.queue_close();
                    client.write_all(&layers.out).await?;
                    return Ok(());
                }
            }
        }
    }
}
