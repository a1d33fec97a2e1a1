//! Which stream errors are worth a reconnect (after linkerd's recover policy).

use tonic::Code;

/// What to do after a session ended with a gRPC status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Reconnect with backoff: the orchestrator or the network may come back.
    Retry,
    /// Stop: retrying cannot help and would hide a real problem.
    Fatal,
}

/// Classifies a status from the orchestrator.
///
/// Fatal: the orchestrator rejected what this agent is (INVALID_ARGUMENT: a bad
/// hello or protocol violation; UNAUTHENTICATED / PERMISSION_DENIED: credentials;
/// UNIMPLEMENTED: not an orchestrator) or another agent now owns this node id
/// (ABORTED: fenced by a newer session; retrying would fence it back, and both
/// would flap). Everything else (UNAVAILABLE on shutdown or failure, transport
/// errors, RESOURCE_EXHAUSTED, ...) is retried.
pub fn classify(code: Code) -> Recovery {
    match code {
        Code::InvalidArgument
        | Code::Unauthenticated
        | Code::PermissionDenied
        | Code::Unimplemented
        | Code::Aborted => Recovery::Fatal,
        _ => Recovery::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdowns_and_outages_are_retried_identity_problems_are_fatal() {
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
            Code::ResourceExhausted,
        ] {
            assert_eq!(classify(code), Recovery::Retry, "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::Aborted,
        ] {
            assert_eq!(classify(code), Recovery::Fatal, "{code:?}");
        }
    }
}
