//! Child processes: the workspace binaries, started with captured stderr, signalled
//! and reaped; their log lines, waited on as they arrive.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
    sync::watch,
};

use crate::process_cpu_time;

/// Runs `secbeat-fleetsim` with `args` to its end and returns its JSON report;
/// panics with its stderr if it fails.
pub async fn fleetsim(args: &[&str]) -> serde_json::Value {
    let output = Command::new(binary("secbeat-fleetsim"))
        .args(args)
        .arg("--json")
        .output()
        .await
        .expect("run secbeat-fleetsim");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("fleetsim prints one JSON object")
}

/// Path of a workspace binary next to the running test executable
/// (`target/<profile>/deps/<test>` -> `target/<profile>/<name>`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo nextest run --workspace does)",
        path.display()
    );
    path
}

/// Lines a child process wrote to stderr, as they arrive.
#[derive(Debug, Clone)]
pub struct Logs {
    lines: Arc<Mutex<Vec<String>>>,
    changed: watch::Receiver<usize>,
    name: String,
}

impl Logs {
    fn capture(name: &str, stream: impl AsyncRead + Unpin + Send + 'static) -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (notify, changed) = watch::channel(0);
        let sink = Arc::clone(&lines);
        let prefix = name.to_owned();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                // Echoed so a failing test's output shows what each process said.
                eprintln!("[{prefix}] {line}");
                let count = {
                    let mut lines = sink.lock().expect("log lock");
                    lines.push(line);
                    lines.len()
                };
                let _ = notify.send(count);
            }
        });
        Self {
            lines,
            changed,
            name: name.to_owned(),
        }
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("log lock").clone()
    }

    /// How many lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .expect("log lock")
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Waits until a line contains `needle` and returns it.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let what = format!("a line containing {needle:?}");
        self.wait_until(&what, timeout, |lines| {
            lines.iter().find(|line| line.contains(needle)).cloned()
        })
        .await
    }

    /// Waits (woken by each new line, never polling on a timer) until `check` finds
    /// what it looks for in the lines so far, and returns it.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[String]) -> Option<T>,
    ) -> anyhow::Result<T> {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(found) = check(&self.lines()) {
                return Ok(found);
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => bail!("{}: output ended without {what}", self.name),
                Err(_) => bail!("{}: no {what} within {timeout:?}", self.name),
            }
        }
    }

    /// Waits until `count` lines contain `needle`; returns the `count`-th.
    pub async fn wait_for_nth(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let what = format!("{count} lines containing {needle:?}");
        self.wait_until(&what, timeout, |lines| {
            lines
                .iter()
                .filter(|line| line.contains(needle))
                .nth(count.saturating_sub(1))
                .cloned()
        })
        .await
    }
}

/// A running child process with captured stderr.
#[derive(Debug)]
pub struct Process {
    child: Child,
    /// Its stderr lines.
    pub logs: Logs,
}

impl Process {
    pub(crate) fn spawn(name: &str, command: &mut Command) -> anyhow::Result<Self> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command.env("RUST_LOG", "info").env_remove("NO_COLOR");
        let mut child = command.spawn().with_context(|| format!("spawn {name}"))?;
        let stderr = child.stderr.take().context("stderr")?;
        Ok(Self {
            child,
            logs: Logs::capture(name, stderr),
        })
    }

    /// CPU time the process has used so far (user + system), from /proc.
    pub fn cpu_time(&self) -> Duration {
        process_cpu_time(self.pid().as_raw() as u32)
    }

    /// The OS process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("process still owned") as i32)
    }

    /// Sends a signal.
    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(self.pid(), signal).expect("send signal");
    }

    /// SIGKILLs the process and waits until it is gone (a crash, as the kernel
    /// leaves it: sockets reset, no goodbye).
    pub async fn kill(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(Signal::SIGKILL);
        self.wait_exit(timeout).await
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("{} still running after {timeout:?}", self.logs.name))?
            .context("wait")
    }

    /// Whether the process has exited, without waiting.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// The `addr=` field of a "... listening" log line (plain or JSON).
pub(crate) fn listening_addr(line: &str) -> anyhow::Result<SocketAddr> {
    // `--log-format json` lines carry the field as JSON.
    if line.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(line)?;
        let addr = value["addr"]
            .as_str()
            .with_context(|| format!("no addr in {line:?}"))?;
        return Ok(addr.parse()?);
    }
    let addr = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .with_context(|| format!("no addr= in {line:?}"))?;
    Ok(addr.parse()?)
}
