//! `FleetService`: the operator API over the fleet actor.

use secbeat::{pb, wire::WireError};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span};

use super::{convert, status, watch};
use crate::{
    domain::registry::{DrainRequest, DrainThenTerminate},
    domain::selector::{NodeFilter, Selector},
    edge::auth::{Authority, Need},
    edge::request,
    error::UnknownNode,
    runtime::fleet::AutomationChange,
    runtime::role::Role,
};

/// An operator's reason (see [`request::reason`]), as a status.
fn reason(field: &'static str, given: String) -> Result<String, Status> {
    request::reason(field, given).map_err(status::invalid)
}

/// A label selector field, as a status.
fn selector(field: &'static str, text: &str) -> Result<Selector, Status> {
    request::selector(field, text).map_err(status::invalid)
}

/// A drain deadline from the wire (unset: `drain_deadline`), as a status.
fn drain_deadline(
    field: &'static str,
    given: Option<prost_types::Duration>,
) -> Result<Option<std::time::Duration>, Status> {
    let given = given
        .map(|given| secbeat::wire::duration_from_proto(field, Some(given)))
        .transpose()
        .map_err(status::invalid)?;
    request::drain_deadline(field, given).map_err(status::invalid)
}

/// The `FleetService` implementation.
#[derive(Debug, Clone)]
pub struct FleetApi {
    role: Role,
    authority: Authority,
}

impl FleetApi {
    /// A service answering from the leader term's fleet actor and event bus (a
    /// standby refuses with the leader's URL) to callers `authority` admits.
    pub fn new(role: Role, authority: Authority) -> Self {
        Self { role, authority }
    }

    fn allow<T>(&self, request: &Request<T>, need: Need) -> Result<(), Status> {
        let caller = super::caller(&self.authority, request);
        self.authority.allow(&caller, need).map_err(Status::from)
    }
}

