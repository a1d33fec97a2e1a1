//! The scaler: turns each scaling check's fleet view and forecast into a decision
//! (DESIGN.md, "Prediction and scaling").
//!
//! Sans-IO, time passed in. Rules:
//! - The basis for scaling up is the prediction when it is trustworthy (at least
//!   the seed's 20 points and `min_prediction_confidence`), else the current CPU,
//!   and the decision says which (`PREDICTED_HIGH_FLEET_CPU_LOAD` vs
//!   `HIGH_FLEET_CPU_LOAD`).
//! - Scale up after `scale_up_consecutive_checks` checks above
//!   `scale_up_cpu_threshold`, then a cooldown; never beyond `max_nodes`.
//! - Scale down after `scale_down_consecutive_checks` checks with current AND
//!   (trusted) predicted CPU below `scale_down_cpu_threshold`, fleet above
//!   `min_nodes`: the least loaded node goes. Then a cooldown, which a scale-up
//!   also starts, so the fleet does not flap.
//! - The same decisions are made in `forecast_only` mode; the caller just does
//!   not act on them.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{domain::event::ScaleDecision, domain::forecast::Forecast, domain::node::NodeId};

/// Fewer history points than this: the prediction is not used for decisions (the
/// seed's HIGH_CONFIDENCE_THRESHOLD).
pub const TRUSTED_POINTS: usize = 20;

/// Whether decisions are acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScalingMode {
    /// Predict, score and decide, but send nothing (how predictive scaling is
    /// rolled out: watch it first).
    ForecastOnly,
    /// Act: webhooks and terminates.
    ForecastAndScale,
}

/// The scaler's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingPolicy {
    /// Scale up above this CPU fraction.
    pub up_threshold: f64,
    /// Scale down below this CPU fraction.
    pub down_threshold: f64,
    /// Checks in a row above the threshold before scaling up.
    pub up_consecutive: u32,
    /// Checks in a row below the threshold before scaling down.
    pub down_consecutive: u32,
    /// Quiet time after a scale-up.
    pub up_cooldown: Duration,
    /// Quiet time after any scaling action before a scale-down.
    pub down_cooldown: Duration,
    /// Never scale down to fewer nodes.
    pub min_nodes: u32,
    /// Never scale up beyond this many nodes.
    pub max_nodes: u32,
    /// A prediction less confident than this is not acted on.
    pub min_confidence: f64,
    /// Act or only watch.
    pub mode: ScalingMode,
}

/// The node a scale-down would remove.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The node.
    pub id: NodeId,
    /// Its address.
    pub ip: IpAddr,
    /// Its latest CPU fraction.
    pub cpu: f64,
}

/// What the scaler sees of the fleet at a check.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetView {
    /// Nodes with a live stream (what `max_nodes` caps).
    pub active_nodes: u32,
    /// Of them, nodes in service (not draining, drained or in maintenance):
    /// scale-down never takes them below `min_nodes`.
    pub in_service_nodes: u32,
    /// Mean latest CPU of live nodes, if any reported.
    pub avg_cpu: Option<f64>,
    /// The least loaded connected node.
    pub least_loaded: Option<Candidate>,
    /// Live nodes that have not reported CPU yet: the fleet's load is not fully
    /// known, so no node is chosen for removal until they have.
    pub unreported: u32,
}

/// Why a scale-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpReason {
    /// The (trusted) prediction is above the threshold.
    PredictedHighFleetCpuLoad,
    /// The current CPU is above the threshold (no trusted prediction).
    HighFleetCpuLoad,
}

impl UpReason {
    /// The webhook's `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            UpReason::PredictedHighFleetCpuLoad => "PREDICTED_HIGH_FLEET_CPU_LOAD",
            UpReason::HighFleetCpuLoad => "HIGH_FLEET_CPU_LOAD",
        }
    }
}

/// A check's decision.
#[derive(Debug, Clone, PartialEq)]
pub enum ScaleAction {
    /// Do nothing, because...
    Hold(String),
    /// Ask for more capacity.
    ScaleUp {
        /// Prediction or current load.
        reason: UpReason,
        /// The CPU figure that crossed the threshold.
        cpu: f64,
    },
    /// Terminate this node.
    ScaleDown(Candidate),
}

