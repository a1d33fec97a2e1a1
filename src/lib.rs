//! The SecBeat control-plane API crate.
//!
//! - [`pb`]: the `secbeat.v1` protobuf messages and gRPC clients/servers, generated
//!   from `proto/secbeat/v1/` by the root `build.rs` into `OUT_DIR`.
//! - [`etcdpb`]: the client half of etcd's v3 API, for the orchestrator's etcd backend.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors for server reflection.
//! - `process` (feature `process`): logging and signal handling shared by the
//!   binaries' `main`s.
//! - `backoff` (feature `backoff`): capped, jittered exponential backoff, for agent
//!   reconnects and webhook retries.
//! - `telemetry` (feature `process`): logs (text or JSON, stderr and a file) and
//!   OTLP traces with W3C trace-context propagation.
//! - `signing` (feature `signing`): Standard Webhooks signing and verification.
//! - [`codec`]: the gRPC codec with small per-stream buffers.
//! - `cputrace` (feature `cputrace`): the CPU-trace CSV parser (NAB format) that
//!   the agent's trace replay and the orchestrator's backtest share.
//! - [`wire`]: the conversions between wire types and plain Rust values that every
//!   edge needs (node ids, timestamps, durations, CPU fractions, RFC 3339), with
//!   typed errors.

#![warn(missing_docs)]

#[cfg(feature = "backoff")]
pub mod backoff;
pub mod codec;
#[cfg(feature = "cputrace")]
pub mod cputrace;
#[cfg(feature = "process")]
pub mod process;
#[cfg(feature = "signing")]
pub mod signing;
#[cfg(feature = "process")]
pub mod telemetry;
pub mod wire;

/// Generated `secbeat.v1` messages, enums, clients and servers.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("secbeat.v1");
}

/// etcd's v3 API (KV, Watch, Lease clients), generated from `proto/etcd/`.
#[allow(clippy::all, missing_docs)]
pub mod etcdpb {
    /// etcd's key-value records and watch events.
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// etcd's KV, Watch and Lease services and their messages.
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

/// Encoded `FileDescriptorSet` of `secbeat.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("secbeat_v1_descriptor");
