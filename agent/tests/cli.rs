//! The agent binary's command line: bad flags exit 64 naming the flag; `--help`
//! documents every option.
//!
//! (Having integration tests also makes `cargo test --workspace` build this binary,
//! which the end-to-end tests in `integration/` start.)

use std::process::Command;

const AGENT: &str = env!("CARGO_BIN_EXE_secbeat-agent");

#[test]
fn help_documents_the_options() {
    let output = Command::new(AGENT).arg("--help").output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8_lossy(&output.stdout);
    for option in [
        "--orchestrator",
        "--node-id",
        "--state-dir",
        "--on-terminate",
        "--cpu-source",
        "SECBEAT_ORCHESTRATOR",
    ] {
        assert!(help.contains(option), "agent --help does not mention {option}");
    }
}

#[test]
fn a_bad_cpu_source_exits_64_naming_the_flag() {
    let output = Command::new(AGENT)
        .args([
            "--node-id",
            &uuid::Uuid::new_v4().to_string(),
            "--cpu-source",
            "const:85",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--cpu-source"));
}

#[test]
fn a_corrupt_identity_file_exits_64_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("node_id"), "not-a-uuid").unwrap();
    let output = Command::new(AGENT)
        .arg("--state-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("node_id"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("node_id")).unwrap(),
        "not-a-uuid"
    );
}

#[test]
fn an_unknown_flag_exits_64() {
    let output = Command::new(AGENT).arg("--no-such-flag").output().unwrap();
    assert_eq!(output.status.code(), Some(64));
}

#[test]
fn a_malformed_orchestrator_url_exits_64_naming_the_flag() {
    let output = Command::new(AGENT)
        .args([
            "--node-id",
            &uuid::Uuid::new_v4().to_string(),
            "--orchestrator",
            "not a url",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--orchestrator"));
}

/// `--realtime-priority` and `--lock-memory` in the real process: as root they are
/// taken (the running agent is SCHED_RR and its memory locked); as an unprivileged
/// user (setpriv, where the test may switch user) they are refused with a warning
/// naming what is missing, and the agent runs on.
#[test]
fn realtime_priority_and_locked_memory_are_taken_or_refused_with_a_warning() {
    use std::io::{BufRead, BufReader};
    // SAFETY: geteuid has no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;
    let mut runs = vec![(is_root, Vec::<String>::new())];
    if is_root && std::path::Path::new("/usr/bin/setpriv").exists() {
        let unprivileged = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ];
        runs.push((false, unprivileged.map(String::from).to_vec()));
    }
    for (privileged, prefix) in runs {
        let state = tempfile::tempdir().unwrap();
        std::fs::set_permissions(state.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let mut command = match prefix.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(AGENT);
                command
            }
            None => Command::new(AGENT),
        };
        let mut child = command
            .args([
                "--realtime-priority",
                "10",
                "--lock-memory",
                "--orchestrator",
                "http://127.0.0.1:9",
            ])
            .arg("--state-dir")
            .arg(state.path())
            .env("SECBEAT_LOG_FORMAT", "text")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // The agent retries its unreachable orchestrator forever, so its stderr
        // never ends: lines come through a channel with a deadline, and a missing
        // line fails the test instead of hanging it.
        let stderr = child.stderr.take().unwrap();
        let (lines, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut seen = (false, false);
        while let Ok(line) =
            received.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        {
            if privileged {
                seen.0 |= line.contains("running under SCHED_RR");
                seen.1 |= line.contains("memory locked");
            } else {
                seen.0 |= line.contains("--realtime-priority refused");
                seen.1 |= line.contains("--lock-memory refused");
            }
            if seen == (true, true) {
                break;
            }
        }
        assert_eq!(seen, (true, true), "privileged: {privileged}");
        if privileged {
            let policy = Command::new("chrt")
                .arg("-p")
                .arg(pid.to_string())
                .output()
                .unwrap();
            assert!(String::from_utf8_lossy(&policy.stdout).contains("SCHED_RR"));
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let locked = status.lines().find(|l| l.starts_with("VmLck:")).unwrap();
            assert!(!locked.ends_with(" 0 kB"), "{locked}");
        }
        // The agent runs on either way (it is retrying its unreachable orchestrator).
        assert_eq!(child.try_wait().unwrap(), None, "privileged: {privileged}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
