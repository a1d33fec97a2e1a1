//! Domain types for nodes and their lifecycle, free of wire and transport types.

use std::{collections::BTreeMap, fmt, net::IpAddr, time::SystemTime};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A node's stable identity (the agent keeps it across restarts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub Uuid);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One agent stream. Unique within one orchestrator run; never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a node is in its lifecycle (see DESIGN.md, "Node lifecycle"). Persisted
/// by its lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Live stream, heartbeats on time.
    Connected,
    /// Stream broke without goodbye, or went silent; not yet declared failed.
    Suspect,
    /// Declared failed unexpectedly: self-healing applies.
    Failed,
    /// Told to terminate; its exit is expected once it acknowledges.
    Terminating,
    /// Exited as told (expected).
    Terminated,
    /// Left on its own with a goodbye (deliberate, not a failure).
    Left,
}

impl NodeState {
    /// Every state, in declaration order.
    pub const ALL: [NodeState; 6] = [
        NodeState::Connected,
        NodeState::Suspect,
        NodeState::Failed,
        NodeState::Terminating,
        NodeState::Terminated,
        NodeState::Left,
    ];

    /// Final states: the node has no stream and will not get one back without
    /// reconnecting as a new session.
    pub fn is_final(self) -> bool {
        matches!(self, NodeState::Failed | NodeState::Terminated | NodeState::Left)
    }

    /// Lowercase name for logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Connected => "connected",
            NodeState::Suspect => "suspect",
            NodeState::Failed => "failed",
            NodeState::Terminating => "terminating",
            NodeState::Terminated => "terminated",
            NodeState::Left => "left",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a node says about itself in its Hello, already validated at the edge.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// Stable identity.
    pub id: NodeId,
    /// Host name.
    pub hostname: String,
    /// The node's address: reported by the agent, else the connection's peer.
    pub ip: IpAddr,
    /// Agent version string.
    pub agent_version: String,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
}

/// A point-in-time copy of one node's record, for queries.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSnapshot {
    /// Identity and self-description.
    pub info: NodeInfo,
    /// Lifecycle state.
    pub state: NodeState,
    /// Why the node is in its state, if anything notable.
    pub state_reason: String,
    /// The live session, if any.
    pub session: Option<SessionId>,
    /// Latest CPU fraction of the current session.
    pub last_cpu_usage: Option<f64>,
    /// When the current (or last) session was accepted.
    pub connected_since: SystemTime,
    /// When the last message arrived.
    pub last_heartbeat: SystemTime,
    /// A pending or acknowledged terminate.
    pub termination: Option<TerminationSnapshot>,
}

/// A pending or acknowledged terminate, as queries show it.
#[derive(Debug, Clone, PartialEq)]
pub struct TerminationSnapshot {
    /// Why it was requested.
    pub reason: String,
    /// When it was requested.
    pub requested_at: SystemTime,
    /// Whether the node acknowledged it.
    pub acknowledged: bool,
    /// When an unacknowledged terminate is cancelled.
    pub deadline: SystemTime,
}

/// Fleet-wide figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetStats {
    /// Nodes with a live stream in CONNECTED or TERMINATING.
    pub active_nodes: u32,
    /// Mean latest CPU of active nodes that reported one.
    pub avg_cpu_usage: Option<f64>,
    /// Active nodes that have not reported CPU yet (just connected).
    pub active_without_cpu: u32,
    /// Known nodes per state.
    pub nodes_by_state: BTreeMap<NodeState, u32>,
    /// Unexpected failures declared since start.
    pub unexpected_failures_total: u64,
    /// Expected terminations since start.
    pub graceful_terminations_total: u64,
}

/// What of a node survives an orchestrator restart (the store keeps it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistedNode {
    /// Identity.
    pub id: NodeId,
    /// Host name.
    pub hostname: String,
    /// Address.
    pub ip: IpAddr,
    /// Agent version.
    pub agent_version: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Last lifecycle state.
    pub state: NodeState,
    /// Why it is in that state.
    pub state_reason: String,
    /// A terminating mark.
    pub termination: Option<PersistedTermination>,
}

impl PersistedNode {
    /// A digest of what a restart or a new leader needs of this node: identity,
    /// address, labels, terminate mark, and whether it was live (SUSPECT counts as
    /// live: a restored live node gets a reconnect grace either way) or how it
    /// ended, with why. Two records with the same digest need not both be written,
    /// so a reconnect storm, a suspicion that clears or a reworded reason costs no
    /// store write.
    pub fn durable_digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.id.hash(&mut hasher);
        self.hostname.hash(&mut hasher);
        self.ip.hash(&mut hasher);
        self.agent_version.hash(&mut hasher);
        self.labels.hash(&mut hasher);
        match self.state {
            NodeState::Connected | NodeState::Suspect => NodeState::Connected.hash(&mut hasher),
            ended => {
                ended.hash(&mut hasher);
                self.state_reason.hash(&mut hasher);
            }
        }
        if let Some(termination) = &self.termination {
            termination.reason.hash(&mut hasher);
            termination.acknowledged.hash(&mut hasher);
        }
        hasher.finish()
    }
}

/// A terminating mark as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistedTermination {
    /// Why it was requested.
    pub reason: String,
    /// Whether the node acknowledged it.
    pub acknowledged: bool,
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn record(state: NodeState, reason: &str) -> PersistedNode {
        PersistedNode {
            id: NodeId(uuid::Uuid::from_u128(7)),
            hostname: "edge-7".into(),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
            agent_version: "1".into(),
            labels: BTreeMap::new(),
            state,
            state_reason: reason.into(),
            termination: None,
        }
    }

    #[test]
    fn only_what_a_restart_needs_changes_the_durable_digest() {
        let joined = record(NodeState::Connected, "joined").durable_digest();
        assert_eq!(
            joined,
            record(NodeState::Connected, "reconnected").durable_digest()
        );
        assert_eq!(
            joined,
            record(NodeState::Suspect, "silent for 31 s").durable_digest()
        );
        assert_ne!(joined, record(NodeState::Failed, "silent").durable_digest());
        assert_ne!(
            record(NodeState::Failed, "silent").durable_digest(),
            record(NodeState::Failed, "stream broke").durable_digest(),
            "why it ended is kept"
        );
        let mut moved = record(NodeState::Connected, "joined");
        moved.ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 8));
        assert_ne!(joined, moved.durable_digest());
        let mut marked = record(NodeState::Terminating, "scale down");
        let unacknowledged = marked.clone();
        marked.termination = Some(PersistedTermination {
            reason: "scale down".into(),
            acknowledged: true,
        });
        assert_ne!(unacknowledged.durable_digest(), marked.durable_digest());
    }
}
