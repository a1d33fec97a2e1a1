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
    /// Live, being taken out of service: its agent runs the drain hook.
    Draining,
    /// Live and out of service (route withdrawn) until resumed.
    Drained,
}

impl NodeState {
    /// Every state, in declaration order.
    pub const ALL: [NodeState; 8] = [
        NodeState::Connected,
        NodeState::Suspect,
        NodeState::Failed,
        NodeState::Terminating,
        NodeState::Terminated,
        NodeState::Left,
        NodeState::Draining,
        NodeState::Drained,
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
            NodeState::Draining => "draining",
            NodeState::Drained => "drained",
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
    /// What the agent said of its host's boot and its previous session.
    pub host: HostFacts,
}

/// What an agent says of its host and of how its previous session ended, so the
/// orchestrator tells a reboot from a blip. Empty from older agents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// The host's boot id (changes with every boot).
    pub boot_id: Option<String>,
    /// When the host booted.
    pub boot_time: Option<SystemTime>,
    /// Why the agent's previous session ended, as it saw it.
    pub last_disconnect: String,
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
    /// Maintenance, if the node is in it.
    pub maintenance: Option<MaintenanceSnapshot>,
    /// A drain in progress or done.
    pub drain: Option<DrainSnapshot>,
}

/// A node's maintenance, as queries show it.
#[derive(Debug, Clone, PartialEq)]
pub struct MaintenanceSnapshot {
    /// Why.
    pub reason: String,
    /// When it began.
    pub since: SystemTime,
    /// When the node went away, if it is away now.
    pub away_since: Option<SystemTime>,
    /// When a node still away is FAILED after all.
    pub fails_at: Option<SystemTime>,
}

/// A drain, as queries show it.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainSnapshot {
    /// Why.
    pub reason: String,
    /// When it was requested.
    pub requested_at: SystemTime,
    /// When an unfinished drain is given up.
    pub deadline: SystemTime,
    /// Whether the agent reported it done.
    pub completed: bool,
    /// The terminate that follows it, if any.
    pub then_terminate: Option<String>,
}

/// Why a failed node was out of service when it failed: the healer treats it
/// differently (DESIGN: "Taking nodes out of service").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutOfService {
    /// Drained: it carried no traffic, so it is not healed.
    Drained,
    /// In maintenance and away past `maintenance_max`: healed, but not counted
    /// towards a mass failure.
    Maintenance,
}

/// How many nodes may be disrupted (DRAINING, DRAINED or TERMINATING) at once
/// through drains and scale-downs: `max_disrupted_nodes`, a count (`2`) or a
/// percent of the live fleet (`"10%"`, rounded up, as Kubernetes rounds a
/// PodDisruptionBudget's maxUnavailable).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DisruptionBudget {
    /// At most this many nodes.
    Nodes(u32),
    /// At most this percent of the live nodes, rounded up.
    Percent(f64),
}

impl DisruptionBudget {
    /// Nodes that may be disrupted at once in a fleet of `live` nodes.
    pub fn allowed(self, live: usize) -> usize {
        match self {
            DisruptionBudget::Nodes(count) => count as usize,
            DisruptionBudget::Percent(percent) => (live as f64 * percent / 100.0).ceil() as usize,
        }
    }
}

impl fmt::Display for DisruptionBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisruptionBudget::Nodes(count) => write!(f, "{count}"),
            DisruptionBudget::Percent(percent) => write!(f, "{percent}%"),
        }
    }
}

impl std::str::FromStr for DisruptionBudget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if let Some(percent) = text.strip_suffix('%') {
            let percent: f64 = percent
                .trim()
                .parse()
                .map_err(|_| format!("{text:?} is not a percent like \"10%\""))?;
            if !(0.0..=100.0).contains(&percent) {
                return Err(format!("{text:?} is outside 0%..100%"));
            }
            return Ok(DisruptionBudget::Percent(percent));
        }
        text.parse()
            .map(DisruptionBudget::Nodes)
            .map_err(|_| format!("{text:?} is neither a node count (2) nor a percent (\"10%\")"))
    }
}

