//! The HTTP edge: liveness and readiness for load balancers and orchestration, and
//! Prometheus metrics. (The JSON API joins this router in later work.)

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};

use crate::{fleet::FleetHandle, metrics::Metrics};

#[derive(Clone)]
struct AppState {
    fleet: FleetHandle,
    metrics: Metrics,
}

/// The HTTP routes.
pub fn router(fleet: FleetHandle, metrics: Metrics) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { fleet, metrics })
}

/// The process is up.
async fn healthz() -> &'static str {
    "ok\n"
}

/// The fleet actor answers, so agent streams and operator calls are served.
async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    match state.fleet.stats().await {
        Ok(_) => (StatusCode::OK, "ready\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
    }
}

/// OpenMetrics text; fleet-state gauges are refreshed from a snapshot first.
async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    if let Ok(stats) = state.fleet.stats().await {
        state.metrics.observe_fleet(&stats);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
