//! Descriptor exhaustion handled like a production server: with more connections
//! than its open-files limit allows, the orchestrator closes what it cannot hold
//! (keeping descriptors for its HTTP side) instead of spinning in its accept loop,
//! and keeps serving the agents it already has. And the fleet
//! simulator, which the fleet-scale measurements (BENCHMARKS.md) rest on, measures
//! what it says, against the orchestrator and against the bare reference server.

use std::time::{Duration, Instant};

use secbeat::pb::NodeState;
use secbeat_integration::{FAST_CONFIG, Orchestrator, STARTUP, eventually, fleetsim, wait_for_state};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_than_descriptors_neither_spin_nor_drop_existing_agents() {
    // Scaling checks every 0.25 s: their log lines are the orchestrator's own clock.
    // The flood comes from one address: the per-source cap is lifted so that it is
    // the descriptors that run out.
    let config =
        format!("{FAST_CONFIG}scaling_check_interval_seconds = 0.25\nmax_connections_per_source = 1000\n");
    let orchestrator = Orchestrator::start_with_fd_limit(&config, 96).await.unwrap();
    orchestrator
        .process
        .logs
        .wait_for(
            "the open-files limit is below what max_nodes agents need",
            STARTUP,
        )
        .await
        .unwrap();
    let (agent, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();

    // Far more raw TCP connections than descriptors: the kernel completes them,
    // the orchestrator cannot accept them all.
    let addr = orchestrator.grpc_addr;
    let flood: Vec<std::net::TcpStream> = (0..200)
        .filter_map(|_| std::net::TcpStream::connect(addr).ok())
        .collect();
    assert!(flood.len() > 96, "only {} connections", flood.len());
    // What it cannot hold is closed at accept, so descriptors stay free for HTTP:
    // health, readiness and metrics answer through the flood.
    eventually(STARTUP, "connections refused for lack of descriptors", || async {
        let refused = orchestrator
            .metric("orchestrator_connections_refused_total{reason=\"descriptors\"}")
            .await;
        (refused >= 1.0).then_some(())
    })
    .await;
    for path in ["/healthz", "/readyz"] {
        let response = secbeat_integration::http_request(orchestrator.http_addr, path, &[])
            .await
            .unwrap();
        assert_eq!(response.status, 200, "{path} during the flood");
    }

    // While exhausted: no spinning. Measured over eight of the orchestrator's own
    // scaling checks (about 2 s), so the window is its timer, not a sleep here.
    const CHECK: &str = "CPU data point recorded";
    let logs = &orchestrator.process.logs;
    let start = logs.count(CHECK) + 1;
    logs.wait_for_nth(CHECK, start, STARTUP).await.unwrap();
    let (cpu_before, wall_before) = (orchestrator.process.cpu_time(), Instant::now());
    logs.wait_for_nth(CHECK, start + 8, STARTUP).await.unwrap();
    let used = orchestrator.process.cpu_time().saturating_sub(cpu_before);
    let share = used.as_secs_f64() / wall_before.elapsed().as_secs_f64();
    eprintln!(
        "orchestrator CPU while out of descriptors: {:.1}% of a core",
        share * 100.0
    );
    assert!(
        share < 0.5,
        "the orchestrator used {:.0}% of a core while out of descriptors",
        share * 100.0
    );

    // The existing agent was served throughout.
    let node = wait_for_state(&mut fleet, &agent.id(), NodeState::Connected, STARTUP).await;
    assert_ne!(node.session_id, 0);

    // Descriptors back: new agents get in.
    drop(flood);
    let late = orchestrator.agent(&[]).unwrap();
    eventually(STARTUP, "a new agent after the flood", || {
        let mut fleet = fleet.clone();
        let id = late.id();
        async move {
            let node = secbeat_integration::node(&mut fleet, &id).await?;
            (node.state() == NodeState::Connected).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_simulator_reports_detection_and_no_false_failures() {
    let config = format!("{FAST_CONFIG}mass_failure_fraction = 1.0\n");
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let pid = orchestrator.process.pid().to_string();
    let http = orchestrator.http_addr.to_string();
    let report = fleetsim(&[
        "--orchestrator",
        &orchestrator.url(),
        "--agents",
        "60",
        "--duration",
        "6",
        "--streams-per-connection",
        "4",
        "--kill",
        "3",
        "--stall",
        "3",
        "--orchestrator-pid",
        &pid,
        "--orchestrator-http",
        &http,
    ])
    .await;
    assert_eq!(report["connected"], 60, "{report}");
    assert_eq!(report["connections"], 15);
    assert_eq!(report["false_failures"], 0, "{report}");
    assert_eq!(report["crash_detection"]["detected"], 3, "{report}");
    assert_eq!(report["hang_detection"]["detected"], 3, "{report}");
    assert!(
        report["hang_detection"]["p50_s"].as_f64().unwrap() >= 1.0,
        "a hang costs the timeout"
    );
    // A crash ends the agent's stream without a goodbye on a connection that
    // others still use; the orchestrator hears of it at once (a session reports
    // its end when it is dropped), not through silence, which takes the 1 s
    // timeout.
    assert!(
        report["crash_detection"]["p50_s"].as_f64().unwrap() < 1.0,
        "a reset stream is a crash known at once: {report}"
    );
    assert!(
        report["messages_per_second"].as_f64().unwrap() > 100.0,
        "{report}"
    );
    assert!(report["orchestrator_rss_bytes"].as_u64().unwrap() > 0);
    // Read from the orchestrator's /metrics over the steady window.
    let handling = &report["heartbeat_handling"];
    assert!(handling["heartbeats"].as_f64().unwrap() > 0.0, "{report}");
    assert!(handling["p99_s_at_most"].as_f64().unwrap() <= 1.0, "{report}");
    // 60 nodes, checks every 0.2 s: a scan would look at 300 a second; the
    // schedule looks at each about once per 1 s timeout.
    let checked = handling["detector_nodes_checked_per_second"].as_f64().unwrap();
    assert!(checked > 0.0 && checked < 150.0, "{report}");
    assert!(
        report["fleetsim_cpu_share_of_one_core"].as_f64().unwrap() > 0.0,
        "{report}"
    );

    // Every join is in the log: written line by line, or, beyond the routine
    // lines' budget of a second (60 agents join at once), counted in a summary.
    let joins = eventually(STARTUP, "every join written or counted", || {
        let lines = orchestrator.process.logs.lines();
        async move {
            let summaries = lines.iter().filter(|line| line.contains("routine node events"));
            let counted: usize = summaries
                .filter_map(|line| line.split("node joined: ").nth(1))
                .filter_map(|rest| {
                    rest.split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse::<usize>()
                        .ok()
                })
                .sum();
            let written: Vec<&String> = lines
                .iter()
                .filter(|line| line.contains("node joined") && !line.contains("routine node events"))
                .collect();
            (written.len() + counted == 60)
                .then_some(written.iter().map(|line| logged_at(line)).collect::<Vec<_>>())
        }
    })
    .await;
    // And the budget held: the 51st join line written one by one came at least a
    // second after the first (nothing else is routine before the faults, halfway).
    if let (Some(first), Some(fifty_first)) = (joins.first(), joins.get(50)) {
        let apart = (*fifty_first - *first).to_std().unwrap_or_default();
        assert!(
            apart >= Duration::from_millis(990),
            "51 join lines within {apart:?}: the budget is 50 a second"
        );
    }
}

/// When a log line was written (its RFC 3339 timestamp, the line's first word).
fn logged_at(line: &str) -> chrono::DateTime<chrono::Utc> {
    let stamp = line.split_whitespace().next().unwrap_or_default();
    chrono::DateTime::parse_from_rfc3339(stamp)
        .unwrap_or_else(|error| panic!("{stamp:?} in {line:?}: {error}"))
        .to_utc()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_simulator_times_the_reconnect_storm_after_an_orchestrator_restart() {
    const AGENTS: u64 = 40;
    let mut first = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let mut sim = tokio::process::Command::new(secbeat_integration::binary("secbeat-fleetsim"))
        .args(["--orchestrator", &first.url(), "--duration", "12", "--json"])
        .args(["--agents", &AGENTS.to_string(), "--streams-per-connection", "4"])
        // Quick reconnects, as the tests give real agents (FAST_RECONNECT): with the
        // agent's defaults, an agent that failed four times while a loaded machine
        // restarted the orchestrator would wait up to 12 s more, beyond the bound.
        .args(["--reconnect-initial", "0.05", "--reconnect-max", "0.5"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_streams(&first, AGENTS).await;
    // Every agent has had its Welcome (it heartbeats only after one): the kill
    // then cuts AGENTS sessions, none of them half-opened.
    wait_for_heartbeats(&first, AGENTS).await;

    first.process.kill(STARTUP).await.unwrap();
    let second = first.restart().await.unwrap();
    // The restarted orchestrator has them all live again, while the run goes on.
    wait_for_streams(&second, AGENTS).await;

    let output = tokio::time::timeout(Duration::from_secs(30), async {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let (mut out, mut err) = (sim.stdout.take().unwrap(), sim.stderr.take().unwrap());
        let (_, _, status) = tokio::join!(
            tokio::io::AsyncReadExt::read_to_end(&mut out, &mut stdout),
            tokio::io::AsyncReadExt::read_to_end(&mut err, &mut stderr),
            sim.wait()
        );
        (status.unwrap(), stdout, stderr)
    })
    .await
    .expect("fleetsim ends after its duration");
    let (status, stdout, stderr) = output;
    assert!(status.success(), "{}", String::from_utf8_lossy(&stderr));
    let report: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let storm = &report["reconnect"];
    assert_eq!(storm["lost"], AGENTS, "{report}");
    assert_eq!(storm["back"], AGENTS, "every agent came back: {report}");
    let all_back = storm["all_back_s"].as_f64().expect("timed");
    let slowest = storm["per_agent_downtime"]["max_s"].as_f64().unwrap();
    assert!(all_back >= slowest, "{report}");
    assert!(storm["fleetsim_cpu_s"].as_f64().unwrap() >= 0.0, "{report}");
    assert_eq!(report["false_failures"], 0, "{report}");
}

/// Waits until `count` nodes have sent a heartbeat on their current session.
async fn wait_for_heartbeats(orchestrator: &Orchestrator, count: u64) {
    let fleet = orchestrator.fleet().await.unwrap();
    eventually(STARTUP, &format!("{count} nodes heartbeating"), || {
        let mut fleet = fleet.clone();
        async move {
            let nodes = fleet
                .list_nodes(secbeat::pb::ListNodesRequest::default())
                .await
                .ok()?
                .into_inner()
                .nodes;
            let beating = nodes
                .iter()
                .filter(|node| {
                    let at = |t: Option<prost_types::Timestamp>| t.map(|t| (t.seconds, t.nanos));
                    at(node.last_heartbeat) > at(node.connected_since)
                })
                .count();
            (beating as u64 == count).then_some(())
        }
    })
    .await;
}

/// Waits until `orchestrator` has `count` agent streams open.
async fn wait_for_streams(orchestrator: &Orchestrator, count: u64) {
    eventually(STARTUP, &format!("{count} agent streams"), || async move {
        let streams = orchestrator.metric("orchestrator_agent_streams").await;
        (streams == count as f64).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_server_serves_the_simulated_fleet_it_is_compared_on() {
    let addr = secbeat_integration::free_addr();
    let mut reference = tokio::process::Command::new(secbeat_integration::binary("secbeat-reference"))
        .args(["--listen", &addr.to_string()])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually(STARTUP, "the reference to listen", || async move {
        tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
    })
    .await;
    let pid = reference.id().unwrap().to_string();
    let url = format!("http://{addr}");
    let report = fleetsim(&[
        "--orchestrator",
        &url,
        "--agents",
        "20",
        "--duration",
        "4",
        "--orchestrator-pid",
        &pid,
    ])
    .await;
    assert_eq!(report["connected"], 20, "{report}");
    // One heartbeat carrying its sample per agent-second, as its Welcome asks.
    let rate = report["messages_per_second"].as_f64().unwrap();
    assert!(rate > 10.0 && rate < 30.0, "{report}");
    assert!(report["orchestrator_rss_bytes"].as_u64().unwrap() > 0, "{report}");
    reference.kill().await.unwrap();
}
