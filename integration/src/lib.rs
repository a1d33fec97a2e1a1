//! Test harness for SecBeat: starts the real `secbeat-orchestrator`,
//! `secbeat-agent` and `secbeat-webhook-receiver` binaries as child processes,
//! captures their logs, talks to them over real gRPC and HTTP, and sends them real
//! signals.
//!
//! Waiting is always for a condition ([`eventually`], [`Logs::wait_for`], an event
//! or a metric), never a blind sleep. Children are killed when their handle drops,
//! so a failing test leaves nothing running.
//!
//! - [`config`]: the fast lifecycle the tests run with, and the bounds they assert;
//! - [`process`]: child processes and their log lines;
//! - [`orchestrator`], [`agent`], [`receiver`]: the three binaries, running;
//! - [`grpc`]: FleetService helpers and hand-driven agent streams;
//! - [`external`]: grpcurl, promtool, docker-compose and the repository's files;
//! - [`etcd`]: a real 3-member etcd cluster for the high-availability tests;
//! - [`wait`]: polling for a condition;
//! - a fake OTLP collector for the trace tests.

#![warn(missing_docs)]

pub mod agent;
mod collector;
pub mod config;
pub mod etcd;
pub mod external;
pub mod grpc;
pub mod orchestrator;
pub mod process;
pub mod receiver;
pub mod wait;

pub use agent::Agent;
pub use collector::{CollectedSpan, Collector};
pub use config::*;
pub use etcd::EtcdCluster;
pub use external::*;
pub use grpc::*;
pub use nix::sys::signal::Signal as Sig;
pub use orchestrator::{Exited, Orchestrator, metric_value};
pub use process::{Logs, Process, binary, fleetsim};
pub use receiver::WebhookReceiver;
pub use secbeat_tools::{
    http::{HttpResponse, http_get, http_request},
    proc::{process_cpu_time, process_rss},
};
pub use wait::eventually;
