//! Thin drivers that move bytes between sockets and the [`crate::engine::Engine`]. They hold
//! no protocol logic, so every transport (TCP now; TLS, WebSocket and QUIC later) shares it.

pub mod tcp;
