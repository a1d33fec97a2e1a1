//! Healing glue: failures declared together -> the healer's decisions -> the events
//! to publish, the durable writes (heal records and webhooks, in the same batch as
//! the FAILED states) and what to count. A pure function, as the scaler's decisions
//! are: the fleet actor only applies the [`HealingOutcome`].

use std::{collections::BTreeMap, time::SystemTime};

use tracing::{error, info, warn};

use crate::{
    domain::{
        event::{EventKind, EventNode, FleetEvent},
        healer::{FailedNode, HealDecision, Healer, HoldCause, Population},
        node::{FleetStats, NodeState},
    },
    edge::{
        store::Write,
        webhook::{self, WebhookEvent},
    },
};

/// What the fleet actor does about a batch of failures.
#[derive(Debug, Default, PartialEq)]
pub struct HealingOutcome {
    /// Events to publish, in order.
    pub events: Vec<FleetEvent>,
    /// Durable writes: heal records, outbox entries, ledger pruning.
    pub writes: Vec<Write>,
    /// Held failures, by cause label (`hourly_budget`, `cooldown`, `mass_failure`).
    pub held: Vec<&'static str>,
    /// MASS_NODE_FAILURE alerts queued.
    pub mass_alerts: u32,
}

/// Hands failures declared together to the healer and says what follows. `live`
/// is each failure domain's size the mass-failure guard compares against; `stats`
/// goes into the webhook payloads.
pub fn on_failures(
    healer: &mut Healer,
    failed: Vec<FailedNode>,
    live: &BTreeMap<String, Population>,
    stats: &FleetStats,
    now: SystemTime,
) -> HealingOutcome {
    let mut outcome = HealingOutcome::default();
    for decision in healer.on_failures(failed, live, now) {
        match decision {
            HealDecision::Heal { node, record } => {
                let entry =
                    webhook::outbox_entry(&WebhookEvent::UnexpectedNodeFailure(node.clone()), stats, now);
                info!(node.id = %node.id, node.ip = %node.ip, webhook.id = %entry.id, "self-healing requested: UNEXPECTED_NODE_FAILURE webhook queued");
                let reason = format!("UNEXPECTED_NODE_FAILURE webhook {} queued", entry.id);
                outcome
                    .events
                    .push(failed_event(&node, EventKind::SelfHealingRequested, reason, now));
                outcome.writes.push(Write::PutHeal(record));
                outcome.writes.push(Write::PutOutbox(entry));
            }
            HealDecision::Hold { node, cause } => {
                let reason = held_reason(&cause, &node.domain);
                warn!(node.id = %node.id, node.ip = %node.ip, cause = cause.label(), "self-healing held back: {reason}");
                outcome.held.push(cause.label());
                outcome
                    .events
                    .push(failed_event(&node, EventKind::SelfHealingHeld, reason, now));
            }
            HealDecision::MassFailure {
                failed,
                fleet_size,
                suspect,
                domain,
            } => {
                let event = WebhookEvent::MassNodeFailure {
                    failed: failed.clone(),
                    fleet_size,
                    suspect,
                    window_seconds: healer.policy().mass_failure_window.as_secs_f64(),
                    domain: domain.clone(),
                };
                let entry = webhook::outbox_entry(&event, stats, now);
                let scope = domain_words(&domain);
                error!(
                    failed = failed.len(), suspect, fleet_size, failure_domain = %domain, webhook.id = %entry.id,
                    "MASS NODE FAILURE{scope}: {} of {fleet_size} nodes failed within the window and {suspect} more are suspect; the orchestrator suspects the network or itself, so self-healing is held there and one MASS_NODE_FAILURE alert is sent",
                    failed.len()
                );
                let reason = format!(
                    "{} of {fleet_size} nodes{scope} failed within {:.0}s and {suspect} more are suspect; their healing is held; MASS_NODE_FAILURE webhook {} queued",
                    failed.len(),
                    healer.policy().mass_failure_window.as_secs_f64(),
                    entry.id
                );
                outcome.events.push(FleetEvent {
                    failure_domain: Some(domain),
                    ..FleetEvent::new(EventKind::MassNodeFailure, reason, now)
                });
                outcome.mass_alerts += 1;
                outcome.writes.push(Write::PutOutbox(entry));
            }
        }
    }
    if let Some(before) = now.checked_sub(healer.ledger_horizon()) {
        outcome.writes.push(Write::PruneHeals { before });
    }
    outcome
}

fn failed_event(node: &FailedNode, kind: EventKind, reason: String, now: SystemTime) -> FleetEvent {
    let about = EventNode {
        id: node.id,
        ip: node.ip,
        hostname: node.hostname.clone(),
        state: NodeState::Failed,
        labels: node.labels.clone(),
    };
    FleetEvent {
        failure_domain: (!node.domain.is_empty()).then(|| node.domain.clone()),
        ..FleetEvent::about_node(kind, about, reason, now)
    }
}

/// " in pop=fra1" for a named failure domain, nothing for the whole fleet.
fn domain_words(domain: &str) -> String {
    if domain.is_empty() {
        String::new()
    } else {
        format!(" in {domain}")
    }
}

