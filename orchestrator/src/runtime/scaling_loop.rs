//! The scaling loop: every `scaling_check_interval_seconds` it reads the fleet
//! (one snapshot from the fleet actor), feeds the fleet CPU to the [`Forecaster`],
//! lets the [`Scaler`] decide, acts (webhook through the outbox; scale-down through
//! the fleet actor's Terminate path), and publishes the check's [`Prediction`].
//!
//! It owns the forecaster and the scaler; nothing else touches them. Operators
//! read the latest prediction and subscribe to new ones through a
//! [`PredictionHandle`] (bounded broadcast: a slow watcher is dropped, never
//! waited for).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::{
    clock,
    domain::event::{EventKind, FleetEvent, ScaleDecision},
    domain::forecast::{
        AccuracySummary, Forecast, ForecastConfig, Forecaster, Model, Point, history::LONG_HISTORY_SECONDS,
    },
    domain::node::{FleetStats, ScaleDown},
    domain::registry::{DrainRequest, DrainThenTerminate},
    domain::scaler::{FleetView, ScaleAction, Scaler, ScalingMode, ScalingPolicy, UpReason},
    edge::metrics::{DecisionLabel, Metrics},
    edge::store::{Write, writer::StoreWriter},
    edge::webhook::{self, PredictionInfo, WebhookEvent},
    runtime::bus::EventBus,
    runtime::fleet::{FleetHandle, FleetStopped},
};

/// Predictions buffered for watchers before a slow one is dropped.
pub const PREDICTION_BUFFER: usize = 64;
/// Prune the persisted history once per this many checks.
const PRUNE_EVERY: u64 = 60;

/// One scaling check's outcome, as operators see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// When the check ran.
    pub at: SystemTime,
    /// Fleet CPU at the check (None: no live node reported CPU).
    pub current_cpu_usage: Option<f64>,
    /// The forecast (None without a CPU figure).
    pub forecast: Option<Forecast>,
    /// The horizon.
    pub horizon: Duration,
    /// The configured model.
    pub configured_model: Model,
    /// Scores of recent predictions.
    pub accuracy: AccuracySummary,
    /// Live nodes.
    pub active_nodes: u32,
    /// What the scaler decided.
    pub decision: ScaleDecision,
    /// Why, in words.
    pub decision_reason: String,
    /// Whether the decision was carried out (false for a hold, under
    /// forecast_only, or when the scale-down target could not be terminated).
    pub acted: bool,
}

/// What a check did about its decision.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    decision: ScaleDecision,
    reason: String,
    acted: bool,
}

/// Recent predictions kept for the console's chart (a day of one-minute checks).
pub const RECENT_PREDICTIONS: usize = 1440;

/// Reads predictions.
#[derive(Debug, Clone)]
pub struct PredictionHandle {
    latest: watch::Receiver<Option<Arc<Prediction>>>,
    updates: broadcast::Sender<Arc<Prediction>>,
    /// The latest [`RECENT_PREDICTIONS`], oldest first (the loop writes, readers copy).
    recent: Arc<std::sync::Mutex<std::collections::VecDeque<Arc<Prediction>>>>,
    /// The checks of earlier runs, as the replay of the stored history remade them.
    restored: Arc<Restored>,
}

/// What the chart shows of the checks before this run: the forecasts the replay
/// of the persisted CPU history remade (the latest [`RECENT_PREDICTIONS`]), and
/// the forecaster's scores after it. Without it, the console's chart would be
/// empty after every restart or failover until checks of the new run come in.
#[derive(Debug, Default)]
struct Restored {
    forecasts: Vec<Forecast>,
    accuracy: Option<AccuracySummary>,
    horizon: Duration,
}

/// One scaling check on the console's chart.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartPoint {
    /// When the check ran.
    pub at: SystemTime,
    /// Fleet CPU at the check.
    pub current_cpu_usage: Option<f64>,
    /// The prediction made for `target`, with its confidence and model.
    pub predicted: Option<(f64, f64, Model)>,
    /// The predicted time.
    pub target: Option<SystemTime>,
    /// What the scaler decided; None for a check of an earlier run, remade from
    /// the stored history (its decision is not stored).
    pub decision: Option<ScaleDecision>,
}

