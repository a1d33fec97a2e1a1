//! The orchestrator binary's command line: configuration errors are one clear line
//! naming the key and exit code 64; `--help` documents every option.
//!
//! (Having integration tests also makes `cargo test --workspace` build this binary,
//! which the end-to-end tests in `integration/` start.)

use std::process::Command;

fn run_with_config(config: &str, extra: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_secbeat-orchestrator"))
        .arg("--config")
        .arg(&path)
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(dir.path().join("state"))
        .args(extra)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_exits_64_naming_the_key() {
    let cases: [(&str, &[&str], &str); 6] = [
        ("scale_up_cpu_threshold = 1.5", &[], "scale_up_cpu_threshold"),
        (
            "heartbeat_interval = 10\nheartbeat_timeout = 10",
            &[],
            "heartbeat_timeout",
        ),
        ("dead_node_check_intervall = 10", &[], "dead_node_check_intervall"),
        ("heartbeat_timeout = \"thirty\"", &[], "heartbeat_timeout"),
        (
            "",
            &["--required-consecutive-failures", "0"],
            "required_consecutive_failures",
        ),
        ("", &["--heartbeat-timeout", "soon"], "--heartbeat-timeout"),
    ];
    for (config, flags, key) in cases {
        let (code, stderr) = run_with_config(config, flags);
        assert_eq!(code, Some(64), "{config:?} {flags:?}: {stderr}");
        assert!(
            stderr.contains(key),
            "{config:?} {flags:?}: {stderr:?} does not name {key}"
        );
    }
}

#[test]
fn a_missing_config_file_exits_64() {
    let output = Command::new(env!("CARGO_BIN_EXE_secbeat-orchestrator"))
        .args(["--config", "/nonexistent/secbeat.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/secbeat.toml"));
}

#[test]
fn help_documents_every_option_and_its_environment_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_secbeat-orchestrator"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8_lossy(&output.stdout);
    for option in [
        "--config",
        "--grpc-listen",
        "--http-listen",
        "--state-dir",
        "--heartbeat-interval",
        "--heartbeat-timeout",
        "--dead-node-check-interval",
        "--required-consecutive-failures",
        "--termination-deadline",
        "SECBEAT_HEARTBEAT_TIMEOUT",
    ] {
        assert!(help.contains(option), "--help does not mention {option}");
    }
}

#[test]
fn backtest_pools_several_traces_and_refuses_one_output_for_many() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/nab");
    let inputs = ["ec2_cpu_utilization_24ae8d.csv", "rds_cpu_utilization_e47b3b.csv"];
    let backtest = |extra: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_secbeat-orchestrator"));
        command.arg("backtest");
        for input in inputs {
            command.arg("--input").arg(data.join(input));
        }
        command.args(extra).output().unwrap()
    };
    let output = backtest(&[]);
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "ec2_cpu_utilization_24ae8d.csv: 4032 points",
        "rds_cpu_utilization_e47b3b.csv: 4032 points",
        "pooled over 2 traces",
        "first day",
        "fast moves",
        "holt_winters",
        "calibration of auto's confidence, pooled",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
    }
    let never = std::env::temp_dir().join("secbeat-never-written.csv");
    let output = backtest(&["--output", never.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--output takes the predictions of one --input"),
        "{stderr}"
    );
    assert!(!never.exists());
}
