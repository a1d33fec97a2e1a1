//! `AgentService.Connect`: one agent session per stream, with no task of its own.
//!
//! The handler waits (bounded) for the Hello, validates it, registers the session
//! with the fleet actor and returns the session as the response stream. Polled by
//! hyper's task for the HTTP/2 stream, the session takes what the agent sends:
//! messages are validated and stamped with the orchestrator's clock at receipt;
//! heartbeats and CPU samples go into the session's liveness cell (no channel, no
//! wake-up of the actor), everything else is reported to the actor; the actor's
//! signals (Welcome, Terminate, close) become the control messages. Any protocol
//! violation ends only this stream, with INVALID_ARGUMENT.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use secbeat::{
    pb::{self, agent_message::Kind, control_message},
    wire,
};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, Span, debug, info_span, warn};

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
    runtime::fleet::{self, FleetHandle, FleetStopped, SessionReport, SessionSignal, SignalReceiver},
    runtime::role::{self, Role},
};

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
/// session writes (not the whole [`Metrics`]: that is some 50 handles, in every
/// session).
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

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type ConnectStream = SessionStream;

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
        debug!(parent: &span, "session started");
        let now = clock::now();
        Ok(Response::new(SessionStream {
            inbound,
            signals,
            fleet,
            node,
            session,
            liveness,
            heartbeat_interval: self.limits.heartbeat_interval,
            last_heartbeat: now,
            open: OpenStream::new(&self.metrics),
            bucket: TokenBucket::new(
                self.limits.messages_per_second,
                self.limits.messages_per_second * BURST_SECONDS,
                now,
            ),
            sending: None,
            end: End::Open,
            span,
        }))
    }
}

/// A stream may send this many seconds' worth of messages at once.
const BURST_SECONDS: f64 = 4.0;

/// Messages taken from the agent's stream per poll before yielding to the
/// runtime (a burst is bounded by the rate limit anyway).
const MESSAGES_PER_POLL: usize = 32;

/// A report on its way to the fleet actor.
type Sending = Pin<Box<dyn Future<Output = Result<(), FleetStopped>> + Send>>;

/// One agent session, as the response stream tonic sends to the agent.
///
/// There is no task of its own: hyper already runs one task per HTTP/2 stream,
/// and it polls this stream for the next control message. Each poll also takes
/// what the agent sent: heartbeats and CPU samples go into the liveness cell,
/// anything else is reported to the fleet actor (nothing more is read until the
/// actor has taken it), and the actor's signals (Welcome, Terminate, Drain,
/// close) become the control messages. A relay task and a channel per session
/// cost about 2 KiB and a task wake-up per heartbeat more than this.
///
/// However the stream ends (the agent ended or broke it, a protocol violation,
/// or the transport dropped it on a reset or a lost connection), the actor
/// hears of it from `Drop`, unless the actor itself closed the session.
///
/// hyper polls for the next control message only while the last one has room to
/// go: an agent that stopped reading its stream until HTTP/2 flow control held
/// a control message back (64 KiB of them unread) would have its heartbeats left
/// unread too, and be judged silent. An agent reads its stream.
pub struct SessionStream {
    inbound: Streaming<pb::AgentMessage>,
    signals: SignalReceiver,
    fleet: FleetHandle,
    node: NodeId,
    session: SessionId,
    liveness: Liveness,
    heartbeat_interval: Duration,
    last_heartbeat: Instant,
    open: OpenStream,
    bucket: TokenBucket,
    /// A report the actor has not taken yet.
    sending: Option<Sending>,
    end: End,
    /// The `agent_session` span: open for the session's life. Not entered on
    /// every poll (that was 5% of the orchestrator's CPU at 50,000 agents): it
    /// is the explicit parent of the session's few log lines.
    span: Span,
}

/// Where a session stands, and what the actor is told when it ends.
enum End {
    /// Running. If the transport drops the stream now, the connection was lost
    /// or the stream reset.
    Open,
    /// Ended for this cause, which the actor is told.
    Closed(String),
    /// Ended by the actor (a close or shutdown signal), or the actor is gone:
    /// there is no one to tell.
    Silent,
}

/// What one message from the agent asks of the stream.
enum Received {
    /// Taken; read on.
    Taken,
    /// Report this to the actor before reading on.
    Report(SessionReport),
    /// End the stream with this status, for this cause.
    Violation(Status, String),
}

