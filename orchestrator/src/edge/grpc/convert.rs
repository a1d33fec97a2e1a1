//! Wire <-> domain conversions for the orchestrator's gRPC edge, with typed errors.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use secbeat::{
    pb::{self, agent_message::Kind},
    wire::{self, WireError},
};

use crate::{
    domain::event::{EventKind, FleetEvent, ScaleDecision},
    domain::node::{FleetStats, HostFacts, NodeId, NodeInfo, NodeSnapshot, NodeState},
    runtime::fleet::SessionReport,
    runtime::scaling_loop::Prediction,
};

/// Most samples one CpuSamples message may carry.
pub const MAX_SAMPLES_PER_MESSAGE: usize = 64;
/// Longest goodbye reason kept.
const MAX_REASON: usize = 256;
/// Agent timestamps further than this from the orchestrator's clock are garbage.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(24 * 3600);

/// An agent stream that broke the protocol; the stream ends with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// No Hello within `hello_timeout`.
    #[error("no hello within {}s", .0.as_secs_f64())]
    NoHello(Duration),
    /// The stream ended before its Hello.
    #[error("stream ended before hello")]
    EndedBeforeHello,
    /// The first message was not a Hello.
    #[error("first message must be hello, got {0}")]
    FirstNotHello(&'static str),
    /// A Hello after the first message.
    #[error("hello may only be the first message")]
    HelloAgain,
    /// A message with no kind set.
    #[error("message has no kind set")]
    Empty,
    /// Bytes that are not an AgentMessage.
    #[error("undecodable message: {0}")]
    Undecodable(String),
    /// A field with an unacceptable value.
    #[error(transparent)]
    Field(#[from] WireError),
    /// More messages than `max_messages_per_second` allows.
    #[error("more messages than max_messages_per_second allows; slow down and reconnect")]
    Flooding,
}

impl crate::error::Fault for ProtocolError {
    fn code(&self) -> crate::error::ErrorCode {
        match self {
            ProtocolError::Flooding => crate::error::ErrorCode::ResourceExhausted,
            _ => crate::error::ErrorCode::InvalidArgument,
        }
    }
}

/// Validates the first message of a stream: it must be a Hello.
pub fn hello(first: pb::AgentMessage, peer: Option<SocketAddr>) -> Result<NodeInfo, ProtocolError> {
    match first.kind {
        Some(Kind::Hello(hello)) => Ok(node_info(hello, peer)?),
        other => Err(ProtocolError::FirstNotHello(kind_name(other.as_ref()))),
    }
}

/// One validated message after the Hello, by where it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// A heartbeat, with the CPU fraction of its interval when it carries one:
    /// for the session's liveness cell.
    Heartbeat {
        /// The usage of the sample the heartbeat carried.
        cpu: Option<f64>,
    },
    /// The latest CPU fraction of a CpuSamples batch: for the liveness cell.
    Cpu(f64),
    /// Everything else: for the fleet actor.
    Report(SessionReport),
}

/// Validates one message after the Hello into what the orchestrator needs to
/// know. `now` is the orchestrator's wall clock, only to reject absurd agent
/// timestamps.
pub fn session_report(message: pb::AgentMessage, now: SystemTime) -> Result<Inbound, ProtocolError> {
    let report = match message.kind {
        Some(Kind::Heartbeat(beat)) => {
            return Ok(Inbound::Heartbeat {
                cpu: beat.cpu.map(|sample| cpu_sample(&sample, now)).transpose()?,
            });
        }
        Some(Kind::CpuSamples(batch)) => return Ok(Inbound::Cpu(cpu_samples(&batch, now)?)),
        Some(Kind::TerminateAck(_)) => SessionReport::TerminateAck,
        Some(Kind::Goodbye(goodbye)) => SessionReport::Goodbye(agent_words(&goodbye.reason)),
        Some(Kind::DrainResult(result)) => SessionReport::DrainResult {
            success: result.success,
            detail: agent_words(&result.detail),
        },
        Some(Kind::ResumeResult(result)) => SessionReport::ResumeResult {
            success: result.success,
            detail: agent_words(&result.detail),
        },
        Some(Kind::Hello(_)) => return Err(ProtocolError::HelloAgain),
        None => return Err(ProtocolError::Empty),
    };
    Ok(Inbound::Report(report))
}

