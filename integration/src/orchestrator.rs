//! A running `secbeat-orchestrator`: start, restart, clients, metrics.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use secbeat::pb::{self, agent_service_client::AgentServiceClient, fleet_service_client::FleetServiceClient};
use tokio::process::Command;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::{
    Agent, STARTUP, eventually,
    grpc::wait_for_state,
    http_get,
    process::{Process, binary, listening_addr},
};

/// A running orchestrator.
#[derive(Debug)]
pub struct Orchestrator {
    /// The process.
    pub process: Process,
    /// Its bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// Its bound HTTP address.
    pub http_addr: SocketAddr,
    dir: Arc<tempfile::TempDir>,
}

impl Orchestrator {
    /// Starts an orchestrator with `config` (TOML) on free loopback ports.
    pub async fn start(config: &str) -> anyhow::Result<Self> {
        Self::start_with_env(config, &[]).await
    }

    /// Like [`Orchestrator::start`], with extra environment variables.
    pub async fn start_with_env(config: &str, env: &[(String, String)]) -> anyhow::Result<Self> {
        let dir = Arc::new(tempfile::tempdir()?);
        Self::start_in(dir, config, "127.0.0.1:0".parse()?, env, None).await
    }

    /// Like [`Orchestrator::start`], in a process whose open-files limit (soft and
    /// hard) is `limit`.
    pub async fn start_with_fd_limit(config: &str, limit: u64) -> anyhow::Result<Self> {
        let dir = Arc::new(tempfile::tempdir()?);
        Self::start_in(dir, config, "127.0.0.1:0".parse()?, &[], Some(limit)).await
    }

    /// Like [`Orchestrator::start`], with its state directory at `state` (a mount
    /// the test controls, say).
    pub async fn start_on(config: &str, state: &std::path::Path) -> anyhow::Result<Self> {
        let dir = Arc::new(tempfile::tempdir()?);
        std::os::unix::fs::symlink(state, dir.path().join("state"))?;
        Self::start_in(dir, config, "127.0.0.1:0".parse()?, &[], None).await
    }

    /// Starts another orchestrator with the same state dir, config and gRPC
    /// address as this (stopped) one: a restart.
    pub async fn restart(&self) -> anyhow::Result<Self> {
        self.restart_with_env(&[]).await
    }

    /// Like [`Orchestrator::restart`], with extra environment variables.
    pub async fn restart_with_env(&self, env: &[(String, String)]) -> anyhow::Result<Self> {
        let config = std::fs::read_to_string(self.dir.path().join("orchestrator.toml"))?;
        Self::start_in(Arc::clone(&self.dir), &config, self.grpc_addr, env, None).await
    }

