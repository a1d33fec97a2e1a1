//! The README's operator guide is true: every line of its command block runs here
//! against a live orchestrator and agent, grpcurl lines with the real grpcurl
//! (through `sh`, exactly as written), curl lines as real HTTP requests.

use std::time::Duration;

use secbeat_integration::{FAST_CONFIG, Orchestrator, grpcurl, http_request};

const README: &str = include_str!("../../../README.md");

/// The first `sh` block of the taking-out-of-service section, then of the
/// operator guide (whose last line terminates the node).
fn operator_guide_commands() -> Vec<String> {
    let mut commands = section_commands("## Taking nodes out of service");
    commands.extend(section_commands("## Operator guide"));
    commands
}

/// The first `sh` block after `heading`.
fn section_commands(heading: &str) -> Vec<String> {
    let section = README
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("README has a {heading} section"));
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the section has a sh block");
    block
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_in_the_operator_guide_works() {
    let config =
        format!("{FAST_CONFIG}scaling_check_interval_seconds = 0.2\nscaling_mode = \"forecast_only\"\n");
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let (agent, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.5"])
        .await
        .unwrap();
    orchestrator
        .process
        .logs
        .wait_for("CPU data point recorded", Duration::from_secs(10))
        .await
        .unwrap();
    let grpc = orchestrator.grpc_addr.to_string();
    let grpcurl_dir = grpcurl().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        grpcurl_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let commands = operator_guide_commands();
    assert!(commands.len() >= 10, "{commands:#?}");
    for command in commands {
        if let Some(rest) = command.strip_prefix("curl -s ") {
            let url = rest.trim_matches('"').replace("$NODE_ID", &agent.id());
            let target = url
                .strip_prefix("127.0.0.1:3030")
                .expect("curl lines use the default address");
            let response = http_request(orchestrator.http_addr, target, &[]).await.unwrap();
            assert_eq!(response.status, 200, "{command}: {}", response.body);
            assert!(!response.body.is_empty(), "{command}");
            continue;
        }
        assert!(command.starts_with("grpcurl "), "unexpected line {command:?}");
        let streaming = command.contains("/Watch");
        let mut line = command.replace("127.0.0.1:50051", &grpc);
        if streaming {
            line = line.replacen("grpcurl ", "grpcurl -max-time 1 ", 1);
        }
        let output = tokio::process::Command::new("sh")
            .args(["-c", &line])
            .env("NODE_ID", agent.id())
            .env("PATH", &path)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if streaming {
            assert!(stderr.contains("DeadlineExceeded"), "{command}: {stderr}");
        } else {
            assert!(output.status.success(), "{command}: {stderr}");
        }
        if !command.contains("WatchEvents") {
            assert!(!stdout.trim().is_empty(), "{command} printed nothing");
        }
        if command.contains("GetNode") {
            assert!(stdout.contains(&agent.id()), "{stdout}");
        }
        if command.contains("DrainNode") {
            assert!(stdout.contains("NODE_STATE_DRAINING"), "{stdout}");
        }
        if command.contains("ResumeNode") {
            assert!(stdout.contains("NODE_STATE_CONNECTED"), "{stdout}");
        }
        if command.contains("SetMaintenance") {
            assert!(stdout.contains("\"changed\": true"), "{stdout}");
        }
    }
}
