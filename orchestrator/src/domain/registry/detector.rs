//! The dead-node check: the failure detector's periodic half.
//!
//! Run every `dead_node_check_interval`, on the orchestrator's monotonic clock:
//! 1. an unacknowledged terminate past its deadline is cancelled, so a later crash
//!    of that node is an unexpected failure like any other (SecBeat weakness 4);
//! 2. a live node silent for longer than `heartbeat_timeout` becomes SUSPECT (or,
//!    if it had acknowledged a terminate, TERMINATED: it said it would go);
//! 3. a node suspect on `required_consecutive_failures` consecutive checks is
//!    declared FAILED, and its stream, if still open, is closed;
//! 4. nodes in a final state longer than `node_retention` are forgotten;
//! 5. nodes restored after an orchestrator restart are left alone during their
//!    reconnect grace; one that has not come back by then is FAILED, or
//!    TERMINATED if it had been told to terminate;
//! 6. a drain not reported done by its deadline is given up (DRAIN_FAILED);
//! 7. a node in maintenance that is away (stream ended, or silent) is SUSPECT
//!    but not counted towards FAILED until it has been away `maintenance_max`;
//! 8. within the reconnect grace after a restart or failover, a node whose
//!    stream breaks or goes silent is SUSPECT and waited for until the grace
//!    ends, like the nodes that have not reconnected yet: the whole fleet is
//!    reconnecting at once, on an orchestrator that just started, and a session
//!    lost in that storm is the storm's, not the node's.
//!
//! The detector only judges silence over time during which it ran itself. A
//! check that comes later than twice its interval and later than half the
//! heartbeat timeout means the orchestrator stalled (VM pause, SIGSTOP, swap): the
//! nodes' heartbeats of that time sit unread in socket buffers, so that round
//! judges nobody and every live node gets a fresh heartbeat window from now.
//!
//! Short of a stall, an orchestrator can still run behind: on a saturated machine
//! or in a storm its runtime has more ready tasks than threads, and a heartbeat
//! that reached the socket waits its turn to be read, so its receipt time is late
//! by that wait. The runtime measures its own scheduling delay (a probe task, see
//! `runtime::lag`) and each check is given it ([`Registry::check_with_own_delay`]):
//! a node is suspect only once silent for longer than the timeout plus that
//! delay, capped at one more timeout. A node is not blamed for the
//! orchestrator's own lateness (the local health awareness of HashiCorp's
//! Lifeguard, for the same reason), and a dead node is still found, later by at
//! most the delay.
//!
//! A check does not scan the fleet. The registry keeps a schedule of when each
//! node next needs looking at (its heartbeat deadline, a terminate deadline, the
//! end of a reconnect grace or of the retention; every check while suspect), and a
//! check visits only the entries that have come due. Heartbeats do not touch the
//! schedule (nor the registry: they land in the session's liveness cell, see
//! [`super::liveness`]): a node's entry comes due once per heartbeat timeout, reads
//! its cell, finds the node fresh and goes back further out. So the detector looks at healthy nodes about
//! `nodes / heartbeat_timeout` times a second, whatever the check interval: at
//! 50,000 nodes with a 3 s timeout and checks every 0.5 s, 8,300 per check where a
//! scan would look at 50,000 (measured: BENCHMARKS.md, "Fleet scale").
//!
//! The other half, reacting to streams that break, is [`Registry::stream_closed`].

use std::{
    cmp::Reverse,
    time::{Duration, Instant},
};

use crate::{
    domain::event::EventKind,
    domain::node::{NodeId, NodeState, SessionId},
    domain::registry::{CloseReason, Effect, LifecycleConfig, NodeRecord, Registry},
};

/// The smallest step on the monotonic clock: silence is judged once it is longer
/// than the timeout, not equal to it.
const TICK: Duration = Duration::from_nanos(1);

/// An own delay worth naming in a suspect node's reason (a runtime is always a
/// few milliseconds late; that is not news).
const NOTABLE_OWN_DELAY: Duration = Duration::from_millis(100);

impl Registry {
    /// Runs one dead-node check at `now`; results are queued as effects. Returns
    /// how many nodes it looked at (only those due).
    pub fn check(&mut self, now: Instant) -> usize {
        self.check_with_own_delay(now, Duration::ZERO)
    }

