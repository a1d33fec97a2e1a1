//! A running `secbeat-agent`.

use tokio::process::Command;
use uuid::Uuid;

use crate::process::{Process, binary};

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub process: Process,
    /// Its node id.
    pub node_id: Uuid,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts `secbeat-agent --orchestrator url --node-id id` plus `extra` flags.
    pub fn start(url: &str, node_id: Uuid, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(url, node_id, extra, &[])
    }

    /// Like [`Agent::start`], with extra environment variables.
    pub fn start_with_env(
        url: &str,
        node_id: Uuid,
        extra: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut command = Command::new(binary("secbeat-agent"));
        command
            .args([
                "--orchestrator",
                url,
                "--node-id",
                &node_id.to_string(),
                "--state-dir",
            ])
            .arg(dir.path())
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)));
        let name = format!("agent {}", &node_id.to_string()[..8]);
        Ok(Self {
            process: Process::spawn(&name, &mut command)?,
            node_id,
            _dir: dir,
        })
    }

    /// The node id as the API spells it.
    pub fn id(&self) -> String {
        self.node_id.to_string()
    }
}
