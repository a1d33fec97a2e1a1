//! The healer: turns unexpected node failures into self-healing requests, within
//! limits (DESIGN.md, "Node lifecycle"; the seed's "Self-Healing Tuning").
//!
//! It is sans-IO: failures come in with the wall-clock `now` (the ledger outlives
//! restarts, so monotonic instants will not do), decisions come out. Three limits:
//! - an hourly budget (`max_self_healing_per_hour`), over a rolling hour;
//! - a cooldown per node identity (`self_healing_cooldown_minutes`), so a node that
//!   crash-loops is not replaced over and over;
//! - a mass-failure guard: when more than `mass_failure_fraction` of the fleet
//!   (and at least `mass_failure_min_nodes` nodes) failed within
//!   `mass_failure_window`, the orchestrator suspects itself or the network rather
//!   than the nodes. It raises one alert, listing every node failed in the window,
//!   and heals none of them; the guard stays up until a window passes without a
//!   failure. The operator (or the alert's receiver) decides what to replace.
//!
//! Nodes out of service when they failed: a DRAINED node carried no traffic and
//! an operator took it out, so it is not healed (held, cause `drained`); a node in
//! maintenance that stayed away past `maintenance_max` is healed as usual, but
//! neither it nor its absence counts towards a mass failure.
//!
//! Nothing is dropped silently: every failure yields a [`HealDecision`], and a held one
//! says which limit held it.

use std::{
    collections::VecDeque,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use crate::domain::node::{NodeId, OutOfService};

/// One hour, the budget's window.
const HOUR: Duration = Duration::from_secs(3600);

/// The healer's limits.
#[derive(Debug, Clone, PartialEq)]
pub struct HealingPolicy {
    /// Heals allowed in any rolling hour.
    pub max_per_hour: u32,
    /// Minimum time between two heals of the same node identity.
    pub cooldown: Duration,
    /// Share of the fleet that must fail within the window to count as a mass
    /// failure (strictly more than this); 1.0 turns the guard off.
    pub mass_failure_fraction: f64,
    /// The window over which failures are counted together.
    pub mass_failure_window: Duration,
    /// Fewer failures than this in a window are never a mass failure, so a small
    /// fleet losing one node still heals.
    pub mass_failure_min_nodes: u32,
}

/// A node declared failed, as the healer needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedNode {
    /// The node.
    pub id: NodeId,
    /// Its address.
    pub ip: IpAddr,
    /// Its host name.
    pub hostname: String,
    /// Whether it was out of service (drained, in maintenance) when it failed.
    pub out_of_service: Option<OutOfService>,
}

/// One past heal, as the ledger keeps it (persisted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealRecord {
    /// When the heal was requested.
    pub at: SystemTime,
    /// The node it replaced.
    pub node: NodeId,
}

/// Which limit held a failure back.
#[derive(Debug, Clone, PartialEq)]
pub enum HoldCause {
    /// The hourly budget is used up.
    HourlyBudget {
        /// Heals in the last hour.
        used: u32,
    },
    /// The same node identity was healed too recently.
    Cooldown {
        /// Its last heal.
        last_healed: SystemTime,
    },
    /// The node was drained: it carried no traffic and an operator took it out
    /// of service, so it is not replaced.
    Drained,
    /// Part of a mass failure.
    MassFailure {
        /// Failures in the window.
        failed: u32,
        /// Fleet size the fraction is taken of.
        fleet_size: u32,
    },
}

impl HoldCause {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            HoldCause::HourlyBudget { .. } => "hourly_budget",
            HoldCause::Cooldown { .. } => "cooldown",
            HoldCause::Drained => "drained",
            HoldCause::MassFailure { .. } => "mass_failure",
        }
    }
}

/// What to do about failures.
#[derive(Debug, Clone, PartialEq)]
pub enum HealDecision {
    /// Request a replacement (UNEXPECTED_NODE_FAILURE); the heal is in the ledger.
    Heal {
        /// The failed node.
        node: FailedNode,
        /// The ledger entry to persist.
        record: HealRecord,
    },
    /// Do not heal, because of `cause`.
    Hold {
        /// The failed node.
        node: FailedNode,
        /// Why not.
        cause: HoldCause,
    },
    /// Raise one MASS_NODE_FAILURE alert.
    MassFailure {
        /// Every node failed within the window, oldest first.
        failed: Vec<FailedNode>,
        /// Nodes live before these failures.
        fleet_size: u32,
    },
}

