//! Failure domains, selectors, paused automation and reboots across real
//! processes: agents in two PoPs killed with real SIGKILLs, the real webhook
//! receiver, and the real grpcurl for selectors and SetAutomation.

use std::time::Duration;

use secbeat::pb::{self, FleetEventType, NodeState};
use secbeat_integration::{
    Agent, Orchestrator, STARTUP, Sig, WebhookReceiver, eventually, fleet_stats, hello, http_request,
    next_event_matching, node, raw_connect, run_grpcurl, wait_for_state, webhook_config,
};

const DELIVERY: Duration = Duration::from_secs(20);

fn any_addr() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// grpcurl with a JSON body against `addr`; the parsed answer, or the error text.
async fn grpcurl_json(addr: &str, method: &str, body: &str) -> Result<serde_json::Value, String> {
    let (ok, out, err) = run_grpcurl(&["-plaintext", "-d", body, addr, method])
        .await
        .map_err(|error| error.to_string())?;
    if !ok {
        return Err(err);
    }
    serde_json::from_str(&out).map_err(|error| format!("{error}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pop_losing_most_of_its_nodes_gets_one_alert_while_the_other_pop_heals_its_failure() {
    let receiver = WebhookReceiver::start(any_addr(), &[]).await.unwrap();
    let config = format!(
        "{}failure_domain_label = \"pop\"\n",
        webhook_config(&receiver.url())
    );
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let mut fra = Vec::new();
    for _ in 0..4 {
        fra.push(
            orchestrator
                .connected_agent(&["--label", "pop=fra1"])
                .await
                .unwrap()
                .0,
        );
    }
    let mut ams = Vec::new();
    for _ in 0..3 {
        ams.push(
            orchestrator
                .connected_agent(&["--label", "pop=ams1"])
                .await
                .unwrap()
                .0,
        );
    }
    let mut events = orchestrator.watch_events().await.unwrap();

    // fra1 loses its uplink: three of four nodes at once. ams1 loses one node.
    for agent in &fra[..3] {
        agent.process.signal(Sig::SIGKILL);
    }
    ams[0].process.signal(Sig::SIGKILL);

    let alert = next_event_matching(&mut events, STARTUP, |e| {
        e.r#type() == FleetEventType::MassNodeFailure
    })
    .await
    .unwrap();
    assert_eq!(alert.failure_domain, "pop=fra1");
    let mass = receiver.wait_for_events("MASS_NODE_FAILURE", 1, DELIVERY).await;
    assert_eq!(mass[0]["payload"]["failure_domain"], "pop=fra1");
    // Three of fra1 failing: declared failed by the alert, or suspect then.
    let payload = &mass[0]["payload"];
    let declared = payload["failed_nodes"].as_array().unwrap().len() as u64;
    assert_eq!(
        declared + payload["suspect_nodes"].as_u64().unwrap(),
        3,
        "{payload}"
    );
    receiver
        .wait_for_events("UNEXPECTED_NODE_FAILURE", 1, DELIVERY)
        .await;
    orchestrator.wait_outbox_drained(DELIVERY).await;
    assert_eq!(
        receiver.events_with_reason("MASS_NODE_FAILURE").len(),
        1,
        "one alert"
    );
    // Only ams1's failure is healed. The kills land milliseconds apart, so the
    // detector may declare fra1's nodes over two rounds; the ones still suspect
    // count towards the mass failure, so none of fra1 is healed either way.
    let healed: Vec<String> = receiver
        .events_with_reason("UNEXPECTED_NODE_FAILURE")
        .iter()
        .map(|event| event["payload"]["failed_node_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(healed, [ams[0].id()]);

    let mut fleet = orchestrator.fleet().await.unwrap();
    let stats = fleet_stats(&mut fleet).await;
    let fra1 = &stats.failure_domains["pop=fra1"];
    assert!(fra1.mass_failure_guard);
    assert_eq!(fra1.nodes_by_state.get("NODE_STATE_FAILED"), Some(&3));
    let ams1 = &stats.failure_domains["pop=ams1"];
    assert!(!ams1.mass_failure_guard);
    assert_eq!(ams1.heals_last_hour, 1);
    assert_eq!(ams1.active_nodes, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_and_state_filters_work_through_the_real_grpcurl_and_the_http_api() {
    let orchestrator = Orchestrator::start(secbeat_integration::FAST_CONFIG)
        .await
        .unwrap();
    let (edge_fra, _) = orchestrator
        .connected_agent(&[
            "--label",
            "pop=fra1",
            "--label",
            "role=edge",
            "--cpu-source",
            "const:0.2",
        ])
        .await
        .unwrap();
    let (canary_fra, _) = orchestrator
        .connected_agent(&[
            "--label",
            "pop=fra1",
            "--label",
            "role=canary",
            "--cpu-source",
            "const:0.6",
        ])
        .await
        .unwrap();
    let (edge_ams, _) = orchestrator
        .connected_agent(&["--label", "pop=ams1", "--label", "role=edge"])
        .await
        .unwrap();
    edge_ams.process.signal(Sig::SIGKILL);
    let mut fleet = orchestrator.fleet().await.unwrap();
    wait_for_state(&mut fleet, &edge_ams.id(), NodeState::Failed, STARTUP).await;
    let addr = orchestrator.grpc_addr.to_string();

    let ids = |answer: &serde_json::Value| {
        let mut ids: Vec<String> = answer["nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .map(|n| n["nodeId"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    };
    let list = |body: &'static str| {
        let addr = addr.clone();
        async move { grpcurl_json(&addr, "secbeat.v1.FleetService/ListNodes", body).await }
    };
    let fra = list(r#"{"label_selector": "pop=fra1"}"#).await.unwrap();
    let mut expected = vec![edge_fra.id(), canary_fra.id()];
    expected.sort();
    assert_eq!(ids(&fra), expected);
    let edges = list(r#"{"label_selector": "role=edge,pop!=ams1"}"#)
        .await
        .unwrap();
    assert_eq!(ids(&edges), vec![edge_fra.id()]);
    let failed = list(r#"{"states": ["NODE_STATE_FAILED"]}"#).await.unwrap();
    assert_eq!(ids(&failed), vec![edge_ams.id()]);
    let none = list(r#"{"label_selector": "pop=fra1", "states": ["NODE_STATE_FAILED"]}"#)
        .await
        .unwrap();
    assert!(ids(&none).is_empty(), "{none}");
    let error = list(r#"{"label_selector": "pop=fra1,,x"}"#).await.unwrap_err();
    assert!(
        error.contains("InvalidArgument") && error.contains("label_selector"),
        "{error}"
    );

    let stats = grpcurl_json(
        &addr,
        "secbeat.v1.FleetService/GetFleetStats",
        r#"{"label_selector": "pop=fra1"}"#,
    )
    .await
    .unwrap();
    assert_eq!(stats["activeNodes"], 2);
    let average = stats["avgCpuUsage"].as_f64().unwrap();
    assert!((average - 0.4).abs() < 1e-9, "{stats}");

    let response = http_request(
        orchestrator.http_addr,
        "/api/v1/nodes?selector=role%3Dcanary",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    let nodes = response.json()["nodes"].as_array().unwrap().clone();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["node_id"], canary_fra.id());
    let response = http_request(orchestrator.http_addr, "/api/v1/nodes?state=failed", &[])
        .await
        .unwrap();
    assert_eq!(response.json()["nodes"].as_array().unwrap().len(), 1);
    let response = http_request(
        orchestrator.http_addr,
        "/api/v1/fleet/stats?selector=pop%3Dams1",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(response.json()["nodes_by_state"]["failed"], 1);
    for (path, field) in [
        ("/api/v1/nodes?selector=%3Dx", "selector"),
        ("/api/v1/nodes?state=sleepy", "state"),
        ("/api/v1/nodes?colour=red", "colour"),
    ] {
        let response = http_request(orchestrator.http_addr, path, &[]).await.unwrap();
        assert_eq!(response.status, 400, "{path}: {}", response.body);
        let error = response.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains(field), "{path}: {error}");
    }

    // A watcher with a selector sees only its nodes' events.
    let mut watcher = fleet
        .watch_events(pb::WatchEventsRequest {
            label_selector: "pop=fra1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (_late_ams, _) = orchestrator
        .connected_agent(&["--label", "pop=ams1"])
        .await
        .unwrap();
    let (late_fra, _) = orchestrator
        .connected_agent(&["--label", "pop=fra1"])
        .await
        .unwrap();
    let first = tokio::time::timeout(STARTUP, watcher.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.r#type(), first.node_id.as_str()),
        (FleetEventType::NodeJoined, late_fra.id().as_str()),
        "the ams1 node's join, before it, is not sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healing_paused_holds_a_failure_and_resuming_heals_it_once() {
    let receiver = WebhookReceiver::start(any_addr(), &[]).await.unwrap();
    let orchestrator = Orchestrator::start(&webhook_config(&receiver.url()))
        .await
        .unwrap();
    let (victim, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let (_other, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let addr = orchestrator.grpc_addr.to_string();
    let mut events = orchestrator.watch_events().await.unwrap();

    let paused = grpcurl_json(
        &addr,
        "secbeat.v1.FleetService/SetAutomation",
        r#"{"healing": false, "reason": "upstream outage"}"#,
    )
    .await
    .unwrap();
    assert_eq!(
        paused["healing"],
        serde_json::Value::Null,
        "false is omitted: {paused}"
    );
    assert_eq!(paused["scaling"], true);
    orchestrator
        .assert_metric("orchestrator_automation_paused{automation=\"healing\"}", 1.0)
        .await;

    victim.process.signal(Sig::SIGKILL);
    let held = next_event_matching(&mut events, STARTUP, |e| {
        e.r#type() == FleetEventType::SelfHealingHeld && e.node_id == victim.id()
    })
    .await
    .unwrap();
    assert!(held.reason.contains("paused"), "{}", held.reason);
    let mut fleet = orchestrator.fleet().await.unwrap();
    assert!(fleet_stats(&mut fleet).await.healing_paused);
    // The console's fleet view lists the failure not healed, and why.
    let stats = http_request(orchestrator.http_addr, "/api/v1/fleet/stats", &[])
        .await
        .unwrap()
        .json();
    assert_eq!(stats["held_failures"][0]["node_id"], victim.id(), "{stats}");
    assert!(
        stats["held_failures"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("paused")
    );
    orchestrator.wait_outbox_drained(DELIVERY).await;
    assert!(receiver.events().is_empty(), "{:#?}", receiver.events());

    let resumed = grpcurl_json(
        &addr,
        "secbeat.v1.FleetService/SetAutomation",
        r#"{"healing": true, "reason": "outage over"}"#,
    )
    .await
    .unwrap();
    assert_eq!(resumed["healing"], true);
    assert_eq!(resumed["resumedFailures"], 1);
    let healed = receiver
        .wait_for_events("UNEXPECTED_NODE_FAILURE", 1, DELIVERY)
        .await;
    assert_eq!(healed[0]["payload"]["failed_node_id"], victim.id());
    orchestrator.wait_outbox_drained(DELIVERY).await;
    assert_eq!(receiver.events().len(), 1);
    orchestrator
        .assert_metric("orchestrator_automation_paused{automation=\"healing\"}", 0.0)
        .await;
    let error = grpcurl_json(
        &addr,
        "secbeat.v1.FleetService/SetAutomation",
        r#"{"reason": "x\u0007"}"#,
    )
    .await
    .unwrap_err();
    assert!(error.contains("InvalidArgument"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_says_whether_the_node_rebooted() {
    let orchestrator = Orchestrator::start(secbeat_integration::FAST_CONFIG)
        .await
        .unwrap();
    let (agent, listed) = orchestrator.connected_agent(&[]).await.unwrap();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default();
    assert_eq!(listed.boot_id, boot_id, "the agent tells its host's boot id");
    if !boot_id.is_empty() {
        assert!(listed.boot_time.is_some() && listed.uptime.is_some());
    }
    let mut events = orchestrator.watch_events().await.unwrap();

    // An agent restart on the same host: the same boot, not a reboot.
    agent.process.signal(Sig::SIGKILL);
    let mut fleet = orchestrator.fleet().await.unwrap();
    wait_for_state(&mut fleet, &agent.id(), NodeState::Suspect, STARTUP).await;
    let _again = Agent::start(&orchestrator.url(), agent.node_id, &[]).unwrap();
    let back = next_event_matching(&mut events, STARTUP, |e| {
        e.r#type() == FleetEventType::NodeReconnected
    })
    .await
    .unwrap();
    if !boot_id.is_empty() {
        assert_eq!(back.rebooted, Some(false), "{}", back.reason);
        assert!(back.reason.contains("same boot"), "{}", back.reason);
    }

    // The same node id from a host that booted since (a hand-written Hello).
    let mut rebooted_hello = hello(agent.node_id);
    if let Some(pb::agent_message::Kind::Hello(hello)) = &mut rebooted_hello.kind {
        hello.boot_id = "11111111-2222-4333-8444-555555555555".into();
        hello.last_disconnect = "host rebooted".into();
    }
    let mut client = orchestrator.agent_client().await.unwrap();
    let _stream = raw_connect(&mut client, vec![rebooted_hello]).await.unwrap();
    let reconnected = next_event_matching(&mut events, STARTUP, |e| {
        e.r#type() == FleetEventType::NodeReconnected
    })
    .await
    .unwrap();
    if !boot_id.is_empty() {
        assert_eq!(reconnected.rebooted, Some(true), "{}", reconnected.reason);
    }
    assert!(
        reconnected.reason.contains("host rebooted"),
        "{}",
        reconnected.reason
    );
    let shown = eventually(STARTUP, "the new boot id shown", || {
        let mut fleet = fleet.clone();
        let id = agent.id();
        async move {
            let node = node(&mut fleet, &id).await?;
            (node.boot_id.starts_with("11111111")).then_some(node)
        }
    })
    .await;
    assert!(
        shown.uptime.is_none(),
        "a Hello without boot_time gives no uptime"
    );
}
