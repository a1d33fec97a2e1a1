//! `secbeat-orchestrator`: the SecBeat fleet control plane as a library.
//!
//! Core (pure, no IO, time passed in): [`node`] and [`event`] (domain types),
//! [`registry`] (node lifecycle state machine) and [`detector`] (the periodic
//! dead-node check). Glue: [`fleet`] (the actor that owns the registry and the
//! sessions). Edges: [`grpc`] (AgentService, FleetService), [`http`] (health),
//! [`server`] (wiring and graceful shutdown), [`config`], and [`clock`] (the one
//! source of "now").
//!
//! Data flows one way: agent stream -> registry/detector -> events -> consumers.

#![warn(missing_docs)]

pub mod auth;
pub mod bus;
pub mod certs;
pub mod clock;
pub mod config;
pub mod detector;
pub mod event;
pub mod fleet;
pub mod forecast;
pub mod grpc;
pub mod healer;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod node;
pub mod registry;
pub mod scaler;
pub mod scaling;
pub mod server;
pub mod store;
pub mod webhook;
