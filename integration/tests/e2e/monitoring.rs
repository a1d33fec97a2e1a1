//! The monitoring files are true to the running orchestrator: the alert rules pass
//! promtool's checks and their own unit tests, and a real Prometheus server
//! scraping a live orchestrator (agents, failures, held heals, webhooks failing)
//! loads the rules and answers every Grafana dashboard query and every metric an
//! alert reads with data.

use std::{collections::BTreeSet, net::SocketAddr, process::Stdio, time::Duration};

use secbeat_integration::{
    Orchestrator, STARTUP, Sig, eventually, free_addr, http_request, prometheus, promtool, repository_root,
};

/// promtool with `args` in deploy/prometheus; fails the test with its output.
async fn promtool_in_deploy(args: &[&str]) {
    let output = tokio::process::Command::new(promtool())
        .args(args)
        .current_dir(repository_root().join("deploy/prometheus"))
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    promtool_in_deploy(&["check", "rules", "alerts.yml"]).await;
    promtool_in_deploy(&["test", "rules", "alerts_test.yml"]).await;
    promtool_in_deploy(&["check", "config", "prometheus.yml"]).await;
}

/// Every alert's `expr`, from alerts.yml (one per rule, on one line).
fn alert_expressions() -> Vec<String> {
    let rules = std::fs::read_to_string(repository_root().join("deploy/prometheus/alerts.yml")).unwrap();
    rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("expr: "))
        .map(str::to_owned)
        .collect()
}

