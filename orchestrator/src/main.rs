//! `secbeat-orchestrator`: parse flags, load config, run, exit with a code.

use std::{path::PathBuf, process::ExitCode};

use secbeat_orchestrator::{
    config::{Config, ConfigOverrides},
    server::Orchestrator,
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
#[derive(Debug, clap::Parser)]
#[command(name = "secbeat-orchestrator", version, verbatim_doc_comment)]
struct Cli {
    /// TOML configuration file (the seed's keys at top level)
    #[arg(long, env = "SECBEAT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: ConfigOverrides,
}

fn main() -> ExitCode {
    let cli = match secbeat::process::parse_args::<Cli>() {
        Ok(parsed) => parsed,
        Err(exit) => return exit,
    };
    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("secbeat-orchestrator: config error: {message}");
            return ExitCode::from(secbeat::process::EXIT_USAGE);
        }
    };
    secbeat::process::init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("secbeat-orchestrator: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!(%error, "orchestrator failed");
            ExitCode::FAILURE
        }
    }
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
    Config::load(file, &cli.overrides).map_err(|error| error.to_string())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let orchestrator = Orchestrator::bind(config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(secbeat::process::cancel_on_signal(shutdown.clone()));
    orchestrator.serve(shutdown).await?;
    Ok(())
}
