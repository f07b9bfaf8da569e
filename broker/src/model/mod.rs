//! The values the engine and the cluster backends exchange: messages, routes, node ids,
//! session images and counters. A leaf module: it imports neither side, so a backend
//! depends on these types and on the [`crate::cluster::Cluster`] interface, never on the
//! engine it serves.

mod message;
mod node;
mod route;
mod session_image;
mod stats;

pub use message::{Delivery, Message, SessionKey};
pub use node::NodeId;
pub use route::{Route, SharedTarget};
pub use session_image::{
    InflightImage, QueuedImage, SessionImage, StoreOp, SubscriptionImage, WillImage,
};
pub use stats::{StoreStats, WorkerStats, ROUND_TRIP_MICROS_BUCKETS};
