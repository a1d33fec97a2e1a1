//! The console's side of the HTTP API with real processes: the event stream as
//! server-sent events (resume with Last-Event-ID, nothing lost or repeated; a
//! reload when the id is no longer kept), node lists paged and sorted by the
//! server, operator actions over HTTP behind the operator token, and the page
//! itself served from the binary under a strict content security policy.

use std::net::SocketAddr;

use secbeat_integration::{FAST_CONFIG, Orchestrator, STARTUP, Sig, eventually, http_request};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const OPERATOR: &str = "operator-token-0123456789";
const VIEWER: &str = "viewer-token-0123456789a";
const AGENT: &str = "agent-token-0123456789ab";

/// One server-sent event: (id, event type, data).
type Sse = (Option<u64>, String, String);

/// An open `/api/v1/events` stream read line by line.
struct EventStream {
    lines: tokio::io::Lines<BufReader<tokio::net::TcpStream>>,
}

impl EventStream {
    async fn open(addr: SocketAddr, headers: &[(&str, &str)]) -> Self {
        Self::open_at(addr, "/api/v1/events", headers).await
    }

    async fn open_at(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Self {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut lines = BufReader::new(stream).lines();
        let status = lines.next_line().await.unwrap().unwrap();
        assert!(status.contains(" 200 "), "{status}");
        // Headers end at the first empty line.
        while !lines.next_line().await.unwrap().unwrap().is_empty() {}
        Self { lines }
    }

    /// The next event (chunked transfer framing and keep-alive comments skipped).
    async fn next(&mut self) -> Sse {
        let (mut id, mut kind, mut data) = (None, String::from("message"), String::new());
        loop {
            let line = tokio::time::timeout(STARTUP, self.lines.next_line())
                .await
                .expect("an event in time")
                .unwrap()
                .expect("the stream is open");
            if let Some(value) = line.strip_prefix("id:") {
                id = value.trim().parse().ok();
            } else if let Some(value) = line.strip_prefix("event:") {
                kind = value.trim().to_owned();
            } else if let Some(value) = line.strip_prefix("data:") {
                data.push_str(value.trim());
            } else if line.is_empty() && !data.is_empty() {
                return (id, kind, data);
            }
        }
    }

    /// Events until one about `node` of type `kind`.
    async fn until(&mut self, node: &str, kind: &str) -> Vec<Sse> {
        let mut seen = Vec::new();
        loop {
            let event = self.next().await;
            let json: serde_json::Value = serde_json::from_str(&event.2).unwrap_or_default();
            let done = json["node_id"] == node && json["type"] == kind;
            seen.push(event);
            if done {
                return seen;
            }
        }
    }
}

/// A POST with a JSON body; (status, parsed body).
async fn post(addr: SocketAddr, path: &str, body: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_resumes_after_last_event_id_with_nothing_lost_or_repeated() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let addr = orchestrator.http_addr;
    let mut stream = EventStream::open(addr, &[]).await;
    let (first, _) = orchestrator.connected_agent(&[]).await.unwrap();
    let seen = stream.until(&first.id(), "node_joined").await;
    let last = seen.last().unwrap().0.expect("every event has an id");
    drop(stream);

    // While nobody listens: a second node joins and the first crashes.
    let (second, _) = orchestrator.connected_agent(&[]).await.unwrap();
    first.process.signal(Sig::SIGKILL);
    let mut fleet = orchestrator.fleet().await.unwrap();
    secbeat_integration::wait_for_state(&mut fleet, &first.id(), secbeat::pb::NodeState::Failed, STARTUP)
        .await;

    let header = last.to_string();
    let mut resumed = EventStream::open(addr, &[("Last-Event-ID", &header)]).await;
    let replay = resumed.until(&first.id(), "node_failed").await;
    let ids: Vec<u64> = replay.iter().map(|event| event.0.unwrap()).collect();
    assert_eq!(ids[0], last + 1, "resumes right after the last id received");
    assert!(
        ids.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "no gap, no repeat: {ids:?}"
    );
    let types: Vec<serde_json::Value> = replay
        .iter()
        .map(|event| serde_json::from_str::<serde_json::Value>(&event.2).unwrap())
        .collect();
    assert!(
        types
            .iter()
            .any(|e| e["type"] == "node_joined" && e["node_id"] == second.id())
    );
    assert!(
        types
            .iter()
            .all(|e| e["sequence"].as_u64().is_some() && e["time"].is_string())
    );

    // An id from before what is kept (here: from another run's epoch) says reload.
    let mut stale = EventStream::open(addr, &[("Last-Event-ID", "1")]).await;
    let (_, kind, data) = stale.next().await;
    assert_eq!(kind, "reload", "{data}");
    // A first view: the latest kept events, then live ones.
    let newest = *ids.last().unwrap();
    let mut first_view = EventStream::open_at(addr, "/api/v1/events?backlog=3", &[]).await;
    let mut first_ids = Vec::new();
    for _ in 0..3 {
        first_ids.push(first_view.next().await.0.unwrap());
    }
    assert!(
        first_ids.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "{first_ids:?}"
    );
    assert!(
        first_ids[2] >= newest,
        "ends with the latest: {first_ids:?} (newest seen {newest})"
    );
    let response = http_request(addr, "/api/v1/events?since=abc", &[]).await.unwrap();
    assert_eq!(response.status, 400, "{}", response.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_filters_sorts_and_pages_the_node_list() {
    let orchestrator = Orchestrator::start(FAST_CONFIG).await.unwrap();
    let mut agents = Vec::new();
    for cpu in ["0.1", "0.7", "0.3", "0.9", "0.5"] {
        let source = format!("const:{cpu}");
        agents.push(
            orchestrator
                .connected_agent(&["--cpu-source", &source])
                .await
                .unwrap()
                .0,
        );
    }
    let addr = orchestrator.http_addr;
    // Every node has reported its CPU (a node without a reading yet sorts last).
    eventually(STARTUP, "every node's CPU", || async {
        let response = http_request(addr, "/api/v1/nodes", &[]).await.ok()?;
        let nodes = response.json()["nodes"].as_array()?.clone();
        (nodes.len() == 5 && nodes.iter().all(|node| node["last_cpu_usage"].is_f64())).then_some(())
    })
    .await;
    let busiest = http_request(addr, "/api/v1/nodes?sort=cpu&order=desc&limit=2", &[])
        .await
        .unwrap()
        .json();
    assert_eq!(busiest["total"], 5);
    let cpus: Vec<f64> = busiest["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node["last_cpu_usage"].as_f64().unwrap())
        .collect();
    assert_eq!(cpus, [0.9, 0.7]);
    let next = http_request(addr, "/api/v1/nodes?sort=cpu&order=desc&limit=2&offset=2", &[])
        .await
        .unwrap()
        .json();
    let cpus: Vec<f64> = next["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node["last_cpu_usage"].as_f64().unwrap())
        .collect();
    assert_eq!(cpus, [0.5, 0.3]);
    for (path, field) in [
        ("/api/v1/nodes?sort=colour", "sort"),
        ("/api/v1/nodes?order=sideways", "order"),
        ("/api/v1/nodes?limit=-1", "limit"),
    ] {
        let response = http_request(addr, path, &[]).await.unwrap();
        assert_eq!(response.status, 400, "{path}");
        assert!(response.body.contains(field), "{path}: {}", response.body);
    }
    let history = http_request(addr, &format!("/api/v1/nodes/{}/events", agents[0].id()), &[])
        .await
        .unwrap()
        .json();
    assert_eq!(history["events"][0]["type"], "node_joined");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_over_http_need_the_operator_token_and_the_console_is_served() {
    let config = format!(
        "{FAST_CONFIG}admin_token = \"{OPERATOR}\"\nviewer_token = \"{VIEWER}\"\nagent_token = \"{AGENT}\"\n"
    );
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let env = [("SECBEAT_AGENT_TOKEN".to_owned(), AGENT.to_owned())];
    let agent =
        secbeat_integration::Agent::start_with_env(&orchestrator.url(), uuid::Uuid::new_v4(), &[], &env)
            .unwrap();
    let addr = orchestrator.http_addr;
    let viewer = format!("Bearer {VIEWER}");
    let operator = format!("Bearer {OPERATOR}");
    eventually(STARTUP, "the node listed", || async {
        let response = http_request(addr, "/api/v1/nodes", &[("Authorization", &viewer)])
            .await
            .ok()?;
        (response.json()["total"] == 1).then_some(())
    })
    .await;
    for (token, role) in [(&viewer, "viewer"), (&operator, "operator")] {
        let who = http_request(addr, "/api/v1/whoami", &[("Authorization", token)])
            .await
            .unwrap();
        assert_eq!(who.json()["role"], role);
    }
    let path = format!("/api/v1/nodes/{}/maintenance", agent.id());
    let body = r#"{"enabled": true, "reason": "reboot"}"#;
    let (status, refused) = post(addr, &path, body, Some(VIEWER)).await;
    assert_eq!(status, 403, "{refused}");
    let (status, _) = post(addr, &path, body, None).await;
    assert_eq!(status, 401);
    let (status, done) = post(addr, &path, body, Some(OPERATOR)).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["changed"], true);
    assert_eq!(done["node"]["maintenance"]["reason"], "reboot");
    let (status, bad) = post(addr, &path, r#"{"enabled": "yes"}"#, Some(OPERATOR)).await;
    assert_eq!(status, 400, "{bad}");
    let (status, paused) = post(
        addr,
        "/api/v1/automation",
        r#"{"scaling": false}"#,
        Some(OPERATOR),
    )
    .await;
    assert_eq!((status, paused["scaling"].as_bool()), (200, Some(false)));
    let terminate = format!("/api/v1/nodes/{}/terminate", agent.id());
    let (status, terminated) = post(
        addr,
        &terminate,
        r#"{"reason": "retire", "drain": true}"#,
        Some(OPERATOR),
    )
    .await;
    assert_eq!(status, 200, "{terminated}");
    let mut agent = agent;
    assert!(agent.process.wait_exit(STARTUP).await.unwrap().success());

    // The page, open to anyone (it holds no data), under a strict policy.
    let page = http_request(addr, "/", &[]).await.unwrap();
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    let policy = page.header("content-security-policy").unwrap();
    assert!(
        policy.contains("default-src 'self'") && policy.contains("script-src 'self'"),
        "{policy}"
    );
    assert!(page.body.contains("/console/console.js"));
    let script = http_request(addr, "/console/console.js", &[]).await.unwrap();
    assert_eq!(script.status, 200);
    assert!(
        script
            .header("content-type")
            .unwrap()
            .starts_with("text/javascript")
    );
    assert_eq!(
        http_request(addr, "/console/nothing.js", &[])
            .await
            .unwrap()
            .status,
        404
    );
}