/// The console's chart: the checks, oldest first, and the latest scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// At most [`RECENT_PREDICTIONS`]: this run's checks, preceded by those of
    /// earlier runs while there is room.
    pub points: Vec<ChartPoint>,
    /// The accuracy as of the latest check (or the replay, before one).
    pub accuracy: Option<AccuracySummary>,
}

fn unix(seconds: f64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or_default()
}

impl PredictionHandle {
    /// A handle that never sees a prediction (tests of the other services).
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        let (_, latest) = watch::channel(None);
        let (updates, _) = broadcast::channel(1);
        Self {
            latest,
            updates,
            recent: Default::default(),
            restored: Default::default(),
        }
    }

    /// The recent predictions, oldest first.
    pub fn recent(&self) -> Vec<Arc<Prediction>> {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        recent.iter().cloned().collect()
    }

    /// The console's chart: this run's checks, preceded (while there is room)
    /// by the earlier runs' checks the replay remade, so a restart or a
    /// failover does not empty it.
    pub fn chart(&self) -> Chart {
        let recent = self.recent();
        let first = recent.first().map(|prediction| prediction.at);
        let room = RECENT_PREDICTIONS.saturating_sub(recent.len());
        let horizon = self.restored.horizon;
        let earlier = self
            .restored
            .forecasts
            .iter()
            .map(|forecast| (unix(forecast.made_at), forecast))
            .filter(|(at, _)| first.is_none_or(|first| *at < first))
            .collect::<Vec<_>>();
        let skip = earlier.len().saturating_sub(room);
        let mut points: Vec<ChartPoint> = earlier[skip..]
            .iter()
            .map(|(at, forecast)| ChartPoint {
                at: *at,
                current_cpu_usage: Some(forecast.current),
                predicted: forecast
                    .predicted
                    .map(|predicted| (predicted, forecast.confidence, forecast.model)),
                target: forecast.predicted.map(|_| unix(forecast.target(horizon))),
                decision: None,
            })
            .collect();
        points.extend(recent.iter().map(|prediction| {
            let forecast = prediction.forecast.as_ref().filter(|f| f.predicted.is_some());
            ChartPoint {
                at: prediction.at,
                current_cpu_usage: prediction.current_cpu_usage,
                predicted: forecast.and_then(|f| Some((f.predicted?, f.confidence, f.model))),
                target: forecast.map(|_| prediction.at + prediction.horizon),
                decision: Some(prediction.decision),
            }
        }));
        let accuracy = match recent.last() {
            Some(latest) => Some(latest.accuracy),
            None => self.restored.accuracy,
        };
        Chart { points, accuracy }
    }

    /// The latest prediction, if a check has run.
    pub fn latest(&self) -> Option<Arc<Prediction>> {
        self.latest.borrow().clone()
    }

    /// The latest prediction and a receiver of every later one (subscribed first,
    /// so nothing falls between; the receiver may repeat the latest).
    pub fn subscribe(&self) -> (Option<Arc<Prediction>>, broadcast::Receiver<Arc<Prediction>>) {
        let updates = self.updates.subscribe();
        (self.latest(), updates)
    }
}

/// Where the loop's results go.
#[derive(Debug, Clone)]
pub struct ScalingOutputs {
    /// Durable state (history, scaling webhooks).
    pub store: StoreWriter,
    /// Gauges and counters.
    pub metrics: Metrics,
    /// SCALE_DECIDED events.
    pub bus: EventBus,
}

/// The loop's settings.
#[derive(Debug, Clone)]
pub struct ScalingSettings {
    /// Time between checks.
    pub interval: Duration,
    /// The forecaster's parameters.
    pub forecast: ForecastConfig,
    /// The scaler's parameters.
    pub policy: ScalingPolicy,
}

