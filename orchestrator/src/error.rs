//! The one error table: every fault the orchestrator reports to a caller has an
//! [`ErrorCode`], and each code has exactly one gRPC code and one HTTP status. The
//! gRPC edge and the HTTP edge both go through it, so the same fault gets the same
//! answer on both (quickwit's error module is the model). Messages come from each
//! fault's `Display`, written once where the fault is defined.

use secbeat::wire::WireError;

use crate::{
    domain::{
        node::NodeId,
        registry::{CloseReason, DrainError, ServiceError, TerminateError},
    },
    edge::auth::Denied,
    runtime::{
        bus::SubscribeError,
        fleet::{ConnectError, FleetStopped},
    },
};

/// What kind of fault, whatever the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The caller sent something malformed.
    InvalidArgument,
    /// What the caller named does not exist.
    NotFound,
    /// The request is valid but the system is not in a state to do it.
    FailedPrecondition,
    /// A position outside what is kept (an event sequence).
    OutOfRange,
    /// No credential, or one that is not valid.
    Unauthenticated,
    /// A valid credential that may not do this.
    PermissionDenied,
    /// A limit was reached (capacity, rate).
    ResourceExhausted,
    /// Ended because something newer took over.
    Aborted,
    /// Not now: shutting down, or not the serving orchestrator; retry.
    Unavailable,
}

impl ErrorCode {
    /// Every code, for the tests that check the table.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::InvalidArgument,
        ErrorCode::NotFound,
        ErrorCode::FailedPrecondition,
        ErrorCode::OutOfRange,
        ErrorCode::Unauthenticated,
        ErrorCode::PermissionDenied,
        ErrorCode::ResourceExhausted,
        ErrorCode::Aborted,
        ErrorCode::Unavailable,
    ];

    /// The gRPC status code.
    pub fn grpc(self) -> tonic::Code {
        match self {
            ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorCode::OutOfRange => tonic::Code::OutOfRange,
            ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorCode::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorCode::ResourceExhausted => tonic::Code::ResourceExhausted,
            ErrorCode::Aborted => tonic::Code::Aborted,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
        }
    }

    /// The HTTP status (as gRPC-over-HTTP gateways map them).
    pub fn http(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument | ErrorCode::OutOfRange => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Aborted => 409,
            ErrorCode::FailedPrecondition => 412,
            ErrorCode::ResourceExhausted => 429,
            ErrorCode::Unavailable => 503,
        }
    }
}

/// A fault a caller is told about: its code, and its `Display` as the message.
pub trait Fault: std::fmt::Display {
    /// Which kind of fault this is.
    fn code(&self) -> ErrorCode;
}

/// A node id that names no known node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("node {0} is unknown")]
pub struct UnknownNode(pub NodeId);

/// No scaling check has run yet, so there is no prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no scaling check has run yet (see scaling_check_interval_seconds)")]
pub struct NoPrediction;

/// A path under `/api/` that the API does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no such endpoint: {0} (see /api/v1/fleet/stats, /api/v1/nodes, /api/v1/nodes/{{id}})")]
pub struct UnknownEndpoint(pub String);

impl Fault for UnknownNode {
    fn code(&self) -> ErrorCode {
        ErrorCode::NotFound
    }
}

impl Fault for NoPrediction {
    fn code(&self) -> ErrorCode {
        ErrorCode::NotFound
    }
}

impl Fault for UnknownEndpoint {
    fn code(&self) -> ErrorCode {
        ErrorCode::NotFound
    }
}

impl Fault for WireError {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidArgument
    }
}

impl Fault for FleetStopped {
    fn code(&self) -> ErrorCode {
        ErrorCode::Unavailable
    }
}

impl Fault for ConnectError {
    fn code(&self) -> ErrorCode {
        match self {
            ConnectError::Stopped => ErrorCode::Unavailable,
            ConnectError::AtCapacity(_) => ErrorCode::ResourceExhausted,
        }
    }
}

impl Fault for TerminateError {
    fn code(&self) -> ErrorCode {
        match self {
            TerminateError::NotFound(_) => ErrorCode::NotFound,
            TerminateError::NotConnected { .. } => ErrorCode::FailedPrecondition,
        }
    }
}

impl Fault for DrainError {
    fn code(&self) -> ErrorCode {
        match self {
            DrainError::NotFound(_) => ErrorCode::NotFound,
            DrainError::NotConnected { .. } | DrainError::Terminating(_) | DrainError::Budget { .. } => {
                ErrorCode::FailedPrecondition
            }
        }
    }
}

impl Fault for ServiceError {
    fn code(&self) -> ErrorCode {
        match self {
            ServiceError::NotFound(_) => ErrorCode::NotFound,
            ServiceError::NotDrained { .. }
            | ServiceError::NotConnected { .. }
            | ServiceError::Ended { .. } => ErrorCode::FailedPrecondition,
        }
    }
}

impl Fault for Denied {
    fn code(&self) -> ErrorCode {
        match self {
            Denied::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Denied::PermissionDenied(_) => ErrorCode::PermissionDenied,
        }
    }
}

impl Fault for SubscribeError {
    fn code(&self) -> ErrorCode {
        match self {
            SubscribeError::Gone { .. } | SubscribeError::Ahead { .. } => ErrorCode::OutOfRange,
            SubscribeError::Closed => ErrorCode::Unavailable,
        }
    }
}

impl Fault for CloseReason {
    fn code(&self) -> ErrorCode {
        match self {
            CloseReason::Fenced { .. } => ErrorCode::Aborted,
            CloseReason::DeclaredFailed | CloseReason::TerminatedSilently => ErrorCode::Unavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_distinct_grpc_code_and_an_error_http_status() {
        let grpc: std::collections::HashSet<_> = ErrorCode::ALL.iter().map(|code| code.grpc()).collect();
        assert_eq!(grpc.len(), ErrorCode::ALL.len(), "one gRPC code per error code");
        for code in ErrorCode::ALL {
            assert!((400..600).contains(&code.http()), "{code:?}");
            assert_ne!(code.grpc(), tonic::Code::Ok);
        }
    }

    #[test]
    fn the_same_fault_gets_the_same_answer_on_both_protocols() {
        let id = NodeId(uuid::Uuid::nil());
        let unknown = UnknownNode(id);
        assert_eq!(
            (unknown.code().grpc(), unknown.code().http()),
            (tonic::Code::NotFound, 404)
        );
        let gone = SubscribeError::Gone {
            requested: 1,
            oldest_kept: 5,
        };
        assert_eq!(
            (gone.code().grpc(), gone.code().http()),
            (tonic::Code::OutOfRange, 400)
        );
        let refused = Denied::Unauthenticated("no credential".into());
        assert_eq!(
            (refused.code().grpc(), refused.code().http()),
            (tonic::Code::Unauthenticated, 401)
        );
    }
}