/// Words from an agent (a goodbye reason, a hook's outcome) as they may reach
/// logs and events: control characters escaped, cut to 256 bytes on a char
/// boundary.
fn agent_words(text: &str) -> String {
    let mut words = wire::escape_controls(text).into_owned();
    if words.len() > MAX_REASON {
        let cut = (0..=MAX_REASON)
            .rev()
            .find(|i| words.is_char_boundary(*i))
            .unwrap_or(0);
        words.truncate(cut);
    }
    words
}

/// The latest usage of a CpuSamples batch, every sample checked.
fn cpu_samples(batch: &pb::CpuSamples, now: SystemTime) -> Result<f64, WireError> {
    const FIELD: &str = "cpu_samples.samples";
    if batch.samples.is_empty() {
        return Err(WireError::new(FIELD, "empty"));
    }
    if batch.samples.len() > MAX_SAMPLES_PER_MESSAGE {
        return Err(WireError::new(
            FIELD,
            format!(
                "{} samples, at most {MAX_SAMPLES_PER_MESSAGE} per message",
                batch.samples.len()
            ),
        ));
    }
    let mut latest = 0.0;
    for sample in &batch.samples {
        latest = checked_sample(
            sample,
            now,
            ("cpu_samples.samples.usage", "cpu_samples.samples.time"),
        )?;
    }
    Ok(latest)
}

/// The usage of the sample a heartbeat carries, checked as a batch entry is.
fn cpu_sample(sample: &pb::CpuSample, now: SystemTime) -> Result<f64, WireError> {
    checked_sample(sample, now, ("heartbeat.cpu.usage", "heartbeat.cpu.time"))
}

/// One sample's usage; `fields` name its usage and time in an error.
fn checked_sample(
    sample: &pb::CpuSample,
    now: SystemTime,
    (usage_field, time_field): (&'static str, &'static str),
) -> Result<f64, WireError> {
    let usage = wire::check_cpu_fraction(usage_field, sample.usage)?;
    // Timing never uses agent clocks, but an absurd one means garbage.
    if let Some(time) = sample.time {
        let field = time_field;
        let time = wire::timestamp_from_proto(field, Some(time))?;
        let skew = time
            .duration_since(now)
            .or_else(|e| Ok::<_, ()>(e.duration()))
            .unwrap_or_default();
        if skew > MAX_CLOCK_SKEW {
            return Err(WireError::new(
                field,
                format!(
                    "{}s away from the orchestrator's clock (at most {}s)",
                    skew.as_secs(),
                    MAX_CLOCK_SKEW.as_secs()
                ),
            ));
        }
    }
    Ok(usage)
}

fn kind_name(kind: Option<&Kind>) -> &'static str {
    match kind {
        Some(Kind::Hello(_)) => "hello",
        Some(Kind::Heartbeat(_)) => "heartbeat",
        Some(Kind::CpuSamples(_)) => "cpu_samples",
        Some(Kind::TerminateAck(_)) => "terminate_ack",
        Some(Kind::Goodbye(_)) => "goodbye",
        Some(Kind::DrainResult(_)) => "drain_result",
        Some(Kind::ResumeResult(_)) => "resume_result",
        None => "an empty message",
    }
}

/// Longest accepted host name (DNS limit).
const MAX_HOSTNAME: usize = 253;
/// Longest accepted agent version string.
const MAX_VERSION: usize = 64;
/// Longest accepted boot id (a UUID is 36 bytes).
const MAX_BOOT_ID: usize = 64;
/// Most labels a node may carry.
const MAX_LABELS: usize = 32;
/// Longest label key or value.
const MAX_LABEL_LEN: usize = 128;

