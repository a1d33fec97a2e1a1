//! The agent protocol and operator API contracts, driven by hand-built streams.

use std::time::Duration;

use secbeat::pb::{self, NodeState, control_message};
use secbeat_integration::{
    FAST_CONFIG, Orchestrator, STARTUP, cpu_samples, eventually, heartbeat, heartbeat_with_cpu, hello, node,
    raw_connect, wait_for_state,
};
use tonic::Code;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_message_must_be_hello() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let mut client = orchestrator.agent_client().await.unwrap();
    let status = raw_connect(&mut client, vec![heartbeat(1)])
        .await
        .err()
        .expect("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("first message must be hello"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_says_hello_is_closed() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let mut client = orchestrator.agent_client().await.unwrap();
    let status = raw_connect(&mut client, vec![])
        .await
        .err()
        .expect("refused after the hello timeout");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("no hello within"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_hello_is_invalid_argument_naming_the_field() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let mut client = orchestrator.agent_client().await.unwrap();
    let bad = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            node_id: "node-7".into(),
            ..Default::default()
        })),
    };
    let status = raw_connect(&mut client, vec![bad]).await.err().expect("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("hello.node_id"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_carries_the_session_and_the_configured_heartbeat_interval() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let mut client = orchestrator.agent_client().await.unwrap();
    let id = Uuid::new_v4();
    let mut stream = raw_connect(&mut client, vec![hello(id)]).await.unwrap();
    let first = stream.inbound.message().await.unwrap().unwrap();
    let Some(control_message::Kind::Welcome(welcome)) = first.kind else {
        panic!("expected welcome, got {first:?}")
    };
    assert_ne!(welcome.session_id, 0);
    assert_eq!(welcome.node_id, id.to_string());
    assert!(
        welcome.heartbeat_carries_cpu,
        "the welcome tells agents to send one message per interval"
    );
    let interval = welcome.heartbeat_interval.unwrap();
    assert_eq!((interval.seconds, interval.nanos), (0, 200_000_000));
    let mut fleet = orchestrator.fleet().await.unwrap();
    let registered = node(&mut fleet, &id.to_string()).await.unwrap();
    assert_eq!(
        registered.ip, "192.0.2.10",
        "the reported ip wins over the peer address"
    );
    assert_eq!(registered.hostname, "raw-test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_agents_two_messages_and_a_heartbeat_carrying_cpu_both_report_cpu() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let mut client = orchestrator.agent_client().await.unwrap();
    let id = Uuid::new_v4();
    let mut stream = raw_connect(&mut client, vec![hello(id)]).await.unwrap();
    stream.inbound.message().await.unwrap().expect("welcome");
    let fleet = orchestrator.fleet().await.unwrap();
    let cpu_becomes = |usage: f64| {
        let fleet = fleet.clone();
        let id = id.to_string();
        async move {
            eventually(STARTUP, &format!("cpu {usage}"), || {
                let mut fleet = fleet.clone();
                let id = id.clone();
                async move {
                    node(&mut fleet, &id)
                        .await
                        .filter(|n| n.last_cpu_usage == Some(usage))
                }
            })
            .await
        }
    };
    // An older agent: the sample and a bare heartbeat.
    stream.outbound.send(cpu_samples(&[0.3])).await.unwrap();
    stream.outbound.send(heartbeat(1)).await.unwrap();
    cpu_becomes(0.3).await;
    // A current agent: one heartbeat carrying the sample.
    stream.outbound.send(heartbeat_with_cpu(2, 0.6)).await.unwrap();
    let current = cpu_becomes(0.6).await;
    assert_eq!(current.state(), NodeState::Connected);
    // A bad sample in a heartbeat ends the stream naming the field.
    stream.outbound.send(heartbeat_with_cpu(3, 1.5)).await.unwrap();
    let status = loop {
        match stream.inbound.message().await {
            Err(status) => break status,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("heartbeat.cpu.usage"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_cpu_ends_only_that_stream() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let (healthy, before) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.4"])
        .await
        .unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();

    for bad in [85.0, -0.5, f64::NAN, f64::INFINITY] {
        let mut client = orchestrator.agent_client().await.unwrap();
        let mut stream = raw_connect(&mut client, vec![hello(Uuid::new_v4())])
            .await
            .unwrap();
        stream.inbound.message().await.unwrap().expect("welcome");
        stream.outbound.send(cpu_samples(&[bad])).await.unwrap();
        let status = stream
            .inbound
            .message()
            .await
            .expect_err("stream ended with a status");
        assert_eq!(status.code(), Code::InvalidArgument, "usage {bad}");
        assert!(
            status.message().contains("cpu_samples.samples.usage"),
            "{}",
            status.message()
        );
    }
    let after = node(&mut fleet, &healthy.id()).await.unwrap();
    assert_eq!(after.state(), NodeState::Connected);
    assert_eq!(
        after.session_id, before.session_id,
        "the healthy agent's stream was not disturbed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_node_errors_are_precise() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();

    let unknown = pb::TerminateNodeRequest {
        node_id: Uuid::new_v4().to_string(),
        reason: String::new(),
        ..Default::default()
    };
    assert_eq!(
        fleet.terminate_node(unknown).await.unwrap_err().code(),
        Code::NotFound
    );
    let malformed = pb::TerminateNodeRequest {
        node_id: "x".into(),
        reason: String::new(),
        ..Default::default()
    };
    assert_eq!(
        fleet.terminate_node(malformed).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let missing = pb::GetNodeRequest {
        node_id: Uuid::new_v4().to_string(),
    };
    assert_eq!(fleet.get_node(missing).await.unwrap_err().code(), Code::NotFound);

    // A node whose agent left has no stream to send the terminate on.
    let (mut agent, _) = orchestrator.connected_agent(&[]).await.unwrap();
    agent.process.signal(secbeat_integration::Sig::SIGTERM);
    agent.process.wait_exit(Duration::from_secs(5)).await.unwrap();
    wait_for_state(&mut fleet, &agent.id(), NodeState::Left, STARTUP).await;
    let gone = pb::TerminateNodeRequest {
        node_id: agent.id(),
        reason: String::new(),
        ..Default::default()
    };
    assert_eq!(
        fleet.terminate_node(gone).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_terminate_is_cancelled_and_a_later_crash_is_a_failure() {
    // A raw stream that receives Terminate but never acknowledges it.
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let mut client = orchestrator.agent_client().await.unwrap();
    let id = Uuid::new_v4();
    let mut stream = raw_connect(&mut client, vec![hello(id)]).await.unwrap();
    stream.inbound.message().await.unwrap().expect("welcome");
    let mut fleet = orchestrator.fleet().await.unwrap();
    let request = pb::TerminateNodeRequest {
        node_id: id.to_string(),
        reason: "ignored".into(),
        ..Default::default()
    };
    fleet.terminate_node(request).await.unwrap();
    let command = stream.inbound.message().await.unwrap().unwrap();
    assert!(matches!(command.kind, Some(control_message::Kind::Terminate(ref t)) if t.reason == "ignored"));

    // Keep heartbeating past the 2s termination deadline.
    let beats = {
        let outbound = stream.outbound.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(200));
            for sequence in 1.. {
                ticks.tick().await;
                if outbound.send(heartbeat(sequence)).await.is_err() {
                    return;
                }
            }
        })
    };
    let cancelled = wait_for_state(&mut fleet, &id.to_string(), NodeState::Connected, STARTUP).await;
    assert!(cancelled.termination.is_none(), "the terminate mark was dropped");
    beats.abort();
    drop(stream);
    let failed = wait_for_state(&mut fleet, &id.to_string(), NodeState::Failed, STARTUP).await;
    assert!(
        failed.state_reason.contains("without goodbye"),
        "{}",
        failed.state_reason
    );
}
