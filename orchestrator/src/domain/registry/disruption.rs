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
//!   A scale-down is one ([`Registry::scale_down`]): its webhook is queued
//!   ([`Effect::ScaledDown`]) when its terminate is sent, so the provisioner never
//!   hears of a node still carrying traffic, nor of one whose drain failed.
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
    domain::node::{DisruptionBudget, NodeId, NodeSnapshot, NodeState, PersistedDrain, ScaleDown, SessionId},
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
    /// The label whose values are the failure domains (`pop`): the mass-failure
    /// guard and the hourly healing budget apply per domain.
    pub failure_domain_label: Option<String>,
}

impl Default for DisruptionConfig {
    fn default() -> Self {
        Self {
            drain_deadline: Duration::from_secs(60),
            maintenance_max: Duration::from_secs(3600),
            budget: DisruptionBudget::Percent(10.0),
            protect_label: Some(("secbeat.io/protect".to_owned(), "true".to_owned())),
            failure_domain_label: None,
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
    /// The scale-down that terminate carries out, if it is one.
    pub(crate) scale_down: Option<ScaleDown>,
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
            scale_down: drain.scale_down,
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
        self.start_drain(node, request, None, None, now)
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
        self.drain_then_terminate_as(node, reason, request, None, now)
    }

    /// A scale-down: [`Self::drain_then_terminate`], and [`Effect::ScaledDown`]
    /// when the terminate is sent (not before; not at all if the drain fails).
    pub fn scale_down(
        &mut self,
        node: NodeId,
        reason: &str,
        request: DrainRequest,
        scale_down: ScaleDown,
        now: Instant,
    ) -> Result<DrainThenTerminate, DrainError> {
        self.drain_then_terminate_as(node, reason, request, Some(scale_down), now)
    }

    fn drain_then_terminate_as(
        &mut self,
        node: NodeId,
        reason: &str,
        request: DrainRequest,
        scale_down: Option<ScaleDown>,
        now: Instant,
    ) -> Result<DrainThenTerminate, DrainError> {
        let record = self.nodes.get(&node).ok_or(DrainError::NotFound(node))?;
        let drained = record.drain.as_ref().is_some_and(|drain| drain.completed);
        if drained || record.termination.is_some() {
            let accepted = self.request_terminate(node, reason, now)?;
            if let Some(scale_down) = scale_down.filter(|_| !accepted.already_terminating) {
                self.scaled_down(node, scale_down);
            }
            return Ok(DrainThenTerminate::Terminating(accepted));
        }
        if let Some(drain) = self.nodes.get_mut(&node).and_then(|record| record.drain.as_mut()) {
            // Draining already: the terminate follows this drain (and a
            // scale-down's webhook stays with it, whoever asks again).
            drain.then_terminate = Some(reason.to_owned());
            drain.scale_down = scale_down.or(drain.scale_down);
        }
        self.start_drain(node, request, Some(reason.to_owned()), scale_down, now)
            .map(DrainThenTerminate::Draining)
    }

    /// A scale-down's terminate went out: its webhook may follow.
    fn scaled_down(&mut self, node: NodeId, scale_down: ScaleDown) {
        if let Some(record) = self.nodes.get(&node) {
            let ip = record.info.ip;
            self.queue(Effect::ScaledDown { node, ip, scale_down });
        }
    }

    fn start_drain(
        &mut self,
        node: NodeId,
        request: DrainRequest,
        then_terminate: Option<String>,
        scale_down: Option<ScaleDown>,
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
        record.drain = Some(Box::new(DrainMark {
            reason: request.reason.clone(),
            requested_at: now,
            deadline: now + timeout,
            timeout,
            completed: false,
            then_terminate: then_terminate.clone(),
            scale_down,
        }));
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
        let scale_down = drain.scale_down;
        if record.state != NodeState::Suspect {
            record.state = record.live_state();
        }
        self.publish(node, EventKind::NodeDrained, detail.to_owned(), now);
        if let Some(reason) = then_terminate {
            // Inside the budget already: this node is one of the disrupted.
            let sent = self
                .request_terminate(node, &reason, now)
                .is_ok_and(|accepted| !accepted.already_terminating);
            if let Some(scale_down) = scale_down.filter(|_| sent) {
                self.scaled_down(node, scale_down);
            }
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
        if drain.scale_down.is_some() {
            reason.push_str(", nor the scale-down's LOW_FLEET_CPU_LOAD webhook");
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
            record.drain = Some(Box::new(DrainMark {
                reason: format!("resume failed: {detail}"),
                requested_at: now,
                deadline: now,
                timeout,
                completed: true,
                then_terminate: None,
                scale_down: None,
            }));
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
                record.maintenance = Some(Box::new(Maintenance {
                    reason: reason.to_owned(),
                    since: now,
                    away_since: (record.state == NodeState::Suspect).then_some(now),
                }));
                // From now on the maintenance clock says how long it may be away.
                record.restart_grace_until = None;
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

#[cfg(test)]
mod tests {
    //! Drains, resumes and maintenance on fabricated instants.

    use std::{
        net::{IpAddr, Ipv4Addr},
        time::SystemTime,
    };

    use uuid::Uuid;

    use super::*;
    use crate::domain::{
        node::{NodeInfo, OutOfService},
        registry::{LifecycleConfig, TerminateError},
    };

    struct Fixture {
        registry: Registry,
        now: Instant,
    }

    fn config(budget: DisruptionBudget) -> LifecycleConfig {
        LifecycleConfig {
            heartbeat_timeout: Duration::from_secs(30),
            dead_node_check_interval: Duration::from_secs(10),
            required_consecutive_failures: 2,
            termination_deadline: Duration::from_secs(20),
            termination_grace_period: Duration::from_secs(5),
            node_retention: Duration::from_secs(600),
            disruption: DisruptionConfig {
                drain_deadline: Duration::from_secs(60),
                maintenance_max: Duration::from_secs(300),
                budget,
                protect_label: Some(("secbeat.io/protect".into(), "true".into())),
                failure_domain_label: None,
            },
        }
    }

    fn node(n: u128) -> NodeId {
        NodeId(Uuid::from_u128(n))
    }

    fn info(n: u128, labels: &[(&str, &str)]) -> NodeInfo {
        NodeInfo {
            id: node(n),
            hostname: format!("edge-{n}"),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, n as u8)),
            agent_version: "test".into(),
            labels: labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            host: Default::default(),
        }
    }

    fn drain(reason: &str) -> DrainRequest {
        DrainRequest {
            reason: reason.into(),
            deadline: None,
            force: false,
        }
    }

    impl Fixture {
        fn new(budget: DisruptionBudget) -> Self {
            let now = Instant::now();
            Self {
                registry: Registry::new(config(budget), now, SystemTime::UNIX_EPOCH),
                now,
            }
        }

        /// `count` connected nodes (ids 1..=count) with a CPU sample each.
        fn with_nodes(budget: DisruptionBudget, count: u128) -> (Self, Vec<SessionId>) {
            let mut f = Self::new(budget);
            let sessions = (1..=count).map(|n| f.join(n, &[], 0.5)).collect();
            f.registry.take_effects();
            (f, sessions)
        }

        fn join(&mut self, n: u128, labels: &[(&str, &str)], cpu: f64) -> SessionId {
            let session = self.registry.connect(info(n, labels), self.now);
            self.registry.cpu_sample(node(n), session, cpu, self.now).unwrap();
            session
        }

        fn advance(&mut self, secs: u64) {
            self.now += Duration::from_secs(secs);
        }

        fn check(&mut self) {
            self.registry.check(self.now);
        }

        fn state(&self, n: u128) -> NodeState {
            self.registry.snapshot(node(n)).expect("known").state
        }

        fn events(&mut self) -> Vec<EventKind> {
            self.registry
                .take_effects()
                .into_iter()
                .filter_map(|effect| match effect {
                    Effect::Publish(event) => Some(event.kind),
                    _ => None,
                })
                .collect()
        }

        /// Everything queued, events reduced to their kind.
        fn effects(&mut self) -> Vec<String> {
            self.registry
                .take_effects()
                .into_iter()
                .map(|effect| match effect {
                    Effect::Publish(event) => format!("{:?}", event.kind),
                    Effect::SendDrain { .. } => "SendDrain".into(),
                    Effect::SendResume { .. } => "SendResume".into(),
                    Effect::SendTerminate { .. } => "SendTerminate".into(),
                    Effect::CloseSession { .. } => "CloseSession".into(),
                    Effect::DetectorStalled { .. } => "DetectorStalled".into(),
                    Effect::ScaledDown { .. } => "ScaledDown".into(),
                })
                .collect()
        }
    }

    #[test]
    fn a_drain_sends_drain_and_a_reported_success_makes_the_node_drained_and_out_of_service() {
        let (mut f, sessions) = Fixture::with_nodes(DisruptionBudget::Nodes(5), 2);
        let accepted = f
            .registry
            .request_drain(node(1), drain("kernel patch"), f.now)
            .unwrap();
        assert!(!accepted.already_draining);
        assert_eq!(
            accepted.deadline,
            Duration::from_secs(60),
            "drain_deadline by default"
        );
        assert_eq!(accepted.node.state, NodeState::Draining);
        assert_eq!(f.effects(), ["SendDrain", "DrainRequested"]);
        assert_eq!(
            f.registry.stats().in_service_nodes,
            1,
            "a draining node carries no traffic"
        );
        assert_eq!(f.registry.stats().active_nodes, 2, "but is live");

        f.registry
            .drain_result(node(1), sessions[0], true, "route withdrawn", f.now)
            .unwrap();
        assert_eq!(f.state(1), NodeState::Drained);
        assert_eq!(f.events(), [EventKind::NodeDrained]);
        let stats = f.registry.stats();
        assert_eq!(stats.avg_cpu_usage, Some(0.5));
        assert_eq!((stats.in_service_nodes, stats.disrupted_nodes), (1, 1));
        assert_eq!(
            f.registry.least_loaded().unwrap().id,
            node(2),
            "never a drained node"
        );
        let again = f.registry.request_drain(node(1), drain("again"), f.now).unwrap();
        assert!(again.already_draining);
        assert!(f.effects().is_empty(), "nothing is sent twice");
        assert_eq!(
            f.registry.drain_result(node(1), sessions[0], true, "late", f.now),
            Err(SessionError::NoDrainPending)
        );
    }

    #[test]
    fn a_failed_hook_puts_the_node_back_in_service_and_tells_its_agent_to_resume() {
        let (mut f, sessions) = Fixture::with_nodes(DisruptionBudget::Nodes(5), 1);
        f.registry.request_drain(node(1), drain("x"), f.now).unwrap();
        f.effects();
        f.registry
            .drain_result(node(1), sessions[0], false, "exit status: 3", f.now)
            .unwrap();
        assert_eq!(f.state(1), NodeState::Connected);
        assert_eq!(f.effects(), ["DrainFailed", "SendResume"]);
        assert!(f.registry.snapshot(node(1)).unwrap().drain.is_none());
    }

    #[test]
    fn a_drain_not_reported_by_its_deadline_fails() {
        let (mut f, sessions) = Fixture::with_nodes(DisruptionBudget::Nodes(5), 1);
        let request = DrainRequest {
            deadline: Some(Duration::from_secs(15)),
            ..drain("x")
        };
        f.registry.request_drain(node(1), request, f.now).unwrap();
        f.effects();
        f.advance(10);
        f.registry.heartbeat(node(1), sessions[0], f.now).unwrap();
        f.check();
        assert_eq!(f.state(1), NodeState::Draining);
        f.advance(5);
        f.registry.heartbeat(node(1), sessions[0], f.now).unwrap();
        f.check();
        assert_eq!(f.state(1), NodeState::Connected);
        assert_eq!(f.effects(), ["DrainFailed", "SendResume"]);
    }

    #[test]
    fn drain_then_terminate_sends_the_terminate_only_once_drained() {
        let (mut f, sessions) = Fixture::with_nodes(DisruptionBudget::Nodes(5), 2);
        let started = f
            .registry
            .drain_then_terminate(node(1), "scale down", drain("before terminate"), f.now)
            .unwrap();
        assert!(matches!(started, DrainThenTerminate::Draining(_)));
        assert_eq!(f.effects(), ["SendDrain", "DrainRequested"]);
        f.registry
            .drain_result(node(1), sessions[0], true, "withdrawn", f.now)
            .unwrap();
        assert_eq!(
            f.effects(),
            ["NodeDrained", "SendTerminate", "TerminateRequested"]
        );
        assert_eq!(f.state(1), NodeState::Terminating);
        f.registry.terminate_ack(node(1), sessions[0], f.now).unwrap();
        f.registry
            .goodbye(node(1), sessions[0], "terminated", f.now)
            .unwrap();
        assert_eq!(f.state(1), NodeState::Terminated);

        // A failed drain sends no terminate at all.
        f.registry
            .drain_then_terminate(node(2), "scale down", drain("before terminate"), f.now)
            .unwrap();
        f.effects();
        f.registry
            .drain_result(node(2), sessions[1], false, "bgp down", f.now)
            .unwrap();
        let effects = f.effects();
        assert_eq!(effects, ["DrainFailed", "SendResume"]);
        assert_eq!(f.state(2), NodeState::Connected);

        // A node drained already is terminated at once.
        let (mut f, sessions) = Fixture::with_nodes(DisruptionBudget::Nodes(5), 1);
        f.registry.request_drain(node(1), drain("x"), f.now).unwrap();
        f.registry
            .drain_result(node(1), sessions[0], true, "ok", f.now)
            .unwrap();
        f.effects();
        let done = f
            .registry
            .drain_then_terminate(node(1), "retire", drain("x"), f.now)
            .unwrap();
        assert!(matches!(done, DrainThenTerminate::Terminating(_)));
        assert_eq!(f.effects(), ["SendTerminate", "TerminateRequested"]);
    }

    /// The `ScaledDown` effects queued since the last take: (node, ip, cpu).
    fn scaled_down(effects: Vec<Effect>) -> Vec<(NodeId, IpAddr, f64)> {
        effects
            .into_iter()
            .filter_map(|effect| match effect {
                Effect::ScaledDown { node, ip, scale_down } => Some((node, ip, scale_down.cpu)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_scale_down_says_so_when_its_terminate_is_sent_and_never_if_its_drain_fails() {
        let (mut f, sessions) = Fixture::with_nodes(DisruptionBudget::Nodes(5), 3);
        let chosen = ScaleDown { cpu: 0.07 };
        let started = f
            .registry
            .scale_down(node(1), "scale down", drain("before terminate"), chosen, f.now)
            .unwrap();
        assert!(matches!(started, DrainThenTerminate::Draining(_)));
        assert_eq!(
            f.effects(),
            ["SendDrain", "DrainRequested"],
            "nothing to say while draining"
        );
        f.registry
            .drain_result(node(1), sessions[0], true, "withdrawn", f.now)
            .unwrap();
        let effects = f.registry.take_effects();
        let terminate = effects
            .iter()
            .position(|effect| matches!(effect, Effect::SendTerminate { .. }))
            .expect("the terminate is sent");
        let said = effects
            .iter()
            .position(|effect| matches!(effect, Effect::ScaledDown { .. }))
            .expect("and the scale-down is said");
        assert!(terminate < said);
        assert_eq!(scaled_down(effects), [(node(1), info(1, &[]).ip, 0.07)]);
        // The agent's reconnect resends the terminate, not the scale-down.
        f.registry.stream_closed(node(1), sessions[0], "reset", f.now);
        f.registry.connect(info(1, &[]), f.now);
        assert_eq!(scaled_down(f.registry.take_effects()), []);

        // A failed drain: no terminate, no webhook, and the event says both.
        f.registry
            .scale_down(node(2), "scale down", drain("before terminate"), chosen, f.now)
            .unwrap();
        f.registry.take_effects();
        f.registry
            .drain_result(node(2), sessions[1], false, "bgp down", f.now)
            .unwrap();
        let effects = f.registry.take_effects();
        let failed = effects
            .iter()
            .find_map(|effect| match effect {
                Effect::Publish(event) if event.kind == EventKind::DrainFailed => Some(event.reason.clone()),
                _ => None,
            })
            .expect("DRAIN_FAILED");
        assert!(failed.contains("LOW_FLEET_CPU_LOAD"), "{failed}");
        assert_eq!(scaled_down(effects), []);
        // Nor when the drain's deadline passes.
        f.registry
            .scale_down(node(2), "scale down", drain("before terminate"), chosen, f.now)
            .unwrap();
        f.advance(61);
        f.check();
        let effects = f.registry.take_effects();
        assert!(
            effects.iter().any(
                |effect| matches!(effect, Effect::Publish(event) if event.kind == EventKind::DrainFailed)
            )
        );
        assert_eq!(scaled_down(effects), []);

        // A node drained already is terminated at once, and said at once.
        f.registry.request_drain(node(3), drain("x"), f.now).unwrap();
        f.registry
            .drain_result(node(3), sessions[2], true, "ok", f.now)
            .unwrap();
        f.registry.take_effects();
        f.registry
            .scale_down(node(3), "scale down", drain("x"), chosen, f.now)
            .unwrap();
        assert_eq!(scaled_down(f.registry.take_effects()).len(), 1);
        // A second ask while it terminates sends nothing new.
        f.registry
            .scale_down(node(3), "scale down", drain("x"), chosen, f.now)
            .unwrap();
        assert_eq!(scaled_down(f.registry.take_effects()), []);
    }

    #[test]
    fn a_scale_down_under_way_outlives_a_restart_and_says_so_at_the_new_leader() {
        let (mut f, sessions) = Fixture::with_nodes(DisruptionBudget::Nodes(5), 2);
        f.registry
            .scale_down(
                node(1),
                "scale down",
                drain("before terminate"),
                ScaleDown { cpu: 0.03 },
                f.now,
            )
            .unwrap();
        // An operator's drain-then-terminate of the same node keeps the webhook.
        f.registry
            .drain_then_terminate(node(1), "retire", drain("again"), f.now)
            .unwrap();
        let persisted = f.registry.persisted(node(1)).expect("known");
        let stored = persisted.drain.as_ref().expect("a drain mark");
        assert_eq!(stored.scale_down, Some(ScaleDown { cpu: 0.03 }));
        // What the store keeps reads back the same.
        let json = serde_json::to_string(&persisted).unwrap();
        let persisted: crate::domain::node::PersistedNode = serde_json::from_str(&json).unwrap();
        let others = f.registry.persisted(node(2)).expect("known");
        drop(sessions);

        let mut next = Fixture::new(DisruptionBudget::Nodes(5));
        next.registry
            .restore(vec![persisted, others], next.now, Duration::from_secs(60));
        let session = next.registry.connect(info(1, &[]), next.now);
        next.registry.connect(info(2, &[]), next.now);
        assert!(next.effects().contains(&"SendDrain".to_owned()), "drained again");
        next.registry
            .drain_result(node(1), session, true, "withdrawn", next.now)
            .unwrap();
        assert_eq!(
            scaled_down(next.registry.take_effects()),
            [(node(1), info(1, &[]).ip, 0.03)]
        );
        assert_eq!(next.state(1), NodeState::Terminating);
    }

    #[test]
    fn the_budget_refuses_a_third_drain_at_two_unless_forced() {
        let (mut f, _) = Fixture::with_nodes(DisruptionBudget::Nodes(2), 5);
        f.registry.request_drain(node(1), drain("a"), f.now).unwrap();
        f.registry.request_terminate(node(2), "operator", f.now).unwrap();
        let refused = f.registry.request_drain(node(3), drain("c"), f.now).unwrap_err();
        assert_eq!(
            refused,
            DrainError::Budget {
                budget: DisruptionBudget::Nodes(2),
                allowed: 2,
                live: 5,
                disrupted: 2
            }
        );
        assert!(
            refused.to_string().contains("max_disrupted_nodes (2)"),
            "{refused}"
        );
        assert_eq!(f.state(3), NodeState::Connected, "a refusal changes nothing");
        let forced = DrainRequest {
            force: true,
            ..drain("c")
        };
        f.registry.request_drain(node(3), forced, f.now).unwrap();
        assert_eq!(f.state(3), NodeState::Draining);
        // Scale-down goes through the same budget.
        let refused = f
            .registry
            .drain_then_terminate(node(4), "scale down", drain("x"), f.now)
            .unwrap_err();
        assert!(matches!(refused, DrainError::Budget { disrupted: 3, .. }));

        // A percent is of the live fleet, rounded up: 10% of 5 is 1.
        let (mut f, _) = Fixture::with_nodes(DisruptionBudget::Percent(10.0), 5);
        f.registry.request_drain(node(1), drain("a"), f.now).unwrap();
        assert!(f.registry.request_drain(node(2), drain("b"), f.now).is_err());
        assert_eq!(f.registry.stats().disruption_allowed, 1);
    }

    #[test]
    fn resume_returns_a_drained_node_to_service_and_a_failing_hook_drains_it_again() {
        let (mut f, sessions) = Fixture::with_nodes(DisruptionBudget::Nodes(5), 1);
        assert_eq!(
            f.registry.resume(node(1), "x", f.now).unwrap_err(),
            ServiceError::NotDrained {
                node: node(1),
                state: NodeState::Connected
            }
        );
        f.registry.request_drain(node(1), drain("x"), f.now).unwrap();
        f.registry
            .drain_result(node(1), sessions[0], true, "ok", f.now)
            .unwrap();
        f.effects();
        let resumed = f.registry.resume(node(1), "patched", f.now).unwrap();
        assert_eq!(resumed.state, NodeState::Connected);
        assert_eq!(f.effects(), ["SendResume", "NodeResumed"]);
        f.registry
            .resume_result(node(1), sessions[0], true, "announced", f.now)
            .unwrap();
        assert_eq!(f.state(1), NodeState::Connected);
        assert!(f.effects().is_empty());

        f.registry.request_drain(node(1), drain("x"), f.now).unwrap();
        f.registry
            .drain_result(node(1), sessions[0], true, "ok", f.now)
            .unwrap();
        f.registry.resume(node(1), "patched", f.now).unwrap();
        f.effects();
        f.registry
            .resume_result(node(1), sessions[0], false, "exit status: 4", f.now)
            .unwrap();
        assert_eq!(f.state(1), NodeState::Drained, "its route could not be announced");
        assert_eq!(f.events(), [EventKind::ResumeFailed]);
    }

    #[test]
    fn a_node_in_maintenance_may_vanish_and_come_back_without_failing() {
        let (mut f, sessions) = Fixture::with_nodes(DisruptionBudget::Nodes(5), 2);
        let (snapshot, changed) = f
            .registry
            .set_maintenance(node(1), true, "reboot", f.now)
            .unwrap();
        assert!(changed && snapshot.maintenance.is_some());
        assert_eq!(f.events(), [EventKind::MaintenanceStarted]);
        assert!(
            !f.registry
                .set_maintenance(node(1), true, "again", f.now)
                .unwrap()
                .1
        );
        assert_eq!(f.registry.stats().avg_cpu_usage, Some(0.5));
        assert_eq!(f.registry.stats().in_service_nodes, 1);
        let population = crate::domain::healer::Population { live: 1, suspect: 0 };
        assert_eq!(
            f.registry.mass_failure_population(),
            [(String::new(), population)].into()
        );

        f.registry.stream_closed(node(1), sessions[0], "killed", f.now);
        assert_eq!(f.state(1), NodeState::Suspect);
        for _ in 0..20 {
            f.advance(10);
            f.registry.heartbeat(node(2), sessions[1], f.now).unwrap();
            f.check();
        }
        assert_eq!(
            f.state(1),
            NodeState::Suspect,
            "200 s away is within maintenance_max"
        );
        let away = f.registry.snapshot(node(1)).unwrap().maintenance.unwrap();
        assert!(away.away_since.is_some() && away.fails_at.is_some());
        f.registry.take_effects();
        f.registry.connect(info(1, &[]), f.now);
        assert_eq!(f.state(1), NodeState::Connected);
        assert_eq!(f.events(), [EventKind::NodeReconnected]);
        assert_eq!(f.registry.stats().unexpected_failures_total, 0);
    }

    #[test]
    fn a_node_away_longer_than_maintenance_max_fails_once_as_out_of_service() {
        let (mut f, sessions) = Fixture::with_nodes(DisruptionBudget::Nodes(5), 1);
        f.registry
            .set_maintenance(node(1), true, "reboot", f.now)
            .unwrap();
        f.advance(31);
        f.check();
        assert_eq!(f.state(1), NodeState::Suspect, "silent, in maintenance");
        let _ = sessions;
        f.advance(268);
        f.check();
        assert_eq!(f.state(1), NodeState::Suspect, "away 299 s");
        f.advance(1);
        f.check();
        assert_eq!(f.state(1), NodeState::Failed);
        assert_eq!(
            f.registry.out_of_service(node(1)),
            Some(OutOfService::Maintenance)
        );
        f.advance(10);
        f.check();
        assert_eq!(f.registry.stats().unexpected_failures_total, 1, "once");
    }

    #[test]
    fn ending_maintenance_of_a_node_away_starts_the_normal_count() {
        let (mut f, sessions) = Fixture::with_nodes(DisruptionBudget::Nodes(5), 1);
        f.registry
            .set_maintenance(node(1), true, "reboot", f.now)
            .unwrap();
        f.registry.stream_closed(node(1), sessions[0], "killed", f.now);
        f.check();
        f.check();
        f.check();
        assert_eq!(f.state(1), NodeState::Suspect);
        let (_, changed) = f.registry.set_maintenance(node(1), false, "done", f.now).unwrap();
        assert!(changed);
        f.check();
        assert_eq!(f.state(1), NodeState::Suspect, "one check is not enough");
        f.check();
        assert_eq!(f.state(1), NodeState::Failed);
        assert_eq!(f.registry.out_of_service(node(1)), None, "healed as any failure");
    }

    #[test]
    fn a_drained_node_that_fails_is_out_of_service_and_a_reconnect_drains_it_again() {
        let (mut f, sessions) = Fixture::with_nodes(DisruptionBudget::Nodes(5), 1);
        f.registry.request_drain(node(1), drain("retire"), f.now).unwrap();
        f.registry
            .drain_result(node(1), sessions[0], true, "ok", f.now)
            .unwrap();
        f.registry.stream_closed(node(1), sessions[0], "killed", f.now);
        f.check();
        f.check();
        assert_eq!(f.state(1), NodeState::Failed);
        assert_eq!(f.registry.out_of_service(node(1)), Some(OutOfService::Drained));
        f.effects();
        f.registry.connect(info(1, &[]), f.now);
        assert_eq!(f.state(1), NodeState::Draining, "still taken out of service");
        assert_eq!(f.effects(), ["NodeReconnected", "SendDrain"]);
    }

    #[test]
    fn protected_nodes_and_nodes_out_of_service_are_never_scaled_down() {
        let mut f = Fixture::new(DisruptionBudget::Nodes(5));
        f.join(1, &[("secbeat.io/protect", "true")], 0.01);
        f.join(2, &[], 0.02);
        f.join(3, &[], 0.03);
        f.join(4, &[("secbeat.io/protect", "false")], 0.04);
        assert_eq!(f.registry.least_loaded().unwrap().id, node(2));
        f.registry.set_maintenance(node(2), true, "x", f.now).unwrap();
        assert_eq!(f.registry.least_loaded().unwrap().id, node(3));
        f.registry.request_drain(node(3), drain("x"), f.now).unwrap();
        assert_eq!(
            f.registry.least_loaded().unwrap().id,
            node(4),
            "protect=false protects nothing"
        );
    }

    #[test]
    fn maintenance_and_resume_of_gone_or_unknown_nodes_are_refused() {
        let (mut f, sessions) = Fixture::with_nodes(DisruptionBudget::Nodes(5), 1);
        assert_eq!(
            f.registry.set_maintenance(node(9), true, "x", f.now).unwrap_err(),
            ServiceError::NotFound(node(9))
        );
        f.registry
            .goodbye(node(1), sessions[0], "shutdown", f.now)
            .unwrap();
        assert!(matches!(
            f.registry.set_maintenance(node(1), true, "x", f.now),
            Err(ServiceError::Ended { .. })
        ));
        assert!(matches!(
            f.registry.request_drain(node(1), drain("x"), f.now),
            Err(DrainError::NotConnected { .. })
        ));
        assert_eq!(
            f.registry.request_drain(node(9), drain("x"), f.now).unwrap_err(),
            DrainError::NotFound(node(9))
        );
        let error: DrainError = TerminateError::NotFound(node(9)).into();
        assert_eq!(error, DrainError::NotFound(node(9)));
    }

    /// How to bring a fresh node 1 into each state, and one input that takes it
    /// out again: every state is reachable and leavable.
    #[test]
    fn every_state_is_reachable_and_leavable() {
        for target in NodeState::ALL {
            let (mut f, sessions) = Fixture::with_nodes(DisruptionBudget::Nodes(5), 1);
            let s = sessions[0];
            let id = node(1);
            match target {
                NodeState::Connected => {}
                NodeState::Suspect => f.registry.stream_closed(id, s, "reset", f.now),
                NodeState::Failed => {
                    f.registry.stream_closed(id, s, "reset", f.now);
                    f.check();
                    f.check();
                }
                NodeState::Terminating => {
                    f.registry.request_terminate(id, "x", f.now).unwrap();
                }
                NodeState::Terminated => {
                    f.registry.request_terminate(id, "x", f.now).unwrap();
                    f.registry.goodbye(id, s, "terminated", f.now).unwrap();
                }
                NodeState::Left => f.registry.goodbye(id, s, "shutdown", f.now).unwrap(),
                NodeState::Draining => {
                    f.registry.request_drain(id, drain("x"), f.now).unwrap();
                }
                NodeState::Drained => {
                    f.registry.request_drain(id, drain("x"), f.now).unwrap();
                    f.registry.drain_result(id, s, true, "ok", f.now).unwrap();
                }
            }
            assert_eq!(f.state(1), target, "reaching {target}");
            match target {
                NodeState::Connected | NodeState::Draining | NodeState::Drained | NodeState::Terminating => {
                    f.registry.stream_closed(id, s, "reset", f.now);
                }
                NodeState::Suspect | NodeState::Failed | NodeState::Terminated | NodeState::Left => {
                    f.registry.connect(info(1, &[]), f.now);
                }
            }
            assert_ne!(f.state(1), target, "leaving {target}");
        }
    }
}
