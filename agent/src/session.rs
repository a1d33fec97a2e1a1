//! One control stream to the orchestrator, from Hello to its end.
//!
//! Hello -> Welcome (sets the heartbeat interval) -> every interval one Heartbeat
//! carrying the interval's CPU sample (to an older orchestrator, whose Welcome
//! does not say `heartbeat_carries_cpu`: a CpuSamples and a Heartbeat). On Terminate: TerminateAck, the `--on-terminate` hook bounded
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

use crate::{cpu::CpuSource, hook::HookKind, recover::Recovery};

/// Shortest heartbeat interval the agent accepts from a Welcome.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(20);
/// The metadata entry in which a standby orchestrator names the leader.
const LEADER_METADATA: &str = "secbeat-leader";
/// The metadata entry in which a standby says when leadership can move (ms).
const RETRY_AFTER_METADATA: &str = "secbeat-retry-after-ms";
/// How long to wait for the orchestrator to close the stream after Goodbye.
const GOODBYE_LINGER: Duration = Duration::from_secs(2);

/// Everything a session needs that does not change between sessions.
#[derive(Debug, Clone)]
pub struct SessionSettings {
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
    /// Shell command run on Drain (withdraw the route), bounded by its deadline.
    pub on_drain: Option<String>,
    /// Shell command run on Resume (announce the route), bounded by its deadline.
    pub on_resume: Option<String>,
    /// The host's boot, told in every Hello.
    pub boot: crate::boot::Boot,
    /// Bound on answering the Hello and on waiting for the Welcome (the endpoint
    /// carries the same bound for the TCP connect).
    pub connect_timeout: Duration,
    /// The orchestrator's agent token, if it wants one.
    pub token: Option<crate::args::AgentToken>,
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
        /// The leader's URL, when a standby named it (`secbeat-leader`).
        leader: Option<String>,
        /// When leadership can move, when a standby said (`secbeat-retry-after-ms`).
        retry_after: Option<Duration>,
    },
    /// The orchestrator refused this agent; retrying cannot help.
    Fatal(Status),
}

type Outbound = mpsc::Sender<pb::AgentMessage>;
type Hook = Pin<Box<dyn Future<Output = ()> + Send>>;
/// A running drain or resume hook, and what it reports when done.
type ServiceHook = Pin<Box<dyn Future<Output = pb::AgentMessage> + Send>>;

/// The time a drain or resume hook gets: its deadline, less a little (a tenth,
/// at most a second) so that the report reaches the orchestrator before it gives up.
fn hook_limit(deadline: Duration) -> Duration {
    deadline.saturating_sub((deadline / 10).min(Duration::from_secs(1)))
}

/// Runs a drain or resume hook and builds the report the orchestrator waits for.
fn service_hook(kind: HookKind, command: Option<String>, reason: String, deadline: Duration) -> ServiceHook {
    Box::pin(async move {
        let limit = hook_limit(deadline);
        let outcome = crate::hook::run(kind, command.as_deref(), &reason, limit).await;
        let result = pb::HookResult {
            success: outcome.success(),
            detail: outcome.describe(kind, limit),
        };
        match kind {
            HookKind::Resume => message(Kind::ResumeResult(result)),
            _ => message(Kind::DrainResult(result)),
        }
    })
}

