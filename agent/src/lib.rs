//! `secbeat-agent`: the node agent as a library.
//!
//! [`identity`] keeps the node id, [`cpu`] measures (or replays) CPU usage,
//! [`session`] runs one control stream, [`backoff`] and [`recover`] decide when and
//! whether to reconnect, and [`run`] ties them into the agent's life: reconnect
//! until told to terminate, shut down, or refused.

pub mod backoff;
pub mod cpu;
pub mod identity;
pub mod recover;
pub mod session;

use std::{path::PathBuf, time::Duration};

use rand::SeedableRng;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    backoff::Backoff,
    cpu::CpuSource,
    session::{SessionEnd, SessionSettings},
};

/// The agent's command line (every flag also reads a `SECBEAT_*` variable).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "secbeat-agent", version, verbatim_doc_comment)]
/// SecBeat node agent.
///
/// Keeps one gRPC stream to the orchestrator: Hello, then heartbeats and CPU
/// samples at the interval the orchestrator's Welcome sets. Reconnects with capped,
/// jittered exponential backoff. On a Terminate command: acknowledges, runs
/// --on-terminate within the grace period, says Goodbye and exits 0. On SIGTERM or
/// SIGINT: says Goodbye (reason "shutdown") and exits 0.
///
/// Exit codes: 0 terminated or shut down; 1 refused by the orchestrator (bad hello,
/// another agent owns this node id, credentials); 64 bad flags or state.
pub struct AgentArgs {
    /// Orchestrator gRPC URL
    #[arg(
        long,
        env = "SECBEAT_ORCHESTRATOR",
        value_name = "URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub orchestrator: String,
    /// Node id (UUID); without it, one is generated once and kept in --state-dir
    #[arg(long, env = "SECBEAT_NODE_ID", value_name = "UUID")]
    pub node_id: Option<uuid::Uuid>,
    /// Directory where the agent keeps its node id
    #[arg(
        long,
        env = "SECBEAT_AGENT_STATE_DIR",
        value_name = "DIR",
        default_value = "secbeat-agent-data"
    )]
    pub state_dir: PathBuf,
    /// Shell command run on Terminate (reason in $SECBEAT_TERMINATE_REASON), killed after the grace period
    #[arg(long, env = "SECBEAT_ON_TERMINATE", value_name = "CMD")]
    pub on_terminate: Option<String>,
    /// CPU source: proc (/proc/stat deltas), const:FRACTION (e.g. const:0.85), or trace:FILE.csv (timestamp,percent)
    #[arg(
        long,
        env = "SECBEAT_CPU_SOURCE",
        value_name = "SOURCE",
        default_value = "proc"
    )]
    pub cpu_source: String,
    /// Trace seconds replayed per real second for --cpu-source trace:FILE.csv (300 = one 5-minute step per second)
    #[arg(
        long,
        env = "SECBEAT_TRACE_SPEEDUP",
        value_name = "FACTOR",
        default_value_t = 1.0
    )]
    pub trace_speedup: f64,
    /// Host name to report [default: the kernel's host name]
    #[arg(long, env = "SECBEAT_HOSTNAME", value_name = "NAME")]
    pub hostname: Option<String>,
    /// IP to report [default: the address the orchestrator sees]
    #[arg(long, env = "SECBEAT_NODE_IP", value_name = "IP")]
    pub ip: Option<std::net::IpAddr>,
    /// Label to report, repeatable
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// First reconnect delay, seconds
    #[arg(
        long,
        env = "SECBEAT_RECONNECT_INITIAL",
        value_name = "SECS",
        default_value_t = 0.5
    )]
    pub reconnect_initial: f64,
    /// Longest reconnect delay, seconds
    #[arg(
        long,
        env = "SECBEAT_RECONNECT_MAX",
        value_name = "SECS",
        default_value_t = 30.0
    )]
    pub reconnect_max: f64,
    /// Bound on connecting and on waiting for the Welcome, seconds
    #[arg(
        long,
        env = "SECBEAT_CONNECT_TIMEOUT",
        value_name = "SECS",
        default_value_t = 5.0
    )]
    pub connect_timeout: f64,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    if key.is_empty() {
        return Err("label key is empty".to_owned());
    }
    Ok((key.to_owned(), value.to_owned()))
}

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
    cpu: CpuSource,
    backoff: Backoff,
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
        let cpu = CpuSource::parse(&args.cpu_source, args.trace_speedup, std::time::Instant::now())
            .map_err(|e| usage("--cpu-source", e.to_string()))?;
        let hostname = args.hostname.unwrap_or_else(kernel_hostname);
        let settings = SessionSettings {
            orchestrator: args.orchestrator,
            node_id,
            hostname,
            ip: args.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            labels: args.labels,
            on_terminate: args.on_terminate,
            connect_timeout,
        };
        Ok(Self {
            settings,
            cpu,
            backoff,
        })
    }

    /// This agent's node id.
    pub fn node_id(&self) -> uuid::Uuid {
        self.settings.node_id
    }

    /// Runs sessions until terminated, shut down (`shutdown` cancelled) or refused.
    pub async fn run(mut self, shutdown: CancellationToken) -> Exit {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        info!(node.id = %self.settings.node_id, orchestrator = %self.settings.orchestrator, "agent starting");
        loop {
            match session::run(&self.settings, &mut self.cpu, &shutdown).await {
                SessionEnd::Terminated => return Exit::Clean,
                SessionEnd::ShutDown => return Exit::Clean,
                SessionEnd::Fatal(status) => {
                    error!(code = ?status.code(), message = status.message(), "orchestrator refused this agent; not retrying");
                    return Exit::Refused;
                }
                SessionEnd::Lost { established, cause } => {
                    if established {
                        self.backoff.reset();
                    }
                    let delay = self.backoff.next_delay(&mut rng);
                    warn!(%cause, retry_in_s = delay.as_secs_f64(), "session lost; reconnecting");
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

fn kernel_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
