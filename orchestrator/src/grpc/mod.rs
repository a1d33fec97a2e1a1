//! The gRPC edge: thin services that validate wire input, talk to the fleet actor
//! or the scaling loop, and convert between `secbeat.v1` messages and domain values.

pub mod agent_service;
pub mod convert;
pub mod fleet_service;
pub mod prediction_service;
pub mod status;
pub mod watch;
