//! The healer: turns unexpected node failures into self-healing requests, within
//! limits (DESIGN.md, "Node lifecycle"; the seed's "Self-Healing Tuning").
//!
//! It is sans-IO: failures come in with the wall-clock `now` (the ledger outlives
//! restarts, so monotonic instants will not do), decisions come out. Three limits:
//! - an hourly budget (`max_self_healing_per_hour`), over a rolling hour, per
//!   failure domain;
//! - a cooldown per node identity (`self_healing_cooldown_minutes`), so a node that
//!   crash-loops is not replaced over and over;
//! - a mass-failure guard, per failure domain: when more than
//!   `mass_failure_fraction` of a domain's nodes (and at least
//!   `mass_failure_min_nodes` nodes) failed within `mass_failure_window`, the
//!   orchestrator suspects the network (a PoP's uplink) or itself rather than the
//!   nodes. It raises one alert for that domain, listing every node failed in the
//!   window, and heals none of them; the guard stays up until a window passes
//!   without a failure there. Other domains keep healing normally.
//!
//! Failure domains are the values of `failure_domain_label` (a PoP, say): the
//! registry names each node's (`pop=fra1`; `!pop` for nodes without the label;
//! the empty name, the whole fleet, when no label is configured).
//!
//! Nodes out of service when they failed: a DRAINED node carried no traffic and
//! an operator took it out, so it is not healed (held, cause `drained`); a node in
//! maintenance that stayed away past `maintenance_max` is healed as usual, but
//! neither it nor its absence counts towards a mass failure.
//!
//! Paused (`SetAutomation`): every failure is held with the cause `paused` and
//! kept; on resume, the caller hands back those still FAILED and they are decided
//! as if they failed then (budget, cooldown and guard apply).
//!
//! Nothing is dropped silently: every failure yields a [`HealDecision`], and a held one
//! says which limit held it.

use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    time::{Duration, SystemTime},
};

use crate::domain::node::{NodeId, OutOfService};

/// One hour, the budget's window.
const HOUR: Duration = Duration::from_secs(3600);

/// The healer's limits.
#[derive(Debug, Clone, PartialEq)]
pub struct HealingPolicy {
    /// Heals allowed in any rolling hour, per failure domain.
    pub max_per_hour: u32,
    /// Minimum time between two heals of the same node identity.
    pub cooldown: Duration,
    /// Share of a domain that must fail within the window to count as a mass
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
    /// Its failure domain (`pop=fra1`; empty without `failure_domain_label`).
    pub domain: String,
    /// Its labels (events about it carry them, for selectors).
    pub labels: BTreeMap<String, String>,
}

/// One past heal, as the ledger keeps it (persisted).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealRecord {
    /// When the heal was requested.
    pub at: SystemTime,
    /// The node it replaced.
    pub node: NodeId,
    /// The node's failure domain (empty in records from before domains, and
    /// without `failure_domain_label`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
}

/// Which limit held a failure back.
#[derive(Debug, Clone, PartialEq)]
pub enum HoldCause {
    /// The domain's hourly budget is used up.
    HourlyBudget {
        /// Heals in the last hour in the node's domain.
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
    /// Healing is paused (`SetAutomation`).
    Paused,
    /// Part of a mass failure of its domain.
    MassFailure {
        /// Failures in the window, in the domain.
        failed: u32,
        /// The domain's size the fraction is taken of.
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
            HoldCause::Paused => "paused",
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
    /// Raise one MASS_NODE_FAILURE alert for a domain.
    MassFailure {
        /// Every node of the domain failed within the window, oldest first.
        failed: Vec<FailedNode>,
        /// The domain's nodes live before these failures.
        fleet_size: u32,
        /// The domain's nodes suspect now, not yet declared (failing too).
        suspect: u32,
        /// The domain (`pop=fra1`; empty: the whole fleet).
        domain: String,
    },
}

/// A failure domain's nodes besides those just declared failed: live ones
/// (suspect ones included; not those in maintenance), and of them, how many are
/// suspect now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Population {
    /// Live nodes (not in a final state, not in maintenance).
    pub live: u32,
    /// Of them, suspect now.
    pub suspect: u32,
}

/// One failure domain's recent failures and guard.
#[derive(Debug, Default)]
struct DomainWatch {
    /// Failures of the last window, oldest first.
    recent: VecDeque<(SystemTime, FailedNode)>,
    /// The mass-failure guard is up until then (extended by each failure).
    guard_until: Option<SystemTime>,
}

/// How healing stands in one failure domain, for operators.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DomainHealing {
    /// Heals requested in the last hour.
    pub heals_last_hour: u32,
    /// Heals the hourly budget still allows.
    pub budget_left: u32,
    /// Whether the mass-failure guard holds the domain's failures now.
    pub mass_failure_guard: bool,
}

