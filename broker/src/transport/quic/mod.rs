//! MQTT over QUIC (quinn-proto + rustls, ALPN `mqtt`), with no protocol logic of its own.
//!
//! Each worker runs one driver ([`driver`]) over a `quinn_proto::Endpoint` on its slot's
//! UDP socket (SO_REUSEPORT). For every connection the client's first bidirectional stream
//! is the MQTT session, exactly as over TCP. The driver is a transport driver of the engine
//! like the TCP reactor: each connection is an engine connection of its own
//! ([`Engine::accept_quic`]), fed and flushed by its relay ([`relay`]), so the engine, the
//! limits, keep-alive and takeover between TCP and QUIC are the engine's, unchanged. If the
//! client id lives on another worker, the relay hands a Unix socketpair end to that worker
//! over SCM_RIGHTS (as a TCP socket is handed over) and from then on pumps bytes between the
//! other end and the QUIC streams. Further client streams carry PUBLISH/SUBSCRIBE traffic
//! of the same session ([`mux`]).
//!
//! ```text
//! client ══QUIC══ driver: endpoint, connections, relays ── engine (this worker)
//!                  (one task per worker)        └─socketpair, via SCM_RIGHTS── the home
//!                                                 worker's TCP reactor ── its engine
//! ```

pub mod cert;
mod driver;
pub mod mux;
mod relay;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::Context;

use crate::config::{Config, Congestion};
use crate::engine::Engine;

pub use driver::Driver;
use driver::Phase;

/// The ALPN protocol id EMQX and its clients use for MQTT over QUIC.
pub const ALPN: &[u8] = b"mqtt";

/// The QUIC driver serving `config.quic` on `socket` (bound by the caller), registered with
/// `engine` as one of its drivers.
pub fn driver(
    config: &Config,
    socket: std::net::UdpSocket,
    engine: &mut Engine,
) -> anyhow::Result<Driver> {
    let tls = cert::server_tls(&config.quic)?;
    let mut crypto = quinn_proto::crypto::rustls::QuicServerConfig::try_from(tls)
        .context("TLS configuration unusable for QUIC")?;
    // A QUIC server needs nothing of rustls once the handshake is over (an option the
    // vendored quinn-proto adds): ~3.7 KB less per connection.
    crypto.release_tls_after_handshake(true);
    let mut server = quinn_proto::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport(config)?));
    let secret = shared_secret(config)?;
    let mut endpoint_config = quinn_proto::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &secret,
    )));
    let cid_key = u64::from_le_bytes(secret[..8].try_into().expect("32-byte digest"));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let server = Arc::new(server);
    let endpoint =
        quinn_proto::Endpoint::new(Arc::new(endpoint_config), Some(server.clone()), false, None);
    // Connections handed to this worker arrive as plain MQTT streams (socketpair relays)
    // and are the TCP reactor's: this driver adopts none.
    let id = engine.add_driver("quic", &[]);
    Driver::new(endpoint, server, socket, id).context("starting the QUIC driver")
}

/// The running driver, as the worker sees it.
pub struct Running {
    phase: tokio::sync::watch::Sender<Phase>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts `driver` as a task of the worker's `LocalSet`.
pub fn spawn(driver: Driver, engine: Rc<RefCell<Engine>>) -> Running {
    let (phase, receiver) = tokio::sync::watch::channel(Phase::Serving);
    let task = tokio::task::spawn_local(driver.run(engine, receiver));
    Running { phase, task }
}

impl Running {
    /// New connections are refused from now on; existing ones carry on.
    pub fn stop_accepting(&self) {
        self.phase.send_replace(Phase::NotAccepting);
    }

    /// Waits (bounded) for the relays to close their connections, closes the rest.
    pub async fn drain(self) {
        self.phase.send_replace(Phase::Draining);
        let _ = self.task.await;
    }
}

/// A secret every worker derives alike, from the TLS private key they all load. It keys
/// the connection-id check and the stateless-reset tokens, so a datagram that reaches the
/// wrong worker (the client's address changed and SO_REUSEPORT hashed it elsewhere) is
/// recognised as one of this broker's connections and answered with a stateless reset the
/// client accepts: the client reconnects at once instead of retransmitting until the idle
/// timeout (docs/QUIC.md, "Packets of one connection must reach the worker").
fn shared_secret(config: &Config) -> anyhow::Result<[u8; 32]> {
    let (_, key_path) = cert::paths(&config.quic);
    let pem =
        std::fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"mqttd QUIC endpoint secret\0");
    ctx.update(&pem);
    let mut secret = [0; 32];
    secret.copy_from_slice(ctx.finish().as_ref());
    Ok(secret)
}

/// Transport settings sized for many mostly idle connections (see `QuicConfig`).
fn transport(config: &Config) -> anyhow::Result<quinn_proto::TransportConfig> {
    let quic = &config.quic;
    let mut t = quinn_proto::TransportConfig::default();
    let idle = quic.idle_timeout(config.mqtt.max_keep_alive);
    t.max_idle_timeout(Some(
        idle.try_into()
            .context("quic.idle_timeout_secs too large")?,
    ));
    t.max_concurrent_bidi_streams(quic.max_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(quic.stream_receive_window.into());
    t.receive_window(quic.receive_window.into());
    t.send_window(quic.send_window);
    // MQTT uses no unreliable datagrams: announce none, buffer none.
    t.datagram_receive_buffer_size(None);
    t.datagram_send_buffer_size(0);
    // Full datagrams from the start (`quic.initial_mtu`, 1452 by default): fewer packets per
    // message for a busy subscriber (+4-5 points of TCP's throughput measured), and, the MTU
    // being at quinn-proto's discovery bound already, no probes after each handshake (which
    // cost ~15 % of handshakes per CPU-second). Discovery stays on to climb back after a
    // black-hole fallback to 1200. It was off while every connection had a transmit buffer
    // of its own, which the probes grew; the driver's is shared now.
    t.initial_mtu(quic.initial_mtu);
    // One connection ID in use and one spare for migration: each issued ID is an entry in
    // the endpoint's index and the connection's state (a setting the vendored quinn-proto adds).
    t.max_issued_connection_ids(2);
    let factory: Arc<dyn quinn_proto::congestion::ControllerFactory + Send + Sync> =
        match quic.congestion {
            Congestion::Cubic => Arc::new(quinn_proto::congestion::CubicConfig::default()),
            Congestion::Newreno => Arc::new(quinn_proto::congestion::NewRenoConfig::default()),
            Congestion::Bbr => Arc::new(quinn_proto::congestion::BbrConfig::default()),
        };
    t.congestion_controller_factory(factory);
    Ok(t)
}
