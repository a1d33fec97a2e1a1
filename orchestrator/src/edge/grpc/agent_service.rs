//! `AgentService.Connect`: one task per agent stream.
//!
//! The handler waits (bounded) for the Hello, validates it, registers the session
//! with the fleet actor and returns the outbound stream. A per-session task then
//! relays: inbound messages are validated, stamped with the orchestrator's clock
//! at receipt and reported to the actor; the actor's signals (Welcome, Terminate,
//! close) are written to the outbound stream. Any protocol violation ends only this
//! stream, with INVALID_ARGUMENT.

use std::time::{Duration, SystemTime};

use secbeat::{
    pb::{self, agent_message::Kind, control_message},
    wire,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, Span, debug, info, info_span, warn};

use super::{convert, rate::TokenBucket, status};
use crate::{
    clock,
    domain::node::{NodeId, SessionId},
    edge::auth::Authority,
    edge::metrics::Metrics,
    runtime::fleet::{FleetHandle, SessionReport, SessionSignal},
};

/// Most samples one CpuSamples message may carry.
pub const MAX_SAMPLES_PER_MESSAGE: usize = 64;
/// Outbound messages buffered per stream. Control messages are rare (one Welcome,
/// a Terminate, a close), so a full buffer means the agent stopped reading.
const OUTBOUND_BUFFER: usize = 16;
/// Longest goodbye reason kept.
const MAX_REASON: usize = 256;

/// The `AgentService` implementation.
#[derive(Debug, Clone)]
pub struct AgentApi {
    fleet: FleetHandle,
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
    /// A service that registers sessions with `fleet`, holding each stream to
    /// `limits`, admitting agents as `authority` says, counting in `metrics`.
    pub fn new(fleet: FleetHandle, limits: StreamLimits, authority: Authority, metrics: Metrics) -> Self {
        Self {
            fleet,
            limits,
            authority,
            metrics,
        }
    }
}

/// Counts an open stream for as long as it lives.
struct OpenStream(Metrics);

impl OpenStream {
    fn new(metrics: &Metrics) -> Self {
        metrics.agent_sessions.inc();
        metrics.agent_streams.inc();
        Self(metrics.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.agent_streams.dec();
    }
}

type Outbound = mpsc::Sender<Result<pb::ControlMessage, Status>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type ConnectStream = ReceiverStream<Result<pb::ControlMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
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
            Err(_) => {
                let secs = self.limits.hello_timeout.as_secs_f64();
                return Err(Status::invalid_argument(format!("no hello within {secs}s")));
            }
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(Status::invalid_argument("stream ended before hello")),
            Ok(Ok(Some(message))) => message,
        };
        let hello = match first.kind {
            Some(Kind::Hello(hello)) => hello,
            other => {
                let got = kind_name(other.as_ref());
                return Err(Status::invalid_argument(format!(
                    "first message must be hello, got {got}"
                )));
            }
        };
        let info = convert::node_info(hello, peer).map_err(status::invalid)?;
        let node = info.id;
        if let Err(denied) = self.authority.allow_agent(&caller, node) {
            warn!(node.id = %node, peer = ?peer, %denied, "agent refused");
            return Err(denied.into());
        }

        let (signals_tx, signals) = mpsc::unbounded_channel();
        let span =
            info_span!("agent_session", node.id = %node, session = tracing::field::Empty, peer = ?peer);
        if let Some(parent) = &parent {
            secbeat::telemetry::set_parent(&span, parent);
        }
        let registration = info_span!(parent: &span, "register_node", node.id = %node);
        let session = self
            .fleet
            .connect(info, signals_tx, clock::now())
            .instrument(registration)
            .await?;
        span.record("session", tracing::field::display(session));
        let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_BUFFER);
        let relay = SessionRelay {
            fleet: self.fleet.clone(),
            node,
            session,
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
        Ok(Response::new(ReceiverStream::new(outbound_rx)))
    }
}

