//! The node registry: the single owner of every node's lifecycle state.
//!
//! It is sans-IO. Every input (a stream event, an operator request, a detector
//! tick) comes with the orchestrator's own monotonic `now`, taken at receipt, and
//! every output is queued as an [`Effect`] that the caller drains with
//! [`Registry::take_effects`] and carries out (publish an event, send a command to
//! a session, close a session). That makes the whole lifecycle testable with
//! fabricated instants and no runtime.
//!
//! The periodic dead-node check lives in [`crate::detector`].

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    event::{EventKind, FleetEvent},
    node::{FleetStats, NodeId, NodeInfo, NodeSnapshot, NodeState, SessionId, TerminationSnapshot},
};

/// The lifecycle parameters the registry and detector apply.
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleConfig {
    /// Silence after which a live node becomes suspect.
    pub heartbeat_timeout: Duration,
    /// Consecutive checks a node must stay suspect before it is declared failed.
    pub required_consecutive_failures: u32,
    /// How long a terminate may stay unacknowledged before it is cancelled.
    pub termination_deadline: Duration,
    /// The graceful-shutdown budget given to agents in Terminate.
    pub termination_grace_period: Duration,
    /// How long nodes in a final state stay listed before they are forgotten.
    pub node_retention: Duration,
}

/// Something the caller must do on the registry's behalf, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Publish this event (its `sequence` is still 0; the publisher numbers it).
    Publish(FleetEvent),
    /// Send Terminate down this session.
    SendTerminate {
        /// The node.
        node: NodeId,
        /// Its live session.
        session: SessionId,
        /// Why.
        reason: String,
        /// The graceful-shutdown budget.
        grace_period: Duration,
    },
    /// End this session from the orchestrator's side.
    CloseSession {
        /// The node.
        node: NodeId,
        /// The session to end.
        session: SessionId,
        /// Why.
        reason: CloseReason,
    },
}

/// Why the orchestrator ends a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer session for the same node id arrived.
    Fenced {
        /// The session that replaced it.
        by: SessionId,
    },
    /// The node was declared failed while its stream was still open (silent).
    DeclaredFailed,
    /// The node acknowledged a terminate and then went silent.
    TerminatedSilently,
}

/// An input that refers to a session that is no longer the node's live one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The node id is not registered.
    #[error("unknown node")]
    UnknownNode,
    /// The session was replaced or ended.
    #[error("session is no longer live")]
    Stale,
    /// A TerminateAck arrived although no terminate was ever sent.
    #[error("no terminate is pending")]
    NoTerminatePending,
}

/// Why a terminate request cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TerminateError {
    /// The node id is not registered.
    #[error("node {0} is unknown")]
    NotFound(NodeId),
    /// The node has no live stream to send the terminate on.
    #[error("node {node} has no live stream (state {state})")]
    NotConnected {
        /// The node.
        node: NodeId,
        /// Its state.
        state: NodeState,
    },
}

/// The outcome of a successful terminate request.
#[derive(Debug, Clone, PartialEq)]
pub struct TerminateAccepted {
    /// The node after marking.
    pub node: NodeSnapshot,
    /// True when a terminate was already pending (nothing new was sent).
    pub already_terminating: bool,
    /// The grace period given to the agent.
    pub grace_period: Duration,
}

/// Maps the monotonic clock to wall-clock time for display.
#[derive(Debug, Clone, Copy)]
struct TimeAnchor {
    instant: Instant,
    wall: SystemTime,
}

