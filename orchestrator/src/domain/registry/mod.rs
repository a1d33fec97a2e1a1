//! The node registry: the single owner of every node's lifecycle state.
//!
//! It is sans-IO. Every input (a stream event, an operator request, a detector
//! tick) comes with the orchestrator's own monotonic `now`, taken at receipt, and
//! every output is queued as an [`Effect`] that the caller drains with
//! [`Registry::take_effects`] and carries out (publish an event, send a command to
//! a session, close a session). That makes the whole lifecycle testable with
//! fabricated instants and no runtime.
//!
//! Two halves, one state machine: this file takes the inputs (connects,
//! heartbeats, closes, goodbyes, terminates); [`detector`] holds the time-driven
//! transitions (the periodic dead-node check over a schedule of due nodes).

pub mod detector;
pub mod disruption;
pub mod liveness;

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap},
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    domain::event::{EventKind, EventNode, FleetEvent},
    domain::node::{
        DrainSnapshot, FleetStats, MaintenanceSnapshot, NodeId, NodeInfo, NodeSnapshot, NodeState,
        OutOfService, PersistedDrain, PersistedMaintenance, PersistedNode, PersistedTermination, ScaleDown,
        SessionId, TerminationSnapshot, failure_domain,
    },
    domain::selector::{NodeFilter, Page, Selector, SortKey},
};

pub use disruption::{
    DisruptionConfig, DrainAccepted, DrainError, DrainRequest, DrainThenTerminate, ServiceError,
};
pub use liveness::Liveness;

/// The lifecycle parameters the registry and detector apply.
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleConfig {
    /// Silence after which a live node becomes suspect.
    pub heartbeat_timeout: Duration,
    /// Period of the dead-node check (a check much later than this means the
    /// orchestrator itself stalled).
    pub dead_node_check_interval: Duration,
    /// Consecutive checks a node must stay suspect before it is declared failed.
    pub required_consecutive_failures: u32,
    /// How long a terminate may stay unacknowledged before it is cancelled.
    pub termination_deadline: Duration,
    /// The graceful-shutdown budget given to agents in Terminate.
    pub termination_grace_period: Duration,
    /// How long nodes in a final state stay listed before they are forgotten.
    pub node_retention: Duration,
    /// Drains, maintenance, the disruption budget and the protect label.
    pub disruption: DisruptionConfig,
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
    /// A dead-node check ran so late that the orchestrator itself must have stalled;
    /// that round judged nobody and live nodes got a fresh heartbeat window.
    DetectorStalled {
        /// Time since the previous check.
        gap: Duration,
    },
    /// Send Drain down this session.
    SendDrain {
        /// The node.
        node: NodeId,
        /// Its live session.
        session: SessionId,
        /// Why.
        reason: String,
        /// The hook's time budget.
        deadline: Duration,
    },
    /// Send Resume down this session.
    SendResume {
        /// The node.
        node: NodeId,
        /// Its live session.
        session: SessionId,
        /// Why.
        reason: String,
        /// The hook's time budget.
        deadline: Duration,
    },
    /// A scale-down's terminate was sent to this node (its drain done): the
    /// `LOW_FLEET_CPU_LOAD` webhook goes out now, in the same durable write as
    /// the node's terminate.
    ScaledDown {
        /// The node.
        node: NodeId,
        /// Its address.
        ip: IpAddr,
        /// What the scaler chose it with.
        scale_down: ScaleDown,
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

fn reconnect_hint(state: &NodeState) -> &'static str {
    if *state == NodeState::Suspect {
        "; it may reconnect"
    } else {
        ""
    }
}

/// Why the orchestrator ends a session; the words are what the agent is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// A newer session for the same node id arrived.
    #[error("fenced: a newer session ({by}) for this node id took over")]
    Fenced {
        /// The session that replaced it.
        by: SessionId,
    },
    /// The node was declared failed while its stream was still open (silent).
    #[error("node declared failed after missing heartbeats; reconnect to rejoin")]
    DeclaredFailed,
    /// The node acknowledged a terminate and then went silent.
    #[error("node terminated: silent after acknowledging")]
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
    /// A drain result arrived with no drain pending (late, or repeated).
    #[error("no drain is pending")]
    NoDrainPending,
}

/// Why a terminate request cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TerminateError {
    /// The node id is not registered.
    #[error("node {0} is unknown")]
    NotFound(NodeId),
    /// The node has no live stream to send the terminate on.
    #[error("node {node} has no live stream (state {state}){}", reconnect_hint(.state))]
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

/// What a suspicion within the post-restart reconnect grace adds to its reason.
const RECONNECT_WINDOW_NOTE: &str =
    "; the orchestrator restarted moments ago: waiting until the end of the reconnect grace";

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
    /// Boxed, as are the rarely set parts below: the detector visits some 8,000
    /// records a check at 50,000 nodes, and what it reads then (state, session,
    /// times, due) fits in a few cache lines instead of being spread over a
    /// record of some 500 bytes.
    pub(crate) info: Box<NodeInfo>,
    pub(crate) state: NodeState,
    pub(crate) state_reason: String,
    pub(crate) session: Option<SessionId>,
    /// The live session's liveness cell (present exactly while `session` is):
    /// beats land there and are applied when the node comes due.
    pub(crate) liveness: Option<Liveness>,
    pub(crate) connected_since: Instant,
    /// The latest beat the state machine has applied.
    pub(crate) last_seen: Instant,
    /// The latest CPU value applied (the cell's is newer while a session lives).
    pub(crate) last_cpu: Option<f64>,
    /// Detector checks this node has been suspect on, in a row.
    pub(crate) suspect_checks: u32,
    pub(crate) termination: Option<Box<Termination>>,
    /// The reason of a terminate cancelled at its deadline, so a late ack can revive it.
    pub(crate) cancelled_termination: Option<String>,
    /// A drain in progress or done; kept across reconnects (and, for a failed
    /// or departed node, as what it was when it went).
    pub(crate) drain: Option<Box<disruption::DrainMark>>,
    /// Maintenance, set by an operator until they end it.
    pub(crate) maintenance: Option<Box<disruption::Maintenance>>,
    /// When the node entered a final state.
    pub(crate) ended_at: Option<Instant>,
    /// Restored after an orchestrator restart and not yet reconnected: it is not
    /// judged before this instant.
    pub(crate) restart_grace_until: Option<Instant>,
    /// When this node's entry in the detector's schedule comes due, if it has one.
    pub(crate) due: Option<Instant>,
}

impl NodeRecord {
    /// When the node was last heard from, the cell's latest beat included.
    pub(crate) fn seen(&self) -> Instant {
        match &self.liveness {
            Some(liveness) => liveness.seen().max(self.last_seen),
            None => self.last_seen,
        }
    }

    /// The node's latest CPU fraction, the cell's included.
    pub(crate) fn cpu(&self) -> Option<f64> {
        match &self.liveness {
            Some(liveness) => liveness.cpu(),
            None => self.last_cpu,
        }
    }

    /// The session ends: what its cell last held becomes the record's, and the
    /// cell is let go (its stream handler may still write; nobody reads it).
    pub(crate) fn end_session(&mut self) {
        self.last_seen = self.seen();
        self.last_cpu = self.cpu();
        self.liveness = None;
        self.session = None;
    }

    /// A node just suspected, within the post-restart reconnect grace (`window`
    /// ends it): waited for until the grace ends, as the nodes not back yet are.
    /// Returns whether it is.
    pub(crate) fn wait_out_reconnect_window(&mut self, window: Option<Instant>, now: Instant) -> bool {
        let Some(until) = window.filter(|until| now < *until) else {
            return false;
        };
        self.restart_grace_until = Some(until);
        self.state_reason.push_str(RECONNECT_WINDOW_NOTE);
        true
    }