/// Runs one session to its end.
pub async fn run(
    endpoint: &Endpoint,
    settings: &SessionSettings,
    last_disconnect: &str,
    cpu: &mut CpuSource,
    metrics: &AgentMetrics,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let lost = |cause: String| SessionEnd::Lost {
        established: false,
        cause,
        leader: None,
        retry_after: None,
    };
    let channel = tokio::select! {
        channel = endpoint.connect() => match channel {
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
        boot_id: settings.boot.id.clone().unwrap_or_default(),
        boot_time: settings.boot.time.map(wire::timestamp_to_proto),
        last_disconnect: last_disconnect.chars().take(256).collect(),
    };
    let _ = outbound.send(message(Kind::Hello(hello))).await;
    let mut client = AgentServiceClient::new(channel);
    let mut request = tonic::Request::new(ReceiverStream::new(requests));
    if let Some(token) = &settings.token
        && let Ok(value) = format!("Bearer {}", token.0).parse()
    {
        request.metadata_mut().insert("authorization", value);
    }
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
        heartbeat_carries_cpu: welcome.heartbeat_carries_cpu,
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
    /// The orchestrator reads a sample inside the heartbeat (Welcome said so).
    heartbeat_carries_cpu: bool,
}

/// What one interval sends: a heartbeat carrying the sample to an orchestrator
/// that reads it, else (an older orchestrator) the sample as a CpuSamples first
/// and then a bare heartbeat.
fn interval_messages(
    sequence: u64,
    sample: Option<pb::CpuSample>,
    heartbeat_carries_cpu: bool,
) -> Vec<pb::AgentMessage> {
    if heartbeat_carries_cpu {
        return vec![message(Kind::Heartbeat(pb::Heartbeat {
            sequence,
            cpu: sample,
        }))];
    }
    let mut messages = Vec::with_capacity(2);
    if let Some(sample) = sample {
        messages.push(message(Kind::CpuSamples(pb::CpuSamples {
            samples: vec![sample],
        })));
    }
    messages.push(message(Kind::Heartbeat(pb::Heartbeat { sequence, cpu: None })));
    messages
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
            leader: None,
            retry_after: None,
        };
        let mut ticker = tokio::time::interval(self.interval);
        // After a stall (SIGSTOP, overload) send one heartbeat, not a burst.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sequence = 0u64;
        let mut hook: Option<Hook> = None;
        // At most one drain or resume hook at a time: a newer command replaces
        // (and so kills) the older one's process group.
        let mut service: Option<ServiceHook> = None;
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
                    let sample = cpu.sample(Instant::now()).map(|usage| {
                        metrics.cpu_samples_sent.inc();
                        metrics.cpu_usage.set(usage);
                        pb::CpuSample { time: Some(wire::timestamp_to_proto(SystemTime::now())), usage }
                    });
                    for beat in interval_messages(sequence, sample, self.heartbeat_carries_cpu) {
                        if self.outbound.send(beat).await.is_err() {
                            return lost("stream closed".to_owned());
                        }
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
                            crate::hook::run(HookKind::Terminate, command.as_deref(), &terminate.reason, grace).await;
                        }.instrument(span)));
                    }
                    Ok(Some(pb::ControlMessage { kind: Some(control_message::Kind::Drain(drain)) })) => {
                        let deadline = wire::duration_from_proto("drain.deadline", drain.deadline)
                            .unwrap_or(Duration::from_secs(60));
                        info!(reason = %drain.reason, deadline_s = deadline.as_secs_f64(), "drain received: taking the node out of service");
                        service = Some(service_hook(HookKind::Drain, settings.on_drain.clone(), drain.reason, deadline));
                    }
                    Ok(Some(pb::ControlMessage { kind: Some(control_message::Kind::Resume(resume)) })) => {
                        let deadline = wire::duration_from_proto("resume.deadline", resume.deadline)
                            .unwrap_or(Duration::from_secs(60));
                        info!(reason = %resume.reason, "resume received: returning the node to service");
                        service = Some(service_hook(HookKind::Resume, settings.on_resume.clone(), resume.reason, deadline));
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
                report = async { service.as_mut().expect("guarded").await }, if service.is_some() => {
                    service = None;
                    debug!(?report, "hook done: reporting");
                    if self.outbound.send(report).await.is_err() {
                        return lost("stream closed".to_owned());
                    }
                }
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
            leader: status
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned),
            retry_after: status
                .metadata()
                .get(RETRY_AFTER_METADATA)
                .and_then(|value| value.to_str().ok()?.parse().ok())
                .map(Duration::from_millis),
        },
    }
}

