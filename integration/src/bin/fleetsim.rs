//! `secbeat-fleetsim`: many virtual agents speaking the real AgentService
//! protocol against a real orchestrator, with fault injection, reporting what an
//! operator would want to know about the orchestrator at that scale.
//!
//! Each virtual agent sends Hello, waits for Welcome, then a CPU sample and a
//! heartbeat every heartbeat interval (the orchestrator's, from Welcome, unless
//! `--heartbeat-interval` overrides it). Agents get their own HTTP/2 connection
//! by default, spread over 127.0.0.x source addresses so ephemeral ports do not
//! run out; `--streams-per-connection K` multiplexes K agents per connection.
//!
//! Faults, injected halfway through `--duration`: `--kill K` drops K agents'
//! connections abruptly (a crash), `--stall K` keeps K streams open but silent (a
//! hang). The run watches the orchestrator's events and reports detection latency
//! per fault, and every failure of an agent that was healthy (`false_failures`).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use secbeat::pb::{
    self, FleetEventType, agent_message::Kind, agent_service_client::AgentServiceClient, control_message,
    fleet_service_client::FleetServiceClient,
};
use secbeat_integration::{process_cpu_time, process_rss};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

/// Simulates a fleet of agents against a real orchestrator.
#[derive(Debug, clap::Parser)]
#[command(name = "secbeat-fleetsim", version)]
struct Args {
    /// Orchestrator gRPC URL
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    orchestrator: String,
    /// Virtual agents
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// How long to run, seconds (faults are injected halfway)
    #[arg(long, default_value_t = 30.0, value_parser = parse_secs)]
    duration: f64,
    /// Agents multiplexed per HTTP/2 connection (1: each its own connection)
    #[arg(long, default_value_t = 1)]
    streams_per_connection: usize,
    /// Heartbeat interval, seconds (default: the orchestrator's, from Welcome)
    #[arg(long)]
    heartbeat_interval: Option<f64>,
    /// Constant CPU fraction every agent reports
    #[arg(long, default_value_t = 0.3)]
    cpu: f64,
    /// Agents whose connections are dropped abruptly halfway (crash)
    #[arg(long, default_value_t = 0)]
    kill: usize,
    /// Agents that go silent halfway, their streams left open (hang)
    #[arg(long, default_value_t = 0)]
    stall: usize,
    /// Connections opened at once while ramping up
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// The orchestrator's pid, to report its CPU and RSS from /proc
    #[arg(long)]
    orchestrator_pid: Option<u32>,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

fn parse_secs(text: &str) -> Result<f64, String> {
    let trimmed = text.trim_end_matches('s');
    trimmed.parse::<f64>().map_err(|e| format!("{text}: {e}"))
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    messages: AtomicU64,
    refused: AtomicU64,
}

/// What a virtual agent is told halfway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Healthy,
    Kill,
    Stall,
}

