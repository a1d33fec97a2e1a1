//! Orchestrator faults as gRPC statuses: the code from the one error table
//! ([`crate::error`]), the message from the fault itself.

use secbeat::wire::WireError;
use tonic::Status;

use crate::{
    domain::registry::{CloseReason, DrainError, ServiceError, TerminateError},
    edge::{auth::Denied, grpc::convert::ProtocolError},
    error::{Fault, NoPrediction, UnknownNode},
    runtime::{
        bus::SubscribeError,
        fleet::{ConnectError, FleetStopped},
        role::{LEADER_METADATA, NotLeader, RETRY_AFTER_METADATA},
    },
};

/// The status for `fault`.
pub fn status(fault: &impl Fault) -> Status {
    Status::new(fault.code().grpc(), fault.to_string())
}

macro_rules! into_status {
    ($($fault:ty),* $(,)?) => {
        $(impl From<$fault> for Status {
            fn from(fault: $fault) -> Self {
                status(&fault)
            }
        })*
    };
}

into_status!(
    FleetStopped,
    ConnectError,
    TerminateError,
    DrainError,
    ServiceError,
    Denied,
    SubscribeError,
    UnknownNode,
    NoPrediction,
    ProtocolError,
);

/// How long after a leader's lease ended a standby still sends a retry time.
const STALE_LEASE_END: std::time::Duration = std::time::Duration::from_secs(3);

/// UNAVAILABLE, with the leader's URL in `secbeat-leader` when it is known: an
/// agent follows it, a person reads it.
impl From<NotLeader> for Status {
    fn from(not_leader: NotLeader) -> Self {
        let mut status = status(&not_leader);
        if let Some(leader) = &not_leader.leader
            && let Ok(value) = leader.parse()
        {
            status.metadata_mut().insert(LEADER_METADATA, value);
        }
        // A lease that ended a while ago and was not replaced means this standby
        // cannot see what happens (etcd unreachable, say): no retry time then, so
        // agents keep their backoff instead of polling it every second.
        let now = std::time::Instant::now();
        if let Some(ends) = not_leader.lease_ends.filter(|ends| now < *ends + STALE_LEASE_END) {
            let millis = ends.saturating_duration_since(now).as_millis();
            if let Ok(value) = millis.to_string().parse() {
                status.metadata_mut().insert(RETRY_AFTER_METADATA, value);
            }
        }
        status
    }
}

/// A malformed field of a request (`WireError` and `Status` are both foreign, so
/// no `From`).
pub fn invalid(error: WireError) -> Status {
    status(&error)
}

/// The status that ends a session the orchestrator closes.
pub fn closed(reason: &CloseReason) -> Status {
    status(reason)
}

/// The status that ends every session when the orchestrator shuts down.
pub fn shutting_down() -> Status {
    status(&FleetStopped)
}
