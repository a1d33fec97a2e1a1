//! `secbeat-agent`: the node agent as a library.
//!
//! [`args`] is the command line, [`identity`] keeps the node id, [`cpu`] measures (or replays) CPU usage,
//! [`session`] runs one control stream, [`hook`] runs `--on-terminate`, [`backoff`] and [`recover`] decide when and
//! whether to reconnect, and [`run`] ties them into the agent's life: reconnect
//! until told to terminate, shut down, or refused.

#![warn(missing_docs)]

pub mod args;
pub mod boot;
pub mod cpu;
pub mod hook;
pub mod identity;
pub mod metrics;
pub mod orchestrators;
pub mod priority;
pub mod recover;
pub mod session;

use std::{sync::Arc, time::Duration};

use rand::SeedableRng;
use secbeat::backoff::Backoff;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, warn};

pub use crate::args::AgentArgs;
use crate::{
    cpu::CpuSource,
    metrics::AgentMetrics,
    orchestrators::{Next, Orchestrators},
    session::{SessionEnd, SessionSettings},
};

/// How the agent's life ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Terminated as commanded, or shut down on a signal.
    Clean,
    /// Refused by the orchestrator.
    Refused,
}

/// A flag or state problem found before connecting.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {message}")]
pub struct UsageError {
    /// The flag concerned.
    pub flag: &'static str,
    /// What is wrong.
    pub message: String,
}

/// Everything validated and ready to run.
#[derive(Debug)]
pub struct Agent {
    settings: SessionSettings,
    orchestrators: Orchestrators,
    cpu: CpuSource,
    backoff: Backoff,
    metrics: AgentMetrics,
    metrics_listener: Option<std::net::TcpListener>,
    /// Why the previous established session ended, told in the next Hello.
    last_disconnect: String,
}