/// Every alert has a summary, a description naming its README runbook section
/// (which exists), and a severity.
#[test]
fn every_alert_names_a_runbook_section_that_exists() {
    let rules = std::fs::read_to_string(repository_root().join("deploy/prometheus/alerts.yml")).unwrap();
    let readme = std::fs::read_to_string(repository_root().join("README.md")).unwrap();
    let alerts = rules.matches("- alert: ").count();
    assert!(alerts >= 12, "{alerts} alerts");
    assert_eq!(rules.matches("summary: ").count(), alerts);
    assert_eq!(rules.matches("severity: ").count(), alerts);
    let anchors: BTreeSet<&str> = rules
        .split("Runbook: README.md#")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert_eq!(
        rules.matches("Runbook: README.md#").count(),
        alerts,
        "every description names one"
    );
    // GitHub's anchor of "### Runbook: self-healing held" is runbook-self-healing-held.
    let headings: BTreeSet<String> = readme
        .lines()
        .filter_map(|line| line.strip_prefix("### "))
        .map(|heading| {
            heading
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    for anchor in anchors {
        assert!(headings.contains(anchor), "README has no section for #{anchor}");
    }
}

/// The vector selectors an expression reads (metric name and matchers).
fn selectors(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = expr[i..].starts_with("orchestrator_") || expr[i..].starts_with("up{");
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if !(starts && boundary) {
            i += 1;
            continue;
        }
        let mut end = i;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if end < bytes.len() && bytes[end] == b'{' {
            end += expr[end..].find('}').unwrap() + 1;
        }
        found.push(expr[i..end].to_owned());
        i = end;
    }
    found
}

#[test]
fn selectors_are_found_in_expressions() {
    assert_eq!(
        selectors(r#"sum by (cause) (increase(orchestrator_self_healing_held_total{cause=~"a|b"}[5m])) > 0"#),
        [r#"orchestrator_self_healing_held_total{cause=~"a|b"}"#]
    );
    assert_eq!(
        selectors("orchestrator_a > orchestrator_b and up{job=\"x\"} == 0"),
        ["orchestrator_a", "orchestrator_b", "up{job=\"x\"}"]
    );
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus instant query: its status and result vector.
async fn query(server: SocketAddr, expr: &str) -> (String, Vec<serde_json::Value>) {
    let Ok(response) = http_request(server, &format!("/api/v1/query?query={}", encode(expr)), &[]).await
    else {
        return ("not listening yet".to_owned(), Vec::new());
    };
    let body: serde_json::Value = serde_json::from_str(&response.body).unwrap_or_default();
    let status = body["status"].as_str().unwrap_or("no answer").to_owned();
    let error = body["error"].as_str().unwrap_or_default();
    let result = body["data"]["result"].as_array().cloned().unwrap_or_default();
    (format!("{status}{error}"), result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_answers_every_dashboard_query_and_reads_every_alerts_metrics() {
    // A fleet with something in every family: predictions (scaling checks every
    // 0.1 s), a healed failure whose webhook fails (nothing listens at the URL),
    // a failure held by the hourly budget, and a node in maintenance.
    let dead = free_addr();
    let config = format!(
        "{}scaling_check_interval_seconds = 0.1\nscaling_mode = \"forecast_only\"\nprovisioning_webhook_url = \"http://{dead}/provision\"\nwebhook_retry_initial = 0.1\nwebhook_retry_max = 0.2\nmax_self_healing_per_hour = 1\n",
        secbeat_integration::FAST_CONFIG
    );
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let mut agents = Vec::new();
    for _ in 0..3 {
        agents.push(
            orchestrator
                .connected_agent(&["--cpu-source", "const:0.4"])
                .await
                .unwrap()
                .0,
        );
    }
    agents[0].process.signal(Sig::SIGKILL);
    agents[1].process.signal(Sig::SIGKILL);
    eventually(
        STARTUP,
        "a heal held by the budget and a webhook error",
        || async {
            let scrape = orchestrator.metrics().await.ok()?;
            let held = scrape.contains("orchestrator_self_healing_held_total{cause=\"hourly_budget\"}");
            let failing = scrape.contains("orchestrator_webhook_errors_total{");
            let predicted =
                secbeat_integration::metric_value(&scrape, "orchestrator_ml_predictions_made_total")? > 0.0;
            (held && failing && predicted).then_some(())
        },
    )
    .await;

    // The real server, scraping every 0.2 s, with the alert rules loaded.
    let dir = tempfile::tempdir().unwrap();
    let rules = repository_root().join("deploy/prometheus/alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: 200ms\n  evaluation_interval: 200ms\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: secbeat-orchestrator\n    static_configs:\n      - targets: [\"{}\"]\n",
        rules.display(),
        orchestrator.http_addr
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let server = free_addr();
    let mut prometheus = tokio::process::Command::new(prometheus())
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={server}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Ready, scraping, with enough samples for increase() over a window.
    eventually(
        Duration::from_secs(30),
        "prometheus scraping the orchestrator",
        || async {
            let (_, up) = query(server, "count_over_time(up{job=\"secbeat-orchestrator\"}[1m])").await;
            let samples = up.first()?["value"][1].as_str()?.parse::<f64>().ok()?;
            (samples >= 5.0).then_some(())
        },
    )
    .await;

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repository_root().join("deploy/grafana/secbeat-fleet.json")).unwrap(),
    )
    .unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(queries.len() >= 20, "{queries:?}");
    for expr in &queries {
        let (status, result) = query(server, expr).await;
        assert_eq!(status, "success", "{expr}");
        assert!(!result.is_empty(), "the dashboard's {expr} returns no data");
    }

    let alerts = alert_expressions();
    assert!(alerts.len() >= 12);
    for expr in &alerts {
        let (status, _) = query(server, expr).await;
        assert_eq!(status, "success", "{expr}");
        for selector in selectors(expr) {
            let (_, result) = query(server, &selector).await;
            assert!(
                !result.is_empty(),
                "the alert {expr} reads {selector}, which has no data"
            );
        }
    }
    // The server loaded every rule and evaluates them without error.
    let rules = eventually(STARTUP, "the rules evaluated", || async {
        let response = http_request(server, "/api/v1/rules", &[]).await.ok()?;
        let body: serde_json::Value = serde_json::from_str(&response.body).ok()?;
        let rules: Vec<serde_json::Value> = body["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        rules
            .iter()
            .all(|rule| {
                rule["lastEvaluation"]
                    .as_str()
                    .is_some_and(|at| !at.starts_with("0001"))
            })
            .then_some(rules)
    })
    .await;
    assert_eq!(rules.len(), alerts.len());
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    prometheus.kill().await.unwrap();
}
