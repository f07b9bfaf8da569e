//! The supervisor's part of MQTT over QUIC: the certificate and one UDP socket per slot.

use std::net::SocketAddr;

use anyhow::Context;
use mqttd_broker::config::Config;
use mqttd_broker::transport::quic::cert;

pub struct QuicSockets {
    /// The bound address (a concrete port when port 0 was asked for).
    pub addr: SocketAddr,
    pub sockets: Vec<std::net::UdpSocket>,
}

/// With `quic.enabled`: writes the self-signed certificate if none is configured, and binds
/// one SO_REUSEPORT UDP socket per worker slot. Port 0: the first bind picks the port, the
/// others join it. No extra "reservation" socket as for TCP: a bound UDP socket in the
/// group would receive its share of datagrams and never read them.
pub fn prepare(config: &Config, slots: u16) -> anyhow::Result<Option<QuicSockets>> {
    if !config.quic.enabled {
        return Ok(None);
    }
    let path = cert::prepare(&config.quic)?;
    if config.quic.cert.is_empty() {
        tracing::info!(cert = %path.display(), "QUIC: self-signed certificate");
    }
    let bind = config.quic.bind;
    let first =
        mqttd_broker::worker::bind_udp(bind).with_context(|| format!("binding udp {bind}"))?;
    let addr = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..slots {
        sockets.push(
            mqttd_broker::worker::bind_udp(addr).with_context(|| format!("binding udp {addr}"))?,
        );
    }
    Ok(Some(QuicSockets { addr, sockets }))
}
