//! What every SecBeat binary's `main` does the same way: logging to stderr and
//! turning SIGTERM / SIGINT into a graceful-shutdown token.

use std::{io::IsTerminal, process::ExitCode};

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// This machine's host name (the kernel's), if it has one.
pub fn kernel_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
}

/// `EX_USAGE` from sysexits.h: bad flags or configuration.
pub const EXIT_USAGE: u8 = 64;

/// Parses the command line; `--help` and `--version` exit 0, any usage error
/// exits 64 after clap has explained it.
pub fn parse_args<T: clap::Parser>() -> Result<T, ExitCode> {
    T::try_parse().map_err(|error| {
        let _ = error.print();
        if error.use_stderr() {
            ExitCode::from(EXIT_USAGE)
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// Installs the global `tracing` subscriber: stderr, filtered by `RUST_LOG`
/// (default `info`), colours only on a terminal so log files and harnesses read
/// plain text. (The binaries use [`crate::telemetry::init`], which adds JSON, a
/// log file and traces.)
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// A runtime for a binary: multi-threaded with `workers` threads. Trace export
/// needs a multi-threaded runtime, so even a small agent gets one.
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT (run it as a task).
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested");
    shutdown.cancel();
}
