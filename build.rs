//! Compiles `proto/secbeat/v1/*.proto` into `OUT_DIR` once, for every crate in the
//! workspace, together with the descriptor set that server reflection serves; and
//! the client half of etcd's v3 API (`proto/etcd/`) for the orchestrator's etcd backend.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/secbeat/v1/agent.proto",
    "proto/secbeat/v1/fleet.proto",
    "proto/secbeat/v1/prediction.proto",
];

const ETCD_PROTOS: &[&str] = &["proto/etcd/kv.proto", "proto/etcd/rpc.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A `protoc` from the environment (e.g. Debian's protobuf-compiler) wins; otherwise
    // use the vendored one so a fresh machine needs nothing installed.
    if env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment.
        // prost-build only reads PROTOC from the environment, hence the exception.
        #[allow(clippy::disallowed_methods)]
        unsafe {
            env::set_var("PROTOC", protoc)
        };
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Channels come from the caller (`Client::new(channel)`), so this crate needs
        // only tonic's codegen feature, not its transport.
        .build_transport(false)
        // Small per-stream buffers (src/codec.rs).
        .codec_path("crate::codec::CompactCodec")
        .file_descriptor_set_path(out_dir.join("secbeat_v1_descriptor.bin"))
        .compile_protos(PROTOS, &["proto"])?;
    // etcd's v3 API (client side only), for the orchestrator's etcd backend: built
    // here with the same protoc, so no second protoc and no second tonic.
    tonic_prost_build::configure()
        .build_transport(false)
        .build_server(false)
        .compile_protos(ETCD_PROTOS, &["proto"])?;
    Ok(())
}
