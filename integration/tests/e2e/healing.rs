//! Self-healing and webhook delivery across real processes: the orchestrator, the
//! agents and the real `secbeat-webhook-receiver` over HTTP, killed with real
//! signals. The receiver verifies every signature (it refuses unsigned or
//! mis-signed deliveries with 401), so each recorded event was validly signed.

use std::time::Duration;

use secbeat::pb::{self, FleetEventType, NodeState};
use secbeat_integration::{
    FAST_RECONNECT, Orchestrator, STARTUP, Sig, WebhookReceiver, eventually, free_addr, next_event_matching,
    wait_for_state, webhook_config,
};

const DELIVERY: Duration = Duration::from_secs(15);

fn any_addr() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// When an event happened.
fn event_time(event: &pb::FleetEvent) -> std::time::SystemTime {
    std::time::SystemTime::try_from(event.time.expect("events carry a time")).expect("a valid time")
}

/// The webhook id of a WEBHOOK_* event.
fn webhook_of(event: &pb::FleetEvent) -> String {
    event
        .webhook
        .as_ref()
        .unwrap_or_else(|| panic!("no webhook in {event:?}"))
        .webhook_id
        .clone()
}

/// The `webhook.id=` field of a log line.
fn webhook_id(line: &str) -> String {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("webhook.id="))
        .unwrap_or_else(|| panic!("no webhook.id in {line:?}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_an_agent_sends_exactly_one_signed_self_healing_webhook() {
    let receiver = WebhookReceiver::start(any_addr(), &[]).await.unwrap();
    let orchestrator = Orchestrator::start(&webhook_config(&receiver.url()))
        .await
        .unwrap();
    let (victim, victim_node) = orchestrator.connected_agent(&[]).await.unwrap();
    let (_survivor, _) = orchestrator.connected_agent(&[]).await.unwrap();

    victim.process.signal(Sig::SIGKILL);
    let events = receiver
        .wait_for_events("UNEXPECTED_NODE_FAILURE", 1, DELIVERY)
        .await;
    let event = &events[0];
    assert_eq!(event["verified"], true, "signature checked by the receiver");
    assert_eq!(event["payload"]["failed_node_id"], victim.id());
    assert_eq!(event["payload"]["failed_node_ip"], victim_node.ip);
    assert!(event["payload"]["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(event["payload"]["fleet_metrics"]["active_nodes"], 1);
    let traceparent = event["traceparent"].as_str().unwrap();
    assert!(
        traceparent.starts_with("00-") && traceparent.len() == 55,
        "{traceparent}"
    );
    orchestrator
        .process
        .logs
        .wait_for(
            &format!(
                "CRITICAL UNEXPECTED NODE FAILURE DETECTED for Node {} at IP {}. Initiating self-healing.",
                victim.id(),
                victim_node.ip
            ),
            STARTUP,
        )
        .await
        .unwrap();
    orchestrator
        .process
        .logs
        .wait_for("Self-healing webhook sent successfully", STARTUP)
        .await
        .unwrap();

    // Exactly one: everything queued is delivered, and one was queued and sent.
    orchestrator.wait_outbox_drained(DELIVERY).await;
    assert_eq!(receiver.events().len(), 1);
    assert_eq!(receiver.process.logs.count("recorded UNEXPECTED_NODE_FAILURE"), 1);
    orchestrator
        .assert_metric("orchestrator_self_healing_webhooks_sent_total", 1.0)
        .await;
    orchestrator
        .assert_metric("orchestrator_unexpected_node_failures_total", 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_node_is_counted_as_graceful_and_never_healed() {
    let receiver = WebhookReceiver::start(any_addr(), &[]).await.unwrap();
    let orchestrator = Orchestrator::start(&webhook_config(&receiver.url()))
        .await
        .unwrap();
    let (mut told, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let (sentinel, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let (_third, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();

    let request = pb::TerminateNodeRequest {
        node_id: told.id(),
        reason: "scale down".into(),
        ..Default::default()
    };
    fleet.terminate_node(request).await.unwrap();
    let status = told.process.wait_exit(STARTUP).await.unwrap();
    assert!(status.success(), "{status:?}");
    wait_for_state(&mut fleet, &told.id(), NodeState::Terminated, STARTUP).await;
    orchestrator
        .process
        .logs
        .wait_for(
            "Node gracefully terminated as commanded - expected shutdown",
            STARTUP,
        )
        .await
        .unwrap();
    orchestrator
        .assert_metric("orchestrator_nodes_gracefully_terminated_total", 1.0)
        .await;

    // A crash after it is healed; the terminated node's exit, before it, was not.
    sentinel.process.signal(Sig::SIGKILL);
    let events = receiver
        .wait_for_events("UNEXPECTED_NODE_FAILURE", 1, DELIVERY)
        .await;
    orchestrator.wait_outbox_drained(DELIVERY).await;
    let all = receiver.events();
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(events[0]["payload"]["failed_node_id"], sentinel.id());
    orchestrator
        .assert_metric("orchestrator_unexpected_node_failures_total", 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_that_is_never_acked_does_not_protect_a_node_that_then_dies() {
    let receiver = WebhookReceiver::start(any_addr(), &[]).await.unwrap();
    // A long heartbeat timeout, so the frozen node outlives the terminate deadline.
    let config = format!(
        "{}\nheartbeat_timeout = 4.0\ntermination_deadline = 1.0\n",
        webhook_config(&receiver.url())
    )
    .replace("heartbeat_timeout = 1.0\n", "")
    .replace("termination_deadline = 2.0\n", "");
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let (frozen, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let (_other, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();
    let mut events = orchestrator.watch_events().await.unwrap();

    frozen.process.signal(Sig::SIGSTOP);
    let request = pb::TerminateNodeRequest {
        node_id: frozen.id(),
        reason: "scale down".into(),
        ..Default::default()
    };
    fleet.terminate_node(request).await.unwrap();
    next_event_matching(&mut events, STARTUP, |e| {
        e.r#type() == FleetEventType::TerminateCancelled && e.node_id == frozen.id()
    })
    .await
    .unwrap();
    frozen.process.signal(Sig::SIGKILL);

    let healed = receiver
        .wait_for_events("UNEXPECTED_NODE_FAILURE", 1, DELIVERY)
        .await;
    assert_eq!(healed[0]["payload"]["failed_node_id"], frozen.id());
    let node = wait_for_state(&mut fleet, &frozen.id(), NodeState::Failed, STARTUP).await;
    assert!(
        node.state_reason.contains("without goodbye"),
        "{}",
        node.state_reason
    );
    orchestrator
        .assert_metric("orchestrator_nodes_gracefully_terminated_total", 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_failing_three_times_gets_the_webhook_once_with_the_same_id() {
    let receiver = WebhookReceiver::start(any_addr(), &["--fail-first", "3"])
        .await
        .unwrap();
    let orchestrator = Orchestrator::start(&webhook_config(&receiver.url()))
        .await
        .unwrap();
    let (victim, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let (_survivor, _) = orchestrator.connected_agent(&[]).await.unwrap();

    victim.process.signal(Sig::SIGKILL);
    let events = receiver
        .wait_for_events("UNEXPECTED_NODE_FAILURE", 1, DELIVERY)
        .await;
    orchestrator.wait_outbox_drained(DELIVERY).await;
    let id = events[0]["webhook_id"].as_str().unwrap().to_owned();

    let attempts: Vec<String> = receiver
        .process
        .logs
        .lines()
        .into_iter()
        .filter(|line| line.contains("request="))
        .collect();
    assert_eq!(attempts.len(), 4, "three 500s then one delivery: {attempts:#?}");
    for line in &attempts[..3] {
        assert!(line.contains("status=500"), "{line}");
    }
    for line in &attempts {
        assert_eq!(webhook_id(line), id, "the id is stable across retries");
    }
    assert_eq!(receiver.events().len(), 1);
    orchestrator
        .assert_metric("orchestrator_self_healing_webhook_errors_total", 3.0)
        .await;
    orchestrator
        .assert_metric("orchestrator_self_healing_webhooks_sent_total", 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_outage_of_ten_seconds_delays_the_webhook_but_loses_nothing() {
    let addr = free_addr();
    let url = format!("http://{addr}/provision");
    let orchestrator = Orchestrator::start(&webhook_config(&url)).await.unwrap();
    let (victim, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let (_survivor, _) = orchestrator.connected_agent(&[]).await.unwrap();

    let mut events = orchestrator.watch_events().await.unwrap();
    victim.process.signal(Sig::SIGKILL);
    let failed = |event: &pb::FleetEvent| event.r#type() == FleetEventType::WebhookFailed;
    let first_failure = next_event_matching(&mut events, DELIVERY, failed).await.unwrap();
    let id = webhook_of(&first_failure);
    // The outage: the receiver stays down until the orchestrator has reported a
    // failed attempt at least ten seconds after its first one.
    let outage = Duration::from_secs(10);
    let first_at = event_time(&first_failure);
    let mut failed_attempts = 1;
    let last_failure = loop {
        let failure = next_event_matching(&mut events, outage + DELIVERY, failed)
            .await
            .unwrap();
        failed_attempts += 1;
        if event_time(&failure).duration_since(first_at).unwrap_or_default() >= outage {
            break failure;
        }
    };
    assert_eq!(webhook_of(&last_failure), id, "one webhook, retried");
    assert_eq!(
        last_failure.webhook.as_ref().map(|webhook| webhook.attempt),
        Some(failed_attempts),
        "attempts are numbered"
    );
    assert!(orchestrator.metric("orchestrator_webhook_outbox_depth").await >= 1.0);
    let receiver = WebhookReceiver::start(addr, &[]).await.unwrap();

    let delivered = next_event_matching(&mut events, DELIVERY, |event| {
        event.r#type() == FleetEventType::WebhookDelivered
    })
    .await
    .unwrap();
    assert_eq!(webhook_of(&delivered), id);
    let events = receiver
        .wait_for_events("UNEXPECTED_NODE_FAILURE", 1, DELIVERY)
        .await;
    assert_eq!(events[0]["webhook_id"], id.as_str());
    assert_eq!(events[0]["payload"]["failed_node_id"], victim.id());
    orchestrator.wait_outbox_drained(DELIVERY).await;
    assert_eq!(receiver.events().len(), 1);
    assert!(
        failed_attempts >= 3,
        "only {failed_attempts} failed attempts in 10 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_webhooks_and_nodes_lost_meanwhile_survive_an_orchestrator_sigkill() {
    let addr = free_addr();
    let url = format!("http://{addr}/provision");
    let mut first = Orchestrator::start(&webhook_config(&url)).await.unwrap();
    let (before, _) = first.connected_agent(&FAST_RECONNECT).await.unwrap();
    let (mut during, _) = first.connected_agent(&FAST_RECONNECT).await.unwrap();
    let (survivor, _) = first.connected_agent(&FAST_RECONNECT).await.unwrap();

    // A failure whose webhook cannot be delivered (the receiver is down).
    let mut events = first.watch_events().await.unwrap();
    before.process.signal(Sig::SIGKILL);
    let failed = next_event_matching(&mut events, DELIVERY, |event| {
        event.r#type() == FleetEventType::WebhookFailed
    })
    .await
    .unwrap();
    let queued_id = webhook_of(&failed);
    assert_eq!(
        failed.webhook.as_ref().map(|webhook| webhook.reason.as_str()),
        Some("UNEXPECTED_NODE_FAILURE")
    );

    // The orchestrator dies; a node dies while it is down.
    first.process.kill(STARTUP).await.unwrap();
    during.process.kill(STARTUP).await.unwrap();

    let receiver = WebhookReceiver::start(addr, &[]).await.unwrap();
    let second = first.restart().await.unwrap();
    second.wait_all_connected([&survivor], STARTUP).await;
    let events = receiver
        .wait_for_events("UNEXPECTED_NODE_FAILURE", 2, DELIVERY)
        .await;
    second.wait_outbox_drained(DELIVERY).await;

    let mut failed: Vec<(String, String)> = events
        .iter()
        .map(|event| {
            (
                event["payload"]["failed_node_id"].as_str().unwrap().to_owned(),
                event["webhook_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    failed.sort();
    let mut expected = vec![before.id(), during.id()];
    expected.sort();
    assert_eq!(
        failed.iter().map(|(node, _)| node.clone()).collect::<Vec<_>>(),
        expected,
        "each lost node is healed exactly once"
    );
    assert!(
        failed
            .iter()
            .any(|(node, id)| *node == before.id() && *id == queued_id),
        "the webhook queued before the crash is delivered with its original id"
    );
    assert_eq!(receiver.events().len(), 2);
    let mut fleet = second.fleet().await.unwrap();
    let lost = wait_for_state(&mut fleet, &during.id(), NodeState::Failed, STARTUP).await;
    assert!(
        lost.state_reason.contains("did not reconnect"),
        "{}",
        lost.state_reason
    );
    wait_for_state(&mut fleet, &survivor.id(), NodeState::Connected, STARTUP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_most_of_the_fleet_raises_one_alert_and_heals_within_the_budget() {
    let receiver = WebhookReceiver::start(any_addr(), &[]).await.unwrap();
    let budget = 2;
    let config = format!(
        "{}max_self_healing_per_hour = {budget}\n",
        webhook_config(&receiver.url())
    );
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let mut agents = Vec::new();
    for _ in 0..5 {
        agents.push(orchestrator.connected_agent(&[]).await.unwrap().0);
    }
    let mut fleet = orchestrator.fleet().await.unwrap();

    for agent in &agents[1..] {
        agent.process.signal(Sig::SIGKILL);
    }
    for agent in &agents[1..] {
        wait_for_state(&mut fleet, &agent.id(), NodeState::Failed, STARTUP).await;
    }
    receiver.wait_for_events("MASS_NODE_FAILURE", 1, DELIVERY).await;
    orchestrator.wait_outbox_drained(DELIVERY).await;

    let alerts = receiver.events_with_reason("MASS_NODE_FAILURE");
    assert_eq!(alerts.len(), 1, "one alert: {alerts:#?}");
    let listed = alerts[0]["payload"]["failed_nodes"].as_array().unwrap().len();
    assert!((3..=4).contains(&listed), "{listed}");
    let healed = receiver.events_with_reason("UNEXPECTED_NODE_FAILURE").len();
    assert!(healed <= budget, "{healed} heals exceed the budget of {budget}");
    let held: f64 = eventually(STARTUP, "four failures accounted for", || async {
        let text = orchestrator.metrics().await.ok()?;
        let held: f64 = text
            .lines()
            .filter(|line| line.starts_with("orchestrator_self_healing_held_total{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (held as usize + healed == 4).then_some(held)
    })
    .await;
    assert!(held >= 2.0, "{held}");
    orchestrator
        .assert_metric("orchestrator_mass_failure_alerts_total", 1.0)
        .await;
    // The one survivor is untouched.
    wait_for_state(&mut fleet, &agents[0].id(), NodeState::Connected, STARTUP).await;
}
