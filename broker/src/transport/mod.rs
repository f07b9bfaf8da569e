//! Thin drivers that move bytes between sockets and the [`crate::engine::Engine`]. They hold
//! no MQTT logic, so every transport (TCP, TLS, WebSocket, QUIC) shares it.

pub mod layer;
pub mod quic;
mod relay;
pub mod self_signed;
pub mod tcp;
pub mod tls;
pub mod ws;
