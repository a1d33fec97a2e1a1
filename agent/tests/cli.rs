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
