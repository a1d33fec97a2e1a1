//! Any bytes an agent stream could carry: decode + validate must never panic,
//! and must answer with a status (or accept) for every input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = secbeat_orchestrator::edge::grpc::agent_service::decode_and_validate(data);
});
