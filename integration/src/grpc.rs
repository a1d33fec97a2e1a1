//! FleetService helpers and hand-driven agent streams for protocol tests.

use std::time::Duration;

use anyhow::Context;
use secbeat::pb::{self, agent_service_client::AgentServiceClient, fleet_service_client::FleetServiceClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::eventually;

/// The node's current record, if the orchestrator knows it.
pub async fn node(fleet: &mut FleetServiceClient<Channel>, node_id: &str) -> Option<pb::Node> {
    let request = pb::GetNodeRequest {
        node_id: node_id.to_owned(),
    };
    fleet.get_node(request).await.ok()?.into_inner().node
}

/// The fleet's current figures.
pub async fn fleet_stats(fleet: &mut FleetServiceClient<Channel>) -> pb::GetFleetStatsResponse {
    fleet
        .get_fleet_stats(pb::GetFleetStatsRequest::default())
        .await
        .expect("GetFleetStats")
        .into_inner()
}

/// Waits until the node is in `state` and returns its record.
pub async fn wait_for_state(
    fleet: &mut FleetServiceClient<Channel>,
    node_id: &str,
    state: pb::NodeState,
    timeout: Duration,
) -> pb::Node {
    let what = format!("node {node_id} to be {}", state.as_str_name());
    eventually(timeout, &what, || {
        let mut fleet = fleet.clone();
        async move { node(&mut fleet, node_id).await.filter(|n| n.state() == state) }
    })
    .await
}

/// Reads events until one matches, or fails after `timeout`.
pub async fn next_event_matching(
    events: &mut tonic::Streaming<pb::FleetEvent>,
    timeout: Duration,
    mut matches: impl FnMut(&pb::FleetEvent) -> bool,
) -> anyhow::Result<pb::FleetEvent> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let event = tokio::time::timeout_at(deadline, events.message())
            .await
            .context("no matching event in time")??
            .context("event stream ended")?;
        if matches(&event) {
            return Ok(event);
        }
    }
}

/// A hand-driven agent stream for protocol tests: what it sends is up to the test.
pub struct RawStream {
    /// Sends messages up the stream; drop to half-close.
    pub outbound: mpsc::Sender<pb::AgentMessage>,
    /// The orchestrator's answers.
    pub inbound: tonic::Streaming<pb::ControlMessage>,
}

/// Opens `AgentService.Connect` with `first` already queued.
pub async fn raw_connect(
    client: &mut AgentServiceClient<Channel>,
    first: Vec<pb::AgentMessage>,
) -> Result<RawStream, tonic::Status> {
    raw_connect_as(client, first, None).await
}

/// Like [`raw_connect`], presenting `authorization` (e.g. `Bearer <token>`).
pub async fn raw_connect_as(
    client: &mut AgentServiceClient<Channel>,
    first: Vec<pb::AgentMessage>,
    authorization: Option<&str>,
) -> Result<RawStream, tonic::Status> {
    let (outbound, requests) = mpsc::channel(64);
    for message in first {
        outbound.send(message).await.expect("queue");
    }
    let mut request = tonic::Request::new(ReceiverStream::new(requests));
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().expect("a valid header value"));
    }
    let inbound = client.connect(request).await?.into_inner();
    Ok(RawStream { outbound, inbound })
}

/// A Hello for `node_id`.
pub fn hello(node_id: Uuid) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            node_id: node_id.to_string(),
            hostname: "raw-test".into(),
            ip: "192.0.2.10".into(),
            agent_version: "test".into(),
            labels: Default::default(),
            ..Default::default()
        })),
    }
}

/// A CpuSamples message with the given usages.
pub fn cpu_samples(usages: &[f64]) -> pb::AgentMessage {
    let samples = usages
        .iter()
        .map(|usage| pb::CpuSample {
            time: None,
            usage: *usage,
        })
        .collect();
    pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::CpuSamples(pb::CpuSamples { samples })),
    }
}

/// A Heartbeat message without a sample (as older agents send it).
pub fn heartbeat(sequence: u64) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Heartbeat(pb::Heartbeat {
            sequence,
            cpu: None,
        })),
    }
}

/// A Heartbeat carrying the interval's CPU sample (as current agents send it).
pub fn heartbeat_with_cpu(sequence: u64, usage: f64) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Heartbeat(pb::Heartbeat {
            sequence,
            cpu: Some(pb::CpuSample { time: None, usage }),
        })),
    }
}
