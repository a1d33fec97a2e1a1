//! Webhooks: what the orchestrator tells the provisioning system.
//!
//! Every webhook (self-healing, alerts, and later scaling) is built here as an
//! [`OutboxEntry`] (pure: payload, stable id, trace id), persisted in the outbox
//! by the store writer, and delivered by the one [`sender`].

pub mod sender;

use std::{net::IpAddr, time::SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    domain::healer::FailedNode,
    domain::node::{FleetStats, NodeId},
    domain::scaler::{Candidate, UpReason},
};

/// The `reason` of a self-healing request (the seed's value).
pub const UNEXPECTED_NODE_FAILURE: &str = "UNEXPECTED_NODE_FAILURE";
/// The `reason` of the mass-failure alert.
pub const MASS_NODE_FAILURE: &str = "MASS_NODE_FAILURE";
/// The `reason` of a predictive scale-up (the seed's value).
pub const PREDICTED_HIGH_FLEET_CPU_LOAD: &str = "PREDICTED_HIGH_FLEET_CPU_LOAD";
/// The `reason` of a scale-down.
pub const LOW_FLEET_CPU_LOAD: &str = "LOW_FLEET_CPU_LOAD";

/// The seed's `prediction_info`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PredictionInfo {
    /// Predicted fleet CPU fraction.
    pub predicted_cpu_usage: f64,
    /// How far ahead, minutes.
    pub prediction_horizon_minutes: f64,
    /// Probability that the actual lands within +-0.10.
    pub confidence: f64,
}

/// One webhook to deliver, as the outbox keeps it. The body and id never change
/// between attempts, so receivers can dedupe on `webhook-id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// `webhook-id`: `msg_<uuid>`.
    pub id: String,
    /// The payload's `reason`.
    pub reason: String,
    /// When it was decided (for the maximum age and the oldest-pending metric).
    pub created_at: SystemTime,
    /// W3C `traceparent` of the decision that queued it (the failure detection or
    /// scaling check span); every delivery attempt is a child span of it. Without
    /// tracing, a generated one, so the receiver can still tie attempts together.
    #[serde(default)]
    pub traceparent: String,
    /// The JSON body.
    pub body: Vec<u8>,
}

/// What a webhook is about.
#[derive(Debug, Clone, PartialEq)]
pub enum WebhookEvent {
    /// A node failed unexpectedly: provision a replacement.
    UnexpectedNodeFailure(FailedNode),
    /// Much of the fleet failed at once: self-healing is held, an operator decides.
    MassNodeFailure {
        /// Every node failed within the window.
        failed: Vec<FailedNode>,
        /// Nodes live before those failures.
        fleet_size: u32,
        /// Nodes suspect when the alert was raised, not yet declared failed.
        suspect: u32,
        /// The window, seconds.
        window_seconds: f64,
        /// The failure domain (`pop=fra1`; empty: the whole fleet).
        domain: String,
    },
    /// More capacity is needed.
    ScaleUp {
        /// Predicted or current load.
        reason: UpReason,
        /// The prediction, when the decision used one.
        prediction: Option<PredictionInfo>,
    },
    /// A node is being terminated because the fleet is under-used.
    ScaleDown {
        /// The node told to terminate.
        node: Candidate,
    },
}

impl WebhookEvent {
    /// The payload's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            WebhookEvent::UnexpectedNodeFailure(_) => UNEXPECTED_NODE_FAILURE,
            WebhookEvent::MassNodeFailure { .. } => MASS_NODE_FAILURE,
            WebhookEvent::ScaleUp { reason, .. } => reason.as_str(),
            WebhookEvent::ScaleDown { .. } => LOW_FLEET_CPU_LOAD,
        }
    }
}

/// The `fleet_metrics` object every payload carries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PayloadFleetMetrics {
    /// Nodes with a live, healthy stream (connected, terminating, draining, drained).
    pub active_nodes: u32,
    /// Mean latest CPU fraction of active nodes, if any reported.
    pub avg_cpu_usage: Option<f64>,
    /// Known nodes per state (lowercase state names).
    pub nodes_by_state: std::collections::BTreeMap<&'static str, u32>,
    /// Unexpected failures since the orchestrator started.
    pub unexpected_failures_total: u64,
    /// Expected terminations since the orchestrator started.
    pub graceful_terminations_total: u64,
}

