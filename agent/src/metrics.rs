//! The agent's own `/metrics` (with `--metrics-listen`): what a node's operator
//! wants to see without asking the orchestrator. Counters are atomics; the
//! session loop counts, the HTTP server only reads.

use std::sync::{Arc, atomic::AtomicU64};

use axum::{Router, extract::State, http::HeaderMap, routing::get};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Every metric the agent exports.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    registry: Arc<Registry>,
    /// Heartbeats sent.
    pub heartbeats_sent: Counter,
    /// CPU samples sent.
    pub cpu_samples_sent: Counter,
    /// Sessions established (Welcome received).
    pub sessions_established: Counter,
    /// Sessions lost or connects failed (each followed by a reconnect).
    pub sessions_lost: Counter,
    /// Terminate commands received.
    pub terminates_received: Counter,
    /// 1 while a session is established.
    pub connected: Gauge,
    /// The latest CPU sample sent (fraction of one).
    pub cpu_usage: Gauge<f64, AtomicU64>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let metrics = Self {
            registry: Arc::default(),
            heartbeats_sent: Counter::default(),
            cpu_samples_sent: Counter::default(),
            sessions_established: Counter::default(),
            sessions_lost: Counter::default(),
            terminates_received: Counter::default(),
            connected: Gauge::default(),
            cpu_usage: Gauge::default(),
        };
        let counters = [
            (
                "secbeat_agent_heartbeats_sent",
                "Heartbeats sent",
                &metrics.heartbeats_sent,
            ),
            (
                "secbeat_agent_cpu_samples_sent",
                "CPU samples sent",
                &metrics.cpu_samples_sent,
            ),
            (
                "secbeat_agent_sessions_established",
                "Sessions established with the orchestrator",
                &metrics.sessions_established,
            ),
            (
                "secbeat_agent_sessions_lost",
                "Sessions lost or connects failed (each is retried)",
                &metrics.sessions_lost,
            ),
            (
                "secbeat_agent_terminates_received",
                "Terminate commands received",
                &metrics.terminates_received,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "secbeat_agent_connected",
            "1 while a session with the orchestrator is established",
            metrics.connected.clone(),
        );
        registry.register(
            "secbeat_agent_cpu_usage",
            "The latest CPU sample sent (fraction of one)",
            metrics.cpu_usage.clone(),
        );
        Self {
            registry: Arc::new(registry),
            ..metrics
        }
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

async fn scrape(
    State(metrics): State<AgentMetrics>,
    headers: HeaderMap,
) -> impl axum::response::IntoResponse {
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|a| a.to_str().ok());
    let (content_type, body) = secbeat::telemetry::negotiate_metrics(accept, metrics.encode());
    ([(axum::http::header::CONTENT_TYPE, content_type)], body)
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: std::net::TcpListener, metrics: AgentMetrics, shutdown: CancellationToken) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            warn!(%error, "metrics listener unusable; not serving /metrics");
            return;
        }
    };
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics listening");
    }
    let app = Router::new().route("/metrics", get(scrape)).with_state(metrics);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        warn!(%error, "metrics server failed");
    }
}