/// Starts the loop. `history` is what the store kept from earlier runs.
pub fn spawn(
    settings: ScalingSettings,
    history: Vec<Point>,
    fleet: FleetHandle,
    outputs: ScalingOutputs,
    shutdown: CancellationToken,
) -> (PredictionHandle, tokio::task::JoinHandle<()>) {
    let ScalingOutputs { store, metrics, bus } = outputs;
    let mut forecaster = Forecaster::new(settings.forecast.clone());
    let started = std::time::Instant::now();
    let mut replayed = forecaster.replay(history);
    let restored_points = replayed.len();
    if restored_points > 0 {
        let accuracy = forecaster.accuracy();
        info!(
            points = restored_points,
            window_points = forecaster.history().len(),
            scored = accuracy.scored,
            replay_ms = started.elapsed().as_millis() as u64,
            "restored fleet CPU history from the state store and replayed it through the forecaster: model records are warm"
        );
    }
    let (latest_tx, latest) = watch::channel(None);
    let (updates, _) = broadcast::channel(PREDICTION_BUFFER);
    let recent: Arc<std::sync::Mutex<std::collections::VecDeque<Arc<Prediction>>>> = Default::default();
    // The chart keeps the latest RECENT_PREDICTIONS; older ones are let go.
    let older = replayed.len().saturating_sub(RECENT_PREDICTIONS);
    let restored = Restored {
        forecasts: replayed.split_off(older),
        accuracy: (restored_points > 0).then(|| forecaster.accuracy()),
        horizon: forecaster.config().horizon,
    };
    let handle = PredictionHandle {
        latest,
        updates: updates.clone(),
        recent: recent.clone(),
        restored: Arc::new(restored),
    };
    let run = ScalingLoop {
        interval: settings.interval,
        forecaster,
        scaler: Scaler::new(settings.policy),
        fleet,
        store,
        metrics,
        bus,
        latest: latest_tx,
        recent,
        updates,
        anchor: (clock::now(), SystemTime::now()),
        checks: 0,
    };
    (handle, tokio::spawn(run.run(shutdown)))
}

struct ScalingLoop {
    interval: Duration,
    forecaster: Forecaster,
    scaler: Scaler,
    fleet: FleetHandle,
    store: StoreWriter,
    metrics: Metrics,
    bus: EventBus,
    latest: watch::Sender<Option<Arc<Prediction>>>,
    recent: Arc<std::sync::Mutex<std::collections::VecDeque<Arc<Prediction>>>>,
    updates: broadcast::Sender<Arc<Prediction>>,
    /// Maps the (pausable, in tests) monotonic clock to wall time.
    anchor: (std::time::Instant, SystemTime),
    checks: u64,
}

