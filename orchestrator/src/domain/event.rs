//! Fleet events: what the control plane saw and decided, in order, for every
//! consumer (logs, `WatchEvents`, `/api/v1/events`). Whoever owns a decision
//! publishes its event on the one [`crate::runtime::bus::EventBus`]: the fleet actor (node
//! lifecycle, healing), the scaling loop (scale decisions), the webhook sender
//! (deliveries).

use std::{net::IpAddr, time::SystemTime};

use crate::domain::node::{NodeId, NodeState};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// First connection of a node in this orchestrator run.
    NodeJoined,
    /// A known node opened a new session.
    NodeReconnected,
    /// A node became suspect.
    NodeSuspected,
    /// A suspect node spoke again on its live session.
    NodeRecovered,
    /// Declared failed unexpectedly.
    NodeFailed,
    /// A terminate was requested and sent.
    TerminateRequested,
    /// The node acknowledged its terminate.
    TerminateAcknowledged,
    /// An unacknowledged terminate passed its deadline.
    TerminateCancelled,
    /// Exited as told (expected).
    NodeTerminated,
    /// Left with a goodbye of its own.
    NodeLeft,
    /// An older session was ended by a newer one.
    SessionFenced,
    /// A node in a final state was dropped after the retention period.
    NodeForgotten,
    /// A replacement was requested for a failed node (webhook queued).
    SelfHealingRequested,
    /// A failed node was not healed because a limit held it (reason says which).
    SelfHealingHeld,
    /// The scaler decided to scale up or down (a hold is not an event).
    ScaleDecided,
    /// A webhook was delivered (the receiver answered 2xx).
    WebhookDelivered,
    /// A webhook delivery attempt failed; it will be retried.
    WebhookFailed,
    /// A webhook outlived `webhook_max_age` and was moved to the dead letters.
    WebhookDeadLettered,
    /// This orchestrator became the leader (first event of a term).
    LeaderElected,
    /// This orchestrator stopped leading (last event of a term).
    LeaderLost,
    /// A drain was requested and sent to the node.
    DrainRequested,
    /// The node's agent reported its drain done: DRAINED.
    NodeDrained,
    /// A drain failed (hook failed, or deadline passed): back in service.
    DrainFailed,
    /// A draining or drained node was returned to service.
    NodeResumed,
    /// The agent's resume hook failed: DRAINED again.
    ResumeFailed,
    /// The node entered maintenance.
    MaintenanceStarted,
    /// The node left maintenance.
    MaintenanceEnded,
    /// Much of a failure domain failed at once: one MASS_NODE_FAILURE alert, its
    /// failures held.
    MassNodeFailure,
    /// Healing or scaling was paused or resumed (`SetAutomation`).
    AutomationChanged,
}

impl EventKind {
    /// Every kind, for tests and exhaustive tables.
    pub const ALL: [EventKind; 29] = [
        EventKind::NodeJoined,
        EventKind::NodeReconnected,
        EventKind::NodeSuspected,
        EventKind::NodeRecovered,
        EventKind::NodeFailed,
        EventKind::TerminateRequested,
        EventKind::TerminateAcknowledged,
        EventKind::TerminateCancelled,
        EventKind::NodeTerminated,
        EventKind::NodeLeft,
        EventKind::SessionFenced,
        EventKind::NodeForgotten,
        EventKind::SelfHealingRequested,
        EventKind::SelfHealingHeld,
        EventKind::ScaleDecided,
        EventKind::WebhookDelivered,
        EventKind::WebhookFailed,
        EventKind::WebhookDeadLettered,
        EventKind::LeaderElected,
        EventKind::LeaderLost,
        EventKind::DrainRequested,
        EventKind::NodeDrained,
        EventKind::DrainFailed,
        EventKind::NodeResumed,
        EventKind::ResumeFailed,
        EventKind::MaintenanceStarted,
        EventKind::MaintenanceEnded,
        EventKind::MassNodeFailure,
        EventKind::AutomationChanged,
    ];
}

/// The node an event is about.
#[derive(Debug, Clone, PartialEq)]
pub struct EventNode {
    /// The node.
    pub id: NodeId,
    /// The node's IP.
    pub ip: IpAddr,
    /// The node's host name.
    pub hostname: String,
    /// The node's state after the event.
    pub state: NodeState,
    /// The node's labels (so watchers can filter by selector).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The webhook a delivery event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRef {
    /// The stable `webhook-id` (`msg_...`).
    pub id: String,
    /// The payload's `reason` (e.g. `UNEXPECTED_NODE_FAILURE`).
    pub reason: String,
    /// Which attempt this was, from 1.
    pub attempt: u32,
    /// The receiver's HTTP status, when it answered.
    pub http_status: Option<u16>,
}

/// What the scaler decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleDecision {
    /// Do nothing.
    Hold,
    /// Ask for more capacity.
    ScaleUp,
    /// Terminate the least loaded node.
    ScaleDown,
}

impl ScaleDecision {
    /// The decision as a word (logs, JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            ScaleDecision::Hold => "hold",
            ScaleDecision::ScaleUp => "scale_up",
            ScaleDecision::ScaleDown => "scale_down",
        }
    }
}

/// One event. Its sequence and time are stamped by the bus when published.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetEvent {
    /// Position in the bus's sequence; 0 until published.
    pub sequence: u64,
    /// Wall-clock time of the event.
    pub time: SystemTime,
    /// What happened.
    pub kind: EventKind,
    /// The node concerned, if one is.
    pub node: Option<EventNode>,
    /// Why, in words.
    pub reason: String,
    /// The webhook concerned (delivery events).
    pub webhook: Option<WebhookRef>,
    /// The decision (scale events).
    pub decision: Option<ScaleDecision>,
    /// The failure domain (mass-failure and healing events), e.g. `pop=fra1`.
    pub failure_domain: Option<String>,
    /// For NODE_RECONNECTED: whether the node rebooted since its previous
    /// session (None when either session did not say).
    pub rebooted: Option<bool>,
}

impl FleetEvent {
    /// An unpublished event about no node in particular.
    pub fn new(kind: EventKind, reason: String, time: SystemTime) -> Self {
        Self {
            sequence: 0,
            time,
            kind,
            node: None,
            reason,
            webhook: None,
            decision: None,
            failure_domain: None,
            rebooted: None,
        }
    }

    /// An unpublished event about a node.
    pub fn about_node(kind: EventKind, node: EventNode, reason: String, time: SystemTime) -> Self {
        Self {
            node: Some(node),
            ..Self::new(kind, reason, time)
        }
    }

    /// The node's id, if the event concerns one.
    pub fn node_id(&self) -> Option<NodeId> {
        self.node.as_ref().map(|node| node.id)
    }
}
