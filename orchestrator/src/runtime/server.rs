//! Wiring: binds the listeners, serves gRPC (with health and reflection v1 +
//! v1alpha) and HTTP, runs leader terms, and shuts all of it down gracefully.
//!
//! The listeners live as long as the process. What only the leader may run (the
//! fleet actor with the agent streams, the scaling loop, the webhook sender, the
//! store writer) lives in a *term* ([`RunningTerm`]): started when this process is
//! elected, stopped the moment the term ends. With the embedded store the process
//! is elected once, at start; with etcd the [`coordinator`] says when.

use std::{io, net::SocketAddr, path::PathBuf};

use secbeat::pb::{
    agent_service_server::AgentServiceServer, fleet_service_server::FleetServiceServer,
    prediction_service_server::PredictionServiceServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    config::{Config, Token},
    domain::event::{EventKind, FleetEvent},
    edge::auth::Authority,
    edge::etcd::{
        self, LeaderInfo,
        client::{EtcdClient, EtcdTls},
        coordinator::{self, CoordinatorSettings, RoleChange},
        store::EtcdStore,
    },
    edge::grpc::{
        agent_service::{AgentApi, StreamLimits},
        fleet_service::FleetApi,
        prediction_service::PredictionApi,
    },
    edge::http,
    edge::listener,
    edge::metrics::Metrics,
    edge::store::{Store, StoreError, StoredState, Write, redb::RedbStore, writer},
    edge::tls,
    edge::webhook::sender::{self, SenderError, SenderOutputs, SenderSettings},
    runtime::bus::{self, EventBus},
    runtime::fleet::{self, FleetSettings, Outputs, Restored},
    runtime::lag::{self, DelayGauge},
    runtime::role::{self, Leading, NotLeader, RoleSender, Term},
    runtime::scaling_loop::{self, ScalingOutputs, ScalingSettings},
};

