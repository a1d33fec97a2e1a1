//! The gRPC edge: thin services that validate wire input, talk to the fleet actor
//! or the scaling loop, and convert between `secbeat.v1` messages and domain values.

pub mod agent_service;
pub mod convert;
pub mod fleet_service;
pub mod prediction_service;
pub mod rate;
pub mod status;
pub mod watch;

use tonic::Request;

use crate::edge::auth::{Authority, Caller};

/// Who is calling: the verified client certificate's SAN URIs (mTLS) and the
/// `authorization` metadata, judged by `authority`.
pub fn caller<T>(authority: &Authority, request: &Request<T>) -> Caller {
    let uris = request
        .peer_certs()
        .and_then(|certs| {
            certs
                .first()
                .map(|leaf| crate::edge::auth::san_uris(leaf.as_ref()))
        })
        .unwrap_or_default();
    let authorization = request
        .metadata()
        .get("authorization")
        .and_then(|value| value.to_str().ok());
    authority.identify(&uris, authorization)
}
