//! Node lifecycle across real processes: connect, crash, stop, terminate, leave,
//! restart.

use std::time::{Duration, Instant};

use secbeat::pb::{self, FleetEventType, NodeState};
use secbeat_integration::{
    FAST_CONFIG, FAST_DETECTION_BOUND, FAST_RECONNECT, Orchestrator, SCHEDULING_SLACK, STARTUP, Sig,
    assert_detected_within_bound, eventually, fleet_stats, next_event_matching, node, wait_for_state,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_connect_and_report_cpu_fractions() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let real = orchestrator.agent(&[]).unwrap();
    let constant = orchestrator.agent(&["--cpu-source", "const:0.85"]).unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();

    let nodes = eventually(STARTUP, "both nodes connected with a cpu sample", || {
        let mut fleet = fleet.clone();
        async move {
            let nodes = fleet
                .list_nodes(pb::ListNodesRequest::default())
                .await
                .ok()?
                .into_inner()
                .nodes;
            let ready = nodes.len() == 2
                && nodes
                    .iter()
                    .all(|n| n.state() == NodeState::Connected && n.last_cpu_usage.is_some());
            ready.then_some(nodes)
        }
    })
    .await;
    for n in &nodes {
        let cpu = n.last_cpu_usage.unwrap();
        assert!(
            (0.0..=1.0).contains(&cpu),
            "cpu {cpu} of {} is not a fraction",
            n.node_id
        );
        assert_eq!(
            n.ip, "127.0.0.1",
            "the peer address stands in for an unreported ip"
        );
        assert_ne!(n.session_id, 0);
    }
    let ids: Vec<_> = nodes.iter().map(|n| n.node_id.clone()).collect();
    assert!(ids.contains(&real.id()) && ids.contains(&constant.id()));
    let constant_node = node(&mut fleet, &constant.id()).await.unwrap();
    assert_eq!(constant_node.last_cpu_usage, Some(0.85));

    let stats = fleet_stats(&mut fleet).await;
    assert_eq!(stats.active_nodes, 2);
    assert_eq!(stats.nodes_by_state.get("NODE_STATE_CONNECTED"), Some(&2));
    assert!(stats.avg_cpu_usage.is_some_and(|avg| (0.0..=1.0).contains(&avg)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_fails_that_node_only_and_watchers_see_it() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let (mut victim, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let (survivor, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();
    let mut events = orchestrator.watch_events().await.unwrap();

    let killed_at = Instant::now();
    victim.process.signal(Sig::SIGKILL);
    let failed = wait_for_state(&mut fleet, &victim.id(), NodeState::Failed, STARTUP).await;
    let detection = killed_at.elapsed();
    assert_detected_within_bound(detection);
    assert!(
        failed.state_reason.contains("without goodbye"),
        "{}",
        failed.state_reason
    );

    let event = next_event_matching(&mut events, Duration::from_secs(5), |e| {
        e.r#type() == FleetEventType::NodeFailed
    })
    .await
    .unwrap();
    assert_eq!(event.node_id, victim.id());
    assert_eq!(event.ip, "127.0.0.1");
    assert_eq!(event.state(), NodeState::Failed);

    let line = format!(
        "CRITICAL UNEXPECTED NODE FAILURE DETECTED for Node {} at IP 127.0.0.1. Initiating self-healing.",
        victim.id()
    );
    orchestrator
        .process
        .logs
        .wait_for(&line, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(
        node(&mut fleet, &survivor.id()).await.unwrap().state(),
        NodeState::Connected
    );
    let stats = fleet_stats(&mut fleet).await;
    assert_eq!(stats.unexpected_failures_total, 1);
    let _ = victim.process.wait_exit(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_node_makes_the_agent_exit_zero_as_an_expected_exit() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let marker = tempfile::tempdir().unwrap();
    let hook_output = marker.path().join("hook-ran");
    let hook = format!("echo \"$SECBEAT_TERMINATE_REASON\" > {}", hook_output.display());
    let (mut agent, _) = orchestrator
        .connected_agent(&["--on-terminate", &hook])
        .await
        .unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();
    let mut events = orchestrator.watch_events().await.unwrap();

    let request = pb::TerminateNodeRequest {
        node_id: agent.id(),
        reason: "e2e scale-down".into(),
        ..Default::default()
    };
    let response = fleet.terminate_node(request).await.unwrap().into_inner();
    assert!(!response.already_terminating);
    assert_eq!(response.node.unwrap().state(), NodeState::Terminating);

    let status = agent.process.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(0), "the agent exits 0 by itself");
    assert_eq!(
        std::fs::read_to_string(&hook_output).unwrap().trim(),
        "e2e scale-down",
        "the on-terminate hook ran"
    );
    let terminated = wait_for_state(&mut fleet, &agent.id(), NodeState::Terminated, STARTUP).await;
    assert!(
        terminated.state_reason.contains("goodbye"),
        "{}",
        terminated.state_reason
    );
    orchestrator
        .process
        .logs
        .wait_for("Node gracefully terminated as commanded", Duration::from_secs(2))
        .await
        .unwrap();

    // Long enough for any failure to have been declared: none may be.
    let failure = next_event_matching(&mut events, FAST_DETECTION_BOUND * 2, |e| {
        e.r#type() == FleetEventType::NodeFailed || e.r#type() == FleetEventType::NodeSuspected
    })
    .await;
    assert!(
        failure.is_err(),
        "an expected exit was treated as a failure: {failure:?}"
    );
    let stats = fleet_stats(&mut fleet).await;
    assert_eq!(
        (stats.unexpected_failures_total, stats.graceful_terminations_total),
        (0, 1)
    );
    assert_eq!(
        node(&mut fleet, &agent.id()).await.unwrap().state(),
        NodeState::Terminated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_fails_after_the_timeout_and_sigcont_reconnects_as_a_new_session() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let (agent, before) = orchestrator.connected_agent(&FAST_RECONNECT).await.unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();

    let stopped_at = Instant::now();
    agent.process.signal(Sig::SIGSTOP);
    let failed = wait_for_state(&mut fleet, &agent.id(), NodeState::Failed, STARTUP).await;
    let detection = stopped_at.elapsed();
    assert!(
        detection >= Duration::from_secs(1),
        "failed after {detection:?}, before the 1s heartbeat timeout"
    );
    assert_detected_within_bound(detection);
    assert!(
        failed.state_reason.contains("no heartbeat"),
        "{}",
        failed.state_reason
    );

    agent.process.signal(Sig::SIGCONT);
    let after = wait_for_state(&mut fleet, &agent.id(), NodeState::Connected, STARTUP).await;
    assert_ne!(
        after.session_id, before.session_id,
        "a new session, not the stale one"
    );
    assert_ne!(after.session_id, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_an_agent_is_a_goodbye_not_a_failure() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let mut agent = orchestrator.agent(&[]).unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();
    // Signal at the earliest moment a missing goodbye would count as a crash: the
    // orchestrator has registered the session, the agent may not have its Welcome yet.
    let joined = format!("node joined node.id={}", agent.id());
    orchestrator
        .process
        .logs
        .wait_for(&joined, STARTUP)
        .await
        .unwrap();

    agent.process.signal(Sig::SIGTERM);
    assert_eq!(
        agent
            .process
            .wait_exit(Duration::from_secs(5))
            .await
            .unwrap()
            .code(),
        Some(0)
    );
    let left = wait_for_state(&mut fleet, &agent.id(), NodeState::Left, STARTUP).await;
    assert_eq!(left.state_reason, "goodbye: shutdown");
    let stats = fleet_stats(&mut fleet).await;
    assert_eq!(stats.unexpected_failures_total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reconnect_on_their_own_after_orchestrator_restarts() {
    let mut orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let (a, _) = orchestrator.connected_agent(&FAST_RECONNECT).await.unwrap();
    let (b, _) = orchestrator.connected_agent(&FAST_RECONNECT).await.unwrap();

    // A graceful restart (SIGTERM, exit 0), then a crash (SIGKILL).
    for signal in [Sig::SIGTERM, Sig::SIGKILL] {
        orchestrator.process.signal(signal);
        let status = orchestrator
            .process
            .wait_exit(Duration::from_secs(10))
            .await
            .unwrap();
        if signal == Sig::SIGTERM {
            assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
        }
        for agent in [&a, &b] {
            agent
                .process
                .logs
                .wait_for("session lost; reconnecting", Duration::from_secs(5))
                .await
                .unwrap();
        }
        orchestrator = orchestrator.restart().await.unwrap();
        orchestrator.wait_all_connected([&a, &b], STARTUP).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_with_the_same_id_fences_the_first() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let (mut first, original) = orchestrator.connected_agent(&[]).await.unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();

    let second = secbeat_integration::Agent::start(&orchestrator.url(), first.node_id, &[]).unwrap();
    let replaced = eventually(STARTUP, "the newer session to own the node", || {
        let mut fleet = fleet.clone();
        let id = second.id();
        async move {
            node(&mut fleet, &id)
                .await
                .filter(|n| n.session_id > original.session_id)
        }
    })
    .await;
    assert_eq!(replaced.state(), NodeState::Connected);
    // The fenced agent is told ABORTED and stops instead of fighting back.
    let status = first.process.wait_exit(Duration::from_secs(5)).await.unwrap();
    assert_eq!(status.code(), Some(1));
    first
        .process
        .logs
        .wait_for("Aborted", Duration::from_secs(1))
        .await
        .unwrap();
    let current = node(&mut fleet, &second.id()).await.unwrap();
    assert_eq!(
        (current.state(), current.session_id),
        (NodeState::Connected, replaced.session_id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_trace_drives_the_cpu_the_orchestrator_sees() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.csv");
    // NAB format, percent; at 300x each 5-minute step lasts one real second.
    std::fs::write(
        &trace,
        "timestamp,value\n2014-02-14 14:30:00,10.0\n2014-02-14 14:35:00,90.0\n",
    )
    .unwrap();
    let source = format!("trace:{}", trace.display());
    let (agent, _) = orchestrator
        .connected_agent(&["--cpu-source", &source, "--trace-speedup", "300"])
        .await
        .unwrap();
    let fleet = orchestrator.fleet().await.unwrap();
    for expected in [0.9, 0.1, 0.9] {
        eventually(STARTUP, &format!("cpu {expected} from the trace"), || {
            let mut fleet = fleet.clone();
            let id = agent.id();
            async move {
                node(&mut fleet, &id)
                    .await
                    .filter(|n| n.last_cpu_usage == Some(expected))
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_orchestrator_fails_nobody_and_its_agents_notice_the_dead_peer() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let flags = [
        "--keepalive",
        "0.5",
        "--reconnect-initial",
        "0.05",
        "--reconnect-max",
        "0.5",
    ];
    let (agent, before) = orchestrator.connected_agent(&flags).await.unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();
    let mut events = orchestrator.watch_events().await.unwrap();

    // Freeze the orchestrator well past the heartbeat timeout.
    orchestrator.process.signal(Sig::SIGSTOP);
    let lost = agent
        .process
        .logs
        .wait_for("session lost; reconnecting", Duration::from_secs(5))
        .await;
    orchestrator.process.signal(Sig::SIGCONT);
    // A frozen orchestrator cannot have closed the stream: the agent's own
    // unanswered keepalive pings did.
    lost.expect("the agent notices the dead peer while the orchestrator is frozen");

    orchestrator
        .process
        .logs
        .wait_for("dead-node check ran late", Duration::from_secs(5))
        .await
        .unwrap();
    let mut seen = Vec::new();
    next_event_matching(&mut events, STARTUP, |e| {
        seen.push((e.r#type(), e.reason.clone()));
        e.r#type() == FleetEventType::NodeReconnected && e.node_id == agent.id()
    })
    .await
    .unwrap();
    assert!(
        !seen.iter().any(|(_, reason)| reason.contains("no heartbeat")),
        "nodes were judged on the orchestrator's own silence: {seen:?}"
    );
    let after = wait_for_state(&mut fleet, &agent.id(), NodeState::Connected, STARTUP).await;
    assert_ne!(after.session_id, before.session_id);
    let stats = fleet_stats(&mut fleet).await;
    assert_eq!(stats.unexpected_failures_total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_that_overruns_the_grace_period_is_cut_short_and_the_exit_stays_expected() {
    // FAST_CONFIG gives agents a 2s grace period.
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let (mut agent, _) = orchestrator
        .connected_agent(&["--on-terminate", "sleep 600"])
        .await
        .unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();

    let asked = Instant::now();
    let request = pb::TerminateNodeRequest {
        node_id: agent.id(),
        reason: "drain".into(),
        ..Default::default()
    };
    fleet.terminate_node(request).await.unwrap();
    let status = agent.process.wait_exit(Duration::from_secs(10)).await.unwrap();
    let took = asked.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_secs(2),
        "exited after {took:?}, before the grace period ran out"
    );
    assert!(
        took <= Duration::from_secs(2) + SCHEDULING_SLACK,
        "exited after {took:?}"
    );
    agent
        .process
        .logs
        .wait_for("outlived the grace period", Duration::from_secs(1))
        .await
        .unwrap();
    wait_for_state(&mut fleet, &agent.id(), NodeState::Terminated, STARTUP).await;
    let stats = fleet_stats(&mut fleet).await;
    assert_eq!(stats.unexpected_failures_total, 0);
}