/// The healer's state: the ledger of heals and the failures of the current window.
#[derive(Debug)]
pub struct Healer {
    policy: HealingPolicy,
    /// Heals of the last `max(hour, cooldown)`, oldest first.
    ledger: VecDeque<HealRecord>,
    /// Failures of the last window, oldest first.
    recent: VecDeque<(SystemTime, FailedNode)>,
    /// The mass-failure guard is up until then (extended by each failure).
    guard_until: Option<SystemTime>,
}

impl Healer {
    /// A healer that remembers `ledger` (loaded from the store).
    pub fn new(policy: HealingPolicy, mut ledger: Vec<HealRecord>) -> Self {
        ledger.sort_by_key(|record| record.at);
        Self {
            policy,
            ledger: ledger.into(),
            recent: VecDeque::new(),
            guard_until: None,
        }
    }

    /// The limits in force.
    pub fn policy(&self) -> &HealingPolicy {
        &self.policy
    }

    /// How long heal records matter; older ones can be pruned from the store.
    pub fn ledger_horizon(&self) -> Duration {
        HOUR.max(self.policy.cooldown)
    }

    /// Decides about failures declared together (one detector round), given the
    /// number of nodes still live after them.
    pub fn on_failures(
        &mut self,
        failed: Vec<FailedNode>,
        live_nodes: u32,
        now: SystemTime,
    ) -> Vec<HealDecision> {
        if failed.is_empty() {
            return Vec::new();
        }
        self.prune(now);
        let mut decisions = Vec::new();
        let (drained, failed): (Vec<_>, Vec<_>) = failed
            .into_iter()
            .partition(|node| node.out_of_service == Some(OutOfService::Drained));
        decisions.extend(drained.into_iter().map(|node| HealDecision::Hold {
            node,
            cause: HoldCause::Drained,
        }));
        if failed.is_empty() {
            return decisions;
        }
        self.recent.extend(
            failed
                .iter()
                .filter(|node| node.out_of_service.is_none())
                .map(|node| (now, node.clone())),
        );
        let in_window = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        let fleet_size = live_nodes.saturating_add(in_window);

        let guard_up = self.guard_until.is_some_and(|until| now < until);
        let mass = in_window >= self.policy.mass_failure_min_nodes
            && f64::from(in_window) > self.policy.mass_failure_fraction * f64::from(fleet_size);
        if guard_up || mass {
            self.guard_until = Some(now + self.policy.mass_failure_window);
            if !guard_up {
                decisions.push(HealDecision::MassFailure {
                    failed: self.recent.iter().map(|(_, node)| node.clone()).collect(),
                    fleet_size,
                });
            }
            let cause = HoldCause::MassFailure {
                failed: in_window,
                fleet_size,
            };
            decisions.extend(failed.into_iter().map(|node| HealDecision::Hold {
                node,
                cause: cause.clone(),
            }));
            return decisions;
        }
        decisions.extend(failed.into_iter().map(|node| self.decide(node, now)));
        decisions
    }

    fn decide(&mut self, node: FailedNode, now: SystemTime) -> HealDecision {
        let last_healed = self
            .ledger
            .iter()
            .rev()
            .find(|record| record.node == node.id)
            .map(|record| record.at);
        if let Some(last_healed) = last_healed
            && age(last_healed, now) < self.policy.cooldown
        {
            return HealDecision::Hold {
                node,
                cause: HoldCause::Cooldown { last_healed },
            };
        }
        let used = self
            .ledger
            .iter()
            .filter(|record| age(record.at, now) < HOUR)
            .count();
        let used = u32::try_from(used).unwrap_or(u32::MAX);
        if used >= self.policy.max_per_hour {
            return HealDecision::Hold {
                node,
                cause: HoldCause::HourlyBudget { used },
            };
        }
        let record = HealRecord {
            at: now,
            node: node.id,
        };
        self.ledger.push_back(record);
        HealDecision::Heal { node, record }
    }

    fn prune(&mut self, now: SystemTime) {
        let horizon = self.ledger_horizon();
        while self
            .ledger
            .front()
            .is_some_and(|record| age(record.at, now) >= horizon)
        {
            self.ledger.pop_front();
        }
        let window = self.policy.mass_failure_window;
        while self.recent.front().is_some_and(|(at, _)| age(*at, now) >= window) {
            self.recent.pop_front();
        }
    }
}

