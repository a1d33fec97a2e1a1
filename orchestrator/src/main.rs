//! `secbeat-orchestrator`: parse flags, load config, run, exit with a code.

use std::process::ExitCode;

use secbeat::telemetry;
use secbeat_orchestrator::{
    cli::{BacktestArgs, CertsCommand, Cli, Command},
    config::{self, Config},
    domain::forecast::backtest,
    runtime::server::Orchestrator,
};
use tokio_util::sync::CancellationToken;
use tracing::error;

/// jemalloc, as quickwit and restate run: a fleet's worth of sessions and
/// handshakes is many small allocations on few threads.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    if args.output.is_some() && args.input.len() > 1 {
        return fail(
            "--output takes the predictions of one --input".into(),
            secbeat::process::EXIT_USAGE,
        );
    }
    let models = backtest::compared(args.model);
    let mut pooled = vec![backtest::Segments::default(); models.len()];
    let mut calibration = Vec::new();
    let mut out = String::new();
    for input in &args.input {
        let text = match std::fs::read_to_string(input) {
            Ok(text) => text,
            Err(error) => return fail(format!("--input {}: {error}", input.display()), EXIT_DATA),
        };
        let points = match backtest::parse_csv(&text) {
            Ok(points) => points,
            Err(error) => return fail(format!("{}: {error}", input.display()), EXIT_DATA),
        };
        let results: Vec<_> = models
            .iter()
            .map(|model| backtest::replay(&points, *model))
            .collect();
        let name = input.file_name().map_or_else(
            || input.display().to_string(),
            |name| name.to_string_lossy().into_owned(),
        );
        let segments: Vec<_> = results.iter().map(|r| (r.model, r.segments)).collect();
        out.push_str(&format!(
            "{}\nby segment (share within +-10 points / MAE in points):\n{}\ncalibration of {}'s confidence:\n{}\n",
            backtest::report(&name, &points, &results),
            backtest::segments_table(&segments),
            args.model,
            backtest::calibration_table(&results[0].calibration)
        ));
        for (total, result) in pooled.iter_mut().zip(&results) {
            total.merge(&result.segments);
        }
        calibration.extend_from_slice(&results[0].calibration);
        if let Some(output) = &args.output
            && let Err(error) = std::fs::write(output, backtest::predictions_csv(&results[0].predictions))
        {
            return fail(format!("--output {}: {error}", output.display()), 1);
        }
    }
    if args.input.len() > 1 {
        let segments: Vec<_> = models.iter().copied().zip(pooled).collect();
        out.push_str(&format!(
            "pooled over {} traces (share within +-10 points / MAE in points):\n{}\ncalibration of {}'s confidence, pooled:\n{}",
            args.input.len(),
            backtest::segments_table(&segments),
            args.model,
            backtest::calibration_table(&calibration)
        ));
    }
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
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
