//! Operator and benchmark tools around SecBeat, shipped apart from the tests:
//! `secbeat-webhook-receiver` (a verifying receiver for compose and the tests) and
//! `secbeat-fleetsim` (virtual agents on the real protocol, for fleet-scale
//! measurements), and what they share with the test harness: a `/proc` reader and
//! a minimal HTTP client; and the simulator's TLS client.

#![warn(missing_docs)]

pub mod http;
pub mod proc;
pub mod tls;
