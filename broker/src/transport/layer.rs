//! What lies between a stream socket and MQTT on the TLS and WebSocket listeners: TLS
//! ([`TlsSession`]), WebSocket ([`WsCodec`]) or both, as one I/O-free value per
//! connection that the readiness loop feeds socket bytes and MQTT bytes.
//!
//! The loop lends the buffers of the hot path (the socket bytes just read, the MQTT bytes
//! decoded, the encoded bytes to write) from its per-worker scratch space; a connection
//! keeps buffers of its own only for what is left over between two wake-ups (a partial
//! TLS record or frame header, output the socket would not take), and only while there is
//! some. An idle connection holds its protocol state and nothing else.

use std::rc::Rc;

use bytes::{Buf, BytesMut};

use super::tls::{TlsAcceptor, TlsSession, TlsStatus};
use super::ws::{WsCodec, WsConfig, WsError, WsStatus};

/// The protocol of a stream listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// MQTT straight on TCP: no layer at all.
    Plain,
    Tls,
    Ws,
    Wss,
}

impl Framing {
    pub fn from_name(name: &str) -> Option<Framing> {
        [Framing::Plain, Framing::Tls, Framing::Ws, Framing::Wss]
            .into_iter()
            .find(|f| f.name() == name)
    }

    /// The `transport` label of this listener's metrics and log lines.
    pub fn name(self) -> &'static str {
        match self {
            Framing::Plain => "tcp",
            Framing::Tls => "tls",
            Framing::Ws => "ws",
            Framing::Wss => "wss",
        }
    }
}

/// What a listener needs to give each connection its layers.
pub struct LayerFactory {
    pub framing: Framing,
    pub tls: Option<Rc<TlsAcceptor>>,
    pub ws: Option<Rc<WsConfig>>,
}

impl LayerFactory {
    /// Plain MQTT over TCP.
    pub fn plain() -> LayerFactory {
        LayerFactory {
            framing: Framing::Plain,
            tls: None,
            ws: None,
        }
    }

    /// A new connection's layers; `None` for plain TCP.
    pub fn layers(&self) -> Result<Option<Box<Layers>>, rustls::Error> {
        if self.framing == Framing::Plain {
            return Ok(None);
        }
        let tls = self
            .tls
            .as_ref()
            .map(|t| t.accept().map(Box::new))
            .transpose()?;
        let ws = self.ws.is_some().then(WsCodec::new);
        Ok(Some(Box::new(Layers {
            tls,
            ws,
            ws_config: self.ws.clone(),
            raw_in: BytesMut::new(),
            ws_in: BytesMut::new(),
            out: BytesMut::new(),
            identity_checked: false,
            close_queued: false,
        })))
    }
}

/// How decoding ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// More may come.
    Open,
    /// The client closed at the protocol level (close_notify, a WebSocket Close): write
    /// `out`, then close the connection.
    Finished,
    /// The client broke the protocol; the alert, HTTP error or Close frame that says so is
    /// in `out`: write it, then close the connection.
    Failed(Failure),
}

/// Why a connection's layers gave up (the `reason` label of
/// `mqttd_transport_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    TlsHandshake,
    Tls,
    WsUpgrade,
    WsProtocol,
}

impl Failure {
    pub const ALL: [Failure; 4] = [
        Failure::TlsHandshake,
        Failure::Tls,
        Failure::WsUpgrade,
        Failure::WsProtocol,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Failure::TlsHandshake => "tls_handshake",
            Failure::Tls => "tls",
            Failure::WsUpgrade => "ws_upgrade",
            Failure::WsProtocol => "ws_protocol",
        }
    }
}

