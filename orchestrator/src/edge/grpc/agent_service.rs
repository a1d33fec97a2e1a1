//! `AgentService.Connect`: one task per agent stream.
//!
//! The handler waits (bounded) for the Hello, validates it, registers the session
//! with the fleet actor and returns the outbound stream. A per-session task then
//! relays: inbound messages are validated and stamped with the orchestrator's
//! clock at receipt; heartbeats and CPU samples go into the session's liveness
//! cell (no channel, no wake-up of the actor), everything else is reported to the
//! actor; the actor's signals (Welcome, Terminate, close) are written to the
//! outbound stream. Any protocol violation ends only this
//! stream, with INVALID_ARGUMENT.

use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use secbeat::{
    pb::{self, agent_message::Kind, control_message},
    wire,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, Span, debug, info, info_span, warn};

use super::{
    convert::{self, Inbound, ProtocolError},
    rate::TokenBucket,
    status,
};
use crate::{
    clock,
    domain::node::{NodeId, SessionId},
    domain::registry::Liveness,
    edge::auth::Authority,
    edge::metrics::Metrics,
    runtime::fleet::{self, FleetHandle, SessionReport, SessionSignal, SignalReceiver},
    runtime::role::{self, Role},
};

/// Outbound messages buffered per stream. Control messages are rare (one Welcome,
/// a Terminate, a close), so a full buffer means the agent stopped reading.
const OUTBOUND_BUFFER: usize = 16;

/// The `AgentService` implementation.
#[derive(Debug, Clone)]
pub struct AgentApi {
    role: Role,
    limits: StreamLimits,
    authority: Authority,
    metrics: Metrics,
}

/// What each agent stream is held to.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// How long a new stream may take to send its Hello.
    pub hello_timeout: Duration,
    /// The heartbeat interval agents are given (for the lateness metric).
    pub heartbeat_interval: Duration,
    /// Average messages per second one stream may send.
    pub messages_per_second: f64,
}

impl AgentApi {
    /// A service that registers sessions with the leader term's fleet actor (a
    /// standby refuses them with the leader's URL), holding each stream to
    /// `limits`, admitting agents as `authority` says, counting in `metrics`.
    pub fn new(role: Role, limits: StreamLimits, authority: Authority, metrics: Metrics) -> Self {
        Self {
            role,
            limits,
            authority,
            metrics,
        }
    }
}

/// Counts an open stream for as long as it lives, and holds the few metrics its
/// relay writes (not the whole [`Metrics`]: that is some 50 handles, in every
/// session's task).
struct OpenStream {
    streams: prometheus_client::metrics::gauge::Gauge,
    lateness: prometheus_client::metrics::histogram::Histogram,
    handling: prometheus_client::metrics::histogram::Histogram,
}

impl OpenStream {
    fn new(metrics: &Metrics) -> Self {
        metrics.agent_sessions.inc();
        metrics.agent_streams.inc();
        Self {
            streams: metrics.agent_streams.clone(),
            lateness: metrics.heartbeat_lateness_seconds.clone(),
            handling: metrics.heartbeat_handling_seconds.clone(),
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.streams.dec();
    }
}

/// What the outbound stream carries, boxed: the channel's first block holds 32
/// items, 256 bytes per session boxed instead of 2.3 KiB.
type OutboundItem = Box<Result<pb::ControlMessage, Status>>;
type Outbound = mpsc::Sender<OutboundItem>;

#[expect(clippy::boxed_local, reason = "the channel's items are boxed on purpose")]
fn unbox(item: OutboundItem) -> Result<pb::ControlMessage, Status> {
    *item
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type ConnectStream = futures_util::stream::Map<
        ReceiverStream<OutboundItem>,
        fn(OutboundItem) -> Result<pb::ControlMessage, Status>,
    >;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        // A standby sends the agent on at once, before it waits for a Hello; a
        // process taking over holds it until it leads.
        let fleet = self.role.leading_soon(role::TAKEOVER_HOLD).await?.fleet;
        let peer = request.remote_addr();
        let caller = super::caller(&self.authority, &request);
        // The agent's session span, if it sent one, is this session's parent.
        let parent = request
            .metadata()
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(self.limits.hello_timeout, inbound.message()).await {
            Err(_) => return Err(ProtocolError::NoHello(self.limits.hello_timeout).into()),
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(ProtocolError::EndedBeforeHello.into()),
            Ok(Ok(Some(message))) => message,
        };
        let info = convert::hello(first, peer)?;
        let node = info.id;
        if let Err(denied) = self.authority.allow_agent(&caller, node) {
            warn!(node.id = %node, peer = ?peer, %denied, "agent refused");
            return Err(denied.into());
        }

        let (signals_tx, signals) = fleet::session_signals();
        let span =
            info_span!("agent_session", node.id = %node, session = tracing::field::Empty, peer = ?peer);
        if let Some(parent) = &parent {
            secbeat::telemetry::set_parent(&span, parent);
        }
        let registration = info_span!(parent: &span, "register_node", node.id = %node);
        let fleet::Admitted { session, liveness } = fleet
            .connect(info, signals_tx, clock::now())
            .instrument(registration)
            .await?;
        span.record("session", tracing::field::display(session));
        let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_BUFFER);
        let relay = SessionRelay {
            fleet,
            node,
            session,
            liveness,
            outbound,
            heartbeat_interval: self.limits.heartbeat_interval,
            open: OpenStream::new(&self.metrics),
            span,
            bucket: TokenBucket::new(
                self.limits.messages_per_second,
                self.limits.messages_per_second * BURST_SECONDS,
                clock::now(),
            ),
        };
        // Not `.instrument(span)`: entering and leaving the span on every poll
        // (twice a second per agent) was 5% of the orchestrator's CPU at 50,000
        // agents. The relay names the span as the parent of its few log lines.
        tokio::spawn(relay.run(inbound, signals));
        let outbound = ReceiverStream::new(outbound_rx).map(unbox as fn(OutboundItem) -> _);
        Ok(Response::new(outbound))
    }
}

