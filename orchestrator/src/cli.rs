//! The command line: `secbeat-orchestrator`'s flags and subcommands, in the
//! library so that its man page and shell completions are generated from the same
//! definitions as `--help` (`secbeat-docgen`), and can never disagree with it.

// clap turns doc comments into `--help` text, so items documented there are not
// documented twice (a doc comment on a flattened field would change the help).
#![allow(missing_docs)]

use std::path::PathBuf;

use secbeat::telemetry::LogArgs;

use crate::{config::ConfigFlags, domain::forecast::Model};

/// SecBeat fleet control plane.
///
/// Agents (`secbeat-agent`) keep one gRPC stream each to this orchestrator; it
/// detects failed nodes (broken streams, silence), tells them apart from nodes it
/// told to terminate, and serves the operator API (FleetService, with reflection
/// for grpcurl) and /healthz, /readyz over HTTP.
///
/// Configuration: embedded defaults < TOML file (--config) < SECBEAT_* environment
/// < flags. Every key below is also a TOML key (same name with underscores).
/// Durations are seconds and may be fractions. Invalid configuration exits 64.
///
/// `secbeat-orchestrator backtest --input FILE.csv` replays a CPU trace through the
/// forecaster instead of serving (see `backtest --help`).
#[derive(Debug, clap::Parser)]
#[command(name = "secbeat-orchestrator", version, verbatim_doc_comment)]
pub struct Cli {
    /// TOML configuration file (the seed's keys at top level)
    #[arg(long, env = "SECBEAT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub flags: ConfigFlags,
    #[command(flatten)]
    pub logs: LogArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Replay a CPU trace through the live forecaster and compare models
    ///
    /// The trace is CSV `timestamp,value` (timestamps YYYY-MM-DD HH:MM:SS, values in
    /// percent, as data/nab). Each row is one scaling check on the trace's
    /// own clock: 60-minute window, 10-minute horizon, gaps handled by time. Prints
    /// the model against the baselines (current value, window mean, the design
    /// card's linear regression, Holt-Winters): share within +-10 points, MAE and
    /// bias in points; the same by segment (the first day, after it, fast moves of
    /// more than 10 points in the horizon, the calm rest); then how well the stated
    /// confidence is calibrated. With several --input files, the figures pooled
    /// over all of them follow. Exits 65 on a malformed trace, naming the line.
    #[command(verbatim_doc_comment)]
    Backtest(BacktestArgs),
    /// Create a development CA and certificates for TLS and mTLS
    ///
    /// `certs init` writes ca.pem/ca.key and orchestrator.pem/.key (SANs localhost,
    /// 127.0.0.1 and every --host). `certs issue-agent --node-id UUID` writes
    /// agent-<uuid>.pem/.key (SAN urn:secbeat:node:<uuid>, the only node id that
    /// certificate may claim). `certs issue-operator --name NAME [--viewer]` writes
    /// operator-<name>.pem/.key (or a read-only viewer). Keys are mode 0600.
    #[command(verbatim_doc_comment, subcommand)]
    Certs(CertsCommand),
    /// Print every configuration key at its default, documented (a config file to start from)
    ExampleConfig,
}

#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Create the CA and the orchestrator's server certificate
    Init {
        /// Directory for the files (created if missing)
        #[arg(long, default_value = "certs", value_name = "DIR")]
        dir: PathBuf,
        /// Extra DNS names or IP addresses the orchestrator is reached at (repeatable)
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
    },
    /// Issue an agent certificate bound to one node id
    IssueAgent {
        /// Directory holding ca.pem/ca.key
        #[arg(long, default_value = "certs", value_name = "DIR")]
        dir: PathBuf,
        /// The node id (default: a new random one, printed)
        #[arg(long, value_name = "UUID")]
        node_id: Option<uuid::Uuid>,
    },
    /// Issue an operator (or viewer) client certificate
    IssueOperator {
        /// Directory holding ca.pem/ca.key
        #[arg(long, default_value = "certs", value_name = "DIR")]
        dir: PathBuf,
        /// Who it is for (letters, digits, - _ . @)
        #[arg(long, value_name = "NAME")]
        name: String,
        /// Read-only: may list and watch, not terminate
        #[arg(long)]
        viewer: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct BacktestArgs {
    /// The trace (CSV: timestamp,value in percent); repeat for several, pooled at the end
    #[arg(long, value_name = "FILE", required = true)]
    pub input: Vec<PathBuf>,
    /// Model to evaluate: auto, naive, mean, level, trend, seasonal_hour, seasonal_day, holt_winters, linear
    #[arg(long, default_value = "auto", value_name = "NAME")]
    pub model: Model,
    /// Write every prediction as target_timestamp,predicted,confidence,model (predicted in percent; one --input only)
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}
