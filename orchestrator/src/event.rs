//! Fleet events: what the registry reports happened, in order, for every consumer
//! (logs, `WatchEvents`, and later the healer and scaler).

use std::{net::IpAddr, time::SystemTime};

use crate::node::{NodeId, NodeState};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

/// One event about one node.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetEvent {
    /// Position in this run's event sequence, from 1; assigned when published.
    pub sequence: u64,
    /// Wall-clock time of the event.
    pub time: SystemTime,
    /// What happened.
    pub kind: EventKind,
    /// The node.
    pub node_id: NodeId,
    /// The node's IP.
    pub ip: IpAddr,
    /// The node's host name.
    pub hostname: String,
    /// The node's state after the event.
    pub state: NodeState,
    /// Why, in words.
    pub reason: String,
}
