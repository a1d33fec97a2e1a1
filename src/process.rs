//! What every SecBeat binary's `main` does the same way: logging to stderr,
//! turning SIGTERM / SIGINT into a graceful-shutdown token, and listening.

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
    runtime_builder(workers).build()
}

/// The builder of [`runtime`], for a binary that sets more on it (the agent's
/// real-time threads).
pub fn runtime_builder(workers: usize) -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers.max(1)).enable_all();
    builder
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

/// Pending connections a listener queues before it accepts them. In a reconnect
/// storm thousands of agents connect within a second; beyond tokio's default of
/// 1,024 the kernel drops SYNs (`TcpExtListenOverflows`), and each dropped
/// connection waits out a SYN retry (1 s, then 3 s). The kernel caps this at
/// `net.core.somaxconn` (4,096 on current kernels).
pub const LISTEN_BACKLOG: u32 = 65_535;

/// A listening socket on `addr` with [`LISTEN_BACKLOG`], reusing the address as
/// std and tokio do (a restarted server rebinds while old connections sit in
/// TIME_WAIT). The orchestrator and the reference server both listen with it.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
