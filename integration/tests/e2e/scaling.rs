//! Predictive scaling across real processes: agents reporting a constant CPU, the
//! orchestrator's scaling loop on a fast interval, the real webhook receiver, and
//! the real grpcurl on `PredictionService`.

use std::time::Duration;

use secbeat::pb::{self, FleetEventType, NodeState};
use secbeat_integration::{
    Orchestrator, STARTUP, WebhookReceiver, eventually, next_event_matching, run_grpcurl, wait_for_state,
    webhook_config,
};

const DELIVERY: Duration = Duration::from_secs(20);

/// Scaling checks every 0.1 s. The seed's window and horizon stay (60 and 10
/// minutes), so within a test no prediction reaches its target: confidence comes
/// from the in-window estimate, which starts at one half.
fn scaling_config(url: &str, mode: &str) -> String {
    format!(
        "{}scaling_check_interval_seconds = 0.1\nscaling_mode = \"{mode}\"\nmin_prediction_confidence = 0.3\n",
        webhook_config(url)
    )
}

fn any_addr() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_fleet_gets_one_predicted_high_fleet_cpu_load_webhook() {
    let receiver = WebhookReceiver::start(any_addr(), &[]).await.unwrap();
    let orchestrator = Orchestrator::start(&scaling_config(&receiver.url(), "forecast_and_scale"))
        .await
        .unwrap();
    // A calm start: history builds up to the trusted tier (20 points) below the
    // threshold, so the scale-up that follows is decided on the prediction.
    let (_calm, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.6"])
        .await
        .unwrap();
    let addr = orchestrator.grpc_addr.to_string();
    eventually(STARTUP, "20 history points", || async {
        let (_, out, _) = run_grpcurl(&["-plaintext", &addr, "secbeat.v1.PredictionService/GetPrediction"])
            .await
            .ok()?;
        let value: serde_json::Value = serde_json::from_str(&out).ok()?;
        (value["prediction"]["dataPoints"].as_u64()? >= 20).then_some(())
    })
    .await;
    let mut hot = Vec::new();
    for _ in 0..2 {
        let (agent, _) = orchestrator
            .connected_agent(&["--cpu-source", "const:0.96"])
            .await
            .unwrap();
        hot.push(agent);
    }

    let events = receiver
        .wait_for_events("PREDICTED_HIGH_FLEET_CPU_LOAD", 1, DELIVERY)
        .await;
    let payload = &events[0]["payload"];
    assert_eq!(events[0]["verified"], true);
    let info = &payload["prediction_info"];
    let predicted = info["predicted_cpu_usage"].as_f64().unwrap();
    assert!(predicted > 0.8 && predicted <= 0.96, "{payload}");
    assert_eq!(info["prediction_horizon_minutes"], 10.0);
    let confidence = info["confidence"].as_f64().unwrap();
    assert!((0.3..=1.0).contains(&confidence), "{confidence}");
    assert_eq!(payload["fleet_metrics"]["active_nodes"], 3);
    assert!((payload["fleet_metrics"]["avg_cpu_usage"].as_f64().unwrap() - 0.84).abs() < 1e-9);
    assert!(
        receiver.events_with_reason("HIGH_FLEET_CPU_LOAD").is_empty(),
        "never on current CPU alone"
    );

    let logs = &orchestrator.process.logs;
    logs.wait_for("CPU usage predicted for +10 minutes: 0.84 (confidence:", STARTUP)
        .await
        .unwrap();
    logs.wait_for("Triggering predictive scale-up action", STARTUP)
        .await
        .unwrap();
    logs.wait_for("Predictive scale-up webhook called successfully", STARTUP)
        .await
        .unwrap();
    assert!(
        orchestrator
            .metric("orchestrator_predictive_scale_ups_total")
            .await
            >= 1.0
    );
    assert!(
        orchestrator
            .metric("orchestrator_ml_predictions_made_total")
            .await
            >= 10.0
    );
    // The five-minute cooldown holds any second scale-up.
    orchestrator.wait_outbox_drained(DELIVERY).await;
    assert_eq!(
        receiver.events_with_reason("PREDICTED_HIGH_FLEET_CPU_LOAD").len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forecast_only_predicts_and_decides_but_sends_nothing() {
    let receiver = WebhookReceiver::start(any_addr(), &[]).await.unwrap();
    let orchestrator = Orchestrator::start(&scaling_config(&receiver.url(), "forecast_only"))
        .await
        .unwrap();
    let mut events = orchestrator.watch_events().await.unwrap();
    let _agent = orchestrator
        .connected_agent(&["--cpu-source", "const:0.95"])
        .await
        .unwrap();

    let decided = next_event_matching(&mut events, DELIVERY, |event| {
        event.r#type() == FleetEventType::ScaleDecided
    })
    .await
    .unwrap();
    assert_eq!(decided.decision(), pb::ScaleDecision::ScaleUp);
    assert!(
        decided.reason.contains("HIGH_FLEET_CPU_LOAD")
            && decided.reason.contains("forecast_only: not acted on"),
        "{}",
        decided.reason
    );
    assert!(decided.node_id.is_empty(), "a scale decision concerns no node");
    // The decision was made and counted, and nothing was queued: the outbox is
    // written in the same check as the decision, so it would show by now.
    // Fewer than 20 points at first: the decision is on current CPU.
    let decided = orchestrator
        .metric("orchestrator_scaling_decisions_total{decision=\"scale_up_current\"}")
        .await;
    assert!(decided >= 1.0, "{decided}");
    orchestrator
        .assert_metric("orchestrator_predictive_scale_ups_total", 0.0)
        .await;
    orchestrator
        .assert_metric("orchestrator_webhook_outbox_depth", 0.0)
        .await;
    assert!(receiver.events().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_fleet_scales_down_its_least_loaded_node_through_terminate() {
    let receiver = WebhookReceiver::start(any_addr(), &[]).await.unwrap();
    let config = format!(
        "{}scale_down_consecutive_checks = 3\n",
        scaling_config(&receiver.url(), "forecast_and_scale")
    );
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let (mut idle, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.05"])
        .await
        .unwrap();
    let (busier, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.2"])
        .await
        .unwrap();

    let events = receiver.wait_for_events("LOW_FLEET_CPU_LOAD", 1, DELIVERY).await;
    assert_eq!(
        events[0]["payload"]["terminated_node_id"],
        idle.id(),
        "busier is {}: {events:#?}",
        busier.id()
    );
    assert_eq!(events[0]["payload"]["terminated_node_ip"], "127.0.0.1");
    let status = idle.process.wait_exit(STARTUP).await.unwrap();
    assert!(
        status.success(),
        "the least loaded agent exits 0 after Terminate: {status:?}"
    );
    let mut fleet = orchestrator.fleet().await.unwrap();
    wait_for_state(&mut fleet, &idle.id(), NodeState::Terminated, STARTUP).await;
    // min_nodes = 1 and the cooldown keep the other one.
    wait_for_state(&mut fleet, &busier.id(), NodeState::Connected, STARTUP).await;
    let failures = receiver.events_with_reason("UNEXPECTED_NODE_FAILURE");
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_reads_and_watches_predictions_as_json() {
    let receiver = WebhookReceiver::start(any_addr(), &[]).await.unwrap();
    let orchestrator = Orchestrator::start(&scaling_config(&receiver.url(), "forecast_only"))
        .await
        .unwrap();
    let _agent = orchestrator
        .connected_agent(&["--cpu-source", "const:0.42"])
        .await
        .unwrap();
    let addr = orchestrator.grpc_addr.to_string();

    let latest = eventually(STARTUP, "a prediction with a predicted value", || async {
        let (ok, out, _) = run_grpcurl(&["-plaintext", &addr, "secbeat.v1.PredictionService/GetPrediction"])
            .await
            .ok()?;
        let value: serde_json::Value = serde_json::from_str(&out).ok()?;
        let prediction = value.get("prediction")?.clone();
        (ok && prediction.get("predictedCpuUsage").is_some()).then_some(prediction)
    })
    .await;
    assert_eq!(latest["currentCpuUsage"], 0.42);
    assert_eq!(latest["configuredModel"], "auto");
    assert_eq!(latest["horizon"], "600s");

    // A stream: the latest first, then one per check; grpcurl ends it at -max-time.
    let (_, out, stderr) = run_grpcurl(&[
        "-plaintext",
        "-max-time",
        "1",
        &addr,
        "secbeat.v1.PredictionService/WatchPredictions",
    ])
    .await
    .unwrap();
    assert!(stderr.contains("DeadlineExceeded"), "{stderr}");
    let predictions: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&out)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(predictions.len() >= 3, "{out}");
    let times: Vec<&str> = predictions
        .iter()
        .map(|p| p["timestamp"].as_str().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "one per check, in order: {times:?}"
    );
    for prediction in &predictions {
        assert_eq!(prediction["currentCpuUsage"], 0.42);
        assert_eq!(prediction["predictedCpuUsage"], 0.42, "flat data predicts flat");
    }
    let (ok, listed, _) = run_grpcurl(&["-plaintext", &addr, "list"]).await.unwrap();
    assert!(ok && listed.contains("secbeat.v1.PredictionService"), "{listed}");
    let mut fleet = orchestrator.fleet().await.unwrap();
    let stats = fleet
        .get_fleet_stats(pb::GetFleetStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.active_nodes, 1);
}
