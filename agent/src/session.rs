//! One control stream to the orchestrator, from Hello to its end.
//!
//! Hello -> Welcome (sets the heartbeat interval) -> every interval one CpuSamples
//! and one Heartbeat. On Terminate: TerminateAck, the `--on-terminate` hook bounded
//! by the grace period (heartbeats continue meanwhile), Goodbye("terminated"), and
//! the session ends as [`SessionEnd::Terminated`]. On shutdown (SIGTERM/SIGINT):
//! Goodbye("shutdown") and [`SessionEnd::ShutDown`].

use std::{
    pin::Pin,
    time::{Duration, Instant, SystemTime},
};

use secbeat::{
    pb::{self, agent_message::Kind, agent_service_client::AgentServiceClient, control_message},
    wire,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming, transport::Endpoint};
use tracing::Instrument;

use crate::metrics::AgentMetrics;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::{cpu::CpuSource, recover::Recovery};

/// Shortest heartbeat interval the agent accepts from a Welcome.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(20);
/// How long to wait for the orchestrator to close the stream after Goodbye.
const GOODBYE_LINGER: Duration = Duration::from_secs(2);

/// Everything a session needs that does not change between sessions.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// The orchestrator, validated and configured (URL, connect timeout).
    pub endpoint: Endpoint,
    /// This node's id.
    pub node_id: Uuid,
    /// Host name reported in Hello.
    pub hostname: String,
    /// IP reported in Hello; empty lets the orchestrator use the peer address.
    pub ip: String,
    /// Labels reported in Hello.
    pub labels: Vec<(String, String)>,
    /// Shell command run on Terminate, bounded by the grace period.
    pub on_terminate: Option<String>,
    /// Bound on answering the Hello and on waiting for the Welcome (the endpoint
    /// carries the same bound for the TCP connect).
    pub connect_timeout: Duration,
}

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Told to terminate, hook done, goodbye sent: exit 0.
    Terminated,
    /// Shut down on a signal, goodbye sent: exit 0.
    ShutDown,
    /// Lost; `established` says whether a Welcome was received (resets backoff).
    Lost {
        /// Whether the session got as far as a Welcome.
        established: bool,
        /// What happened, for the log.
        cause: String,
    },
    /// The orchestrator refused this agent; retrying cannot help.
    Fatal(Status),
}

type Outbound = mpsc::Sender<pb::AgentMessage>;
type Hook = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs one session to its end.
pub async fn run(
    settings: &SessionSettings,
    cpu: &mut CpuSource,
    metrics: &AgentMetrics,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let lost = |cause: String| SessionEnd::Lost {
        established: false,
        cause,
    };
    let channel = tokio::select! {
        channel = settings.endpoint.connect() => match channel {
            Ok(channel) => channel,
            Err(error) => return lost(format!("connect: {error}")),
        },
        () = shutdown.cancelled() => return SessionEnd::ShutDown,
    };
    if shutdown.is_cancelled() {
        return SessionEnd::ShutDown;
    }
    // From the Hello on, the orchestrator may have registered this session, so every
    // way out must say Goodbye: the opening is bounded by the connect timeout instead
    // of racing the shutdown signal, and a shutdown that arrived meanwhile is handled
    // by the established session's first poll.
    let (outbound, requests) = mpsc::channel(32);
    let hello = pb::Hello {
        node_id: settings.node_id.to_string(),
        hostname: settings.hostname.clone(),
        ip: settings.ip.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        labels: settings.labels.iter().cloned().collect(),
    };
    let _ = outbound.send(message(Kind::Hello(hello))).await;
    let mut client = AgentServiceClient::new(channel);
    let mut request = tonic::Request::new(ReceiverStream::new(requests));
    // The orchestrator's side of this session joins this agent's trace.
    if let Some(traceparent) = secbeat::telemetry::current_traceparent()
        && let Ok(value) = traceparent.parse()
    {
        request.metadata_mut().insert("traceparent", value);
    }
    let opened = tokio::time::timeout(settings.connect_timeout, client.connect(request)).await;
    let mut inbound = match opened {
        Err(_) => return lost("no answer to hello in time".to_owned()),
        Ok(Err(status)) => return ended_by(status, false),
        Ok(Ok(response)) => response.into_inner(),
    };
    let welcome = match tokio::time::timeout(settings.connect_timeout, inbound.message()).await {
        Err(_) => return lost("no welcome in time".to_owned()),
        Ok(Err(status)) => return ended_by(status, false),
        Ok(Ok(None)) => return lost("stream ended before welcome".to_owned()),
        Ok(Ok(Some(pb::ControlMessage {
            kind: Some(control_message::Kind::Welcome(welcome)),
        }))) => welcome,
        Ok(Ok(Some(other))) => {
            return SessionEnd::Fatal(Status::internal(format!("expected welcome, got {other:?}")));
        }
    };
    let interval = match wire::duration_from_proto("welcome.heartbeat_interval", welcome.heartbeat_interval) {
        Ok(interval) => interval.max(MIN_HEARTBEAT_INTERVAL),
        Err(error) => return SessionEnd::Fatal(Status::internal(error.to_string())),
    };
    info!(
        session = welcome.session_id,
        heartbeat_interval_s = interval.as_secs_f64(),
        "connected"
    );
    metrics.sessions_established.inc();
    metrics.connected.set(1);
    let end = Established {
        outbound,
        inbound,
        interval,
        session: welcome.session_id,
    }
    .run(settings, cpu, metrics, shutdown)
    .await;
    metrics.connected.set(0);
    end
}

