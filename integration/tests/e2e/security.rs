//! Security with real binaries: TLS and mTLS with certificates from the real
//! `secbeat-orchestrator certs`, node ids bound to agent certificates, operator
//! roles through tonic clients and the real grpcurl, hostile input on the agent
//! stream, and secrets kept out of logs and `--help`.

use std::{path::Path, time::Duration};

use secbeat::pb::{self, FleetEventType, NodeState, fleet_service_client::FleetServiceClient};
use secbeat_integration::{
    Agent, FAST_CONFIG, FAST_RECONNECT, Orchestrator, STARTUP, binary, cpu_samples, fleetsim, heartbeat,
    hello, raw_connect, run_grpcurl, wait_for_state,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use uuid::Uuid;

const ADMIN_TOKEN: &str = "operator-token-0123456789";
const AGENT_TOKEN: &str = "agent-token-0123456789ab";

/// Runs `secbeat-orchestrator certs ...` in `dir`.
fn certs(dir: &Path, args: &[&str]) {
    let output = std::process::Command::new(binary("secbeat-orchestrator"))
        .arg("certs")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

struct Pki {
    dir: tempfile::TempDir,
    node: Uuid,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        certs(dir.path(), &["init"]);
        let node = Uuid::new_v4();
        certs(dir.path(), &["issue-agent", "--node-id", &node.to_string()]);
        certs(dir.path(), &["issue-operator", "--name", "alice"]);
        certs(dir.path(), &["issue-operator", "--name", "grafana", "--viewer"]);
        Self { dir, node }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn config(&self) -> String {
        format!(
            "{FAST_CONFIG}admin_token = \"{ADMIN_TOKEN}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            self.path("orchestrator.pem"),
            self.path("orchestrator.key"),
            self.path("ca.pem")
        )
    }

    /// Agent flags: TLS with the CA, and the certificate of `cert_for` if any.
    fn agent_flags(&self, cert_for: Option<Uuid>) -> Vec<String> {
        let mut flags = vec!["--ca".to_owned(), self.path("ca.pem")];
        if let Some(node) = cert_for {
            flags.extend([
                "--cert".to_owned(),
                self.path(&format!("agent-{node}.pem")),
                "--key".to_owned(),
                self.path(&format!("agent-{node}.key")),
            ]);
        }
        flags
    }

    /// A FleetService client over TLS with the client certificate `stem` (if any).
    async fn fleet(&self, orchestrator: &Orchestrator, stem: Option<&str>) -> FleetServiceClient<Channel> {
        let ca = std::fs::read(self.path("ca.pem")).unwrap();
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(stem) = stem {
            let cert = std::fs::read(self.path(&format!("{stem}.pem"))).unwrap();
            let key = std::fs::read(self.path(&format!("{stem}.key"))).unwrap();
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        let channel = Channel::from_shared(https(orchestrator))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        FleetServiceClient::new(channel)
    }
}

fn https(orchestrator: &Orchestrator) -> String {
    format!("https://127.0.0.1:{}", orchestrator.grpc_addr.port())
}

fn strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_admits_an_agent_only_for_the_node_id_in_its_certificate() {
    let pki = Pki::new();
    let orchestrator = Orchestrator::start(&pki.config()).await.unwrap();
    let url = https(&orchestrator);

    // Plain text to the TLS port fails.
    let mut plain = orchestrator.fleet().await.unwrap();
    let refused = plain
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap_err();
    assert_ne!(refused.code(), tonic::Code::Ok);

    // No client certificate: refused, and the agent stops (it would not help to retry).
    let anonymous = Agent::start(&url, pki.node, &strs(&pki.agent_flags(None))).unwrap();
    exits_refused(anonymous, "Unauthenticated").await;

    // A certificate for node A claiming node B: PERMISSION_DENIED.
    let other = Uuid::new_v4();
    let impostor = Agent::start(&url, other, &strs(&pki.agent_flags(Some(pki.node)))).unwrap();
    exits_refused(impostor, "PermissionDenied").await;
    orchestrator
        .process
        .logs
        .wait_for(
            &format!("this certificate is for node {}, not {other}", pki.node),
            STARTUP,
        )
        .await
        .unwrap();

    // The right certificate for the right id: connected.
    let _agent = Agent::start(&url, pki.node, &strs(&pki.agent_flags(Some(pki.node)))).unwrap();
    let mut operator = pki.fleet(&orchestrator, Some("operator-alice")).await;
    wait_for_state(
        &mut operator,
        &pki.node.to_string(),
        NodeState::Connected,
        STARTUP,
    )
    .await;
    let listed = operator
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.nodes.len(), 1, "the refused ids were never registered");
}

/// After a SIGKILL restart the agent resumes its TLS session with a ticket
/// sealed under the key kept in state_dir (no full handshake), and the resumed
/// session still names its node: authorization reads the same certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_agent_resumes_its_tls_session_after_a_restart() {
    let pki = Pki::new();
    let mut orchestrator = Orchestrator::start(&pki.config()).await.unwrap();
    let mut flags = pki.agent_flags(Some(pki.node));
    flags.extend(FAST_RECONNECT.map(str::to_owned));
    let agent = Agent::start(&https(&orchestrator), pki.node, &strs(&flags)).unwrap();
    let handshakes = |result: &str| format!("orchestrator_tls_handshakes_total{{result=\"{result}\"}}");
    let mut operator = pki.fleet(&orchestrator, Some("operator-alice")).await;
    wait_for_state(
        &mut operator,
        &pki.node.to_string(),
        NodeState::Connected,
        STARTUP,
    )
    .await;
    assert_eq!(orchestrator.metric(&handshakes("resumed")).await, 0.0);
    assert!(orchestrator.metric(&handshakes("full")).await >= 1.0);

    orchestrator.process.kill(Duration::from_secs(10)).await.unwrap();
    agent
        .process
        .logs
        .wait_for("session lost; reconnecting", Duration::from_secs(5))
        .await
        .unwrap();
    let restarted = orchestrator.restart().await.unwrap();
    let mut operator = pki.fleet(&restarted, Some("operator-alice")).await;
    let node = wait_for_state(
        &mut operator,
        &pki.node.to_string(),
        NodeState::Connected,
        STARTUP,
    )
    .await;
    assert_eq!(node.node_id, pki.node.to_string());
    assert!(
        restarted.metric(&handshakes("resumed")).await >= 1.0,
        "the agent's reconnect resumed: {}",
        restarted.metrics().await.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_calls_need_an_operator_credential() {
    let pki = Pki::new();
    let orchestrator = Orchestrator::start(&pki.config()).await.unwrap();
    let mut agent = Agent::start(
        &https(&orchestrator),
        pki.node,
        &strs(&pki.agent_flags(Some(pki.node))),
    )
    .unwrap();
    let id = pki.node.to_string();
    let terminate = || pb::TerminateNodeRequest {
        node_id: id.clone(),
        reason: "security test".into(),
        ..Default::default()
    };

    let mut as_agent = pki
        .fleet(&orchestrator, Some(&format!("agent-{}", pki.node)))
        .await;
    let denied = as_agent.terminate_node(terminate()).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let denied = as_agent
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    let mut nobody = pki.fleet(&orchestrator, None).await;
    let denied = nobody
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::Unauthenticated);

    let mut viewer = pki.fleet(&orchestrator, Some("viewer-grafana")).await;
    wait_for_state(&mut viewer, &id, NodeState::Connected, STARTUP).await;
    let denied = viewer.terminate_node(terminate()).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "viewers only read");
    // Every call that changes the fleet needs the operator role.
    let changes = [
        viewer
            .drain_node(pb::DrainNodeRequest {
                node_id: id.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        viewer
            .resume_node(pb::ResumeNodeRequest {
                node_id: id.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        viewer
            .set_maintenance(pb::SetMaintenanceRequest {
                node_id: id.clone(),
                enabled: true,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        viewer
            .set_automation(pb::SetAutomationRequest {
                healing: Some(false),
                ..Default::default()
            })
            .await
            .map(|_| ()),
    ];
    for denied in changes {
        assert_eq!(denied.unwrap_err().code(), tonic::Code::PermissionDenied);
    }
    let node = secbeat_integration::node(&mut viewer, &id).await.unwrap();
    assert!(
        node.maintenance.is_none() && node.drain.is_none(),
        "nothing changed"
    );

    // The real grpcurl: an operator certificate reads...
    let addr = format!("127.0.0.1:{}", orchestrator.grpc_addr.port());
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("operator-alice.pem"),
        pki.path("operator-alice.key"),
    );
    let (ok, out, err) = run_grpcurl(&[
        "-cacert",
        &ca,
        "-cert",
        &cert,
        "-key",
        &key,
        &addr,
        "secbeat.v1.FleetService/ListNodes",
    ])
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains(&id), "{out}");
    // ...and the operator token, over TLS without a client certificate, terminates.
    let request = format!(r#"{{"node_id": "{id}", "reason": "token"}}"#);
    let header = format!("authorization: Bearer {ADMIN_TOKEN}");
    let (ok, _, err) = run_grpcurl(&[
        "-cacert",
        &ca,
        "-H",
        &header,
        "-d",
        &request,
        &addr,
        "secbeat.v1.FleetService/TerminateNode",
    ])
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(agent.process.wait_exit(STARTUP).await.unwrap().success());
    // The HTTP API honours the same token; health and metrics stay readable.
    let http = orchestrator.http_addr;
    let anonymous = secbeat_integration::http_request(http, "/api/v1/nodes", &[])
        .await
        .unwrap();
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    assert!(anonymous.json()["error"].as_str().unwrap().contains("Bearer"));
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let authorized = secbeat_integration::http_request(http, "/api/v1/nodes", &[("Authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(authorized.status, 200, "{}", authorized.body);
    for open in ["/metrics", "/healthz", "/readyz"] {
        let response = secbeat_integration::http_request(http, open, &[]).await.unwrap();
        assert_eq!(response.status, 200, "{open}");
    }
    // A wrong token is no better than none.
    let (ok, _, err) = run_grpcurl(&[
        "-cacert",
        &ca,
        "-H",
        "authorization: Bearer not-the-token-at-all",
        &addr,
        "secbeat.v1.FleetService/ListNodes",
    ])
    .await
    .unwrap();
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_streams_get_a_clear_status_and_a_good_agent_is_unaffected() {
    let config = format!("{FAST_CONFIG}max_nodes = 3\nmax_messages_per_second = 20\n");
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let (good, _) = orchestrator
        .connected_agent(&["--cpu-source", "const:0.3"])
        .await
        .unwrap();
    let mut events = orchestrator.watch_events().await.unwrap();
    let mut client = orchestrator.agent_client().await.unwrap();

    let ended_with = |mut stream: secbeat_integration::RawStream| async move {
        loop {
            match tokio::time::timeout(STARTUP, stream.inbound.message())
                .await
                .expect("an answer")
            {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without a status"),
                Err(status) => return status,
            }
        }
    };

    // A nil node id: refused before anything is registered.
    let status = raw_connect(&mut client, vec![hello(Uuid::nil())])
        .await
        .err()
        .expect("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // A flood from one stream: RESOURCE_EXHAUSTED for that stream only.
    let flooder = Uuid::new_v4();
    let flood = raw_connect(&mut client, vec![hello(flooder)]).await.unwrap();
    let outbound = flood.outbound.clone();
    tokio::spawn(async move {
        for sequence in 0..5000 {
            if outbound.send(heartbeat(sequence)).await.is_err() {
                break;
            }
        }
    });
    let status = ended_with(flood).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    // Too many samples in one message (the same node, reconnecting).
    let batch = raw_connect(&mut client, vec![hello(flooder)]).await.unwrap();
    batch.outbound.send(cpu_samples(&[0.5; 65])).await.unwrap();
    let status = ended_with(batch).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("at most 64"), "{status:?}");

    // An oversized message: refused by the decoder's limit.
    let mut huge = hello(Uuid::new_v4());
    if let Some(pb::agent_message::Kind::Hello(hello)) = &mut huge.kind {
        hello.labels.insert("padding".into(), "x".repeat(200 * 1024));
    }
    let status = match raw_connect(&mut client, vec![huge]).await {
        Ok(stream) => ended_with(stream).await,
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");

    // A timestamp absurdly far from now: INVALID_ARGUMENT.
    let skewed = raw_connect(&mut client, vec![hello(Uuid::new_v4())])
        .await
        .unwrap();
    let mut samples = cpu_samples(&[0.5]);
    if let Some(pb::agent_message::Kind::CpuSamples(batch)) = &mut samples.kind {
        batch.samples[0].time = Some(prost_types::Timestamp {
            seconds: 4_000_000_000,
            nanos: 0,
        });
    }
    skewed.outbound.send(samples).await.unwrap();
    let status = ended_with(skewed).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("away from the orchestrator's clock"),
        "{status:?}"
    );

    // max_nodes = 3: the good agent and the two registered above fill it; a new
    // id is refused, a known one still gets in.
    let status = match raw_connect(&mut client, vec![hello(Uuid::new_v4())]).await {
        Ok(stream) => ended_with(stream).await,
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_nodes"), "{status:?}");

    // Through all of it the good agent stayed connected and was never suspected.
    let mut fleet = orchestrator.fleet().await.unwrap();
    let node = wait_for_state(&mut fleet, &good.id(), NodeState::Connected, STARTUP).await;
    assert!(node.last_cpu_usage.is_some());
    let suspected =
        secbeat_integration::next_event_matching(&mut events, Duration::from_millis(1500), |event| {
            event.node_id == good.id() && event.r#type() == FleetEventType::NodeSuspected
        })
        .await;
    assert!(suspected.is_err(), "the good agent was suspected: {suspected:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_tokens_never_appear_in_logs_or_help() {
    let webhook_secret = "whsec_c2VjcmV0LXRoYXQtbXVzdC1ub3QtbGVhaw==";
    let env = vec![
        ("SECBEAT_WEBHOOK_SECRET".to_owned(), webhook_secret.to_owned()),
        ("SECBEAT_ADMIN_TOKEN".to_owned(), ADMIN_TOKEN.to_owned()),
        ("SECBEAT_AGENT_TOKEN".to_owned(), AGENT_TOKEN.to_owned()),
        ("RUST_LOG".to_owned(), "debug".to_owned()),
    ];
    let orchestrator = Orchestrator::start_with_env(FAST_CONFIG, &env).await.unwrap();
    // (The harness's plain client has no token, so wait on the log instead.)
    let agent_env = [("SECBEAT_AGENT_TOKEN".to_owned(), AGENT_TOKEN.to_owned())];
    let victim = secbeat_integration::Agent::start_with_env(
        &orchestrator.url(),
        uuid::Uuid::new_v4(),
        &[],
        &agent_env,
    )
    .unwrap();
    orchestrator
        .process
        .logs
        .wait_for("node joined", STARTUP)
        .await
        .unwrap();
    victim.process.signal(secbeat_integration::Sig::SIGKILL);
    orchestrator
        .process
        .logs
        .wait_for("webhook delivery failed", STARTUP)
        .await
        .unwrap();
    for line in orchestrator.process.logs.lines() {
        assert!(
            !line.contains(webhook_secret)
                && !line.contains("c2VjcmV0")
                && !line.contains(ADMIN_TOKEN)
                && !line.contains(AGENT_TOKEN),
            "a secret leaked: {line}"
        );
    }
    for binary_name in ["secbeat-orchestrator", "secbeat-webhook-receiver"] {
        let help = std::process::Command::new(binary(binary_name))
            .arg("--help")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(
            help.contains("SECBEAT_WEBHOOK_SECRET"),
            "{binary_name} documents the variable"
        );
        assert!(
            !help.contains(webhook_secret) && !help.contains(ADMIN_TOKEN) && !help.contains(AGENT_TOKEN),
            "{binary_name} --help shows a secret"
        );
    }
}

/// The agent was refused with `code` and exited 1 (retrying would not help).
async fn exits_refused(mut agent: Agent, code: &str) {
    let status = agent.process.wait_exit(STARTUP).await.unwrap();
    assert_eq!(status.code(), Some(1));
    agent.process.logs.wait_for(code, STARTUP).await.unwrap();
}

/// The fleet simulator speaks mTLS with a certificate of its own per virtual
/// agent (issued in memory from the `certs init` CA): every agent is admitted
/// under the node id of its certificate, crashes are detected, none is falsely
/// failed, and every handshake was a full mTLS one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_simulator_gives_each_agent_its_own_certificate() {
    const VIEWER_TOKEN: &str = "viewer-token-0123456789ab";
    let pki = Pki::new();
    let config = pki.config().replacen(
        "[tls]",
        &format!("mass_failure_fraction = 1.0\nviewer_token = \"{VIEWER_TOKEN}\"\n[tls]"),
        1,
    );
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let https = https(&orchestrator);
    let http = orchestrator.http_addr.to_string();
    let (ca, issuer) = (pki.path("ca.pem"), pki.dir.path().display().to_string());
    let report = fleetsim(&[
        "--orchestrator",
        &https,
        "--ca",
        &ca,
        "--issue-from",
        &issuer,
        "--token",
        VIEWER_TOKEN,
        "--agents",
        "20",
        "--duration",
        "6",
        "--kill",
        "2",
        "--orchestrator-http",
        &http,
    ])
    .await;
    assert_eq!(report["connected"], 20, "{report}");
    assert_eq!(report["connections"], 20, "{report}");
    assert_eq!(report["false_failures"], 0, "{report}");
    assert_eq!(report["crash_detection"]["detected"], 2, "{report}");
    let tls = &report["tls"];
    assert_eq!(tls["client_certificates"], true, "{report}");
    let handshakes = &tls["orchestrator_handshakes_since_start"];
    assert!(
        handshakes["full"].as_f64().unwrap() >= 21.0,
        "20 agents and the watch: {report}"
    );
    assert_eq!(handshakes["failed"].as_f64(), Some(0.0), "{report}");

    // One agent per certificate, each under its own id.
    let mut operator = pki.fleet(&orchestrator, Some("operator-alice")).await;
    let listed = operator
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.nodes.len(), 20);
}
