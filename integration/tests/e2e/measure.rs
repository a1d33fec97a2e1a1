//! Measurements, not assertions: run on demand and copied into BENCHMARKS.md.
//!
//! `cargo nextest run -p secbeat-integration --run-ignored only -E 'test(measure_)' --no-capture`
//!
//! Latencies are from the signal to the orchestrator's own event timestamp (same
//! host clock), so they are not limited by any polling interval.

use std::time::{Duration, SystemTime};

use secbeat::pb::{self, FleetEventType, NodeState};
use secbeat_integration::{
    FAST_CONFIG, FAST_RECONNECT, Orchestrator, Sig, WebhookReceiver, next_event_matching, wait_for_state,
    webhook_config,
};

const ROUNDS: usize = 30;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "MEASURE {what}: n={} min={:?} p50={:?} p99={:?} max={:?}",
        samples.len(),
        samples[0],
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1]
    );
}

fn event_time(event: &pb::FleetEvent) -> SystemTime {
    let time = event.time.expect("event time");
    SystemTime::UNIX_EPOCH + Duration::new(time.seconds as u64, time.nanos as u32)
}

async fn detection(signal: Sig) -> Vec<Duration> {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();
    let mut events = orchestrator.watch_events().await.unwrap();
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let agent = orchestrator.agent(&[]).unwrap();
        wait_for_state(
            &mut fleet,
            &agent.id(),
            NodeState::Connected,
            Duration::from_secs(10),
        )
        .await;
        let sent = SystemTime::now();
        agent.process.signal(signal);
        let failed = next_event_matching(&mut events, Duration::from_secs(10), |e| {
            e.r#type() == FleetEventType::NodeFailed && e.node_id == agent.id()
        })
        .await
        .unwrap();
        samples.push(event_time(&failed).duration_since(sent).unwrap());
        if signal == Sig::SIGSTOP {
            agent.process.signal(Sig::SIGKILL);
        }
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run on demand"]
async fn measure_crash_detection_sigkill() {
    report(
        "sigkill->FAILED (heartbeat 0.2s, timeout 1s, checks 0.2s x2)",
        detection(Sig::SIGKILL).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run on demand"]
async fn measure_silence_detection_sigstop() {
    report(
        "sigstop->FAILED (heartbeat 0.2s, timeout 1s, checks 0.2s x2)",
        detection(Sig::SIGSTOP).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run on demand"]
async fn measure_reconnect_after_orchestrator_restart() {
    const AGENTS: usize = 50;
    let mut orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let agents: Vec<_> = (0..AGENTS)
        .map(|_| orchestrator.agent(&FAST_RECONNECT).unwrap())
        .collect();
    orchestrator
        .wait_all_connected(&agents, Duration::from_secs(30))
        .await;
    let mut samples = Vec::new();
    for _ in 0..5 {
        orchestrator.process.kill(Duration::from_secs(5)).await.unwrap();
        let down = std::time::Instant::now();
        orchestrator = orchestrator.restart().await.unwrap();
        orchestrator
            .wait_all_connected(&agents, Duration::from_secs(30))
            .await;
        samples.push(down.elapsed());
    }
    report(
        &format!("orchestrator SIGKILL+restart -> all {AGENTS} agents CONNECTED (backoff 0.05..0.5s)"),
        samples,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run on demand"]
async fn measure_crash_to_webhook() {
    const KILLS: usize = 100;
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap(), &[])
        .await
        .unwrap();
    // Limits out of the way: this measures the path, not the budget.
    let config = format!(
        "{}max_self_healing_per_hour = 100000\nmass_failure_fraction = 1.0\n",
        webhook_config(&receiver.url())
    );
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let mut samples = Vec::with_capacity(KILLS);
    for round in 0..KILLS {
        let (agent, _) = orchestrator.connected_agent(&[]).await.unwrap();
        let killed = SystemTime::now();
        agent.process.signal(Sig::SIGKILL);
        let events = receiver
            .wait_for_events("UNEXPECTED_NODE_FAILURE", round + 1, Duration::from_secs(20))
            .await;
        let event = events
            .iter()
            .find(|event| event["payload"]["failed_node_id"] == agent.id())
            .expect("this agent's webhook");
        let received = chrono::DateTime::parse_from_rfc3339(event["received_at"].as_str().unwrap()).unwrap();
        let received = SystemTime::from(received);
        samples.push(received.duration_since(killed).unwrap());
    }
    report(
        "sigkill -> UNEXPECTED_NODE_FAILURE webhook recorded by the receiver (heartbeat 0.2s, timeout 1s, checks 0.2s x2)",
        samples,
    );
}