/// Parses a node id field.
pub fn node_id(field: &'static str, raw: &str) -> Result<NodeId, WireError> {
    wire::parse_node_id(field, raw).map(NodeId)
}

/// Validates a Hello into the node's self-description. An empty `ip` falls back to
/// the connection's peer address.
pub fn node_info(hello: pb::Hello, peer: Option<SocketAddr>) -> Result<NodeInfo, WireError> {
    let id = node_id("hello.node_id", &hello.node_id)?;
    if hello.hostname.len() > MAX_HOSTNAME {
        return Err(WireError::new(
            "hello.hostname",
            format!("longer than {MAX_HOSTNAME} bytes"),
        ));
    }
    if hello.agent_version.len() > MAX_VERSION {
        return Err(WireError::new(
            "hello.agent_version",
            format!("longer than {MAX_VERSION} bytes"),
        ));
    }
    // What a node says about itself reaches logs, events, webhooks and the API:
    // no control characters (a newline would forge a log line, ESC drive a terminal).
    wire::check_printable("hello.hostname", &hello.hostname)?;
    wire::check_printable("hello.agent_version", &hello.agent_version)?;
    for (key, value) in &hello.labels {
        wire::check_printable("hello.labels", key)?;
        wire::check_printable("hello.labels", value)?;
    }
    let ip = if hello.ip.is_empty() {
        peer.map(|addr| addr.ip())
            .ok_or_else(|| WireError::new("hello.ip", "missing, and the peer address is unknown"))?
    } else {
        hello
            .ip
            .parse::<IpAddr>()
            .map_err(|_| WireError::new("hello.ip", format!("{:?} is not an IP address", hello.ip)))?
    };
    if hello.labels.len() > MAX_LABELS {
        return Err(WireError::new(
            "hello.labels",
            format!("more than {MAX_LABELS} labels"),
        ));
    }
    if hello
        .labels
        .iter()
        .any(|(k, v)| k.is_empty() || k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN)
    {
        return Err(WireError::new(
            "hello.labels",
            format!("keys must be 1..={MAX_LABEL_LEN} bytes, values at most {MAX_LABEL_LEN}"),
        ));
    }
    let boot_id = if hello.boot_id.is_empty() {
        None
    } else {
        if hello.boot_id.len() > MAX_BOOT_ID {
            return Err(WireError::new(
                "hello.boot_id",
                format!("longer than {MAX_BOOT_ID} bytes"),
            ));
        }
        wire::check_printable("hello.boot_id", &hello.boot_id)?;
        Some(hello.boot_id)
    };
    let boot_time = hello
        .boot_time
        .map(|time| wire::timestamp_from_proto("hello.boot_time", Some(time)))
        .transpose()?;
    Ok(NodeInfo {
        id,
        hostname: hello.hostname,
        ip,
        agent_version: hello.agent_version,
        labels: hello.labels.into_iter().collect::<BTreeMap<_, _>>(),
        host: HostFacts {
            boot_id,
            boot_time,
            last_disconnect: agent_words(&hello.last_disconnect),
        },
    })
}

/// The wire form of a node state.
pub fn node_state(state: NodeState) -> pb::NodeState {
    match state {
        NodeState::Connected => pb::NodeState::Connected,
        NodeState::Suspect => pb::NodeState::Suspect,
        NodeState::Failed => pb::NodeState::Failed,
        NodeState::Terminating => pb::NodeState::Terminating,
        NodeState::Terminated => pb::NodeState::Terminated,
        NodeState::Left => pb::NodeState::Left,
        NodeState::Draining => pb::NodeState::Draining,
        NodeState::Drained => pb::NodeState::Drained,
    }
}

/// A wire node state as the domain's; None for UNSPECIFIED.
pub fn node_state_from_proto(state: pb::NodeState) -> Option<NodeState> {
    NodeState::ALL
        .into_iter()
        .find(|domain| node_state(*domain) == state)
}

