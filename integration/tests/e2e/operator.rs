//! The operator's HTTP side: the JSON API and the metrics scrape, checked with the
//! real promtool.

use std::{process::Stdio, time::Duration};

use secbeat_integration::{
    FAST_CONFIG, Orchestrator, STARTUP, Sig, eventually, free_addr, http_request, metric_value, promtool,
};
use tokio::io::AsyncWriteExt;

/// `promtool check metrics` on a scrape; fails the test on any complaint.
async fn promtool_check(scrape: &str) {
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
        .write_all(scrape.as_bytes())
        .await
        .unwrap();
    let output = check.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn with_fast_scaling() -> String {
    format!("{FAST_CONFIG}scaling_check_interval_seconds = 0.1\nscaling_mode = \"forecast_only\"\n")
}

/// The console's chart after a crash: the restarted orchestrator's first
/// answer already holds the checks of the run before, remade from the CPU
/// history in its state store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_keeps_the_checks_of_the_run_before_a_restart() {
    let mut orchestrator = Orchestrator::start(&with_fast_scaling()).await.unwrap();
    let (_agent, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.4"])
        .await
        .unwrap();
    let addr = orchestrator.http_addr;
    let points = |chart: &serde_json::Value| chart["predictions"].as_array().cloned().unwrap_or_default();
    let measured = |point: &serde_json::Value| point["current_cpu_usage"].as_f64() == Some(0.4);
    let before = eventually(STARTUP, "twenty checks with the node's CPU", || async {
        let chart = http_request(addr, "/api/v1/predictions", &[]).await.ok()?.json();
        let points = points(&chart);
        (points.iter().filter(|point| measured(point)).count() >= 20).then_some(points)
    })
    .await;
    assert!(before.iter().all(|point| point["restored"] == false));
    assert!(before.iter().all(|point| point["decision"].is_string()));

    orchestrator.process.signal(Sig::SIGKILL);
    orchestrator
        .process
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap();
    let restarted = orchestrator.restart().await.unwrap();
    let chart = http_request(restarted.http_addr, "/api/v1/predictions", &[])
        .await
        .unwrap()
        .json();
    let after = points(&chart);
    let restored: Vec<_> = after
        .iter()
        .take_while(|point| point["restored"] == true)
        .collect();
    // The checks whose history was written before the SIGKILL: a loaded
    // machine's store writer may still have held the last few.
    assert!(
        restored.iter().filter(|point| measured(point)).count() >= 10,
        "{} restored of {} measured before",
        restored.len(),
        before.len()
    );
    assert!(restored.iter().all(|point| point["decision"].is_null()));
    assert!(
        restored.iter().any(|point| point["predicted_cpu_usage"] == 0.4),
        "the replay predicts flat data flat, as the checks did"
    );
    // This run's checks, if any came yet, follow them.
    assert!(
        after[restored.len()..]
            .iter()
            .all(|point| point["restored"] == false && point["decision"].is_string())
    );
    assert!(
        chart["accuracy"].is_object(),
        "the replay's scores stand in until a check"
    );
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

    promtool_check(&text.body).await;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_go_to_stderr_and_the_log_file_for_the_seeds_grep_recipes() {
    let dir = tempfile::tempdir().unwrap();
    let log_file = dir.path().join("logs/orchestrator.log");
    let env = vec![
        ("SECBEAT_LOG_FORMAT".to_owned(), "json".to_owned()),
        ("SECBEAT_LOG_FILE".to_owned(), log_file.display().to_string()),
    ];
    let orchestrator = Orchestrator::start_with_env(FAST_CONFIG, &env).await.unwrap();
    let (victim, _) = orchestrator.connected_agent(&[]).await.unwrap();
    victim.process.signal(Sig::SIGKILL);

    // tail -f logs/orchestrator.log | grep -E "(UNEXPECTED|self-healing|CRITICAL)"
    let line = eventually(STARTUP, "the CRITICAL line in the log file", || async {
        let text = std::fs::read_to_string(&log_file).ok()?;
        text.lines()
            .find(|line| line.contains("CRITICAL UNEXPECTED NODE FAILURE"))
            .map(str::to_owned)
    })
    .await;
    let event: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(event["level"], "ERROR");
    assert_eq!(event["node.id"], victim.id());
    assert!(event["timestamp"].is_string());
    let stderr = orchestrator
        .process
        .logs
        .wait_for("CRITICAL UNEXPECTED", STARTUP)
        .await
        .unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(&stderr).is_ok(),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_its_own_metrics_when_asked() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let addr = free_addr();
    let listen = addr.to_string();
    let (_agent, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.25", "--metrics-listen", &listen])
        .await
        .unwrap();
    let scrape = eventually(STARTUP, "agent metrics with a few heartbeats", || async {
        let response = http_request(addr, "/metrics", &[]).await.ok()?;
        let sent = metric_value(&response.body, "secbeat_agent_heartbeats_sent_total")?;
        (sent >= 3.0).then_some(response.body)
    })
    .await;
    assert_eq!(metric_value(&scrape, "secbeat_agent_connected"), Some(1.0));
    assert_eq!(
        metric_value(&scrape, "secbeat_agent_sessions_established_total"),
        Some(1.0)
    );
    assert_eq!(metric_value(&scrape, "secbeat_agent_cpu_usage"), Some(0.25));
    promtool_check(&scrape).await;
}
