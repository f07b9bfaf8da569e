//! One mqttd worker: an MQTT 3.1.1 / 5.0 broker on one core.
//!
//! The path of a PUBLISH reads through the modules: [`transport`] (socket I/O) →
//! [`protocol`] (bytes to packets) → [`engine`] (session state, I/O-free) → [`router`]
//! (local subscriptions, retained) and [`cluster`] (other workers) → [`engine`] (each
//! subscriber's window and queue) → [`protocol`] → [`transport`]. [`worker`] assembles them.

pub mod cluster;
pub mod config;
pub mod engine;
pub mod histogram;
pub mod metrics;
pub mod model;
pub mod protocol;
pub mod router;
pub mod transport;
pub mod wake_queue;
pub mod worker;

pub use worker::Worker;