/// The wire form of a node snapshot.
pub fn node(snapshot: &NodeSnapshot) -> pb::Node {
    pb::Node {
        node_id: snapshot.info.id.to_string(),
        hostname: snapshot.info.hostname.clone(),
        ip: snapshot.info.ip.to_string(),
        state: node_state(snapshot.state).into(),
        last_cpu_usage: snapshot.last_cpu_usage,
        connected_since: Some(wire::timestamp_to_proto(snapshot.connected_since)),
        last_heartbeat: Some(wire::timestamp_to_proto(snapshot.last_heartbeat)),
        agent_version: snapshot.info.agent_version.clone(),
        labels: snapshot.info.labels.clone().into_iter().collect(),
        session_id: snapshot.session.map_or(0, |session| session.0),
        state_reason: snapshot.state_reason.clone(),
        termination: snapshot.termination.as_ref().map(|t| pb::TerminationInfo {
            reason: t.reason.clone(),
            requested_at: Some(wire::timestamp_to_proto(t.requested_at)),
            acknowledged: t.acknowledged,
            deadline: Some(wire::timestamp_to_proto(t.deadline)),
        }),
        maintenance: snapshot.maintenance.as_ref().map(|m| pb::MaintenanceInfo {
            reason: m.reason.clone(),
            since: Some(wire::timestamp_to_proto(m.since)),
            away_since: m.away_since.map(wire::timestamp_to_proto),
            fails_at: m.fails_at.map(wire::timestamp_to_proto),
        }),
        drain: snapshot.drain.as_ref().map(|d| pb::DrainInfo {
            reason: d.reason.clone(),
            requested_at: Some(wire::timestamp_to_proto(d.requested_at)),
            deadline: Some(wire::timestamp_to_proto(d.deadline)),
            completed: d.completed,
            then_terminate: d.then_terminate.clone().unwrap_or_default(),
        }),
        boot_id: snapshot.info.host.boot_id.clone().unwrap_or_default(),
        boot_time: snapshot.info.host.boot_time.map(wire::timestamp_to_proto),
        uptime: snapshot
            .info
            .host
            .boot_time
            .and_then(|booted| SystemTime::now().duration_since(booted).ok())
            .map(wire::duration_to_proto),
    }
}

/// The wire form of the fleet stats.
pub fn fleet_stats(stats: &FleetStats) -> pb::GetFleetStatsResponse {
    pb::GetFleetStatsResponse {
        active_nodes: stats.active_nodes,
        avg_cpu_usage: stats.avg_cpu_usage,
        nodes_by_state: by_state_name(&stats.nodes_by_state),
        unexpected_failures_total: stats.unexpected_failures_total,
        graceful_terminations_total: stats.graceful_terminations_total,
        in_service_nodes: stats.in_service_nodes,
        disrupted_nodes: stats.disrupted_nodes,
        disruption_allowed: stats.disruption_allowed,
        maintenance_nodes: stats.maintenance_nodes,
        failure_domains: stats
            .domains
            .iter()
            .map(|(name, domain)| {
                let stats = pb::FailureDomainStats {
                    nodes_by_state: by_state_name(&domain.nodes_by_state),
                    active_nodes: domain.active_nodes,
                    in_service_nodes: domain.in_service_nodes,
                    avg_cpu_usage: domain.avg_cpu_usage,
                    heals_last_hour: domain.healing.heals_last_hour,
                    healing_budget_left: domain.healing.budget_left,
                    mass_failure_guard: domain.healing.mass_failure_guard,
                };
                (name.clone(), stats)
            })
            .collect(),
        healing_paused: !stats.automation.healing,
        scaling_paused: !stats.automation.scaling,
    }
}

fn by_state_name(counts: &BTreeMap<NodeState, u32>) -> std::collections::HashMap<String, u32> {
    counts
        .iter()
        .map(|(state, count)| (node_state(*state).as_str_name().to_owned(), *count))
        .collect()
}

