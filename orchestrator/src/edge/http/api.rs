//! The HTTP/JSON API (`/api/v1/...`): the fleet's figures, the latest prediction
//! and its accuracy, and the nodes, with the seed's field names. Errors are JSON
//! `{"error": "..."}` with the status the one error table ([`crate::error`]) gives
//! the fault, as the gRPC API gives its code.

use axum::{
    Json,
    extract::{
        Path, Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use serde_json::{Value, json};

use super::AppState;
use crate::{
    domain::forecast::AccuracySummary,
    domain::node::{NodeId, NodeSnapshot, NodeState},
    domain::registry::{DrainRequest, DrainThenTerminate},
    domain::selector::{NodeFilter, Page, Selector, SortKey},
    edge::auth::Need,
    error::{Fault, UnknownEndpoint, UnknownNode},
    runtime::scaling_loop::Prediction,
};

/// An API error: a status and a message, sent as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self(status, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

/// Every fault maps to its HTTP status through the one error table, as it maps to
/// its gRPC code.
impl<F: Fault> From<F> for ApiError {
    fn from(fault: F) -> Self {
        let status = StatusCode::from_u16(fault.code().http()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError(status, fault.to_string())
    }
}

/// `/api/*` needs the operator or viewer token when tokens are configured (HTTP
/// has no client certificates); health and metrics stay open. Calls that change
/// the fleet (POST) need the operator token whenever any credential is
/// configured: with only client certificates, HTTP cannot prove an operator.
pub async fn require_token(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.uri().path().starts_with("/api/") {
        let authorization = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        // Client certificates do not apply here: only tokens can open the API.
        let authority = &state.authority;
        let caller = authority.identify(&[], authorization);
        let changes =
            request.method() != axum::http::Method::GET && request.method() != axum::http::Method::HEAD;
        let need = if changes { Need::Operate } else { Need::Read };
        let check = if changes {
            authority.enforcing()
        } else {
            authority.tokens_configured()
        };
        if check && let Err(denied) = authority.allow(&caller, need) {
            return ApiError::from(denied).into_response();
        }
    }
    next.run(request).await
}

/// `GET /api/v1/whoami`: what the caller may do here (`operator`, `viewer`), so the
/// console shows actions only to those who may take them.
pub async fn whoami(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Json<Value> {
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let authority = &state.authority;
    let caller = authority.identify(&[], authorization);
    let role = if authority.allow(&caller, Need::Operate).is_ok() {
        "operator"
    } else if authority.allow(&caller, Need::Read).is_ok() {
        "viewer"
    } else {
        "anonymous"
    };
    Json(json!({ "role": role, "credentials_required": authority.tokens_configured() }))
}

/// The query of `/api/v1/fleet/stats`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// A label selector (`pop=fra1,role!=canary`).
    selector: Option<String>,
}

/// A query parameter selector (`pop=fra1,role!=canary`; none: every node).
fn selector(text: Option<&str>) -> Result<Selector, ApiError> {
    Ok(crate::edge::request::selector(
        "selector",
        text.unwrap_or_default(),
    )?)
}

/// A query parameter list of states (`connected,drained`; none: any).
fn states(text: Option<&str>) -> Result<Vec<NodeState>, ApiError> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    text.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            let wanted = name.to_ascii_lowercase();
            let wanted = wanted.strip_prefix("node_state_").unwrap_or(&wanted);
            NodeState::ALL
                .into_iter()
                .find(|state| state.as_str() == wanted)
                .ok_or_else(|| {
                    secbeat::wire::WireError::new(
                        "state",
                        format!("{name:?} is not a node state (connected, suspect, failed, terminating, terminated, left, draining, drained)"),
                    )
                    .into()
                })
        })
        .collect()
}

/// A query string, or a JSON 400 naming what is wrong with it.
fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(query)| query)
        .map_err(|rejection| ApiError(StatusCode::BAD_REQUEST, rejection.body_text()))
}