impl std::fmt::Debug for SessionStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStream")
            .field("node", &self.node)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl futures_util::Stream for SessionStream {
    type Item = Result<pb::ControlMessage, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if !matches!(this.end, End::Open) {
            return Poll::Ready(None);
        }
        let mut taken = 0;
        loop {
            if let Some(sending) = &mut this.sending {
                match sending.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => this.sending = None,
                    Poll::Ready(Err(FleetStopped)) => {
                        this.sending = None;
                        return this.finish(End::Silent, Some(status::shutting_down()));
                    }
                }
            }
            match this.signals.poll_recv(cx) {
                Poll::Ready(Some(signal)) => {
                    return match this.control(signal) {
                        Ok(message) => Poll::Ready(Some(Ok(message))),
                        // Closed by the orchestrator: the registry already knows.
                        Err(status) => {
                            debug!(parent: &this.span, reason = %status.message(), "session closed by orchestrator");
                            this.finish(End::Silent, Some(status))
                        }
                    };
                }
                Poll::Ready(None) => return this.finish(End::Closed("fleet actor stopped".to_owned()), None),
                Poll::Pending => {}
            }
            if taken == MESSAGES_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            taken += 1;
            match Pin::new(&mut this.inbound).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return this.finish(End::Closed("stream ended".to_owned()), None),
                Poll::Ready(Some(Err(error))) => {
                    let cause = format!("stream broke: {}", error.message());
                    return this.finish(End::Closed(cause), None);
                }
                Poll::Ready(Some(Ok(message))) => match this.receive(message) {
                    Received::Taken => {}
                    Received::Report(report) => {
                        // Boxed: a report (a goodbye, an ack) is rare, and its
                        // future (a whole command) would otherwise sit in every
                        // session for its life.
                        let fleet = this.fleet.clone();
                        let (node, session, at) = (this.node, this.session, clock::now());
                        this.sending =
                            Some(Box::pin(
                                async move { fleet.report(node, session, report, at).await },
                            ));
                    }
                    Received::Violation(status, cause) => {
                        return this.finish(End::Closed(cause), Some(status));
                    }
                },
            }
        }
    }
}

impl SessionStream {
    /// Ends the stream: with `status` if given, then the end.
    fn finish(
        &mut self,
        end: End,
        status: Option<Status>,
    ) -> Poll<Option<Result<pb::ControlMessage, Status>>> {
        self.end = end;
        Poll::Ready(status.map(Err))
    }

    /// Takes one message from the agent.
    fn receive(&mut self, message: pb::AgentMessage) -> Received {
        let at = clock::now();
        if !self.bucket.take(at) {
            warn!(parent: &self.span, "stream over its message rate: ending it");
            return Received::Violation(
                ProtocolError::Flooding.into(),
                "flooding: over max_messages_per_second".to_owned(),
            );
        }
        match convert::session_report(message, SystemTime::now()) {
            Ok(Inbound::Heartbeat { cpu }) => {
                self.liveness.beat(at, cpu);
                let late = at
                    .saturating_duration_since(self.last_heartbeat)
                    .saturating_sub(self.heartbeat_interval);
                self.open.lateness.observe(late.as_secs_f64());
                let handled = clock::now().saturating_duration_since(at);
                self.open.handling.observe(handled.as_secs_f64());
                self.last_heartbeat = at;
                Received::Taken
            }
            Ok(Inbound::Cpu(usage)) => {
                self.liveness.beat(at, Some(usage));
                Received::Taken
            }
            Ok(Inbound::Report(report)) => Received::Report(report),
            Err(rejection) => {
                warn!(parent: &self.span, %rejection, "protocol violation: ending stream");
                let cause = format!("protocol violation: {rejection}");
                Received::Violation(rejection.into(), cause)
            }
        }
    }

    /// The control message for a signal, or the status that ends the stream.
    fn control(&self, signal: SessionSignal) -> Result<pb::ControlMessage, Status> {
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
            SessionSignal::Close(reason) => return Err(status::closed(&reason)),
            SessionSignal::ShuttingDown => return Err(status::shutting_down()),
        };
        Ok(pb::ControlMessage { kind: Some(message) })
    }
}

impl Drop for SessionStream {
    fn drop(&mut self) {
        let cause = match std::mem::replace(&mut self.end, End::Silent) {
            End::Silent => return,
            End::Closed(cause) => cause,
            // Dropped by the transport, which does not say why; the agent's side
            // of the stream may (a reset's code, the connection's error).
            End::Open => {
                let mut context = Context::from_waker(std::task::Waker::noop());
                match futures_util::Stream::poll_next(Pin::new(&mut self.inbound), &mut context) {
                    Poll::Ready(Some(Err(error))) => format!("stream broke: {}", error.message()),
                    Poll::Ready(None) => "stream ended".to_owned(),
                    Poll::Ready(Some(Ok(_))) | Poll::Pending => "stream reset or connection lost".to_owned(),
                }
            }
        };
        // DEBUG: the node event the actor makes of it (suspected, left, ...) is
        // logged with this cause in its reason, and at a shutdown or a storm one
        // line per session would say the same thing thousands of times.
        debug!(parent: &self.span, %cause, "session ended");
        let closed = SessionReport::Closed(cause);
        self.fleet
            .report_detached(self.node, self.session, closed, clock::now());
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