impl ScaleAction {
    /// A label for metrics: hold, scale_up_predicted, scale_up_current, scale_down.
    pub fn label(&self) -> &'static str {
        match self {
            ScaleAction::Hold(_) => "hold",
            ScaleAction::ScaleUp {
                reason: UpReason::PredictedHighFleetCpuLoad,
                ..
            } => "scale_up_predicted",
            ScaleAction::ScaleUp { .. } => "scale_up_current",
            ScaleAction::ScaleDown(_) => "scale_down",
        }
    }

    /// What kind of decision this is.
    pub fn kind(&self) -> ScaleDecision {
        match self {
            ScaleAction::Hold(_) => ScaleDecision::Hold,
            ScaleAction::ScaleUp { .. } => ScaleDecision::ScaleUp,
            ScaleAction::ScaleDown(_) => ScaleDecision::ScaleDown,
        }
    }

    /// Why, in words.
    pub fn reason(&self) -> String {
        match self {
            ScaleAction::Hold(why) => why.clone(),
            ScaleAction::ScaleUp { reason, cpu } => format!("{} ({cpu:.2})", reason.as_str()),
            ScaleAction::ScaleDown(node) => {
                format!("LOW_FLEET_CPU_LOAD: terminate {} ({:.2})", node.id, node.cpu)
            }
        }
    }

    /// The decision in words.
    pub fn describe(&self) -> String {
        format!("{}: {}", self.kind().as_str().replace('_', " "), self.reason())
    }
}

/// The scaler's state: streaks and the time of the last actions.
#[derive(Debug, Clone)]
pub struct Scaler {
    policy: ScalingPolicy,
    up_streak: u32,
    down_streak: u32,
    last_up: Option<Instant>,
    last_action: Option<Instant>,
}

impl Scaler {
    /// A scaler with no history.
    pub fn new(policy: ScalingPolicy) -> Self {
        Self {
            policy,
            up_streak: 0,
            down_streak: 0,
            last_up: None,
            last_action: None,
        }
    }

    /// The parameters.
    pub fn policy(&self) -> &ScalingPolicy {
        &self.policy
    }

