//! The agent's command line: every flag also reads a `SECBEAT_*` variable.

use std::path::PathBuf;

// The agent's command line (every flag also reads a `SECBEAT_*` variable); the
// doc comment below is its --help, man page and description.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "secbeat-agent", version, verbatim_doc_comment)]
/// SecBeat node agent.
///
/// Keeps one gRPC stream to the orchestrator: Hello, then heartbeats and CPU
/// samples at the interval the orchestrator's Welcome sets. Reconnects with capped,
/// jittered exponential backoff. On a Terminate command: acknowledges, runs
/// --on-terminate within the grace period, says Goodbye and exits 0. On a Drain
/// command: runs --on-drain (withdraw the node's route) within the drain's
/// deadline and reports the outcome, staying connected; on Resume: --on-resume.
/// On SIGTERM or SIGINT: says Goodbye (reason "shutdown") and exits 0.
///
/// Exit codes: 0 terminated or shut down; 1 refused by the orchestrator (bad hello,
/// another agent owns this node id, credentials); 64 bad flags or state.
pub struct AgentArgs {
    /// Logging: --log-format, --log-file
    #[command(flatten)]
    pub logs: secbeat::telemetry::LogArgs,
    /// Orchestrator gRPC URLs, comma-separated or repeated (every orchestrator of
    /// a highly available control plane): the agent starts at a random one, follows
    /// a standby's pointer to the leader (and, when that fails, comes back when the
    /// standby said leadership can move), and otherwise tries the next in turn
    #[arg(
        long,
        env = "SECBEAT_ORCHESTRATOR",
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        action = clap::ArgAction::Append,
        default_value = "http://127.0.0.1:50051"
    )]
    pub orchestrator: Vec<String>,
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
    /// Shell command run on Drain, where the node's route is withdrawn (reason in $SECBEAT_DRAIN_REASON); it must exit 0 within the drain's deadline for the node to count as DRAINED. Unset: a drain succeeds at once
    #[arg(long, env = "SECBEAT_ON_DRAIN", value_name = "CMD")]
    pub on_drain: Option<String>,
    /// Shell command run on Resume, where the node's route is announced again (reason in $SECBEAT_RESUME_REASON); a failure leaves the node DRAINED. Unset: a resume succeeds at once
    #[arg(long, env = "SECBEAT_ON_RESUME", value_name = "CMD")]
    pub on_resume: Option<String>,
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
    /// HTTP/2 ping interval, seconds; an unanswered ping for as long again drops the
    /// connection and reconnects (detects a vanished orchestrator or a partition)
    #[arg(long, env = "SECBEAT_KEEPALIVE", value_name = "SECS", default_value_t = 10.0)]
    pub keepalive: f64,
    /// Bound on connecting and on waiting for the Welcome, seconds
    #[arg(
        long,
        env = "SECBEAT_CONNECT_TIMEOUT",
        value_name = "SECS",
        default_value_t = 5.0
    )]
    pub connect_timeout: f64,
    /// CA certificate (PEM) the orchestrator's certificate must chain to; turns TLS on (use an https:// URL)
    #[arg(long, env = "SECBEAT_AGENT_CA", value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// This agent's client certificate (PEM), issued for its node id (mTLS)
    #[arg(long, env = "SECBEAT_AGENT_CERT", value_name = "FILE", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM)
    #[arg(long, env = "SECBEAT_AGENT_KEY", value_name = "FILE", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
    /// The orchestrator's agent_token, sent as `authorization: Bearer` (when the
    /// orchestrator has tokens but no client CA); prefer the environment variable
    #[arg(
        long,
        env = "SECBEAT_AGENT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<AgentToken>,
    /// Serve this agent's Prometheus metrics at http://ADDR/metrics (off by default)
    #[arg(long, env = "SECBEAT_AGENT_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Run the agent's threads under SCHED_RR at this real-time priority (1-99), so
    /// that a node saturated by attack traffic cannot starve its heartbeat; hooks
    /// still start at normal priority. It must be above any real-time workload on
    /// the node: at the same or a lower one, a busy real-time process starves the
    /// agent completely. Needs CAP_SYS_NICE (or systemd's CPUSchedulingPolicy=);
    /// without it the agent warns and runs at normal priority
    #[arg(
        long,
        env = "SECBEAT_REALTIME_PRIORITY",
        value_name = "1-99",
        value_parser = clap::value_parser!(u8).range(1..=99)
    )]
    pub realtime_priority: Option<u8>,
    /// Lock the agent's memory (mlockall), so that memory pressure on the node
    /// cannot page its code or buffers out; needs CAP_IPC_LOCK or LimitMEMLOCK=infinity
    #[arg(long, env = "SECBEAT_LOCK_MEMORY")]
    pub lock_memory: bool,
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_point_at_a_local_orchestrator_and_real_cpu() {
        let args = AgentArgs::try_parse_from(["secbeat-agent"]).unwrap();
        assert_eq!(args.orchestrator, ["http://127.0.0.1:50051"]);
        assert_eq!(args.cpu_source, "proc");
        assert!(args.node_id.is_none());
    }

    #[test]
    fn labels_are_key_value_pairs() {
        let args =
            AgentArgs::try_parse_from(["secbeat-agent", "--label", "region=eu-west", "--label", "pool="])
                .unwrap();
        assert_eq!(
            args.labels,
            [
                ("region".into(), "eu-west".into()),
                ("pool".into(), String::new())
            ]
        );
        assert!(AgentArgs::try_parse_from(["secbeat-agent", "--label", "novalue"]).is_err());
        assert!(AgentArgs::try_parse_from(["secbeat-agent", "--label", "=x"]).is_err());
    }

    #[test]
    fn a_realtime_priority_is_one_to_ninety_nine() {
        let args = AgentArgs::try_parse_from(["secbeat-agent", "--realtime-priority", "10"]).unwrap();
        assert_eq!(args.realtime_priority, Some(10));
        for bad in ["0", "100", "-1", "high"] {
            assert!(
                AgentArgs::try_parse_from(["secbeat-agent", "--realtime-priority", bad]).is_err(),
                "{bad}"
            );
        }
        assert!(!AgentArgs::try_parse_from(["secbeat-agent"]).unwrap().lock_memory);
    }
}

/// The agent token. Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentToken(pub String);

impl std::str::FromStr for AgentToken {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        // It goes into a gRPC header: visible ASCII only.
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be non-empty visible ASCII without spaces".into());
        }
        Ok(Self(text.to_owned()))
    }
}

impl std::fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentToken(<redacted>)")
    }
}