    /// [`Registry::check`] on an orchestrator that is running `own_delay` behind
    /// (how late its runtime runs a task that is due): heartbeats are read as
    /// late, so silence is judged net of it (up to one heartbeat timeout).
    pub fn check_with_own_delay(&mut self, now: Instant, own_delay: Duration) -> usize {
        let own_delay = own_delay.min(self.config.heartbeat_timeout);
        if self.stalled(now) {
            return 0;
        }
        // Due entries in (time, node id) order: event order is reproducible.
        let mut visits = 0;
        // Nodes due again at once (suspects count every check) wait for the next.
        let mut next_check = Vec::new();
        while let Some(&Reverse((due, id))) = self.schedule.peek() {
            if due > now {
                break;
            }
            self.schedule.pop();
            match self.nodes.get_mut(&id) {
                Some(record) if record.due == Some(due) => record.due = None,
                // Stale: the node was rescheduled earlier, or forgotten.
                _ => continue,
            }
            visits += 1;
            self.check_node(id, now, own_delay);
            if let Some(entry) = self.plan(id, now) {
                if entry.0.0 <= now {
                    next_check.push(entry);
                } else {
                    self.schedule.push(entry);
                }
            }
        }
        self.schedule.extend(next_check);
        visits
    }

    /// Makes sure the detector looks at `id` by the time it next needs judging.
    /// Called after every change that can bring that time forward; a later time is
    /// left to the node's current entry, which reschedules when it comes due.
    pub(crate) fn schedule(&mut self, id: NodeId, now: Instant) {
        if let Some(entry) = self.plan(id, now) {
            self.schedule.push(entry);
        }
    }

    /// The schedule entry `id` needs now, if its current one comes too late;
    /// records it as the node's `due`.
    fn plan(&mut self, id: NodeId, now: Instant) -> Option<Reverse<(Instant, NodeId)>> {
        let record = self.nodes.get_mut(&id)?;
        let due = next_due(&self.config, record, now)?;
        if record.due.is_some_and(|current| current <= due) {
            return None;
        }
        record.due = Some(due);
        Some(Reverse((due, id)))
    }

    /// Notes a check at `now`; true if it came so late that the orchestrator
    /// itself stalled, in which case live nodes get a fresh window and nobody is
    /// judged this round.
    fn stalled(&mut self, now: Instant) -> bool {
        let previous = self.last_check.replace(now);
        let Some(gap) = previous.map(|previous| now.saturating_duration_since(previous)) else {
            return false;
        };
        if gap <= self.stall_threshold() {
            return false;
        }
        for record in self.nodes.values_mut().filter(|record| record.session.is_some()) {
            record.last_seen = record.last_seen.max(now);
        }
        self.queue(Effect::DetectorStalled { gap });
        true
    }

    /// A gap between checks beyond which the orchestrator itself must have stalled.
    fn stall_threshold(&self) -> Duration {
        (self.config.dead_node_check_interval * 2).max(self.config.heartbeat_timeout / 2)
    }

