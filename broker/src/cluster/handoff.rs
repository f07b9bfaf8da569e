//! A client connection moving to the worker that owns its client id.

use std::os::fd::OwnedFd;

use bytes::Bytes;

/// What a handed-over stream carries, so the receiving worker knows which driver adopts
/// it and how to read it. Travels in the handoff frame as one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StreamKind {
    /// MQTT packets as plain bytes on a stream socket: a TCP connection, or the worker end
    /// of a socketpair that relays a connection the sending worker keeps terminating (QUIC).
    Mqtt = 1,
}

impl StreamKind {
    pub fn from_u8(byte: u8) -> Option<StreamKind> {
        match byte {
            1 => Some(StreamKind::Mqtt),
            _ => None,
        }
    }
}

/// A connection on its way to another worker: the socket (its driver has let go of it)
/// and every byte read from it so far, which the receiving engine reads first.
#[derive(Debug)]
pub struct HandedStream {
    pub kind: StreamKind,
    pub socket: OwnedFd,
    /// The identity the client's transport proved where it arrived (a TLS client
    /// certificate's): the receiving engine uses it as if it had seen the certificate.
    pub identity: Option<Box<str>>,
    pub bytes: Bytes,
}

/// Why a handoff did not happen. Either way the stream comes back, so the driver can
/// flush the CONNACK that tells the client.
#[derive(Debug)]
pub enum HandoffError {
    /// The owning worker cannot be reached now: the client is refused as "server
    /// unavailable" and retries.
    Unreachable(HandedStream),
    /// The owner is on a host this backend does not pass connections to: the client is
    /// told to connect elsewhere (v5: "use another server", with the server reference
    /// when the backend knows one).
    Elsewhere {
        stream: HandedStream,
        server_reference: Option<String>,
    },
}
