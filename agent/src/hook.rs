//! The agent's hooks: shell commands an operator gives the agent to run when
//! the orchestrator says so: `--on-terminate` (on Terminate, bounded by the grace
//! period), `--on-drain` (on Drain: withdraw the node's route) and `--on-resume`
//! (on Resume: announce it again), each bounded by the deadline the command came
//! with.
//!
//! The command runs in its own process group, and the whole group is killed when
//! its time is up or the agent stops early. Whatever the hook started (a drain
//! script's children, a stray `sleep`) therefore cannot outlive the agent. On success
//! the group is left alone.

use std::{process::Stdio, time::Duration};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::process::Command;
use tracing::{info, warn};

/// Which hook: its flag's name (for logs and reports) and the variable that
/// carries the orchestrator's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    /// `--on-terminate`, `$SECBEAT_TERMINATE_REASON`.
    Terminate,
    /// `--on-drain`, `$SECBEAT_DRAIN_REASON`.
    Drain,
    /// `--on-resume`, `$SECBEAT_RESUME_REASON`.
    Resume,
}

impl HookKind {
    /// The flag's name without dashes.
    pub fn name(self) -> &'static str {
        match self {
            HookKind::Terminate => "on-terminate",
            HookKind::Drain => "on-drain",
            HookKind::Resume => "on-resume",
        }
    }

    fn reason_variable(self) -> &'static str {
        match self {
            HookKind::Terminate => "SECBEAT_TERMINATE_REASON",
            HookKind::Drain => "SECBEAT_DRAIN_REASON",
            HookKind::Resume => "SECBEAT_RESUME_REASON",
        }
    }
}

/// How a hook run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookOutcome {
    /// No hook is configured.
    NotConfigured,
    /// It exited 0 in time.
    Finished,
    /// It exited non-zero, or could not start or be awaited (what happened).
    Failed(String),
    /// It outlived its time; its process group was killed.
    Killed,
}

impl HookOutcome {
    /// Whether the orchestrator may count the step as done: the hook exited 0,
    /// or there is none (nothing to withdraw or announce).
    pub fn success(&self) -> bool {
        matches!(self, HookOutcome::NotConfigured | HookOutcome::Finished)
    }

    /// The outcome in words, for the orchestrator's events.
    pub fn describe(&self, kind: HookKind, limit: Duration) -> String {
        let name = kind.name();
        match self {
            HookOutcome::NotConfigured => format!("no --{name} hook configured"),
            HookOutcome::Finished => format!("{name} hook finished"),
            HookOutcome::Failed(what) => format!("{name} hook failed: {what}"),
            HookOutcome::Killed => format!(
                "{name} hook outlived its {:.0}s and was killed",
                limit.as_secs_f64()
            ),
        }
    }
}

/// Kills a process group when dropped, unless disarmed.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(group) = self.0.take() {
            // ESRCH (already gone) is fine.
            let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `command` with `/bin/sh -c`, the reason in the hook's variable, for at