    /// Decides at `now`. A scale decision starts its cooldown whether or not the
    /// caller acts on it (`forecast_only` shows what would have happened).
    pub fn decide(&mut self, now: Instant, view: &FleetView, forecast: Option<&Forecast>) -> ScaleAction {
        let policy = &self.policy;
        let Some(current) = view.avg_cpu else {
            self.up_streak = 0;
            self.down_streak = 0;
            return ScaleAction::Hold("no CPU samples from live nodes".into());
        };
        let trusted = forecast
            .filter(|f| f.data_points >= TRUSTED_POINTS && f.confidence >= policy.min_confidence)
            .and_then(|f| f.predicted);
        let (basis, reason) = match trusted {
            Some(predicted) => (predicted, UpReason::PredictedHighFleetCpuLoad),
            None => (current, UpReason::HighFleetCpuLoad),
        };
        self.up_streak = if basis > policy.up_threshold {
            self.up_streak + 1
        } else {
            0
        };
        let low = current < policy.down_threshold && trusted.is_none_or(|p| p < policy.down_threshold);
        self.down_streak = if low { self.down_streak + 1 } else { 0 };

        let since = |at: Option<Instant>| at.map(|at| now.saturating_duration_since(at));
        if self.up_streak >= policy.up_consecutive {
            if let Some(elapsed) = since(self.last_up).filter(|e| *e < policy.up_cooldown) {
                return ScaleAction::Hold(format!(
                    "above the scale-up threshold, cooling down ({:.0}s of {:.0}s)",
                    elapsed.as_secs_f64(),
                    policy.up_cooldown.as_secs_f64()
                ));
            }
            if view.active_nodes >= policy.max_nodes {
                return ScaleAction::Hold(format!(
                    "above the scale-up threshold, at max_nodes ({})",
                    policy.max_nodes
                ));
            }
            self.up_streak = 0;
            self.last_up = Some(now);
            self.last_action = Some(now);
            return ScaleAction::ScaleUp { reason, cpu: basis };
        }
        if self.down_streak >= policy.down_consecutive {
            if let Some(elapsed) = since(self.last_action).filter(|e| *e < policy.down_cooldown) {
                return ScaleAction::Hold(format!(
                    "below the scale-down threshold, cooling down ({:.0}s of {:.0}s)",
                    elapsed.as_secs_f64(),
                    policy.down_cooldown.as_secs_f64()
                ));
            }
            if view.in_service_nodes <= policy.min_nodes {
                return ScaleAction::Hold(format!(
                    "below the scale-down threshold, at min_nodes ({} in service)",
                    policy.min_nodes
                ));
            }
            if view.unreported > 0 {
                // A node that just joined may be the least loaded or the busiest:
                // choosing without its figure could remove the wrong one.
                return ScaleAction::Hold(format!(
                    "below the scale-down threshold, waiting for CPU from {} newly connected node(s)",
                    view.unreported
                ));
            }
            let Some(node) = view.least_loaded.clone() else {
                return ScaleAction::Hold(
                    "below the scale-down threshold, but no connected node to remove".into(),
                );
            };
            self.down_streak = 0;
            self.last_action = Some(now);
            return ScaleAction::ScaleDown(node);
        }
        ScaleAction::Hold("within thresholds".into())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use uuid::Uuid;

    use super::*;
    use crate::domain::forecast::Model;

    fn policy() -> ScalingPolicy {
        ScalingPolicy {
            up_threshold: 0.8,
            down_threshold: 0.3,
            up_consecutive: 2,
            down_consecutive: 5,
            up_cooldown: Duration::from_secs(300),
            down_cooldown: Duration::from_secs(600),
            min_nodes: 1,
            max_nodes: 10,
            min_confidence: 0.5,
            mode: ScalingMode::ForecastAndScale,
        }
    }

    fn view(cpu: f64, nodes: u32) -> FleetView {
        FleetView {
            active_nodes: nodes,
            in_service_nodes: nodes,
            avg_cpu: Some(cpu),
            least_loaded: Some(Candidate {
                id: NodeId(Uuid::from_u128(7)),
                ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
                cpu: cpu / 2.0,
            }),
            unreported: 0,
        }
    }

    fn forecast(predicted: f64, confidence: f64, points: usize) -> Forecast {
        Forecast {
            made_at: 0.0,
            current: 0.5,
            predicted: Some(predicted),
            confidence,
            model: Model::Naive,
            data_points: points,
        }
    }

    /// Runs one check a minute from `start`; returns the decisions' labels.
    fn checks(
        scaler: &mut Scaler,
        start: Instant,
        inputs: &[(FleetView, Option<Forecast>)],
    ) -> Vec<&'static str> {
        inputs
            .iter()
            .enumerate()
            .map(|(i, (view, forecast))| {
                let now = start + Duration::from_secs(60 * i as u64);
                scaler.decide(now, view, forecast.as_ref()).label()
            })
            .collect()
    }

    #[test]
    fn a_trusted_prediction_scales_up_after_two_checks_then_cools_down() {
        let mut scaler = Scaler::new(policy());
        let high = (view(0.5, 3), Some(forecast(0.9, 0.8, 30)));
        let labels = checks(&mut scaler, Instant::now(), &vec![high; 8]);
        assert_eq!(
            labels,
            [
                "hold",
                "scale_up_predicted",
                "hold",
                "hold",
                "hold",
                "hold",
                "scale_up_predicted",
                "hold"
            ],
            "two checks, then five minutes of cooldown"
        );
    }

    #[test]
    fn an_untrusted_prediction_falls_back_to_current_cpu_and_says_so() {
        for untrusted in [forecast(0.9, 0.3, 30), forecast(0.9, 0.9, 15)] {
            let mut scaler = Scaler::new(policy());
            let calm = (view(0.5, 3), Some(untrusted.clone()));
            assert_eq!(checks(&mut scaler, Instant::now(), &vec![calm; 3]), ["hold"; 3]);
            let hot = (view(0.85, 3), Some(untrusted));
            let now = Instant::now();
            scaler.decide(now, &hot.0, hot.1.as_ref());
            let decision = scaler.decide(now + Duration::from_secs(60), &hot.0, hot.1.as_ref());
            assert_eq!(
                decision,
                ScaleAction::ScaleUp {
                    reason: UpReason::HighFleetCpuLoad,
                    cpu: 0.85
                }
            );
        }
        let mut scaler = Scaler::new(policy());
        let no_prediction = (view(0.95, 3), None);
        let labels = checks(&mut scaler, Instant::now(), &vec![no_prediction; 2]);
        assert_eq!(labels, ["hold", "scale_up_current"]);
    }

