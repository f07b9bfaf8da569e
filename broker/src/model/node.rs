//! Naming a worker so that the name survives more than one host.

use std::fmt;

/// One worker in the cluster: the host it runs on and its slot there (`0..workers`). A slot
/// keeps its id across restarts of its process, so routes, sessions and handoffs address
/// the slot, not the process. The embedded backend has one host, [`NodeId::LOCAL_HOST`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    pub host: u32,
    pub slot: u16,
}

impl NodeId {
    /// The host of a broker that spans one machine.
    pub const LOCAL_HOST: u32 = 0;

    /// Slot `slot` on the local host.
    pub const fn local(slot: u16) -> NodeId {
        NodeId {
            host: NodeId::LOCAL_HOST,
            slot,
        }
    }
}

impl fmt::Display for NodeId {
    /// `slot` on the local host (how logs and `$SYS` have always named workers), else
    /// `host.slot`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host == NodeId::LOCAL_HOST {
            write!(f, "{}", self.slot)
        } else {
            write!(f, "{}.{}", self.host, self.slot)
        }
    }
}