fn message(kind: Kind) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    //! The session against a scripted orchestrator in this process (linkerd2-proxy's
    //! pattern): a real gRPC server on a loopback port whose every message the test
    //! writes by hand, so each step of the protocol is checked from the agent's side.

    use secbeat::pb::agent_service_server::{AgentService, AgentServiceServer};
    use tokio_stream::wrappers::TcpListenerStream;

    use super::*;

    type Control = mpsc::Sender<Result<pb::ControlMessage, Status>>;

    /// One accepted stream, handed to the test: what the agent sends, and where
    /// the test writes what the orchestrator says.
    struct Accepted {
        inbound: Streaming<pb::AgentMessage>,
        control: Control,
        authorization: Option<String>,
    }

    struct Scripted {
        accepted: mpsc::Sender<Accepted>,
    }

    #[tonic::async_trait]
    impl AgentService for Scripted {
        type ConnectStream = ReceiverStream<Result<pb::ControlMessage, Status>>;

        async fn connect(
            &self,
            request: tonic::Request<Streaming<pb::AgentMessage>>,
        ) -> Result<tonic::Response<Self::ConnectStream>, Status> {
            let (control, outbound) = mpsc::channel(16);
            let authorization = request
                .metadata()
                .get("authorization")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            let accepted = Accepted {
                inbound: request.into_inner(),
                control,
                authorization,
            };
            self.accepted
                .send(accepted)
                .await
                .map_err(|_| Status::unavailable("test over"))?;
            Ok(tonic::Response::new(ReceiverStream::new(outbound)))
        }
    }

    /// A scripted orchestrator on a free loopback port, and settings for an agent
    /// that talks to it.
    async fn scripted() -> (Endpoint, SessionSettings, mpsc::Receiver<Accepted>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, streams) = mpsc::channel(4);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(Scripted { accepted }))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let settings = SessionSettings {
            node_id: Uuid::new_v4(),
            hostname: "edge-test".into(),
            ip: "192.0.2.7".into(),
            labels: vec![("pop".into(), "fra1".into())],
            on_terminate: None,
            on_drain: None,
            on_resume: None,
            boot: crate::boot::Boot {
                id: Some("0c5b5d9e-5a0e-4a39-8d2f-6b8f7f3f2a11".into()),
                time: None,
            },
            connect_timeout: Duration::from_secs(5),
            token: None,
        };
        (
            Endpoint::from_shared(format!("http://{addr}")).unwrap(),
            settings,
            streams,
        )
    }

    /// The Welcome of an orchestrator that reads samples in heartbeats.
    fn welcome(interval: Duration) -> Result<pb::ControlMessage, Status> {
        welcome_from(interval, true)
    }

    /// The Welcome of an orchestrator from before `heartbeat_carries_cpu`.
    fn older_welcome(interval: Duration) -> Result<pb::ControlMessage, Status> {
        welcome_from(interval, false)
    }

    fn welcome_from(interval: Duration, heartbeat_carries_cpu: bool) -> Result<pb::ControlMessage, Status> {
        Ok(pb::ControlMessage {
            kind: Some(control_message::Kind::Welcome(pb::Welcome {
                session_id: 7,
                heartbeat_interval: Some(wire::duration_to_proto(interval)),
                node_id: String::new(),
                heartbeat_carries_cpu,
            })),
        })
    }

    async fn next(inbound: &mut Streaming<pb::AgentMessage>) -> Kind {
        inbound.message().await.unwrap().unwrap().kind.unwrap()
    }

    /// Starts the session on its own task; returns its end when it ends.
    fn start(
        endpoint: &Endpoint,
        settings: SessionSettings,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<SessionEnd> {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let mut cpu = CpuSource::Const(0.42);
            let metrics = AgentMetrics::new();
            run(
                &endpoint,
                &settings,
                "reset by peer",
                &mut cpu,
                &metrics,
                &shutdown,
            )
            .await
        })
    }

    #[tokio::test]
    async fn hello_then_samples_and_heartbeats_then_terminate_ack_and_goodbye() {
        let (endpoint, mut settings, mut streams) = scripted().await;
        settings.token = Some("agent-token-0123456789".parse().unwrap());
        let node_id = settings.node_id;
        let session = start(&endpoint, settings, CancellationToken::new());
        let Accepted {
            mut inbound,
            control,
            authorization,
        } = streams.recv().await.unwrap();
        assert_eq!(authorization.as_deref(), Some("Bearer agent-token-0123456789"));

        let Kind::Hello(hello) = next(&mut inbound).await else {
            panic!("the first message is the hello")
        };
        assert_eq!(hello.node_id, node_id.to_string());
        assert_eq!(
            (hello.hostname.as_str(), hello.ip.as_str()),
            ("edge-test", "192.0.2.7")
        );
        assert_eq!(hello.labels.get("pop").map(String::as_str), Some("fra1"));
        assert_eq!(hello.boot_id, "0c5b5d9e-5a0e-4a39-8d2f-6b8f7f3f2a11");
        assert_eq!(
            hello.last_disconnect, "reset by peer",
            "what ended the previous session"
        );

        control.send(welcome(Duration::from_millis(20))).await.unwrap();
        // Every interval: one heartbeat with the next sequence, carrying the sample.
        for sequence in 1..=3 {
            let Kind::Heartbeat(beat) = next(&mut inbound).await else {
                panic!("one heartbeat per interval, nothing else")
            };
            assert_eq!(beat.sequence, sequence);
            assert_eq!(beat.cpu.map(|sample| sample.usage), Some(0.42));
        }

        let terminate = pb::ControlMessage {
            kind: Some(control_message::Kind::Terminate(pb::Terminate {
                reason: "scale down".into(),
                grace_period: Some(wire::duration_to_proto(Duration::from_secs(1))),
                traceparent: String::new(),
            })),
        };
        control.send(Ok(terminate)).await.unwrap();
        let goodbye = loop {
            match next(&mut inbound).await {
                Kind::TerminateAck(ack) => assert_eq!(ack.reason, "scale down"),
                Kind::Goodbye(goodbye) => break goodbye,
                Kind::Heartbeat(_) | Kind::CpuSamples(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(goodbye.reason, "terminated");
        drop(control);
        assert!(matches!(session.await.unwrap(), SessionEnd::Terminated));
    }

    /// The next message that is not a heartbeat (they continue meanwhile).
    async fn next_besides_heartbeats(inbound: &mut Streaming<pb::AgentMessage>) -> Kind {
        loop {
            match next(inbound).await {
                Kind::Heartbeat(_) | Kind::CpuSamples(_) => {}
                other => return other,
            }
        }
    }

    fn command(kind: control_message::Kind) -> Result<pb::ControlMessage, Status> {
        Ok(pb::ControlMessage { kind: Some(kind) })
    }

    /// The next accepted stream, after its Hello and a Welcome (20 ms heartbeats).
    async fn welcomed(streams: &mut mpsc::Receiver<Accepted>) -> (Streaming<pb::AgentMessage>, Control) {
        let Accepted {
            mut inbound, control, ..
        } = streams.recv().await.unwrap();
        assert!(matches!(next(&mut inbound).await, Kind::Hello(_)));
        control.send(welcome(Duration::from_millis(20))).await.unwrap();
        (inbound, control)
    }

    /// Sends a Drain and returns the agent's report of it.
    async fn drain(
        control: &Control,
        inbound: &mut Streaming<pb::AgentMessage>,
        reason: &str,
        deadline: Duration,
    ) -> pb::HookResult {
        let drain = pb::Drain {
            reason: reason.into(),
            deadline: Some(wire::duration_to_proto(deadline)),
        };
        control
            .send(command(control_message::Kind::Drain(drain)))
            .await
            .unwrap();
        let Kind::DrainResult(result) = next_besides_heartbeats(inbound).await else {
            panic!("a drain result")
        };
        result
    }

    #[tokio::test]
    async fn drain_and_resume_run_their_hooks_and_report_while_heartbeats_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let withdrawn = dir.path().join("withdrawn");
        let (endpoint, mut settings, mut streams) = scripted().await;
        settings.on_drain = Some(format!(
            "echo \"$SECBEAT_DRAIN_REASON\" > {}",
            withdrawn.display()
        ));
        settings.on_resume = Some("echo no bgp daemon >&2; exit 4".into());
        let session = start(&endpoint, settings, CancellationToken::new());
        let (mut inbound, control) = welcomed(&mut streams).await;
        let result = drain(&control, &mut inbound, "kernel patch", Duration::from_secs(10)).await;
        assert!(result.success, "{}", result.detail);
        assert_eq!(result.detail, "on-drain hook finished");
        assert_eq!(
            std::fs::read_to_string(&withdrawn).unwrap().trim(),
            "kernel patch"
        );

        let resume = pb::Resume {
            reason: "patched".into(),
            deadline: Some(wire::duration_to_proto(Duration::from_secs(10))),
        };
        control
            .send(command(control_message::Kind::Resume(resume)))
            .await
            .unwrap();
        let Kind::ResumeResult(result) = next_besides_heartbeats(&mut inbound).await else {
            panic!("a resume result")
        };
        assert!(!result.success);
        assert_eq!(result.detail, "on-resume hook failed: exit status: 4");
        // Still connected and heartbeating: a drain is not a shutdown.
        assert!(matches!(next(&mut inbound).await, Kind::Heartbeat(_)));
        drop(control);
        assert!(matches!(session.await.unwrap(), SessionEnd::Lost { .. }));
    }

    #[tokio::test]
    async fn a_drain_hook_is_cut_short_of_its_deadline_so_the_report_arrives_in_time() {
        assert_eq!(hook_limit(Duration::from_secs(60)), Duration::from_secs(59));
        assert_eq!(hook_limit(Duration::from_secs(2)), Duration::from_millis(1800));
        let (endpoint, mut settings, mut streams) = scripted().await;
        settings.on_drain = Some("sleep 600".into());
        let _session = start(&endpoint, settings, CancellationToken::new());
        let (mut inbound, control) = welcomed(&mut streams).await;
        let result = drain(&control, &mut inbound, "x", Duration::from_millis(300)).await;
        assert!(!result.success);
        assert!(result.detail.contains("outlived"), "{}", result.detail);
    }

    #[tokio::test]
    async fn an_older_orchestrator_gets_the_sample_and_the_heartbeat_as_two_messages() {
        let (endpoint, settings, mut streams) = scripted().await;
        let _session = start(&endpoint, settings, CancellationToken::new());
        let Accepted {
            mut inbound, control, ..
        } = streams.recv().await.unwrap();
        assert!(matches!(next(&mut inbound).await, Kind::Hello(_)));
        control
            .send(older_welcome(Duration::from_millis(20)))
            .await
            .unwrap();
        // Every interval: the CPU sample, then a bare heartbeat with the next sequence.
        for sequence in 1..=3 {
            let Kind::CpuSamples(batch) = next(&mut inbound).await else {
                panic!("a cpu sample first")
            };
            assert_eq!(batch.samples[0].usage, 0.42);
            assert!(
                matches!(next(&mut inbound).await, Kind::Heartbeat(beat) if beat.sequence == sequence && beat.cpu.is_none())
            );
        }
    }

    #[test]
    fn an_interval_without_a_sample_still_sends_its_heartbeat() {
        for carries in [true, false] {
            let messages = interval_messages(4, None, carries);
            assert_eq!(messages.len(), 1, "carries_cpu={carries}");
            assert!(matches!(
                &messages[0].kind,
                Some(Kind::Heartbeat(pb::Heartbeat {
                    sequence: 4,
                    cpu: None
                }))
            ));
        }
    }

    #[tokio::test]
    async fn a_refusal_is_fatal_and_a_restart_is_a_lost_session() {
        let (endpoint, settings, mut streams) = scripted().await;
        let refused = start(&endpoint, settings.clone(), CancellationToken::new());
        let accepted = streams.recv().await.unwrap();
        accepted
            .control
            .send(Err(Status::permission_denied("certificate is for another node")))
            .await
            .unwrap();
        assert!(
            matches!(refused.await.unwrap(), SessionEnd::Fatal(status) if status.code() == tonic::Code::PermissionDenied)
        );

        let lost = start(&endpoint, settings, CancellationToken::new());
        let accepted = streams.recv().await.unwrap();
        accepted
            .control
            .send(welcome(Duration::from_secs(1)))
            .await
            .unwrap();
        accepted
            .control
            .send(Err(Status::unavailable("orchestrator shutting down")))
            .await
            .unwrap();
        match lost.await.unwrap() {
            SessionEnd::Lost {
                established, cause, ..
            } => {
                assert!(established, "the welcome had arrived");
                assert!(cause.contains("Unavailable"), "{cause}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_shutdown_says_goodbye_and_waits_for_the_orchestrator_to_close() {
        let (endpoint, settings, mut streams) = scripted().await;
        let shutdown = CancellationToken::new();
        let session = start(&endpoint, settings, shutdown.clone());
        let Accepted {
            mut inbound,
            control,
            authorization,
        } = streams.recv().await.unwrap();
        assert_eq!(authorization, None, "no token configured, none sent");
        assert!(matches!(next(&mut inbound).await, Kind::Hello(_)));
        control.send(welcome(Duration::from_secs(1))).await.unwrap();
        // The first tick fires at once: a heartbeat with its sample.
        assert!(matches!(next(&mut inbound).await, Kind::Heartbeat(beat) if beat.cpu.is_some()));
        shutdown.cancel();
        let Kind::Goodbye(goodbye) = next(&mut inbound).await else {
            panic!("a goodbye")
        };
        assert_eq!(goodbye.reason, "shutdown");
        // The agent half-closed after its goodbye and waits for the orchestrator.
        assert!(inbound.message().await.unwrap().is_none());
        drop(control);
        assert!(matches!(session.await.unwrap(), SessionEnd::ShutDown));
    }
}
