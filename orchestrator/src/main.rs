//! `secbeat-orchestrator`: parse flags, load config, run, exit with a code.

use std::{path::PathBuf, process::ExitCode};

use secbeat::telemetry::{self, LogArgs};
use secbeat_orchestrator::{
    config::{self, Config, ConfigFlags},
    domain::forecast::{Model, backtest},
    runtime::server::Orchestrator,
};
use tokio_util::sync::CancellationToken;
use tracing::error;

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
struct Cli {
    /// TOML configuration file (the seed's keys at top level)
    #[arg(long, env = "SECBEAT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: ConfigFlags,
    #[command(flatten)]
    logs: LogArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Replay a CPU trace through the live forecaster and compare models
    ///
    /// The trace is CSV `timestamp,value` (timestamps YYYY-MM-DD HH:MM:SS, values in
    /// percent, as data/nab). Each row is one scaling check on the trace's
    /// own clock: 60-minute window, 10-minute horizon, gaps handled by time. Prints
    /// the model against the baselines (current value, window mean, the design
    /// card's linear regression): share within +-10 points, MAE and bias in points;
    /// then how well the stated confidence is calibrated. Exits 65 on a malformed
    /// trace, naming the line.
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
enum CertsCommand {
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
struct BacktestArgs {
    /// The trace (CSV: timestamp,value in percent)
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// Model to evaluate: auto, naive, mean, level, trend, seasonal_hour, seasonal_day, linear
    #[arg(long, default_value = "auto", value_name = "NAME")]
    model: Model,
    /// Write every prediction as target_timestamp,predicted,confidence,model (predicted in percent)
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
}

/// Exit code for a malformed input file (sysexits EX_DATAERR).
const EXIT_DATA: u8 = 65;

fn main() -> ExitCode {
    let cli = match secbeat::process::parse_args::<Cli>() {
        Ok(parsed) => parsed,
        Err(exit) => return exit,
    };
    match &cli.command {
        Some(Command::Backtest(args)) => return run_backtest(args),
        Some(Command::Certs(command)) => return run_certs(command),
        Some(Command::ExampleConfig) => {
            print!("{}", config::example_toml());
            return ExitCode::SUCCESS;
        }
        None => {}
    }
    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("secbeat-orchestrator: config error: {message}");
            return ExitCode::from(secbeat::process::EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("secbeat-orchestrator: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let telemetry = match telemetry::init("secbeat-orchestrator", &cli.logs) {
            Ok(telemetry) => telemetry,
            Err(message) => {
                eprintln!("secbeat-orchestrator: {message}");
                return ExitCode::from(secbeat::process::EXIT_USAGE);
            }
        };
        let code = match run(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                error!(%error, "orchestrator failed");
                ExitCode::FAILURE
            }
        };
        telemetry.shutdown();
        code
    })
}

fn load_config(cli: &Cli) -> Result<Config, String> {
    let text = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|error| format!("--config: cannot read {}: {error}", path.display()))?;
            Some((path.as_path(), text))
        }
        None => None,
    };
    let file = text.as_ref().map(|(path, text)| (*path, text.as_str()));
    Config::load(file, &cli.flags).map_err(|error| error.to_string())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let orchestrator = Orchestrator::bind(config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(secbeat::process::cancel_on_signal(shutdown.clone()));
    orchestrator.serve(shutdown).await?;
    Ok(())
}

fn run_backtest(args: &BacktestArgs) -> ExitCode {
    let fail = |message: String, code: u8| {
        eprintln!("secbeat-orchestrator backtest: {message}");
        ExitCode::from(code)
    };
    let text = match std::fs::read_to_string(&args.input) {
        Ok(text) => text,
        Err(error) => return fail(format!("--input {}: {error}", args.input.display()), EXIT_DATA),
    };
    let points = match backtest::parse_csv(&text) {
        Ok(points) => points,
        Err(error) => return fail(format!("{}: {error}", args.input.display()), EXIT_DATA),
    };
    let results: Vec<_> = backtest::compared(args.model)
        .into_iter()
        .map(|model| backtest::replay(&points, model))
        .collect();
    let name = args.input.file_name().map_or_else(
        || args.input.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    );
    let text = format!(
        "{}\ncalibration of {}'s confidence:\n{}",
        backtest::report(&name, &points, &results),
        args.model,
        backtest::calibration_table(&results[0].calibration)
    );
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    if let Some(output) = &args.output
        && let Err(error) = std::fs::write(output, backtest::predictions_csv(&results[0].predictions))
    {
        return fail(format!("--output {}: {error}", output.display()), 1);
    }
    ExitCode::SUCCESS
}

fn run_certs(command: &CertsCommand) -> ExitCode {
    use secbeat_orchestrator::edge::certs;
    let result = match command {
        CertsCommand::Init { dir, hosts } => certs::init(dir, hosts),
        CertsCommand::IssueAgent { dir, node_id } => {
            let node = node_id.unwrap_or_else(uuid::Uuid::new_v4);
            println!("node id: {node}");
            certs::issue_agent(dir, node)
        }
        CertsCommand::IssueOperator { dir, name, viewer } => certs::issue_operator(dir, name, *viewer),
    };
    match result {
        Ok(files) => {
            for file in files {
                println!("wrote {}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("secbeat-orchestrator certs: {error}");
            ExitCode::FAILURE
        }
    }
}