#[tonic::async_trait]
impl pb::fleet_service_server::FleetService for FleetApi {
    type WatchEventsStream = ReceiverStream<Result<pb::FleetEvent, Status>>;

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.allow(&request, Need::Read)?;
        let request = request.into_inner();
        let mut states = Vec::with_capacity(request.states.len());
        for raw in &request.states {
            match pb::NodeState::try_from(*raw)
                .ok()
                .and_then(convert::node_state_from_proto)
            {
                Some(state) => states.push(state),
                None => {
                    return Err(status::invalid(WireError::new(
                        "states",
                        format!("{raw} is not a node state"),
                    )));
                }
            }
        }
        let filter = NodeFilter {
            selector: selector("label_selector", &request.label_selector)?,
            states,
        };
        let (nodes, sequence) = self.role.leading()?.fleet.list_matching(filter).await?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.iter().map(convert::node).collect(),
            sequence,
        }))
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::GetNodeResponse>, Status> {
        self.allow(&request, Need::Read)?;
        let id = convert::node_id("node_id", &request.into_inner().node_id).map_err(status::invalid)?;
        let node = self.role.leading()?.fleet.get(id).await?.ok_or(UnknownNode(id))?;
        Ok(Response::new(pb::GetNodeResponse {
            node: Some(convert::node(&node)),
        }))
    }

    async fn terminate_node(
        &self,
        request: Request<pb::TerminateNodeRequest>,
    ) -> Result<Response<pb::TerminateNodeResponse>, Status> {
        self.allow(&request, Need::Operate)?;
        let parent = request
            .metadata()
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let request = request.into_inner();
        let id = convert::node_id("node_id", &request.node_id).map_err(status::invalid)?;
        let reason = reason("reason", request.reason)?;
        let deadline = drain_deadline("drain_deadline", request.drain_deadline)?;
        let span = info_span!("terminate_node", node.id = %id, reason = %reason, drain = request.drain);
        if let Some(parent) = &parent {
            secbeat::telemetry::set_parent(&span, parent);
        }
        span.in_scope(|| info!(node.id = %id, %reason, drain = request.drain, "terminate node requested"));
        let fleet = &self.role.leading()?.fleet;
        if !request.drain {
            let accepted = fleet.terminate(id, reason).instrument(span).await??;
            return Ok(Response::new(pb::TerminateNodeResponse {
                node: Some(convert::node(&accepted.node)),
                already_terminating: accepted.already_terminating,
                grace_period: Some(secbeat::wire::duration_to_proto(accepted.grace_period)),
                draining_first: false,
            }));
        }
        let drain = DrainRequest {
            reason: format!("drain before terminate: {reason}"),
            deadline,
            force: request.force,
        };
        let drained = fleet.drain_then_terminate(id, reason, drain);
        let response = match drained.instrument(span).await?? {
            DrainThenTerminate::Terminating(accepted) => pb::TerminateNodeResponse {
                node: Some(convert::node(&accepted.node)),
                already_terminating: accepted.already_terminating,
                grace_period: Some(secbeat::wire::duration_to_proto(accepted.grace_period)),
                draining_first: false,
            },
            DrainThenTerminate::Draining(accepted) => pb::TerminateNodeResponse {
                node: Some(convert::node(&accepted.node)),
                already_terminating: false,
                grace_period: None,
                draining_first: true,
            },
        };
        Ok(Response::new(response))
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        self.allow(&request, Need::Operate)?;
        let request = request.into_inner();
        let id = convert::node_id("node_id", &request.node_id).map_err(status::invalid)?;
        let drain = DrainRequest {
            reason: reason("reason", request.reason)?,
            deadline: drain_deadline("deadline", request.deadline)?,
            force: request.force,
        };
        info!(node.id = %id, reason = %drain.reason, force = drain.force, "drain node requested");
        let accepted = self.role.leading()?.fleet.drain(id, drain).await??;
        Ok(Response::new(pb::DrainNodeResponse {
            node: Some(convert::node(&accepted.node)),
            already_draining: accepted.already_draining,
            deadline: Some(secbeat::wire::duration_to_proto(accepted.deadline)),
        }))
    }

    async fn resume_node(
        &self,
        request: Request<pb::ResumeNodeRequest>,
    ) -> Result<Response<pb::ResumeNodeResponse>, Status> {
        self.allow(&request, Need::Operate)?;
        let request = request.into_inner();
        let id = convert::node_id("node_id", &request.node_id).map_err(status::invalid)?;
        let reason = reason("reason", request.reason)?;
        info!(node.id = %id, %reason, "resume node requested");
        let node = self.role.leading()?.fleet.resume(id, reason).await??;
        Ok(Response::new(pb::ResumeNodeResponse {
            node: Some(convert::node(&node)),
        }))
    }

    async fn set_automation(
        &self,
        request: Request<pb::SetAutomationRequest>,
    ) -> Result<Response<pb::SetAutomationResponse>, Status> {
        self.allow(&request, Need::Operate)?;
        let request = request.into_inner();
        let change = AutomationChange {
            healing: request.healing,
            scaling: request.scaling,
            reason: reason("reason", request.reason)?,
        };
        info!(healing = ?change.healing, scaling = ?change.scaling, reason = %change.reason, "automation change requested");
        let (automation, resumed) = self.role.leading()?.fleet.set_automation(change).await?;
        Ok(Response::new(pb::SetAutomationResponse {
            healing: automation.healing,
            scaling: automation.scaling,
            resumed_failures: resumed,
        }))
    }

    async fn set_maintenance(
        &self,
        request: Request<pb::SetMaintenanceRequest>,
    ) -> Result<Response<pb::SetMaintenanceResponse>, Status> {
        self.allow(&request, Need::Operate)?;
        let request = request.into_inner();
        let id = convert::node_id("node_id", &request.node_id).map_err(status::invalid)?;
        let reason = reason("reason", request.reason)?;
        info!(node.id = %id, enabled = request.enabled, %reason, "maintenance change requested");
        let (node, changed) = self
            .role
            .leading()?
            .fleet
            .set_maintenance(id, request.enabled, reason)
            .await??;
        Ok(Response::new(pb::SetMaintenanceResponse {
            node: Some(convert::node(&node)),
            changed,
        }))
    }

    async fn get_fleet_stats(
        &self,
        request: Request<pb::GetFleetStatsRequest>,
    ) -> Result<Response<pb::GetFleetStatsResponse>, Status> {
        self.allow(&request, Need::Read)?;
        let selector = selector("label_selector", &request.into_inner().label_selector)?;
        let stats = self.role.leading()?.fleet.stats_matching(selector).await?;
        Ok(Response::new(convert::fleet_stats(&stats)))
    }

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.allow(&request, Need::Read)?;
        let request = request.into_inner();
        let wanted = selector("label_selector", &request.label_selector)?;
        let subscription = self.role.leading()?.events.subscribe(request.since_sequence)?;
        let keep = move |event: &crate::domain::event::FleetEvent| {
            wanted.is_empty()
                || event
                    .node
                    .as_ref()
                    .is_some_and(|node| wanted.matches(&node.labels))
        };
        let backlog = subscription
            .backlog
            .iter()
            .filter(|event| keep(event))
            .map(convert::fleet_event)
            .collect();
        let stream = watch::forward(subscription.live, backlog, "events", move |event| {
            keep(event).then(|| convert::fleet_event(event))
        });
        Ok(Response::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use secbeat::pb::fleet_service_server::FleetService;
    use tokio_stream::StreamExt;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::{clock, domain::node::NodeId, runtime::bus::LIVE_BUFFER, runtime::fleet};

    fn fleet_settings() -> fleet::FleetSettings {
        let lifecycle = crate::domain::registry::LifecycleConfig {
            heartbeat_timeout: std::time::Duration::from_secs(30),
            dead_node_check_interval: std::time::Duration::from_secs(10),
            required_consecutive_failures: 2,
            termination_deadline: std::time::Duration::from_secs(30),
            termination_grace_period: std::time::Duration::from_secs(30),
            node_retention: std::time::Duration::from_secs(3600),
            disruption: Default::default(),
        };
        fleet::FleetSettings {
            lifecycle,
            heartbeat_interval: std::time::Duration::from_secs(10),
            ..fleet::tests::settings()
        }
    }

    fn node_info() -> crate::domain::node::NodeInfo {
        crate::domain::node::NodeInfo {
            id: NodeId(uuid::Uuid::new_v4()),
            hostname: "edge".into(),
            ip: "10.0.0.1".parse().unwrap(),
            agent_version: "test".into(),
            labels: Default::default(),
            host: Default::default(),
        }
    }

    /// A fleet actor and a FleetService over it (no credentials configured).
    fn serving() -> (CancellationToken, fleet::tests::TestFleet, FleetApi) {
        let shutdown = CancellationToken::new();
        let test = fleet::tests::start(fleet_settings(), fleet::Restored::default(), &shutdown);
        let role = crate::runtime::role::Role::fixed(crate::runtime::role::Leading {
            fleet: test.handle.clone(),
            predictions: crate::runtime::scaling_loop::PredictionHandle::none(),
            events: test.bus.clone(),
            store: Default::default(),
        });
        let api = FleetApi::new(role, Default::default());
        (shutdown, test, api)
    }

    #[tokio::test]
    async fn a_watcher_that_cannot_keep_up_is_dropped_with_resource_exhausted() {
        let (shutdown, fleet::tests::TestFleet { handle, bus, .. }, api) = serving();
        let first = bus.last_sequence() + 1;
        let mut stream = api
            .watch_events(Request::new(pb::WatchEventsRequest::default()))
            .await
            .unwrap()
            .into_inner();

        // Far more events than the shared buffer plus this watcher's own buffer hold.
        let published = LIVE_BUFFER + watch::STREAM_BUFFER + 200;
        for _ in 0..published {
            let (tx, _) = fleet::session_signals();
            handle.connect(node_info(), tx, clock::now()).await.unwrap();
        }
        let mut delivered = 0;
        let ended = loop {
            match stream.next().await {
                Some(Ok(event)) => {
                    assert_eq!(event.sequence, first + delivered, "events in order until the cut");
                    delivered += 1;
                }
                Some(Err(status)) => break status,
                None => panic!("stream ended without a status"),
            }
        };
        assert_eq!(ended.code(), tonic::Code::ResourceExhausted, "{ended:?}");
        assert!((delivered as usize) < published, "{delivered} of {published}");
        assert!(stream.next().await.is_none(), "nothing after the status");
        // The orchestrator itself was never slowed: it still answers.
        assert_eq!(handle.stats().await.unwrap().active_nodes as usize, published);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn watchers_are_told_when_the_orchestrator_shuts_down() {
        let (shutdown, fleet::tests::TestFleet { actor, bus, .. }, api) = serving();
        let mut stream = api
            .watch_events(Request::new(pb::WatchEventsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        shutdown.cancel();
        actor.await.unwrap();
        // The server closes the bus once the publishers have stopped.
        bus.close();
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn list_then_watch_from_its_sequence_replays_what_came_after() {
        let (shutdown, fleet::tests::TestFleet { handle, .. }, api) = serving();
        let (tx, _) = fleet::session_signals();
        let early = node_info();
        handle.connect(early.clone(), tx, clock::now()).await.unwrap();
        let listed = api
            .list_nodes(Request::new(pb::ListNodesRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.nodes.len(), 1);
        // A node joins between the list and the watch.
        let (tx, _) = fleet::session_signals();
        let late = node_info();
        handle.connect(late.clone(), tx, clock::now()).await.unwrap();
        let mut stream = api
            .watch_events(Request::new(pb::WatchEventsRequest {
                since_sequence: Some(listed.sequence),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let replayed = stream.next().await.unwrap().unwrap();
        assert_eq!(replayed.sequence, listed.sequence + 1);
        assert_eq!(
            replayed.node_id,
            late.id.to_string(),
            "only what the list did not reflect"
        );
        assert_eq!(replayed.r#type(), pb::FleetEventType::NodeJoined);

        // A sequence from before what is kept (here: from an earlier run).
        let gone = api
            .watch_events(Request::new(pb::WatchEventsRequest {
                since_sequence: Some(7),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(gone.code(), tonic::Code::OutOfRange);
        assert!(gone.message().contains("oldest kept"), "{}", gone.message());
        shutdown.cancel();
    }
}
