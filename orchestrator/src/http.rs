//! The HTTP edge: liveness and readiness for load balancers and orchestration.
//! (Metrics and the JSON API join this router in later work.)

use axum::{Router, extract::State, http::StatusCode, routing::get};

use crate::fleet::FleetHandle;

/// The HTTP routes.
pub fn router(fleet: FleetHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(fleet)
}

/// The process is up.
async fn healthz() -> &'static str {
    "ok\n"
}

/// The fleet actor answers, so agent streams and operator calls are served.
async fn readyz(State(fleet): State<FleetHandle>) -> (StatusCode, &'static str) {
    match fleet.stats().await {
        Ok(_) => (StatusCode::OK, "ready\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
    }
}
