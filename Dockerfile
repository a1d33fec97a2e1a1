# Multi-stage build of the binaries; the runtime image carries only them (and the CA
# certificates that https webhook URLs need).
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# jemalloc, the orchestrator's allocator, is built from its C source with make.
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked -p secbeat-orchestrator -p secbeat-agent \
    && cargo build --release --locked -p secbeat-tools --bin secbeat-webhook-receiver

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --home /var/lib/secbeat --create-home secbeat \
    && install -d -o secbeat -g secbeat /var/lib/secbeat/agent /var/lib/secbeat/orchestrator
COPY --from=build /src/target/release/secbeat-orchestrator /src/target/release/secbeat-agent \
    /src/target/release/secbeat-webhook-receiver /usr/local/bin/
USER secbeat
WORKDIR /var/lib/secbeat
ENTRYPOINT ["secbeat-orchestrator"]
