//! Taking nodes out of service: drains, resumes and maintenance, within the
//! disruption budget. The registry's third input half (after the stream inputs in
//! the parent module and the timer in [`super::detector`]); same rules: sans-IO,
//! time passed in, effects queued.
//!
//! - **Drain.** `request_drain` marks the node DRAINING and queues `SendDrain`;
//!   its agent runs `--on-drain` (withdraws the route) and reports. Success:
//!   DRAINED. Failure, or the deadline passing first: DRAIN_FAILED, the node is
//!   CONNECTED again and its agent is told to resume (the hook may have withdrawn
//!   the route before it failed). A drain that precedes a terminate
//!   (`then_terminate`) sends the terminate once drained, and none if it fails.
//!   The mark outlives sessions: a drained node that reconnects is drained again.
//! - **Resume.** A draining or drained node is CONNECTED again at once and its
//!   agent runs `--on-resume`; a failing hook makes it DRAINED again
//!   (RESUME_FAILED): a node whose route could not be announced is out of service.
//! - **Maintenance.** A flag an operator sets and clears. While it is set, a
//!   node that goes away (stream ended, silent) is SUSPECT without counting
//!   towards FAILED, until it has been away `maintenance_max`; then it is FAILED
//!   after all. The detector applies it.
//! - **Budget.** Drains (and the drains before a terminate) are refused when
//!   `max_disrupted_nodes` nodes are already DRAINING, DRAINED or TERMINATING,
//!   unless forced.

use std::time::{Duration, Instant};

use crate::{
    domain::event::EventKind,
    domain::node::{DisruptionBudget, NodeId, NodeSnapshot, NodeState, PersistedDrain, SessionId},
    domain::registry::{Effect, Registry, SessionError, TerminateAccepted, TerminateError},
};

/// The longest deadline a drain may be given.
pub const MAX_DRAIN_DEADLINE: Duration = Duration::from_secs(3600);

/// Drains, maintenance, the disruption budget and the protect label.
#[derive(Debug, Clone, PartialEq)]
pub struct DisruptionConfig {
    /// The hook's time budget when a request names none (`drain_deadline`).
    pub drain_deadline: Duration,
    /// How long a node in maintenance may stay away before it is FAILED after all.
    pub maintenance_max: Duration,
    /// `max_disrupted_nodes`.
    pub budget: DisruptionBudget,
    /// A node carrying this label (key, value) is never chosen for scale-down.
    pub protect_label: Option<(String, String)>,
}

impl Default for DisruptionConfig {
    fn default() -> Self {
        Self {
            drain_deadline: Duration::from_secs(60),
            maintenance_max: Duration::from_secs(3600),
            budget: DisruptionBudget::Percent(10.0),
            protect_label: Some(("secbeat.io/protect".to_owned(), "true".to_owned())),
        }
    }
}

/// A drain in progress or done.
#[derive(Debug, Clone)]
pub(crate) struct DrainMark {
    pub(crate) reason: String,
    pub(crate) requested_at: Instant,
    pub(crate) deadline: Instant,
    /// The hook's time budget (a re-drain after a reconnect gets it again).
    pub(crate) timeout: Duration,
    pub(crate) completed: bool,
    /// The terminate reason to send once drained.
    pub(crate) then_terminate: Option<String>,
}

impl DrainMark {
    /// A persisted mark, as a restart or a new leader loads it. Its deadline
    /// starts now; the node is told to drain again when it reconnects.
    pub(crate) fn restored(drain: PersistedDrain, now: Instant) -> Self {
        let timeout = Duration::try_from_secs_f64(drain.timeout_seconds)
            .unwrap_or(MAX_DRAIN_DEADLINE)
            .min(MAX_DRAIN_DEADLINE);
        Self {
            reason: drain.reason,
            requested_at: now,
            deadline: now + timeout,
            timeout,
            completed: drain.completed,
            then_terminate: drain.then_terminate,
        }
    }
}

/// A node's maintenance.
#[derive(Debug, Clone)]
pub(crate) struct Maintenance {
    pub(crate) reason: String,
    pub(crate) since: Instant,
    /// When the node went away, while it is away.
    pub(crate) away_since: Option<Instant>,
}

