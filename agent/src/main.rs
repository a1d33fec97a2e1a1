//! `secbeat-agent`: parse flags, prepare, run until terminated, exit with a code.

use std::process::ExitCode;

use secbeat_agent::{Agent, AgentArgs, Exit};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = match secbeat::process::parse_args::<AgentArgs>() {
        Ok(parsed) => parsed,
        Err(exit) => return exit,
    };
    // One worker: the agent is small. (Trace export needs a multi-threaded runtime.)
    let runtime = match secbeat::process::runtime(1) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("secbeat-agent: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let telemetry = match secbeat::telemetry::init("secbeat-agent", &args.logs) {
            Ok(telemetry) => telemetry,
            Err(message) => {
                eprintln!("secbeat-agent: {message}");
                return ExitCode::from(secbeat::process::EXIT_USAGE);
            }
        };
        let agent = match Agent::prepare(args) {
            Ok(agent) => agent,
            Err(error) => {
                eprintln!("secbeat-agent: {error}");
                return ExitCode::from(secbeat::process::EXIT_USAGE);
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(secbeat::process::cancel_on_signal(shutdown.clone()));
        let exit = agent.run(shutdown).await;
        telemetry.shutdown();
        match exit {
            Exit::Clean => ExitCode::SUCCESS,
            Exit::Refused => ExitCode::FAILURE,
        }
    })
}
