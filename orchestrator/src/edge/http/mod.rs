//! The HTTP edge: liveness and readiness for load balancers and orchestration,
//! Prometheus metrics, the JSON API ([`api`]), its event stream ([`events`]) and
//! the operator console ([`console`]) that reads them.

pub mod api;
pub mod console;
pub mod events;

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::{get, post},
};

use serde_json::json;

use crate::{edge::auth::Authority, edge::metrics::Metrics, runtime::role::Role};

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct AppState {
    /// This process's role, and the leader term's handles.
    pub role: Role,
    /// The metrics registry.
    pub metrics: Metrics,
    /// Who may read the JSON API (the operator and viewer tokens).
    pub authority: Authority,
}

/// The HTTP routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/", get(console::index))
        .route("/console/{file}", get(console::asset_file))
        .route("/api/v1/whoami", get(api::whoami))
        .route("/api/v1/fleet/stats", get(api::fleet_stats))
        .route("/api/v1/predictions", get(api::predictions))
        .route("/api/v1/events", get(events::events))
        .route("/api/v1/nodes", get(api::nodes))
        .route("/api/v1/nodes/{id}", get(api::node))
        .route("/api/v1/nodes/{id}/events", get(api::node_events))
        .route("/api/v1/nodes/{id}/terminate", post(api::terminate))
        .route("/api/v1/nodes/{id}/drain", post(api::drain))
        .route("/api/v1/nodes/{id}/resume", post(api::resume))
        .route("/api/v1/nodes/{id}/maintenance", post(api::maintenance))
        .route("/api/v1/automation", post(api::automation))
        .route("/api/{*rest}", get(api::not_found).post(api::not_found))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::require_token,
        ))
        .with_state(state)
}

/// The process is up.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness, as JSON. The leader is ready when its fleet actor answers and its
/// state store writes (200 `{"role":"leader","ready":true}`); otherwise 503 says
/// why. A standby answers 503 `{"role":"standby","leader":"<url>"}`, so a load
/// balancer sends agents to the leader and a person can always find it.
async fn readyz(State(state): State<AppState>) -> (StatusCode, axum::Json<serde_json::Value>) {
    let leading = match state.role.leading() {
        Ok(leading) => leading,
        Err(not_leader) => {
            let mut body = json!({ "role": "standby", "leader": not_leader.leader });
            if let Some(problem) = not_leader.problem {
                body["problem"] = json!(problem);
            }
            if not_leader.taking_over {
                body["taking_over"] = json!(true);
            }
            return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body));
        }
    };
    if leading.fleet.stats().await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "role": "leader", "ready": false, "error": "shutting down" })),
        );
    }
    match leading.store.failure() {
        None => (
            StatusCode::OK,
            axum::Json(json!({ "role": "leader", "ready": true })),
        ),
        Some(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({
                "role": "leader",
                "ready": false,
                "error": format!(
                    "state store failing ({} writes waiting): {error}",
                    leading.store.pending_writes()
                ),
            })),
        ),
    }
}

/// Metrics: OpenMetrics when the scraper asks for it (Prometheus does), the
/// classic text format otherwise (promtool, curl). Fleet-state gauges are
/// refreshed from a snapshot first.
async fn metrics_text(State(state): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    // A standby's fleet and store figures are the leader's to report.
    if let Ok(leading) = state.role.leading() {
        if let Ok(stats) = leading.fleet.stats().await {
            state.metrics.observe_fleet(&stats);
        }
        state.metrics.observe_store(&leading.store);
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok());
    let (content_type, body) = secbeat::telemetry::negotiate_metrics(accept, state.metrics.encode());
    ([(header::CONTENT_TYPE, content_type)], body)
}