impl Serialize for DisruptionBudget {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            DisruptionBudget::Nodes(count) => serializer.serialize_u32(*count),
            DisruptionBudget::Percent(_) => serializer.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for DisruptionBudget {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(i64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Count(count) => u32::try_from(count)
                .map(DisruptionBudget::Nodes)
                .map_err(|_| serde::de::Error::custom(format!("{count} is not a node count"))),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
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
    /// Nodes with a live, healthy stream: CONNECTED, TERMINATING, DRAINING or
    /// DRAINED.
    pub active_nodes: u32,
    /// Active nodes in service: not draining or drained, not in maintenance.
    /// Fleet CPU is theirs, and scale-down never goes below `min_nodes` of them.
    pub in_service_nodes: u32,
    /// Nodes disrupted through drains and terminates (DRAINING, DRAINED,
    /// TERMINATING): what `max_disrupted_nodes` caps.
    pub disrupted_nodes: u32,
    /// How many may be disrupted at once now (the budget applied to the live fleet).
    pub disruption_allowed: u32,
    /// Nodes in maintenance.
    pub maintenance_nodes: u32,
    /// Mean latest CPU of in-service nodes that reported one.
    pub avg_cpu_usage: Option<f64>,
    /// In-service nodes that have not reported CPU yet (just connected).
    pub active_without_cpu: u32,
    /// Known nodes per state.
    pub nodes_by_state: BTreeMap<NodeState, u32>,
    /// Unexpected failures declared since start.
    pub unexpected_failures_total: u64,
    /// Expected terminations since start.
    pub graceful_terminations_total: u64,
    /// Per failure domain (only with `failure_domain_label`).
    pub domains: BTreeMap<String, DomainStats>,
    /// Which automation runs.
    pub automation: Automation,
}

/// One failure domain's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DomainStats {
    /// Known nodes per state.
    pub nodes_by_state: BTreeMap<NodeState, u32>,
    /// Nodes with a live, healthy stream.
    pub active_nodes: u32,
    /// Of them, in service.
    pub in_service_nodes: u32,
    /// Mean latest CPU of its in-service nodes that reported one.
    pub avg_cpu_usage: Option<f64>,
    /// How healing stands there (the budget and the guard are per domain).
    pub healing: crate::domain::healer::DomainHealing,
}

/// The failure domain a node with `labels` belongs to under `label`: `pop=fra1`,
/// `!pop` for nodes without it (they form one domain), the empty name (the whole
/// fleet) when no label is configured.
pub fn failure_domain(label: Option<&str>, labels: &BTreeMap<String, String>) -> String {
    match label {
        None => String::new(),
        Some(key) => match labels.get(key) {
            Some(value) => format!("{key}={value}"),
            None => format!("!{key}"),
        },
    }
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
    /// A drain mark (absent in records written before drains existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<PersistedDrain>,
    /// Maintenance (absent in records written before maintenance existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<PersistedMaintenance>,
    /// The host's boot id when last seen, so a reconnect after a restart still
    /// tells a reboot (absent from older agents and older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// A drain mark as persisted: a node drained before a restart or failover is
/// still out of service after it (its agent is told to drain again when it
/// reconnects, as its route may have come back with a reboot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistedDrain {
    /// Why.
    pub reason: String,
    /// Whether the agent had reported it done.
    pub completed: bool,
    /// The hook's time budget, seconds.
    pub timeout_seconds: f64,
    /// The terminate that follows it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then_terminate: Option<String>,
    /// The scale-down that terminate carries out, if it is one (absent from
    /// older records): its webhook goes out with the terminate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScaleDown>,
}

/// A scale-down carried out by a drain, then a terminate. Its `LOW_FLEET_CPU_LOAD`
/// webhook tells the provisioner a node is going, so it is queued when the
/// terminate is sent (the route withdrawn already), never when the scaler decided:
/// a provisioner that reclaims the machine at once must not cut it mid-drain, and
/// a drain that fails sends neither.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScaleDown {
    /// The node's CPU fraction when the scaler chose it (the webhook's
    /// `terminated_node_cpu_usage`: a drained node's own reading says little).
    pub cpu: f64,
}

/// Which automation runs: an operator may pause self-healing or scaling at run
/// time (`SetAutomation`); persisted, so a restart or a new leader keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Automation {
    /// Self-healing on.
    pub healing: bool,
    /// Scaling on.
    pub scaling: bool,
}

impl Default for Automation {
    fn default() -> Self {
        Self {
            healing: true,
            scaling: true,
        }
    }
}

/// Maintenance as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistedMaintenance {
    /// Why.
    pub reason: String,
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
        if let Some(drain) = &self.drain {
            drain.reason.hash(&mut hasher);
            drain.completed.hash(&mut hasher);
            drain.then_terminate.hash(&mut hasher);
            drain
                .scale_down
                .map(|scale_down| scale_down.cpu.to_bits())
                .hash(&mut hasher);
        }
        if let Some(maintenance) = &self.maintenance {
            maintenance.reason.hash(&mut hasher);
        }
        // A reboot is worth one write (an orchestrator restart's reconnect storm
        // changes no boot id), so a later reconnect can still be told apart.
        self.boot_id.hash(&mut hasher);
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
            drain: None,
            maintenance: None,
            boot_id: None,
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
        let mut drained = record(NodeState::Connected, "joined");
        drained.drain = Some(PersistedDrain {
            reason: "kernel patch".into(),
            completed: false,
            timeout_seconds: 60.0,
            then_terminate: None,
            scale_down: None,
        });
        let draining = drained.durable_digest();
        assert_ne!(joined, draining, "a drain mark is kept");
        drained.drain.as_mut().unwrap().completed = true;
        assert_ne!(draining, drained.durable_digest(), "so is its completion");
        let mut away = record(NodeState::Suspect, "rebooting");
        away.maintenance = Some(PersistedMaintenance {
            reason: "reboot".into(),
        });
        assert_ne!(joined, away.durable_digest(), "maintenance is kept");
    }

    #[test]
    fn disruption_budgets_parse_as_counts_or_percents_rounded_up() {
        assert_eq!("2".parse(), Ok(DisruptionBudget::Nodes(2)));
        assert_eq!(" 10% ".parse(), Ok(DisruptionBudget::Percent(10.0)));
        assert_eq!(DisruptionBudget::Percent(10.0).allowed(25), 3);
        assert_eq!(DisruptionBudget::Percent(10.0).allowed(20), 2);
        assert_eq!(DisruptionBudget::Percent(10.0).allowed(0), 0);
        assert_eq!(DisruptionBudget::Nodes(2).allowed(1), 2);
        for bad in ["", "-1", "ten", "150%", "x%"] {
            assert!(bad.parse::<DisruptionBudget>().is_err(), "{bad:?}");
        }
        let parsed: DisruptionBudget = serde_json::from_str("\"25%\"").unwrap();
        assert_eq!(parsed, DisruptionBudget::Percent(25.0));
        let parsed: DisruptionBudget = serde_json::from_str("3").unwrap();
        assert_eq!(parsed, DisruptionBudget::Nodes(3));
        assert!(serde_json::from_str::<DisruptionBudget>("-3").is_err());
    }
}