struct SessionRelay {
    fleet: FleetHandle,
    node: NodeId,
    session: SessionId,
    liveness: Liveness,
    outbound: Outbound,
    heartbeat_interval: Duration,
    open: OpenStream,
    bucket: TokenBucket,
    /// The `agent_session` span: open for as long as the relay runs.
    span: Span,
}

/// A stream may send this many seconds' worth of messages at once.
const BURST_SECONDS: f64 = 4.0;

impl SessionRelay {
    async fn run(mut self, mut inbound: Streaming<pb::AgentMessage>, mut signals: SignalReceiver) {
        debug!(parent: &self.span, "session started");
        let mut last_heartbeat = clock::now();
        let cause = loop {
            tokio::select! {
                signal = signals.recv() => {
                    let Some(signal) = signal else { break "fleet actor stopped".to_owned() };
                    if let Some(end) = self.forward(signal) {
                        // Closed by the orchestrator: the registry already knows.
                        debug!(parent: &self.span, reason = %end, "session closed by orchestrator");
                        return;
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        let at = clock::now();
                        if !self.bucket.take(at) {
                            warn!(parent: &self.span, "stream over its message rate: ending it");
                            let _ = self.outbound.try_send(Box::new(Err(ProtocolError::Flooding.into())));
                            break "flooding: over max_messages_per_second".to_owned();
                        }
                        match convert::session_report(message, SystemTime::now()) {
                            Ok(Inbound::Heartbeat { cpu }) => {
                                self.liveness.beat(at, cpu);
                                let late = at
                                    .saturating_duration_since(last_heartbeat)
                                    .saturating_sub(self.heartbeat_interval);
                                self.open.lateness.observe(late.as_secs_f64());
                                let handled = clock::now().saturating_duration_since(at);
                                self.open.handling.observe(handled.as_secs_f64());
                                last_heartbeat = at;
                            }
                            Ok(Inbound::Cpu(usage)) => self.liveness.beat(at, Some(usage)),
                            Ok(Inbound::Report(report)) => {
                                // Boxed: a report (a goodbye, an ack) is rare, and its
                                // future (a whole command) would otherwise sit in every
                                // session's task for its life.
                                let sent = Box::pin(self.fleet.report(self.node, self.session, report, at));
                                if sent.await.is_err() {
                                    let _ = self.outbound.try_send(Box::new(Err(status::shutting_down())));
                                    return;
                                }
                            }
                            Err(rejection) => {
                                warn!(parent: &self.span, %rejection, "protocol violation: ending stream");
                                let cause = format!("protocol violation: {rejection}");
                                let _ = self.outbound.try_send(Box::new(Err(rejection.into())));
                                break cause;
                            }
                        }
                    }
                    Ok(None) => break "stream ended".to_owned(),
                    Err(error) => break format!("stream broke: {}", error.message()),
                },
            }
        };
        info!(parent: &self.span, %cause, "session ended");
        let closed = SessionReport::Closed(cause);
        let _ = Box::pin(self.fleet.report(self.node, self.session, closed, clock::now())).await;
    }

    /// Writes a signal to the agent; returns the reason when it ends the stream.
    fn forward(&self, signal: SessionSignal) -> Option<String> {
        let message = match signal {
            SessionSignal::Welcome {
                session,
                heartbeat_interval,
            } => control_message::Kind::Welcome(pb::Welcome {
                session_id: session.0,
                heartbeat_interval: Some(wire::duration_to_proto(heartbeat_interval)),
                node_id: self.node.to_string(),
                heartbeat_carries_cpu: true,
            }),
            SessionSignal::Terminate {
                reason,
                grace_period,
                traceparent,
            } => control_message::Kind::Terminate(pb::Terminate {
                traceparent: traceparent.unwrap_or_default(),
                reason,
                grace_period: Some(wire::duration_to_proto(grace_period)),
            }),
            SessionSignal::Drain { reason, deadline } => control_message::Kind::Drain(pb::Drain {
                reason,
                deadline: Some(wire::duration_to_proto(deadline)),
            }),
            SessionSignal::Resume { reason, deadline } => control_message::Kind::Resume(pb::Resume {
                reason,
                deadline: Some(wire::duration_to_proto(deadline)),
            }),
            SessionSignal::Close(reason) => {
                let status = status::closed(&reason);
                let end = status.message().to_owned();
                let _ = self.outbound.try_send(Box::new(Err(status)));
                return Some(end);
            }
            SessionSignal::ShuttingDown => {
                let _ = self.outbound.try_send(Box::new(Err(status::shutting_down())));
                return Some("orchestrator shutting down".to_owned());
            }
        };
        if let Err(error) = self
            .outbound
            .try_send(Box::new(Ok(pb::ControlMessage { kind: Some(message) })))
        {
            warn!(parent: &self.span, %error, "agent is not reading its stream; control message dropped");
        }
        None
    }
}

/// Decodes and validates one agent message exactly as a stream handler does
/// (Hello included): the fuzzing entry point (`fuzz/`). Never panics.
pub fn decode_and_validate(bytes: &[u8]) -> Result<(), ProtocolError> {
    use prost::Message;
    let message =
        pb::AgentMessage::decode(bytes).map_err(|error| ProtocolError::Undecodable(error.to_string()))?;
    if let Some(Kind::Hello(hello)) = message.kind {
        return convert::node_info(hello, None)
            .map(|_| ())
            .map_err(ProtocolError::from);
    }
    convert::session_report(message, SystemTime::now()).map(|_| ())
}