/// The healer's state: the ledger of heals and each domain's recent failures.
#[derive(Debug)]
pub struct Healer {
    policy: HealingPolicy,
    /// Heals of the last `max(hour, cooldown)`, oldest first.
    ledger: VecDeque<HealRecord>,
    /// Per failure domain.
    domains: BTreeMap<String, DomainWatch>,
    /// Healing is paused: failures are held and kept here.
    paused: Option<Vec<FailedNode>>,
}

impl Healer {
    /// A healer that remembers `ledger` (loaded from the store).
    pub fn new(policy: HealingPolicy, mut ledger: Vec<HealRecord>) -> Self {
        ledger.sort_by_key(|record| record.at);
        Self {
            policy,
            ledger: ledger.into(),
            domains: BTreeMap::new(),
            paused: None,
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

    /// Whether healing is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// Pauses healing: from now on every failure is held (cause `paused`).
    pub fn pause(&mut self) {
        self.paused.get_or_insert_with(Vec::new);
    }

    /// Resumes healing; returns the failures held while paused, for the caller to
    /// hand back (those still FAILED) through [`Healer::on_failures`].
    pub fn resume(&mut self) -> Vec<FailedNode> {
        self.paused.take().unwrap_or_default()
    }

    /// How healing stands in failure domain `name` (a domain never heard of has
    /// its whole budget and no guard up).
    pub fn domain(&self, name: &str, now: SystemTime) -> DomainHealing {
        let heals_last_hour = self.heals_last_hour(name, now);
        DomainHealing {
            heals_last_hour,
            budget_left: self.policy.max_per_hour.saturating_sub(heals_last_hour),
            mass_failure_guard: self
                .domains
                .get(name)
                .and_then(|watch| watch.guard_until)
                .is_some_and(|until| now < until),
        }
    }

    /// Heals requested in `domain` in the rolling hour before `now`.
    fn heals_last_hour(&self, domain: &str, now: SystemTime) -> u32 {
        let used = self
            .ledger
            .iter()
            .filter(|record| record.domain == domain && age(record.at, now) < HOUR)
            .count();
        u32::try_from(used).unwrap_or(u32::MAX)
    }

    /// Decides about failures declared together (one detector round), given each
    /// failure domain's live nodes after them.
    pub fn on_failures(
        &mut self,
        failed: Vec<FailedNode>,
        live: &BTreeMap<String, Population>,
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
        if let Some(held) = &mut self.paused {
            held.extend(failed.iter().cloned());
            decisions.extend(failed.into_iter().map(|node| HealDecision::Hold {
                node,
                cause: HoldCause::Paused,
            }));
            return decisions;
        }
        let mut by_domain: BTreeMap<String, Vec<FailedNode>> = BTreeMap::new();
        for node in failed {
            by_domain.entry(node.domain.clone()).or_default().push(node);
        }
        for (domain, failed) in by_domain {
            let population = live.get(&domain).copied().unwrap_or_default();
            self.decide_domain(domain, failed, population, now, &mut decisions);
        }
        decisions
    }

    fn decide_domain(
        &mut self,
        domain: String,
        failed: Vec<FailedNode>,
        population: Population,
        now: SystemTime,
        decisions: &mut Vec<HealDecision>,
    ) {
        let watch = self.domains.entry(domain.clone()).or_default();
        watch.recent.extend(
            failed
                .iter()
                .filter(|node| node.out_of_service.is_none())
                .map(|node| (now, node.clone())),
        );
        let in_window = u32::try_from(watch.recent.len()).unwrap_or(u32::MAX);
        let fleet_size = population.live.saturating_add(in_window);
        // Nodes already suspect are failing too: a PoP that lost its uplink is
        // declared over a round or two (its streams broke, or went silent, a few
        // milliseconds or a heartbeat apart), and the first declared must not be
        // healed for want of the rest.
        let failing = in_window.saturating_add(population.suspect);

        let guard_up = watch.guard_until.is_some_and(|until| now < until);
        let mass = failing >= self.policy.mass_failure_min_nodes
            && f64::from(failing) > self.policy.mass_failure_fraction * f64::from(fleet_size);
        if guard_up || mass {
            watch.guard_until = Some(now + self.policy.mass_failure_window);
            if !guard_up {
                decisions.push(HealDecision::MassFailure {
                    failed: watch.recent.iter().map(|(_, node)| node.clone()).collect(),
                    fleet_size,
                    suspect: population.suspect,
                    domain,
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
            return;
        }
        decisions.extend(failed.into_iter().map(|node| self.decide(node, now)));
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
        let used = self.heals_last_hour(&node.domain, now);
        if used >= self.policy.max_per_hour {
            return HealDecision::Hold {
                node,
                cause: HoldCause::HourlyBudget { used },
            };
        }
        let record = HealRecord {
            at: now,
            node: node.id,
            domain: node.domain.clone(),
        };
        self.ledger.push_back(record.clone());
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
        self.domains.retain(|_, watch| {
            while watch
                .recent
                .front()
                .is_some_and(|(at, _)| age(*at, now) >= window)
            {
                watch.recent.pop_front();
            }
            !watch.recent.is_empty() || watch.guard_until.is_some_and(|until| now < until)
        });
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
            domain: String::new(),
            labels: Default::default(),
        }
    }

    /// The whole fleet as one domain, with `n` live nodes, none suspect.
    fn live(n: u32) -> BTreeMap<String, Population> {
        [(String::new(), Population { live: n, suspect: 0 })].into()
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
        let decisions = healer.on_failures(vec![node(1)], &live(9), at(0));
        assert_eq!(
            decisions,
            vec![HealDecision::Heal {
                node: node(1),
                record: HealRecord {
                    at: at(0),
                    node: node(1).id,
                    domain: String::new(),
                },
            }]
        );
    }

    #[test]
    fn the_hourly_budget_holds_the_sixth_heal_until_the_hour_has_rolled() {
        let mut healer = Healer::new(policy(), Vec::new());
        for n in 1..=5 {
            // Spread out so the mass-failure guard stays out of it.
            let decisions = healer.on_failures(vec![node(n)], &live(100), at(u64::from(n) * 120));
            assert_eq!(healed(&decisions), vec![node(n).id]);
        }
        let sixth = healer.on_failures(vec![node(6)], &live(100), at(720));
        assert_eq!(held(&sixth), vec![(node(6).id, "hourly_budget")]);
        // The first heal (at 120 s) leaves the rolling hour at 3720 s.
        let later = healer.on_failures(vec![node(7)], &live(100), at(3720));
        assert_eq!(healed(&later), vec![node(7).id]);
    }

    #[test]
    fn the_same_identity_is_not_replaced_again_within_the_cooldown() {
        let mut healer = Healer::new(policy(), Vec::new());
        assert_eq!(
            healed(&healer.on_failures(vec![node(1)], &live(9), at(0))),
            vec![node(1).id]
        );
        let again = healer.on_failures(vec![node(1)], &live(9), at(14 * 60));
        assert_eq!(held(&again), vec![(node(1).id, "cooldown")]);
        let after = healer.on_failures(vec![node(1)], &live(9), at(15 * 60));
        assert_eq!(healed(&after), vec![node(1).id]);
    }

    #[test]
    fn the_ledger_survives_a_restart() {
        let mut before = Healer::new(policy(), Vec::new());
        let records: Vec<HealRecord> = (1..=5)
            .flat_map(|n| before.on_failures(vec![node(n)], &live(100), at(u64::from(n) * 100)))
            .filter_map(|decision| match decision {
                HealDecision::Heal { record, .. } => Some(record),
                _ => None,
            })
            .collect();
        assert_eq!(records.len(), 5);
        let mut after = Healer::new(policy(), records);
        let decisions = after.on_failures(vec![node(9)], &live(100), at(900));
        assert_eq!(held(&decisions), vec![(node(9).id, "hourly_budget")]);
        let decisions = after.on_failures(vec![node(1)], &live(100), at(901));
        assert_eq!(held(&decisions), vec![(node(1).id, "cooldown")]);
    }

    #[test]
    fn most_of_the_fleet_failing_together_raises_one_alert_and_heals_none_of_it() {
        let mut healer = Healer::new(policy(), Vec::new());
        let all = vec![node(1), node(2), node(3), node(4)];
        let decisions = healer.on_failures(all.clone(), &live(1), at(0));
        assert_eq!(
            decisions[0],
            HealDecision::MassFailure {
                failed: all,
                fleet_size: 5,
                suspect: 0,
                domain: String::new(),
            }
        );
        assert_eq!(held(&decisions).len(), 4);
        assert!(healed(&decisions).is_empty());
    }

    #[test]
    fn a_mass_failure_spread_over_rounds_is_still_one_alert() {
        let mut healer = Healer::new(policy(), Vec::new());
        // 2 of 5: not (yet) a mass failure, healed.
        let first = healer.on_failures(vec![node(1), node(2)], &live(3), at(0));
        assert_eq!(healed(&first).len(), 2);
        // A third within the window: 3 of 5 > 0.5 -> alert listing all three.
        let second = healer.on_failures(vec![node(3)], &live(2), at(10));
        let alerts: Vec<_> = second
            .iter()
            .filter(|decision| matches!(decision, HealDecision::MassFailure { .. }))
            .collect();
        assert_eq!(alerts.len(), 1);
        assert!(
            matches!(alerts[0], HealDecision::MassFailure { failed, fleet_size: 5, .. } if failed.len() == 3)
        );
        // The guard stays up: the fourth is held without another alert.
        let third = healer.on_failures(vec![node(4)], &live(1), at(20));
        assert_eq!(held(&third), vec![(node(4).id, "mass_failure")]);
        assert_eq!(third.len(), 1);
        // A quiet window later, a lone failure heals again.
        let later = healer.on_failures(vec![node(5)], &live(10), at(20 + 61));
        assert_eq!(healed(&later), vec![node(5).id]);
    }

    #[test]
    fn a_small_fleet_losing_one_node_heals() {
        let mut healer = Healer::new(policy(), Vec::new());
        // One of one is 100 %, but below mass_failure_min_nodes.
        assert_eq!(
            healed(&healer.on_failures(vec![node(1)], &live(0), at(0))),
            vec![node(1).id]
        );
        assert_eq!(
            healed(&healer.on_failures(vec![node(2)], &live(1), at(1))),
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
        assert_eq!(healed(&healer.on_failures(all, &live(0), at(0))).len(), 10);
    }

    #[test]
    fn a_wall_clock_that_jumps_back_does_not_panic_or_free_the_budget() {
        let mut healer = Healer::new(policy(), Vec::new());
        for n in 1..=5 {
            healer.on_failures(vec![node(n)], &live(100), at(1000 + u64::from(n) * 100));
        }
        let decisions = healer.on_failures(vec![node(9)], &live(100), at(0));
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
        let decisions = healer.on_failures(vec![out_of_service(1, OutOfService::Drained)], &live(10), at(0));
        assert_eq!(held(&decisions), vec![(node(1).id, "drained")]);
        // Four drained failures at once are not a mass failure either.
        let drained = (2..=5)
            .map(|n| out_of_service(n, OutOfService::Drained))
            .collect();
        let decisions = healer.on_failures(drained, &live(1), at(1));
        assert!(decisions.iter().all(|d| matches!(
            d,
            HealDecision::Hold {
                cause: HoldCause::Drained,
                ..
            }
        )));
        let decisions = healer.on_failures(vec![node(6)], &live(10), at(2));
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
        let decisions = healer.on_failures(failed, &live(1), at(0));
        assert!(
            !decisions
                .iter()
                .any(|d| matches!(d, HealDecision::MassFailure { .. }))
        );
        assert_eq!(healed(&decisions), vec![node(1).id, node(2).id, node(3).id]);
    }

    fn in_domain(n: u8, domain: &str) -> FailedNode {
        FailedNode {
            domain: domain.to_owned(),
            ..node(n)
        }
    }

    #[test]
    fn a_pop_losing_most_of_its_nodes_is_held_with_one_alert_while_another_pop_heals() {
        let mut healer = Healer::new(policy(), Vec::new());
        let live: BTreeMap<String, Population> = [
            ("pop=fra1".to_owned(), Population { live: 1, suspect: 0 }),
            ("pop=ams1".to_owned(), Population { live: 5, suspect: 0 }),
        ]
        .into();
        let failed = vec![
            in_domain(1, "pop=fra1"),
            in_domain(2, "pop=fra1"),
            in_domain(3, "pop=fra1"),
            in_domain(4, "pop=ams1"),
        ];
        let decisions = healer.on_failures(failed, &live, at(0));
        let alerts: Vec<_> = decisions
            .iter()
            .filter_map(|d| match d {
                HealDecision::MassFailure {
                    domain,
                    failed,
                    fleet_size,
                    ..
                } => Some((domain.clone(), failed.len(), *fleet_size)),
                _ => None,
            })
            .collect();
        assert_eq!(alerts, vec![("pop=fra1".to_owned(), 3, 4)]);
        assert_eq!(healed(&decisions), vec![node(4).id], "the other PoP heals");
        assert_eq!(
            held(&decisions),
            vec![
                (node(1).id, "mass_failure"),
                (node(2).id, "mass_failure"),
                (node(3).id, "mass_failure")
            ]
        );
        assert!(healer.domain("pop=fra1", at(1)).mass_failure_guard);
        let ams1 = healer.domain("pop=ams1", at(1));
        assert!(!ams1.mass_failure_guard);
        assert_eq!((ams1.heals_last_hour, ams1.budget_left), (1, 4));
        let quiet = healer.domain("pop=lhr1", at(1));
        assert_eq!(
            (quiet.heals_last_hour, quiet.budget_left),
            (0, 5),
            "a quiet domain has its whole budget"
        );
        // A later failure in fra1 is held by its guard; ams1 still heals.
        let later = healer.on_failures(
            vec![in_domain(5, "pop=fra1"), in_domain(6, "pop=ams1")],
            &live,
            at(10),
        );
        assert_eq!(healed(&later), vec![node(6).id]);
        assert_eq!(held(&later), vec![(node(5).id, "mass_failure")]);
    }

    #[test]
    fn the_hourly_budget_is_per_domain() {
        let mut healer = Healer::new(policy(), Vec::new());
        let live: BTreeMap<String, Population> = [
            (
                "pop=a".to_owned(),
                Population {
                    live: 100,
                    suspect: 0,
                },
            ),
            (
                "pop=b".to_owned(),
                Population {
                    live: 100,
                    suspect: 0,
                },
            ),
        ]
        .into();
        for n in 1..=5 {
            let decisions = healer.on_failures(vec![in_domain(n, "pop=a")], &live, at(u64::from(n) * 120));
            assert_eq!(healed(&decisions).len(), 1);
        }
        let sixth = healer.on_failures(vec![in_domain(6, "pop=a")], &live, at(720));
        assert_eq!(held(&sixth), vec![(node(6).id, "hourly_budget")]);
        let other = healer.on_failures(vec![in_domain(7, "pop=b")], &live, at(721));
        assert_eq!(healed(&other), vec![node(7).id], "pop=b has its own budget");
    }

    #[test]
    fn paused_healing_holds_and_keeps_failures_and_gives_them_back_on_resume() {
        let mut healer = Healer::new(policy(), Vec::new());
        healer.pause();
        assert!(healer.is_paused());
        let decisions = healer.on_failures(vec![node(1), node(2)], &live(10), at(0));
        assert_eq!(
            held(&decisions),
            vec![(node(1).id, "paused"), (node(2).id, "paused")]
        );
        let back = healer.resume();
        assert!(!healer.is_paused());
        assert_eq!(back, vec![node(1), node(2)]);
        let decisions = healer.on_failures(back, &live(10), at(60));
        assert_eq!(healed(&decisions), vec![node(1).id, node(2).id]);
        assert!(healer.resume().is_empty(), "nothing is given back twice");
    }

    #[test]
    fn the_first_failures_of_a_pop_going_dark_are_held_when_the_rest_are_already_suspect() {
        let mut healer = Healer::new(policy(), Vec::new());
        // Two of five declared failed; two more suspect (their streams broke a
        // moment later): four of five are failing, a mass failure from the start.
        let population: BTreeMap<String, Population> =
            [("pop=fra1".to_owned(), Population { live: 3, suspect: 2 })].into();
        let decisions = healer.on_failures(
            vec![in_domain(1, "pop=fra1"), in_domain(2, "pop=fra1")],
            &population,
            at(0),
        );
        assert!(
            decisions
                .iter()
                .any(|d| matches!(d, HealDecision::MassFailure { suspect: 2, .. }))
        );
        assert!(healed(&decisions).is_empty(), "none healed: {decisions:?}");
        // The two declared next are held by the guard, with no second alert.
        let population = [("pop=fra1".to_owned(), Population { live: 1, suspect: 0 })].into();
        let later = healer.on_failures(
            vec![in_domain(3, "pop=fra1"), in_domain(4, "pop=fra1")],
            &population,
            at(1),
        );
        assert!(
            !later
                .iter()
                .any(|d| matches!(d, HealDecision::MassFailure { .. }))
        );
        assert_eq!(held(&later).len(), 2);
        // One suspect beside one failure in a healthy fleet is not a mass failure.
        let mut calm = Healer::new(policy(), Vec::new());
        let population = [(String::new(), Population { live: 20, suspect: 1 })].into();
        assert_eq!(
            healed(&calm.on_failures(vec![node(9)], &population, at(0))).len(),
            1
        );
    }
}