struct Established {
    outbound: Outbound,
    inbound: Streaming<pb::ControlMessage>,
    interval: Duration,
    session: u64,
}

impl Established {
    async fn run(
        mut self,
        settings: &SessionSettings,
        cpu: &mut CpuSource,
        metrics: &AgentMetrics,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let lost = |cause: String| SessionEnd::Lost {
            established: true,
            cause,
        };
        let mut ticker = tokio::time::interval(self.interval);
        // After a stall (SIGSTOP, overload) send one heartbeat, not a burst.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sequence = 0u64;
        let mut hook: Option<Hook> = None;
        loop {
            tokio::select! {
                // A pending shutdown goes before anything else: its goodbye is what
                // keeps a deliberate stop from looking like a crash.
                biased;
                () = shutdown.cancelled() => {
                    let reason = if hook.is_some() { "terminated" } else { "shutdown" };
                    let session = self.session;
                    self.goodbye(reason).await;
                    info!(session, reason, "goodbye sent");
                    return if hook.is_some() { SessionEnd::Terminated } else { SessionEnd::ShutDown };
                }
                _ = ticker.tick() => {
                    sequence += 1;
                    if let Some(usage) = cpu.sample(Instant::now()) {
                        let sample = pb::CpuSample { time: Some(wire::timestamp_to_proto(SystemTime::now())), usage };
                        let batch = pb::CpuSamples { samples: vec![sample] };
                        if self.outbound.send(message(Kind::CpuSamples(batch))).await.is_err() {
                            return lost("stream closed".to_owned());
                        }
                        metrics.cpu_samples_sent.inc();
                        metrics.cpu_usage.set(usage);
                    }
                    if self.outbound.send(message(Kind::Heartbeat(pb::Heartbeat { sequence }))).await.is_err() {
                        return lost("stream closed".to_owned());
                    }
                    metrics.heartbeats_sent.inc();
                }
                command = self.inbound.message() => match command {
                    Ok(Some(pb::ControlMessage { kind: Some(control_message::Kind::Terminate(terminate)) })) => {
                        if hook.is_some() {
                            debug!("terminate repeated; already shutting down");
                            continue;
                        }
                        metrics.terminates_received.inc();
                        let grace = wire::duration_from_proto("terminate.grace_period", terminate.grace_period)
                            .unwrap_or(Duration::ZERO);
                        // The shutdown is part of the trace of whoever asked for it.
                        let span = tracing::info_span!("agent_terminate", node.id = %settings.node_id, reason = %terminate.reason);
                        if !terminate.traceparent.is_empty() {
                            secbeat::telemetry::set_parent(&span, &terminate.traceparent);
                        }
                        span.in_scope(|| info!(reason = %terminate.reason, grace_s = grace.as_secs_f64(), "terminate received: shutting down gracefully"));
                        let ack = pb::TerminateAck { reason: terminate.reason.clone() };
                        let _ = self.outbound.send(message(Kind::TerminateAck(ack))).await;
                        let command = settings.on_terminate.clone();
                        hook = Some(Box::pin(async move {
                            crate::hook::run(command.as_deref(), &terminate.reason, grace).await;
                        }.instrument(span)));
                    }
                    Ok(Some(pb::ControlMessage { kind: Some(control_message::Kind::Welcome(_)) })) => {
                        warn!("unexpected second welcome ignored");
                    }
                    // A command from a newer orchestrator that this agent does not know.
                    Ok(Some(pb::ControlMessage { kind: None })) => debug!("unknown command ignored"),
                    Ok(None) | Err(_) if hook.is_some() => {
                        // Acknowledged already: finish the shutdown even without a stream.
                        if let Some(hook) = hook.take() {
                            hook.await;
                        }
                        info!("terminated (stream ended during graceful shutdown)");
                        return SessionEnd::Terminated;
                    }
                    Ok(None) => return lost("orchestrator ended the stream".to_owned()),
                    Err(status) => return ended_by(status, true),
                },
                () = async { hook.as_mut().expect("guarded").await }, if hook.is_some() => {
                    self.goodbye("terminated").await;
                    info!("terminated as commanded: exiting");
                    return SessionEnd::Terminated;
                }
            }
        }
    }

    /// Sends Goodbye, half-closes, and waits (briefly) for the orchestrator to end
    /// the stream, so the goodbye is known to have arrived before the process exits.
    async fn goodbye(self, reason: &str) {
        let Established {
            outbound,
            mut inbound,
            ..
        } = self;
        let _ = outbound
            .send(message(Kind::Goodbye(pb::Goodbye {
                reason: reason.to_owned(),
            })))
            .await;
        drop(outbound);
        let drained = tokio::time::timeout(GOODBYE_LINGER, async {
            while let Ok(Some(_)) = inbound.message().await {}
        });
        if drained.await.is_err() {
            warn!("orchestrator did not close the stream after goodbye");
        }
    }
}

fn ended_by(status: Status, established: bool) -> SessionEnd {
    match crate::recover::classify(status.code()) {
        Recovery::Fatal => SessionEnd::Fatal(status),
        Recovery::Retry => SessionEnd::Lost {
            established,
            cause: format!("{:?}: {}", status.code(), status.message()),
        },
    }
}

fn message(kind: Kind) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind) }
}
