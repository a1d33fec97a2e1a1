//! Faults an operator meets, and hostile input, against the real binaries: each
//! test is one promise that once broke (a full disk, an anonymous stream with tokens
//! configured, departed nodes at capacity, a redirecting receiver, a flood of idle
//! sockets, a forged log line, a corrupt or half-created store), so the next break
//! is caught here.

use std::time::Duration;

use secbeat::pb::{self, FleetEventType, NodeState};
use secbeat_integration::{
    Agent, FAST_CONFIG, Orchestrator, STARTUP, Sig, WebhookReceiver, eventually, hello, http_request,
    next_event_matching, raw_connect, raw_connect_as, wait_for_state, webhook_config,
};
use uuid::Uuid;

const OPERATOR_TOKEN: &str = "operator-token-0123456789";
const VIEWER_TOKEN: &str = "viewer-token-0123456789ab";
const AGENT_TOKEN: &str = "agent-token-0123456789abc";

fn tokens_config() -> String {
    format!(
        "{FAST_CONFIG}admin_token = \"{OPERATOR_TOKEN}\"\nviewer_token = \"{VIEWER_TOKEN}\"\nagent_token = \"{AGENT_TOKEN}\"\n"
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Presents a bearer token on every call.
#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

type TokenClient = pb::fleet_service_client::FleetServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// A FleetService client that presents `authorization` as it is.
async fn fleet_with(orchestrator: &Orchestrator, authorization: &str) -> TokenClient {
    let channel = tonic::transport::Channel::from_shared(orchestrator.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    pb::fleet_service_client::FleetServiceClient::with_interceptor(
        channel,
        Bearer(authorization.parse().unwrap()),
    )
}

/// A FleetService client that presents `token`.
async fn fleet_as(orchestrator: &Orchestrator, token: &str) -> TokenClient {
    fleet_with(orchestrator, &bearer(token)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_and_no_client_ca_an_anonymous_or_viewer_stream_cannot_take_a_node() {
    let orchestrator = Orchestrator::start(&tokens_config()).await.unwrap();
    let env = [("SECBEAT_AGENT_TOKEN".to_owned(), AGENT_TOKEN.to_owned())];
    let agent = Agent::start_with_env(&orchestrator.url(), Uuid::new_v4(), &[], &env).unwrap();
    let mut viewer = fleet_as(&orchestrator, VIEWER_TOKEN).await;
    // The viewer can see the live node's id...
    let node = eventually(STARTUP, "the agent connected", || {
        let mut viewer = viewer.clone();
        let id = agent.id();
        async move {
            let nodes = viewer
                .list_nodes(pb::ListNodesRequest::default())
                .await
                .ok()?
                .into_inner()
                .nodes;
            nodes
                .into_iter()
                .find(|node| node.node_id == id && node.state() == NodeState::Connected)
        }
    })
    .await;
    // ...but neither an anonymous caller nor the viewer can open its stream.
    let mut client = orchestrator.agent_client().await.unwrap();
    let claimed = agent.node_id;
    let anonymous = raw_connect(&mut client, vec![hello(claimed)])
        .await
        .err()
        .unwrap();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated, "{anonymous:?}");
    for token in [VIEWER_TOKEN, OPERATOR_TOKEN] {
        let person = raw_connect_as(&mut client, vec![hello(claimed)], Some(&bearer(token)))
            .await
            .err()
            .unwrap();
        assert_eq!(person.code(), tonic::Code::PermissionDenied, "{person:?}");
    }
    // The real agent was never fenced: same session, same host name and address.
    let after = viewer
        .get_node(pb::GetNodeRequest { node_id: agent.id() })
        .await
        .unwrap()
        .into_inner()
        .node
        .unwrap();
    assert_eq!(
        (after.session_id, after.hostname.as_str(), after.ip.as_str()),
        (node.session_id, node.hostname.as_str(), node.ip.as_str())
    );
    assert_eq!(after.state(), NodeState::Connected);
    assert_eq!(
        orchestrator.metric("orchestrator_agent_streams").await,
        1.0,
        "only the agent's own stream"
    );
    // The agent token opens no operator call.
    let mut agent_as_operator = fleet_as(&orchestrator, AGENT_TOKEN).await;
    let refused = agent_as_operator
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    // A lowercase scheme is a valid scheme (RFC 7235).
    let mut lowercase = fleet_with(&orchestrator, &format!("bearer {VIEWER_TOKEN}")).await;
    assert!(
        lowercase
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn departed_nodes_do_not_hold_a_slot_under_max_nodes() {
    let orchestrator = Orchestrator::start(&format!("{FAST_CONFIG}max_nodes = 2\n"))
        .await
        .unwrap();
    let (mut leaving, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let (_staying, _) = orchestrator.connected_agent(&[]).await.unwrap();
    // Full: a third is refused.
    let mut client = orchestrator.agent_client().await.unwrap();
    let refused = raw_connect(&mut client, vec![hello(Uuid::new_v4())])
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    // One leaves (SIGTERM: goodbye, LEFT). It stays listed, but its slot is free,
    // so the replacement self-healing or an operator orders is admitted.
    leaving.process.signal(Sig::SIGTERM);
    leaving.process.wait_exit(STARTUP).await.unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();
    wait_for_state(&mut fleet, &leaving.id(), NodeState::Left, STARTUP).await;
    let (replacement, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let nodes = fleet
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 3, "the departed node is still listed");
    assert!(nodes.iter().any(|node| node.node_id == replacement.id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_receiver_never_gets_the_webhook_marked_delivered() {
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap(), &[])
        .await
        .unwrap();
    // A receiver that answers every POST with 302 to the real one.
    let target = receiver.url();
    let redirector = axum::Router::new().fallback(move || {
        let target = target.clone();
        async move {
            (
                axum::http::StatusCode::FOUND,
                [(axum::http::header::LOCATION, target)],
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/provision", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, redirector).await.unwrap() });

    let orchestrator = Orchestrator::start(&webhook_config(&url)).await.unwrap();
    let (victim, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let (_survivor, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let mut events = orchestrator.watch_events().await.unwrap();
    victim.process.signal(Sig::SIGKILL);
    for attempt in 1..=3u32 {
        let failed = next_event_matching(&mut events, STARTUP, |event| {
            event.r#type() == FleetEventType::WebhookFailed
        })
        .await
        .unwrap();
        let webhook = failed.webhook.as_ref().unwrap();
        assert_eq!((webhook.attempt, webhook.http_status), (attempt, Some(302)));
        assert!(
            failed.reason.contains("redirect to") && failed.reason.contains(&receiver.url()),
            "{}",
            failed.reason
        );
    }
    // Still undelivered, still in the outbox; the redirect's target got nothing.
    assert!(orchestrator.metric("orchestrator_webhook_outbox_depth").await >= 1.0);
    assert!(
        receiver.events().is_empty(),
        "the signature never went to the Location"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_supplied_text_cannot_forge_a_log_line_or_reach_a_terminal_raw() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let mut client = orchestrator.agent_client().await.unwrap();
    let forged = "edge-1\n2026-11-30T09:00:00.000000Z ERROR secbeat_orchestrator::runtime::fleet: CRITICAL UNEXPECTED NODE FAILURE DETECTED for Node 00000000-0000-0000-0000-000000000001 at IP 10.0.0.1. Initiating self-healing.";
    for (hostname, labels) in [
        (forged.to_owned(), Default::default()),
        ("edge-\u{1b}[31mred".to_owned(), Default::default()),
        (
            "edge-2".to_owned(),
            [("pop".to_owned(), "fra1\r\nINFO forged".to_owned())].into(),
        ),
    ] {
        let message = pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                node_id: Uuid::new_v4().to_string(),
                hostname,
                ip: String::new(),
                agent_version: "test".into(),
                labels,
                ..Default::default()
            })),
        };
        let refused = raw_connect(&mut client, vec![message]).await.err().unwrap();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("control character"), "{refused:?}");
    }
    // A goodbye reason is the agent's to choose, so it is kept, escaped.
    let id = Uuid::new_v4();
    let stream = raw_connect(&mut client, vec![hello(id)]).await.unwrap();
    let goodbye = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Goodbye(pb::Goodbye {
            reason: format!("bye\n{forged}\u{1b}[2J"),
        })),
    };
    let secbeat_integration::RawStream {
        outbound,
        mut inbound,
    } = stream;
    outbound.send(goodbye).await.unwrap();
    // Half-close, as an agent does, and wait for the orchestrator to end the stream.
    drop(outbound);
    while let Ok(Some(_)) = inbound.message().await {}
    let mut fleet = orchestrator.fleet().await.unwrap();
    let left = wait_for_state(&mut fleet, &id.to_string(), NodeState::Left, STARTUP).await;
    assert!(!left.state_reason.contains('\n') && !left.state_reason.contains('\u{1b}'));
    for line in orchestrator.process.logs.lines() {
        assert!(!line.contains('\u{1b}'), "a raw escape reached the log: {line:?}");
        assert!(
            !line.starts_with("2026-11-30T09:00:00.000000Z"),
            "a forged line: {line:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_that_does_not_decode_is_invalid_argument() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    // Field 1 (hello) holding field 2 (hostname) with invalid UTF-8: prost refuses it.
    let node_id = Uuid::new_v4().to_string();
    let mut hello = vec![0x0a, node_id.len() as u8];
    hello.extend_from_slice(node_id.as_bytes());
    hello.extend_from_slice(&[0x12, 0x02, 0xff, 0xfe]);
    let mut message = vec![0x0a, hello.len() as u8];
    message.extend_from_slice(&hello);
    let status = raw_bytes_connect(&orchestrator, message).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("undecodable"), "{status:?}");
}

/// Opens an agent stream whose first message is `bytes` as they are, and returns
/// how the orchestrator ended it.
async fn raw_bytes_connect(orchestrator: &Orchestrator, bytes: Vec<u8>) -> tonic::Status {
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    /// Sends raw bytes as a message; decodes the answers as ControlMessage.
    struct Raw;
    struct RawEncoder;
    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            bytes::BufMut::put_slice(dst, &item);
            Ok(())
        }
    }
    struct ControlDecoder;
    impl Decoder for ControlDecoder {
        type Item = pb::ControlMessage;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, tonic::Status> {
            prost::Message::decode(src)
                .map(Some)
                .map_err(|e| tonic::Status::internal(e.to_string()))
        }
    }
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = pb::ControlMessage;
        type Encoder = RawEncoder;
        type Decoder = ControlDecoder;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> ControlDecoder {
            ControlDecoder
        }
    }

    let channel = tonic::transport::Channel::from_shared(orchestrator.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let request = tonic::Request::new(tokio_stream::iter(vec![bytes]));
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/secbeat.v1.AgentService/Connect");
    match grpc.streaming(request, path, Raw).await {
        Err(status) => status,
        Ok(response) => {
            let mut inbound = response.into_inner();
            loop {
                match inbound.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the stream ended without a status"),
                    Err(status) => break status,
                }
            }
        }
    }
}

/// Flips every 97th byte of the database's pages after the header.
fn corrupt(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    for index in (4096..bytes.len()).step_by(97) {
        bytes[index] ^= 0xa5;
    }
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_flipped_store_is_a_clear_error_not_a_panic() {
    let mut first = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let (_agent, _) = first.connected_agent(&[]).await.unwrap();
    first.process.signal(Sig::SIGTERM);
    first.process.wait_exit(STARTUP).await.unwrap();
    corrupt(&first.state_dir().join("orchestrator.redb"));

    let output = first.run_to_exit(STARTUP).await.unwrap();
    assert_ne!(output.status.code(), Some(101), "a panic: {}", output.stderr);
    assert_eq!(output.status.code(), Some(1), "{}", output.stderr);
    assert!(
        output.stderr.contains("state_dir") && output.stderr.contains("orchestrator.redb"),
        "a clear line naming the file: {}",
        output.stderr
    );
    assert!(!output.stderr.contains("panicked"), "{}", output.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_killed_half_way_leaves_a_store_that_opens() {
    let first = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let state = first.state_dir();
    let mut first = first;
    first.process.kill(STARTUP).await.unwrap();
    // What a SIGKILL between creating the file and committing its tables leaves: a
    // half-written file that never became the store.
    std::fs::remove_file(state.join("orchestrator.redb")).unwrap();
    std::fs::write(
        state.join("orchestrator.redb.creating"),
        b"redb\x1a\x0a\xa9\x0d\x0a half",
    )
    .unwrap();
    let second = first.restart().await.unwrap();
    let (_agent, _) = second.connected_agent(&[]).await.unwrap();
    assert!(!state.join("orchestrator.redb.creating").exists());
    let status = http_request(second.http_addr, "/readyz", &[]).await.unwrap();
    assert_eq!(status.status, 200);
}

/// A small tmpfs the test fills and frees; unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts an 8 MiB tmpfs, or says why it cannot (not root, no mount).
    fn mount() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Writes a file until the disk is full.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_degrades_the_store_and_it_recovers_when_space_is_back() {
    let disk = match SmallDisk::mount() {
        Ok(disk) => disk,
        Err(why) => {
            eprintln!("SKIPPED: a full disk needs a tmpfs this test can mount (as root): {why}");
            return;
        }
    };
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap(), &[])
        .await
        .unwrap();
    let state = disk.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let orchestrator = Orchestrator::start_on(&webhook_config(&receiver.url()), &state)
        .await
        .unwrap();
    let (victim, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let (_survivor, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let ready = || async {
        http_request(orchestrator.http_addr, "/readyz", &[])
            .await
            .unwrap()
    };
    assert_eq!(ready().await.status, 200);

    // The disk fills up; a node fails: its FAILED state and its webhook must be
    // written, and cannot be.
    let filler = disk.fill();
    victim.process.signal(Sig::SIGKILL);
    let failing = eventually(STARTUP, "readiness to report the failing store", || async {
        let response = ready().await;
        (response.status == 503).then_some(response.body)
    })
    .await;
    assert!(failing.contains("state store failing"), "{failing}");
    orchestrator
        .assert_metric("orchestrator_store_healthy", 0.0)
        .await;
    assert!(orchestrator.metric("orchestrator_store_write_errors_total").await >= 1.0);
    // The webhook is decided and counted as waiting, not lost, and not sent before
    // it is durable.
    eventually(STARTUP, "the undelivered webhook to be counted", || async {
        (orchestrator.metric("orchestrator_webhook_outbox_depth").await >= 1.0).then_some(())
    })
    .await;
    assert!(receiver.events().is_empty());

    // Space is back: the store writes again, readiness returns, the webhook goes
    // out once.
    std::fs::remove_file(filler).unwrap();
    eventually(Duration::from_secs(20), "readiness to return", || async {
        (ready().await.status == 200).then_some(())
    })
    .await;
    orchestrator
        .assert_metric("orchestrator_store_healthy", 1.0)
        .await;
    let events = receiver
        .wait_for_events("UNEXPECTED_NODE_FAILURE", 1, Duration::from_secs(20))
        .await;
    assert_eq!(events[0]["payload"]["failed_node_id"], victim.id());
    orchestrator.wait_outbox_drained(Duration::from_secs(20)).await;
    assert_eq!(receiver.events().len(), 1);
    let mut fleet = orchestrator.fleet().await.unwrap();
    wait_for_state(&mut fleet, &victim.id(), NodeState::Failed, STARTUP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_open_sockets_are_closed_and_never_lock_out_agents_or_http() {
    let config = format!(
        "{FAST_CONFIG}connection_handshake_timeout = 0.5\nconnection_idle_timeout = 2.0\nmax_connections_per_source = 8\n"
    );
    let orchestrator = Orchestrator::start_with_fd_limit(&config, 128).await.unwrap();
    let (agent, before) = orchestrator.connected_agent(&[]).await.unwrap();

    // A flood of sockets that never speak (or stop after a few bytes, as a stalled
    // TLS handshake does), all from one address.
    let mut flood: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(orchestrator.grpc_addr).ok())
        .collect();
    assert!(flood.len() >= 200, "only {} connections", flood.len());
    use std::io::{Read, Write};
    flood[0].write_all(b"PRI * HTTP").unwrap();

    // HTTP answers throughout.
    let health = http_request(orchestrator.http_addr, "/healthz", &[])
        .await
        .unwrap();
    assert_eq!(health.status, 200);

    // Every flood socket is closed by the orchestrator: at accept (over the
    // per-source cap) or when its handshake deadline passes.
    let total = flood.len();
    let closed = tokio::task::spawn_blocking(move || {
        let mut closed = 0;
        for socket in &mut flood {
            socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // The server may greet first (its HTTP/2 settings); read to the end. EOF
            // or a reset: the orchestrator closed it. A timeout: it did not.
            let mut greeting = Vec::new();
            closed += match socket.read_to_end(&mut greeting) {
                Ok(_) => 1,
                Err(error) => usize::from(error.kind() == std::io::ErrorKind::ConnectionReset),
            };
        }
        closed
    })
    .await
    .unwrap();
    assert_eq!(closed, total, "every idle socket was closed");
    let refused = orchestrator
        .metric("orchestrator_connections_refused_total{reason=\"per_source\"}")
        .await;
    assert!(refused >= 1.0, "{refused}");

    // The live agent was never cut off, and a new one gets in.
    let (late, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let mut fleet = orchestrator.fleet().await.unwrap();
    let now = wait_for_state(&mut fleet, &agent.id(), NodeState::Connected, STARTUP).await;
    assert_eq!(now.session_id, before.session_id, "the agent kept its session");
    wait_for_state(&mut fleet, &late.id(), NodeState::Connected, STARTUP).await;
}
