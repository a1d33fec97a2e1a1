//! The tools' command lines: `--help` explains, and bad flags exit 64.
//!
//! (Having integration tests also makes `cargo nextest run --workspace` build these
//! binaries, which the end-to-end tests in `integration/` start.)

use std::process::Command;

#[test]
fn the_receiver_and_the_simulator_explain_themselves() {
    for (binary, needle) in [
        (env!("CARGO_BIN_EXE_secbeat-webhook-receiver"), "--fail-first"),
        (env!("CARGO_BIN_EXE_secbeat-fleetsim"), "--reconnect-max"),
        (
            env!("CARGO_BIN_EXE_secbeat-reference"),
            "--connection-idle-timeout",
        ),
    ] {
        let output = Command::new(binary).arg("--help").output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{binary}");
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(help.contains(needle), "{binary} --help does not mention {needle}");
    }
}

#[test]
fn bad_flags_exit_64_naming_them() {
    let cases: [(&str, &[&str], &str); 5] = [
        (
            env!("CARGO_BIN_EXE_secbeat-fleetsim"),
            &["--reconnect-initial", "5", "--reconnect-max", "1"],
            "--reconnect",
        ),
        (
            env!("CARGO_BIN_EXE_secbeat-fleetsim"),
            &["--reconnect-initial=-1"],
            "--reconnect",
        ),
        (
            env!("CARGO_BIN_EXE_secbeat-webhook-receiver"),
            &["--listen", "nowhere"],
            "--listen",
        ),
        (
            env!("CARGO_BIN_EXE_secbeat-reference"),
            &["--listen", "nowhere"],
            "--listen",
        ),
        (
            env!("CARGO_BIN_EXE_secbeat-reference"),
            &["--heartbeat-interval", "0"],
            "--heartbeat-interval",
        ),
    ];
    for (binary, flags, named) in cases {
        let output = Command::new(binary).args(flags).output().unwrap();
        assert_eq!(output.status.code(), Some(64), "{binary} {flags:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(named), "{binary} {flags:?}: {stderr}");
    }
}
