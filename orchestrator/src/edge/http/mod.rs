//! The HTTP edge: liveness and readiness for load balancers and orchestration,
//! Prometheus metrics, and the JSON API ([`api`]).

pub mod api;

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::get,
};

use crate::{
    edge::auth::Authority, edge::metrics::Metrics, edge::store::writer::StoreHealth,
    runtime::fleet::FleetHandle, runtime::scaling_loop::PredictionHandle,
};

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The fleet actor.
    pub fleet: FleetHandle,
    /// The metrics registry.
    pub metrics: Metrics,
    /// The scaling loop's predictions.
    pub predictions: PredictionHandle,
    /// Who may read the JSON API (the operator and viewer tokens).
    pub authority: Authority,
    /// Whether the state store is writing.
    pub store: StoreHealth,
}

/// The HTTP routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/fleet/stats", get(api::fleet_stats))
        .route("/api/v1/nodes", get(api::nodes))
        .route("/api/v1/nodes/{id}", get(api::node))
        .route("/api/{*rest}", get(api::not_found))
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

/// The fleet actor answers and the state store writes, so agent streams and
/// operator calls are served and what is decided is kept. 503 says which is not.
async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    if state.fleet.stats().await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    match state.store.failure() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "state store failing ({} writes waiting): {error}\n",
                state.store.pending_writes()
            ),
        ),
    }
}

/// Metrics: OpenMetrics when the scraper asks for it (Prometheus does), the
/// classic text format otherwise (promtool, curl). Fleet-state gauges are
/// refreshed from a snapshot first.
async fn metrics_text(State(state): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    if let Ok(stats) = state.fleet.stats().await {
        state.metrics.observe_fleet(&stats);
    }
    state.metrics.observe_store(&state.store);
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok());
    let (content_type, body) = secbeat::telemetry::negotiate_metrics(accept, state.metrics.encode());
    ([(header::CONTENT_TYPE, content_type)], body)
}
