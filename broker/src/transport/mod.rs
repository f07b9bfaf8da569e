//! Thin drivers that move bytes between sockets and the [`crate::engine::Engine`]. They hold
//! no protocol logic, so every transport (TCP, QUIC; TLS and WebSocket later) shares it.

pub mod quic;
pub mod tcp;