/// A drain request, validated at the edge.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainRequest {
    /// Why.
    pub reason: String,
    /// The hook's time budget; None: `drain_deadline`.
    pub deadline: Option<Duration>,
    /// Go beyond the disruption budget.
    pub force: bool,
}

/// Why a drain (or a drain-then-terminate) cannot start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DrainError {
    /// The node id is not registered.
    #[error("node {0} is unknown")]
    NotFound(NodeId),
    /// No live stream to send the drain on.
    #[error("node {node} has no live stream (state {state}); only a connected node can be drained")]
    NotConnected {
        /// The node.
        node: NodeId,
        /// Its state.
        state: NodeState,
    },
    /// A terminate is already pending: there is nothing left to drain for.
    #[error("node {0} is already terminating")]
    Terminating(NodeId),
    /// The disruption budget is used up.
    #[error(
        "disruption budget used up: max_disrupted_nodes ({budget}) allows {allowed} of {live} live nodes to be DRAINING, DRAINED or TERMINATING at once, and {disrupted} are; wait, resume a node, or pass force"
    )]
    Budget {
        /// The configured budget.
        budget: DisruptionBudget,
        /// What it allows now.
        allowed: usize,
        /// Live nodes it was applied to.
        live: usize,
        /// Nodes disrupted now.
        disrupted: usize,
    },
}

impl From<TerminateError> for DrainError {
    fn from(error: TerminateError) -> Self {
        match error {
            TerminateError::NotFound(node) => DrainError::NotFound(node),
            TerminateError::NotConnected { node, state } => DrainError::NotConnected { node, state },
        }
    }
}

/// Why a resume or a maintenance change cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The node id is not registered.
    #[error("node {0} is unknown")]
    NotFound(NodeId),
    /// Resume of a node with no drain to undo.
    #[error("node {node} is not draining or drained (state {state}); nothing to resume")]
    NotDrained {
        /// The node.
        node: NodeId,
        /// Its state.
        state: NodeState,
    },
    /// Resume of a node with no live stream to send it on.
    #[error("node {node} has no live stream (state {state}); it is drained again when it reconnects")]
    NotConnected {
        /// The node.
        node: NodeId,
        /// Its state.
        state: NodeState,
    },
    /// Maintenance of a node that is gone.
    #[error("node {node} is {state}; maintenance applies to live nodes")]
    Ended {
        /// The node.
        node: NodeId,
        /// Its state.
        state: NodeState,
    },
}

/// A drain that began (or was already under way).
#[derive(Debug, Clone, PartialEq)]
pub struct DrainAccepted {
    /// The node after marking.
    pub node: NodeSnapshot,
    /// True when the node was already draining or drained (nothing new was sent).
    pub already_draining: bool,
    /// The hook's time budget.
    pub deadline: Duration,
}

/// What a drain-then-terminate did.
#[derive(Debug, Clone, PartialEq)]
pub enum DrainThenTerminate {
    /// The drain began; the terminate follows once the node is drained.
    Draining(DrainAccepted),
    /// The node was drained already (or terminating): the terminate was sent.
    Terminating(TerminateAccepted),
}

impl Registry {
    /// Nodes counted against the disruption budget now, and what it allows.
    fn budget_room(&self) -> (usize, usize, usize) {
        let disrupted = self.nodes.values().filter(|record| record.disrupted()).count();
        let live = self.live_count();
        (disrupted, self.config.disruption.budget.allowed(live), live)
    }

    /// Marks the node DRAINING and queues Drain on its live session.
    pub fn request_drain(
        &mut self,
        node: NodeId,
        request: DrainRequest,
        now: Instant,
    ) -> Result<DrainAccepted, DrainError> {
        self.start_drain(node, request, None, now)
    }

    /// Drains the node, then terminates it with `reason` once drained. A node
    /// drained already, or already terminating, is terminated at once.
    pub fn drain_then_terminate(
        &mut self,
        node: NodeId,
        reason: &str,
        request: DrainRequest,
        now: Instant,
    ) -> Result<DrainThenTerminate, DrainError> {
        let record = self.nodes.get(&node).ok_or(DrainError::NotFound(node))?;
        let drained = record.drain.as_ref().is_some_and(|drain| drain.completed);
        if drained || record.termination.is_some() {
            return Ok(DrainThenTerminate::Terminating(
                self.request_terminate(node, reason, now)?,
            ));
        }
        if let Some(drain) = self.nodes.get_mut(&node).and_then(|record| record.drain.as_mut()) {
            // Draining already: the terminate follows this drain.
            drain.then_terminate = Some(reason.to_owned());
        }
        self.start_drain(node, request, Some(reason.to_owned()), now)
            .map(DrainThenTerminate::Draining)
    }

