//! The Redis keys mqttd uses, and how nodes and routes are written in them.
//!
//! Per-node keys share a hash tag (`{h.s}`), so on a Redis Cluster a node's liveness key,
//! route set and inbox live in one slot.
//!
//! | key                   | type   | holds                                                 |
//! |-----------------------|--------|-------------------------------------------------------|
//! | `P:nodes`             | set    | every registered worker, as `host.slot`               |
//! | `P:{h.s}:alive`       | string | the worker's pid; expires unless refreshed (liveness)  |
//! | `P:{h.s}:routes`      | set    | the worker's routes (encoded mesh `RouteAdd` frames)  |
//! | `P:{h.s}:in`          | stream | messages for the worker, a batch of frames an entry   |
//! | `P:{h.s}:sessions`    | set    | client ids of the stored sessions the worker owns     |
//! | `P:log`               | stream | route, retained and membership changes, in order      |
//! | `P:retained`          | hash   | topic → retained message (an encoded frame)           |
//! | `P:owner:{client id}` | hash   | `owner` (`host.slot`) and `epoch` of a client id       |
//! | `P:session:{client id}` | hash | a persistent session: `meta`, and `m<seq>` per message  |

use crate::model::NodeId;

#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
    pub nodes: String,
    pub log: String,
    pub retained: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
            nodes: format!("{prefix}:nodes"),
            log: format!("{prefix}:log"),
            retained: format!("{prefix}:retained"),
        }
    }

    pub fn alive(&self, node: NodeId) -> String {
        format!("{}:{{{}}}:alive", self.prefix, name(node))
    }

    pub fn routes(&self, node: NodeId) -> String {
        format!("{}:{{{}}}:routes", self.prefix, name(node))
    }

    pub fn owner(&self, client_id: &str) -> String {
        format!("{}:owner:{{{client_id}}}", self.prefix)
    }

    /// Same hash tag as [`Keys::owner`]: a script may check the owner and write the
    /// session at once, on a Redis Cluster too.
    pub fn session(&self, client_id: &str) -> String {
        format!("{}:session:{{{client_id}}}", self.prefix)
    }

    pub fn sessions(&self, node: NodeId) -> String {
        format!("{}:{{{}}}:sessions", self.prefix, name(node))
    }

    pub fn inbox(&self, node: NodeId) -> String {
        format!("{}:{{{}}}:in", self.prefix, name(node))
    }
}

/// `host.slot`, as nodes are named in Redis.
pub(super) fn name(node: NodeId) -> String {
    format!("{}.{}", node.host, node.slot)
}

pub(super) fn parse_name(s: &[u8]) -> Option<NodeId> {
    let s = std::str::from_utf8(s).ok()?;
    let (host, slot) = s.split_once('.')?;
    Some(NodeId {
        host: host.parse().ok()?,
        slot: slot.parse().ok()?,
    })
}

/// The host id when `redis.host_id` is 0: the host name and the TCP port, hashed
/// (FNV-1a), never 0 (the embedded backend's host).
pub(super) fn derived_host_id(port: u16) -> u32 {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let len = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if len == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        &buf[..end]
    } else {
        &b"localhost"[..]
    };
    let mut hash: u32 = 0x811c_9dc5;
    for byte in host.iter().chain(&port.to_le_bytes()) {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_share_a_hash_tag() {
        let node = NodeId { host: 77, slot: 3 };
        assert_eq!(parse_name(name(node).as_bytes()), Some(node));
        let keys = Keys::new("m");
        assert_eq!(keys.inbox(node), "m:{77.3}:in");
        assert_eq!(keys.routes(node), "m:{77.3}:routes");
        assert_ne!(derived_host_id(1883), 0);
        assert_ne!(derived_host_id(1883), derived_host_id(1884));
    }
}
