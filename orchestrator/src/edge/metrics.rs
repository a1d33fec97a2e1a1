//! Prometheus metrics (OpenMetrics text at `GET /metrics`), with the seed's names.
//!
//! One [`Metrics`] value is created at start-up and cloned into the parts that
//! count (the fleet actor, the webhook sender). Counters and gauges are atomics;
//! a histogram takes the library's lock per observation (two per heartbeat: a
//! lock-free histogram measured no difference at 50,000 agents, BENCHMARKS.md,
//! "Where the CPU goes"). Figures that are a view of fleet state (nodes by
//! state) are set at scrape time from a snapshot instead of on every change.

use std::sync::{Arc, atomic::AtomicU64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::domain::node::FleetStats;

/// A `reason` label (webhook reason).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The webhook's reason, e.g. UNEXPECTED_NODE_FAILURE.
    pub reason: String,
}

/// A `cause` label (which limit held a heal back).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    /// hourly_budget, cooldown or mass_failure.
    pub cause: String,
}

/// A `result` label (full, resumed or failed TLS handshakes).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// full, resumed or failed.
    pub result: String,
}

/// An `automation` label (healing or scaling).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AutomationLabel {
    /// healing or scaling.
    pub automation: String,
}

/// A `state` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// Lowercase node state.
    pub state: String,
}