    fn start_drain(
        &mut self,
        node: NodeId,
        request: DrainRequest,
        then_terminate: Option<String>,
        now: Instant,
    ) -> Result<DrainAccepted, DrainError> {
        let timeout = request
            .deadline
            .unwrap_or(self.config.disruption.drain_deadline)
            .min(MAX_DRAIN_DEADLINE);
        let record = self.nodes.get(&node).ok_or(DrainError::NotFound(node))?;
        let Some(session) = record.session else {
            return Err(DrainError::NotConnected {
                node,
                state: record.state,
            });
        };
        if record.drain.is_some() {
            let timeout = record.drain.as_ref().map_or(timeout, |drain| drain.timeout);
            return Ok(DrainAccepted {
                node: self.snapshot(node).expect("record exists"),
                already_draining: true,
                deadline: timeout,
            });
        }
        if record.termination.is_some() {
            return Err(DrainError::Terminating(node));
        }
        let (disrupted, allowed, live) = self.budget_room();
        if !request.force && disrupted >= allowed {
            return Err(DrainError::Budget {
                budget: self.config.disruption.budget,
                allowed,
                live,
                disrupted,
            });
        }
        let record = self.nodes.get_mut(&node).expect("checked above");
        record.drain = Some(DrainMark {
            reason: request.reason.clone(),
            requested_at: now,
            deadline: now + timeout,
            timeout,
            completed: false,
            then_terminate: then_terminate.clone(),
        });
        if record.state != NodeState::Suspect {
            record.state = record.live_state();
        }
        self.schedule(node, now);
        self.queue(Effect::SendDrain {
            node,
            session,
            reason: request.reason.clone(),
            deadline: timeout,
        });
        let mut said = format!("{} (deadline {:.0}s)", request.reason, timeout.as_secs_f64());
        if then_terminate.is_some() {
            said.push_str("; terminate follows once drained");
        }
        if request.force && disrupted >= allowed {
            said.push_str(&format!(
                "; forced beyond max_disrupted_nodes ({disrupted} of {allowed} disrupted)"
            ));
        }
        self.publish(node, EventKind::DrainRequested, said, now);
        Ok(DrainAccepted {
            node: self.snapshot(node).expect("record exists"),
            already_draining: false,
            deadline: timeout,
        })
    }

    /// The agent reported its drain hook's outcome.
    pub fn drain_result(
        &mut self,
        node: NodeId,
        session: SessionId,
        success: bool,
        detail: &str,
        now: Instant,
    ) -> Result<(), SessionError> {
        self.touch(node, session, now)?;
        let record = self.nodes.get_mut(&node).ok_or(SessionError::UnknownNode)?;
        // Late (after the deadline or a resume) or repeated: nothing to do.
        let Some(drain) = record.drain.as_mut().filter(|drain| !drain.completed) else {
            return Err(SessionError::NoDrainPending);
        };
        if !success {
            self.fail_drain(node, format!("the on-drain hook failed: {detail}"), now);
            return Ok(());
        }
        drain.completed = true;
        let then_terminate = drain.then_terminate.clone();
        if record.state != NodeState::Suspect {
            record.state = record.live_state();
        }
        self.publish(node, EventKind::NodeDrained, detail.to_owned(), now);
        if let Some(reason) = then_terminate {
            // Inside the budget already: this node is one of the disrupted.
            let _ = self.request_terminate(node, &reason, now);
        }
        Ok(())
    }

