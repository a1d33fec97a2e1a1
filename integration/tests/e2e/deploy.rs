//! The deployment files are true to the code: docker-compose.yml validates with the
//! real docker-compose, the Dockerfile copies binaries that exist, the example
//! agent environment uses real variables, and the Grafana dashboard queries only
//! metrics the orchestrator exports.

use std::collections::BTreeSet;

use secbeat_integration::{FAST_CONFIG, Orchestrator, binary, docker_compose, http_request, repository_root};

#[tokio::test]
async fn the_compose_file_validates_and_needs_the_webhook_secret() {
    let file = repository_root().join("docker-compose.yml");
    let run = |secret: Option<&str>, args: &[&str]| {
        let mut command = tokio::process::Command::new(docker_compose());
        command
            .arg("-f")
            .arg(&file)
            .args(args)
            .env_remove("SECBEAT_WEBHOOK_SECRET");
        if let Some(secret) = secret {
            command.env("SECBEAT_WEBHOOK_SECRET", secret);
        }
        command.output()
    };
    let valid = run(Some("whsec_dGVzdA=="), &["config", "-q"]).await.unwrap();
    assert!(
        valid.status.success(),
        "{}",
        String::from_utf8_lossy(&valid.stderr)
    );

    let services = run(Some("whsec_dGVzdA=="), &["config", "--services"])
        .await
        .unwrap();
    let services: BTreeSet<String> = String::from_utf8_lossy(&services.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: BTreeSet<String> = [
        "orchestrator",
        "agent-1",
        "agent-2",
        "agent-3",
        "webhook-receiver",
        "jaeger",
    ]
    .map(str::to_owned)
    .into();
    assert_eq!(services, expected);

    let unset = run(None, &["config", "-q"]).await.unwrap();
    assert!(!unset.status.success(), "the secret is required");
    assert!(String::from_utf8_lossy(&unset.stderr).contains("SECBEAT_WEBHOOK_SECRET"));
}

#[test]
fn the_dockerfile_copies_binaries_the_workspace_builds() {
    let dockerfile = std::fs::read_to_string(repository_root().join("Dockerfile")).unwrap();
    let copied: BTreeSet<&str> = dockerfile
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("/src/target/release/"))
        .collect();
    assert_eq!(
        copied,
        [
            "secbeat-agent",
            "secbeat-orchestrator",
            "secbeat-webhook-receiver"
        ]
        .into()
    );
    for name in copied {
        // binary() panics if the workspace does not build it.
        assert!(binary(name).is_file());
    }
}

#[test]
fn the_example_agent_environment_uses_only_real_variables() {
    let help = std::process::Command::new(binary("secbeat-agent"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let env = std::fs::read_to_string(repository_root().join("deploy/agent.env")).unwrap();
    let keys: Vec<&str> = env
        .lines()
        .map(|line| line.trim_start_matches('#'))
        .filter_map(|line| line.split_once('=').map(|(key, _)| key))
        .filter(|key| key.starts_with("SECBEAT_"))
        .collect();
    assert!(keys.len() >= 5, "{keys:?}");
    for key in keys {
        assert!(
            help.contains(&format!("[env: {key}")),
            "{key} is not an agent variable"
        );
    }
    let unit =
        std::fs::read_to_string(repository_root().join("deploy/systemd/secbeat-agent.service")).unwrap();
    assert!(unit.contains("EnvironmentFile=/etc/secbeat/agent.env"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_exported_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repository_root().join("deploy/grafana/secbeat-fleet.json")).unwrap(),
    )
    .unwrap();
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if token.starts_with("orchestrator_") {
                    names.insert(token.to_owned());
                }
            }
        }
    }
    assert!(names.len() >= 15, "{names:?}");

    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let scrape = http_request(orchestrator.http_addr, "/metrics", &[])
        .await
        .unwrap();
    let families: BTreeSet<(&str, &str)> = scrape
        .body
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace();
            Some((words.next()?, words.next()?))
        })
        .collect();
    let exported = |name: &str| {
        families.iter().any(|(family, kind)| {
            *family == name
                || (*kind == "histogram"
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| name.strip_suffix(suffix) == Some(*family)))
        })
    };
    for name in &names {
        assert!(
            exported(name),
            "the dashboard queries {name}, which is not exported"
        );
    }
}

#[tokio::test]
async fn the_high_availability_compose_file_validates_with_three_etcd_members_and_two_orchestrators() {
    let output = tokio::process::Command::new(docker_compose())
        .arg("-f")
        .arg(repository_root().join("docker-compose.ha.yml"))
        .args(["config", "--services"])
        .env("SECBEAT_WEBHOOK_SECRET", "whsec_dGVzdA==")
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let services: BTreeSet<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: BTreeSet<String> = [
        "etcd-1",
        "etcd-2",
        "etcd-3",
        "orchestrator-a",
        "orchestrator-b",
        "agent-1",
        "agent-2",
        "agent-3",
        "webhook-receiver",
    ]
    .map(str::to_owned)
    .into();
    assert_eq!(services, expected);
}