impl ScalingLoop {
    async fn run(mut self, shutdown: CancellationToken) {
        let start = tokio::time::Instant::now() + self.interval;
        let mut ticks = tokio::time::interval_at(start, self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = ticks.tick() => {
                    let span = tracing::info_span!("scaling_check");
                    if self.check().instrument(span).await.is_err() {
                        break;
                    }
                }
            }
        }
        debug!("scaling loop stopped");
    }

    fn wall_now(&self) -> SystemTime {
        let (instant, wall) = self.anchor;
        wall + clock::now().saturating_duration_since(instant)
    }

    async fn check(&mut self) -> Result<(), FleetStopped> {
        let (stats, least_loaded) = self.fleet.scaling_view().await?;
        let at = self.wall_now();
        let t = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let mut writes = Vec::new();
        let forecast = match stats.avg_cpu_usage {
            Some(cpu) => {
                let point = Point {
                    t,
                    value: cpu.clamp(0.0, 1.0),
                };
                info!(cpu, active_nodes = stats.active_nodes, "CPU data point recorded");
                self.forecaster.observe(point);
                writes.push(Write::PutHistory(point));
                let span = tracing::info_span!("prediction", model = %self.forecaster.config().model);
                span.in_scope(|| self.forecaster.predict(t))
            }
            None => {
                debug!("no live node reported CPU; no data point this check");
                None
            }
        };
        self.report(forecast.as_ref());

        let view = FleetView {
            active_nodes: stats.active_nodes,
            in_service_nodes: stats.in_service_nodes,
            avg_cpu: stats.avg_cpu_usage,
            least_loaded,
            unreported: stats.active_without_cpu,
        };
        let decision = self.scaler.decide(clock::now(), &view, forecast.as_ref());
        self.metrics
            .scaling_decisions
            .get_or_create(&DecisionLabel {
                decision: decision.label().to_owned(),
            })
            .inc();
        let outcome = self
            .act(&decision, &stats, forecast.as_ref(), at, &mut writes)
            .await?;

        self.checks += 1;
        if self.checks.is_multiple_of(PRUNE_EVERY) {
            writes.push(Write::PruneHistory {
                before: t - LONG_HISTORY_SECONDS,
            });
        }
        self.store.write(writes);
        // After the write is queued: whoever hears of the decision can find its
        // webhook (a scale-down's follows its terminate, once the node is drained).
        if outcome.decision != ScaleDecision::Hold {
            self.bus.publish(FleetEvent {
                decision: Some(outcome.decision),
                ..FleetEvent::new(EventKind::ScaleDecided, outcome.reason.clone(), at)
            });
        }

        let prediction = Arc::new(Prediction {
            at,
            current_cpu_usage: stats.avg_cpu_usage,
            forecast,
            horizon: self.forecaster.config().horizon,
            configured_model: self.forecaster.config().model,
            accuracy: self.forecaster.accuracy(),
            active_nodes: stats.active_nodes,
            decision: outcome.decision,
            decision_reason: outcome.reason,
            acted: outcome.acted,
        });
        self.latest.send_replace(Some(prediction.clone()));
        {
            let mut recent = self
                .recent
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if recent.len() == RECENT_PREDICTIONS {
                recent.pop_front();
            }
            recent.push_back(prediction.clone());
        }
        // No watcher is fine.
        let _ = self.updates.send(prediction);
        Ok(())
    }

    /// Logs and exports the check's forecast and the running accuracy.
    fn report(&self, forecast: Option<&Forecast>) {
        let horizon_min = self.forecaster.config().horizon.as_secs_f64() / 60.0;
        if let Some(forecast) = forecast {
            self.metrics.fleet_cpu_usage.set(forecast.current);
            match forecast.predicted {
                Some(predicted) => {
                    self.metrics.ml_predictions_made.inc();
                    self.metrics.ml_predicted_cpu_usage.set(predicted);
                    self.metrics.ml_prediction_confidence.set(forecast.confidence);
                    info!(
                        model = %forecast.model, data_points = forecast.data_points, current = forecast.current,
                        "CPU usage predicted for +{horizon_min:.0} minutes: {predicted:.2} (confidence: {:.2})",
                        forecast.confidence
                    );
                }
                None => info!(
                    data_points = forecast.data_points,
                    min_points = self.forecaster.config().min_points,
                    "not enough CPU history for a prediction yet; decisions use the current CPU"
                ),
            }
        }
        let accuracy = self.forecaster.accuracy();
        if accuracy.window > 0 {
            self.metrics
                .ml_prediction_accuracy_ratio
                .set(accuracy.model.within_ratio);
            self.metrics
                .ml_baseline_accuracy_ratio
                .set(accuracy.baseline.within_ratio);
            self.metrics
                .ml_prediction_mean_absolute_error
                .set(accuracy.model.mean_absolute_error);
            self.metrics
                .ml_baseline_mean_absolute_error
                .set(accuracy.baseline.mean_absolute_error);
            self.metrics.ml_prediction_bias.set(accuracy.model.bias);
        }
    }

    /// Carries out a decision (unless forecast-only) and says what was done.
    async fn act(
        &mut self,
        decision: &ScaleAction,
        stats: &FleetStats,
        forecast: Option<&Forecast>,
        at: SystemTime,
        writes: &mut Vec<Write>,
    ) -> Result<Outcome, FleetStopped> {
        let described = decision.describe();
        let mut outcome = Outcome {
            decision: decision.kind(),
            reason: decision.reason(),
            acted: false,
        };
        if matches!(decision, ScaleAction::Hold(_)) {
            debug!(decision = %described, "scaling check");
            return Ok(outcome);
        }
        if !stats.automation.scaling {
            info!(decision = %described, "scaling paused (SetAutomation): would act on this decision; nothing sent");
            outcome.reason = format!("{} (scaling paused: not acted on)", outcome.reason);
            return Ok(outcome);
        }
        if self.scaler.policy().mode == ScalingMode::ForecastOnly {
            info!(decision = %described, "forecast_only: would act on this decision; nothing sent");
            outcome.reason = format!("{} (forecast_only: not acted on)", outcome.reason);
            return Ok(outcome);
        }
        let event = match decision {
            ScaleAction::Hold(_) => unreachable!("handled above"),
            ScaleAction::ScaleUp { reason, cpu } => {
                let prediction = match reason {
                    UpReason::PredictedHighFleetCpuLoad => {
                        info!(predicted = cpu, "Triggering predictive scale-up action");
                        self.metrics.predictive_scale_ups.inc();
                        forecast.map(|f| PredictionInfo {
                            predicted_cpu_usage: *cpu,
                            prediction_horizon_minutes: self.forecaster.config().horizon.as_secs_f64() / 60.0,
                            confidence: f.confidence,
                        })
                    }
                    UpReason::HighFleetCpuLoad => {
                        info!(
                            current = cpu,
                            "Triggering scale-up action on current CPU (no trusted prediction)"
                        );
                        None
                    }
                };
                WebhookEvent::ScaleUp {
                    reason: *reason,
                    prediction,
                }
            }
            ScaleAction::ScaleDown(node) => {
                // A mitigation node's route is withdrawn before it stops: the
                // terminate follows the drain, and a failed drain sends none. The
                // webhook tells the provisioner the node is going, so the fleet
                // actor queues it with the terminate, not here.
                let reason = "scale down: fleet CPU below scale_down_cpu_threshold".to_owned();
                let drain = DrainRequest {
                    reason: format!("drain before terminate: {reason}"),
                    deadline: None,
                    force: false,
                };
                let scale_down = ScaleDown { cpu: node.cpu };
                match self.fleet.scale_down(node.id, reason, drain, scale_down).await? {
                    Ok(DrainThenTerminate::Draining(_)) => {
                        info!(node.id = %node.id, node.ip = %node.ip, cpu = node.cpu, "scale-down: least loaded node draining; the terminate and the LOW_FLEET_CPU_LOAD webhook follow once it is drained");
                        outcome.reason = format!(
                            "{} (draining; LOW_FLEET_CPU_LOAD is sent with the terminate, once drained)",
                            outcome.reason
                        );
                    }
                    Ok(DrainThenTerminate::Terminating(_)) => {
                        info!(node.id = %node.id, node.ip = %node.ip, cpu = node.cpu, "scale-down: least loaded node was drained already; terminating");
                    }
                    Err(error) => {
                        warn!(node.id = %node.id, %error, "scale-down skipped: the node cannot be terminated");
                        outcome.reason = format!(
                            "{} (not acted on: the target is unavailable: {error})",
                            outcome.reason
                        );
                        return Ok(outcome);
                    }
                }
                outcome.acted = true;
                return Ok(outcome);
            }
        };
        let entry = webhook::outbox_entry(&event, stats, at);
        info!(webhook.id = %entry.id, webhook.reason = %entry.reason, "scaling webhook queued");
        writes.push(Write::PutOutbox(entry));
        outcome.acted = true;
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    //! The loop on paused tokio time, against the real fleet actor and a memory
    //! store: a scaling interval of a minute takes microseconds.

    use std::time::Duration;

    use tokio::sync::mpsc;
    use uuid::Uuid;

    use super::*;
    use crate::{
        domain::{event::FleetEvent, node::NodeId},
        edge::store::Store,
        runtime::fleet::{
            SessionReport, SessionSignal, SignalReceiver, session_signals,
            tests::{TestFleet, info, settings as fleet_settings, start},
        },
    };

    const INTERVAL: Duration = Duration::from_secs(60);

    fn policy(mode: ScalingMode) -> ScalingPolicy {
        ScalingPolicy {
            up_threshold: 0.8,
            down_threshold: 0.3,
            up_consecutive: 2,
            down_consecutive: 3,
            up_cooldown: Duration::from_secs(300),
            down_cooldown: Duration::from_secs(600),
            min_nodes: 1,
            max_nodes: 100,
            min_confidence: 0.5,
            mode,
        }
    }

    struct Running {
        fleet: TestFleet,
        predictions: PredictionHandle,
        events: broadcast::Receiver<FleetEvent>,
        shutdown: CancellationToken,
    }

    /// A fleet actor (heartbeats every second, a generous timeout) and a scaling
    /// loop checking every minute, both on the paused clock.
    fn run(mode: ScalingMode) -> Running {
        run_after(mode, Vec::new())
    }

    /// [`run`], restarted on a stored CPU `history`.
    fn run_after(mode: ScalingMode, history: Vec<Point>) -> Running {
        let shutdown = CancellationToken::new();
        let mut settings = fleet_settings();
        settings.lifecycle.heartbeat_timeout = Duration::from_secs(3600);
        let fleet = start(settings, Default::default(), &shutdown);
        let events = fleet.bus.subscribe(None).unwrap().live;
        let (committed, _) = mpsc::unbounded_channel();
        let (store, _health, _thread) =
            crate::edge::store::writer::spawn(Box::new(fleet.store.clone()), committed);
        let outputs = ScalingOutputs {
            store,
            metrics: fleet.metrics.clone(),
            bus: fleet.bus.clone(),
        };
        let scaling = ScalingSettings {
            interval: INTERVAL,
            forecast: ForecastConfig::seed(INTERVAL, Model::Auto),
            policy: policy(mode),
        };
        let (predictions, _task) = spawn(scaling, history, fleet.handle.clone(), outputs, shutdown.clone());
        Running {
            fleet,
            predictions,
            events,
            shutdown,
        }
    }

    /// A connected node that has reported `cpu`; its signal channel is returned.
    async fn node(fleet: &TestFleet, cpu: f64) -> (NodeId, SignalReceiver) {
        let id = NodeId(Uuid::new_v4());
        let (tx, signals) = session_signals();
        let admitted = fleet.handle.connect(info(id), tx, clock::now()).await.unwrap();
        admitted.liveness.beat(clock::now(), Some(cpu));
        (id, signals)
    }

    async fn next_scale_decision(events: &mut broadcast::Receiver<FleetEvent>) -> FleetEvent {
        loop {
            let event = events.recv().await.unwrap();
            if event.kind == EventKind::ScaleDecided {
                return event;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_restart_the_chart_starts_with_the_stored_checks_remade() {
        // More stored checks than the chart holds: a minute apart, up to now.
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let stored = RECENT_PREDICTIONS + 20;
        let history: Vec<Point> = (0..stored)
            .map(|i| Point {
                t: now - 60.0 * (stored - i) as f64,
                value: 0.3 + 0.2 * ((i % 120) as f64 / 120.0),
            })
            .collect();
        let running = run_after(ScalingMode::ForecastOnly, history.clone());

        // Before this run's first check: the latest stored checks, remade.
        let chart = running.predictions.chart();
        assert_eq!(chart.points.len(), RECENT_PREDICTIONS);
        let kept = &history[stored - RECENT_PREDICTIONS..];
        for (point, stored) in chart.points.iter().zip(kept) {
            assert_eq!(point.at, unix(stored.t));
            assert_eq!(point.current_cpu_usage, Some(stored.value));
            assert_eq!(point.decision, None, "decisions are not stored");
            let (_, confidence, _) = point.predicted.expect("a full window predicts");
            assert!((0.0..=1.0).contains(&confidence));
            assert_eq!(point.target, Some(unix(stored.t) + Duration::from_secs(600)));
        }
        let accuracy = chart.accuracy.expect("the replay scored its predictions");
        assert!(accuracy.scored > 0);

        // This run's check comes after them, and the oldest stored one makes room.
        let _node = node(&running.fleet, 0.5).await;
        let (_, mut updates) = running.predictions.subscribe();
        let check = updates.recv().await.unwrap();
        let chart = running.predictions.chart();
        assert_eq!(chart.points.len(), RECENT_PREDICTIONS);
        assert_eq!(chart.points[0].at, unix(kept[1].t));
        let last = chart.points.last().unwrap();
        assert_eq!(last.at, check.at);
        assert_eq!(last.current_cpu_usage, Some(0.5));
        assert_eq!(last.decision, Some(ScaleDecision::Hold));
        assert_eq!(chart.accuracy, Some(check.accuracy));
        running.shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn one_prediction_per_check_on_the_interval() {
        let running = run(ScalingMode::ForecastAndScale);
        let _node = node(&running.fleet, 0.5).await;
        let (first, mut updates) = running.predictions.subscribe();
        assert!(first.is_none(), "no check before the first interval");
        let started = tokio::time::Instant::now();
        let mut times = Vec::new();
        for _ in 0..3 {
            let prediction = updates.recv().await.unwrap();
            assert_eq!(prediction.current_cpu_usage, Some(0.5));
            assert_eq!(prediction.decision, ScaleDecision::Hold);
            assert!(!prediction.acted);
            times.push(started.elapsed());
        }
        assert_eq!(times, vec![INTERVAL, INTERVAL * 2, INTERVAL * 3]);
        running.shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_hot_fleet_is_scaled_up_through_the_outbox_once_per_cooldown() {
        let mut running = run(ScalingMode::ForecastAndScale);
        let _node = node(&running.fleet, 0.95).await;
        let started = tokio::time::Instant::now();
        let decided = next_scale_decision(&mut running.events).await;
        // Two checks above the threshold; fewer than 20 points, so on current CPU.
        assert_eq!(started.elapsed(), INTERVAL * 2);
        assert_eq!(decided.decision, Some(ScaleDecision::ScaleUp));
        assert!(
            decided.reason.starts_with("HIGH_FLEET_CPU_LOAD"),
            "{}",
            decided.reason
        );
        let queued = running
            .fleet
            .store
            .wait_for(|state| !state.outbox.is_empty())
            .outbox;
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].reason, "HIGH_FLEET_CPU_LOAD");
        let latest = running.predictions.latest().unwrap();
        assert!(latest.acted);

        // The next one waits for the cooldown (300 s), then two more hot checks.
        let again = next_scale_decision(&mut running.events).await;
        assert_eq!(again.decision, Some(ScaleDecision::ScaleUp));
        assert!(
            started.elapsed() >= INTERVAL * 2 + Duration::from_secs(300),
            "{:?}",
            started.elapsed()
        );
        running.shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_fleet_terminates_its_least_loaded_node() {
        let mut running = run(ScalingMode::ForecastAndScale);
        let (idle, mut idle_signals) = node(&running.fleet, 0.05).await;
        let (_busier, mut busier_signals) = node(&running.fleet, 0.2).await;
        let decided = next_scale_decision(&mut running.events).await;
        assert_eq!(decided.decision, Some(ScaleDecision::ScaleDown));
        assert!(decided.reason.contains(&idle.to_string()), "{}", decided.reason);
        // The idle node is drained, then told to terminate, through the fleet
        // actor's path: nothing is terminated while its route is announced.
        let Some(SessionSignal::Welcome { session, .. }) = idle_signals.recv().await else {
            panic!("expected the welcome first")
        };
        assert!(matches!(
            idle_signals.recv().await,
            Some(SessionSignal::Drain { .. })
        ));
        assert!(
            idle_signals.try_recv().is_err(),
            "no terminate before the drain is done"
        );
        // Nor a webhook: the check's batch (its history point) is stored
        // without one, so no provisioner reclaims a node still carrying traffic.
        let checked = running.fleet.store.wait_for(|state| !state.history.is_empty());
        assert!(checked.outbox.is_empty(), "{:?}", checked.outbox);
        let drained = SessionReport::DrainResult {
            success: true,
            detail: "route withdrawn".into(),
        };
        running
            .fleet
            .handle
            .report(idle, session, drained, clock::now())
            .await
            .unwrap();
        assert!(matches!(
            idle_signals.recv().await,
            Some(SessionSignal::Terminate { .. })
        ));
        assert!(matches!(
            busier_signals.recv().await,
            Some(SessionSignal::Welcome { .. })
        ));
        assert!(
            busier_signals.try_recv().is_err(),
            "the busier node is left alone"
        );
        // The webhook is stored with the terminate, in the same batch.
        let stored = running.fleet.store.wait_for(|state| !state.outbox.is_empty());
        let payload: serde_json::Value = serde_json::from_slice(&stored.outbox[0].body).unwrap();
        assert_eq!(payload["reason"], "LOW_FLEET_CPU_LOAD");
        assert_eq!(payload["terminated_node_id"], idle.to_string());
        assert_eq!(
            payload["terminated_node_cpu_usage"], 0.05,
            "the CPU the scaler chose it by"
        );
        let record = stored.nodes.iter().find(|node| node.id == idle).unwrap();
        assert!(record.termination.is_some(), "{record:?}");
        running.shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn forecast_only_decides_and_says_so_but_queues_nothing() {
        let mut running = run(ScalingMode::ForecastOnly);
        let _node = node(&running.fleet, 0.95).await;
        let decided = next_scale_decision(&mut running.events).await;
        assert_eq!(decided.decision, Some(ScaleDecision::ScaleUp));
        assert!(
            decided.reason.contains("forecast_only: not acted on"),
            "{}",
            decided.reason
        );
        // Let a few more checks run: the decision repeats, nothing is ever queued.
        let (_, mut updates) = running.predictions.subscribe();
        for _ in 0..3 {
            let prediction = updates.recv().await.unwrap();
            assert!(!prediction.acted);
        }
        // Each check writes its history point in the same batch as any webhook.
        let state = running.fleet.store.wait_for(|state| state.history.len() >= 4);
        assert!(state.outbox.is_empty(), "{:?}", state.outbox);
        assert!(running.fleet.store.load().unwrap().outbox.is_empty());
        running.shutdown.cancel();
    }
}