impl TimeAnchor {
    fn wall(&self, at: Instant) -> SystemTime {
        match at.checked_duration_since(self.instant) {
            Some(after) => self.wall + after,
            None => self.wall - self.instant.duration_since(at),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Termination {
    pub(crate) reason: String,
    pub(crate) requested_at: Instant,
    pub(crate) deadline: Instant,
    pub(crate) acknowledged: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct NodeRecord {
    pub(crate) info: NodeInfo,
    pub(crate) state: NodeState,
    pub(crate) state_reason: String,
    pub(crate) session: Option<SessionId>,
    pub(crate) connected_since: Instant,
    pub(crate) last_seen: Instant,
    pub(crate) last_cpu: Option<f64>,
    /// Detector checks this node has been suspect on, in a row.
    pub(crate) suspect_checks: u32,
    pub(crate) termination: Option<Termination>,
    /// The reason of a terminate cancelled at its deadline, so a late ack can revive it.
    pub(crate) cancelled_termination: Option<String>,
    /// When the node entered a final state.
    pub(crate) ended_at: Option<Instant>,
}

impl NodeRecord {
    /// The state a node with a live, healthy stream is in.
    pub(crate) fn live_state(&self) -> NodeState {
        if self.termination.is_some() {
            NodeState::Terminating
        } else {
            NodeState::Connected
        }
    }
}

/// The registry of every node the orchestrator knows.
#[derive(Debug)]
pub struct Registry {
    pub(crate) config: LifecycleConfig,
    pub(crate) nodes: HashMap<NodeId, NodeRecord>,
    next_session: u64,
    anchor: TimeAnchor,
    effects: Vec<Effect>,
    pub(crate) unexpected_failures_total: u64,
    pub(crate) graceful_terminations_total: u64,
}

impl Registry {
    /// An empty registry; `now` and `wall_now` anchor monotonic to wall time.
    pub fn new(config: LifecycleConfig, now: Instant, wall_now: SystemTime) -> Self {
        Self {
            config,
            nodes: HashMap::new(),
            next_session: 1,
            anchor: TimeAnchor {
                instant: now,
                wall: wall_now,
            },
            effects: Vec::new(),
            unexpected_failures_total: 0,
            graceful_terminations_total: 0,
        }
    }

    /// The lifecycle parameters in force.
    pub fn config(&self) -> &LifecycleConfig {
        &self.config
    }

    /// Drains the effects queued since the last call, oldest first.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Accepts a validated Hello as a new session, fencing any older session of the
    /// same node. A terminate still pending (unacknowledged, within its deadline) is
    /// sent again on the new session.
    pub fn connect(&mut self, info: NodeInfo, now: Instant) -> SessionId {
        let session = SessionId(self.next_session);
        self.next_session += 1;
        let id = info.id;
        let Some(record) = self.nodes.get_mut(&id) else {
            let record = NodeRecord {
                info,
                state: NodeState::Connected,
                state_reason: String::new(),
                session: Some(session),
                connected_since: now,
                last_seen: now,
                last_cpu: None,
                suspect_checks: 0,
                termination: None,
                cancelled_termination: None,
                ended_at: None,
            };
            self.nodes.insert(id, record);
            self.publish(id, EventKind::NodeJoined, String::new(), now);
            return session;
        };

        let previous_state = record.state;
        let fenced = record.session.replace(session);
        record.info = info;
        // An acknowledged terminate ended that life; a new session is a new one. An
        // unacknowledged one still stands until its deadline, so it is sent again.
        if record
            .termination
            .as_ref()
            .is_some_and(|t| t.acknowledged || now >= t.deadline)
        {
            record.termination = None;
        }
        let resend = record.termination.as_ref().map(|t| t.reason.clone());
        record.cancelled_termination = None;
        record.connected_since = now;
        record.last_seen = now;
        record.last_cpu = None;
        record.suspect_checks = 0;
        record.ended_at = None;
        record.state = record.live_state();
        record.state_reason.clear();

        if let Some(old) = fenced {
            self.effects.push(Effect::CloseSession {
                node: id,
                session: old,
                reason: CloseReason::Fenced { by: session },
            });
            self.publish(
                id,
                EventKind::SessionFenced,
                format!("session {old} replaced by session {session}"),
                now,
            );
        }
        self.publish(
            id,
            EventKind::NodeReconnected,
            format!("was {previous_state}"),
            now,
        );
        if let Some(reason) = resend {
            let grace_period = self.config.termination_grace_period;
            self.effects.push(Effect::SendTerminate {
                node: id,
                session,
                reason,
                grace_period,
            });
        }
        session
    }

    /// Records a heartbeat on `session`. A suspect node that speaks again recovers.
    pub fn heartbeat(&mut self, node: NodeId, session: SessionId, now: Instant) -> Result<(), SessionError> {
        self.touch(node, session, now)
    }

    /// Records the latest CPU fraction of `session` (already validated at the edge).
    pub fn cpu_sample(
        &mut self,
        node: NodeId,
        session: SessionId,
        usage: f64,
        now: Instant,
    ) -> Result<(), SessionError> {
        debug_assert!(
            (0.0..=1.0).contains(&usage),
            "cpu usage must be validated at the edge"
        );
        self.touch(node, session, now)?;
        if let Some(record) = self.nodes.get_mut(&node) {
            record.last_cpu = Some(usage);
        }
        Ok(())
    }

    /// The node acknowledged its terminate: its exit is expected from now on.
    pub fn terminate_ack(
        &mut self,
        node: NodeId,
        session: SessionId,
        now: Instant,
    ) -> Result<(), SessionError> {
        self.touch(node, session, now)?;
        let record = self.nodes.get_mut(&node).ok_or(SessionError::UnknownNode)?;
        match (&mut record.termination, record.cancelled_termination.take()) {
            (Some(termination), _) => termination.acknowledged = true,
            // A late ack after the deadline: the node is going, and says so; believe it.
            (None, Some(reason)) => {
                record.termination = Some(Termination {
                    reason,
                    requested_at: now,
                    deadline: now,
                    acknowledged: true,
                });
            }
            (None, None) => return Err(SessionError::NoTerminatePending),
        }
        record.state = record.live_state();
        self.publish(node, EventKind::TerminateAcknowledged, String::new(), now);
        Ok(())
    }

    /// The agent said goodbye: TERMINATED if it had been told to go, else LEFT.
    pub fn goodbye(
        &mut self,
        node: NodeId,
        session: SessionId,
        reason: &str,
        now: Instant,
    ) -> Result<(), SessionError> {
        self.touch(node, session, now)?;
        let record = self.nodes.get_mut(&node).ok_or(SessionError::UnknownNode)?;
        record.session = None;
        if record.termination.is_some() {
            self.finish_terminated(node, format!("goodbye: {reason}"), now);
        } else {
            self.finish(
                node,
                NodeState::Left,
                EventKind::NodeLeft,
                format!("goodbye: {reason}"),
                now,
            );
        }
        Ok(())
    }

    /// The session's stream ended (or broke) without a goodbye. An acknowledged
    /// terminate makes that the expected exit; anything else makes the node suspect.
    /// Ends of sessions that are no longer live (fenced, already closed) are ignored.
    pub fn stream_closed(&mut self, node: NodeId, session: SessionId, cause: &str, now: Instant) {
        let Some(record) = self.nodes.get_mut(&node) else {
            return;
        };
        if record.session != Some(session) {
            return;
        }
        record.session = None;
        if record.termination.as_ref().is_some_and(|t| t.acknowledged) {
            self.finish_terminated(node, format!("stream ended after terminate ack ({cause})"), now);
            return;
        }
        record.state = NodeState::Suspect;
        record.suspect_checks = 0;
        record.state_reason = format!("stream ended without goodbye ({cause})");
        let reason = record.state_reason.clone();
        self.publish(node, EventKind::NodeSuspected, reason, now);
    }

    /// Marks the node terminating and queues Terminate on its live session.
    pub fn request_terminate(
        &mut self,
        node: NodeId,
        reason: &str,
        now: Instant,
    ) -> Result<TerminateAccepted, TerminateError> {
        let grace_period = self.config.termination_grace_period;
        let deadline = now + self.config.termination_deadline;
        let record = self.nodes.get_mut(&node).ok_or(TerminateError::NotFound(node))?;
        let Some(session) = record.session else {
            return Err(TerminateError::NotConnected {
                node,
                state: record.state,
            });
        };
        if record.termination.is_some() {
            return Ok(TerminateAccepted {
                node: self.snapshot(node).expect("record exists"),
                already_terminating: true,
                grace_period,
            });
        }
        record.termination = Some(Termination {
            reason: reason.to_owned(),
            requested_at: now,
            deadline,
            acknowledged: false,
        });
        record.cancelled_termination = None;
        if record.state == NodeState::Connected {
            record.state = NodeState::Terminating;
        }
        self.effects.push(Effect::SendTerminate {
            node,
            session,
            reason: reason.to_owned(),
            grace_period,
        });
        self.publish(node, EventKind::TerminateRequested, reason.to_owned(), now);
        Ok(TerminateAccepted {
            node: self.snapshot(node).expect("record exists"),
            already_terminating: false,
            grace_period,
        })
    }

    /// A copy of one node's record.
    pub fn snapshot(&self, node: NodeId) -> Option<NodeSnapshot> {
        self.nodes.get(&node).map(|record| self.to_snapshot(record))
    }

    /// Copies of every node's record, ordered by node id.
    pub fn list(&self) -> Vec<NodeSnapshot> {
        let mut nodes: Vec<_> = self
            .nodes
            .values()
            .map(|record| self.to_snapshot(record))
            .collect();
        nodes.sort_by_key(|node| node.info.id);
        nodes
    }

    /// Fleet-wide figures.
    pub fn stats(&self) -> FleetStats {
        let mut stats = FleetStats {
            unexpected_failures_total: self.unexpected_failures_total,
            graceful_terminations_total: self.graceful_terminations_total,
            ..FleetStats::default()
        };
        let (mut cpu_sum, mut cpu_count) = (0.0, 0u32);
        for record in self.nodes.values() {
            *stats.nodes_by_state.entry(record.state).or_default() += 1;
            if matches!(record.state, NodeState::Connected | NodeState::Terminating) {
                stats.active_nodes += 1;
                if let Some(cpu) = record.last_cpu {
                    cpu_sum += cpu;
                    cpu_count += 1;
                }
            }
        }
        if cpu_count > 0 {
            stats.avg_cpu_usage = Some(cpu_sum / f64::from(cpu_count));
        }
        stats
    }

    /// Marks the node as alive at `now` if `session` is its live session.
    fn touch(&mut self, node: NodeId, session: SessionId, now: Instant) -> Result<(), SessionError> {
        let record = self.nodes.get_mut(&node).ok_or(SessionError::UnknownNode)?;
        if record.session != Some(session) {
            return Err(SessionError::Stale);
        }
        record.last_seen = now;
        if record.state == NodeState::Suspect {
            record.state = record.live_state();
            record.suspect_checks = 0;
            record.state_reason.clear();
            self.publish(
                node,
                EventKind::NodeRecovered,
                "spoke again on its live stream".into(),
                now,
            );
        }
        Ok(())
    }

    pub(crate) fn finish_terminated(&mut self, node: NodeId, reason: String, now: Instant) {
        self.graceful_terminations_total += 1;
        self.finish(
            node,
            NodeState::Terminated,
            EventKind::NodeTerminated,
            reason,
            now,
        );
    }

    /// Puts the node into a final state and publishes `kind`.
    pub(crate) fn finish(
        &mut self,
        node: NodeId,
        state: NodeState,
        kind: EventKind,
        reason: String,
        now: Instant,
    ) {
        debug_assert!(state.is_final());
        let Some(record) = self.nodes.get_mut(&node) else {
            return;
        };
        record.state = state;
        record.state_reason = reason.clone();
        record.session = None;
        record.suspect_checks = 0;
        record.termination = None;
        record.cancelled_termination = None;
        record.ended_at = Some(now);
        self.publish(node, kind, reason, now);
    }

    pub(crate) fn publish(&mut self, node: NodeId, kind: EventKind, reason: String, now: Instant) {
        let Some(record) = self.nodes.get(&node) else {
            return;
        };
        let event = FleetEvent {
            sequence: 0,
            time: self.anchor.wall(now),
            kind,
            node_id: node,
            ip: record.info.ip,
            hostname: record.info.hostname.clone(),
            state: record.state,
            reason,
        };
        self.effects.push(Effect::Publish(event));
    }

    pub(crate) fn queue(&mut self, effect: Effect) {
        self.effects.push(effect);
    }

    fn to_snapshot(&self, record: &NodeRecord) -> NodeSnapshot {
        NodeSnapshot {
            info: record.info.clone(),
            state: record.state,
            state_reason: record.state_reason.clone(),
            session: record.session,
            last_cpu_usage: record.last_cpu,
            connected_since: self.anchor.wall(record.connected_since),
            last_heartbeat: self.anchor.wall(record.last_seen),
            termination: record.termination.as_ref().map(|t| TerminationSnapshot {
                reason: t.reason.clone(),
                requested_at: self.anchor.wall(t.requested_at),
                acknowledged: t.acknowledged,
                deadline: self.anchor.wall(t.deadline),
            }),
        }
    }
}
