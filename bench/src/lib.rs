//! The reusable part of `mqttd-bench`: clients other crates' tests use too.

pub mod quic_client;