/// The wire form of an event.
pub fn fleet_event(event: &FleetEvent) -> pb::FleetEvent {
    let kind = match event.kind {
        EventKind::NodeJoined => pb::FleetEventType::NodeJoined,
        EventKind::NodeReconnected => pb::FleetEventType::NodeReconnected,
        EventKind::NodeSuspected => pb::FleetEventType::NodeSuspected,
        EventKind::NodeRecovered => pb::FleetEventType::NodeRecovered,
        EventKind::NodeFailed => pb::FleetEventType::NodeFailed,
        EventKind::TerminateRequested => pb::FleetEventType::TerminateRequested,
        EventKind::TerminateAcknowledged => pb::FleetEventType::TerminateAcknowledged,
        EventKind::TerminateCancelled => pb::FleetEventType::TerminateCancelled,
        EventKind::NodeTerminated => pb::FleetEventType::NodeTerminated,
        EventKind::NodeLeft => pb::FleetEventType::NodeLeft,
        EventKind::SessionFenced => pb::FleetEventType::SessionFenced,
        EventKind::NodeForgotten => pb::FleetEventType::NodeForgotten,
        EventKind::SelfHealingRequested => pb::FleetEventType::SelfHealingRequested,
        EventKind::SelfHealingHeld => pb::FleetEventType::SelfHealingHeld,
        EventKind::ScaleDecided => pb::FleetEventType::ScaleDecided,
        EventKind::WebhookDelivered => pb::FleetEventType::WebhookDelivered,
        EventKind::WebhookFailed => pb::FleetEventType::WebhookFailed,
        EventKind::WebhookDeadLettered => pb::FleetEventType::WebhookDeadLettered,
        EventKind::LeaderElected => pb::FleetEventType::LeaderElected,
        EventKind::LeaderLost => pb::FleetEventType::LeaderLost,
        EventKind::DrainRequested => pb::FleetEventType::DrainRequested,
        EventKind::NodeDrained => pb::FleetEventType::NodeDrained,
        EventKind::DrainFailed => pb::FleetEventType::DrainFailed,
        EventKind::NodeResumed => pb::FleetEventType::NodeResumed,
        EventKind::ResumeFailed => pb::FleetEventType::ResumeFailed,
        EventKind::MaintenanceStarted => pb::FleetEventType::MaintenanceStarted,
        EventKind::MaintenanceEnded => pb::FleetEventType::MaintenanceEnded,
        EventKind::MassNodeFailure => pb::FleetEventType::MassNodeFailure,
        EventKind::AutomationChanged => pb::FleetEventType::AutomationChanged,
    };
    let node = event.node.as_ref();
    pb::FleetEvent {
        sequence: event.sequence,
        time: Some(wire::timestamp_to_proto(event.time)),
        r#type: kind.into(),
        node_id: node.map(|n| n.id.to_string()).unwrap_or_default(),
        ip: node.map(|n| n.ip.to_string()).unwrap_or_default(),
        hostname: node.map(|n| n.hostname.clone()).unwrap_or_default(),
        state: node
            .map_or(pb::NodeState::Unspecified, |n| node_state(n.state))
            .into(),
        reason: event.reason.clone(),
        webhook: event.webhook.as_ref().map(|webhook| pb::WebhookRef {
            webhook_id: webhook.id.clone(),
            reason: webhook.reason.clone(),
            attempt: webhook.attempt,
            http_status: webhook.http_status.map(u32::from),
        }),
        decision: event
            .decision
            .map_or(pb::ScaleDecision::Unspecified, scale_decision)
            .into(),
        failure_domain: event.failure_domain.clone().unwrap_or_default(),
        rebooted: event.rebooted,
    }
}

/// The wire form of a scale decision.
pub fn scale_decision(decision: ScaleDecision) -> pb::ScaleDecision {
    match decision {
        ScaleDecision::Hold => pb::ScaleDecision::Hold,
        ScaleDecision::ScaleUp => pb::ScaleDecision::ScaleUp,
        ScaleDecision::ScaleDown => pb::ScaleDecision::ScaleDown,
    }
}

