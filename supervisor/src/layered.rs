//! The supervisor's part of the TLS and WebSocket listeners: a self-signed certificate
//! when TLS is on without one, and one SO_REUSEPORT listening socket per worker slot.

use std::net::SocketAddr;

use anyhow::Context;
use mqttd_broker::config::Config;
use mqttd_broker::transport::layer::Framing;
use mqttd_broker::transport::tls;

/// One enabled listener.
pub struct LayeredListener {
    pub framing: Framing,
    /// The bound address (a concrete port when port 0 was asked for).
    pub addr: SocketAddr,
    /// One per worker slot.
    pub sockets: Vec<std::net::TcpListener>,
}

/// Binds every enabled TLS and WebSocket listener, `slots` sockets each: the first bind
/// picks the port (port 0), the others join its SO_REUSEPORT group.
pub fn prepare(config: &Config, slots: u16) -> anyhow::Result<Vec<LayeredListener>> {
    let listeners = mqttd_broker::worker::layered_listeners(config);
    let tls_needed = listeners
        .iter()
        .any(|(f, enabled, _)| *enabled && matches!(f, Framing::Tls | Framing::Wss));
    if tls_needed && config.tls.cert.is_empty() {
        let (cert, key) = tls::cert_paths(&config.tls);
        mqttd_broker::transport::self_signed::ensure(&tls::cert_dir(&config.tls), &cert, &key)?;
        tracing::warn!(cert = %cert.display(), "TLS: no tls.cert configured, serving a self-signed certificate");
    }
    let backlog = config.listener.backlog;
    let mut bound = Vec::new();
    for (framing, enabled, addr) in listeners {
        if !enabled {
            continue;
        }
        let name = framing.name();
        let first = mqttd_broker::worker::bind_tcp(addr, backlog)
            .with_context(|| format!("binding {name} {addr}"))?;
        let addr = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..slots {
            sockets.push(
                mqttd_broker::worker::bind_tcp(addr, backlog)
                    .with_context(|| format!("binding {name} {addr}"))?,
            );
        }
        bound.push(LayeredListener {
            framing,
            addr,
            sockets,
        });
    }
    Ok(bound)
}