    /// The state a node with a live, healthy stream is in.
    pub(crate) fn live_state(&self) -> NodeState {
        match (&self.termination, &self.drain) {
            (Some(_), _) => NodeState::Terminating,
            (None, Some(drain)) if drain.completed => NodeState::Drained,
            (None, Some(_)) => NodeState::Draining,
            (None, None) => NodeState::Connected,
        }
    }

    /// Live, healthy, and carrying traffic: counted in fleet CPU.
    pub(crate) fn in_service(&self) -> bool {
        self.session.is_some()
            && matches!(self.state, NodeState::Connected | NodeState::Terminating)
            && self.drain.is_none()
            && self.maintenance.is_none()
    }

    /// Counted against the disruption budget.
    pub(crate) fn disrupted(&self) -> bool {
        matches!(
            self.state,
            NodeState::Draining | NodeState::Drained | NodeState::Terminating
        )
    }

    /// What the healer must know of a node that just failed.
    pub(crate) fn out_of_service(&self) -> Option<OutOfService> {
        if self.drain.as_ref().is_some_and(|drain| drain.completed) {
            Some(OutOfService::Drained)
        } else if self.maintenance.is_some() {
            Some(OutOfService::Maintenance)
        } else {
            None
        }
    }
}

/// The registry of every node the orchestrator knows.
#[derive(Debug)]
pub struct Registry {
    pub(crate) config: LifecycleConfig,
    pub(crate) nodes: HashMap<NodeId, NodeRecord>,
    /// The detector's schedule: when each node next needs looking at, earliest
    /// first. Entries are lazy: a heartbeat does not move its node's entry; the
    /// entry comes due, finds the node fresh and is pushed again further out, so a
    /// node costs one entry per heartbeat timeout, not one per heartbeat. An entry
    /// whose time no longer matches its node's `due` is stale and skipped.
    pub(crate) schedule: BinaryHeap<Reverse<(Instant, NodeId)>>,
    next_session: u64,
    /// When the previous dead-node check ran.
    pub(crate) last_check: Option<Instant>,
    anchor: TimeAnchor,
    effects: Vec<Effect>,
    pub(crate) unexpected_failures_total: u64,
    pub(crate) graceful_terminations_total: u64,
    /// Nodes in a final state (`ended_at` set): listed until the retention, but
    /// not live, so they do not count against `max_nodes`.
    pub(crate) departed: usize,
    /// After a restart (or a failover), the end of the reconnect grace: until
    /// then, a node whose stream breaks or goes silent is waited for until this
    /// instant, as the nodes that have not reconnected yet are. The whole fleet
    /// is reconnecting at once, and a session lost in that storm is the storm's.
    pub(crate) reconnect_window_until: Option<Instant>,
}

impl Registry {
    /// An empty registry; `now` and `wall_now` anchor monotonic to wall time.
    pub fn new(config: LifecycleConfig, now: Instant, wall_now: SystemTime) -> Self {
        Self {
            config,
            nodes: HashMap::new(),
            schedule: BinaryHeap::new(),
            next_session: 1,
            last_check: None,
            departed: 0,
            anchor: TimeAnchor {
                instant: now,
                wall: wall_now,
            },
            effects: Vec::new(),
            unexpected_failures_total: 0,
            graceful_terminations_total: 0,
            reconnect_window_until: None,
        }
    }

    /// The lifecycle parameters in force.
    pub fn config(&self) -> &LifecycleConfig {
        &self.config
    }

    /// Whether the node is known (in any state).
    pub fn knows(&self, node: NodeId) -> bool {
        self.nodes.contains_key(&node)
    }

    /// Known nodes, in any state.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Live nodes: known and not in a final state (FAILED, TERMINATED, LEFT).
    /// Only these count against `max_nodes`; departed ones are only listed.
    pub fn live_count(&self) -> usize {
        debug_assert_eq!(
            self.departed,
            self.nodes
                .values()
                .filter(|record| record.ended_at.is_some())
                .count()
        );
        self.nodes.len() - self.departed
    }

    /// Whether `node` is known and live.
    pub fn is_live(&self, node: NodeId) -> bool {
        self.nodes
            .get(&node)
            .is_some_and(|record| record.ended_at.is_none())
    }

    /// Live nodes not in maintenance, and how many of them are suspect, per
    /// failure domain: what the mass-failure guard weighs a domain's failures
    /// against (a node in maintenance may be away on purpose).
    pub fn mass_failure_population(&self) -> BTreeMap<String, crate::domain::healer::Population> {
        let mut population: BTreeMap<String, crate::domain::healer::Population> = BTreeMap::new();
        for record in self
            .nodes
            .values()
            .filter(|record| record.ended_at.is_none() && record.maintenance.is_none())
        {
            let domain = population.entry(self.domain_of(record)).or_default();
            domain.live += 1;
            domain.suspect += u32::from(record.state == NodeState::Suspect);
        }
        population
    }

    /// The failure domain of a node's record.
    fn domain_of(&self, record: &NodeRecord) -> String {
        failure_domain(
            self.config.disruption.failure_domain_label.as_deref(),
            &record.info.labels,
        )
    }

    /// What the healer needs of a node that just failed: its failure domain,
    /// labels, and whether it was out of service.
    pub fn failed_node(&self, node: NodeId) -> Option<crate::domain::healer::FailedNode> {
        let record = self.nodes.get(&node)?;
        Some(crate::domain::healer::FailedNode {
            id: node,
            ip: record.info.ip,
            hostname: record.info.hostname.clone(),
            out_of_service: record.out_of_service(),
            domain: self.domain_of(record),
            labels: record.info.labels.clone(),
        })
    }