impl Agent {
    /// Validates the arguments, loads (or creates) the identity, opens the CPU source.
    pub fn prepare(args: AgentArgs) -> Result<Self, UsageError> {
        let usage = |flag, message: String| UsageError { flag, message };
        let node_id = match args.node_id {
            Some(id) if id.is_nil() => {
                return Err(usage("--node-id", "the nil uuid is not a node id".into()));
            }
            Some(id) => id,
            None => {
                identity::load_or_create(&args.state_dir).map_err(|e| usage("--state-dir", e.to_string()))?
            }
        };
        let seconds = |flag, value: f64| {
            Duration::try_from_secs_f64(value)
                .map_err(|_| usage(flag, format!("{value} is not a number of seconds")))
        };
        let backoff = Backoff::new(
            seconds("--reconnect-initial", args.reconnect_initial)?,
            seconds("--reconnect-max", args.reconnect_max)?,
            0.5,
        )
        .map_err(|e| usage("--reconnect-initial", e.to_string()))?;
        let connect_timeout = seconds("--connect-timeout", args.connect_timeout)?;
        let keepalive = seconds("--keepalive", args.keepalive)?;
        if keepalive.is_zero() {
            return Err(usage("--keepalive", "must be greater than zero".into()));
        }
        let read = |flag: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| usage(flag, format!("{}: {e}", path.display())))
        };
        let tls = match &args.ca {
            Some(ca) => {
                let mut tls = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(read("--ca", ca)?));
                if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
                    tls = tls.identity(tonic::transport::Identity::from_pem(
                        read("--cert", cert)?,
                        read("--key", key)?,
                    ));
                }
                Some(tls)
            }
            None if args.cert.is_some() => {
                return Err(usage(
                    "--cert",
                    "a client certificate needs TLS: give --ca too".into(),
                ));
            }
            None => None,
        };
        let configure: orchestrators::Configure = Arc::new(move |endpoint: tonic::transport::Endpoint| {
            let endpoint = endpoint
                .connect_timeout(connect_timeout)
                .tcp_nodelay(true)
                // The orchestrator sends nothing between commands, so without pings a
                // vanished peer is only noticed when TCP retransmissions give up (minutes).
                .http2_keep_alive_interval(keepalive)
                .keep_alive_timeout(keepalive)
                .keep_alive_while_idle(true);
            match &tls {
                Some(tls) => endpoint.tls_config(tls.clone()).map_err(|e| e.to_string()),
                None if endpoint.uri().scheme_str() == Some("https") => {
                    Err("an https:// orchestrator needs --ca".to_owned())
                }
                None => Ok(endpoint),
            }
        });
        let mut endpoints = Vec::new();
        for url in args
            .orchestrator
            .iter()
            .map(|url| url.trim())
            .filter(|url| !url.is_empty())
        {
            let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
                .map_err(|e| usage("--orchestrator", format!("{url:?} is not a URL: {e}")))?;
            let endpoint = configure(endpoint).map_err(|message| {
                let flag = if message.contains("--ca") {
                    "--ca"
                } else {
                    "--orchestrator"
                };
                usage(flag, message)
            })?;
            endpoints.push(endpoint);
        }
        if endpoints.is_empty() {
            return Err(usage("--orchestrator", "no orchestrator URL given".into()));
        }
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let orchestrators = Orchestrators::new(endpoints, configure, &mut rng);
        let cpu = CpuSource::parse(&args.cpu_source, args.trace_speedup, std::time::Instant::now())
            .map_err(|e| usage("--cpu-source", e.to_string()))?;
        let hostname = args
            .hostname
            .or_else(secbeat::process::kernel_hostname)
            .unwrap_or_else(|| "unknown".to_owned());
        let settings = SessionSettings {
            node_id,
            hostname,
            ip: args.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            labels: args.labels,
            on_terminate: args.on_terminate,
            on_drain: args.on_drain,
            on_resume: args.on_resume,
            boot: boot::Boot::of_this_host(),
            connect_timeout,
            token: args.token,
        };
        // Bound now, so an address in use is a start-up error, not a silent gap.
        let metrics_listener = args
            .metrics_listen
            .map(|addr| {
                let listener = std::net::TcpListener::bind(addr)
                    .map_err(|e| usage("--metrics-listen", format!("cannot listen on {addr}: {e}")))?;
                listener
                    .set_nonblocking(true)
                    .map_err(|e| usage("--metrics-listen", e.to_string()))?;
                Ok(listener)
            })
            .transpose()?;
        Ok(Self {
            settings,
            orchestrators,
            cpu,
            backoff,
            metrics: AgentMetrics::new(),
            metrics_listener,
            last_disconnect: String::new(),
        })
    }

    /// This agent's node id.
    pub fn node_id(&self) -> uuid::Uuid {
        self.settings.node_id
    }

    /// Runs sessions until terminated, shut down (`shutdown` cancelled) or refused.
    pub async fn run(mut self, shutdown: CancellationToken) -> Exit {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let orchestrator = self.orchestrators.current().uri().to_string();
        info!(node.id = %self.settings.node_id, %orchestrator, known = self.orchestrators.len(), "agent starting");
        if let Some(listener) = self.metrics_listener.take() {
            tokio::spawn(metrics::serve(listener, self.metrics.clone(), shutdown.clone()));
        }
        loop {
            let span = tracing::info_span!("agent_session", node.id = %self.settings.node_id);
            let endpoint = self.orchestrators.current().clone();
            let ended = session::run(
                &endpoint,
                &self.settings,
                &self.last_disconnect,
                &mut self.cpu,
                &self.metrics,
                &shutdown,
            )
            .instrument(span)
            .await;
            match ended {
                SessionEnd::Terminated => return Exit::Clean,
                SessionEnd::ShutDown => return Exit::Clean,
                SessionEnd::Fatal(status) => {
                    error!(code = ?status.code(), message = status.message(), "orchestrator refused this agent; not retrying");
                    return Exit::Refused;
                }
                SessionEnd::Lost {
                    established,
                    cause,
                    leader,
                    retry_after,
                } => {
                    if let Some(after) = retry_after {
                        self.orchestrators.retry_after(after, std::time::Instant::now());
                        // A live orchestrator said when leadership moves: the fleet
                        // is handing over, not failing. The backoff starts again, so
                        // a hiccup once the new leader serves costs half a second,
                        // not the several seconds a failover's attempts built up.
                        self.backoff.reset();
                    }
                    self.metrics.sessions_lost.inc();
                    if established {
                        self.last_disconnect = cause.clone();
                        self.backoff.reset();
                        self.orchestrators.connected();
                    }
                    if self.orchestrators.after_lost(leader.as_deref()) == Next::DialNow {
                        let leader = leader.unwrap_or_default();
                        info!(from = %endpoint.uri(), %leader, %cause, "following the standby's pointer to the leader");
                        continue;
                    }
                    let spread = Duration::from_secs_f64(rand::Rng::random::<f64>(&mut rng));
                    let delay = self.orchestrators.delay(
                        self.backoff.next_delay(&mut rng),
                        std::time::Instant::now(),
                        spread,
                    );
                    let retry_in_s = delay.as_secs_f64();
                    let next = self.orchestrators.current().uri().to_string();
                    if established {
                        warn!(%cause, retry_in_s, %next, "session lost; reconnecting");
                    } else {
                        warn!(%cause, retry_in_s, %next, "connect failed; retrying");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => {
                            info!("shutdown while disconnected");
                            return Exit::Clean;
                        }
                    }
                }
            }
        }
    }
}
