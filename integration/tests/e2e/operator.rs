//! The operator's HTTP side: the JSON API and the metrics scrape, checked with the
//! real promtool.

use std::process::Stdio;

use secbeat_integration::{FAST_CONFIG, Orchestrator, STARTUP, eventually, http_request, promtool};
use tokio::io::AsyncWriteExt;

fn with_fast_scaling() -> String {
    format!("{FAST_CONFIG}scaling_check_interval_seconds = 0.1\nscaling_mode = \"forecast_only\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_api_serves_stats_nodes_and_clear_errors() {
    let orchestrator = Orchestrator::start(&with_fast_scaling()).await.unwrap();
    let (low, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.4", "--label", "zone=a"])
        .await
        .unwrap();
    let (_high, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.6"])
        .await
        .unwrap();
    let addr = orchestrator.http_addr;

    let stats = eventually(STARTUP, "stats with a prediction from both nodes", || async {
        let response = http_request(addr, "/api/v1/fleet/stats", &[]).await.ok()?;
        let stats = response.json();
        let both = stats["prediction"]["current_cpu_usage"].as_f64() == Some(0.5);
        (response.status == 200 && both && stats["cpu_history_points"].as_u64()? >= 10).then_some(stats)
    })
    .await;
    assert_eq!(stats["active_nodes"], 2);
    assert_eq!(stats["avg_cpu_usage"], 0.5);
    assert_eq!(stats["nodes_by_state"]["connected"], 2);
    assert_eq!(stats["unexpected_failures_total"], 0);
    let prediction = &stats["prediction"];
    assert_eq!(prediction["predicted_cpu_usage"], 0.5, "flat data predicts flat");
    assert_eq!(prediction["prediction_horizon_minutes"], 10.0);
    assert_eq!(prediction["configured_model"], "auto");
    assert!(prediction["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(stats["accuracy"]["baseline"].is_object());

    let response = http_request(addr, "/api/v1/nodes", &[]).await.unwrap();
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let nodes = response.json()["nodes"].as_array().unwrap().clone();
    assert_eq!(nodes.len(), 2);
    assert!(
        nodes
            .iter()
            .all(|n| n["state"] == "connected" && n["ip"] == "127.0.0.1")
    );

    let response = http_request(addr, &format!("/api/v1/nodes/{}", low.id()), &[])
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let node = response.json();
    assert_eq!(node["node_id"], low.id());
    assert_eq!(node["last_cpu_usage"], 0.4);
    assert_eq!(node["labels"]["zone"], "a");

    for (path, status, needle) in [
        ("/api/v1/nodes/not-a-uuid", 400, "node_id"),
        (
            "/api/v1/nodes/00000000-0000-4000-8000-000000000000",
            404,
            "unknown",
        ),
        ("/api/v1/nothing-here", 404, "no such endpoint"),
    ] {
        let response = http_request(addr, path, &[]).await.unwrap();
        assert_eq!(response.status, status, "{path}: {}", response.body);
        let error = response.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains(needle), "{path}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_scrape_passes_promtool_and_speaks_openmetrics_on_request() {
    let orchestrator = Orchestrator::start(&with_fast_scaling()).await.unwrap();
    let (_agent, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.3"])
        .await
        .unwrap();
    orchestrator
        .process
        .logs
        .wait_for("CPU usage predicted for +10 minutes", STARTUP)
        .await
        .unwrap();
    let addr = orchestrator.http_addr;

    let text = http_request(addr, "/metrics", &[]).await.unwrap();
    assert_eq!(text.status, 200);
    assert!(
        text.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    for name in [
        "orchestrator_ml_predictions_made_total",
        "orchestrator_ml_prediction_accuracy_ratio",
        "orchestrator_predictive_scale_ups_total",
        "orchestrator_unexpected_node_failures_total",
        "orchestrator_self_healing_webhooks_sent_total",
        "orchestrator_nodes_gracefully_terminated_total",
        "orchestrator_self_healing_webhook_errors_total",
        "orchestrator_webhook_outbox_depth",
        "orchestrator_active_nodes",
    ] {
        assert!(
            text.body.lines().any(|line| line.starts_with(name)),
            "{name} missing"
        );
    }

    let mut check = tokio::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.body.as_bytes())
        .await
        .unwrap();
    let output = check.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let openmetrics = http_request(
        addr,
        "/metrics",
        &[("Accept", "application/openmetrics-text; version=1.0.0")],
    )
    .await
    .unwrap();
    assert!(
        openmetrics
            .header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(openmetrics.body.ends_with("# EOF\n"));
}