struct SessionRelay {
    fleet: FleetHandle,
    node: NodeId,
    session: SessionId,
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
    async fn run(
        mut self,
        mut inbound: Streaming<pb::AgentMessage>,
        mut signals: mpsc::UnboundedReceiver<SessionSignal>,
    ) {
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
                            let status = Status::resource_exhausted(
                                "more messages than max_messages_per_second allows; slow down and reconnect",
                            );
                            let _ = self.outbound.try_send(Err(status));
                            break "flooding: over max_messages_per_second".to_owned();
                        }
                        match validate(message, SystemTime::now()) {
                            Ok(report) => {
                                if report == SessionReport::Heartbeat {
                                    let gap = at.saturating_duration_since(last_heartbeat);
                                    let late = gap.saturating_sub(self.heartbeat_interval);
                                    self.open.0.heartbeat_lateness_seconds.observe(late.as_secs_f64());
                                    last_heartbeat = at;
                                }
                                if self.fleet.report(self.node, self.session, report, at).await.is_err() {
                                    let _ = self.outbound.try_send(Err(status::shutting_down()));
                                    return;
                                }
                            }
                            Err(rejection) => {
                                warn!(parent: &self.span, %rejection, "protocol violation: ending stream");
                                let cause = format!("protocol violation: {}", rejection.message());
                                let _ = self.outbound.try_send(Err(rejection));
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
        let _ = self
            .fleet
            .report(
                self.node,
                self.session,
                SessionReport::Closed(cause),
                clock::now(),
            )
            .await;
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
            SessionSignal::Close(reason) => {
                let status = status::closed(&reason);
                let end = status.message().to_owned();
                let _ = self.outbound.try_send(Err(status));
                return Some(end);
            }
            SessionSignal::ShuttingDown => {
                let _ = self.outbound.try_send(Err(status::shutting_down()));
                return Some("orchestrator shutting down".to_owned());
            }
        };
        if let Err(error) = self
            .outbound
            .try_send(Ok(pb::ControlMessage { kind: Some(message) }))
        {
            warn!(parent: &self.span, %error, "agent is not reading its stream; control message dropped");
        }
        None
    }
}

/// Validates one message after the Hello into what the actor needs to know.
/// Decodes and validates one agent message exactly as a stream handler does
/// (Hello included): the fuzzing entry point (`fuzz/`). Never panics.
pub fn decode_and_validate(bytes: &[u8]) -> Result<(), Status> {
    use prost::Message;
    let message = pb::AgentMessage::decode(bytes).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if let Some(Kind::Hello(hello)) = message.kind {
        return convert::node_info(hello, None)
            .map(|_| ())
            .map_err(status::invalid);
    }
    validate(message, SystemTime::now()).map(|_| ())
}

/// Agent timestamps further than this from the orchestrator's clock are garbage.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(24 * 3600);

fn validate(message: pb::AgentMessage, now: SystemTime) -> Result<SessionReport, Status> {
    match message.kind {
        Some(Kind::Heartbeat(_)) => Ok(SessionReport::Heartbeat),
        Some(Kind::CpuSamples(batch)) => {
            if batch.samples.is_empty() {
                return Err(Status::invalid_argument("cpu_samples.samples: empty"));
            }
            if batch.samples.len() > MAX_SAMPLES_PER_MESSAGE {
                return Err(Status::invalid_argument(format!(
                    "cpu_samples.samples: {} samples, at most {MAX_SAMPLES_PER_MESSAGE} per message",
                    batch.samples.len()
                )));
            }
            let mut latest = 0.0;
            for sample in &batch.samples {
                latest = wire::check_cpu_fraction("cpu_samples.samples.usage", sample.usage)
                    .map_err(status::invalid)?;
                // Timing never uses agent clocks, but an absurd one means garbage.
                if let Some(time) = sample.time {
                    let time = wire::timestamp_from_proto("cpu_samples.samples.time", Some(time))
                        .map_err(status::invalid)?;
                    let skew = time
                        .duration_since(now)
                        .or_else(|e| Ok::<_, ()>(e.duration()))
                        .unwrap_or_default();
                    if skew > MAX_CLOCK_SKEW {
                        return Err(Status::invalid_argument(format!(
                            "cpu_samples.samples.time: {}s away from the orchestrator's clock (at most {}s)",
                            skew.as_secs(),
                            MAX_CLOCK_SKEW.as_secs()
                        )));
                    }
                }
            }
            Ok(SessionReport::Cpu(latest))
        }
        Some(Kind::TerminateAck(_)) => Ok(SessionReport::TerminateAck),
        Some(Kind::Goodbye(goodbye)) => {
            let mut reason = goodbye.reason;
            if reason.len() > MAX_REASON {
                let cut = (0..=MAX_REASON)
                    .rev()
                    .find(|i| reason.is_char_boundary(*i))
                    .unwrap_or(0);
                reason.truncate(cut);
            }
            Ok(SessionReport::Goodbye(reason))
        }
        Some(Kind::Hello(_)) => Err(Status::invalid_argument("hello may only be the first message")),
        None => Err(Status::invalid_argument("message has no kind set")),
    }
}