/// While a newly elected orchestrator loads the fleet's state, agents that reach
/// it are told to retry after this (plus their own spread of up to a second).
const TAKEOVER_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

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
    /// The state store could not be opened or read.
    #[error("state_dir: {0}")]
    Store(#[from] StoreError),
    /// The etcd client could not be set up (a bad endpoint, unreadable TLS files).
    #[error("{0}")]
    Etcd(#[from] etcd::client::EtcdError),
    /// The webhook client could not be built.
    #[error(transparent)]
    Webhook(#[from] SenderError),
    /// Reflection descriptors failed to load (a build problem).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// TLS (to agents or to etcd) could not be set up: a file that cannot be
    /// read or is not what its key needs (the message names the key).
    #[error(transparent)]
    TlsSetup(#[from] tls::TlsError),
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
    backend: Backend,
    metrics: Metrics,
}

/// Where durable state lives.
#[derive(Debug)]
enum Backend {
    /// The embedded store, opened at bind (locked: a second orchestrator on the
    /// same `state_dir` fails to start) and read once the listeners serve.
    Embedded(Box<RedbStore>),
    /// etcd, shared with the other orchestrators.
    Etcd(EtcdClient),
}

impl Orchestrator {
    /// Opens the state store (creating `state_dir` if needed), or sets up the etcd
    /// client; then binds both listeners (port 0 picks a free one). What the last
    /// run left is read once they serve (see [`Terms::embedded`]).
    pub async fn bind(config: Config) -> Result<Self, ServeError> {
        let metrics = Metrics::new();
        let backend = if config.high_availability() {
            let tls = etcd_tls(&config)?;
            Backend::Etcd(EtcdClient::new(
                &config.etcd_endpoints,
                tls,
                config.etcd_request_timeout,
                metrics.clone(),
            )?)
        } else {
            std::fs::create_dir_all(&config.state_dir).map_err(|source| ServeError::StateDir {
                path: config.state_dir.clone(),
                source,
            })?;
            Backend::Embedded(Box::new(RedbStore::open(&config.state_dir)?))
        };
        let grpc = bind("grpc_listen", config.grpc_listen).await?;
        let http = bind("http_listen", config.http_listen).await?;
        Ok(Self {
            config,
            grpc,
            http,
            backend,
            metrics,
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
            backend,
            metrics,
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
        if config.webhook_secret.is_none() {
            warn!(
                "webhook_secret is not set: webhooks are sent UNSIGNED and receivers cannot tell them from forgeries (set SECBEAT_WEBHOOK_SECRET)"
            );
        }
        let open_files = listener::raise_open_files_limit(config.max_nodes);
        let connection_limits = listener::ConnectionLimits {
            handshake_timeout: config.connection_handshake_timeout,
            idle_timeout: config.connection_idle_timeout,
            per_source: config.max_connections_per_source,
            // Agents may use every descriptor but those kept for HTTP and the rest.
            total: listener::agent_descriptors(open_files),
        };
        let (role_sender, role) = role::channel();
        let advertise_url = config.advertise_url(grpc_addr);
        if matches!(backend, Backend::Embedded(_)) {
            // The embedded store's process leads once its state is read: agents
            // that come in meanwhile (a restarted fleet knocks at once) are held.
            role_sender.stand_by(NotLeader::taking_over(advertise_url.clone(), TAKEOVER_RETRY));
        }

        let (health, health_service) = tonic_health::server::health_reporter();
        let health = Health(health);
        health.set(false).await;
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
        let builder = tonic::transport::Server::builder();
        let tls = match tls_files(&config) {
            Some(files) => {
                let server = tls::server_config(&files, &config.state_dir)?;
                info!(
                    client_certificates = files.client_ca.is_some(),
                    shared_ticket_key = files.ticket_key.is_some(),
                    "grpc api serves TLS, with session tickets"
                );
                Some(server)
            }
            None => None,
        };
        if !authority.enforcing() {
            warn!(
                "no client CA and no tokens configured: every caller may operate the fleet (fine for development on loopback; see SECURITY.md)"
            );
        }
        let grpc_router = builder
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
                    role.clone(),
                    limits,
                    authority.clone(),
                    metrics.clone(),
                ))
                .max_decoding_message_size(config.max_message_bytes as usize),
            )
            .add_service(FleetServiceServer::new(FleetApi::new(
                role.clone(),
                authority.clone(),
            )))
            .add_service(PredictionServiceServer::new(PredictionApi::new(
                role.clone(),
                authority.clone(),
            )));
        let incoming = listener::incoming(grpc, metrics.clone(), connection_limits);
        let stop = shutdown.clone().cancelled_owned();
        let grpc_task = match tls {
            Some(tls) => {
                let handshake_timeout = config.connection_handshake_timeout;
                let incoming = tls::accept(incoming, tls, handshake_timeout, metrics.clone());
                tokio::spawn(grpc_router.serve_with_incoming_shutdown(incoming, stop))
            }
            None => tokio::spawn(grpc_router.serve_with_incoming_shutdown(incoming, stop)),
        };
        // HTTP is held to the same deadlines and per-source cap (not to the agents'
        // descriptor budget: it is what stays reachable when that runs out).
        let http_limits = listener::ConnectionLimits {
            total: 0,
            ..connection_limits
        };
        let http_server = axum::serve(
            listener::HttpListener::new(http, metrics.clone(), http_limits),
            http::router(http::AppState {
                role: role.clone(),
                metrics: metrics.clone(),
                authority: authority.clone(),
            }),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());

        info!(addr = %grpc_addr, "grpc api listening");
        info!(addr = %http_addr, "http api listening");
        let http_task = tokio::spawn(async move { http_server.await.map_err(ServeError::Http) });

        let delay = lag::spawn(metrics.scheduling_delay_seconds.clone(), shutdown.clone());
        let terms = Terms {
            config: &config,
            metrics: &metrics,
            delay,
            role: role_sender,
            health,
            advertise_url,
        };
        match backend {
            Backend::Embedded(store) => terms.embedded(*store, &shutdown).await?,
            Backend::Etcd(client) => terms.elected_on_etcd(client, &shutdown).await,
        }

        info!("shutting down: draining calls");
        let drained = tokio::time::timeout(config.shutdown_timeout, async {
            (grpc_task.await, http_task.await)
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
        drop(role);
        Ok(())
    }
}

/// Health as gRPC health checks see it: the three services serve on the leader
/// and not on a standby (a load balancer's check of `secbeat.v1.AgentService`
/// finds the leader).
struct Health(tonic_health::server::HealthReporter);

impl Health {
    async fn set(&self, serving: bool) {
        let reporter = &self.0;
        if serving {
            reporter.set_serving::<AgentServiceServer<AgentApi>>().await;
            reporter.set_serving::<FleetServiceServer<FleetApi>>().await;
            reporter
                .set_serving::<PredictionServiceServer<PredictionApi>>()
                .await;
        } else {
            reporter.set_not_serving::<AgentServiceServer<AgentApi>>().await;
            reporter.set_not_serving::<FleetServiceServer<FleetApi>>().await;
            reporter
                .set_not_serving::<PredictionServiceServer<PredictionApi>>()
                .await;
        }
    }
}

/// Starts and stops leader terms as the role changes.
struct Terms<'a> {
    config: &'a Config,
    metrics: &'a Metrics,
    /// The runtime's scheduling delay, which the detector allows for.
    delay: DelayGauge,
    role: RoleSender,
    health: Health,
    advertise_url: String,
}

impl Terms<'_> {
    /// The embedded store: one term, from now to shutdown. The state is read
    /// here, with the listeners already serving and agents held (the role says
    /// taking over), so a restarted fleet's first attempts wait instead of
    /// failing into their backoff; a bad file still ends the start.
    async fn embedded(&self, store: RedbStore, shutdown: &CancellationToken) -> Result<(), ServeError> {
        let loading = std::time::Instant::now();
        let (mut store, stored) = tokio::task::spawn_blocking(move || {
            let stored = store.load();
            (store, stored)
        })
        .await
        .map_err(|error| StoreError(format!("reading the embedded store: {error}")))?;
        let mut stored = stored?;
        info!(
            nodes = stored.nodes.len(),
            outbox = stored.outbox.len(),
            took_ms = loading.elapsed().as_millis() as u64,
            "loaded the fleet's state from the embedded store"
        );
        // A new event epoch for this run, durable before any event is numbered.
        stored.event_epoch += 1;
        store.apply(&[Write::PutEventEpoch(stored.event_epoch)])?;
        let term = Term::new(0, shutdown);
        let running = self.start(term, Box::new(store), stored).await?;
        info!(
            state_dir = %self.config.state_dir.display(),
            "orchestrator ready (embedded store: this orchestrator leads)"
        );
        shutdown.cancelled().await;
        self.stop(running).await;
        Ok(())
    }

    /// etcd: campaign, lead while elected, stand by otherwise.
    async fn elected_on_etcd(&self, client: EtcdClient, shutdown: &CancellationToken) {
        let settings = CoordinatorSettings {
            prefix: self.config.etcd_prefix.clone(),
            lease_ttl: self.config.leader_lease_ttl,
            me: LeaderInfo {
                url: self.advertise_url.clone(),
                fleet: etcd::fleet_fingerprint(&self.config.provisioning_webhook_url),
            },
        };
        info!(
            endpoints = %self.config.etcd_endpoints.join(","), prefix = %settings.prefix,
            advertise_url = %self.advertise_url, lease_ttl_s = settings.lease_ttl.as_secs(),
            "orchestrator ready (etcd): campaigning for leadership"
        );
        let (mut changes, coordinator) = coordinator::spawn(client.clone(), settings, shutdown.clone());
        let mut running: Option<RunningTerm> = None;
        loop {
            let ended = async {
                match &running {
                    Some(term) => term.term.ended().cancelled().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                change = changes.recv() => match change {
                    Some(RoleChange::Elected(term)) => {
                        if let Some(previous) = running.take() {
                            self.stop(previous).await;
                        }
                        // Until the state is loaded (about a second at 50,000
                        // nodes), agents that find this process come back here
                        // shortly, not to the old leader a standby would name.
                        self.role.stand_by(NotLeader::taking_over(self.advertise_url.clone(), TAKEOVER_RETRY));
                        running = self.start_on_etcd(&client, term).await;
                    }
                    Some(RoleChange::Following {
                        leader,
                        problem,
                        lease_ends,
                    }) => {
                        if let Some(previous) = running.take() {
                            self.stop(previous).await;
                        }
                        self.role.stand_by(NotLeader {
                            leader: leader.map(|leader| leader.url),
                            problem,
                            lease_ends,
                            taking_over: false,
                        });
                    }
                    None => break,
                },
                () = ended => {
                    // Stop at once; the coordinator's Following comes after.
                    if let Some(previous) = running.take() {
                        self.stop(previous).await;
                    }
                }
            }
        }
        if let Some(previous) = running.take() {
            self.stop(previous).await;
        }
        let _ = coordinator.await;
    }

    /// Loads the fleet's state from etcd for a new term and starts it; a term that
    /// cannot load is ended (the coordinator campaigns again).
    async fn start_on_etcd(&self, client: &EtcdClient, term: Term) -> Option<RunningTerm> {
        let mut store = EtcdStore::new(
            client.clone(),
            self.config.etcd_prefix.clone(),
            term.clone(),
            tokio::runtime::Handle::current(),
        );
        let loading = std::time::Instant::now();
        let loaded = async {
            let mut stored = store.load_async().await?;
            stored.event_epoch += 1;
            store
                .apply_async(&[Write::PutEventEpoch(stored.event_epoch)])
                .await?;
            Ok::<_, StoreError>(stored)
        }
        .await;
        let stored = match loaded {
            Ok(stored) => stored,
            Err(error) => {
                error!(%error, "elected, but the fleet's state could not be loaded from etcd; stepping down");
                term.end(format!("could not load state: {error}"));
                return None;
            }
        };
        info!(
            nodes = stored.nodes.len(),
            outbox = stored.outbox.len(),
            history_points = stored.history.len(),
            took_ms = loading.elapsed().as_millis() as u64,
            "elected: loaded the fleet's state from etcd"
        );
        let starting = std::time::Instant::now();
        match self.start(term.clone(), Box::new(store), stored).await {
            Ok(running) => {
                info!(
                    took_ms = starting.elapsed().as_millis() as u64,
                    "elected: the term's parts started"
                );
                Some(running)
            }
            Err(error) => {
                error!(%error, "elected, but the term could not start; stepping down");
                term.end(format!("could not start: {error}"));
                None
            }
        }
    }

    /// Starts a term's leader-only parts on `store` from `stored`, and leads.
    async fn start(
        &self,
        term: Term,
        store: Box<dyn Store>,
        stored: StoredState,
    ) -> Result<RunningTerm, ServeError> {
        let config = self.config;
        let metrics = self.metrics;
        let stop = term.ended().clone();
        let events = EventBus::new(
            bus::first_sequence(stored.event_epoch),
            config.event_history_size as usize,
        );
        let (committed_tx, committed) = tokio::sync::mpsc::unbounded_channel();
        let (store, store_health, store_thread) = writer::spawn(store, committed_tx);
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
            stop.clone(),
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
            automation: stored.automation,
        };
        let outputs = Outputs {
            store: store.clone(),
            metrics: metrics.clone(),
            bus: events.clone(),
            delay: self.delay.clone(),
        };
        let (fleet, actor) = fleet::spawn(settings, restored, outputs, stop.clone());
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
            stop,
        );
        events.publish(FleetEvent::new(
            EventKind::LeaderElected,
            format!(
                "{} leads (fencing token {}, event epoch {})",
                self.advertise_url, term.token, stored.event_epoch
            ),
            std::time::SystemTime::now(),
        ));
        let leading = Leading {
            fleet,
            predictions,
            events: events.clone(),
            store: store_health,
        };
        self.role.lead(leading);
        metrics.leader.set(1);
        metrics.leader_changes.inc();
        self.health.set(true).await;
        info!(
            token = term.token,
            heartbeat_interval_s = config.heartbeat_interval.as_secs_f64(),
            heartbeat_timeout_s = config.heartbeat_timeout.as_secs_f64(),
            dead_node_check_interval_s = config.dead_node_check_interval.as_secs_f64(),
            required_consecutive_failures = config.required_consecutive_failures,
            scaling_check_interval_s = config.scaling_check_interval_seconds.as_secs_f64(),
            scaling_mode = ?config.scaling_mode,
            forecast_model = %config.forecast_model,
            "leading: accepting agents"
        );
        Ok(RunningTerm {
            term,
            events,
            tasks: vec![actor, scaling_task, sender],
            store_thread,
        })
    }

    /// Ends a term: every leader-only part stops (agents' streams end with
    /// UNAVAILABLE and reconnect to whoever leads), watchers get LEADER_LOST, and
    /// the writer finishes what it may still write.
    async fn stop(&self, running: RunningTerm) {
        let RunningTerm {
            term,
            events,
            tasks,
            store_thread,
        } = running;
        term.end("shutting down");
        self.role.stand_by(NotLeader::default());
        self.health.set(false).await;
        self.metrics.leader.set(0);
        self.metrics.leader_changes.inc();
        let reason = term.end_reason();
        info!(token = term.token, %reason, "leader term ending: closing agent streams");
        let stopped = tokio::time::timeout(self.config.shutdown_timeout, async {
            for task in tasks {
                let _ = task.await;
            }
            // Every publisher has stopped: say why, then end the event watchers.
            events.publish(FleetEvent::new(
                EventKind::LeaderLost,
                format!("{} stopped leading: {reason}", self.advertise_url),
                std::time::SystemTime::now(),
            ));
            events.close();
            // Every writer handle is gone now: the writer finishes what is queued
            // (a fenced store refuses it and stops).
            let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
        })
        .await;
        if stopped.is_err() {
            warn!(
                timeout_s = self.config.shutdown_timeout.as_secs_f64(),
                "leader term did not stop within shutdown_timeout; moving on"
            );
        }
    }
}

/// A term's running parts.
struct RunningTerm {
    term: Term,
    events: EventBus,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    store_thread: std::thread::JoinHandle<()>,
}

/// The `[etcd_tls]` files, read.
fn etcd_tls(config: &Config) -> Result<Option<EtcdTls>, ServeError> {
    let tls = &config.etcd_tls;
    if tls.ca.is_none() && tls.cert.is_none() {
        return Ok(None);
    }
    let ca = tls
        .ca
        .as_ref()
        .map(|path| tls::read_file("etcd_tls.ca", path))
        .transpose()?;
    let identity = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => Some((
            tls::read_file("etcd_tls.cert", cert)?,
            tls::read_file("etcd_tls.key", key)?,
        )),
        _ => None,
    };
    Ok(Some(EtcdTls { ca, identity }))
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    secbeat::process::listen(addr).map_err(|source| ServeError::Bind { key, addr, source })
}

/// The TLS files of the gRPC listener, if `[tls]` is configured.
fn tls_files(config: &Config) -> Option<tls::TlsFiles> {
    let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
        return None;
    };
    Some(tls::TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: config.tls.client_ca.clone(),
        ticket_key: config.tls.session_ticket_key.clone(),
    })
}
