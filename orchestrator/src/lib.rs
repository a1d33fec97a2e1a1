//! `secbeat-orchestrator`: the SecBeat fleet control plane as a library.
//!
//! Three layers, one folder each:
//! - [`domain`], the pure core that decides: node and event types, the registry
//!   (node lifecycle), the detector, the healer, the forecaster and the scaler. No
//!   IO, no wire types, time passed in.
//! - [`runtime`], the glue: the event bus, the fleet actor that owns the registry
//!   and the healer, the scaling loop that owns the forecaster and the scaler, and
//!   the server that wires everything and shuts it down.
//! - [`edge`], what talks: gRPC, HTTP, the store, the webhook sender, the listener,
//!   auth and metrics.
//!
//! Beside them: [`cli`] (the command line), [`config`] (every key once), [`error`] (every fault's gRPC and HTTP
//! status, once) and [`clock`] (the one source of "now").
//!
//! Data flows one way: agent stream -> registry/detector -> events -> healer/scaler
//! -> store writer -> webhook sender; queries and watches read snapshots and the bus.

#![warn(missing_docs)]

pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod edge;
pub mod error;
pub mod runtime;