impl From<&FleetStats> for PayloadFleetMetrics {
    fn from(stats: &FleetStats) -> Self {
        Self {
            active_nodes: stats.active_nodes,
            avg_cpu_usage: stats.avg_cpu_usage,
            nodes_by_state: stats
                .nodes_by_state
                .iter()
                .map(|(state, count)| (state.as_str(), *count))
                .collect(),
            unexpected_failures_total: stats.unexpected_failures_total,
            graceful_terminations_total: stats.graceful_terminations_total,
        }
    }
}

fn node_json(id: NodeId, ip: IpAddr) -> serde_json::Value {
    json!({ "node_id": id.0, "ip": ip })
}

/// Builds the outbox entry for `event`, with a fresh id, in the current trace.
pub fn outbox_entry(event: &WebhookEvent, stats: &FleetStats, now: SystemTime) -> OutboxEntry {
    let mut body = json!({
        "reason": event.reason(),
        "timestamp": secbeat::wire::rfc3339(now),
        "fleet_metrics": PayloadFleetMetrics::from(stats),
    });
    let extra = match event {
        WebhookEvent::UnexpectedNodeFailure(node) => json!({
            "failed_node_id": node.id.0,
            "failed_node_ip": node.ip,
        }),
        WebhookEvent::MassNodeFailure {
            failed,
            fleet_size,
            suspect,
            window_seconds,
            domain,
        } => json!({
            "failure_domain": domain,
            "suspect_nodes": suspect,
            "failed_nodes": failed.iter().map(|node| node_json(node.id, node.ip)).collect::<Vec<_>>(),
            "fleet_size": fleet_size,
            "failed_fraction": failed.len() as f64 / f64::from((*fleet_size).max(1)),
            "failing_fraction": (failed.len() as f64 + f64::from(*suspect)) / f64::from((*fleet_size).max(1)),
            "window_seconds": window_seconds,
            "self_healing": "held for these nodes: the orchestrator suspects itself or the network",
        }),
        WebhookEvent::ScaleUp { prediction, .. } => match prediction {
            Some(info) => json!({ "prediction_info": info }),
            None => json!({}),
        },
        WebhookEvent::ScaleDown { node } => json!({
            "terminated_node_id": node.id.0,
            "terminated_node_ip": node.ip,
            "terminated_node_cpu_usage": node.cpu,
        }),
    };
    if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    OutboxEntry {
        id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
        reason: event.reason().to_owned(),
        created_at: now,
        traceparent: secbeat::telemetry::current_traceparent()
            .unwrap_or_else(secbeat::telemetry::generated_traceparent),
        body: serde_json::to_vec(&body).expect("a json value serializes"),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::Ipv4Addr,
        time::{Duration, SystemTime},
    };

    use serde_json::Value;
    use uuid::Uuid;

    use super::*;
    use crate::domain::node::NodeState;

    fn failed() -> FailedNode {
        FailedNode {
            id: NodeId(Uuid::parse_str("550e8400-e29b-41d4-a716-446655440000").unwrap()),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 1, 42)),
            hostname: "edge-42".into(),
            out_of_service: None,
            domain: String::new(),
            labels: Default::default(),
        }
    }

    fn stats() -> FleetStats {
        FleetStats {
            active_nodes: 2,
            avg_cpu_usage: Some(0.5),
            nodes_by_state: [(NodeState::Connected, 2), (NodeState::Failed, 1)].into(),
            unexpected_failures_total: 1,
            graceful_terminations_total: 0,
            ..FleetStats::default()
        }
    }

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_752_343_200) // 2025-07-12T18:00:00Z
    }

    #[test]
    fn the_self_healing_payload_is_the_seeds() {
        let entry = outbox_entry(&WebhookEvent::UnexpectedNodeFailure(failed()), &stats(), at());
        let body: Value = serde_json::from_slice(&entry.body).unwrap();
        assert_eq!(body["reason"], "UNEXPECTED_NODE_FAILURE");
        assert_eq!(body["timestamp"], "2025-07-12T18:00:00Z");
        assert_eq!(body["failed_node_id"], "550e8400-e29b-41d4-a716-446655440000");
        assert_eq!(body["failed_node_ip"], "10.0.1.42");
        assert_eq!(body["fleet_metrics"]["active_nodes"], 2);
        assert_eq!(body["fleet_metrics"]["avg_cpu_usage"], 0.5);
        assert_eq!(body["fleet_metrics"]["nodes_by_state"]["failed"], 1);
        assert_eq!(entry.reason, "UNEXPECTED_NODE_FAILURE");
        assert!(
            entry.id.starts_with("msg_") && entry.id.len() == 36,
            "{}",
            entry.id
        );
        assert_eq!(
            secbeat::telemetry::trace_id(&entry.traceparent).map(str::len),
            Some(32),
            "{}",
            entry.traceparent
        );
    }

    #[test]
    fn the_mass_failure_alert_lists_the_failed_nodes() {
        let event = WebhookEvent::MassNodeFailure {
            failed: vec![failed(), failed()],
            fleet_size: 5,
            suspect: 1,
            window_seconds: 60.0,
            domain: "pop=fra1".into(),
        };
        let body: Value = serde_json::from_slice(&outbox_entry(&event, &stats(), at()).body).unwrap();
        assert_eq!(body["reason"], "MASS_NODE_FAILURE");
        assert_eq!(body["failed_nodes"].as_array().unwrap().len(), 2);
        assert_eq!(body["failed_nodes"][0]["ip"], "10.0.1.42");
        assert_eq!(body["fleet_size"], 5);
        assert_eq!(body["failed_fraction"], 0.4);
        assert_eq!(body["failure_domain"], "pop=fra1");
        assert_eq!(body["suspect_nodes"], 1);
        assert_eq!(body["failing_fraction"], 0.6);
    }

    #[test]
    fn the_scaling_payloads_are_the_seeds() {
        let up = WebhookEvent::ScaleUp {
            reason: UpReason::PredictedHighFleetCpuLoad,
            prediction: Some(PredictionInfo {
                predicted_cpu_usage: 0.85,
                prediction_horizon_minutes: 10.0,
                confidence: 0.8,
            }),
        };
        let body: Value = serde_json::from_slice(&outbox_entry(&up, &stats(), at()).body).unwrap();
        assert_eq!(body["reason"], "PREDICTED_HIGH_FLEET_CPU_LOAD");
        assert_eq!(body["prediction_info"]["predicted_cpu_usage"], 0.85);
        assert_eq!(body["prediction_info"]["prediction_horizon_minutes"], 10.0);
        assert_eq!(body["prediction_info"]["confidence"], 0.8);
        assert_eq!(body["fleet_metrics"]["active_nodes"], 2);
        let current = WebhookEvent::ScaleUp {
            reason: UpReason::HighFleetCpuLoad,
            prediction: None,
        };
        let body: Value = serde_json::from_slice(&outbox_entry(&current, &stats(), at()).body).unwrap();
        assert_eq!(body["reason"], "HIGH_FLEET_CPU_LOAD");
        assert!(body.get("prediction_info").is_none());
        let down = WebhookEvent::ScaleDown {
            node: Candidate {
                id: failed().id,
                ip: failed().ip,
                cpu: 0.05,
            },
        };
        let body: Value = serde_json::from_slice(&outbox_entry(&down, &stats(), at()).body).unwrap();
        assert_eq!(body["reason"], "LOW_FLEET_CPU_LOAD");
        assert_eq!(body["terminated_node_id"], "550e8400-e29b-41d4-a716-446655440000");
        assert_eq!(body["terminated_node_ip"], "10.0.1.42");
    }

    #[test]
    fn ids_are_unique_per_entry() {
        let event = WebhookEvent::UnexpectedNodeFailure(failed());
        let a = outbox_entry(&event, &stats(), at());
        let b = outbox_entry(&event, &stats(), at());
        assert_ne!(a.id, b.id);
        assert_ne!(a.traceparent, b.traceparent);
    }
}