    /// Judges one node at `now`, with silence counted net of `own_delay`.
    fn check_node(&mut self, id: NodeId, now: Instant, own_delay: Duration) {
        // Beats left in the session's liveness cell since the last look count first.
        self.absorb(id, now);
        let timeout = self.config.heartbeat_timeout;
        let required = self.config.required_consecutive_failures;
        let retention = self.config.node_retention;
        let Some(record) = self.nodes.get_mut(&id) else {
            return;
        };

        if let Some(ended_at) = record.ended_at {
            if now.saturating_duration_since(ended_at) >= retention {
                let reason = format!("in state {} for longer than the retention", record.state);
                self.publish(id, EventKind::NodeForgotten, reason, now);
                self.nodes.remove(&id);
                self.departed -= 1;
            }
            return;
        }

        if record
            .termination
            .as_ref()
            .is_some_and(|t| !t.acknowledged && now >= t.deadline)
        {
            let termination = record.termination.take().expect("checked above");
            record.cancelled_termination = Some(termination.reason);
            if record.state == NodeState::Terminating {
                record.state = record.live_state();
            }
            let reason = "terminate not acknowledged before the deadline".to_owned();
            self.publish(id, EventKind::TerminateCancelled, reason, now);
        }

        if let Some(record) = self.nodes.get(&id)
            && let Some(drain) = record
                .drain
                .as_ref()
                .filter(|d| !d.completed && now >= d.deadline && record.session.is_some())
        {
            // Without a session the mark waits: the node is told to drain again,
            // with a fresh deadline, when it reconnects.
            let reason = format!(
                "the agent did not report the drain done within its deadline ({:.0}s)",
                drain.timeout.as_secs_f64()
            );
            self.fail_drain(id, reason, now);
        }

        let Some(record) = self.nodes.get_mut(&id) else {
            return;
        };
        if let Some(grace_until) = record.restart_grace_until {
            if now < grace_until {
                return;
            }
            let reason = "did not reconnect within the grace after the orchestrator restarted";
            if record.termination.is_some() {
                self.finish_terminated(id, format!("{reason}; it had been told to terminate"), now);
            } else {
                self.unexpected_failures_total += 1;
                self.finish(
                    id,
                    NodeState::Failed,
                    EventKind::NodeFailed,
                    reason.to_owned(),
                    now,
                );
            }
            return;
        }
        let silence = now.saturating_duration_since(record.last_seen);
        if let Some(session) = record.session
            && record.state != NodeState::Suspect
            && silence > timeout + own_delay
        {
            if record.termination.as_ref().is_some_and(|t| t.acknowledged) {
                self.queue(Effect::CloseSession {
                    node: id,
                    session,
                    reason: CloseReason::TerminatedSilently,
                });
                let reason = format!(
                    "silent for {:.1}s after acknowledging terminate",
                    silence.as_secs_f64()
                );
                self.finish_terminated(id, reason, now);
                return;
            }
            record.state = NodeState::Suspect;
            record.suspect_checks = 0;
            record.state_reason = format!("no heartbeat for {:.1}s", silence.as_secs_f64());
            if own_delay >= NOTABLE_OWN_DELAY {
                record.state_reason += &format!(
                    " (allowing {:.1}s for the orchestrator's own delay in reading)",
                    own_delay.as_secs_f64()
                );
            }
            if let Some(maintenance) = &mut record.maintenance {
                maintenance.away_since = Some(record.last_seen);
                record.state_reason = format!(
                    "in maintenance, away: {}; FAILED if still away after maintenance_max ({:.0}s)",
                    record.state_reason,
                    self.config.disruption.maintenance_max.as_secs_f64()
                );
            }
            let waits = record.maintenance.is_none()
                && record.wait_out_reconnect_window(self.reconnect_window_until, now);
            let reason = record.state_reason.clone();
            self.publish(id, EventKind::NodeSuspected, reason, now);
            if waits {
                return;
            }
        }

        let Some(record) = self.nodes.get_mut(&id) else {
            return;
        };
        if record.state != NodeState::Suspect {
            return;
        }
        let reason = if let Some(maintenance) = &record.maintenance {
            let away_since = maintenance.away_since.unwrap_or(now);
            let away = now.saturating_duration_since(away_since);
            if away < self.config.disruption.maintenance_max {
                return;
            }
            format!(
                "in maintenance but away for {:.0}s, longer than maintenance_max ({:.0}s)",
                away.as_secs_f64(),
                self.config.disruption.maintenance_max.as_secs_f64()
            )
        } else {
            record.suspect_checks += 1;
            if record.suspect_checks < required {
                return;
            }
            format!(
                "{} ({} consecutive checks)",
                record.state_reason, record.suspect_checks
            )
        };
        let session = record.session;
        self.declare_failed(id, session, reason, now);
    }

    /// FAILED, unexpectedly: counted, evented, and its stream (if still open) closed.
    fn declare_failed(&mut self, id: NodeId, session: Option<SessionId>, reason: String, now: Instant) {
        if let Some(session) = session {
            self.queue(Effect::CloseSession {
                node: id,
                session,
                reason: CloseReason::DeclaredFailed,
            });
        }
        self.unexpected_failures_total += 1;
        self.finish(id, NodeState::Failed, EventKind::NodeFailed, reason, now);
    }
}