/// Every metric the orchestrator exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Nodes declared failed unexpectedly.
    pub unexpected_node_failures: Counter,
    /// Nodes that exited as told.
    pub nodes_gracefully_terminated: Counter,
    /// Self-healing webhooks delivered (2xx).
    pub self_healing_webhooks_sent: Counter,
    /// Failed delivery attempts of self-healing webhooks.
    pub self_healing_webhook_errors: Counter,
    /// Failures not healed, by the limit that held them.
    pub self_healing_held: Family<CauseLabel, Counter>,
    /// MASS_NODE_FAILURE alerts raised.
    pub mass_failure_alerts: Counter,
    /// Webhooks delivered, by reason.
    pub webhooks_sent: Family<ReasonLabel, Counter>,
    /// Failed delivery attempts, by reason.
    pub webhook_errors: Family<ReasonLabel, Counter>,
    /// Webhooks given up on after the maximum age (kept aside in the store).
    pub webhook_dead_letters: Counter,
    /// Webhooks waiting for delivery.
    pub webhook_outbox_depth: Gauge,
    /// Age of the oldest webhook waiting for delivery, seconds (0 when none).
    pub webhook_outbox_oldest_age_seconds: Gauge<f64, AtomicU64>,
    /// Older sessions ended by a newer one for the same node id.
    pub sessions_fenced: Counter,
    /// Connections closed at accept, by reason (per_source, descriptors).
    pub connections_refused: Family<ReasonLabel, Counter>,
    /// 1 while the state store accepts writes, 0 while they fail (set at scrape time).
    pub store_healthy: Gauge,
    /// Writes queued for a failing store (set at scrape time).
    pub store_pending_writes: Gauge,
    /// Failed store writes since start (set at scrape time).
    pub store_write_errors: Counter,
    /// Known nodes by state (set at scrape time).
    pub nodes: Family<StateLabel, Gauge>,
    /// Nodes with a live stream (set at scrape time).
    pub active_nodes: Gauge,
    /// Live nodes in service: not draining, drained or in maintenance (scrape time).
    pub in_service_nodes: Gauge,
    /// Nodes DRAINING, DRAINED or TERMINATING (scrape time).
    pub disrupted_nodes: Gauge,
    /// How many nodes max_disrupted_nodes allows disrupted now (scrape time).
    pub disruption_allowed_nodes: Gauge,
    /// Live nodes in maintenance (scrape time).
    pub maintenance_nodes: Gauge,
    /// 1 while healing or scaling is paused by an operator (SetAutomation).
    pub automation_paused: Family<AutomationLabel, Gauge>,
    /// Predictions made (one per scaling check with enough history).
    pub ml_predictions_made: Counter,
    /// Share of recent scored predictions within +-0.10 of the actual.
    pub ml_prediction_accuracy_ratio: Gauge<f64, AtomicU64>,
    /// The same share for the naive "current value" baseline.
    pub ml_baseline_accuracy_ratio: Gauge<f64, AtomicU64>,
    /// Mean absolute error of recent scored predictions.
    pub ml_prediction_mean_absolute_error: Gauge<f64, AtomicU64>,
    /// Mean absolute error of the baseline.
    pub ml_baseline_mean_absolute_error: Gauge<f64, AtomicU64>,
    /// Mean error (actual minus predicted) of recent scored predictions.
    pub ml_prediction_bias: Gauge<f64, AtomicU64>,
    /// The latest prediction.
    pub ml_predicted_cpu_usage: Gauge<f64, AtomicU64>,
    /// The latest prediction's confidence.
    pub ml_prediction_confidence: Gauge<f64, AtomicU64>,
    /// Fleet CPU at the latest scaling check.
    pub fleet_cpu_usage: Gauge<f64, AtomicU64>,
    /// Scale-ups decided on a prediction.
    pub predictive_scale_ups: Counter,
    /// Scaling decisions by kind (hold, scale_up_predicted, scale_up_current, scale_down).
    pub scaling_decisions: Family<DecisionLabel, Counter>,
    /// How much later than the heartbeat interval heartbeats arrive, seconds.
    pub heartbeat_lateness_seconds: Histogram,
    /// From a heartbeat's receipt on its stream to its liveness cell, seconds.
    pub heartbeat_handling_seconds: Histogram,
    /// How late the runtime ran a due task (`runtime::lag`'s probe).
    pub scheduling_delay_seconds: Histogram,
    /// Agent streams open now.
    pub agent_streams: Gauge,
    /// Nodes dead-node checks have looked at (only those due are).
    pub detector_nodes_checked: Counter,
    /// Agent sessions accepted.
    pub agent_sessions: Counter,
    /// Always 1, labelled with the version.
    pub build_info: Family<VersionLabel, Gauge>,
    /// Failed accepts on the gRPC listener (descriptor exhaustion backs off).
    pub accept_errors: Counter,
    /// TLS handshakes on the gRPC listener, by result.
    pub tls_handshakes: Family<ResultLabel, Counter>,
    /// 1 while this orchestrator leads (always with the embedded store), 0 on a standby.
    pub leader: Gauge,
    /// Times this orchestrator became or stopped being the leader.
    pub leader_changes: Counter,
    /// Latency of etcd transactions (fenced writes, campaigns), seconds.
    pub etcd_txn_seconds: Histogram,
    /// etcd requests that failed (each is retried on the next endpoint or later).
    pub etcd_errors: Counter,
}

/// A `version` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    /// The orchestrator's version.
    pub version: String,
}

/// Buckets of the heartbeat lateness histogram, seconds.
const LATENESS_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of the heartbeat handling histogram, seconds: 10 µs to 1 s.
const HANDLING_BUCKETS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0,
];