/// One connection's layers.
pub struct Layers {
    /// Boxed: rustls's state is over 1 KiB inline, which a plain WebSocket connection
    /// must not pay for.
    tls: Option<Box<TlsSession>>,
    ws: Option<WsCodec>,
    ws_config: Option<Rc<WsConfig>>,
    /// Socket bytes not decodable yet (a partial TLS record, frame header or HTTP request).
    raw_in: BytesMut,
    /// Over TLS: decrypted bytes the WebSocket codec could not use yet.
    ws_in: BytesMut,
    /// Encoded bytes for the socket that it has not taken yet.
    pub out: BytesMut,
    identity_checked: bool,
    close_queued: bool,
}

/// Bytes of an established, idle TLS connection's rustls state: its 1 KiB connection
/// struct, two AEAD keys (~0.5 KiB each) and the key schedule kept for key updates
/// (measured: an idle TLS connection's RSS minus a plain one's, `bench/idle-layered.sh`,
/// less the layers' own struct).
pub const TLS_STATE_BYTES: usize = 3500;

/// Largest MQTT chunk encoded at once (bounds the encoded scratch; a TLS record is 16 KiB).
pub const ENCODE_CHUNK: usize = 64 * 1024;

impl Layers {
    /// Moves the bytes kept from the previous read in front of `raw` (about to be filled
    /// from the socket).
    pub fn prepare_read(&mut self, raw: &mut BytesMut) {
        raw.clear();
        if !self.raw_in.is_empty() {
            raw.extend_from_slice(&self.raw_in);
            self.raw_in = BytesMut::new();
        }
    }

    /// Decodes the socket bytes in `raw`, appending MQTT bytes to `plain`; protocol replies
    /// (handshake, 101, Pong) go to [`Layers::out`]. `mid` is scratch space.
    pub fn decode(
        &mut self,
        raw: &mut BytesMut,
        plain: &mut BytesMut,
        mid: &mut BytesMut,
    ) -> Decoded {
        let decoded = match (&mut self.tls, &mut self.ws) {
            (Some(tls), None) => tls_step(tls, raw, plain, &mut self.out),
            (None, Some(ws)) => {
                let config = self.ws_config.as_deref().expect("ws config");
                ws_step(ws.decode(config, raw, plain, &mut self.out))
            }
            (Some(tls), Some(ws)) => {
                mid.clear();
                if !self.ws_in.is_empty() {
                    mid.extend_from_slice(&self.ws_in);
                    self.ws_in = BytesMut::new();
                }
                let tls_state = tls_step(tls, raw, mid, &mut self.out);
                let config = self.ws_config.as_deref().expect("ws config");
                let mut replies = BytesMut::new();
                let ws_state = ws_step(ws.decode(config, mid, plain, &mut replies));
                if !mid.is_empty() {
                    self.ws_in = BytesMut::from(&mid[..]);
                }
                if !replies.is_empty() && tls.encode(&replies, &mut self.out).is_err() {
                    return Decoded::Failed(Failure::Tls);
                }
                match (tls_state, ws_state) {
                    (Decoded::Failed(f), _) | (_, Decoded::Failed(f)) => Decoded::Failed(f),
                    (Decoded::Finished, _) | (_, Decoded::Finished) => Decoded::Finished,
                    _ => Decoded::Open,
                }
            }
            (None, None) => Decoded::Open,
        };
        if !raw.is_empty() && decoded == Decoded::Open {
            self.raw_in = BytesMut::from(&raw[..]);
        }
        raw.clear();
        decoded
    }

    /// Encodes MQTT bytes from the front of `plain` into `encoded` (at most
    /// [`ENCODE_CHUNK`]). Returns how many were taken: none before the handshakes are done.
    pub fn encode(
        &mut self,
        plain: &[u8],
        encoded: &mut BytesMut,
        mid: &mut BytesMut,
    ) -> Result<usize, rustls::Error> {
        let plain = &plain[..plain.len().min(ENCODE_CHUNK)];
        match (&mut self.tls, &self.ws) {
            (Some(tls), None) => tls.encode(plain, encoded),
            (None, Some(ws)) if ws.is_open() => {
                ws.encode(plain, encoded);
                Ok(plain.len())
            }
            (Some(tls), Some(ws)) if ws.is_open() => {
                mid.clear();
                ws.encode(plain, mid);
                let taken = tls.encode(mid, encoded)?;
                // TLS takes all or nothing (nothing only before its handshake, and the
                // WebSocket one comes after it).
                Ok(if taken == mid.len() { plain.len() } else { 0 })
            }
            _ => Ok(0),
        }
    }