/// `GET /api/v1/fleet/stats[?selector=]`.
pub async fn fleet_stats(
    State(state): State<AppState>,
    request: Result<Query<StatsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let leading = state.role.leading()?;
    let selector = selector(query(request)?.selector.as_deref())?;
    let stats = leading.fleet.stats_matching(selector).await?;
    let latest = leading.predictions.latest();
    let nodes_by_state: serde_json::Map<String, Value> = stats
        .nodes_by_state
        .iter()
        .map(|(state, count)| (state.as_str().to_owned(), json!(count)))
        .collect();
    let total: u32 = stats.nodes_by_state.values().sum();
    Ok(Json(json!({
        "active_nodes": stats.active_nodes,
        "total_nodes": total,
        "avg_cpu_usage": stats.avg_cpu_usage,
        "nodes_by_state": nodes_by_state,
        "unexpected_failures_total": stats.unexpected_failures_total,
        "graceful_terminations_total": stats.graceful_terminations_total,
        "in_service_nodes": stats.in_service_nodes,
        "disrupted_nodes": stats.disrupted_nodes,
        "disruption_allowed": stats.disruption_allowed,
        "maintenance_nodes": stats.maintenance_nodes,
        "webhook_outbox_depth": state.metrics.webhook_outbox_depth.get(),
        "webhook_outbox_oldest_age_seconds": state.metrics.webhook_outbox_oldest_age_seconds.get(),
        "webhook_dead_letters_total": state.metrics.webhook_dead_letters.get(),
        "held_failures": held_failures(&leading).await?,
        "healing_paused": !stats.automation.healing,
        "scaling_paused": !stats.automation.scaling,
        "failure_domains": stats.domains.iter().map(|(name, domain)| {
            let by_state: serde_json::Map<String, Value> = domain
                .nodes_by_state
                .iter()
                .map(|(state, count)| (state.as_str().to_owned(), json!(count)))
                .collect();
            (name.clone(), json!({
                "nodes_by_state": by_state,
                "active_nodes": domain.active_nodes,
                "in_service_nodes": domain.in_service_nodes,
                "avg_cpu_usage": domain.avg_cpu_usage,
                "heals_last_hour": domain.healing.heals_last_hour,
                "healing_budget_left": domain.healing.budget_left,
                "mass_failure_guard": domain.healing.mass_failure_guard,
            }))
        }).collect::<serde_json::Map<String, Value>>(),
        "cpu_history_points": latest.as_ref().and_then(|p| p.forecast.as_ref()).map_or(0, |f| f.data_points),
        "prediction": latest.as_deref().map(prediction_json),
        "accuracy": latest.as_deref().map(|latest| accuracy_json(&latest.accuracy)),
    })))
}

/// Failed nodes whose self-healing was held, and why (the latest word on each,
/// from the kept events), for the console's fleet view.
async fn held_failures(leading: &crate::runtime::role::Leading) -> Result<Vec<Value>, ApiError> {
    use crate::domain::event::EventKind;
    let filter = NodeFilter {
        states: vec![NodeState::Failed],
        ..NodeFilter::default()
    };
    let (failed, _) = leading.fleet.list_matching(filter).await?;
    let failed: std::collections::HashSet<NodeId> = failed.iter().map(|node| node.info.id).collect();
    let mut latest: std::collections::BTreeMap<NodeId, crate::domain::event::FleetEvent> = Default::default();
    for event in leading.events.kept(|event| {
        matches!(
            event.kind,
            EventKind::SelfHealingHeld | EventKind::SelfHealingRequested
        ) && event.node_id().is_some_and(|id| failed.contains(&id))
    }) {
        latest.insert(event.node_id().expect("filtered"), event);
    }
    Ok(latest
        .values()
        .filter(|event| event.kind == EventKind::SelfHealingHeld)
        .take(50)
        .map(|event| {
            json!({
                "node_id": event.node_id().map(|id| id.to_string()),
                "hostname": event.node.as_ref().map(|node| node.hostname.clone()),
                "reason": event.reason,
                "time": secbeat::wire::rfc3339(event.time),
            })
        })
        .collect())
}

fn prediction_json(prediction: &Prediction) -> Value {
    let forecast = prediction.forecast.as_ref();
    json!({
        "timestamp": secbeat::wire::rfc3339(prediction.at),
        "current_cpu_usage": prediction.current_cpu_usage,
        "predicted_cpu_usage": forecast.and_then(|f| f.predicted),
        "prediction_horizon_minutes": prediction.horizon.as_secs_f64() / 60.0,
        "confidence": forecast.filter(|f| f.predicted.is_some()).map(|f| f.confidence),
        "data_points": forecast.map_or(0, |f| f.data_points),
        "model": forecast.filter(|f| f.predicted.is_some()).map(|f| f.model.name()),
        "configured_model": prediction.configured_model.name(),
        "decision": prediction.decision.as_str(),
        "decision_reason": prediction.decision_reason,
        "acted": prediction.acted,
    })
}