/// Buckets of the scheduling delay histogram, seconds: 1 ms to 10 s.
const DELAY_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Buckets of the etcd transaction latency histogram, seconds: 0.5 ms to 5 s.
const ETCD_BUCKETS: [f64; 13] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A `decision` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    /// hold, scale_up_predicted, scale_up_current or scale_down.
    pub decision: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let metrics = Self {
            registry: Arc::default(),
            unexpected_node_failures: Counter::default(),
            nodes_gracefully_terminated: Counter::default(),
            self_healing_webhooks_sent: Counter::default(),
            self_healing_webhook_errors: Counter::default(),
            self_healing_held: Family::default(),
            mass_failure_alerts: Counter::default(),
            webhooks_sent: Family::default(),
            webhook_errors: Family::default(),
            webhook_dead_letters: Counter::default(),
            webhook_outbox_depth: Gauge::default(),
            webhook_outbox_oldest_age_seconds: Gauge::default(),
            connections_refused: Family::default(),
            sessions_fenced: Counter::default(),
            store_healthy: Gauge::default(),
            store_pending_writes: Gauge::default(),
            store_write_errors: Counter::default(),
            nodes: Family::default(),
            active_nodes: Gauge::default(),
            in_service_nodes: Gauge::default(),
            disrupted_nodes: Gauge::default(),
            disruption_allowed_nodes: Gauge::default(),
            maintenance_nodes: Gauge::default(),
            automation_paused: Family::default(),
            ml_predictions_made: Counter::default(),
            ml_prediction_accuracy_ratio: Gauge::default(),
            ml_baseline_accuracy_ratio: Gauge::default(),
            ml_prediction_mean_absolute_error: Gauge::default(),
            ml_baseline_mean_absolute_error: Gauge::default(),
            ml_prediction_bias: Gauge::default(),
            ml_predicted_cpu_usage: Gauge::default(),
            ml_prediction_confidence: Gauge::default(),
            fleet_cpu_usage: Gauge::default(),
            predictive_scale_ups: Counter::default(),
            scaling_decisions: Family::default(),
            heartbeat_lateness_seconds: Histogram::new(LATENESS_BUCKETS),
            heartbeat_handling_seconds: Histogram::new(HANDLING_BUCKETS),
            scheduling_delay_seconds: Histogram::new(DELAY_BUCKETS),
            agent_streams: Gauge::default(),
            detector_nodes_checked: Counter::default(),
            agent_sessions: Counter::default(),
            build_info: Family::default(),
            accept_errors: Counter::default(),
            tls_handshakes: Family::default(),
            leader: Gauge::default(),
            leader_changes: Counter::default(),
            etcd_txn_seconds: Histogram::new(ETCD_BUCKETS),
            etcd_errors: Counter::default(),
        };
        // Counter names get `_total` appended on export.
        let r = &mut registry;
        r.register(
            "orchestrator_unexpected_node_failures",
            "Nodes declared failed unexpectedly (self-healing applies)",
            metrics.unexpected_node_failures.clone(),
        );
        r.register(
            "orchestrator_nodes_gracefully_terminated",
            "Nodes that exited as commanded (expected, never healed)",
            metrics.nodes_gracefully_terminated.clone(),
        );
        r.register(
            "orchestrator_self_healing_webhooks_sent",
            "UNEXPECTED_NODE_FAILURE webhooks delivered (2xx)",
            metrics.self_healing_webhooks_sent.clone(),
        );
        r.register(
            "orchestrator_self_healing_webhook_errors",
            "Failed delivery attempts of UNEXPECTED_NODE_FAILURE webhooks (each is retried)",
            metrics.self_healing_webhook_errors.clone(),
        );
        r.register(
            "orchestrator_self_healing_held",
            "Unexpected failures not healed, by the limit that held them",
            metrics.self_healing_held.clone(),
        );
        r.register(
            "orchestrator_mass_failure_alerts",
            "MASS_NODE_FAILURE alerts raised",
            metrics.mass_failure_alerts.clone(),
        );
        r.register(
            "orchestrator_webhooks_sent",
            "Webhooks delivered (2xx), by reason",
            metrics.webhooks_sent.clone(),
        );
        r.register(
            "orchestrator_webhook_errors",
            "Failed webhook delivery attempts, by reason",
            metrics.webhook_errors.clone(),
        );
        r.register(
            "orchestrator_webhook_dead_letters",
            "Webhooks given up on after webhook_max_age (kept in the store)",
            metrics.webhook_dead_letters.clone(),
        );
        r.register(
            "orchestrator_webhook_outbox_depth",
            "Webhooks waiting for delivery",
            metrics.webhook_outbox_depth.clone(),
        );
        r.register(
            "orchestrator_sessions_fenced",
            "Older agent sessions ended by a newer one for the same node id (two clients fighting over an id show here)",
            metrics.sessions_fenced.clone(),
        );
        r.register(
            "orchestrator_connections_refused",
            "Connections closed at accept: over max_connections_per_source, or into the descriptors kept for HTTP",
            metrics.connections_refused.clone(),
        );
        r.register(
            "orchestrator_store_healthy",
            "1 while the state store accepts writes, 0 while they fail (full disk, I/O errors)",
            metrics.store_healthy.clone(),
        );
        r.register(
            "orchestrator_store_pending_writes",
            "Writes queued for a failing state store, merged per node",
            metrics.store_pending_writes.clone(),
        );
        r.register(
            "orchestrator_store_write_errors",
            "Failed state store writes (each is retried)",
            metrics.store_write_errors.clone(),
        );
        r.register(
            "orchestrator_webhook_outbox_oldest_age_seconds",
            "Age of the oldest webhook waiting for delivery (0 when none)",
            metrics.webhook_outbox_oldest_age_seconds.clone(),
        );
        r.register(
            "orchestrator_leader",
            "1 while this orchestrator is the leader (always on the embedded store), 0 on a standby",
            metrics.leader.clone(),
        );
        r.register(
            "orchestrator_leader_changes",
            "Times this orchestrator became or stopped being the leader",
            metrics.leader_changes.clone(),
        );
        r.register(
            "orchestrator_etcd_txn_seconds",
            "Latency of etcd transactions (fenced writes and campaigns)",
            metrics.etcd_txn_seconds.clone(),
        );
        r.register(
            "orchestrator_etcd_errors",
            "etcd requests that failed (retried on the next endpoint or later)",
            metrics.etcd_errors.clone(),
        );
        r.register(
            "orchestrator_nodes",
            "Known nodes by lifecycle state",
            metrics.nodes.clone(),
        );
        r.register(
            "orchestrator_active_nodes",
            "Nodes with a live, healthy stream (connected, terminating, draining or drained)",
            metrics.active_nodes.clone(),
        );
        r.register(
            "orchestrator_in_service_nodes",
            "Live nodes carrying traffic: not draining, drained or in maintenance",
            metrics.in_service_nodes.clone(),
        );
        r.register(
            "orchestrator_disrupted_nodes",
            "Nodes draining, drained or terminating (what max_disrupted_nodes caps)",
            metrics.disrupted_nodes.clone(),
        );
        r.register(
            "orchestrator_disruption_allowed_nodes",
            "Nodes max_disrupted_nodes allows to be disrupted at once now",
            metrics.disruption_allowed_nodes.clone(),
        );
        r.register(
            "orchestrator_maintenance_nodes",
            "Live nodes in maintenance",
            metrics.maintenance_nodes.clone(),
        );
        r.register(
            "orchestrator_automation_paused",
            "1 while an operator has paused this automation (SetAutomation)",
            metrics.automation_paused.clone(),
        );
        let ml: [(&str, &str, &Gauge<f64, AtomicU64>); 8] = [
            (
                "orchestrator_ml_prediction_accuracy_ratio",
                "Share of recent scored predictions within +-0.10 of the actual fleet CPU",
                &metrics.ml_prediction_accuracy_ratio,
            ),
            (
                "orchestrator_ml_baseline_accuracy_ratio",
                "The same share for the naive current-value baseline",
                &metrics.ml_baseline_accuracy_ratio,
            ),
            (
                "orchestrator_ml_prediction_mean_absolute_error",
                "Mean absolute error of recent scored predictions (fraction of one)",
                &metrics.ml_prediction_mean_absolute_error,
            ),
            (
                "orchestrator_ml_baseline_mean_absolute_error",
                "Mean absolute error of the current-value baseline",
                &metrics.ml_baseline_mean_absolute_error,
            ),
            (
                "orchestrator_ml_prediction_bias",
                "Mean error of recent scored predictions, actual minus predicted",
                &metrics.ml_prediction_bias,
            ),
            (
                "orchestrator_ml_predicted_cpu_usage",
                "The latest fleet CPU prediction (fraction of one), 10 minutes ahead",
                &metrics.ml_predicted_cpu_usage,
            ),
            (
                "orchestrator_ml_prediction_confidence",
                "Probability that the latest prediction lands within +-0.10",
                &metrics.ml_prediction_confidence,
            ),
            (
                "orchestrator_fleet_cpu_usage",
                "Fleet CPU (mean latest sample of live nodes) at the latest scaling check",
                &metrics.fleet_cpu_usage,
            ),
        ];
        for (name, help, gauge) in ml {
            registry.register(name, help, gauge.clone());
        }
        registry.register(
            "orchestrator_ml_predictions_made",
            "Fleet CPU predictions made",
            metrics.ml_predictions_made.clone(),
        );
        registry.register(
            "orchestrator_predictive_scale_ups",
            "Scale-ups decided on a prediction (PREDICTED_HIGH_FLEET_CPU_LOAD)",
            metrics.predictive_scale_ups.clone(),
        );
        registry.register(
            "orchestrator_scaling_decisions",
            "Scaling decisions by kind",
            metrics.scaling_decisions.clone(),
        );
        registry.register(
            "orchestrator_heartbeat_lateness_seconds",
            "How much later than the heartbeat interval each heartbeat arrived",
            metrics.heartbeat_lateness_seconds.clone(),
        );
        registry.register(
            "orchestrator_heartbeat_handling_seconds",
            "Time from a heartbeat's receipt on its stream to its session's liveness cell, which the failure detector reads",
            metrics.heartbeat_handling_seconds.clone(),
        );
        registry.register(
            "orchestrator_scheduling_delay_seconds",
            "How late the orchestrator's runtime ran a task that was due (a probe every 100 ms): heartbeats wait about as long to be read, and the failure detector gives nodes that much more time",
            metrics.scheduling_delay_seconds.clone(),
        );
        registry.register(
            "orchestrator_detector_nodes_checked",
            "Nodes the dead-node checks looked at; a check looks only at nodes whose deadline has come",
            metrics.detector_nodes_checked.clone(),
        );
        registry.register(
            "orchestrator_agent_streams",
            "Agent streams open now",
            metrics.agent_streams.clone(),
        );
        registry.register(
            "orchestrator_agent_sessions",
            "Agent sessions accepted",
            metrics.agent_sessions.clone(),
        );
        registry.register(
            "orchestrator_accept_errors",
            "Failed accepts on the gRPC listener (out of descriptors: the loop backs off)",
            metrics.accept_errors.clone(),
        );
        registry.register(
            "orchestrator_tls_handshakes",
            "TLS handshakes on the gRPC listener: full, resumed (a session ticket: no signature, no certificate check) or failed",
            metrics.tls_handshakes.clone(),
        );
        registry.register(
            "orchestrator_build_info",
            "Always 1; the version is in the label",
            metrics.build_info.clone(),
        );
        metrics
            .build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        // Known label values start at zero, so every series exists from the start
        // (dashboards and alerts see 0, not "no data").
        for decision in ["hold", "scale_up_predicted", "scale_up_current", "scale_down"] {
            let _ = metrics.scaling_decisions.get_or_create(&DecisionLabel {
                decision: decision.to_owned(),
            });
        }
        for cause in ["hourly_budget", "cooldown", "mass_failure"] {
            let _ = metrics.self_healing_held.get_or_create(&CauseLabel {
                cause: cause.to_owned(),
            });
        }
        for reason in [
            "UNEXPECTED_NODE_FAILURE",
            "MASS_NODE_FAILURE",
            "PREDICTED_HIGH_FLEET_CPU_LOAD",
            "HIGH_FLEET_CPU_LOAD",
            "LOW_FLEET_CPU_LOAD",
        ] {
            let _ = metrics.webhooks_sent.get_or_create(&Metrics::reason(reason));
            let _ = metrics.webhook_errors.get_or_create(&Metrics::reason(reason));
        }
        for reason in ["per_source", "descriptors"] {
            let _ = metrics
                .connections_refused
                .get_or_create(&Metrics::reason(reason));
        }
        for result in ["full", "resumed", "failed"] {
            let _ = metrics.tls_handshakes.get_or_create(&ResultLabel {
                result: result.to_owned(),
            });
        }
        Self {
            registry: Arc::new(registry),
            ..metrics
        }
    }

    /// Counts a TLS handshake on the gRPC listener: full, resumed or failed.
    pub fn tls_handshake(&self, result: &str) {
        self.tls_handshakes
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts a connection closed at accept.
    pub fn refused_connection(&self, reason: &str) {
        self.connections_refused
            .get_or_create(&Self::reason(reason))
            .inc();
    }

    /// Sets the store-health figures (at scrape time).
    pub fn observe_store(&self, health: &crate::edge::store::writer::StoreHealth) {
        self.store_healthy.set(i64::from(health.failure().is_none()));
        self.store_pending_writes.set(health.pending_writes() as i64);
        let seen = self.store_write_errors.get();
        self.store_write_errors
            .inc_by(health.write_errors().saturating_sub(seen));
    }

    /// Sets the fleet-state gauges from a snapshot (at scrape time).
    pub fn observe_fleet(&self, stats: &FleetStats) {
        self.active_nodes.set(i64::from(stats.active_nodes));
        self.in_service_nodes.set(i64::from(stats.in_service_nodes));
        self.disrupted_nodes.set(i64::from(stats.disrupted_nodes));
        self.disruption_allowed_nodes
            .set(i64::from(stats.disruption_allowed));
        self.maintenance_nodes.set(i64::from(stats.maintenance_nodes));
        for (automation, on) in [
            ("healing", stats.automation.healing),
            ("scaling", stats.automation.scaling),
        ] {
            self.automation_paused
                .get_or_create(&AutomationLabel {
                    automation: automation.to_owned(),
                })
                .set(i64::from(!on));
        }
        for state in crate::domain::node::NodeState::ALL {
            let count = stats.nodes_by_state.get(&state).copied().unwrap_or(0);
            self.nodes
                .get_or_create(&StateLabel {
                    state: state.as_str().to_owned(),
                })
                .set(i64::from(count));
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// A reason label.
    pub fn reason(reason: &str) -> ReasonLabel {
        ReasonLabel {
            reason: reason.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_metric_names_are_exported() {
        let metrics = Metrics::new();
        metrics.unexpected_node_failures.inc();
        metrics
            .webhooks_sent
            .get_or_create(&Metrics::reason("UNEXPECTED_NODE_FAILURE"))
            .inc();
        metrics.observe_fleet(&FleetStats::default());
        let text = metrics.encode();
        for name in [
            "orchestrator_unexpected_node_failures_total 1",
            "orchestrator_self_healing_webhooks_sent_total 0",
            "orchestrator_nodes_gracefully_terminated_total 0",
            "orchestrator_self_healing_webhook_errors_total 0",
            "orchestrator_webhook_outbox_depth 0",
            "orchestrator_webhooks_sent_total{reason=\"UNEXPECTED_NODE_FAILURE\"} 1",
            "orchestrator_nodes{state=\"failed\"} 0",
            "orchestrator_ml_predictions_made_total 0",
            "orchestrator_ml_prediction_accuracy_ratio 0.0",
            "orchestrator_predictive_scale_ups_total 0",
        ] {
            assert!(text.contains(name), "missing {name:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn the_classic_text_format_names_counters_with_their_total() {
        let metrics = Metrics::new();
        let text = secbeat::telemetry::openmetrics_to_text(&metrics.encode());
        assert!(text.contains("# TYPE orchestrator_unexpected_node_failures_total counter\n"));
        assert!(text.contains("# HELP orchestrator_unexpected_node_failures_total Nodes declared"));
        assert!(text.contains("# TYPE orchestrator_webhook_outbox_depth gauge\n"));
        assert!(!text.contains("# EOF"));
    }
}
