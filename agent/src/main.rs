//! `secbeat-agent`: parse flags, prepare, run until terminated, exit with a code.

use std::process::ExitCode;

use secbeat_agent::{Agent, AgentArgs, Exit};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = match secbeat::process::parse_args::<AgentArgs>() {
        Ok(parsed) => parsed,
        Err(exit) => return exit,
    };
    secbeat::process::init_logging();
    let agent = match Agent::prepare(args) {
        Ok(agent) => agent,
        Err(error) => {
            eprintln!("secbeat-agent: {error}");
            return ExitCode::from(secbeat::process::EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("secbeat-agent: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let exit = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(secbeat::process::cancel_on_signal(shutdown.clone()));
        agent.run(shutdown).await
    });
    match exit {
        Exit::Clean => ExitCode::SUCCESS,
        Exit::Refused => ExitCode::FAILURE,
    }
}