    async fn start_in(
        dir: Arc<tempfile::TempDir>,
        config: &str,
        grpc: SocketAddr,
        env: &[(String, String)],
        fd_limit: Option<u64>,
    ) -> anyhow::Result<Self> {
        let config_path = dir.path().join("orchestrator.toml");
        std::fs::write(&config_path, config)?;
        let mut command = Command::new(binary("secbeat-orchestrator"));
        command
            .arg("--config")
            .arg(&config_path)
            .arg("--grpc-listen")
            .arg(grpc.to_string())
            .args(["--http-listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.path().join("state"))
            .envs(env.iter().map(|(k, v)| (k, v)));
        if let Some(limit) = fd_limit {
            // SAFETY: between fork and exec only async-signal-safe work: one setrlimit.
            unsafe {
                command.pre_exec(move || {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, limit, limit)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let process = Process::spawn("orchestrator", &mut command)?;
        let startup = Duration::from_secs(10);
        let grpc_addr = listening_addr(&process.logs.wait_for("grpc api listening", startup).await?)?;
        let http_addr = listening_addr(&process.logs.wait_for("http api listening", startup).await?)?;
        process.logs.wait_for("orchestrator ready", startup).await?;
        Ok(Self {
            process,
            grpc_addr,
            http_addr,
            dir,
        })
    }

    /// The state directory (kept across [`Orchestrator::restart`]).
    pub fn state_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    /// Runs the orchestrator binary again on this (stopped) one's config and state
    /// directory, for a start that is expected to fail: waits for it to exit and
    /// returns its status and stderr.
    pub async fn run_to_exit(&self, timeout: Duration) -> anyhow::Result<Exited> {
        let mut command = Command::new(binary("secbeat-orchestrator"));
        command
            .arg("--config")
            .arg(self.dir.path().join("orchestrator.toml"))
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--state-dir",
            ])
            .arg(self.state_dir())
            .kill_on_drop(true);
        let output = tokio::time::timeout(timeout, command.output())
            .await
            .map_err(|_| anyhow::anyhow!("the orchestrator was still running after {timeout:?}"))??;
        Ok(Exited {
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// The URL agents connect to.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// A connected FleetService client.
    pub async fn fleet(&self) -> anyhow::Result<FleetServiceClient<Channel>> {
        Ok(FleetServiceClient::new(self.channel().await?))
    }

    /// A `WatchEvents` subscription: every event from now on.
    pub async fn watch_events(&self) -> anyhow::Result<tonic::Streaming<pb::FleetEvent>> {
        Ok(self
            .fleet()
            .await?
            .watch_events(pb::WatchEventsRequest::default())
            .await?
            .into_inner())
    }

    /// Waits until every one of `agents` is CONNECTED.
    pub async fn wait_all_connected<'a>(
        &self,
        agents: impl IntoIterator<Item = &'a Agent>,
        timeout: Duration,
    ) {
        let mut fleet = self.fleet().await.expect("fleet client");
        for agent in agents {
            wait_for_state(&mut fleet, &agent.id(), pb::NodeState::Connected, timeout).await;
        }
    }

    /// A connected AgentService client (for raw protocol tests).
    pub async fn agent_client(&self) -> anyhow::Result<AgentServiceClient<Channel>> {
        Ok(AgentServiceClient::new(self.channel().await?))
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.url())?.connect().await?)
    }

    /// Starts an agent with a fresh node id against this orchestrator.
    pub fn agent(&self, extra: &[&str]) -> anyhow::Result<Agent> {
        Agent::start(&self.url(), Uuid::new_v4(), extra)
    }

    /// Starts an agent and waits until the orchestrator lists it CONNECTED.
    pub async fn connected_agent(&self, extra: &[&str]) -> anyhow::Result<(Agent, pb::Node)> {
        let agent = self.agent(extra)?;
        let mut fleet = self.fleet().await?;
        let node = wait_for_state(&mut fleet, &agent.id(), pb::NodeState::Connected, STARTUP).await;
        Ok((agent, node))
    }
}

impl Orchestrator {
    /// The `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        http_get(self.http_addr, "/metrics").await
    }

    /// One sample's value from `/metrics` (`name` with labels, e.g.
    /// `orchestrator_webhooks_sent_total{reason="MASS_NODE_FAILURE"}`); 0 when absent.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await.expect("GET /metrics");
        metric_value(&text, name).unwrap_or(0.0)
    }

    /// Asserts that a `/metrics` sample has exactly `expected` as its value.
    pub async fn assert_metric(&self, name: &str, expected: f64) {
        let actual = self.metric(name).await;
        assert_eq!(actual, expected, "{name}");
    }

    /// Waits until the webhook outbox is empty (everything queued was delivered).
    pub async fn wait_outbox_drained(&self, timeout: Duration) {
        eventually(timeout, "the webhook outbox to drain", || async {
            (self.metric("orchestrator_webhook_outbox_depth").await == 0.0).then_some(())
        })
        .await
    }
}

/// A sample's value in Prometheus text, if present.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// How a process that was expected to stop ended.
#[derive(Debug)]
pub struct Exited {
    /// Its exit status.
    pub status: std::process::ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
}