/// A held heal, in words.
fn held_reason(cause: &HoldCause, domain: &str) -> String {
    let scope = domain_words(domain);
    match cause {
        HoldCause::HourlyBudget { used } => {
            format!(
                "hourly self-healing budget used up{scope} ({used} heals in the last hour; max_self_healing_per_hour)"
            )
        }
        HoldCause::Paused => {
            "self-healing is paused (SetAutomation); it is decided when healing resumes, if the node is still FAILED then".to_owned()
        }
        HoldCause::Cooldown { last_healed } => format!(
            "this node identity was healed at {} (self_healing_cooldown_minutes)",
            secbeat::wire::rfc3339(*last_healed)
        ),
        HoldCause::Drained => {
            "the node was drained: it carried no traffic and was taken out of service on purpose, so it is not replaced (resume or replace it by hand)".to_owned()
        }
        HoldCause::MassFailure { failed, fleet_size } => format!(
            "mass failure{scope}: {failed} of {fleet_size} nodes failed within the window (mass_failure_fraction)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        time::Duration,
    };

    use uuid::Uuid;

    use super::*;
    use crate::domain::{healer::HealingPolicy, node::NodeId};

    fn policy() -> HealingPolicy {
        HealingPolicy {
            max_per_hour: 2,
            cooldown: Duration::from_secs(900),
            mass_failure_fraction: 0.5,
            mass_failure_window: Duration::from_secs(60),
            mass_failure_min_nodes: 3,
        }
    }

    fn failed(n: u8) -> FailedNode {
        FailedNode {
            id: NodeId(Uuid::from_bytes([n; 16])),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)),
            hostname: format!("edge-{n}"),
            out_of_service: None,
            domain: String::new(),
            labels: Default::default(),
        }
    }

    fn live(n: u32) -> BTreeMap<String, Population> {
        [(String::new(), Population { live: n, suspect: 0 })].into()
    }

    fn kinds(outcome: &HealingOutcome) -> Vec<(EventKind, NodeId)> {
        outcome
            .events
            .iter()
            .map(|event| (event.kind, event.node_id().unwrap()))
            .collect()
    }

    fn body(write: &Write) -> serde_json::Value {
        let Write::PutOutbox(entry) = write else {
            panic!("not an outbox entry: {write:?}")
        };
        serde_json::from_slice(&entry.body).unwrap()
    }

    #[test]
    fn a_healed_failure_is_one_event_one_record_and_one_webhook_naming_the_node() {
        let mut healer = Healer::new(policy(), Vec::new());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let outcome = on_failures(
            &mut healer,
            vec![failed(1)],
            &live(10),
            &FleetStats::default(),
            now,
        );
        assert_eq!(
            kinds(&outcome),
            vec![(EventKind::SelfHealingRequested, failed(1).id)]
        );
        assert!(matches!(outcome.writes[0], Write::PutHeal(ref record) if record.node == failed(1).id));
        let payload = body(&outcome.writes[1]);
        assert_eq!(payload["reason"], "UNEXPECTED_NODE_FAILURE");
        assert_eq!(payload["failed_node_id"], failed(1).id.to_string());
        assert_eq!(payload["failed_node_ip"], "10.0.0.1");
        let Write::PutOutbox(entry) = &outcome.writes[1] else {
            unreachable!()
        };
        assert!(
            outcome.events[0].reason.contains(&entry.id),
            "{}",
            outcome.events[0].reason
        );
        assert!(matches!(outcome.writes[2], Write::PruneHeals { .. }));
        assert!(outcome.held.is_empty());
    }

    #[test]
    fn a_failure_beyond_the_budget_is_held_with_its_cause_and_writes_nothing() {
        let mut healer = Healer::new(policy(), Vec::new());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for n in 1..=2 {
            on_failures(
                &mut healer,
                vec![failed(n)],
                &live(100),
                &FleetStats::default(),
                now,
            );
        }
        let outcome = on_failures(
            &mut healer,
            vec![failed(3)],
            &live(100),
            &FleetStats::default(),
            now,
        );
        assert_eq!(kinds(&outcome), vec![(EventKind::SelfHealingHeld, failed(3).id)]);
        assert_eq!(outcome.held, vec!["hourly_budget"]);
        assert!(outcome.events[0].reason.contains("max_self_healing_per_hour"));
        assert!(
            outcome
                .writes
                .iter()
                .all(|write| matches!(write, Write::PruneHeals { .. })),
            "{:?}",
            outcome.writes
        );
    }

    #[test]
    fn most_of_the_fleet_failing_at_once_is_one_alert_and_no_heal() {
        let mut healer = Healer::new(policy(), Vec::new());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let in_fra1 = |n| FailedNode {
            domain: "pop=fra1".into(),
            ..failed(n)
        };
        let live: BTreeMap<String, Population> =
            [("pop=fra1".to_owned(), Population { live: 1, suspect: 0 })].into();
        let outcome = on_failures(
            &mut healer,
            (1..=4).map(in_fra1).collect(),
            &live,
            &FleetStats::default(),
            now,
        );
        assert_eq!(outcome.mass_alerts, 1);
        let alert_event = &outcome.events[0];
        assert_eq!(alert_event.kind, EventKind::MassNodeFailure);
        assert_eq!(alert_event.failure_domain.as_deref(), Some("pop=fra1"));
        assert!(
            alert_event.reason.contains("in pop=fra1"),
            "{}",
            alert_event.reason
        );
        assert!(
            outcome.events[1..]
                .iter()
                .all(|e| e.kind == EventKind::SelfHealingHeld
                    && e.failure_domain.as_deref() == Some("pop=fra1"))
        );
        assert_eq!(outcome.held, vec!["mass_failure"; 4]);
        let alerts: Vec<_> = outcome
            .writes
            .iter()
            .filter(|write| matches!(write, Write::PutOutbox(_)))
            .collect();
        assert_eq!(alerts.len(), 1);
        let alert = body(alerts[0]);
        assert_eq!(alert["reason"], "MASS_NODE_FAILURE");
        assert_eq!(alert["failed_nodes"].as_array().unwrap().len(), 4);
        assert_eq!(alert["failure_domain"], "pop=fra1");
        assert!(
            !outcome
                .writes
                .iter()
                .any(|write| matches!(write, Write::PutHeal(_)))
        );
    }
}
