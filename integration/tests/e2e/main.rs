//! End-to-end tests: the real orchestrator and agent binaries, real gRPC over
//! loopback sockets, real signals, and the real grpcurl.

mod browser;
mod console;
mod deploy;
mod descriptors;
mod disruption;
mod domains;
mod faults;
mod grpcurl;
mod ha;
mod healing;
mod lifecycle;
mod measure;
mod monitoring;
mod operator;
mod packaging;
mod protocol;
mod readme;
mod scaling;
mod security;
mod traces;