fn kind_name(kind: Option<&Kind>) -> &'static str {
    match kind {
        Some(Kind::Hello(_)) => "hello",
        Some(Kind::Heartbeat(_)) => "heartbeat",
        Some(Kind::CpuSamples(_)) => "cpu_samples",
        Some(Kind::TerminateAck(_)) => "terminate_ack",
        Some(Kind::Goodbye(_)) => "goodbye",
        None => "an empty message",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(values: &[f64]) -> pb::AgentMessage {
        let samples = values
            .iter()
            .map(|usage| pb::CpuSample {
                time: None,
                usage: *usage,
            })
            .collect();
        pb::AgentMessage {
            kind: Some(Kind::CpuSamples(pb::CpuSamples { samples })),
        }
    }

    #[test]
    fn cpu_batches_report_the_latest_valid_sample() {
        assert_eq!(
            validate(samples(&[0.2, 0.7]), SystemTime::now()).unwrap(),
            SessionReport::Cpu(0.7)
        );
    }

    #[test]
    fn bad_cpu_batches_are_invalid_argument() {
        let too_many = vec![0.5; MAX_SAMPLES_PER_MESSAGE + 1];
        for bad in [
            samples(&[]),
            samples(&[0.5, f64::NAN]),
            samples(&[85.0]),
            samples(&[-0.1]),
            samples(&too_many),
        ] {
            assert_eq!(
                validate(bad, SystemTime::now()).unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
    }

    #[test]
    fn a_second_hello_or_an_empty_message_is_rejected() {
        let hello = pb::AgentMessage {
            kind: Some(Kind::Hello(pb::Hello::default())),
        };
        assert_eq!(
            validate(hello, SystemTime::now()).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            validate(pb::AgentMessage { kind: None }, SystemTime::now())
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn long_goodbye_reasons_are_cut_on_a_char_boundary() {
        let reason = "é".repeat(200);
        let message = pb::AgentMessage {
            kind: Some(Kind::Goodbye(pb::Goodbye { reason })),
        };
        let SessionReport::Goodbye(kept) = validate(message, SystemTime::now()).unwrap() else {
            panic!()
        };
        assert!(kept.len() <= MAX_REASON);
    }

    #[test]
    fn sample_times_far_from_now_are_invalid_argument() {
        let now = SystemTime::now();
        let at = |offset: Duration, later: bool| {
            let time = if later { now + offset } else { now - offset };
            pb::AgentMessage {
                kind: Some(Kind::CpuSamples(pb::CpuSamples {
                    samples: vec![pb::CpuSample {
                        time: Some(wire::timestamp_to_proto(time)),
                        usage: 0.5,
                    }],
                })),
            }
        };
        assert!(
            validate(at(Duration::from_secs(3600), true), now).is_ok(),
            "an hour of skew is tolerated"
        );
        for later in [true, false] {
            let error = validate(at(MAX_CLOCK_SKEW * 2, later), now).unwrap_err();
            assert_eq!(error.code(), tonic::Code::InvalidArgument);
        }
    }

    mod properties {
        //! The wire -> domain validation never panics, and what it accepts is sane.

        use proptest::prelude::*;
        use prost::Message;

        use super::*;

        fn any_sample() -> impl Strategy<Value = pb::CpuSample> {
            let usage = prop_oneof![any::<f64>(), 0.0..=1.0f64, Just(f64::NAN), Just(f64::INFINITY)];
            let time = proptest::option::of((any::<i64>(), any::<i32>()));
            (usage, time).prop_map(|(usage, time)| pb::CpuSample {
                usage,
                time: time.map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
            })
        }

        proptest! {
            #[test]
            fn accepted_cpu_batches_carry_a_fraction(samples in proptest::collection::vec(any_sample(), 0..80)) {
                let message = pb::AgentMessage { kind: Some(Kind::CpuSamples(pb::CpuSamples { samples })) };
                if let Ok(SessionReport::Cpu(usage)) = validate(message, SystemTime::now()) {
                    prop_assert!((0.0..=1.0).contains(&usage));
                }
            }

            #[test]
            fn arbitrary_bytes_never_panic_the_decoder_or_the_validator(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                if let Ok(message) = pb::AgentMessage::decode(bytes.as_slice()) {
                    let _ = validate(message.clone(), SystemTime::now());
                    if let Some(Kind::Hello(hello)) = message.kind {
                        let _ = convert::node_info(hello, None);
                    }
                }
            }

            #[test]
            fn hellos_are_accepted_only_with_a_real_node_id(node_id in ".{0,40}", ip in ".{0,20}") {
                let hello = pb::Hello { node_id: node_id.clone(), ip, ..Default::default() };
                if let Ok(info) = convert::node_info(hello, None) {
                    prop_assert!(!info.id.0.is_nil());
                    prop_assert_eq!(uuid::Uuid::parse_str(node_id.trim()).ok(), Some(info.id.0));
                }
            }
        }
    }
}