/// most `limit`.
pub async fn run(kind: HookKind, command: Option<&str>, reason: &str, limit: Duration) -> HookOutcome {
    let Some(command) = command else {
        return HookOutcome::NotConfigured;
    };
    let hook = kind.name();
    let spawned = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .env(kind.reason_variable(), reason)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => {
            warn!(%command, %error, "{hook} command could not start");
            return HookOutcome::Failed(format!("could not start: {error}"));
        }
    };
    // The child leads its own group, so its pid is the group id.
    let mut group = GroupGuard(child.id().map(|pid| Pid::from_raw(pid as i32)));
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) => {
            group.0 = None;
            if status.success() {
                info!(%command, "{hook} command finished");
                HookOutcome::Finished
            } else {
                warn!(%command, %status, "{hook} command failed");
                HookOutcome::Failed(status.to_string())
            }
        }
        Ok(Err(error)) => {
            warn!(%command, %error, "{hook} command could not be awaited");
            HookOutcome::Failed(format!("could not be awaited: {error}"))
        }
        Err(_) => {
            let limit_name = if kind == HookKind::Terminate {
                "the grace period"
            } else {
                "its deadline"
            };
            warn!(%command, limit_s = limit.as_secs_f64(), "{hook} command outlived {limit_name}; killing its process group");
            group.kill();
            // Also kill and reap the shell itself, so the agent never waits on it
            // even if the group could not be signalled.
            let _ = child.kill().await;
            HookOutcome::Killed
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Whether `pid` still runs (a zombie waiting for a reaper counts as gone).
    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    async fn gone_soon(pid: i32) -> bool {
        let mut ticks = tokio::time::interval(Duration::from_millis(10));
        for _ in 0..200 {
            ticks.tick().await;
            if !alive(pid) {
                return true;
            }
        }
        false
    }

    fn read_pid(path: &Path) -> i32 {
        std::fs::read_to_string(path).unwrap().trim().parse().unwrap()
    }

    #[tokio::test]
    async fn a_quick_hook_finishes_and_sees_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("reason");
        let command = format!("echo \"$SECBEAT_TERMINATE_REASON\" > {}", out.display());
        let outcome = run(
            HookKind::Terminate,
            Some(&command),
            "scale-down",
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(outcome, HookOutcome::Finished);
        assert_eq!(std::fs::read_to_string(out).unwrap().trim(), "scale-down");
        let failed = run(HookKind::Drain, Some("exit 3"), "x", Duration::from_secs(10)).await;
        assert_eq!(failed, HookOutcome::Failed("exit status: 3".into()));
        assert!(!failed.success());
        assert_eq!(
            failed.describe(HookKind::Drain, Duration::from_secs(10)),
            "on-drain hook failed: exit status: 3"
        );
        let none = run(HookKind::Resume, None, "x", Duration::from_secs(10)).await;
        assert_eq!(none, HookOutcome::NotConfigured);
        assert!(none.success(), "no hook: nothing to announce");
    }

    #[tokio::test]
    async fn each_hook_gets_its_reason_in_its_own_variable() {
        let dir = tempfile::tempdir().unwrap();
        for (kind, variable) in [
            (HookKind::Drain, "SECBEAT_DRAIN_REASON"),
            (HookKind::Resume, "SECBEAT_RESUME_REASON"),
        ] {
            let out = dir.path().join(variable);
            let command = format!("echo \"${variable}\" > {}", out.display());
            let outcome = run(kind, Some(&command), "kernel patch", Duration::from_secs(10)).await;
            assert_eq!(outcome, HookOutcome::Finished);
            assert_eq!(std::fs::read_to_string(out).unwrap().trim(), "kernel patch");
        }
    }

    #[tokio::test]
    async fn a_slow_hook_is_killed_with_everything_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild");
        let command = format!("sleep 600 & echo $! > {}; wait", pid_file.display());
        let started = std::time::Instant::now();
        let outcome = run(HookKind::Drain, Some(&command), "x", Duration::from_millis(300)).await;
        assert_eq!(outcome, HookOutcome::Killed);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "bounded by the grace period"
        );
        assert!(
            gone_soon(read_pid(&pid_file)).await,
            "the hook's own child outlived it"
        );
    }

    #[tokio::test]
    async fn an_abandoned_hook_is_killed_with_everything_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild");
        let command = format!("sleep 600 & echo $! > {}; wait", pid_file.display());
        let hook = tokio::spawn({
            let command = command.clone();
            async move { run(HookKind::Terminate, Some(&command), "x", Duration::from_secs(600)).await }
        });
        let mut ticks = tokio::time::interval(Duration::from_millis(10));
        while !pid_file.exists() || std::fs::read_to_string(&pid_file).unwrap().trim().is_empty() {
            ticks.tick().await;
        }
        hook.abort(); // the agent stopped early (SIGTERM during the grace period)
        let _ = hook.await;
        assert!(
            gone_soon(read_pid(&pid_file)).await,
            "the hook's own child outlived the agent"
        );
    }
}
