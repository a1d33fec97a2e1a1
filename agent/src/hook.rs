//! The `--on-terminate` hook: a shell command run on Terminate, bounded by the
//! grace period the orchestrator gave.
//!
//! The command runs in its own process group, and the whole group is killed when
//! the grace period ends or the agent stops early. Whatever the hook started (a drain
//! script's children, a stray `sleep`) therefore cannot outlive the agent. On success
//! the group is left alone.

use std::{process::Stdio, time::Duration};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::process::Command;
use tracing::{info, warn};

/// How a hook run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookOutcome {
    /// No hook is configured.
    NotConfigured,
    /// It exited 0 within the grace period.
    Finished,
    /// It exited non-zero, or could not start or be awaited.
    Failed,
    /// It outlived the grace period; its process group was killed.
    Killed,
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

/// Runs `command` with `/bin/sh -c`, reason in `$SECBEAT_TERMINATE_REASON`.
pub async fn run(command: Option<&str>, reason: &str, grace: Duration) -> HookOutcome {
    let Some(command) = command else {
        return HookOutcome::NotConfigured;
    };
    let spawned = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .env("SECBEAT_TERMINATE_REASON", reason)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => {
            warn!(%command, %error, "on-terminate command could not start");
            return HookOutcome::Failed;
        }
    };
    // The child leads its own group, so its pid is the group id.
    let mut group = GroupGuard(child.id().map(|pid| Pid::from_raw(pid as i32)));
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(status)) => {
            group.0 = None;
            if status.success() {
                info!(%command, "on-terminate command finished");
                HookOutcome::Finished
            } else {
                warn!(%command, %status, "on-terminate command failed");
                HookOutcome::Failed
            }
        }
        Ok(Err(error)) => {
            warn!(%command, %error, "on-terminate command could not be awaited");
            HookOutcome::Failed
        }
        Err(_) => {
            warn!(%command, grace_s = grace.as_secs_f64(), "on-terminate command outlived the grace period; killing its process group");
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
        let outcome = run(Some(&command), "scale-down", Duration::from_secs(10)).await;
        assert_eq!(outcome, HookOutcome::Finished);
        assert_eq!(std::fs::read_to_string(out).unwrap().trim(), "scale-down");
        assert_eq!(
            run(Some("exit 3"), "x", Duration::from_secs(10)).await,
            HookOutcome::Failed
        );
        assert_eq!(
            run(None, "x", Duration::from_secs(10)).await,
            HookOutcome::NotConfigured
        );
    }

    #[tokio::test]
    async fn a_slow_hook_is_killed_with_everything_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild");
        let command = format!("sleep 600 & echo $! > {}; wait", pid_file.display());
        let started = std::time::Instant::now();
        let outcome = run(Some(&command), "x", Duration::from_millis(300)).await;
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
            async move { run(Some(&command), "x", Duration::from_secs(600)).await }
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