/// Time from `then` to `now`; zero if the wall clock went backwards.
fn age(then: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use uuid::Uuid;

    use super::*;

    fn policy() -> HealingPolicy {
        HealingPolicy {
            max_per_hour: 5,
            cooldown: Duration::from_secs(15 * 60),
            mass_failure_fraction: 0.5,
            mass_failure_window: Duration::from_secs(60),
            mass_failure_min_nodes: 3,
        }
    }

    fn node(n: u8) -> FailedNode {
        FailedNode {
            id: NodeId(Uuid::from_bytes([n; 16])),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)),
            hostname: format!("edge-{n}"),
            out_of_service: None,
        }
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    fn healed(decisions: &[HealDecision]) -> Vec<NodeId> {
        decisions
            .iter()
            .filter_map(|decision| match decision {
                HealDecision::Heal { node, .. } => Some(node.id),
                _ => None,
            })
            .collect()
    }

    fn held(decisions: &[HealDecision]) -> Vec<(NodeId, &'static str)> {
        decisions
            .iter()
            .filter_map(|decision| match decision {
                HealDecision::Hold { node, cause } => Some((node.id, cause.label())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn one_failure_in_a_healthy_fleet_is_healed_once_and_recorded() {
        let mut healer = Healer::new(policy(), Vec::new());
        let decisions = healer.on_failures(vec![node(1)], 9, at(0));
        assert_eq!(
            decisions,
            vec![HealDecision::Heal {
                node: node(1),
                record: HealRecord {
                    at: at(0),
                    node: node(1).id
                },
            }]
        );
    }

    #[test]
    fn the_hourly_budget_holds_the_sixth_heal_until_the_hour_has_rolled() {
        let mut healer = Healer::new(policy(), Vec::new());
        for n in 1..=5 {
            // Spread out so the mass-failure guard stays out of it.
            let decisions = healer.on_failures(vec![node(n)], 100, at(u64::from(n) * 120));
            assert_eq!(healed(&decisions), vec![node(n).id]);
        }
        let sixth = healer.on_failures(vec![node(6)], 100, at(720));
        assert_eq!(held(&sixth), vec![(node(6).id, "hourly_budget")]);
        // The first heal (at 120 s) leaves the rolling hour at 3720 s.
        let later = healer.on_failures(vec![node(7)], 100, at(3720));
        assert_eq!(healed(&later), vec![node(7).id]);
    }

    #[test]
    fn the_same_identity_is_not_replaced_again_within_the_cooldown() {
        let mut healer = Healer::new(policy(), Vec::new());
        assert_eq!(
            healed(&healer.on_failures(vec![node(1)], 9, at(0))),
            vec![node(1).id]
        );
        let again = healer.on_failures(vec![node(1)], 9, at(14 * 60));
        assert_eq!(held(&again), vec![(node(1).id, "cooldown")]);
        let after = healer.on_failures(vec![node(1)], 9, at(15 * 60));
        assert_eq!(healed(&after), vec![node(1).id]);
    }

    #[test]
    fn the_ledger_survives_a_restart() {
        let mut before = Healer::new(policy(), Vec::new());
        let records: Vec<HealRecord> = (1..=5)
            .flat_map(|n| before.on_failures(vec![node(n)], 100, at(u64::from(n) * 100)))
            .filter_map(|decision| match decision {
                HealDecision::Heal { record, .. } => Some(record),
                _ => None,
            })
            .collect();
        assert_eq!(records.len(), 5);
        let mut after = Healer::new(policy(), records);
        let decisions = after.on_failures(vec![node(9)], 100, at(900));
        assert_eq!(held(&decisions), vec![(node(9).id, "hourly_budget")]);
        let decisions = after.on_failures(vec![node(1)], 100, at(901));
        assert_eq!(held(&decisions), vec![(node(1).id, "cooldown")]);
    }

    #[test]
    fn most_of_the_fleet_failing_together_raises_one_alert_and_heals_none_of_it() {
        let mut healer = Healer::new(policy(), Vec::new());
        let all = vec![node(1), node(2), node(3), node(4)];
        let decisions = healer.on_failures(all.clone(), 1, at(0));
        assert_eq!(
            decisions[0],
            HealDecision::MassFailure {
                failed: all,
                fleet_size: 5
            }
        );
        assert_eq!(held(&decisions).len(), 4);
        assert!(healed(&decisions).is_empty());
    }

    #[test]
    fn a_mass_failure_spread_over_rounds_is_still_one_alert() {
        let mut healer = Healer::new(policy(), Vec::new());
        // 2 of 5: not (yet) a mass failure, healed.
        let first = healer.on_failures(vec![node(1), node(2)], 3, at(0));
        assert_eq!(healed(&first).len(), 2);
        // A third within the window: 3 of 5 > 0.5 -> alert listing all three.
        let second = healer.on_failures(vec![node(3)], 2, at(10));
        let alerts: Vec<_> = second
            .iter()
            .filter(|decision| matches!(decision, HealDecision::MassFailure { .. }))
            .collect();
        assert_eq!(alerts.len(), 1);
        assert!(
            matches!(alerts[0], HealDecision::MassFailure { failed, fleet_size: 5 } if failed.len() == 3)
        );
        // The guard stays up: the fourth is held without another alert.
        let third = healer.on_failures(vec![node(4)], 1, at(20));
        assert_eq!(held(&third), vec![(node(4).id, "mass_failure")]);
        assert_eq!(third.len(), 1);
        // A quiet window later, a lone failure heals again.
        let later = healer.on_failures(vec![node(5)], 10, at(20 + 61));
        assert_eq!(healed(&later), vec![node(5).id]);
    }

    #[test]
    fn a_small_fleet_losing_one_node_heals() {
        let mut healer = Healer::new(policy(), Vec::new());
        // One of one is 100 %, but below mass_failure_min_nodes.
        assert_eq!(
            healed(&healer.on_failures(vec![node(1)], 0, at(0))),
            vec![node(1).id]
        );
        assert_eq!(
            healed(&healer.on_failures(vec![node(2)], 1, at(1))),
            vec![node(2).id]
        );
    }

    #[test]
    fn a_fraction_of_one_turns_the_guard_off() {
        let mut healer = Healer::new(
            HealingPolicy {
                mass_failure_fraction: 1.0,
                max_per_hour: 100,
                ..policy()
            },
            Vec::new(),
        );
        let all: Vec<_> = (1..=10).map(node).collect();
        assert_eq!(healed(&healer.on_failures(all, 0, at(0))).len(), 10);
    }

    #[test]
    fn a_wall_clock_that_jumps_back_does_not_panic_or_free_the_budget() {
        let mut healer = Healer::new(policy(), Vec::new());
        for n in 1..=5 {
            healer.on_failures(vec![node(n)], 100, at(1000 + u64::from(n) * 100));
        }
        let decisions = healer.on_failures(vec![node(9)], 100, at(0));
        assert_eq!(held(&decisions), vec![(node(9).id, "hourly_budget")]);
    }

    fn out_of_service(n: u8, why: OutOfService) -> FailedNode {
        FailedNode {
            out_of_service: Some(why),
            ..node(n)
        }
    }

    #[test]
    fn a_drained_node_that_fails_is_held_and_spends_no_budget() {
        let mut healer = Healer::new(policy(), Vec::new());
        let decisions = healer.on_failures(vec![out_of_service(1, OutOfService::Drained)], 10, at(0));
        assert_eq!(held(&decisions), vec![(node(1).id, "drained")]);
        // Four drained failures at once are not a mass failure either.
        let drained = (2..=5)
            .map(|n| out_of_service(n, OutOfService::Drained))
            .collect();
        let decisions = healer.on_failures(drained, 1, at(1));
        assert!(decisions.iter().all(|d| matches!(
            d,
            HealDecision::Hold {
                cause: HoldCause::Drained,
                ..
            }
        )));
        let decisions = healer.on_failures(vec![node(6)], 10, at(2));
        assert_eq!(healed(&decisions), vec![node(6).id], "the budget is untouched");
    }

    #[test]
    fn maintenance_failures_are_healed_but_not_counted_towards_a_mass_failure() {
        let mut healer = Healer::new(policy(), Vec::new());
        // Three failures in a window of a fleet of three would be a mass failure;
        // two of them were in maintenance, away too long, so they are not counted.
        let failed = vec![
            out_of_service(1, OutOfService::Maintenance),
            out_of_service(2, OutOfService::Maintenance),
            node(3),
        ];
        let decisions = healer.on_failures(failed, 1, at(0));
        assert!(
            !decisions
                .iter()
                .any(|d| matches!(d, HealDecision::MassFailure { .. }))
        );
        assert_eq!(healed(&decisions), vec![node(1).id, node(2).id, node(3).id]);
    }
}
