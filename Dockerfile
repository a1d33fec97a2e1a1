# Multi-stage build of both binaries; the runtime image carries only them.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p secbeat-orchestrator -p secbeat-agent

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/secbeat --create-home secbeat
COPY --from=build /src/target/release/secbeat-orchestrator /src/target/release/secbeat-agent /usr/local/bin/
USER secbeat
WORKDIR /var/lib/secbeat
ENTRYPOINT ["secbeat-orchestrator"]
