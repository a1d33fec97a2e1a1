//! `secbeat-agent`: parse flags, prepare, run until terminated, exit with a code.

use std::process::ExitCode;

use secbeat_agent::{Agent, AgentArgs, Exit};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = match secbeat::process::parse_args::<AgentArgs>() {
        Ok(parsed) => parsed,
        Err(exit) => return exit,
    };
    // Before the runtime exists, so that its threads inherit both. Logged once
    // the log is set up.
    let realtime = args
        .realtime_priority
        .map(|priority| (priority, secbeat_agent::priority::realtime(priority)));
    let locked = args.lock_memory.then(secbeat_agent::priority::lock_memory);
    let permitted = realtime
        .as_ref()
        .and_then(|(priority, result)| result.is_ok().then_some(*priority));
    let runtime = match secbeat_agent::priority::runtime(permitted) {
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
        match realtime {
            Some((priority, Ok(()))) => tracing::info!(priority, "running under SCHED_RR: a saturated node cannot starve the heartbeat"),
            Some((priority, Err(error))) => tracing::warn!(priority, %error, "--realtime-priority refused (needs CAP_SYS_NICE or systemd CPUSchedulingPolicy=rr); running at normal priority"),
            None => {}
        }
        match locked {
            Some(Ok(())) => tracing::info!("memory locked (mlockall)"),
            Some(Err(error)) => tracing::warn!(%error, "--lock-memory refused (needs CAP_IPC_LOCK or LimitMEMLOCK=infinity); memory stays pageable"),
            None => {}
        }
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