    /// Gives up a drain (the hook failed, or the deadline passed): the node is
    /// in service again, and its agent is told to resume, as the hook may have
    /// withdrawn the route before it failed. No terminate follows.
    pub(crate) fn fail_drain(&mut self, node: NodeId, mut reason: String, now: Instant) {
        let Some(record) = self.nodes.get_mut(&node) else {
            return;
        };
        let Some(drain) = record.drain.take() else {
            return;
        };
        if record.state != NodeState::Suspect {
            record.state = record.live_state();
        }
        if drain.then_terminate.is_some() {
            reason.push_str("; the terminate that was to follow is not sent");
        }
        let session = record.session;
        self.publish(node, EventKind::DrainFailed, reason.clone(), now);
        if let Some(session) = session {
            self.queue(Effect::SendResume {
                node,
                session,
                reason: format!("drain failed: {reason}"),
                deadline: drain.timeout,
            });
        }
    }

    /// Returns a draining or drained node to service: CONNECTED at once, and
    /// its agent runs `--on-resume`.
    pub fn resume(&mut self, node: NodeId, reason: &str, now: Instant) -> Result<NodeSnapshot, ServiceError> {
        let record = self.nodes.get_mut(&node).ok_or(ServiceError::NotFound(node))?;
        let state = record.state;
        let Some(drain) = &record.drain else {
            return Err(ServiceError::NotDrained { node, state });
        };
        let Some(session) = record.session.filter(|_| record.ended_at.is_none()) else {
            return Err(ServiceError::NotConnected { node, state });
        };
        if record.termination.is_some() {
            return Err(ServiceError::NotDrained { node, state });
        }
        let deadline = drain.timeout;
        record.drain = None;
        if record.state != NodeState::Suspect {
            record.state = record.live_state();
        }
        self.schedule(node, now);
        self.queue(Effect::SendResume {
            node,
            session,
            reason: reason.to_owned(),
            deadline,
        });
        self.publish(node, EventKind::NodeResumed, reason.to_owned(), now);
        Ok(self.snapshot(node).expect("record exists"))
    }

    /// The agent reported its resume hook's outcome. A failure puts the node
    /// out of service again (DRAINED): its route could not be announced.
    pub fn resume_result(
        &mut self,
        node: NodeId,
        session: SessionId,
        success: bool,
        detail: &str,
        now: Instant,
    ) -> Result<(), SessionError> {
        self.touch(node, session, now)?;
        if success {
            return Ok(());
        }
        let timeout = self.config.disruption.drain_deadline;
        let record = self.nodes.get_mut(&node).ok_or(SessionError::UnknownNode)?;
        if record.drain.is_none() {
            record.drain = Some(DrainMark {
                reason: format!("resume failed: {detail}"),
                requested_at: now,
                deadline: now,
                timeout,
                completed: true,
                then_terminate: None,
            });
        }
        if record.state != NodeState::Suspect {
            record.state = record.live_state();
        }
        let reason = format!("the on-resume hook failed: {detail}; the node stays out of service");
        self.publish(node, EventKind::ResumeFailed, reason, now);
        Ok(())
    }

    /// Puts a live node in maintenance or takes it out; says whether anything
    /// changed. Ending maintenance of a node that is away starts the normal
    /// failure count from now.
    pub fn set_maintenance(
        &mut self,
        node: NodeId,
        enabled: bool,
        reason: &str,
        now: Instant,
    ) -> Result<(NodeSnapshot, bool), ServiceError> {
        let record = self.nodes.get_mut(&node).ok_or(ServiceError::NotFound(node))?;
        if record.ended_at.is_some() {
            return Err(ServiceError::Ended {
                node,
                state: record.state,
            });
        }
        let changed = match (enabled, record.maintenance.is_some()) {
            (true, false) => {
                record.maintenance = Some(Maintenance {
                    reason: reason.to_owned(),
                    since: now,
                    away_since: (record.state == NodeState::Suspect).then_some(now),
                });
                self.publish(node, EventKind::MaintenanceStarted, reason.to_owned(), now);
                true
            }
            (false, true) => {
                record.maintenance = None;
                if record.state == NodeState::Suspect {
                    record.suspect_checks = 0;
                    record.state_reason = format!("{}; maintenance ended while away", record.state_reason);
                }
                self.publish(node, EventKind::MaintenanceEnded, reason.to_owned(), now);
                true
            }
            _ => false,
        };
        self.schedule(node, now);
        Ok((self.snapshot(node).expect("record exists"), changed))
    }
}