    /// Whether the node was out of service (drained, in maintenance); asked of
    /// a node that just failed.
    pub fn out_of_service(&self, node: NodeId) -> Option<OutOfService> {
        self.nodes.get(&node)?.out_of_service()
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
                info: Box::new(info),
                state: NodeState::Connected,
                state_reason: String::new(),
                session: Some(session),
                liveness: Some(Liveness::new(self.anchor.instant, now)),
                connected_since: now,
                last_seen: now,
                last_cpu: None,
                suspect_checks: 0,
                termination: None,
                cancelled_termination: None,
                drain: None,
                maintenance: None,
                ended_at: None,
                restart_grace_until: None,
                due: None,
            };
            self.nodes.insert(id, record);
            self.schedule(id, now);
            self.publish(id, EventKind::NodeJoined, String::new(), now);
            return session;
        };

        let previous_state = record.state;
        let fenced = record.session.replace(session);
        record.liveness = Some(Liveness::new(self.anchor.instant, now));
        let rebooted = match (&record.info.host.boot_id, &info.host.boot_id) {
            (Some(before), Some(now)) => Some(before != now),
            _ => None,
        };
        let seen = info.host.last_disconnect.clone();
        *record.info = info;
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
        if record.ended_at.take().is_some() {
            self.departed -= 1;
        }
        record.restart_grace_until = None;
        if let Some(maintenance) = &mut record.maintenance {
            maintenance.away_since = None;
        }
        // A drain mark outlives the session: the node was taken out of service
        // and stays out until resumed. Its agent is told again (a restarted or
        // rebooted node may have announced its route again), with a fresh
        // deadline; until it reports, the node is DRAINING.
        let redrain = record.drain.as_mut().map(|drain| {
            drain.completed = false;
            drain.requested_at = now;
            drain.deadline = now + drain.timeout;
            (drain.reason.clone(), drain.timeout)
        });
        record.state = record.live_state();
        record.state_reason.clear();
        self.schedule(id, now);

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
        let mut said = format!("was {previous_state}");
        match rebooted {
            Some(true) => said.push_str("; rebooted (boot id changed)"),
            Some(false) => said.push_str("; same boot (a network or agent restart, not a reboot)"),
            None => {}
        }
        if !seen.is_empty() {
            said.push_str(&format!("; the agent saw: {seen}"));
        }
        self.publish(id, EventKind::NodeReconnected, said, now);
        if let Some(Effect::Publish(event)) = self.effects.last_mut() {
            event.rebooted = rebooted;
        }
        if let Some((reason, deadline)) = redrain {
            self.effects.push(Effect::SendDrain {
                node: id,
                session,
                reason,
                deadline,
            });
        }
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

    /// Loads the nodes a previous run persisted. Nodes that were live get
    /// `grace` to reconnect before they are judged: one that returns reconnects as
    /// usual; one that does not is FAILED (or TERMINATED if it had been told to
    /// go). Nodes in a final state are listed again until the retention passes.
    /// No events are published: nothing happened to the nodes.
    pub fn restore(&mut self, nodes: Vec<PersistedNode>, now: Instant, grace: Duration) {
        let deadline = now + self.config.termination_deadline;
        self.reconnect_window_until = Some(now + grace);
        for node in nodes {
            let final_state = node.state.is_final();
            let in_maintenance = node.maintenance.is_some();
            let record = NodeRecord {
                info: Box::new(NodeInfo {
                    id: node.id,
                    hostname: node.hostname,
                    ip: node.ip,
                    agent_version: node.agent_version,
                    labels: node.labels,
                    host: crate::domain::node::HostFacts {
                        boot_id: node.boot_id,
                        ..Default::default()
                    },
                }),
                state: if final_state {
                    node.state
                } else {
                    NodeState::Suspect
                },
                state_reason: if final_state {
                    node.state_reason
                } else {
                    format!(
                        "orchestrator restarted; waiting up to {:.1}s for the node to reconnect (was {})",
                        grace.as_secs_f64(),
                        node.state
                    )
                },
                session: None,
                liveness: None,
                connected_since: now,
                last_seen: now,
                last_cpu: None,
                suspect_checks: 0,
                termination: node.termination.filter(|_| !final_state).map(|t| {
                    Box::new(Termination {
                        reason: t.reason,
                        requested_at: now,
                        deadline,
                        acknowledged: t.acknowledged,
                    })
                }),
                cancelled_termination: None,
                drain: node
                    .drain
                    .map(|drain| Box::new(disruption::DrainMark::restored(drain, now))),
                maintenance: node.maintenance.map(|maintenance| {
                    Box::new(disruption::Maintenance {
                        reason: maintenance.reason,
                        since: now,
                        away_since: (!final_state).then_some(now),
                    })
                }),
                ended_at: final_state.then_some(now),
                // A node in maintenance is waited for on the maintenance clock.
                restart_grace_until: (!final_state && !in_maintenance).then_some(now + grace),
                due: None,
            };
            let id = node.id;
            self.departed += usize::from(final_state);
            if let Some(replaced) = self.nodes.insert(id, record) {
                self.departed -= usize::from(replaced.ended_at.is_some());
            }
            self.schedule(id, now);
        }
    }

    /// What of the node must survive a restart (None once it is forgotten).
    pub fn persisted(&self, node: NodeId) -> Option<PersistedNode> {
        let record = self.nodes.get(&node)?;
        Some(PersistedNode {
            id: node,
            hostname: record.info.hostname.clone(),
            ip: record.info.ip,
            agent_version: record.info.agent_version.clone(),
            labels: record.info.labels.clone(),
            state: record.state,
            state_reason: record.state_reason.clone(),
            termination: record.termination.as_ref().map(|t| PersistedTermination {
                reason: t.reason.clone(),
                acknowledged: t.acknowledged,
            }),
            drain: record.drain.as_ref().map(|drain| PersistedDrain {
                reason: drain.reason.clone(),
                completed: drain.completed,
                timeout_seconds: drain.timeout.as_secs_f64(),
                then_terminate: drain.then_terminate.clone(),
                scale_down: drain.scale_down,
            }),
            maintenance: record
                .maintenance
                .as_ref()
                .map(|maintenance| PersistedMaintenance {
                    reason: maintenance.reason.clone(),
                }),
            boot_id: record.info.host.boot_id.clone(),
        })
    }

    /// The liveness cell of `node`'s live session, for its stream handler.
    pub fn liveness(&self, node: NodeId) -> Option<Liveness> {
        self.nodes.get(&node)?.liveness.clone()
    }

    /// Tests' heartbeat: applied at once (a suspect node that speaks again
    /// recovers). Stream handlers leave beats in the session's liveness cell,
    /// which the registry applies when the node comes due ([`Registry::absorb`]).
    #[cfg(test)]
    pub fn heartbeat(&mut self, node: NodeId, session: SessionId, now: Instant) -> Result<(), SessionError> {
        self.touch(node, session, now)
    }

    /// Tests' CPU sample: applied at once, as [`Registry::heartbeat`] is.
    #[cfg(test)]
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
            if let Some(liveness) = &record.liveness {
                liveness.beat(now, Some(usage));
            }
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
                record.termination = Some(Box::new(Termination {
                    reason,
                    requested_at: now,
                    deadline: now,
                    acknowledged: true,
                }));
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
        record.end_session();
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
        record.end_session();
        if record.termination.as_ref().is_some_and(|t| t.acknowledged) {
            self.finish_terminated(node, format!("stream ended after terminate ack ({cause})"), now);
            return;
        }
        record.state = NodeState::Suspect;
        record.suspect_checks = 0;
        record.state_reason = format!("stream ended without goodbye ({cause})");
        if let Some(maintenance) = &mut record.maintenance {
            maintenance.away_since = Some(now);
            record.state_reason = format!(
                "in maintenance, away: {}; FAILED if still away after maintenance_max ({:.0}s)",
                record.state_reason,
                self.config.disruption.maintenance_max.as_secs_f64()
            );
        } else {
            record.wait_out_reconnect_window(self.reconnect_window_until, now);
        }
        let reason = record.state_reason.clone();
        self.schedule(node, now);
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
        record.termination = Some(Box::new(Termination {
            reason: reason.to_owned(),
            requested_at: now,
            deadline,
            acknowledged: false,
        }));
        record.cancelled_termination = None;
        if record.state != NodeState::Suspect {
            record.state = record.live_state();
        }
        self.schedule(node, now);
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
        self.list_matching(&NodeFilter::default())
    }

    /// Copies of the records of the nodes `filter` wants, ordered by node id.
    pub fn list_matching(&self, filter: &NodeFilter) -> Vec<NodeSnapshot> {
        let mut nodes: Vec<_> = self
            .nodes
            .values()
            .filter(|record| filter.matches(&record.info.labels, record.state))
            .map(|record| self.to_snapshot(record))
            .collect();
        nodes.sort_by_key(|node| node.info.id);
        nodes
    }

    /// One page of the nodes `filter` wants, in `page`'s order, and how many it
    /// wants in all. Only the page's records are copied: a console paging a
    /// 50,000-node fleet costs a sort of references, not 50,000 snapshots.
    pub fn page(&self, filter: &NodeFilter, page: Page) -> (Vec<NodeSnapshot>, usize) {
        let mut matching: Vec<&NodeRecord> = self
            .nodes
            .values()
            .filter(|record| filter.matches(&record.info.labels, record.state))
            .collect();
        let total = matching.len();
        let by_id = |a: &&NodeRecord, b: &&NodeRecord| a.info.id.cmp(&b.info.id);
        match page.by {
            SortKey::Id => matching.sort_by(by_id),
            SortKey::Hostname => {
                matching.sort_by(|a, b| a.info.hostname.cmp(&b.info.hostname).then(by_id(a, b)))
            }
            SortKey::State => {
                matching.sort_by(|a, b| a.state.as_str().cmp(b.state.as_str()).then(by_id(a, b)))
            }
            SortKey::Cpu => matching.sort_by(|a, b| {
                let cpu = |record: &NodeRecord| record.cpu().unwrap_or(-1.0);
                cpu(a).total_cmp(&cpu(b)).then(by_id(a, b))
            }),
            SortKey::Heartbeat => matching.sort_by(|a, b| a.seen().cmp(&b.seen()).then(by_id(a, b))),
        }
        if page.descending {
            matching.reverse();
        }
        let nodes = matching
            .into_iter()
            .skip(page.offset)
            .take(page.limit)
            .map(|record| self.to_snapshot(record))
            .collect();
        (nodes, total)
    }

    /// Fleet-wide figures.
    pub fn stats(&self) -> FleetStats {
        self.stats_matching(&Selector::everything())
    }

    /// Figures over the nodes `selector` matches (the totals since start and the
    /// disruption budget stay fleet-wide).
    pub fn stats_matching(&self, selector: &Selector) -> FleetStats {
        let mut stats = FleetStats {
            unexpected_failures_total: self.unexpected_failures_total,
            graceful_terminations_total: self.graceful_terminations_total,
            ..FleetStats::default()
        };
        let (mut cpu_sum, mut cpu_count) = (0.0, 0u32);
        let by_domain = self.config.disruption.failure_domain_label.is_some();
        let mut domain_cpu: BTreeMap<String, (f64, u32)> = BTreeMap::new();
        let matching = self
            .nodes
            .values()
            .filter(|record| selector.is_empty() || selector.matches(&record.info.labels));
        for record in matching {
            let active = record.session.is_some() && record.state != NodeState::Suspect;
            let in_service = record.in_service();
            *stats.nodes_by_state.entry(record.state).or_default() += 1;
            stats.disrupted_nodes += u32::from(record.disrupted());
            stats.maintenance_nodes += u32::from(record.maintenance.is_some() && record.ended_at.is_none());
            stats.active_nodes += u32::from(active);
            if in_service {
                stats.in_service_nodes += 1;
                match record.cpu() {
                    Some(cpu) => {
                        cpu_sum += cpu;
                        cpu_count += 1;
                    }
                    None => stats.active_without_cpu += 1,
                }
            }
            if by_domain {
                let name = self.domain_of(record);
                let domain = stats.domains.entry(name.clone()).or_default();
                *domain.nodes_by_state.entry(record.state).or_default() += 1;
                domain.active_nodes += u32::from(active);
                domain.in_service_nodes += u32::from(in_service);
                if let (true, Some(cpu)) = (in_service, record.cpu()) {
                    let (sum, count) = domain_cpu.entry(name).or_default();
                    *sum += cpu;
                    *count += 1;
                }
            }
        }
        for (name, (sum, count)) in domain_cpu {
            if let Some(domain) = stats.domains.get_mut(&name) {
                domain.avg_cpu_usage = Some(sum / f64::from(count));
            }
        }
        stats.disruption_allowed =
            u32::try_from(self.config.disruption.budget.allowed(self.live_count())).unwrap_or(u32::MAX);
        if cpu_count > 0 {
            stats.avg_cpu_usage = Some(cpu_sum / f64::from(cpu_count));
        }
        stats
    }

    /// The in-service connected node with the lowest latest CPU: the one a
    /// scale-down removes. Never a node that is terminating, draining, drained,
    /// in maintenance or protected (`protect_label`). Ties go to the lowest node id.
    pub fn least_loaded(&self) -> Option<crate::domain::scaler::Candidate> {
        let protect = self.config.disruption.protect_label.as_ref();
        self.nodes
            .iter()
            .filter(|(_, record)| record.state == NodeState::Connected && record.in_service())
            .filter(|(_, record)| {
                protect.is_none_or(|(key, value)| record.info.labels.get(key) != Some(value))
            })
            .filter_map(|(id, record)| record.cpu().map(|cpu| (*id, record.info.ip, cpu)))
            .min_by(|a, b| a.2.total_cmp(&b.2).then(a.0.cmp(&b.0)))
            .map(|(id, ip, cpu)| crate::domain::scaler::Candidate { id, ip, cpu })
    }

    /// Marks the node as alive at `now` if `session` is its live session.
    fn touch(&mut self, node: NodeId, session: SessionId, now: Instant) -> Result<(), SessionError> {
        let record = self.nodes.get_mut(&node).ok_or(SessionError::UnknownNode)?;
        if record.session != Some(session) {
            return Err(SessionError::Stale);
        }
        if let Some(liveness) = &record.liveness {
            liveness.beat(now, None);
        }
        self.apply_beat(node, now, now);
        Ok(())
    }

    /// Applies what the node's liveness cell holds (a live node that comes due, or
    /// one the detector is about to judge): a fresher beat moves `last_seen`, and a
    /// suspect node that spoke again recovers.
    pub(crate) fn absorb(&mut self, node: NodeId, now: Instant) {
        let Some(record) = self.nodes.get_mut(&node) else {
            return;
        };
        let Some(liveness) = &record.liveness else {
            return;
        };
        let seen = liveness.seen();
        record.last_cpu = liveness.cpu().or(record.last_cpu);
        if seen > record.last_seen {
            self.apply_beat(node, seen, now);
        }
    }

    /// The node was heard from at `seen` on its live session; applied at `now`.
    fn apply_beat(&mut self, node: NodeId, seen: Instant, now: Instant) {
        let Some(record) = self.nodes.get_mut(&node) else {
            return;
        };
        record.last_seen = record.last_seen.max(seen);
        if record.state == NodeState::Suspect {
            if let Some(maintenance) = &mut record.maintenance {
                maintenance.away_since = None;
            }
            record.state = record.live_state();
            record.suspect_checks = 0;
            record.state_reason.clear();
            // Suspected silent within the post-restart grace: judged on its
            // heartbeats again from now.
            if record.restart_grace_until.take().is_some() {
                self.schedule(node, now);
            }
            self.publish(
                node,
                EventKind::NodeRecovered,
                "spoke again on its live stream".into(),
                now,
            );
        }
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
        record.end_session();
        record.suspect_checks = 0;
        record.termination = None;
        record.cancelled_termination = None;
        if state == NodeState::Terminated {
            // It went as told: nothing is left to resume or to wait for.
            record.drain = None;
            record.maintenance = None;
        }
        if let Some(maintenance) = &mut record.maintenance {
            maintenance.away_since = None;
        }
        if record.ended_at.replace(now).is_none() {
            self.departed += 1;
        }
        record.restart_grace_until = None;
        self.schedule(node, now);
        self.publish(node, kind, reason, now);
    }

    pub(crate) fn publish(&mut self, node: NodeId, kind: EventKind, reason: String, now: Instant) {
        let Some(record) = self.nodes.get(&node) else {
            return;
        };
        let about = EventNode {
            id: node,
            ip: record.info.ip,
            hostname: record.info.hostname.clone(),
            state: record.state,
            labels: record.info.labels.clone(),
        };
        let event = FleetEvent::about_node(kind, about, reason, self.anchor.wall(now));
        self.effects.push(Effect::Publish(event));
    }

    pub(crate) fn queue(&mut self, effect: Effect) {
        self.effects.push(effect);
    }

    fn to_snapshot(&self, record: &NodeRecord) -> NodeSnapshot {
        NodeSnapshot {
            info: NodeInfo::clone(&record.info),
            state: record.state,
            state_reason: record.state_reason.clone(),
            session: record.session,
            last_cpu_usage: record.cpu(),
            connected_since: self.anchor.wall(record.connected_since),
            last_heartbeat: self.anchor.wall(record.seen()),
            termination: record.termination.as_ref().map(|t| TerminationSnapshot {
                reason: t.reason.clone(),
                requested_at: self.anchor.wall(t.requested_at),
                acknowledged: t.acknowledged,
                deadline: self.anchor.wall(t.deadline),
            }),
            maintenance: record.maintenance.as_ref().map(|m| MaintenanceSnapshot {
                reason: m.reason.clone(),
                since: self.anchor.wall(m.since),
                away_since: m.away_since.map(|at| self.anchor.wall(at)),
                fails_at: m
                    .away_since
                    .map(|at| self.anchor.wall(at + self.config.disruption.maintenance_max)),
            }),
            drain: record.drain.as_ref().map(|d| DrainSnapshot {
                reason: d.reason.clone(),
                requested_at: self.anchor.wall(d.requested_at),
                deadline: self.anchor.wall(d.deadline),
                completed: d.completed,
                then_terminate: d.then_terminate.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Lifecycle tests on fabricated instants: no runtime, no sleeping.

    use std::net::{IpAddr, Ipv4Addr};

    use uuid::Uuid;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);
    const DEADLINE: Duration = Duration::from_secs(20);

    struct Fixture {
        registry: Registry,
        now: Instant,
    }

    impl Fixture {
        fn new() -> Self {
            let config = LifecycleConfig {
                heartbeat_timeout: TIMEOUT,
                dead_node_check_interval: Duration::from_secs(10),
                required_consecutive_failures: 2,
                termination_deadline: DEADLINE,
                termination_grace_period: Duration::from_secs(5),
                node_retention: Duration::from_secs(600),
                disruption: DisruptionConfig::default(),
            };
            let now = Instant::now();
            Self {
                registry: Registry::new(config, now, SystemTime::UNIX_EPOCH),
                now,
            }
        }

        fn advance(&mut self, secs: u64) {
            self.now += Duration::from_secs(secs);
        }

        fn connect(&mut self, node: NodeId) -> SessionId {
            let info = NodeInfo {
                id: node,
                hostname: "edge".into(),
                ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)),
                agent_version: "test".into(),
                labels: Default::default(),
                host: Default::default(),
            };
            self.registry.connect(info, self.now)
        }

        fn check(&mut self) {
            self.registry.check(self.now);
        }

        fn state(&self, node: NodeId) -> NodeState {
            self.registry.snapshot(node).expect("known node").state
        }

        /// The kinds of the events published since the last call.
        fn events(&mut self) -> Vec<EventKind> {
            self.take()
                .into_iter()
                .filter_map(|e| {
                    if let Effect::Publish(ev) = e {
                        Some(ev.kind)
                    } else {
                        None
                    }
                })
                .collect()
        }

        fn take(&mut self) -> Vec<Effect> {
            self.registry.take_effects()
        }
    }

    fn node() -> NodeId {
        NodeId(Uuid::new_v4())
    }

    #[test]
    fn a_new_node_joins_connected() {
        let mut f = Fixture::new();
        let n = node();
        let s = f.connect(n);
        assert_eq!(f.state(n), NodeState::Connected);
        assert_eq!(f.registry.snapshot(n).unwrap().session, Some(s));
        assert_eq!(f.events(), [EventKind::NodeJoined]);
    }

    #[test]
    fn heartbeats_keep_a_node_connected_indefinitely() {
        let mut f = Fixture::new();
        let n = node();
        let s = f.connect(n);
        for _ in 0..100 {
            f.advance(10);
            f.registry.heartbeat(n, s, f.now).unwrap();
            f.check();
        }
        assert_eq!(f.state(n), NodeState::Connected);
        assert_eq!(f.registry.stats().unexpected_failures_total, 0);
    }

    #[test]
    fn beats_in_the_liveness_cell_are_read_when_the_node_comes_due() {
        let mut f = Fixture::new();
        let n = node();
        f.connect(n);
        let cell = f.registry.liveness(n).expect("a live session has a cell");
        f.take();
        for _ in 0..100 {
            f.advance(10);
            cell.beat(f.now, Some(0.4));
            f.check();
        }
        assert_eq!(f.state(n), NodeState::Connected);
        assert_eq!(f.events(), []);
        let snapshot = f.registry.snapshot(n).unwrap();
        assert_eq!(snapshot.last_cpu_usage, Some(0.4));
        assert_eq!(f.registry.stats().avg_cpu_usage, Some(0.4));

        // Silence in the cell is silence: suspect, then a beat recovers it.
        for step in [10, 10, 10, 1] {
            f.advance(step);
            f.check();
        }
        assert_eq!(f.state(n), NodeState::Suspect);
        cell.beat(f.now, None);
        f.check();
        assert_eq!(f.state(n), NodeState::Connected);
        assert_eq!(f.events(), [EventKind::NodeSuspected, EventKind::NodeRecovered]);
    }

    #[test]
    fn a_fenced_sessions_cell_is_not_read() {
        let mut f = Fixture::new();
        let n = node();
        f.connect(n);
        let old = f.registry.liveness(n).unwrap();
        f.advance(1);
        f.connect(n);
        f.take();
        // The old session's handler keeps writing; the new session is silent.
        for _ in 0..5 {
            f.advance(10);
            old.beat(f.now, Some(0.9));
            f.check();
        }
        assert_eq!(f.state(n), NodeState::Failed);
        assert_eq!(f.registry.snapshot(n).unwrap().last_cpu_usage, None);
    }

    #[test]
    fn silence_makes_a_node_suspect_then_failed_after_consecutive_checks() {
        let mut f = Fixture::new();
        let n = node();
        let s = f.connect(n);
        f.take();
        f.advance(30);
        f.check();
        assert_eq!(
            f.state(n),
            NodeState::Connected,
            "exactly the timeout is not yet silence"
        );
        f.advance(1);
        f.check();
        assert_eq!(f.state(n), NodeState::Suspect);
        assert_eq!(f.events(), [EventKind::NodeSuspected]);
        f.advance(10);
        f.check();
        assert_eq!(f.state(n), NodeState::Failed);
        let effects = f.take();
        assert!(effects.contains(&Effect::CloseSession {
            node: n,
            session: s,
            reason: CloseReason::DeclaredFailed
        }));
        assert!(effects.iter().any(
            |e| matches!(e, Effect::Publish(ev) if ev.kind == EventKind::NodeFailed && ev.node_id() == Some(n))
        ));
        assert_eq!(f.registry.stats().unexpected_failures_total, 1);
        assert_eq!(
            f.registry.heartbeat(n, s, f.now),
            Err(SessionError::Stale),
            "a failed session is closed"
        );
    }

    #[test]
    fn a_broken_stream_fails_after_the_required_checks_not_before() {
        let mut f = Fixture::new();
        let n = node();
        let s = f.connect(n);
        f.registry.stream_closed(n, s, "reset", f.now);
        assert_eq!(f.state(n), NodeState::Suspect);
        f.check();
        assert_eq!(f.state(n), NodeState::Suspect, "one check is not enough");
        f.check();
        assert_eq!(f.state(n), NodeState::Failed);
        f.check();
        assert_eq!(
            f.registry.stats().unexpected_failures_total,
            1,
            "failed exactly once"
        );
    }

    #[test]
    fn reconnecting_while_suspect_returns_to_connected() {
        let mut f = Fixture::new();
        let n = node();
        let s1 = f.connect(n);
        f.registry.stream_closed(n, s1, "reset", f.now);
        f.check();
        f.take();
        let s2 = f.connect(n);
        assert_ne!(s1, s2);
        assert_eq!(f.state(n), NodeState::Connected);
        assert_eq!(f.events(), [EventKind::NodeReconnected]);
        f.check();
        f.check();
        assert_eq!(f.state(n), NodeState::Connected);
    }

    #[test]
    fn a_heartbeat_after_silence_recovers_a_suspect_node() {
        let mut f = Fixture::new();
        let n = node();
        let s = f.connect(n);
        f.advance(31);
        f.check();
        f.take();
        f.registry.heartbeat(n, s, f.now).unwrap();
        assert_eq!(f.state(n), NodeState::Connected);
        assert_eq!(f.events(), [EventKind::NodeRecovered]);
    }

    #[test]
    fn a_second_session_fences_the_first() {
        let mut f = Fixture::new();
        let n = node();
        let old = f.connect(n);
        f.take();
        let new = f.connect(n);
        let effects = f.take();
        assert_eq!(
            effects[0],
            Effect::CloseSession {
                node: n,
                session: old,
                reason: CloseReason::Fenced { by: new }
            }
        );
        assert_eq!(f.registry.heartbeat(n, old, f.now), Err(SessionError::Stale));
        f.registry.stream_closed(n, old, "aborted", f.now);
        assert_eq!(
            f.state(n),
            NodeState::Connected,
            "the fenced stream's end is not a failure"
        );
        f.registry.heartbeat(n, new, f.now).unwrap();
    }

    #[test]
    fn an_acknowledged_terminate_makes_the_exit_expected() {
        let mut f = Fixture::new();
        let n = node();
        let s = f.connect(n);
        f.take();
        let accepted = f.registry.request_terminate(n, "scale-down", f.now).unwrap();
        assert!(!accepted.already_terminating);
        assert_eq!(f.state(n), NodeState::Terminating);
        let effects = f.take();
        assert!(effects.contains(&Effect::SendTerminate {
            node: n,
            session: s,
            reason: "scale-down".into(),
            grace_period: Duration::from_secs(5)
        }));
        f.registry.terminate_ack(n, s, f.now).unwrap();
        f.registry.stream_closed(n, s, "ended", f.now);
        assert_eq!(f.state(n), NodeState::Terminated);
        f.check();
        f.check();
        let stats = f.registry.stats();
        assert_eq!(
            (stats.graceful_terminations_total, stats.unexpected_failures_total),
            (1, 0)
        );
        assert!(!f.events().contains(&EventKind::NodeFailed));
    }

    #[test]
    fn goodbye_after_terminate_is_terminated_and_goodbye_alone_is_left() {
        let mut f = Fixture::new();
        let (a, b) = (node(), node());
        let sa = f.connect(a);
        let sb = f.connect(b);
        f.registry.request_terminate(a, "operator", f.now).unwrap();
        f.registry.goodbye(a, sa, "terminated", f.now).unwrap();
        f.registry.goodbye(b, sb, "shutdown", f.now).unwrap();
        f.registry.stream_closed(a, sa, "ended", f.now);
        f.registry.stream_closed(b, sb, "ended", f.now);
        f.check();
        f.check();
        assert_eq!(f.state(a), NodeState::Terminated);
        assert_eq!(f.state(b), NodeState::Left);
        assert_eq!(f.registry.stats().unexpected_failures_total, 0);
    }

    #[test]
    fn an_unacknowledged_terminate_is_cancelled_and_a_later_crash_is_a_failure() {
        let mut f = Fixture::new();
        let n = node();
        let s = f.connect(n);
        f.registry.request_terminate(n, "operator", f.now).unwrap();
        f.take();
        f.advance(10);
        f.registry.heartbeat(n, s, f.now).unwrap();
        f.check();
        assert_eq!(f.state(n), NodeState::Terminating, "still within the deadline");
        f.advance(10);
        f.registry.heartbeat(n, s, f.now).unwrap();
        f.check();
        assert_eq!(f.state(n), NodeState::Connected);
        assert_eq!(f.events(), [EventKind::TerminateCancelled]);
        assert!(f.registry.snapshot(n).unwrap().termination.is_none());
        f.registry.stream_closed(n, s, "killed", f.now);
        f.check();
        f.check();
        assert_eq!(f.state(n), NodeState::Failed, "a real crash is never swallowed");
    }

    #[test]
    fn a_late_ack_after_cancellation_still_makes_the_exit_expected() {
        let mut f = Fixture::new();
        let n = node();
        let s = f.connect(n);
        f.registry.request_terminate(n, "operator", f.now).unwrap();
        f.advance(21);
        f.registry.heartbeat(n, s, f.now).unwrap();
        f.check();
        assert_eq!(f.state(n), NodeState::Connected);
        f.registry.terminate_ack(n, s, f.now).unwrap();
        assert_eq!(f.state(n), NodeState::Terminating);
        f.registry.stream_closed(n, s, "ended", f.now);
        assert_eq!(f.state(n), NodeState::Terminated);
    }

    #[test]
    fn an_ack_with_no_terminate_is_rejected() {
        let mut f = Fixture::new();
        let n = node();
        let s = f.connect(n);
        assert_eq!(
            f.registry.terminate_ack(n, s, f.now),
            Err(SessionError::NoTerminatePending)
        );
        assert_eq!(f.state(n), NodeState::Connected);
    }

    #[test]
    fn a_pending_terminate_is_resent_on_reconnect() {
        let mut f = Fixture::new();
        let n = node();
        let s1 = f.connect(n);
        f.registry.request_terminate(n, "operator", f.now).unwrap();
        f.registry.stream_closed(n, s1, "network blip", f.now);
        f.take();
        let s2 = f.connect(n);
        assert_eq!(f.state(n), NodeState::Terminating);
        let effects = f.take();
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::SendTerminate { session, .. } if *session == s2))
        );
    }

    #[test]
    fn terminate_errors_and_idempotence() {
        let mut f = Fixture::new();
        let n = node();
        assert_eq!(
            f.registry.request_terminate(n, "x", f.now).unwrap_err(),
            TerminateError::NotFound(n)
        );
        let s = f.connect(n);
        assert!(
            !f.registry
                .request_terminate(n, "x", f.now)
                .unwrap()
                .already_terminating
        );
        f.take();
        assert!(
            f.registry
                .request_terminate(n, "x", f.now)
                .unwrap()
                .already_terminating
        );
        assert!(f.take().is_empty(), "nothing is sent twice");
        f.registry.goodbye(n, s, "terminated", f.now).unwrap();
        let error = f.registry.request_terminate(n, "x", f.now).unwrap_err();
        assert_eq!(
            error,
            TerminateError::NotConnected {
                node: n,
                state: NodeState::Terminated
            }
        );
    }

    #[test]
    fn an_acknowledged_node_that_goes_silent_is_terminated_not_failed() {
        let mut f = Fixture::new();
        let n = node();
        let s = f.connect(n);
        f.registry.request_terminate(n, "x", f.now).unwrap();
        f.registry.terminate_ack(n, s, f.now).unwrap();
        f.advance(31);
        f.check();
        assert_eq!(f.state(n), NodeState::Terminated);
        assert_eq!(f.registry.stats().unexpected_failures_total, 0);
    }

    #[test]
    fn a_failed_node_that_reconnects_is_connected_again() {
        let mut f = Fixture::new();
        let n = node();
        let s = f.connect(n);
        f.registry.stream_closed(n, s, "killed", f.now);
        f.check();
        f.check();
        assert_eq!(f.state(n), NodeState::Failed);
        f.take();
        f.connect(n);
        assert_eq!(f.state(n), NodeState::Connected);
        assert_eq!(f.events(), [EventKind::NodeReconnected]);
    }

    #[test]
    fn final_nodes_are_forgotten_after_the_retention() {
        let mut f = Fixture::new();
        let n = node();
        let s = f.connect(n);
        f.registry.goodbye(n, s, "shutdown", f.now).unwrap();
        f.advance(599);
        f.check();
        assert!(f.registry.snapshot(n).is_some());
        f.take();
        f.advance(1);
        f.check();
        assert!(f.registry.snapshot(n).is_none());
        assert_eq!(f.events(), [EventKind::NodeForgotten]);
    }

    #[test]
    fn stats_average_the_latest_cpu_of_active_nodes() {
        let mut f = Fixture::new();
        let (a, b, c) = (node(), node(), node());
        let sa = f.connect(a);
        let sb = f.connect(b);
        let sc = f.connect(c);
        f.registry.cpu_sample(a, sa, 0.9, f.now).unwrap();
        f.registry.cpu_sample(a, sa, 0.2, f.now).unwrap();
        f.registry.cpu_sample(b, sb, 0.6, f.now).unwrap();
        f.registry.cpu_sample(c, sc, 1.0, f.now).unwrap();
        f.registry.stream_closed(c, sc, "killed", f.now);
        let stats = f.registry.stats();
        assert_eq!(stats.active_nodes, 2);
        assert!((stats.avg_cpu_usage.unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(stats.nodes_by_state[&NodeState::Suspect], 1);
    }

    #[test]
    fn event_times_follow_the_monotonic_clock() {
        let mut f = Fixture::new();
        f.advance(7);
        f.connect(node());
        let Effect::Publish(event) = &f.take()[0] else {
            panic!("expected an event")
        };
        assert_eq!(event.time, SystemTime::UNIX_EPOCH + Duration::from_secs(7));
    }

    #[test]
    fn a_late_check_after_the_orchestrators_own_stall_judges_nobody() {
        let mut f = Fixture::new();
        let (live, broken) = (node(), node());
        f.connect(live);
        let sb = f.connect(broken);
        f.registry.stream_closed(broken, sb, "reset", f.now);
        f.check();
        f.take();
        // The orchestrator was frozen for 100s: its own silence is not the nodes'.
        f.advance(100);
        f.check();
        let effects = f.take();
        assert_eq!(
            effects,
            [Effect::DetectorStalled {
                gap: Duration::from_secs(100)
            }]
        );
        assert_eq!(f.state(live), NodeState::Connected);
        assert_eq!(
            f.state(broken),
            NodeState::Suspect,
            "the stall round does not count"
        );
        // From the resume on, judgement is normal again.
        f.advance(10);
        f.check();
        assert_eq!(f.state(broken), NodeState::Failed);
        f.advance(20);
        f.check();
        assert_eq!(
            f.state(live),
            NodeState::Connected,
            "30s after the resume is not yet silence"
        );
        f.advance(1);
        f.check();
        assert_eq!(f.state(live), NodeState::Suspect);
    }

    #[test]
    fn silence_is_judged_net_of_the_orchestrators_own_delay_up_to_one_timeout() {
        let mut f = Fixture::new();
        let (a, b) = (node(), node());
        f.connect(a);
        let sb = f.connect(b);
        let check = |f: &mut Fixture, secs: u64, own_delay: u64| {
            f.advance(secs);
            f.registry
                .check_with_own_delay(f.now, Duration::from_secs(own_delay));
        };
        for _ in 0..3 {
            check(&mut f, 10, 0);
        }
        f.registry.heartbeat(b, sb, f.now).unwrap();
        // 40 s silent on a 30 s timeout, but the orchestrator is reading 15 s
        // late: a's beats may be waiting unread.
        check(&mut f, 10, 15);
        assert_eq!(f.state(a), NodeState::Connected);
        // 50 s is more than the timeout and the delay together.
        check(&mut f, 10, 15);
        assert_eq!(f.state(a), NodeState::Suspect);
        let reason = f.registry.snapshot(a).unwrap().state_reason;
        assert_eq!(
            reason,
            "no heartbeat for 50.0s (allowing 15.0s for the orchestrator's own delay in reading)"
        );

        // However late the orchestrator says it is, one more timeout is all a
        // node gets: b, heard from at 30 s, is silent 70 s at 100 s.
        for _ in 0..4 {
            check(&mut f, 10, 100);
        }
        assert_eq!(
            f.state(b),
            NodeState::Connected,
            "silent 60 s at 90 s: not more than 30 + 30"
        );
        check(&mut f, 10, 100);
        assert_eq!(f.state(b), NodeState::Suspect);
        assert_eq!(
            f.state(a),
            NodeState::Failed,
            "the delay puts off suspicion, not the count after it"
        );
    }

    fn with_host(node: NodeId, labels: &[(&str, &str)], boot_id: Option<&str>, saw: &str) -> NodeInfo {
        NodeInfo {
            id: node,
            hostname: "edge".into(),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)),
            agent_version: "test".into(),
            labels: labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            host: crate::domain::node::HostFacts {
                boot_id: boot_id.map(str::to_owned),
                boot_time: None,
                last_disconnect: saw.into(),
            },
        }
    }

    fn reconnected(f: &mut Fixture) -> FleetEvent {
        f.take()
            .into_iter()
            .find_map(|effect| match effect {
                Effect::Publish(event) if event.kind == EventKind::NodeReconnected => Some(event),
                _ => None,
            })
            .expect("a NODE_RECONNECTED event")
    }

    #[test]
    fn a_reconnect_says_whether_the_node_rebooted_and_what_its_agent_saw() {
        let mut f = Fixture::new();
        let n = node();
        let s = f.registry.connect(with_host(n, &[], Some("boot-a"), ""), f.now);
        f.registry.stream_closed(n, s, "reset", f.now);
        f.take();
        let s = f
            .registry
            .connect(with_host(n, &[], Some("boot-a"), "stream reset"), f.now);
        let event = reconnected(&mut f);
        assert_eq!(event.rebooted, Some(false));
        assert!(event.reason.contains("same boot"), "{}", event.reason);
        assert!(
            event.reason.contains("the agent saw: stream reset"),
            "{}",
            event.reason
        );
        f.registry.stream_closed(n, s, "reset", f.now);
        f.registry.connect(with_host(n, &[], Some("boot-b"), ""), f.now);
        let event = reconnected(&mut f);
        assert_eq!(event.rebooted, Some(true));
        assert!(event.reason.contains("rebooted"), "{}", event.reason);
        // An older agent says nothing: nothing is claimed.
        f.registry.connect(with_host(n, &[], None, ""), f.now);
        assert_eq!(reconnected(&mut f).rebooted, None);
        // The boot id survives a restart of the orchestrator.
        let persisted = f.registry.persisted(n).unwrap();
        assert_eq!(persisted.boot_id, None);
        f.registry.connect(with_host(n, &[], Some("boot-b"), ""), f.now);
        let persisted = f.registry.persisted(n).unwrap();
        assert_eq!(persisted.boot_id.as_deref(), Some("boot-b"));
        let mut restarted = Registry::new(f.registry.config().clone(), f.now, SystemTime::UNIX_EPOCH);
        restarted.restore(vec![persisted], f.now, Duration::from_secs(10));
        restarted.connect(with_host(n, &[], Some("boot-c"), ""), f.now);
        let event = restarted
            .take_effects()
            .into_iter()
            .find_map(|effect| match effect {
                Effect::Publish(event) if event.kind == EventKind::NodeReconnected => Some(event),
                _ => None,
            })
            .unwrap();
        assert_eq!(event.rebooted, Some(true));
    }

    /// Within the reconnect grace after a restart, a session lost in the storm
    /// (broken or silent) is waited for until the grace ends, as the nodes not
    /// back yet are; after the grace, the usual judgement applies.
    #[test]
    fn within_the_grace_after_a_restart_a_lost_session_is_waited_for() {
        let mut f = Fixture::new();
        let [broke, came_back, silent, later] = [node(), node(), node(), node()];
        for n in [broke, came_back, silent, later] {
            f.connect(n);
        }
        let persisted: Vec<_> = [broke, came_back, silent, later]
            .iter()
            .map(|n| f.registry.persisted(*n).unwrap())
            .collect();
        let grace = Duration::from_secs(60);
        let mut restarted = Fixture {
            registry: Registry::new(f.registry.config().clone(), f.now, SystemTime::UNIX_EPOCH),
            now: f.now,
        };
        let mut f = {
            restarted.registry.restore(persisted, restarted.now, grace);
            restarted
        };
        let sessions: Vec<_> = [broke, came_back, silent, later]
            .iter()
            .map(|n| f.connect(*n))
            .collect();
        f.take();
        f.advance(5);
        f.registry.stream_closed(broke, sessions[0], "reset", f.now);
        f.registry.stream_closed(came_back, sessions[1], "reset", f.now);
        assert_eq!(f.state(broke), NodeState::Suspect);
        let reason = f.registry.snapshot(broke).unwrap().state_reason;
        assert!(reason.contains("reconnect grace"), "{reason}");
        // Checks every 10 s: `later` beats throughout; `silent` goes quiet.
        let later_cell = f.registry.liveness(later).unwrap();
        let silent_cell = f.registry.liveness(silent).unwrap();
        for step in 0..5 {
            f.advance(10);
            later_cell.beat(f.now, None);
            if step < 1 {
                silent_cell.beat(f.now, None);
            }
            f.check();
        }
        // At +55 s: nobody failed; `silent` is suspect and waited for too.
        assert_eq!(f.registry.stats().unexpected_failures_total, 0);
        assert_eq!(f.state(silent), NodeState::Suspect);
        f.connect(came_back);
        // `silent` speaks again: it recovers and is judged on heartbeats again.
        silent_cell.beat(f.now, None);
        f.check();
        assert_eq!(f.state(silent), NodeState::Connected);
        f.take();
        // The grace ends at +60 s: `broke` never came back, so it is FAILED once.
        f.advance(10);
        later_cell.beat(f.now, None);
        silent_cell.beat(f.now, None);
        f.check();
        assert_eq!(f.state(broke), NodeState::Failed);
        assert_eq!(f.state(came_back), NodeState::Connected);
        assert_eq!(f.registry.stats().unexpected_failures_total, 1);
        // After the grace, a broken stream is judged as usual: two checks.
        let session = f.registry.snapshot(later).unwrap().session.unwrap();
        f.registry.stream_closed(later, session, "reset", f.now);
        let reason = f.registry.snapshot(later).unwrap().state_reason;
        assert!(!reason.contains("reconnect grace"), "{reason}");
        for _ in 0..2 {
            f.advance(10);
            silent_cell.beat(f.now, None);
            f.check();
        }
        assert_eq!(f.state(later), NodeState::Failed);
        assert_eq!(f.state(silent), NodeState::Connected);
    }

    #[test]
    fn lists_and_stats_follow_selectors_and_states_and_domains_are_counted() {
        let mut f = Fixture::new();
        f.registry.config.disruption.failure_domain_label = Some("pop".into());
        let fra = [node(), node()];
        let ams = node();
        let bare = node();
        let mut sessions = Vec::new();
        for id in fra {
            sessions.push(f.registry.connect(
                with_host(id, &[("pop", "fra1"), ("role", "edge")], None, ""),
                f.now,
            ));
        }
        let s_ams = f
            .registry
            .connect(with_host(ams, &[("pop", "ams1")], None, ""), f.now);
        f.registry.connect(with_host(bare, &[], None, ""), f.now);
        f.registry.cpu_sample(fra[0], sessions[0], 0.2, f.now).unwrap();
        f.registry.cpu_sample(fra[1], sessions[1], 0.4, f.now).unwrap();
        f.registry.cpu_sample(ams, s_ams, 0.9, f.now).unwrap();
        f.registry.stream_closed(ams, s_ams, "reset", f.now);

        let filter = |selector: &str, states: Vec<NodeState>| NodeFilter {
            selector: selector.parse().unwrap(),
            states,
        };
        let ids = |nodes: Vec<NodeSnapshot>| nodes.into_iter().map(|n| n.info.id).collect::<Vec<_>>();
        let mut expected = fra.to_vec();
        expected.sort();
        assert_eq!(
            ids(f.registry.list_matching(&filter("pop=fra1", vec![]))),
            expected
        );
        assert_eq!(ids(f.registry.list_matching(&filter("!pop", vec![]))), vec![bare]);
        assert_eq!(
            ids(f.registry.list_matching(&filter("", vec![NodeState::Suspect]))),
            vec![ams]
        );
        assert_eq!(f.registry.list_matching(&filter("pop!=fra1", vec![])).len(), 2);

        let fra_stats = f.registry.stats_matching(&"pop=fra1".parse().unwrap());
        assert_eq!(fra_stats.active_nodes, 2);
        assert!((fra_stats.avg_cpu_usage.unwrap() - 0.3).abs() < 1e-12);
        let stats = f.registry.stats();
        assert_eq!(stats.domains.len(), 3);
        assert_eq!(stats.domains["pop=fra1"].active_nodes, 2);
        assert_eq!(stats.domains["pop=ams1"].nodes_by_state[&NodeState::Suspect], 1);
        assert_eq!(
            stats.domains["pop=ams1"].avg_cpu_usage, None,
            "a suspect node's CPU is not counted"
        );
        assert_eq!(stats.domains["!pop"].active_nodes, 1);
        let population = f.registry.mass_failure_population();
        assert_eq!(
            (population["pop=fra1"].live, population["pop=fra1"].suspect),
            (2, 0)
        );
        assert_eq!(
            (population["pop=ams1"].live, population["pop=ams1"].suspect),
            (1, 1)
        );
        assert_eq!(population["!pop"].live, 1);
        let failed = f.registry.failed_node(ams).unwrap();
        assert_eq!(failed.domain, "pop=ams1");
    }

    #[test]
    fn a_page_is_ordered_filtered_and_counted_and_copies_only_itself() {
        let mut f = Fixture::new();
        let ids: Vec<NodeId> = (0..6).map(|_| node()).collect();
        for (n, id) in ids.iter().enumerate() {
            let pop = if n % 2 == 0 { "fra1" } else { "ams1" };
            let session = f
                .registry
                .connect(with_host(*id, &[("pop", pop)], None, ""), f.now);
            f.registry
                .cpu_sample(*id, session, n as f64 / 10.0, f.now)
                .unwrap();
        }
        let busiest = Page {
            by: SortKey::Cpu,
            descending: true,
            offset: 0,
            limit: 2,
        };
        let (page, total) = f.registry.page(&NodeFilter::default(), busiest);
        assert_eq!(total, 6);
        assert_eq!(
            page.iter().map(|n| n.info.id).collect::<Vec<_>>(),
            [ids[5], ids[4]]
        );
        let fra = NodeFilter {
            selector: "pop=fra1".parse().unwrap(),
            states: Vec::new(),
        };
        let (page, total) = f.registry.page(&fra, Page { offset: 1, ..busiest });
        assert_eq!(total, 3);
        assert_eq!(
            page.iter().map(|n| n.info.id).collect::<Vec<_>>(),
            [ids[2], ids[0]]
        );
        let everything = Page {
            by: SortKey::Id,
            descending: false,
            offset: 0,
            limit: 100,
        };
        let (page, _) = f.registry.page(&NodeFilter::default(), everything);
        assert_eq!(page, f.registry.list(), "the default order is the list's");
        let (page, total) = f.registry.page(
            &NodeFilter::default(),
            Page {
                offset: 10,
                ..everything
            },
        );
        assert!(page.is_empty());
        assert_eq!(total, 6);
    }
}
