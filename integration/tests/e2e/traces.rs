//! OpenTelemetry traces across processes, received by a fake OTLP collector that
//! speaks the real TraceService protocol: span names, the node id attribute, and
//! parent links from the agent to the orchestrator, the orchestrator to the agent,
//! and the orchestrator to the webhook receiver (its `traceparent` header).

use secbeat::pb;
use secbeat_integration::{
    Agent, Collector, FAST_CONFIG, Orchestrator, QUICK_SCALE_DOWN, STARTUP, Sig, WebhookReceiver,
    webhook_config,
};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_is_one_trace_across_orchestrator_and_agent() {
    let collector = Collector::start().await.unwrap();
    let env = collector.env();
    let config =
        format!("{FAST_CONFIG}scaling_check_interval_seconds = 0.2\nscaling_mode = \"forecast_only\"\n");
    let orchestrator = Orchestrator::start_with_env(&config, &env).await.unwrap();
    let mut agent = Agent::start_with_env(&orchestrator.url(), Uuid::new_v4(), &[], &env).unwrap();
    let id = agent.id();
    orchestrator.wait_all_connected([&agent], STARTUP).await;

    let mut fleet = orchestrator.fleet().await.unwrap();
    let request = pb::TerminateNodeRequest {
        node_id: id.clone(),
        reason: "traced".into(),
        ..Default::default()
    };
    fleet.terminate_node(request).await.unwrap();
    assert!(agent.process.wait_exit(STARTUP).await.unwrap().success());

    let of_node = |span: &secbeat_integration::CollectedSpan| span.attributes.get("node.id") == Some(&id);
    let terminate = collector
        .wait_for_span("secbeat-orchestrator", "terminate_node", STARTUP, of_node)
        .await;
    let agent_side = collector
        .wait_for_span("secbeat-agent", "agent_terminate", STARTUP, |span| {
            span.trace_id == terminate.trace_id
        })
        .await;
    assert_eq!(
        agent_side.parent_span_id, terminate.span_id,
        "the agent's shutdown is a child of the request"
    );
    assert_eq!(agent_side.attributes.get("node.id"), Some(&id));

    // A terminate that waits for a drain is still a child of the request that
    // asked for it, however much later it is sent.
    let mut drained = Agent::start_with_env(&orchestrator.url(), Uuid::new_v4(), &[], &env).unwrap();
    let drained_id = drained.id();
    orchestrator.wait_all_connected([&drained], STARTUP).await;
    let request = pb::TerminateNodeRequest {
        node_id: drained_id.clone(),
        reason: "traced after a drain".into(),
        drain: true,
        force: true,
        ..Default::default()
    };
    fleet.terminate_node(request).await.unwrap();
    assert!(drained.process.wait_exit(STARTUP).await.unwrap().success());
    let request_span = collector
        .wait_for_span("secbeat-orchestrator", "terminate_node", STARTUP, |span| {
            span.attributes.get("node.id") == Some(&drained_id)
        })
        .await;
    let shutdown = collector
        .wait_for_span("secbeat-agent", "agent_terminate", STARTUP, |span| {
            span.attributes.get("node.id") == Some(&drained_id)
        })
        .await;
    assert_eq!(shutdown.trace_id, request_span.trace_id);
    assert_eq!(shutdown.parent_span_id, request_span.span_id);

    // The session: the agent's span is the parent of the orchestrator's.
    let agent_session = collector
        .wait_for_span("secbeat-agent", "agent_session", STARTUP, of_node)
        .await;
    let orchestrator_session = collector
        .wait_for_span("secbeat-orchestrator", "agent_session", STARTUP, of_node)
        .await;
    assert_eq!(orchestrator_session.trace_id, agent_session.trace_id);
    assert_eq!(orchestrator_session.parent_span_id, agent_session.span_id);
    collector
        .wait_for_span("secbeat-orchestrator", "register_node", STARTUP, |span| {
            of_node(span) && span.parent_span_id == orchestrator_session.span_id
        })
        .await;

    // Scaling checks and their predictions are traced too.
    let check = collector
        .wait_for_span("secbeat-orchestrator", "scaling_check", STARTUP, |_| true)
        .await;
    assert_eq!(check.parent_span_id, "", "a scaling check is a root span");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_healing_is_one_trace_from_detection_to_the_webhook_receiver() {
    let collector = Collector::start().await.unwrap();
    let env = collector.env();
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap(), &[])
        .await
        .unwrap();
    let orchestrator = Orchestrator::start_with_env(&webhook_config(&receiver.url()), &env)
        .await
        .unwrap();
    let (victim, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let (_survivor, _) = orchestrator.connected_agent(&[]).await.unwrap();

    victim.process.signal(Sig::SIGKILL);
    let events = receiver
        .wait_for_events("UNEXPECTED_NODE_FAILURE", 1, std::time::Duration::from_secs(15))
        .await;
    let header = events[0]["traceparent"].as_str().unwrap().to_owned();
    let parts: Vec<&str> = header.split('-').collect();
    assert_eq!(parts.len(), 4, "{header}");

    let detection = collector
        .wait_for_span("secbeat-orchestrator", "failure_detection", STARTUP, |span| {
            span.attributes.get("node.id") == Some(&victim.id())
        })
        .await;
    assert_eq!(
        parts[1], detection.trace_id,
        "the receiver's request is in the detection's trace"
    );
    let delivery = collector
        .wait_for_span("secbeat-orchestrator", "webhook_delivery", STARTUP, |span| {
            span.trace_id == detection.trace_id
        })
        .await;
    assert_eq!(delivery.parent_span_id, detection.span_id);
    assert_eq!(
        parts[2], delivery.span_id,
        "the header names the delivery attempt's span"
    );
    assert_eq!(
        delivery.attributes.get("webhook.reason").map(String::as_str),
        Some("UNEXPECTED_NODE_FAILURE")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_down_is_one_trace_from_its_check_to_the_terminate_and_the_webhook() {
    let collector = Collector::start().await.unwrap();
    let env = collector.env();
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap(), &[])
        .await
        .unwrap();
    let config = format!("{}{QUICK_SCALE_DOWN}", webhook_config(&receiver.url()));
    let orchestrator = Orchestrator::start_with_env(&config, &env).await.unwrap();
    let mut idle = Agent::start_with_env(
        &orchestrator.url(),
        Uuid::new_v4(),
        &["--cpu-source", "const:0.05"],
        &env,
    )
    .unwrap();
    let busier = Agent::start_with_env(
        &orchestrator.url(),
        Uuid::new_v4(),
        &["--cpu-source", "const:0.2"],
        &env,
    )
    .unwrap();
    orchestrator.wait_all_connected([&idle, &busier], STARTUP).await;

    let events = receiver
        .wait_for_events("LOW_FLEET_CPU_LOAD", 1, std::time::Duration::from_secs(15))
        .await;
    assert_eq!(events[0]["payload"]["terminated_node_id"], idle.id());
    assert!(idle.process.wait_exit(STARTUP).await.unwrap().success());
    let header = events[0]["traceparent"].as_str().unwrap().to_owned();
    let trace = header.split('-').nth(1).unwrap().to_owned();
    // The check that decided it is the trace's root; the agent's shutdown (after
    // the drain) and the webhook's delivery are in it.
    let check = collector
        .wait_for_span("secbeat-orchestrator", "scaling_check", STARTUP, |span| {
            span.trace_id == trace
        })
        .await;
    assert_eq!(check.parent_span_id, "");
    let shutdown = collector
        .wait_for_span("secbeat-agent", "agent_terminate", STARTUP, |span| {
            span.attributes.get("node.id") == Some(&idle.id())
        })
        .await;
    assert_eq!(shutdown.trace_id, trace);
    collector
        .wait_for_span("secbeat-orchestrator", "webhook_delivery", STARTUP, |span| {
            span.trace_id == trace
                && span.attributes.get("webhook.reason").map(String::as_str) == Some("LOW_FLEET_CPU_LOAD")
        })
        .await;
}
