//! The one place where orchestrator errors become gRPC statuses.

use tonic::Status;

use crate::{
    domain::node::NodeState,
    domain::registry::{CloseReason, TerminateError},
    edge::auth::Denied,
    runtime::bus::SubscribeError,
    runtime::fleet::{ConnectError, FleetStopped},
};
use secbeat::wire::WireError;

impl From<FleetStopped> for Status {
    fn from(_: FleetStopped) -> Self {
        Status::unavailable("orchestrator is shutting down")
    }
}

impl From<TerminateError> for Status {
    fn from(error: TerminateError) -> Self {
        match error {
            TerminateError::NotFound(_) => Status::not_found(error.to_string()),
            TerminateError::NotConnected { state, .. } => {
                let hint = if state == NodeState::Suspect {
                    "; it may reconnect"
                } else {
                    ""
                };
                Status::failed_precondition(format!("{error}{hint}"))
            }
        }
    }
}

impl From<SubscribeError> for Status {
    fn from(error: SubscribeError) -> Self {
        match error {
            SubscribeError::Gone { .. } | SubscribeError::Ahead { .. } => {
                Status::out_of_range(error.to_string())
            }
            SubscribeError::Closed => shutting_down(),
        }
    }
}

/// A malformed field in a request or agent message.
pub fn invalid(error: WireError) -> Status {
    Status::invalid_argument(error.to_string())
}

/// The status that ends a session the orchestrator closes.
pub fn closed(reason: &CloseReason) -> Status {
    match reason {
        CloseReason::Fenced { by } => Status::aborted(format!(
            "fenced: a newer session ({by}) for this node id took over"
        )),
        CloseReason::DeclaredFailed => {
            Status::unavailable("node declared failed after missing heartbeats; reconnect to rejoin")
        }
        CloseReason::TerminatedSilently => Status::unavailable("node terminated: silent after acknowledging"),
    }
}

/// The status that ends every session when the orchestrator shuts down.
pub fn shutting_down() -> Status {
    Status::unavailable("orchestrator shutting down; reconnect with backoff")
}

impl From<ConnectError> for Status {
    fn from(error: ConnectError) -> Self {
        match error {
            ConnectError::Stopped => FleetStopped.into(),
            ConnectError::AtCapacity(_) => Status::resource_exhausted(error.to_string()),
        }
    }
}

impl From<Denied> for Status {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::Unauthenticated(message) => Status::unauthenticated(message),
            Denied::PermissionDenied(message) => Status::permission_denied(message),
        }
    }
}