/// A scaling check's prediction as the API shows it.
pub fn prediction(prediction: &Prediction) -> pb::Prediction {
    let forecast = prediction.forecast.as_ref();
    let accuracy = &prediction.accuracy;
    pb::Prediction {
        timestamp: Some(wire::timestamp_to_proto(prediction.at)),
        current_cpu_usage: prediction.current_cpu_usage,
        predicted_cpu_usage: forecast.and_then(|f| f.predicted),
        horizon: Some(wire::duration_to_proto(prediction.horizon)),
        confidence: forecast
            .filter(|f| f.predicted.is_some())
            .map_or(0.0, |f| f.confidence),
        data_points: forecast.map_or(0, |f| u32::try_from(f.data_points).unwrap_or(u32::MAX)),
        model: forecast
            .filter(|f| f.predicted.is_some())
            .map_or_else(String::new, |f| f.model.name().to_owned()),
        configured_model: prediction.configured_model.name().to_owned(),
        accuracy: Some(pb::PredictionAccuracy {
            scored: accuracy.scored,
            window: u32::try_from(accuracy.window).unwrap_or(u32::MAX),
            within_10_ratio: accuracy.model.within_ratio,
            mean_absolute_error: accuracy.model.mean_absolute_error,
            bias: accuracy.model.bias,
            baseline_within_10_ratio: accuracy.baseline.within_ratio,
            baseline_mean_absolute_error: accuracy.baseline.mean_absolute_error,
            baseline_bias: accuracy.baseline.bias,
        }),
        active_nodes: prediction.active_nodes,
        decision: scale_decision(prediction.decision).into(),
        decision_reason: prediction.decision_reason.clone(),
        acted: prediction.acted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> pb::Hello {
        pb::Hello {
            node_id: uuid::Uuid::new_v4().to_string(),
            hostname: "edge-1".into(),
            ip: String::new(),
            agent_version: "0.1.0".into(),
            labels: [("region".to_owned(), "eu".to_owned())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn no_ip_and_no_peer_is_an_error() {
        assert_eq!(node_info(hello(), None).unwrap_err().field, "hello.ip");
    }

    #[test]
    fn empty_ip_falls_back_to_the_peer_address() {
        let peer: SocketAddr = "10.0.0.7:4000".parse().unwrap();
        let info = node_info(hello(), Some(peer)).unwrap();
        assert_eq!(info.ip, peer.ip());
        let reported = node_info(
            pb::Hello {
                ip: "192.0.2.1".into(),
                ..hello()
            },
            Some(peer),
        )
        .unwrap();
        assert_eq!(reported.ip.to_string(), "192.0.2.1");
    }

    #[test]
    fn bad_hellos_name_the_field() {
        let cases = [
            (
                pb::Hello {
                    node_id: "nope".into(),
                    ..hello()
                },
                "hello.node_id",
            ),
            (
                pb::Hello {
                    node_id: String::new(),
                    ..hello()
                },
                "hello.node_id",
            ),
            (
                pb::Hello {
                    ip: "999.1.1.1".into(),
                    ..hello()
                },
                "hello.ip",
            ),
            (
                pb::Hello {
                    hostname: "x".repeat(300),
                    ..hello()
                },
                "hello.hostname",
            ),
            (
                pb::Hello {
                    labels: (0..40).map(|i| (i.to_string(), String::new())).collect(),
                    ..hello()
                },
                "hello.labels",
            ),
        ];
        let peer: SocketAddr = "10.0.0.7:4000".parse().unwrap();
        for (bad, field) in cases {
            assert_eq!(node_info(bad, Some(peer)).unwrap_err().field, field);
        }
    }

    mod session_reports {
        //! Messages after the Hello: what the fleet actor is told, or why not.

        use super::*;
        use crate::error::{ErrorCode, Fault};

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
                session_report(samples(&[0.2, 0.7]), SystemTime::now()).unwrap(),
                Inbound::Cpu(0.7)
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
                    session_report(bad, SystemTime::now()).unwrap_err().code(),
                    ErrorCode::InvalidArgument
                );
            }
        }

        fn heartbeat(cpu: Option<f64>) -> pb::AgentMessage {
            pb::AgentMessage {
                kind: Some(Kind::Heartbeat(pb::Heartbeat {
                    sequence: 3,
                    cpu: cpu.map(|usage| pb::CpuSample { time: None, usage }),
                })),
            }
        }

        #[test]
        fn a_heartbeat_reports_the_sample_it_carries_or_none() {
            assert_eq!(
                session_report(heartbeat(Some(0.25)), SystemTime::now()).unwrap(),
                Inbound::Heartbeat { cpu: Some(0.25) }
            );
            assert_eq!(
                session_report(heartbeat(None), SystemTime::now()).unwrap(),
                Inbound::Heartbeat { cpu: None },
                "an older agent's bare heartbeat"
            );
        }

        #[test]
        fn a_bad_sample_in_a_heartbeat_is_invalid_argument_naming_it() {
            for bad in [f64::NAN, 85.0, -0.1, f64::INFINITY] {
                let error = session_report(heartbeat(Some(bad)), SystemTime::now()).unwrap_err();
                assert_eq!(error.code(), ErrorCode::InvalidArgument);
                assert!(error.to_string().contains("heartbeat.cpu.usage"), "{error}");
            }
        }

        #[test]
        fn a_second_hello_or_an_empty_message_is_rejected() {
            let hello = pb::AgentMessage {
                kind: Some(Kind::Hello(pb::Hello::default())),
            };
            assert_eq!(
                session_report(hello, SystemTime::now()).unwrap_err().code(),
                ErrorCode::InvalidArgument
            );
            assert_eq!(
                session_report(pb::AgentMessage { kind: None }, SystemTime::now())
                    .unwrap_err()
                    .code(),
                ErrorCode::InvalidArgument
            );
        }

        #[test]
        fn long_goodbye_reasons_are_cut_on_a_char_boundary() {
            let reason = "é".repeat(200);
            let message = pb::AgentMessage {
                kind: Some(Kind::Goodbye(pb::Goodbye { reason })),
            };
            let Inbound::Report(SessionReport::Goodbye(kept)) =
                session_report(message, SystemTime::now()).unwrap()
            else {
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
                session_report(at(Duration::from_secs(3600), true), now).is_ok(),
                "an hour of skew is tolerated"
            );
            for later in [true, false] {
                let error = session_report(at(MAX_CLOCK_SKEW * 2, later), now).unwrap_err();
                assert_eq!(error.code(), ErrorCode::InvalidArgument);
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
                    if let Ok(Inbound::Cpu(usage)) = session_report(message, SystemTime::now()) {
                        prop_assert!((0.0..=1.0).contains(&usage));
                    }
                }

                #[test]
                fn arbitrary_bytes_never_panic_the_decoder_or_the_validator(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                    if let Ok(message) = pb::AgentMessage::decode(bytes.as_slice()) {
                        let _ = session_report(message.clone(), SystemTime::now());
                        if let Some(Kind::Hello(hello)) = message.kind {
                            let _ = node_info(hello, None);
                        }
                    }
                }

                #[test]
                fn hellos_are_accepted_only_with_a_real_node_id(node_id in ".{0,40}", ip in ".{0,20}") {
                    let hello = pb::Hello { node_id: node_id.clone(), ip, ..Default::default() };
                    if let Ok(info) = node_info(hello, None) {
                        prop_assert!(!info.id.0.is_nil());
                        prop_assert_eq!(uuid::Uuid::parse_str(node_id.trim()).ok(), Some(info.id.0));
                    }
                }
            }
        }
    }
}