fn main() -> ExitCode {
    let args = match secbeat::process::parse_args::<Args>() {
        Ok(args) => args,
        Err(exit) => return exit,
    };
    let runtime = match secbeat::process::runtime(2) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("secbeat-fleetsim: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("secbeat-fleetsim: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.kill + args.stall <= args.agents,
        "--kill + --stall exceed --agents"
    );
    anyhow::ensure!(
        args.streams_per_connection >= 1,
        "--streams-per-connection must be at least 1"
    );
    let counters = Arc::new(Counters::default());
    let ids: Vec<Uuid> = (0..args.agents).map(|_| Uuid::new_v4()).collect();
    let fates: HashMap<Uuid, Fate> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let fate = if i < args.kill {
                Fate::Kill
            } else if i < args.kill + args.stall {
                Fate::Stall
            } else {
                Fate::Healthy
            };
            (*id, fate)
        })
        .collect();

    // Watch failures from the start.
    let watch_channel = Endpoint::from_shared(args.orchestrator.clone())?
        .connect()
        .await?;
    let mut events = FleetServiceClient::new(watch_channel)
        .watch_events(pb::WatchEventsRequest {})
        .await?
        .into_inner();
    let failures: Arc<Mutex<Vec<(String, SystemTime)>>> = Arc::default();
    let sink = failures.clone();
    tokio::spawn(async move {
        while let Ok(Some(event)) = events.message().await {
            if event.r#type() == FleetEventType::NodeFailed
                && let Some(time) = event.time
            {
                let at = SystemTime::UNIX_EPOCH + Duration::new(time.seconds as u64, time.nanos as u32);
                sink.lock().expect("lock").push((event.node_id, at));
            }
        }
    });

    let cpu_before = args.orchestrator_pid.map(process_cpu_time);
    let started = Instant::now();
    let (fault_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let mut channels: Vec<Channel> = Vec::new();
    let mut tasks = Vec::with_capacity(args.agents);
    for (index, id) in ids.iter().enumerate() {
        let connection = index / args.streams_per_connection;
        if connection == channels.len() {
            // 127.0.0.1 .. 127.0.0.250 as source addresses: ~28k ports each.
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, (connection % 250 + 1) as u8));
            let endpoint = Endpoint::from_shared(args.orchestrator.clone())?
                .local_address(Some(source))
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(10));
            channels.push(endpoint.connect_lazy());
        }
        let channel = channels[connection].clone();
        let agent = VirtualAgent {
            id: *id,
            fate: fates[id],
            cpu: args.cpu,
            interval: args.heartbeat_interval.map(Duration::from_secs_f64),
            counters: counters.clone(),
            gate: gate.clone(),
        };
        tasks.push(tokio::spawn(agent.run(channel, fault_tx.subscribe())));
    }

    let half = Duration::from_secs_f64(args.duration / 2.0);
    tokio::time::sleep(half.saturating_sub(started.elapsed())).await;
    let connected_before_faults = counters.connected.load(Ordering::Relaxed);
    let messages_at_half = counters.messages.load(Ordering::Relaxed);
    let half_at = Instant::now();
    let fault_time = SystemTime::now();
    let _ = fault_tx.send(());
    tokio::time::sleep(Duration::from_secs_f64(args.duration).saturating_sub(started.elapsed())).await;
    let rate = (counters.messages.load(Ordering::Relaxed) - messages_at_half) as f64
        / half_at.elapsed().as_secs_f64().max(1e-9);

    let failures = failures.lock().expect("lock").clone();
    let mut false_failures = 0;
    let mut crash = Vec::new();
    let mut hang = Vec::new();
    for (node, at) in &failures {
        let Some(fate) = Uuid::parse_str(node).ok().and_then(|id| fates.get(&id)) else {
            continue;
        };
        let latency = at.duration_since(fault_time).unwrap_or_default();
        match fate {
            Fate::Healthy => false_failures += 1,
            Fate::Kill => crash.push(latency),
            Fate::Stall => hang.push(latency),
        }
    }
    let (cpu, rss) = match (args.orchestrator_pid, cpu_before) {
        (Some(pid), Some(before)) => {
            let used = process_cpu_time(pid).saturating_sub(before).as_secs_f64();
            (Some(used / started.elapsed().as_secs_f64()), process_rss(pid))
        }
        _ => (None, None),
    };
    for task in tasks {
        task.abort();
    }
    let report = json!({
        "agents": args.agents,
        "streams_per_connection": args.streams_per_connection,
        "connections": channels.len(),
        "connected": connected_before_faults,
        "refused": counters.refused.load(Ordering::Relaxed),
        "messages_per_second": rate.round(),
        "false_failures": false_failures,
        "crash_detection": latency_summary(&mut crash, args.kill),
        "hang_detection": latency_summary(&mut hang, args.stall),
        "orchestrator_cpu_share_of_one_core": cpu,
        "orchestrator_rss_bytes": rss,
        "orchestrator_rss_bytes_per_agent": rss.map(|rss| rss / args.agents.max(1) as u64),
    });
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn latency_summary(samples: &mut [Duration], injected: usize) -> serde_json::Value {
    if samples.is_empty() {
        return json!({ "injected": injected, "detected": 0 });
    }
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize].as_secs_f64();
    json!({
        "injected": injected,
        "detected": samples.len(),
        "p50_s": at(0.5),
        "p99_s": at(0.99),
        "max_s": samples[samples.len() - 1].as_secs_f64(),
    })
}

struct VirtualAgent {
    id: Uuid,
    fate: Fate,
    cpu: f64,
    interval: Option<Duration>,
    counters: Arc<Counters>,
    gate: Arc<Semaphore>,
}

impl VirtualAgent {
    async fn run(self, channel: Channel, mut fault: tokio::sync::broadcast::Receiver<()>) {
        let (outbound, requests) = mpsc::channel(8);
        let hello = pb::Hello {
            node_id: self.id.to_string(),
            hostname: format!("sim-{}", &self.id.to_string()[..8]),
            ip: String::new(),
            agent_version: "fleetsim".into(),
            labels: Default::default(),
        };
        let _ = outbound.send(message(Kind::Hello(hello))).await;
        let opened = {
            let _permit = self.gate.acquire().await.expect("never closed");
            AgentServiceClient::new(channel)
                .connect(ReceiverStream::new(requests))
                .await
        };
        let Ok(response) = opened else {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut inbound = response.into_inner();
        let Ok(Some(pb::ControlMessage {
            kind: Some(control_message::Kind::Welcome(welcome)),
        })) = inbound.message().await
        else {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.counters.connected.fetch_add(1, Ordering::Relaxed);
        let given = welcome
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::from_secs(10));
        let mut ticks = tokio::time::interval(self.interval.unwrap_or(given));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sequence = 0;
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    sequence += 1;
                    let sample = pb::CpuSample { time: None, usage: self.cpu };
                    let samples = message(Kind::CpuSamples(pb::CpuSamples { samples: vec![sample] }));
                    if outbound.send(samples).await.is_err()
                        || outbound.send(message(Kind::Heartbeat(pb::Heartbeat { sequence }))).await.is_err()
                    {
                        return;
                    }
                    self.counters.messages.fetch_add(2, Ordering::Relaxed);
                }
                _ = fault.recv(), if self.fate != Fate::Healthy => match self.fate {
                    // Dropping the stream and its sender resets it without a
                    // goodbye: to the orchestrator, a crash.
                    Fate::Kill => return,
                    // Silent but open: keep the stream, send nothing, read nothing.
                    Fate::Stall => {
                        let _keep = (outbound, inbound);
                        std::future::pending::<()>().await;
                        return;
                    }
                    Fate::Healthy => unreachable!("guarded"),
                },
                command = inbound.message() => if !matches!(command, Ok(Some(_))) {
                    return;
                },
            }
        }
    }
}

fn message(kind: Kind) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind) }
}
