//! The edges: what talks to the outside world. Each converts between the wire and
//! the domain once, with typed errors, and holds no fleet state of its own.
//!
//! - [`grpc`]: AgentService, FleetService, PredictionService (tonic).
//! - [`http`]: health, readiness, metrics and the JSON API (axum).
//! - [`store`]: durable state (redb), written by one thread in batches.
//! - [`webhook`]: payloads, the outbox and the signed, retried sender.
//! - [`listener`]: the gRPC accept loop and the descriptor limit.
//! - [`tls`]: TLS on the gRPC listener, with session tickets that survive a restart.
//! - [`auth`] and [`certs`]: who is calling and what they may do; the dev CA.
//! - [`metrics`]: the Prometheus registry.
//! - [`request`]: operator inputs validated once for both APIs.

pub mod auth;
pub mod certs;
pub mod etcd;
pub mod grpc;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod request;
pub mod store;
pub mod tls;
pub mod webhook;