fn accuracy_json(accuracy: &AccuracySummary) -> Value {
    json!({
        "scored": accuracy.scored,
        "window": accuracy.window,
        "within_10_ratio": accuracy.model.within_ratio,
        "mean_absolute_error": accuracy.model.mean_absolute_error,
        "bias": accuracy.model.bias,
        "baseline": {
            "within_10_ratio": accuracy.baseline.within_ratio,
            "mean_absolute_error": accuracy.baseline.mean_absolute_error,
            "bias": accuracy.baseline.bias,
        },
    })
}

/// A node as the JSON API shows it.
#[derive(Debug, Serialize)]
struct NodeJson {
    node_id: String,
    hostname: String,
    ip: String,
    state: NodeState,
    state_reason: String,
    last_cpu_usage: Option<f64>,
    connected_since: String,
    last_heartbeat: String,
    agent_version: String,
    labels: std::collections::BTreeMap<String, String>,
    session_id: Option<u64>,
    termination: Option<Value>,
    maintenance: Option<Value>,
    drain: Option<Value>,
}

fn node_json(node: &NodeSnapshot) -> NodeJson {
    NodeJson {
        node_id: node.info.id.to_string(),
        hostname: node.info.hostname.clone(),
        ip: node.info.ip.to_string(),
        state: node.state,
        state_reason: node.state_reason.clone(),
        last_cpu_usage: node.last_cpu_usage,
        connected_since: secbeat::wire::rfc3339(node.connected_since),
        last_heartbeat: secbeat::wire::rfc3339(node.last_heartbeat),
        agent_version: node.info.agent_version.clone(),
        labels: node.info.labels.clone(),
        session_id: node.session.map(|s| s.0),
        termination: node.termination.as_ref().map(|t| {
            json!({
                "reason": t.reason,
                "requested_at": secbeat::wire::rfc3339(t.requested_at),
                "acknowledged": t.acknowledged,
                "deadline": secbeat::wire::rfc3339(t.deadline),
            })
        }),
        maintenance: node.maintenance.as_ref().map(|m| {
            json!({
                "reason": m.reason,
                "since": secbeat::wire::rfc3339(m.since),
                "away_since": m.away_since.map(secbeat::wire::rfc3339),
                "fails_at": m.fails_at.map(secbeat::wire::rfc3339),
            })
        }),
        drain: node.drain.as_ref().map(|d| {
            json!({
                "reason": d.reason,
                "requested_at": secbeat::wire::rfc3339(d.requested_at),
                "deadline": secbeat::wire::rfc3339(d.deadline),
                "completed": d.completed,
                "then_terminate": d.then_terminate,
            })
        }),
    }
}

/// The query of `/api/v1/nodes`: filters, then order and a page.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodesQuery {
    /// A label selector (`pop=fra1,role!=canary`).
    selector: Option<String>,
    /// States, comma-separated (`connected,drained`).
    state: Option<String>,
    /// id (default), hostname, state, cpu or heartbeat.
    sort: Option<String>,
    /// asc (default) or desc.
    order: Option<String>,
    /// At most this many nodes (default: all; at most 10,000).
    limit: Option<usize>,
    /// Skip this many first.
    offset: Option<usize>,
}

/// Most nodes one page may hold.
const MAX_PAGE: usize = 10_000;

/// `GET /api/v1/nodes[?selector=&state=&sort=&order=&limit=&offset=]`: the
/// server filters, orders and pages, so a console stays quick at 50,000 nodes.
/// `total` counts the nodes the filters kept.
pub async fn nodes(
    State(state): State<AppState>,
    request: Result<Query<NodesQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let query = query(request)?;
    let filter = NodeFilter {
        selector: selector(query.selector.as_deref())?,
        states: states(query.state.as_deref())?,
    };
    let by = query
        .sort
        .as_deref()
        .unwrap_or("id")
        .parse::<SortKey>()
        .map_err(|message| secbeat::wire::WireError::new("sort", message))?;
    let descending = match query.order.as_deref().unwrap_or("asc") {
        "asc" => false,
        "desc" => true,
        other => {
            return Err(
                secbeat::wire::WireError::new("order", format!("{other:?} is not asc or desc")).into(),
            );
        }
    };
    let page = Page {
        by,
        descending,
        offset: query.offset.unwrap_or(0),
        limit: query.limit.unwrap_or(MAX_PAGE).min(MAX_PAGE),
    };
    let (nodes, total, sequence) = state.role.leading()?.fleet.page(filter, page).await?;
    let page: Vec<NodeJson> = nodes.iter().map(node_json).collect();
    Ok(Json(
        json!({ "nodes": page, "sequence": sequence, "total": total }),
    ))
}