    /// Appends the orderly goodbye (WebSocket Close 1000, TLS close_notify) to `out`, once.
    pub fn queue_close(&mut self) {
        if std::mem::replace(&mut self.close_queued, true) {
            return;
        }
        let mut close = BytesMut::new();
        if let Some(ws) = &mut self.ws {
            ws.close(1000, &mut close);
        }
        match &mut self.tls {
            Some(tls) => {
                if !close.is_empty() {
                    let _ = tls.encode(&close, &mut self.out);
                }
                tls.close(&mut self.out);
            }
            None => self.out.extend_from_slice(&close),
        }
    }

    /// The client certificate's identity, once, when the TLS handshake has completed.
    pub fn take_identity(&mut self) -> Option<String> {
        let tls = self.tls.as_ref()?;
        if self.identity_checked || !tls.is_open() {
            return None;
        }
        self.identity_checked = true;
        tls.peer_identity()
    }

    /// Writes [`Layers::out`] with `write`; frees it once empty. Returns false when the
    /// socket would not take all of it.
    pub fn write_out(
        &mut self,
        mut write: impl FnMut(&[u8]) -> std::io::Result<usize>,
    ) -> std::io::Result<bool> {
        while !self.out.is_empty() {
            match write(&self.out) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out = BytesMut::new();
        Ok(true)
    }

    /// What this connection's layers cost: their state and whatever they buffer. The
    /// TLS state's heap part (keys, handshake remains) is not visible from here; it is
    /// counted as [`TLS_STATE_BYTES`], measured.
    pub fn footprint(&self) -> usize {
        let tls = if self.tls.is_some() {
            TLS_STATE_BYTES
        } else {
            0
        };
        std::mem::size_of::<Layers>()
            + tls
            + self.raw_in.capacity()
            + self.ws_in.capacity()
            + self.out.capacity()
    }
}

fn tls_step(
    tls: &mut TlsSession,
    raw: &mut BytesMut,
    plain: &mut BytesMut,
    out: &mut BytesMut,
) -> Decoded {
    let handshaking = !tls.is_open();
    // A panic inside rustls on one client's bytes must end that connection, not the
    // listener serving every other one.
    let decode = std::panic::AssertUnwindSafe(|| tls.decode(raw, plain, out));
    let result = std::panic::catch_unwind(decode)
        .unwrap_or_else(|_| Err(rustls::Error::General("rustls panicked".into())));
    match result {
        Ok(TlsStatus::Open) => Decoded::Open,
        Ok(TlsStatus::PeerClosed) => Decoded::Finished,
        Err(e) if handshaking => {
            tracing::info!("TLS handshake failed: {e}");
            Decoded::Failed(Failure::TlsHandshake)
        }
        Err(e) => {
            tracing::info!("TLS error: {e}");
            Decoded::Failed(Failure::Tls)
        }
    }
}

fn ws_step(result: Result<WsStatus, WsError>) -> Decoded {
    match result {
        Ok(WsStatus::Handshaking | WsStatus::Open) => Decoded::Open,
        Ok(WsStatus::Closed) => Decoded::Finished,
        Err(WsError::BadUpgrade(why)) => {
            tracing::info!("WebSocket upgrade refused: {why}");
            Decoded::Failed(Failure::WsUpgrade)
        }
        Err(WsError::Protocol(code, why)) => {
            tracing::info!(code, "WebSocket connection closed: {why}");
            Decoded::Failed(Failure::WsProtocol)
        }
    }
}
