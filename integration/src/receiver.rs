//! A running `secbeat-webhook-receiver` and the events it logged.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tokio::process::Command;

use crate::{
    STARTUP, TEST_WEBHOOK_SECRET, eventually,
    process::{Process, binary, listening_addr},
};

/// A running `secbeat-webhook-receiver`.
#[derive(Debug)]
pub struct WebhookReceiver {
    /// The process.
    pub process: Process,
    /// Where it listens.
    pub addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl WebhookReceiver {
    /// Starts a receiver on `addr` checking [`TEST_WEBHOOK_SECRET`], plus `extra` flags.
    pub async fn start(addr: SocketAddr, extra: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("logs/webhook.log");
        let mut command = Command::new(binary("secbeat-webhook-receiver"));
        command
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--log")
            .arg(&log)
            .args(["--secret", TEST_WEBHOOK_SECRET])
            .args(extra);
        let process = Process::spawn("receiver", &mut command)?;
        let line = process
            .logs
            .wait_for("webhook receiver listening", STARTUP)
            .await?;
        Ok(Self {
            addr: listening_addr(&line)?,
            process,
            log,
            _dir: dir,
        })
    }

    /// The URL to configure as `provisioning_webhook_url`.
    pub fn url(&self) -> String {
        format!("http://{}/provision", self.addr)
    }

    /// Every recorded webhook (one JSON object per line of its log). A line still
    /// being written (no newline yet) is not a record yet.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|line| serde_json::from_str(line).expect("the receiver writes JSON lines"))
            .collect()
    }

    /// The recorded webhooks with this `reason`.
    pub fn events_with_reason(&self, reason: &str) -> Vec<serde_json::Value> {
        let mut events = self.events();
        events.retain(|event| event["payload"]["reason"] == reason);
        events
    }

    /// Waits until at least `count` webhooks with `reason` are recorded.
    pub async fn wait_for_events(
        &self,
        reason: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<serde_json::Value> {
        let what = format!("{count} {reason} webhook(s)");
        eventually(timeout, &what, || async {
            let events = self.events_with_reason(reason);
            (events.len() >= count).then_some(events)
        })
        .await
    }
}
