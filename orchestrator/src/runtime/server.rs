//! Wiring: binds the listeners, starts the fleet actor, serves gRPC (with health
//! and reflection v1 + v1alpha) and HTTP, and shuts all of it down gracefully.

use std::{io, net::SocketAddr, path::PathBuf};

use secbeat::pb::{
    agent_service_server::AgentServiceServer, fleet_service_server::FleetServiceServer,
    prediction_service_server::PredictionServiceServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::{Config, Token},
    edge::auth::Authority,
    edge::grpc::{
        agent_service::{AgentApi, StreamLimits},
        fleet_service::FleetApi,
        prediction_service::PredictionApi,
    },
    edge::http,
    edge::listener,
    edge::metrics::Metrics,
    edge::store::{Store, StoreError, StoredState, Write, redb::RedbStore, writer},
    edge::webhook::sender::{self, SenderError, SenderOutputs, SenderSettings},
    runtime::bus::{self, EventBus},
    runtime::fleet::{self, FleetSettings, Outputs, Restored},
    runtime::scaling_loop::{self, ScalingOutputs, ScalingSettings},
};

/// Why the orchestrator could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        /// The config key of the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The state directory could not be created.
    #[error("cannot create state_dir {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A TLS file could not be read.
    #[error("{key}: cannot read {path}: {source}")]
    Tls {
        /// The config key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The state store could not be opened or read.
    #[error("state_dir: {0}")]
    Store(#[from] StoreError),
    /// The webhook client could not be built.
    #[error(transparent)]
    Webhook(#[from] SenderError),
    /// Reflection descriptors failed to load (a build problem).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Http(io::Error),
}

/// An orchestrator with its listeners bound, ready to serve.
#[derive(Debug)]
pub struct Orchestrator {
    config: Config,
    grpc: TcpListener,
    http: TcpListener,
    store: RedbStore,
    stored: StoredState,
}

impl Orchestrator {
    /// Opens the state store (creating `state_dir` if needed), loads what the last
    /// run left, and binds both listeners (port 0 picks a free one).
    pub async fn bind(config: Config) -> Result<Self, ServeError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| ServeError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        let mut store = RedbStore::open(&config.state_dir)?;
        let mut stored = store.load()?;
        // A new event epoch for this run, durable before any event is numbered.
        stored.event_epoch += 1;
        store.apply(&[Write::PutEventEpoch(stored.event_epoch)])?;
        let grpc = bind("grpc_listen", config.grpc_listen).await?;
        let http = bind("http_listen", config.http_listen).await?;
        Ok(Self {
            config,
            grpc,
            http,
            store,
            stored,
        })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> io::Result<SocketAddr> {
        self.http.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then drains: agents' streams are ended
    /// with UNAVAILABLE (they reconnect elsewhere or later), watchers are ended, and
    /// in-flight calls get up to `shutdown_timeout` to finish.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), ServeError> {
        let Self {
            config,
            grpc,
            http,
            store,
            stored,
        } = self;
        let grpc_addr = grpc.local_addr().map_err(|source| ServeError::Bind {
            key: "grpc_listen",
            addr: config.grpc_listen,
            source,
        })?;
        let http_addr = http.local_addr().map_err(|source| ServeError::Bind {
            key: "http_listen",
            addr: config.http_listen,
            source,
        })?;
        if !grpc_addr.ip().is_loopback() && config.tls.cert.is_none() {
            warn!(addr = %grpc_addr, "INSECURE: grpc api listening beyond loopback WITHOUT TLS (allow_insecure = true): anyone who reaches this port can act as a node or an operator");
        }

        let metrics = Metrics::new();
        // The one event bus: the fleet actor, the scaling loop and the webhook
        // sender publish on it; WatchEvents reads it.
        let events = EventBus::new(
            bus::first_sequence(stored.event_epoch),
            config.event_history_size as usize,
        );
        let open_files = listener::raise_open_files_limit(config.max_nodes);
        let connection_limits = listener::ConnectionLimits {
            handshake_timeout: config.connection_handshake_timeout,
            idle_timeout: config.connection_idle_timeout,
            per_source: config.max_connections_per_source,
            // Agents may use every descriptor but those kept for HTTP and the rest.
            total: listener::agent_descriptors(open_files),
        };
        let (committed_tx, committed) = tokio::sync::mpsc::unbounded_channel();
        let (store, store_health, store_thread) = writer::spawn(Box::new(store), committed_tx);
        if config.webhook_secret.is_none() {
            warn!(
                "webhook_secret is not set: webhooks are sent UNSIGNED and receivers cannot tell them from forgeries (set SECBEAT_WEBHOOK_SECRET)"
            );
        }
        if stored.dead_letters > 0 {
            warn!(
                dead_letters = stored.dead_letters,
                "the state store holds webhooks that were given up on after webhook_max_age"
            );
        }
        let sender_settings = SenderSettings {
            url: config.provisioning_webhook_url.clone(),
            secret: config.webhook_secret.clone(),
            timeout: config.webhook_timeout,
            retry_initial: config.webhook_retry_initial,
            retry_max: config.webhook_retry_max,
            max_age: config.webhook_max_age,
        };
        let sender = sender::spawn(
            sender_settings,
            stored.outbox,
            committed,
            SenderOutputs {
                store: store.clone(),
                metrics: metrics.clone(),
                bus: events.clone(),
                store_health: store_health.clone(),
            },
            shutdown.clone(),
        )?;
        let settings = FleetSettings {
            lifecycle: config.lifecycle(),
            heartbeat_interval: config.heartbeat_interval,
            healing: config.healing(),
            restart_reconnect_grace: config.restart_reconnect_grace,
            max_nodes: config.max_nodes,
        };
        let restored = Restored {
            nodes: stored.nodes,
            heals: stored.heals,
        };
        let outputs = Outputs {
            store: store.clone(),
            metrics: metrics.clone(),
            bus: events.clone(),
        };
        let (fleet, actor) = fleet::spawn(settings, restored, outputs, shutdown.clone());
        let scaling_settings = ScalingSettings {
            interval: config.scaling_check_interval_seconds,
            forecast: config.forecast(),
            policy: config.scaling(),
        };
        let (predictions, scaling_task) = scaling_loop::spawn(
            scaling_settings,
            stored.history,
            fleet.clone(),
            ScalingOutputs {
                store,
                metrics: metrics.clone(),
                bus: events.clone(),
            },
            shutdown.clone(),
        );

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<AgentServiceServer<AgentApi>>().await;
        health.set_serving::<FleetServiceServer<FleetApi>>().await;
        health
            .set_serving::<PredictionServiceServer<PredictionApi>>()
            .await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(secbeat::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        // grpcurl 1.8.x only speaks v1alpha.
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(secbeat::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let limits = StreamLimits {
            hello_timeout: config.hello_timeout,
            heartbeat_interval: config.heartbeat_interval,
            messages_per_second: config.max_messages_per_second,
        };
        let authority = Authority::new(
            config.tls.client_ca.is_some(),
            config.admin_token.as_ref().map(Token::expose),
            config.viewer_token.as_ref().map(Token::expose),
            config.agent_token.as_ref().map(Token::expose),
        );
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls_config(&config)? {
            builder = builder.tls_config(tls)?;
            info!(
                client_certificates = config.tls.client_ca.is_some(),
                "grpc api serves TLS"
            );
        }
        if !authority.enforcing() {
            warn!(
                "no client CA and no tokens configured: every caller may operate the fleet (fine for development on loopback; see SECURITY.md)"
            );
        }
        let grpc_server = builder
            .tcp_nodelay(true)
            // Every connection is pinged: a live client's answer is traffic, so the
            // idle deadline closes only dead and abandoned connections.
            .http2_keepalive_interval(Some(config.connection_idle_timeout / 3))
            .http2_keepalive_timeout(Some(config.connection_idle_timeout / 3))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                AgentServiceServer::new(AgentApi::new(
                    fleet.clone(),
                    limits,
                    authority.clone(),
                    metrics.clone(),
                ))
                .max_decoding_message_size(config.max_message_bytes as usize),
            )
            .add_service(FleetServiceServer::new(FleetApi::new(
                fleet.clone(),
                events.clone(),
                authority.clone(),
            )))
            .add_service(PredictionServiceServer::new(PredictionApi::new(
                predictions.clone(),
                authority.clone(),
            )))
            .serve_with_incoming_shutdown(
                listener::incoming(grpc, metrics.clone(), connection_limits),
                shutdown.clone().cancelled_owned(),
            );
        // HTTP is held to the same deadlines and per-source cap (not to the agents'
        // descriptor budget: it is what stays reachable when that runs out).
        let http_limits = listener::ConnectionLimits {
            total: 0,
            ..connection_limits
        };
        let http_server = axum::serve(
            listener::HttpListener::new(http, metrics.clone(), http_limits),
            http::router(http::AppState {
                fleet,
                metrics,
                predictions,
                authority: authority.clone(),
                store: store_health,
            }),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());

        info!(addr = %grpc_addr, "grpc api listening");
        info!(addr = %http_addr, "http api listening");
        info!(
            heartbeat_interval_s = config.heartbeat_interval.as_secs_f64(),
            heartbeat_timeout_s = config.heartbeat_timeout.as_secs_f64(),
            dead_node_check_interval_s = config.dead_node_check_interval.as_secs_f64(),
            required_consecutive_failures = config.required_consecutive_failures,
            scaling_check_interval_s = config.scaling_check_interval_seconds.as_secs_f64(),
            scaling_mode = ?config.scaling_mode,
            forecast_model = %config.forecast_model,
            state_dir = %config.state_dir.display(),
            "orchestrator ready"
        );

        let grpc_task = tokio::spawn(grpc_server);
        let http_task = tokio::spawn(async move { http_server.await.map_err(ServeError::Http) });

        shutdown.cancelled().await;
        info!("shutting down: closing agent streams and draining calls");
        health.set_not_serving::<AgentServiceServer<AgentApi>>().await;
        let drained = tokio::time::timeout(config.shutdown_timeout, async {
            let _ = actor.await;
            let _ = scaling_task.await;
            let _ = sender.await;
            // Every publisher has stopped: end the event watchers.
            events.close();
            let grpc = grpc_task.await;
            let http = http_task.await;
            // Every writer handle is gone now: the writer finishes what is queued.
            let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
            (grpc, http)
        })
        .await;
        match drained {
            Ok((grpc, http)) => {
                grpc.expect("grpc server task panicked")?;
                http.expect("http server task panicked")?;
                info!("shutdown complete");
            }
            Err(_) => warn!(
                timeout_s = config.shutdown_timeout.as_secs_f64(),
                "shutdown timed out with calls still open; exiting anyway"
            ),
        }
        Ok(())
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { key, addr, source })
}

/// The TLS settings of the gRPC listener, if `[tls]` is configured.
fn tls_config(config: &Config) -> Result<Option<tonic::transport::ServerTlsConfig>, ServeError> {
    let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
        return Ok(None);
    };
    let read = |key: &'static str, path: &PathBuf| {
        std::fs::read(path).map_err(|source| ServeError::Tls {
            key,
            path: path.clone(),
            source,
        })
    };
    let identity = tonic::transport::Identity::from_pem(read("tls.cert", cert)?, read("tls.key", key)?);
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &config.tls.client_ca {
        // Optional at the TLS layer: an operator may come with a token instead;
        // AgentService requires the certificate, and each service checks its rule.
        tls = tls
            .client_ca_root(tonic::transport::Certificate::from_pem(read(
                "tls.client_ca",
                ca,
            )?))
            .client_auth_optional(true);
    }
    Ok(Some(tls))
}