    #[test]
    fn hysteresis_a_single_dip_resets_the_streak() {
        let mut scaler = Scaler::new(policy());
        let high = (view(0.9, 3), None);
        let dip = (view(0.7, 3), None);
        let labels = checks(
            &mut scaler,
            Instant::now(),
            &[high.clone(), dip, high.clone(), high],
        );
        assert_eq!(labels, ["hold", "hold", "hold", "scale_up_current"]);
    }

    #[test]
    fn scale_down_needs_five_low_checks_with_a_low_prediction_and_removes_the_least_loaded() {
        let mut scaler = Scaler::new(policy());
        let low = (view(0.1, 3), Some(forecast(0.15, 0.9, 30)));
        let labels = checks(&mut scaler, Instant::now(), &vec![low.clone(); 6]);
        assert_eq!(labels, ["hold", "hold", "hold", "hold", "scale_down", "hold"]);
        // A prediction of a rise vetoes the scale-down.
        let mut scaler = Scaler::new(policy());
        let rising = (view(0.1, 3), Some(forecast(0.5, 0.9, 30)));
        assert_eq!(checks(&mut scaler, Instant::now(), &vec![rising; 6]), ["hold"; 6]);
        let mut scaler = Scaler::new(policy());
        let start = Instant::now();
        for i in 0..4 {
            scaler.decide(start + Duration::from_secs(60 * i), &low.0, low.1.as_ref());
        }
        let decision = scaler.decide(start + Duration::from_secs(240), &low.0, low.1.as_ref());
        assert_eq!(
            decision,
            ScaleAction::ScaleDown(low.0.least_loaded.clone().unwrap())
        );
    }

    #[test]
    fn no_node_is_removed_while_a_live_node_has_not_reported_cpu() {
        let mut scaler = Scaler::new(policy());
        let partial = FleetView {
            unreported: 1,
            ..view(0.1, 3)
        };
        let labels = checks(&mut scaler, Instant::now(), &vec![(partial, None); 6]);
        assert_eq!(labels, ["hold"; 6]);
        // Once it has, the streak it built counts.
        let now = Instant::now() + Duration::from_secs(600);
        assert_eq!(scaler.decide(now, &view(0.1, 3), None).label(), "scale_down");
    }

    #[test]
    fn min_and_max_nodes_are_respected() {
        let mut scaler = Scaler::new(policy());
        let full = (view(0.95, 10), None);
        assert_eq!(checks(&mut scaler, Instant::now(), &vec![full; 3]), ["hold"; 3]);
        let mut scaler = Scaler::new(policy());
        let last = (view(0.05, 1), None);
        assert_eq!(checks(&mut scaler, Instant::now(), &vec![last; 7]), ["hold"; 7]);
    }

    #[test]
    fn no_scale_down_right_after_a_scale_up() {
        let mut scaler = Scaler::new(policy());
        let start = Instant::now();
        let high = view(0.95, 3);
        scaler.decide(start, &high, None);
        assert_eq!(
            scaler
                .decide(start + Duration::from_secs(60), &high, None)
                .label(),
            "scale_up_current"
        );
        let low = view(0.05, 4);
        let labels: Vec<_> = (2..9)
            .map(|i| {
                scaler
                    .decide(start + Duration::from_secs(60 * i), &low, None)
                    .label()
            })
            .collect();
        assert_eq!(labels, ["hold"; 7], "the down cooldown runs from the scale-up");
        let later = scaler.decide(start + Duration::from_secs(60 * 12), &low, None);
        assert_eq!(later.label(), "scale_down");
    }

    #[test]
    fn no_samples_no_decision() {
        let mut scaler = Scaler::new(policy());
        let empty = FleetView {
            active_nodes: 0,
            in_service_nodes: 0,
            avg_cpu: None,
            least_loaded: None,
            unreported: 0,
        };
        assert_eq!(scaler.decide(Instant::now(), &empty, None).label(), "hold");
    }
}