/// `GET /api/v1/nodes/{id}`.
pub async fn node(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = node_id(&id)?;
    let node = state
        .role
        .leading()?
        .fleet
        .get(id)
        .await?
        .ok_or(UnknownNode(id))?;
    Ok(Json(json!(node_json(&node))))
}

/// `GET /api/v1/nodes/{id}/events`: the kept events about one node, oldest first.
pub async fn node_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = node_id(&id)?;
    let leading = state.role.leading()?;
    let events: Vec<Value> = leading
        .events
        .kept(|event| event.node_id() == Some(id))
        .iter()
        .map(event_json)
        .collect();
    Ok(Json(json!({ "node_id": id.to_string(), "events": events })))
}

/// The node id in a path (`/api/v1/nodes/{id}/...`); a 400 naming `node_id`.
fn node_id(text: &str) -> Result<NodeId, ApiError> {
    Ok(secbeat::wire::parse_node_id("node_id", text).map(NodeId)?)
}

/// An event as the JSON API and the event stream show it.
pub fn event_json(event: &crate::domain::event::FleetEvent) -> Value {
    let kind = crate::edge::grpc::convert::fleet_event(event)
        .r#type()
        .as_str_name();
    let kind = kind.trim_start_matches("FLEET_EVENT_TYPE_").to_ascii_lowercase();
    json!({
        "sequence": event.sequence,
        "time": secbeat::wire::rfc3339(event.time),
        "type": kind,
        "node_id": event.node.as_ref().map(|node| node.id.to_string()),
        "ip": event.node.as_ref().map(|node| node.ip.to_string()),
        "hostname": event.node.as_ref().map(|node| node.hostname.clone()),
        "state": event.node.as_ref().map(|node| node.state.as_str()),
        "reason": event.reason,
        "failure_domain": event.failure_domain,
        "rebooted": event.rebooted,
        "decision": event.decision.map(|decision| decision.as_str()),
        "webhook": event.webhook.as_ref().map(|webhook| json!({
            "webhook_id": webhook.id,
            "reason": webhook.reason,
            "attempt": webhook.attempt,
            "http_status": webhook.http_status,
        })),
    })
}

/// `GET /api/v1/predictions`: the recent scaling checks, oldest first, for the
/// console's chart: fleet CPU at each check, and what was predicted for its
/// target time with the confidence stated. After a restart or a failover the
/// chart starts with the earlier runs' checks, remade from the stored history
/// (`restored: true`, `decision: null`: decisions are not stored).
pub async fn predictions(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let chart = state.role.leading()?.predictions.chart();
    let points: Vec<Value> = chart
        .points
        .iter()
        .map(|point| {
            let predicted = point.predicted;
            json!({
                "timestamp": secbeat::wire::rfc3339(point.at),
                "current_cpu_usage": point.current_cpu_usage,
                "predicted_cpu_usage": predicted.map(|(value, _, _)| value),
                "target": point.target.map(secbeat::wire::rfc3339),
                "confidence": predicted.map(|(_, confidence, _)| confidence),
                "model": predicted.map(|(_, _, model)| model.name()),
                "decision": point.decision.map(|decision| decision.as_str()),
                "restored": point.decision.is_none(),
            })
        })
        .collect();
    let accuracy = chart.accuracy.as_ref().map(accuracy_json);
    Ok(Json(json!({ "predictions": points, "accuracy": accuracy })))
}

/// A JSON request body, or a 400 naming what is wrong with it.
fn body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(body)| body)
        .map_err(|rejection| ApiError(StatusCode::BAD_REQUEST, rejection.body_text()))
}

/// The body of `POST /api/v1/nodes/{id}/terminate`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminateBody {
    reason: Option<String>,
    /// Drain first (as TerminateNode's `drain`).
    #[serde(default)]
    drain: bool,
    /// Beyond the disruption budget.
    #[serde(default)]
    force: bool,
}

