//! The HTTP/JSON API (`/api/v1/...`): the fleet's figures, the latest prediction
//! and its accuracy, and the nodes, with the seed's field names. Errors are JSON
//! `{"error": "..."}` with the status the one error table ([`crate::error`]) gives
//! the fault, as the gRPC API gives its code.

use axum::{
    Json,
    extract::{Path, Query, State, rejection::QueryRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use serde_json::{Value, json};

use super::AppState;
use crate::{
    domain::node::{NodeId, NodeSnapshot, NodeState},
    domain::selector::{NodeFilter, Selector},
    error::{Fault, UnknownEndpoint, UnknownNode},
    runtime::scaling_loop::Prediction,
};

/// An API error: a status and a message, sent as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

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
/// has no client certificates); health and metrics stay open.
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
        if authority.tokens_configured()
            && let Err(denied) = authority.allow(&caller, crate::edge::auth::Need::Read)
        {
            return ApiError::from(denied).into_response();
        }
    }
    next.run(request).await
}

/// The query of `/api/v1/nodes` and `/api/v1/fleet/stats`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeQuery {
    /// A label selector (`pop=fra1,role!=canary`).
    selector: Option<String>,
    /// States, comma-separated (`connected,drained`); nodes only.
    state: Option<String>,
}

impl NodeQuery {
    /// The query, or a JSON 400 naming what is wrong with it.
    fn from(query: Result<Query<NodeQuery>, QueryRejection>) -> Result<Self, ApiError> {
        query
            .map(|Query(query)| query)
            .map_err(|rejection| ApiError(StatusCode::BAD_REQUEST, rejection.body_text()))
    }

    fn selector(&self) -> Result<Selector, ApiError> {
        let text = self.selector.as_deref().unwrap_or_default();
        text.parse()
            .map_err(|error: crate::domain::selector::SelectorError| {
                secbeat::wire::WireError::new("selector", error.to_string()).into()
            })
    }

    fn states(&self) -> Result<Vec<NodeState>, ApiError> {
        let Some(text) = self.state.as_deref() else {
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
}

/// `GET /api/v1/fleet/stats[?selector=]`.
pub async fn fleet_stats(
    State(state): State<AppState>,
    query: Result<Query<NodeQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let leading = state.role.leading()?;
    let selector = NodeQuery::from(query)?.selector()?;
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
        "accuracy": latest.as_deref().map(accuracy_json),
    })))
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

fn accuracy_json(prediction: &Prediction) -> Value {
    let accuracy = &prediction.accuracy;
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

/// `GET /api/v1/nodes[?selector=&state=]`.
pub async fn nodes(
    State(state): State<AppState>,
    query: Result<Query<NodeQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let query = NodeQuery::from(query)?;
    let filter = NodeFilter {
        selector: query.selector()?,
        states: query.states()?,
    };
    let (nodes, sequence) = state.role.leading()?.fleet.list_matching(filter).await?;
    let nodes: Vec<NodeJson> = nodes.iter().map(node_json).collect();
    Ok(Json(json!({ "nodes": nodes, "sequence": sequence })))
}

/// `GET /api/v1/nodes/{id}`.
pub async fn node(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = secbeat::wire::parse_node_id("node_id", &id).map(NodeId)?;
    let node = state
        .role
        .leading()?
        .fleet
        .get(id)
        .await?
        .ok_or(UnknownNode(id))?;
    Ok(Json(json!(node_json(&node))))
}

/// Anything else under `/api/`.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    UnknownEndpoint(uri.path().to_owned()).into()
}