/// When the detector next has something to decide about `record`, never before
/// `now`; None if never (a node with no session in a state nothing times out of).
fn next_due(config: &LifecycleConfig, record: &NodeRecord, now: Instant) -> Option<Instant> {
    let due = if let Some(ended_at) = record.ended_at {
        ended_at.checked_add(config.node_retention)
    } else {
        let terminate_deadline = record
            .termination
            .as_ref()
            .filter(|t| !t.acknowledged)
            .map(|t| t.deadline);
        let drain_deadline = record
            .drain
            .as_ref()
            .filter(|d| !d.completed && record.session.is_some())
            .map(|d| d.deadline);
        let pending_deadline = match (terminate_deadline, drain_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let away_until = record
            .maintenance
            .as_ref()
            .filter(|_| record.state == NodeState::Suspect)
            .map(|m| m.away_since.unwrap_or(now) + config.disruption.maintenance_max);
        let judged_at = if let Some(away_until) = away_until {
            Some(away_until)
        } else if let Some(grace_until) = record.restart_grace_until {
            // Gone silent on a live session within the post-restart grace: looked
            // at every check, so that its beats, if they resume, are seen.
            Some(if record.session.is_some() {
                now
            } else {
                grace_until
            })
        } else if record.state == NodeState::Suspect {
            // Suspect nodes count consecutive checks: every check.
            Some(now)
        } else if record.session.is_some() {
            // Judged once the silence exceeds the timeout.
            record
                .last_seen
                .checked_add(config.heartbeat_timeout)
                .map(|at| at + TICK)
        } else {
            None
        };
        match (pending_deadline, judged_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    };
    due.map(|due| due.max(now))
}

#[cfg(test)]
mod tests {
    //! The schedule against the plain algorithm it replaces: visit every node.

    use std::{
        net::{IpAddr, Ipv4Addr},
        time::SystemTime,
    };

    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;
    use crate::domain::node::{NodeInfo, SessionId};

    fn config() -> LifecycleConfig {
        LifecycleConfig {
            heartbeat_timeout: Duration::from_secs(3),
            dead_node_check_interval: Duration::from_millis(500),
            required_consecutive_failures: 2,
            termination_deadline: Duration::from_secs(4),
            termination_grace_period: Duration::from_secs(1),
            node_retention: Duration::from_secs(10),
            disruption: crate::domain::registry::DisruptionConfig {
                drain_deadline: Duration::from_secs(2),
                maintenance_max: Duration::from_secs(5),
                budget: crate::domain::node::DisruptionBudget::Nodes(3),
                protect_label: None,
                failure_domain_label: None,
            },
        }
    }

    fn info(n: u8) -> NodeInfo {
        NodeInfo {
            id: NodeId(Uuid::from_u128(u128::from(n) + 1)),
            hostname: format!("edge-{n}"),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)),
            agent_version: "test".into(),
            labels: Default::default(),
            host: Default::default(),
        }
    }

    impl Registry {
        /// The algorithm the schedule replaces: judge every node, in id order.
        fn check_every_node(&mut self, now: Instant) {
            if self.stalled(now) {
                return;
            }
            let mut ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            ids.sort_unstable();
            for id in ids {
                self.check_node(id, now, Duration::ZERO);
            }
        }
    }

    #[test]
    fn a_check_looks_only_at_nodes_whose_time_has_come() {
        let start = Instant::now();
        let mut registry = Registry::new(config(), start, SystemTime::UNIX_EPOCH);
        let sessions: Vec<SessionId> = (0..100).map(|n| registry.connect(info(n), start)).collect();
        // Heartbeats every second, checks every half second, for a minute.
        let mut visits = Vec::new();
        for step in 1..=120u32 {
            let now = start + Duration::from_millis(500) * step;
            if step % 2 == 0 {
                for (n, session) in sessions.iter().enumerate() {
                    registry.heartbeat(info(n as u8).id, *session, now).unwrap();
                }
            }
            visits.push(registry.check(now));
        }
        assert!(registry.nodes.values().all(|r| r.state == NodeState::Connected));
        // Each node is looked at once per heartbeat timeout at most, not every check.
        let total: usize = visits.iter().sum();
        assert!(total <= 100 * 60 / 2, "{total} visits in 120 checks of 100 nodes");
        assert_eq!(visits[..5], [0; 5], "nobody is due before the timeout");
        // One node goes silent: it is found without anyone else being looked at more.
        let silent = info(0).id;
        for step in 121..=130u32 {
            let now = start + Duration::from_millis(500) * step;
            if step % 2 == 0 {
                for (n, session) in sessions.iter().enumerate().skip(1) {
                    registry.heartbeat(info(n as u8).id, *session, now).unwrap();
                }
            }
            registry.check(now);
        }
        assert_eq!(registry.nodes[&silent].state, NodeState::Failed);
        assert_eq!(
            registry
                .nodes
                .values()
                .filter(|r| r.state == NodeState::Connected)
                .count(),
            99
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Connect(u8),
        Heartbeat(u8),
        Close(u8),
        Goodbye(u8),
        Terminate(u8),
        Ack(u8),
        Advance(u16),
        Check,
        Restart(u16),
        Drain(u8),
        DrainThenTerminate(u8),
        DrainDone(u8, bool),
        Resume(u8),
        ResumeDone(u8, bool),
        Maintenance(u8, bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        let node = 0..6u8;
        prop_oneof![
            2 => node.clone().prop_map(Op::Connect),
            4 => node.clone().prop_map(Op::Heartbeat),
            1 => node.clone().prop_map(Op::Close),
            1 => node.clone().prop_map(Op::Goodbye),
            1 => node.clone().prop_map(Op::Terminate),
            1 => node.clone().prop_map(Op::Ack),
            4 => (1..3000u16).prop_map(Op::Advance),
            4 => Just(Op::Check),
            1 => (0..8000u16).prop_map(Op::Restart),
            1 => node.clone().prop_map(Op::Drain),
            1 => node.clone().prop_map(Op::DrainThenTerminate),
            1 => (node.clone(), any::<bool>()).prop_map(|(n, ok)| Op::DrainDone(n, ok)),
            1 => node.clone().prop_map(Op::Resume),
            1 => (node.clone(), any::<bool>()).prop_map(|(n, ok)| Op::ResumeDone(n, ok)),
            1 => (node, any::<bool>()).prop_map(|(n, on)| Op::Maintenance(n, on)),
        ]
    }

    /// Runs one op on a registry; the live sessions are the caller's.
    fn apply(registry: &mut Registry, sessions: &mut [Option<SessionId>; 6], op: &Op, now: Instant) {
        let id = |n: &u8| info(*n).id;
        match op {
            Op::Connect(n) => sessions[*n as usize] = Some(registry.connect(info(*n), now)),
            Op::Heartbeat(n) => {
                if let Some(session) = sessions[*n as usize] {
                    let _ = registry.heartbeat(id(n), session, now);
                }
            }
            Op::Close(n) => {
                if let Some(session) = sessions[*n as usize].take() {
                    registry.stream_closed(id(n), session, "reset", now);
                }
            }
            Op::Goodbye(n) => {
                if let Some(session) = sessions[*n as usize].take() {
                    let _ = registry.goodbye(id(n), session, "bye", now);
                }
            }
            Op::Terminate(n) => {
                let _ = registry.request_terminate(id(n), "operator", now);
            }
            Op::Ack(n) => {
                if let Some(session) = sessions[*n as usize] {
                    let _ = registry.terminate_ack(id(n), session, now);
                }
            }
            Op::Check => {
                registry.check(now);
            }
            Op::Drain(n) => {
                let request = crate::domain::registry::DrainRequest {
                    reason: "operator".into(),
                    deadline: None,
                    force: false,
                };
                let _ = registry.request_drain(id(n), request, now);
            }
            Op::DrainThenTerminate(n) => {
                let request = crate::domain::registry::DrainRequest {
                    reason: "scale down".into(),
                    deadline: None,
                    force: true,
                };
                let _ = registry.drain_then_terminate(id(n), "scale down", request, now);
            }
            Op::DrainDone(n, ok) => {
                if let Some(session) = sessions[*n as usize] {
                    let _ = registry.drain_result(id(n), session, *ok, "hook", now);
                }
            }
            Op::Resume(n) => {
                let _ = registry.resume(id(n), "operator", now);
            }
            Op::ResumeDone(n, ok) => {
                if let Some(session) = sessions[*n as usize] {
                    let _ = registry.resume_result(id(n), session, *ok, "hook", now);
                }
            }
            Op::Maintenance(n, on) => {
                let _ = registry.set_maintenance(id(n), *on, "reboot", now);
            }
            Op::Advance(_) | Op::Restart(_) => {}
        }
    }

    fn published(registry: &mut Registry) -> Vec<(NodeId, EventKind, NodeState)> {
        let mut events: Vec<_> = registry
            .take_effects()
            .into_iter()
            .filter_map(|effect| match effect {
                Effect::Publish(event) => event.node.as_ref().map(|node| (node.id, event.kind, node.state)),
                _ => None,
            })
            .collect();
        events.sort_by_key(|(id, kind, _)| (*id, format!("{kind:?}")));
        events
    }

    proptest! {
        /// Whatever happens (drains, resumes and maintenance included), checking
        /// only the due nodes decides exactly what checking every node decides:
        /// same states, same events. And no transition is lost: every change of
        /// a node's state comes with an event that names the new state.
        #[test]
        fn the_schedule_decides_what_a_full_scan_decides(ops in proptest::collection::vec(op(), 1..120)) {
            let start = Instant::now();
            let mut scheduled = Registry::new(config(), start, SystemTime::UNIX_EPOCH);
            let mut scanned = Registry::new(config(), start, SystemTime::UNIX_EPOCH);
            let (mut s1, mut s2) = ([None; 6], [None; 6]);
            let mut now = start;
            for op in &ops {
                let before: Vec<_> = (0..6u8)
                    .map(|n| scheduled.snapshot(info(n).id).map(|s| s.state))
                    .collect();
                match op {
                    Op::Advance(ms) => now += Duration::from_millis(u64::from(*ms)),
                    Op::Restart(grace_ms) => {
                        // A restart: what was persisted comes back with a grace.
                        let grace = Duration::from_millis(u64::from(*grace_ms));
                        let persisted = |r: &Registry| {
                            let mut nodes: Vec<_> = r.nodes.keys().filter_map(|id| r.persisted(*id)).collect();
                            nodes.sort_by_key(|node| node.id);
                            nodes
                        };
                        let mut fresh = Registry::new(config(), now, SystemTime::UNIX_EPOCH);
                        fresh.restore(persisted(&scheduled), now, grace);
                        scheduled = fresh;
                        let mut fresh = Registry::new(config(), now, SystemTime::UNIX_EPOCH);
                        fresh.restore(persisted(&scanned), now, grace);
                        scanned = fresh;
                        s1 = [None; 6];
                        s2 = [None; 6];
                    }
                    Op::Check => {
                        scheduled.check(now);
                        scanned.check_every_node(now);
                    }
                    op => {
                        apply(&mut scheduled, &mut s1, op, now);
                        apply(&mut scanned, &mut s2, op, now);
                    }
                }
                let events = published(&mut scheduled);
                prop_assert_eq!(&events, &published(&mut scanned), "after {:?}", op);
                for n in 0..6u8 {
                    let id = info(n).id;
                    let after = scheduled.snapshot(id).map(|s| s.state);
                    if after != before[n as usize]
                        && !matches!(op, Op::Restart(_))
                        && let Some(state) = after
                    {
                        prop_assert!(
                            events.iter().any(|(node, _, said)| *node == id && *said == state),
                            "node {} went {:?} -> {:?} on {:?} without an event saying so: {:?}",
                            n, before[n as usize], after, op, events
                        );
                    }
                    let a = scheduled.snapshot(id).map(|s| (s.state, s.termination.is_some()));
                    let b = scanned.snapshot(id).map(|s| (s.state, s.termination.is_some()));
                    prop_assert_eq!(a, b, "node {} after {:?}", n, op);
                }
            }
        }
    }
}
