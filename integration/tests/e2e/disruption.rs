//! Taking nodes out of service across real processes: drains whose hooks write
//! files, terminates that wait for them, maintenance through real SIGKILLs and
//! restarts, the disruption budget, protected nodes and scale-down, with the real
//! webhook receiver watching what is (and is not) healed.

use std::time::Duration;

use secbeat::pb::{self, FleetEventType, NodeState};
use secbeat_integration::{
    Agent, Orchestrator, QUICK_SCALE_DOWN, STARTUP, Sig, WebhookReceiver, fleet_stats, next_event_matching,
    node, wait_for_state, webhook_config,
};
use tonic::Code;

const DELIVERY: Duration = Duration::from_secs(20);

fn any_addr() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn drain_request(node_id: &str, reason: &str) -> pb::DrainNodeRequest {
    pb::DrainNodeRequest {
        node_id: node_id.to_owned(),
        reason: reason.to_owned(),
        ..Default::default()
    }
}

fn seconds(secs: f64) -> Option<prost_types::Duration> {
    Some(secbeat::wire::duration_to_proto(Duration::from_secs_f64(secs)))
}

/// The types of the events about `node_id`, in order, until one of type `last`.
async fn events_until(
    events: &mut tonic::Streaming<pb::FleetEvent>,
    node_id: &str,
    last: FleetEventType,
) -> Vec<FleetEventType> {
    let mut seen = Vec::new();
    loop {
        let event = next_event_matching(events, STARTUP, |e| e.node_id == node_id)
            .await
            .unwrap_or_else(|error| panic!("no {last:?} for {node_id}: {error:?}; saw {seen:?}"));
        seen.push(event.r#type());
        if event.r#type() == last {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_runs_the_hook_and_then_a_terminate_is_an_expected_exit_with_no_webhook() {
    let receiver = WebhookReceiver::start(any_addr(), &[]).await.unwrap();
    let orchestrator = Orchestrator::start(&webhook_config(&receiver.url()))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let withdrawn = dir.path().join("route-withdrawn");
    let hook = format!("echo \"$SECBEAT_DRAIN_REASON\" > {}", withdrawn.display());
    let (mut drained, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.9", "--on-drain", &hook])
        .await
        .unwrap();
    let (_serving, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.3"])
        .await
        .unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();
    let mut events = orchestrator.watch_events().await.unwrap();

    let response = fleet
        .drain_node(drain_request(&drained.id(), "kernel patch"))
        .await
        .unwrap()
        .into_inner();
    assert!(!response.already_draining);
    assert_eq!(response.node.unwrap().state(), NodeState::Draining);
    let node = wait_for_state(&mut fleet, &drained.id(), NodeState::Drained, STARTUP).await;
    assert_eq!(
        std::fs::read_to_string(&withdrawn).unwrap().trim(),
        "kernel patch"
    );
    let mark = node.drain.expect("a drained node shows its drain");
    assert!(mark.completed);
    assert_eq!(mark.reason, "kernel patch");
    assert_eq!(
        events_until(&mut events, &drained.id(), FleetEventType::NodeDrained).await,
        [FleetEventType::DrainRequested, FleetEventType::NodeDrained]
    );
    // Out of service: fleet CPU is the other node's alone.
    let stats = fleet_stats(&mut fleet).await;
    assert_eq!((stats.active_nodes, stats.in_service_nodes), (2, 1));
    assert_eq!(stats.avg_cpu_usage, Some(0.3));
    assert_eq!(stats.nodes_by_state.get("NODE_STATE_DRAINED"), Some(&1));
    orchestrator
        .assert_metric("orchestrator_disrupted_nodes", 1.0)
        .await;

    let request = pb::TerminateNodeRequest {
        node_id: drained.id(),
        reason: "retire".into(),
        ..Default::default()
    };
    fleet.terminate_node(request).await.unwrap();
    let status = drained.process.wait_exit(STARTUP).await.unwrap();
    assert!(status.success(), "{status:?}");
    wait_for_state(&mut fleet, &drained.id(), NodeState::Terminated, STARTUP).await;
    orchestrator.wait_outbox_drained(DELIVERY).await;
    assert!(receiver.events().is_empty(), "{:#?}", receiver.events());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_with_drain_waits_for_the_hook_and_a_failing_or_slow_hook_sends_no_terminate() {
    let orchestrator = Orchestrator::start(&format!(
        "{}max_disrupted_nodes = 5\n",
        secbeat_integration::FAST_CONFIG
    ))
    .await
    .unwrap();
    let (mut good, _) = orchestrator
        .connected_agent(&["--on-drain", "sleep 0.3"])
        .await
        .unwrap();
    let (failing, _) = orchestrator
        .connected_agent(&["--on-drain", "echo bgp down >&2; exit 3"])
        .await
        .unwrap();
    let (slow, _) = orchestrator
        .connected_agent(&["--on-drain", "sleep 600"])
        .await
        .unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();
    let mut events = orchestrator.watch_events().await.unwrap();

    let with_drain = |node_id: String| pb::TerminateNodeRequest {
        node_id,
        reason: "retire".into(),
        drain: true,
        ..Default::default()
    };
    let response = fleet
        .terminate_node(with_drain(good.id()))
        .await
        .unwrap()
        .into_inner();
    assert!(response.draining_first);
    assert_eq!(response.node.unwrap().state(), NodeState::Draining);
    assert_eq!(
        events_until(&mut events, &good.id(), FleetEventType::NodeTerminated).await,
        [
            FleetEventType::DrainRequested,
            FleetEventType::NodeDrained,
            FleetEventType::TerminateRequested,
            FleetEventType::TerminateAcknowledged,
            FleetEventType::NodeTerminated,
        ]
    );
    assert!(good.process.wait_exit(STARTUP).await.unwrap().success());

    fleet.terminate_node(with_drain(failing.id())).await.unwrap();
    let failed = next_event_matching(&mut events, STARTUP, |e| {
        e.r#type() == FleetEventType::DrainFailed && e.node_id == failing.id()
    })
    .await
    .unwrap();
    assert!(failed.reason.contains("exit status: 3"), "{}", failed.reason);
    assert!(failed.reason.contains("terminate"), "{}", failed.reason);
    assert_eq!(failed.state(), NodeState::Connected);

    let request = pb::TerminateNodeRequest {
        drain_deadline: seconds(1.0),
        ..with_drain(slow.id())
    };
    fleet.terminate_node(request).await.unwrap();
    let cut = next_event_matching(&mut events, STARTUP, |e| {
        e.r#type() == FleetEventType::DrainFailed && e.node_id == slow.id()
    })
    .await
    .unwrap();
    assert!(cut.reason.contains("outlived"), "{}", cut.reason);

    // Neither was terminated; both still serve.
    for agent in [&failing, &slow] {
        let listed = node(&mut fleet, &agent.id()).await.unwrap();
        assert_eq!(listed.state(), NodeState::Connected, "{}", listed.state_reason);
        assert!(listed.termination.is_none() && listed.drain.is_none());
    }
    let stats = fleet_stats(&mut fleet).await;
    assert_eq!(stats.graceful_terminations_total, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_refuses_a_third_drain_at_two_and_force_overrides_it() {
    let orchestrator = Orchestrator::start(&format!(
        "{}max_disrupted_nodes = 2\n",
        secbeat_integration::FAST_CONFIG
    ))
    .await
    .unwrap();
    let mut agents = Vec::new();
    for _ in 0..4 {
        agents.push(orchestrator.connected_agent(&[]).await.unwrap().0);
    }
    let mut fleet = orchestrator.fleet().await.unwrap();
    for agent in &agents[..2] {
        fleet
            .drain_node(drain_request(&agent.id(), "patch"))
            .await
            .unwrap();
    }
    let refused = fleet
        .drain_node(drain_request(&agents[2].id(), "patch"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("max_disrupted_nodes"),
        "{}",
        refused.message()
    );
    assert_eq!(
        node(&mut fleet, &agents[2].id()).await.unwrap().state(),
        NodeState::Connected
    );
    // A terminate with drain is held to the same budget.
    let request = pb::TerminateNodeRequest {
        node_id: agents[3].id(),
        drain: true,
        ..Default::default()
    };
    let refused = fleet.terminate_node(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let forced = pb::DrainNodeRequest {
        force: true,
        ..drain_request(&agents[2].id(), "patch")
    };
    fleet.drain_node(forced).await.unwrap();
    wait_for_state(&mut fleet, &agents[2].id(), NodeState::Drained, STARTUP).await;
    let stats = fleet_stats(&mut fleet).await;
    assert_eq!((stats.disrupted_nodes, stats.disruption_allowed), (3, 2));

    // Resume gives the budget back.
    let resumed = fleet
        .resume_node(pb::ResumeNodeRequest {
            node_id: agents[0].id(),
            reason: "patched".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resumed.node.unwrap().state(), NodeState::Connected);
    let error = fleet
        .resume_node(pb::ResumeNodeRequest {
            node_id: agents[0].id(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{}", error.message());
    for (bad, field) in [
        (
            pb::DrainNodeRequest {
                deadline: seconds(7200.0),
                ..drain_request(&agents[3].id(), "x")
            },
            "deadline",
        ),
        (drain_request("not-a-uuid", "x"), "node_id"),
        (drain_request(&agents[3].id(), "bad\nreason"), "reason"),
    ] {
        let error = fleet.drain_node(bad).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert!(error.message().contains(field), "{}", error.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_in_maintenance_is_killed_and_restarted_without_a_heal_and_one_left_away_is_healed_once() {
    let receiver = WebhookReceiver::start(any_addr(), &[]).await.unwrap();
    let config = format!("{}maintenance_max = 6.0\n", webhook_config(&receiver.url()));
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let (rebooted, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let (forgotten, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let (witness, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let (_bystander, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();
    let mut events = orchestrator.watch_events().await.unwrap();
    for agent in [&rebooted, &forgotten] {
        let response = fleet
            .set_maintenance(pb::SetMaintenanceRequest {
                node_id: agent.id(),
                enabled: true,
                reason: "kernel patch".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(response.changed);
        assert_eq!(response.node.unwrap().maintenance.unwrap().reason, "kernel patch");
    }
    assert_eq!(fleet_stats(&mut fleet).await.maintenance_nodes, 2);

    // The reboot: SIGKILL, then away for longer than a failure takes to be
    // declared (the witness, killed after it and not in maintenance, is FAILED
    // meanwhile), then back under the same node id.
    rebooted.process.signal(Sig::SIGKILL);
    let away = wait_for_state(&mut fleet, &rebooted.id(), NodeState::Suspect, STARTUP).await;
    assert!(away.state_reason.contains("maintenance"), "{}", away.state_reason);
    assert!(away.maintenance.unwrap().away_since.is_some());
    witness.process.signal(Sig::SIGKILL);
    wait_for_state(&mut fleet, &witness.id(), NodeState::Failed, STARTUP).await;
    assert_eq!(
        node(&mut fleet, &rebooted.id()).await.unwrap().state(),
        NodeState::Suspect,
        "not FAILED while in maintenance"
    );
    let back = Agent::start(&orchestrator.url(), rebooted.node_id, &[]).unwrap();
    wait_for_state(&mut fleet, &back.id(), NodeState::Connected, STARTUP).await;

    // The forgotten one stays away past maintenance_max: FAILED, healed once.
    forgotten.process.signal(Sig::SIGKILL);
    let failed = next_event_matching(&mut events, Duration::from_secs(15), |e| {
        e.r#type() == FleetEventType::NodeFailed && e.node_id == forgotten.id()
    })
    .await
    .unwrap();
    assert!(failed.reason.contains("maintenance_max"), "{}", failed.reason);
    let healed = receiver
        .wait_for_events("UNEXPECTED_NODE_FAILURE", 2, DELIVERY)
        .await;
    orchestrator.wait_outbox_drained(DELIVERY).await;
    let mut ids: Vec<_> = healed
        .iter()
        .map(|event| event["payload"]["failed_node_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut expected = vec![witness.id(), forgotten.id()];
    expected.sort();
    assert_eq!(ids, expected, "the rebooted node is never healed");
    assert_eq!(receiver.events().len(), 2, "{:#?}", receiver.events());
    assert_eq!(fleet_stats(&mut fleet).await.unexpected_failures_total, 2);
    assert_eq!(
        node(&mut fleet, &back.id()).await.unwrap().state(),
        NodeState::Connected
    );
}

/// Two agents for a scale-down to choose between: the idle one (5% CPU, with
/// `on_drain` as its drain hook) and a busier one (20%).
async fn idle_and_busier(orchestrator: &Orchestrator, on_drain: &str) -> (Agent, Agent) {
    let (idle, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.05", "--on-drain", on_drain])
        .await
        .unwrap();
    let (busier, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.2"])
        .await
        .unwrap();
    (idle, busier)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_drains_its_node_first_and_never_chooses_a_protected_one() {
    let receiver = WebhookReceiver::start(any_addr(), &[]).await.unwrap();
    let config = format!("{}{QUICK_SCALE_DOWN}", webhook_config(&receiver.url()));
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let withdrawn = dir.path().join("withdrawn");
    let hook = format!("echo \"$SECBEAT_DRAIN_REASON\" > {}", withdrawn.display());
    let (protected, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.01", "--label", "secbeat.io/protect=true"])
        .await
        .unwrap();
    let mut events = orchestrator.watch_events().await.unwrap();
    let (mut idle, _busier) = idle_and_busier(&orchestrator, &hook).await;

    let seen = events_until(&mut events, &idle.id(), FleetEventType::NodeTerminated).await;
    let drained = seen.iter().position(|t| *t == FleetEventType::NodeDrained);
    let told = seen.iter().position(|t| *t == FleetEventType::TerminateRequested);
    assert!(
        matches!((drained, told), (Some(d), Some(t)) if d < t),
        "drained before told to terminate: {seen:?}"
    );
    assert!(
        std::fs::read_to_string(&withdrawn)
            .unwrap()
            .contains("scale down"),
        "the hook ran for the scale-down"
    );
    assert!(idle.process.wait_exit(STARTUP).await.unwrap().success());
    let events = receiver.wait_for_events("LOW_FLEET_CPU_LOAD", 1, DELIVERY).await;
    assert_eq!(events[0]["payload"]["terminated_node_id"], idle.id());
    let mut fleet = orchestrator.fleet().await.unwrap();
    assert_eq!(
        node(&mut fleet, &protected.id()).await.unwrap().state(),
        NodeState::Connected,
        "the protected node, least loaded of all, is never chosen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_down_whose_drain_fails_sends_neither_its_terminate_nor_its_webhook() {
    let receiver = WebhookReceiver::start(any_addr(), &[]).await.unwrap();
    let config = format!("{}{QUICK_SCALE_DOWN}", webhook_config(&receiver.url()));
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let mut events = orchestrator.watch_events().await.unwrap();
    let (idle, _busier) = idle_and_busier(&orchestrator, "exit 3").await;

    let seen = events_until(&mut events, &idle.id(), FleetEventType::DrainFailed).await;
    assert!(seen.contains(&FleetEventType::DrainRequested), "{seen:?}");
    assert!(!seen.contains(&FleetEventType::TerminateRequested), "{seen:?}");
    // Queued when the scaler decided (before the drain was even sent), the
    // webhook would be in the outbox or delivered by now; it was never queued.
    orchestrator
        .assert_metric("orchestrator_webhook_outbox_depth", 0.0)
        .await;
    orchestrator
        .assert_metric(
            "orchestrator_webhooks_sent_total{reason=\"LOW_FLEET_CPU_LOAD\"}",
            0.0,
        )
        .await;
    assert!(receiver.events().is_empty(), "{:#?}", receiver.events());
    let mut fleet = orchestrator.fleet().await.unwrap();
    assert_eq!(
        node(&mut fleet, &idle.id()).await.unwrap().state(),
        NodeState::Connected,
        "back in service: its route may have been withdrawn, so it was told to resume"
    );
}
