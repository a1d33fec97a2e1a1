//! The operator's view through the real grpcurl (reflection v1alpha).

use std::time::Duration;

use secbeat::pb::NodeState;
use secbeat_integration::{FAST_CONFIG, Orchestrator, run_grpcurl, wait_for_state};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_services_reads_nodes_and_terminates_one() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let (mut agent, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.25"])
        .await
        .unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();
    let addr = orchestrator.grpc_addr.to_string();

    let (ok, services, stderr) = run_grpcurl(&["-plaintext", &addr, "list"]).await.unwrap();
    assert!(ok, "{stderr}");
    for service in [
        "secbeat.v1.AgentService",
        "secbeat.v1.FleetService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.lines().any(|line| line == service),
            "{service} not in {services}"
        );
    }

    let (ok, description, stderr) =
        run_grpcurl(&["-plaintext", &addr, "describe", "secbeat.v1.FleetService"])
            .await
            .unwrap();
    assert!(ok, "{stderr}");
    assert!(description.contains("rpc TerminateNode"), "{description}");

    let (ok, health, stderr) = run_grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"])
        .await
        .unwrap();
    assert!(ok, "{stderr}");
    assert!(health.contains("SERVING"), "{health}");

    let (ok, listed, stderr) = run_grpcurl(&["-plaintext", &addr, "secbeat.v1.FleetService/ListNodes"])
        .await
        .unwrap();
    assert!(ok, "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let node = &listed["nodes"][0];
    assert_eq!(node["nodeId"], agent.id());
    assert_eq!(node["state"], "NODE_STATE_CONNECTED");
    assert_eq!(node["lastCpuUsage"], 0.25);

    let request = format!(r#"{{"node_id": "{}", "reason": "grpcurl"}}"#, agent.id());
    let (ok, terminated, stderr) = run_grpcurl(&[
        "-plaintext",
        "-d",
        &request,
        &addr,
        "secbeat.v1.FleetService/TerminateNode",
    ])
    .await
    .unwrap();
    assert!(ok, "{stderr}");
    let terminated: serde_json::Value = serde_json::from_str(&terminated).unwrap();
    assert_eq!(terminated["node"]["state"], "NODE_STATE_TERMINATING");

    assert_eq!(
        agent
            .process
            .wait_exit(Duration::from_secs(10))
            .await
            .unwrap()
            .code(),
        Some(0)
    );
    wait_for_state(
        &mut fleet,
        &agent.id(),
        NodeState::Terminated,
        Duration::from_secs(10),
    )
    .await;

    let unknown = r#"{"node_id": "00000000-0000-4000-8000-000000000000"}"#;
    let (ok, _, stderr) = run_grpcurl(&[
        "-plaintext",
        "-d",
        unknown,
        &addr,
        "secbeat.v1.FleetService/GetNode",
    ])
    .await
    .unwrap();
    assert!(!ok);
    assert!(stderr.contains("NotFound"), "{stderr}");
}