/// `POST /api/v1/nodes/{id}/terminate` (operator): TerminateNode.
pub async fn terminate(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: Result<Json<TerminateBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = node_id(&id)?;
    let request = body(request)?;
    let reason = crate::edge::request::reason("reason", request.reason.unwrap_or_default())?;
    let fleet = &state.role.leading()?.fleet;
    tracing::info!(node.id = %id, %reason, drain = request.drain, "terminate node requested over HTTP");
    if !request.drain {
        let accepted = fleet.terminate(id, reason).await??;
        return Ok(Json(json!({
            "node": node_json(&accepted.node),
            "already_terminating": accepted.already_terminating,
        })));
    }
    let drain = DrainRequest {
        reason: format!("drain before terminate: {reason}"),
        deadline: None,
        force: request.force,
    };
    let node = match fleet.drain_then_terminate(id, reason, drain).await?? {
        DrainThenTerminate::Draining(accepted) => accepted.node,
        DrainThenTerminate::Terminating(accepted) => accepted.node,
    };
    Ok(Json(json!({ "node": node_json(&node) })))
}

/// The body of `POST /api/v1/nodes/{id}/drain`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainBody {
    reason: Option<String>,
    /// The hook's time budget, seconds (default `drain_deadline`).
    deadline_seconds: Option<f64>,
    #[serde(default)]
    force: bool,
}

/// `POST /api/v1/nodes/{id}/drain` (operator): DrainNode.
pub async fn drain(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: Result<Json<DrainBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = node_id(&id)?;
    let request = body(request)?;
    let deadline = request
        .deadline_seconds
        .map(|seconds| {
            std::time::Duration::try_from_secs_f64(seconds).map_err(|_| {
                secbeat::wire::WireError::new("deadline_seconds", format!("{seconds} is not a duration"))
            })
        })
        .transpose()?;
    let drain = DrainRequest {
        reason: crate::edge::request::reason("reason", request.reason.unwrap_or_default())?,
        deadline: crate::edge::request::drain_deadline("deadline_seconds", deadline)?,
        force: request.force,
    };
    tracing::info!(node.id = %id, reason = %drain.reason, "drain node requested over HTTP");
    let accepted = state.role.leading()?.fleet.drain(id, drain).await??;
    Ok(Json(json!({
        "node": node_json(&accepted.node),
        "already_draining": accepted.already_draining,
    })))
}

/// The body of `POST /api/v1/nodes/{id}/resume`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    reason: Option<String>,
}

/// `POST /api/v1/nodes/{id}/resume` (operator): ResumeNode.
pub async fn resume(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: Result<Json<ReasonBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = node_id(&id)?;
    let reason = crate::edge::request::reason("reason", body(request)?.reason.unwrap_or_default())?;
    let node = state.role.leading()?.fleet.resume(id, reason).await??;
    Ok(Json(json!({ "node": node_json(&node) })))
}

/// The body of `POST /api/v1/nodes/{id}/maintenance`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceBody {
    enabled: bool,
    reason: Option<String>,
}

/// `POST /api/v1/nodes/{id}/maintenance` (operator): SetMaintenance.
pub async fn maintenance(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: Result<Json<MaintenanceBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = node_id(&id)?;
    let request = body(request)?;
    let reason = crate::edge::request::reason("reason", request.reason.unwrap_or_default())?;
    let (node, changed) = state
        .role
        .leading()?
        .fleet
        .set_maintenance(id, request.enabled, reason)
        .await??;
    Ok(Json(json!({ "node": node_json(&node), "changed": changed })))
}

/// The body of `POST /api/v1/automation`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutomationBody {
    healing: Option<bool>,
    scaling: Option<bool>,
    reason: Option<String>,
}

/// `POST /api/v1/automation` (operator): SetAutomation.
pub async fn automation(
    State(state): State<AppState>,
    request: Result<Json<AutomationBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let request = body(request)?;
    let change = crate::runtime::fleet::AutomationChange {
        healing: request.healing,
        scaling: request.scaling,
        reason: crate::edge::request::reason("reason", request.reason.unwrap_or_default())?,
    };
    let (automation, resumed) = state.role.leading()?.fleet.set_automation(change).await?;
    Ok(Json(json!({
        "healing": automation.healing,
        "scaling": automation.scaling,
        "resumed_failures": resumed,
    })))
}

/// Anything else under `/api/`.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    UnknownEndpoint(uri.path().to_owned()).into()
}
