//! `secbeat-fleetsim`: many virtual agents speaking the real AgentService
//! protocol against a real orchestrator, with fault injection, reporting what an
//! operator would want to know about the orchestrator at that scale.
//!
//! Each virtual agent sends Hello, waits for Welcome, then a heartbeat carrying
//! a CPU sample every heartbeat interval (the orchestrator's, from Welcome, unless
//! `--heartbeat-interval` overrides it), as the real agent does; with
//! `--two-messages`, or when the Welcome does not say `heartbeat_carries_cpu`, a
//! CPU sample and a bare heartbeat, as older agents do. The beats are made in the
//! stream's request body itself, on its own timer ([`Outbound`]), so that a beat
//! costs the simulator one task wake-up. Agents get their own HTTP/2 connection
//! by default, spread over 127.0.0.x source addresses so ephemeral ports do not
//! run out; `--streams-per-connection K` multiplexes K agents per connection.
//!
//! Faults, injected from halfway through `--duration`, one every 97 ms so that
//! they fall at every phase of the orchestrator's check timer: `--kill K` drops K
//! agents' streams abruptly (a crash), `--stall K` keeps K streams open but silent
//! (a hang). The run watches the orchestrator's events and reports detection
//! latency per fault, and every failure of an agent that was healthy
//! (`false_failures`; `false_failure_detail` gives each one's reason and when its
//! agent sent its two latest heartbeats). `agent_timer_lateness` says how late
//! the agents' heartbeat timers fired: a simulator short of CPU sends late.
//!
//! Healthy agents whose stream ends reconnect like the real agent (jittered
//! exponential backoff from 0.5 s to 30 s). Restart the orchestrator during a run
//! and `reconnect` says how long it took until every agent that lost its stream
//! was welcomed again (the reconnect storm), how many were welcomed in each second
//! (`back_per_second`) and why attempts failed in each second
//! (`failures_per_second`: `standby`, `taking_over`, `unreachable`, `refused`,
//! `open_timeout`, `no_welcome`, `cut_before_welcome`). With `--orchestrator-http`, the run
//! also reads the orchestrator's heartbeat handling latency (receipt on the stream
//! to the session's liveness cell), detector work and TLS handshakes (full and
//! resumed) from `/metrics` over the same steady window as CPU and memory, and
//! the handshakes of the reconnect storm. It reports its own CPU over that window
//! too (`fleetsim_cpu_share_of_one_core`): when the simulator and the orchestrator
//! together near the machine's cores, agents fall behind their schedule whatever
//! the orchestrator does.
//!
//! TLS: `--ca` trusts the orchestrator's CA (https:// URLs); `--issue-from` gives
//! every virtual agent its own certificate for its node id, issued in memory by
//! the CA of a `secbeat-orchestrator certs init` directory (mTLS: each agent on
//! its own connection, since a certificate names one node). Agents keep the
//! session tickets they are given and resume with them after a lost connection,
//! as the real agent does; `--no-tls-resumption` makes every handshake full.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use secbeat::backoff::Backoff;
use secbeat::pb::{
    self, FleetEventType, agent_message::Kind, agent_service_client::AgentServiceClient, control_message,
    fleet_service_client::FleetServiceClient,
};
use secbeat_tools::{
    http::http_request,
    proc::{process_cpu_time, process_rss},
    tls::{ClientTls, TlsDialer},
};
use serde_json::json;
use tokio::sync::{Semaphore, oneshot};
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

/// jemalloc, as the orchestrator: a reconnect storm is tens of thousands of
/// connections and streams made at once, and the simulator shares the machine
/// with the server it measures (BENCHMARKS.md, "jemalloc": a quarter less of its
/// CPU in a storm).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Simulates a fleet of agents against a real orchestrator.
#[derive(Debug, clap::Parser)]
#[command(name = "secbeat-fleetsim", version)]
struct Args {
    /// Orchestrator gRPC URLs, comma-separated (every orchestrator of a highly
    /// available control plane): each connection starts at a random one, follows
    /// a standby's secbeat-leader pointer, and otherwise tries the next in turn
    #[arg(long, default_value = "http://127.0.0.1:50051", value_delimiter = ',')]
    orchestrator: Vec<String>,
    /// Virtual agents
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// How long to run, seconds: CPU, memory, message rate and handling latency
    /// are measured from a quarter to half of it; faults start halfway
    #[arg(long, default_value_t = 30.0, value_parser = parse_secs)]
    duration: f64,
    /// Agents multiplexed per HTTP/2 connection (1: each its own connection)
    #[arg(long, default_value_t = 1)]
    streams_per_connection: usize,
    /// Heartbeat interval, seconds (default: the orchestrator's, from Welcome)
    #[arg(long)]
    heartbeat_interval: Option<f64>,
    /// Constant CPU fraction every agent reports
    #[arg(long, default_value_t = 0.3)]
    cpu: f64,
    /// Send the CPU sample and the heartbeat as two messages every interval, as
    /// agents from before `heartbeat_carries_cpu` do
    #[arg(long)]
    two_messages: bool,
    /// Agents whose connections are dropped abruptly halfway (crash)
    #[arg(long, default_value_t = 0)]
    kill: usize,
    /// Agents that go silent halfway, their streams left open (hang)
    #[arg(long, default_value_t = 0)]
    stall: usize,
    /// Sessions opened at once while ramping up
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Sessions reopened at once after lost streams (default: as
    /// --connect-concurrency). Real agents reconnect independently, paced only
    /// by their jittered backoff: a large value simulates that, on a simulator
    /// that then competes harder for the machine's cores
    #[arg(long)]
    reconnect_concurrency: Option<usize>,
    /// The orchestrator's pid, to report its CPU and RSS from /proc
    #[arg(long)]
    orchestrator_pid: Option<u32>,
    /// The orchestrator's HTTP address (host:port), to read heartbeat handling
    /// latency and detector work from its /metrics
    #[arg(long)]
    orchestrator_http: Option<std::net::SocketAddr>,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
    /// First reconnect delay after a lost stream, seconds (the agent's default)
    #[arg(long, default_value_t = 0.5, value_parser = parse_secs)]
    reconnect_initial: f64,
    /// Longest reconnect delay, seconds (the agent's default)
    #[arg(long, default_value_t = 30.0, value_parser = parse_secs)]
    reconnect_max: f64,
    /// CA certificate (PEM) of the orchestrator's TLS certificate: speak TLS
    /// (https:// URLs)
    #[arg(long, value_name = "FILE")]
    ca: Option<std::path::PathBuf>,
    /// A `secbeat-orchestrator certs init` directory: every virtual agent gets
    /// its own certificate for its node id from this CA (mTLS; needs --ca and one
    /// agent per connection)
    #[arg(long, value_name = "DIR")]
    issue_from: Option<std::path::PathBuf>,
    /// Agents drop their TLS session tickets: every handshake is a full one
    #[arg(long)]
    no_tls_resumption: bool,
    /// Bearer token for watching the orchestrator's events (its viewer_token or
    /// admin_token, when it enforces operator credentials)
    #[arg(long, env = "SECBEAT_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

fn parse_secs(text: &str) -> Result<f64, String> {
    let trimmed = text.trim_end_matches('s');
    trimmed.parse::<f64>().map_err(|e| format!("{text}: {e}"))
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    messages: AtomicU64,
    refused: AtomicU64,
    /// Streams of healthy agents that ended under them.
    lost: AtomicU64,
    /// Of those, welcomed again.
    back: AtomicU64,
    /// Attempts to reconnect that were not welcomed (and backed off again).
    failed_reconnects: AtomicU64,
    /// The first loss, and each agent's time from its loss to its next Welcome.
    storm: Mutex<Storm>,
    /// The simulator's own CPU time, sampled through the run.
    cpu: Mutex<Vec<(Instant, Duration)>>,
}

/// Heartbeats by how late the agent's timer fired (tokio's scheduled tick to
/// the agent running): up to each bound, and beyond the last.
const LATENESS_BOUNDS: [Duration; 6] = [
    Duration::from_millis(10),
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(3),
];

/// What the agents sent and when: tells a false failure the simulator caused
/// (the agent's two latest heartbeats were further apart than the timeout: it
/// was starved of CPU) from one the agent sent on time for (a heartbeat inside
/// the silence the orchestrator judged was held up on its way).
struct Sends {
    /// Per agent (by index): Unix milliseconds of the latest heartbeat it
    /// handed to its connection; 0 before the first.
    last_unix_ms: Vec<AtomicU64>,
    /// Per agent: the same for the heartbeat before the latest.
    previous_unix_ms: Vec<AtomicU64>,
    /// Heartbeats per lateness bucket (`LATENESS_BOUNDS`, then beyond).
    lateness: [AtomicU64; LATENESS_BOUNDS.len() + 1],
    /// The latest a timer fired, in microseconds.
    max_lateness_us: AtomicU64,
}

impl Sends {
    fn new(agents: usize) -> Self {
        Self {
            last_unix_ms: (0..agents).map(|_| AtomicU64::new(0)).collect(),
            previous_unix_ms: (0..agents).map(|_| AtomicU64::new(0)).collect(),
            lateness: Default::default(),
            max_lateness_us: AtomicU64::new(0),
        }
    }

    /// An agent's timer fired `late` after its tick was due.
    fn fired(&self, late: Duration) {
        let bucket = LATENESS_BOUNDS
            .iter()
            .position(|bound| late <= *bound)
            .unwrap_or(LATENESS_BOUNDS.len());
        self.lateness[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(late.as_micros()).unwrap_or(u64::MAX);
        // Read first: a new maximum is rare, and a read shares the line where a
        // write on every beat would bounce it between the cores.
        if micros > self.max_lateness_us.load(Ordering::Relaxed) {
            self.max_lateness_us.fetch_max(micros, Ordering::Relaxed);
        }
    }

    /// Agent `index` handed a heartbeat stamped `at` to its connection.
    fn sent(&self, index: usize, at: SystemTime) {
        let millis = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
        // One writer per agent: the task that polls its outbound stream.
        let previous = self.last_unix_ms[index].swap(millis, Ordering::Relaxed);
        self.previous_unix_ms[index].store(previous, Ordering::Relaxed);
    }

    /// When agent `index` sent its latest heartbeat and the one before it (None
    /// where it has not sent that many).
    fn last_two_sent(&self, index: usize) -> [Option<SystemTime>; 2] {
        let at = |slots: &[AtomicU64]| {
            let millis = slots.get(index)?.load(Ordering::Relaxed);
            (millis > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(millis))
        };
        [at(&self.last_unix_ms), at(&self.previous_unix_ms)]
    }

    /// Heartbeats per lateness bucket so far.
    fn counts(&self) -> Vec<u64> {
        self.lateness
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect()
    }

    /// Heartbeats per lateness bucket between two `counts`, and the latest
    /// tick of the whole run.
    fn report(before: &[u64], after: &[u64], max_s: Option<f64>) -> serde_json::Value {
        let mut buckets = serde_json::Map::new();
        for (i, (before, after)) in before.iter().zip(after).enumerate() {
            let key = match LATENESS_BOUNDS.get(i) {
                Some(bound) => format!("le_{}s", bound.as_secs_f64()),
                None => format!("gt_{}s", LATENESS_BOUNDS[i - 1].as_secs_f64()),
            };
            buckets.insert(key, json!(after - before));
        }
        json!({ "heartbeats": buckets, "max_s": max_s })
    }

    /// The latest any timer fired, seconds.
    fn max_lateness_s(&self) -> f64 {
        self.max_lateness_us.load(Ordering::Relaxed) as f64 / 1e6
    }
}

/// False failures reported one by one (the rest are counted).
const FALSE_FAILURES_DETAILED: usize = 20;

/// How often the simulator samples its own CPU time (for its share of a
/// reconnect storm).
const CPU_SAMPLE_EVERY: Duration = Duration::from_millis(100);

impl Counters {
    /// The simulator's own CPU time from `from` to `to`, from the samples on
    /// either side of them (None if the run has none there).
    fn own_cpu_between(&self, from: Instant, to: Instant) -> Option<Duration> {
        let samples = self.cpu.lock().expect("lock");
        let before = samples.iter().rev().find(|(at, _)| *at <= from)?.1;
        let after = samples.iter().find(|(at, _)| *at >= to)?.1;
        Some(after.saturating_sub(before))
    }
}

#[derive(Default)]
struct Storm {
    first_loss: Option<Instant>,
    last_back: Option<Instant>,
    downtimes: Vec<Duration>,
    /// Agents welcomed again in each second after the first loss: a flat rate
    /// says the storm was throughput-bound, gaps say agents were waiting.
    back_per_second: Vec<u64>,
    /// Failed reconnect attempts in each second after the first loss, by cause.
    failures_per_second: BTreeMap<&'static str, Vec<u64>>,
}

impl Storm {
    /// Counts a failed reconnect attempt now.
    fn failed(&mut self, cause: &'static str) {
        let Some(first) = self.first_loss else { return };
        let second = first.elapsed().as_secs() as usize;
        let counts = self.failures_per_second.entry(cause).or_default();
        if counts.len() <= second {
            counts.resize(second + 1, 0);
        }
        counts[second] += 1;
    }
}

/// What a virtual agent is told halfway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Healthy,
    Kill,
    Stall,
}

fn main() -> ExitCode {
    let args = match secbeat::process::parse_args::<Args>() {
        Ok(args) => args,
        Err(exit) => return exit,
    };
    let backoff = Duration::try_from_secs_f64(args.reconnect_initial)
        .and_then(|initial| Ok((initial, Duration::try_from_secs_f64(args.reconnect_max)?)))
        .map_err(|error| error.to_string())
        .and_then(|(initial, max)| Backoff::new(initial, max, 0.5).map_err(|error| error.to_string()));
    if let Err(error) = backoff {
        eprintln!("secbeat-fleetsim: --reconnect-initial/--reconnect-max: {error}");
        return ExitCode::from(secbeat::process::EXIT_USAGE);
    }
    let runtime = match secbeat::process::runtime(2) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("secbeat-fleetsim: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("secbeat-fleetsim: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.kill + args.stall <= args.agents,
        "--kill + --stall exceed --agents"
    );
    anyhow::ensure!(
        args.streams_per_connection >= 1,
        "--streams-per-connection must be at least 1"
    );
    let tls = match &args.ca {
        Some(ca) => {
            let pem = std::fs::read(ca).map_err(|e| anyhow::anyhow!("--ca {}: {e}", ca.display()))?;
            Some(ClientTls::new(&pem, !args.no_tls_resumption).map_err(|e| anyhow::anyhow!("--ca: {e}"))?)
        }
        None => None,
    };
    anyhow::ensure!(
        args.issue_from.is_none() || (tls.is_some() && args.streams_per_connection == 1),
        "--issue-from needs --ca and --streams-per-connection 1 (a certificate names one node)"
    );
    let counters = Arc::new(Counters::default());
    let sends = Arc::new(Sends::new(args.agents));
    let ids: Vec<Uuid> = (0..args.agents).map(|_| Uuid::new_v4()).collect();
    // Each connection's TLS configuration: the agent's own certificate with
    // --issue-from, else one per group without a client certificate.
    let issuer = match &args.issue_from {
        Some(dir) => Some(
            secbeat_orchestrator::edge::certs::AgentIssuer::load(dir)
                .map_err(|e| anyhow::anyhow!("--issue-from {}: {e}", dir.display()))?,
        ),
        None => None,
    };
    let connection_tls = |agent: Uuid| -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
        let Some(tls) = &tls else { return Ok(None) };
        Ok(Some(match &issuer {
            Some(issuer) => {
                let (cert, key) = issuer.issue(agent)?;
                tls.agent(Some((&cert, &key)))?
            }
            None => tls.agent(None)?,
        }))
    };
    let fates: HashMap<Uuid, Fate> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let fate = if i < args.kill {
                Fate::Kill
            } else if i < args.kill + args.stall {
                Fate::Stall
            } else {
                Fate::Healthy
            };
            (*id, fate)
        })
        .collect();

    // Watch failures from the start.
    let watch_tls = match &tls {
        Some(tls) => Some(tls.agent(None)?),
        None => None,
    };
    let watch = SharedChannel::new(args.orchestrator.clone(), None, watch_tls)?;
    let failures: Arc<Mutex<Vec<Failure>>> = Arc::default();
    let index: Arc<HashMap<Uuid, usize>> = Arc::new(ids.iter().enumerate().map(|(i, id)| (*id, i)).collect());
    tokio::spawn(watch_failures(
        watch,
        args.token.clone(),
        failures.clone(),
        index.clone(),
        sends.clone(),
    ));
    let sampler = counters.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(CPU_SAMPLE_EVERY);
        loop {
            every.tick().await;
            let now = (Instant::now(), process_cpu_time(std::process::id()));
            sampler.cpu.lock().expect("lock").push(now);
        }
    });

    let started = Instant::now();
    let started_wall = SystemTime::now();
    let quarter = Duration::from_secs_f64(args.duration / 4.0);
    let half = Duration::from_secs_f64(args.duration / 2.0);
    let faults_from = started + half;
    let faults_from_wall = SystemTime::now() + half;
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let regate = Arc::new(Semaphore::new(
        args.reconnect_concurrency
            .unwrap_or(args.connect_concurrency)
            .max(1),
    ));
    let mut channels: Vec<Arc<SharedChannel>> = Vec::new();
    let mut tasks = Vec::with_capacity(args.agents);
    for (index, id) in ids.iter().enumerate() {
        let connection = index / args.streams_per_connection;
        if connection == channels.len() {
            // 127.0.0.1 .. 127.0.0.250 as source addresses: ~28k ports each.
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, (connection % 250 + 1) as u8));
            channels.push(Arc::new(SharedChannel::new(
                args.orchestrator.clone(),
                Some(source),
                connection_tls(*id)?,
            )?));
        }
        let channel = Arc::clone(&channels[connection]);
        let fate = fates[id];
        let agent = VirtualAgent {
            id: *id,
            index,
            sends: sends.clone(),
            fate,
            fault_at: faults_from + FAULT_STEP * index as u32,
            cpu: args.cpu,
            two_messages: args.two_messages,
            interval: args.heartbeat_interval.map(Duration::from_secs_f64),
            reconnect: (
                Duration::from_secs_f64(args.reconnect_initial),
                Duration::from_secs_f64(args.reconnect_max),
            ),
            counters: counters.clone(),
            gate: gate.clone(),
            regate: regate.clone(),
        };
        tasks.push(tokio::spawn(agent.run(channel)));
    }

    // The steady window, from a quarter to half of the run: every agent has
    // connected (the ramp-up is over) and no fault has been injected yet.
    tokio::time::sleep_until((started + quarter).into()).await;
    let lateness_from = sends.counts();
    let steady_from = Snapshot::take(&args, &counters).await?;
    tokio::time::sleep_until((started + half).into()).await;
    let steady_to = Snapshot::take(&args, &counters).await?;
    let lateness_to = sends.counts();
    let connected_before_faults = counters.connected.load(Ordering::Relaxed);
    let window = steady_to
        .at
        .saturating_duration_since(steady_from.at)
        .as_secs_f64()
        .max(1e-9);
    let rate = (steady_to.messages - steady_from.messages) as f64 / window;
    let handling = match (&steady_from.metrics, &steady_to.metrics) {
        (Some(before), Some(after)) => {
            let buckets = histogram_delta(before, after, "orchestrator_heartbeat_handling_seconds");
            json!({
                "heartbeats": buckets.last().map(|(_, count)| *count),
                "p50_s_at_most": quantile_bound(&buckets, 0.5),
                "p99_s_at_most": quantile_bound(&buckets, 0.99),
                "detector_nodes_checked_per_second": counter_delta(before, after, "orchestrator_detector_nodes_checked_total")
                    .map(|checked| (checked / window).round()),
                "scheduling_delay": scheduling_delay(before, after),
            })
        }
        _ => serde_json::Value::Null,
    };
    let (cpu, rss) = match (steady_from.cpu, steady_to.cpu) {
        (Some(before), Some(after)) => (
            Some(after.saturating_sub(before).as_secs_f64() / window),
            steady_to.rss,
        ),
        _ => (None, None),
    };
    let own_cpu = steady_to
        .own_cpu
        .saturating_sub(steady_from.own_cpu)
        .as_secs_f64()
        / window;
    tokio::time::sleep_until((started + Duration::from_secs_f64(args.duration)).into()).await;

    let failures = failures.lock().expect("lock").clone();
    let mut false_failures = 0;
    let mut crash = Vec::new();
    let mut hang = Vec::new();
    // Each false failure, with how long before it its agent sent its two latest
    // heartbeats: if they were further apart than the orchestrator's timeout,
    // the simulator was late; if one fell inside the silence the orchestrator
    // judged, it was held up on its way.
    let mut false_failure_detail = Vec::new();
    for Failure {
        node,
        at,
        reason,
        agent_sent_s_before,
    } in &failures
    {
        let Some(id) = Uuid::parse_str(node).ok() else {
            continue;
        };
        let (Some(fate), Some(i)) = (fates.get(&id), index.get(&id)) else {
            continue;
        };
        let fault_time = faults_from_wall + FAULT_STEP * *i as u32;
        let latency = at.duration_since(fault_time).unwrap_or_default();
        match fate {
            Fate::Healthy => {
                false_failures += 1;
                if false_failure_detail.len() < FALSE_FAILURES_DETAILED {
                    false_failure_detail.push(json!({
                        "node": node,
                        "s_into_run": at.duration_since(started_wall).map(|d| d.as_secs_f64()).ok(),
                        "reason": reason,
                        "agent_sent_s_before": agent_sent_s_before,
                    }));
                }
            }
            Fate::Kill => crash.push(latency),
            Fate::Stall => hang.push(latency),
        }
    }
    let storm = {
        let storm = counters.storm.lock().expect("lock");
        let mut downtimes = storm.downtimes.clone();
        // Wall-clock times let a script line the storm up with the restarted
        // orchestrator's own CPU (scripts/fleet-bench).
        let unix = |at: Instant| {
            let wall = SystemTime::now() - Instant::now().saturating_duration_since(at);
            wall.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
        };
        let (first_loss, last_back) = (storm.first_loss, storm.last_back);
        json!({
            "lost": counters.lost.load(Ordering::Relaxed),
            "back": counters.back.load(Ordering::Relaxed),
            "failed_attempts": counters.failed_reconnects.load(Ordering::Relaxed),
            "all_back_s": match (storm.first_loss, storm.last_back) {
                (Some(first), Some(last)) if counters.back.load(Ordering::Relaxed) == counters.lost.load(Ordering::Relaxed) =>
                    Some(last.saturating_duration_since(first).as_secs_f64()),
                _ => None,
            },
            "per_agent_downtime": spread(&mut downtimes),
            "back_per_second": storm.back_per_second,
            "failures_per_second": storm.failures_per_second,
            "first_loss_unix_s": first_loss.map(unix),
            "last_back_unix_s": last_back.map(unix),
            // The simulator's own share of the machine while the fleet came back.
            "fleetsim_cpu_s": match (first_loss, last_back) {
                (Some(first), Some(last)) => counters.own_cpu_between(first, last).map(|cpu| cpu.as_secs_f64()),
                _ => None,
            },
        })
    };
    // TLS handshakes the orchestrator counted since it (last) started: after a
    // restart, those of the reconnect storm.
    let tls_handshakes = match (&tls, args.orchestrator_http) {
        (Some(_), Some(addr)) => match scrape(addr).await {
            Ok(series) => {
                let count = |result: &str| {
                    let name = format!("orchestrator_tls_handshakes_total{{result=\"{result}\"}}");
                    series
                        .iter()
                        .find(|(key, _)| *key == name)
                        .map(|(_, value)| *value)
                };
                json!({"full": count("full"), "resumed": count("resumed"), "failed": count("failed")})
            }
            Err(_) => serde_json::Value::Null,
        },
        _ => serde_json::Value::Null,
    };
    for task in tasks {
        task.abort();
    }
    let report = json!({
        "agents": args.agents,
        "streams_per_connection": args.streams_per_connection,
        "connections": channels.len(),
        "connected": connected_before_faults,
        "refused": counters.refused.load(Ordering::Relaxed),
        "steady_window_s": window,
        "messages_per_second": rate.round(),
        "fleetsim_cpu_share_of_one_core": own_cpu,
        "false_failures": false_failures,
        "false_failure_detail": false_failure_detail,
        // How late the agents' heartbeat timers fired: in the steady window,
        // and over the whole run (ramp-up and storm included).
        "agent_timer_lateness": {
            "steady": Sends::report(&lateness_from, &lateness_to, None),
            "run": Sends::report(&vec![0; lateness_to.len()], &sends.counts(), Some(sends.max_lateness_s())),
        },
        "crash_detection": latency_summary(&mut crash, args.kill),
        "hang_detection": latency_summary(&mut hang, args.stall),
        "orchestrator_cpu_share_of_one_core": cpu,
        "orchestrator_rss_bytes": rss,
        "orchestrator_rss_bytes_per_agent": rss.map(|rss| rss / args.agents.max(1) as u64),
        "heartbeat_handling": handling,
        "reconnect": storm,
        "tls": match &tls {
            Some(tls) => json!({
                "client_certificates": args.issue_from.is_some(),
                "resumption": tls.resumption,
                "orchestrator_handshakes_since_start": tls_handshakes,
            }),
            None => serde_json::Value::Null,
        },
    });
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn latency_summary(samples: &mut [Duration], injected: usize) -> serde_json::Value {
    let mut summary = spread(samples);
    summary["injected"] = json!(injected);
    summary["detected"] = json!(samples.len());
    summary
}

/// Median, 99th percentile and maximum of `samples`, seconds.
fn spread(samples: &mut [Duration]) -> serde_json::Value {
    if samples.is_empty() {
        return json!({});
    }
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize].as_secs_f64();
    json!({
        "p50_s": at(0.5),
        "p99_s": at(0.99),
        "max_s": samples[samples.len() - 1].as_secs_f64(),
    })
}

/// Faults are injected this far apart.
const FAULT_STEP: Duration = Duration::from_millis(97);
/// Whether a refusal before any Welcome means "never": the orchestrator decided,
/// rather than a connection that broke.
/// What a standby said: the leader's URL (`secbeat-leader`) and when leadership
/// can move at the earliest (`secbeat-retry-after-ms`).
struct Hint {
    leader: Option<String>,
    retry_after: Option<Duration>,
}

fn leader_hint(status: &tonic::Status) -> Option<Hint> {
    let text = |key| status.metadata().get(key).and_then(|value| value.to_str().ok());
    let hint = Hint {
        leader: text("secbeat-leader").map(str::to_owned),
        retry_after: text("secbeat-retry-after-ms")
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis),
    };
    (hint.leader.is_some() || hint.retry_after.is_some()).then_some(hint)
}

fn is_final(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::ResourceExhausted
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::InvalidArgument
    )
}

/// Bound on opening a session (connect, Hello answered, Welcome), as the real
/// agent's `--connect-timeout`.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection a group of virtual agents multiplexes. After a failed session
/// opening the group gets a fresh connection, as a real agent dials anew for each
/// session; a generation number keeps the agents of one group from replacing it
/// once each.
/// One HTTP/2 connection shared by a group of virtual agents, to one of the
/// orchestrators; renewed (to the named leader, or the next orchestrator) when a
/// session on it fails.
struct SharedChannel {
    urls: Vec<String>,
    source: Option<IpAddr>,
    /// TLS for this connection, kept for its life (its session tickets with it).
    tls: Option<Arc<rustls::ClientConfig>>,
    current: std::sync::Mutex<Current>,
}

struct Current {
    /// When a standby last told an agent of this group to come back.
    retry_at: Option<Instant>,
    generation: u64,
    /// Index into `urls`, or the URL a standby named.
    at: Result<usize, String>,
    channel: Channel,
}

impl SharedChannel {
    fn new(
        urls: Vec<String>,
        source: Option<IpAddr>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!urls.is_empty(), "--orchestrator: no URL given");
        let at = rand::random_range(0..urls.len());
        let channel = Self::connect(&urls[at], source, tls.as_ref())?;
        Ok(Self {
            urls,
            source,
            tls,
            current: std::sync::Mutex::new(Current {
                retry_at: None,
                generation: 0,
                at: Ok(at),
                channel,
            }),
        })
    }

    fn connect(
        url: &str,
        source: Option<IpAddr>,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Channel> {
        let Some(config) = tls else {
            return Ok(Endpoint::from_shared(url.to_owned())?
                .local_address(source)
                .tcp_nodelay(true)
                .connect_timeout(OPEN_TIMEOUT)
                .connect_lazy());
        };
        // TLS is the dialer's: tonic sees a plain stream (and an http:// URI).
        let plain = match url.strip_prefix("https://") {
            Some(rest) => format!("http://{rest}"),
            None => anyhow::bail!("{url}: with --ca, orchestrator URLs are https://"),
        };
        let dialer = TlsDialer {
            config: config.clone(),
            source,
        };
        Ok(Endpoint::from_shared(plain)?
            .connect_timeout(OPEN_TIMEOUT)
            .connect_with_connector_lazy(dialer))
    }

    /// A standby told an agent of this group to come back at `at`.
    fn heard_retry_at(&self, at: Instant) {
        let mut current = self.current.lock().expect("lock");
        current.retry_at = Some(current.retry_at.map_or(at, |known| known.max(at)));
    }

    /// The group's last retry time, unless it passed more than two seconds ago.
    fn recent_retry_at(&self) -> Option<Instant> {
        let current = self.current.lock().expect("lock");
        current
            .retry_at
            .filter(|at| Instant::now() < *at + Duration::from_secs(2))
    }

    fn get(&self) -> (u64, Channel) {
        let current = self.current.lock().expect("lock");
        (current.generation, current.channel.clone())
    }

    /// The connection and the orchestrator it dials. An attempt judges its
    /// refusal by the orchestrator it dialed: another agent of the group may
    /// have moved the connection (to a leader a standby named) by the time the
    /// refusal comes back, and a standby's pointer to the old leader is then
    /// not that leader naming itself.
    fn get_dialed(&self) -> (u64, Channel, String) {
        let current = self.current.lock().expect("lock");
        let dialed = match &current.at {
            Ok(index) => self.urls[*index].clone(),
            Err(hinted) => hinted.clone(),
        };
        (current.generation, current.channel.clone(), dialed)
    }

    /// Replaces generation `failed` with a fresh connection: to `leader` when a
    /// standby named it, else to the next orchestrator (a no-op if another agent
    /// of the group already renewed it).
    fn renew(&self, failed: u64, leader: Option<&str>) {
        let mut current = self.current.lock().expect("lock");
        if current.generation != failed {
            return;
        }
        let at = match (leader, &current.at) {
            (Some(leader), _) => match self
                .urls
                .iter()
                .position(|url| url.trim_end_matches('/') == leader.trim_end_matches('/'))
            {
                Some(index) => Ok(index),
                None => Err(leader.to_owned()),
            },
            (None, Ok(index)) => Ok((index + 1) % self.urls.len()),
            // The named leader failed: back to the list.
            (None, Err(_)) => Ok(0),
        };
        let url = match &at {
            Ok(index) => self.urls[*index].clone(),
            Err(url) => url.clone(),
        };
        if let Ok(channel) = Self::connect(&url, self.source, self.tls.as_ref()) {
            current.generation = failed + 1;
            current.at = at;
            current.channel = channel;
        }
    }
}

struct VirtualAgent {
    id: Uuid,
    /// This agent's place in `sends`.
    index: usize,
    sends: Arc<Sends>,
    fate: Fate,
    /// When a faulty agent's fault strikes.
    fault_at: Instant,
    cpu: f64,
    /// Always send the sample and the heartbeat apart (an older agent).
    two_messages: bool,
    interval: Option<Duration>,
    /// Reconnect backoff: first and longest delay.
    reconnect: (Duration, Duration),
    counters: Arc<Counters>,
    gate: Arc<Semaphore>,
    /// The gate for reopening a lost session.
    regate: Arc<Semaphore>,
}

/// How one session of a virtual agent ended.
enum SessionEnd {
    /// Not welcomed: the orchestrator answered with this status (and, from a
    /// standby, the leader's URL), or (None) the connection failed or timed out
    /// first; at which stage.
    Refused(Option<tonic::Code>, Option<Hint>, Stage),
    /// Welcomed, then the stream ended under a healthy agent.
    Lost,
    /// The agent's fault was injected: it is gone for good.
    Faulted,
}

/// Where an attempt to open a session stopped.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Before the orchestrator answered the Connect call.
    Open,
    /// Answered, but no Welcome followed.
    Welcome,
}

/// Why a reconnect attempt failed, as the storm report counts it. `dialed`
/// says whether a leader hint names the orchestrator just dialed: one elected
/// and still loading the fleet's state (as the real agent tells it).
fn cause(
    code: Option<tonic::Code>,
    hint: Option<&Hint>,
    stage: Stage,
    dialed: impl Fn(&str) -> bool,
) -> &'static str {
    match (code, hint.and_then(|hint| hint.leader.as_deref()), stage) {
        (_, Some(leader), _) if dialed(leader) => "taking_over",
        (_, Some(_), _) => "standby",
        (Some(tonic::Code::Unavailable), None, Stage::Open) => "unreachable",
        (Some(_), None, Stage::Open) => "refused",
        (Some(_), None, Stage::Welcome) => "cut_before_welcome",
        (None, _, Stage::Open) => "open_timeout",
        (None, _, Stage::Welcome) => "no_welcome",
    }
}

impl VirtualAgent {
    /// Runs sessions until a fault takes the agent out; reconnects like the real
    /// agent after a stream it did not end.
    async fn run(self, shared: Arc<SharedChannel>) {
        let mut backoff = Backoff::new(self.reconnect.0, self.reconnect.1, 0.5).expect("valid backoff");
        let mut lost_at: Option<Instant> = None;
        let mut followed = false;
        // When a standby said leadership can move (as the real agent keeps it).
        let mut retry_at: Option<Instant> = None;
        loop {
            let (generation, channel, dialed) = shared.get_dialed();
            let names_dialed = |url: &str| url.trim_end_matches('/') == dialed.trim_end_matches('/');
            let ended = self.session(&channel, &mut lost_at).await;
            if let SessionEnd::Refused(
                _,
                Some(Hint {
                    retry_after: Some(after),
                    ..
                }),
                _,
            ) = &ended
            {
                let at = Instant::now() + *after;
                retry_at = Some(at);
                shared.heard_retry_at(at);
                // As the real agent: a handover is not a failure to back off from.
                backoff.reset();
            }
            if lost_at.is_some()
                && let SessionEnd::Refused(code, hint, stage) = &ended
            {
                self.counters.storm.lock().expect("lock").failed(cause(
                    *code,
                    hint.as_ref(),
                    *stage,
                    names_dialed,
                ));
            }
            if !matches!(
                ended,
                SessionEnd::Refused(_, Some(Hint { leader: Some(_), .. }), _)
            ) {
                followed = false;
            }
            match ended {
                SessionEnd::Faulted => return,
                SessionEnd::Lost => {
                    // The stream broke: the next session opens a fresh connection
                    // (a leader that died leaves a dead one behind).
                    shared.renew(generation, None);
                    backoff.reset();
                    retry_at = None;
                    let now = Instant::now();
                    lost_at = Some(now);
                    self.counters.lost.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .storm
                        .lock()
                        .expect("lock")
                        .first_loss
                        .get_or_insert(now);
                }
                // Refused outright before any Welcome (at max_nodes, or not
                // allowed): final, as for the real agent.
                SessionEnd::Refused(Some(code), _, _) if lost_at.is_none() && is_final(code) => {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // The orchestrator reached names itself (elected, loading the
                // fleet's state): stay, and come back when it said.
                SessionEnd::Refused(
                    _,
                    Some(Hint {
                        leader: Some(leader), ..
                    }),
                    _,
                ) if names_dialed(&leader) => {
                    if lost_at.is_some() {
                        self.counters.failed_reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Anything else (a connection that failed, a Welcome cut off by a
                // restart): try again on a fresh connection, with backoff.
                // A standby named the leader: go there at once (once in a row).
                SessionEnd::Refused(
                    _,
                    Some(Hint {
                        leader: Some(leader), ..
                    }),
                    _,
                ) if !followed => {
                    followed = true;
                    shared.renew(generation, Some(&leader));
                    continue;
                }
                SessionEnd::Refused(..) => {
                    if lost_at.is_some() {
                        self.counters.failed_reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    shared.renew(generation, None);
                }
            }
            let mut delay = backoff.next_delay(&mut rand::rng());
            // As the real agent: a standby's word on when leadership can move
            // replaces the backoff. An agent of this group that was moved along
            // with it (to a named leader that turned out dead) heard no hint
            // itself; it uses the one its group heard, as it would have been told
            // the same.
            if let Some(at) = retry_at.take().or_else(|| shared.recent_retry_at()) {
                let spread = Duration::from_secs_f64(rand::random::<f64>());
                delay = at.saturating_duration_since(Instant::now()) + spread;
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn session(&self, channel: &Channel, lost_at: &mut Option<Instant>) -> SessionEnd {
        let hello = pb::Hello {
            node_id: self.id.to_string(),
            hostname: format!("sim-{}", &self.id.to_string()[..8]),
            ip: String::new(),
            agent_version: "fleetsim".into(),
            ..Default::default()
        };
        let (plan, planned) = oneshot::channel();
        let outbound = Outbound {
            hello: Some(message(Kind::Hello(hello))),
            planned: Some(planned),
            beating: None,
            queued: None,
            control: Arc::default(),
            sends: self.sends.clone(),
            counters: self.counters.clone(),
            index: self.index,
            cpu: self.cpu,
        };
        // However the session ends, its outbound stream ends with it.
        let control = EndOnDrop(outbound.control.clone());
        // The ramp-up gate is waited for outside the bound: at fleet scale agents
        // queue for it, which is the simulator's pacing, not the orchestrator's.
        let response = {
            let gate = if lost_at.is_some() {
                &self.regate
            } else {
                &self.gate
            };
            let _permit = gate.acquire().await.expect("never closed");
            let client = AgentServiceClient::new(channel.clone());
            tokio::time::timeout(OPEN_TIMEOUT, async move {
                let mut client = client;
                client.connect(outbound).await
            })
            .await
        };
        let response = match response {
            Ok(Ok(response)) => response,
            Ok(Err(status)) => {
                return SessionEnd::Refused(Some(status.code()), leader_hint(&status), Stage::Open);
            }
            Err(_) => return SessionEnd::Refused(None, None, Stage::Open),
        };
        let mut inbound = response.into_inner();
        let welcome = match tokio::time::timeout(OPEN_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::ControlMessage {
                kind: Some(control_message::Kind::Welcome(welcome)),
            }))) => welcome,
            Ok(Err(status)) => {
                return SessionEnd::Refused(Some(status.code()), leader_hint(&status), Stage::Welcome);
            }
            _ => return SessionEnd::Refused(None, None, Stage::Welcome),
        };
        match lost_at.take() {
            None => {
                self.counters.connected.fetch_add(1, Ordering::Relaxed);
            }
            Some(lost) => {
                let now = Instant::now();
                self.counters.back.fetch_add(1, Ordering::Relaxed);
                let mut storm = self.counters.storm.lock().expect("lock");
                storm.downtimes.push(now - lost);
                storm.last_back = Some(storm.last_back.map_or(now, |last| last.max(now)));
                if let Some(first) = storm.first_loss {
                    let second = now.saturating_duration_since(first).as_secs() as usize;
                    if storm.back_per_second.len() <= second {
                        storm.back_per_second.resize(second + 1, 0);
                    }
                    storm.back_per_second[second] += 1;
                }
            }
        }
        let given = welcome
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::from_secs(10));
        let combined = welcome.heartbeat_carries_cpu && !self.two_messages;
        // The outbound stream beats from now on, at the interval given.
        let _ = plan.send(Plan {
            interval: self.interval.unwrap_or(given),
            combined,
        });
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(self.fault_at.into()), if self.fate != Fate::Healthy => match self.fate {
                    // Ending the stream and dropping its response without a
                    // goodbye: to the orchestrator, a crash.
                    Fate::Kill => return SessionEnd::Faulted,
                    // Silent but open: keep the stream, send nothing, read nothing.
                    Fate::Stall => {
                        control.0.stall();
                        let _keep = (control, inbound);
                        std::future::pending::<()>().await;
                        return SessionEnd::Faulted;
                    }
                    Fate::Healthy => unreachable!("guarded"),
                },
                command = inbound.message() => if !matches!(command, Ok(Some(_))) {
                    return SessionEnd::Lost;
                },
            }
        }
    }
}

/// When a session's outbound stream starts beating, from its Welcome.
struct Plan {
    interval: Duration,
    /// Heartbeats carry the CPU sample (one message per beat, not two).
    combined: bool,
}

/// What the agent's task tells its outbound stream.
#[derive(Debug, Default)]
struct Control {
    /// `RUNNING`, `STALLED` or `ENDED`.
    state: std::sync::atomic::AtomicU8,
    waker: futures_util::task::AtomicWaker,
}

const RUNNING: u8 = 0;
const STALLED: u8 = 1;
const ENDED: u8 = 2;

impl Control {
    fn stall(&self) {
        self.state.store(STALLED, Ordering::Release);
        self.waker.wake();
    }

    fn end(&self) {
        self.state.store(ENDED, Ordering::Release);
        self.waker.wake();
    }
}

/// Ends the outbound stream when the session is dropped, however it ends.
struct EndOnDrop(Arc<Control>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A session's outbound messages, made where hyper's task for the request body
/// polls them: the Hello at once, then, once the Welcome has set the interval,
/// the beats on the stream's own timer. A beat then costs the simulator one
/// wake-up (that task's timer), where an agent task handing beats over a channel
/// to the body cost three (its timer, the channel, the body); the agent's task
/// only reads the rare commands and injects its fault. What goes on the wire is
/// the same.
struct Outbound {
    hello: Option<pb::AgentMessage>,
    planned: Option<oneshot::Receiver<Plan>>,
    beating: Option<Beating>,
    /// The heartbeat that follows a beat's CpuSamples (an older agent's form).
    queued: Option<pb::AgentMessage>,
    control: Arc<Control>,
    sends: Arc<Sends>,
    counters: Arc<Counters>,
    index: usize,
    cpu: f64,
}

struct Beating {
    ticks: tokio::time::Interval,
    combined: bool,
    sequence: u64,
}

impl futures_util::Stream for Outbound {
    type Item = pb::AgentMessage;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<pb::AgentMessage>> {
        use std::task::Poll;
        let this = self.get_mut();
        this.control.waker.register(cx.waker());
        match this.control.state.load(Ordering::Acquire) {
            RUNNING => {}
            STALLED => {
                // Silent from now on, and no timer left to wake it.
                this.beating = None;
                return Poll::Pending;
            }
            _ended => return Poll::Ready(None),
        }
        if let Some(next) = this.hello.take().or_else(|| this.queued.take()) {
            return Poll::Ready(Some(next));
        }
        if let Some(planned) = &mut this.planned {
            match std::pin::Pin::new(planned).poll(cx) {
                Poll::Pending => return Poll::Pending,
                // The session ended before its Welcome.
                Poll::Ready(Err(_)) => return Poll::Ready(None),
                Poll::Ready(Ok(plan)) => {
                    this.planned = None;
                    let mut ticks = tokio::time::interval(plan.interval);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    this.beating = Some(Beating {
                        ticks,
                        combined: plan.combined,
                        sequence: 0,
                    });
                }
            }
        }
        let Some(beating) = &mut this.beating else {
            return Poll::Pending;
        };
        let due = match beating.ticks.poll_tick(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(due) => due,
        };
        this.sends
            .fired(Instant::now().saturating_duration_since(due.into_std()));
        beating.sequence += 1;
        // Stamped as the real agent stamps its samples.
        let stamp = SystemTime::now();
        let time = Some(secbeat::wire::timestamp_to_proto(stamp));
        let sample = pb::CpuSample {
            time,
            usage: this.cpu,
        };
        let sequence = beating.sequence;
        let first = if beating.combined {
            this.counters.messages.fetch_add(1, Ordering::Relaxed);
            message(Kind::Heartbeat(pb::Heartbeat {
                sequence,
                cpu: Some(sample),
            }))
        } else {
            this.counters.messages.fetch_add(2, Ordering::Relaxed);
            this.queued = Some(message(Kind::Heartbeat(pb::Heartbeat { sequence, cpu: None })));
            message(Kind::CpuSamples(pb::CpuSamples {
                samples: vec![sample],
            }))
        };
        this.sends.sent(this.index, stamp);
        Poll::Ready(Some(first))
    }
}

/// The orchestrator and the simulated fleet at one instant.
struct Snapshot {
    at: Instant,
    messages: u64,
    cpu: Option<Duration>,
    rss: Option<u64>,
    /// The simulator's own CPU time: when it nears the machine's cores, its
    /// agents fall behind their schedule, whatever the orchestrator does.
    own_cpu: Duration,
    metrics: Option<Vec<(String, f64)>>,
}

impl Snapshot {
    async fn take(args: &Args, counters: &Counters) -> anyhow::Result<Self> {
        // A busy orchestrator (100,000 nodes on two shared cores) may drop a
        // scrape. The run goes on; its report then has no heartbeat-handling
        // figures (null), instead of no report at all.
        let metrics = match args.orchestrator_http {
            Some(addr) => match scrape(addr).await {
                Ok(metrics) => Some(metrics),
                Err(error) => {
                    eprintln!(
                        "secbeat-fleetsim: /metrics not read, the report omits heartbeat handling: {error:#}"
                    );
                    None
                }
            },
            None => None,
        };
        Ok(Self {
            at: Instant::now(),
            messages: counters.messages.load(Ordering::Relaxed),
            cpu: args.orchestrator_pid.map(process_cpu_time),
            rss: args.orchestrator_pid.and_then(process_rss),
            own_cpu: process_cpu_time(std::process::id()),
            metrics,
        })
    }
}

/// Records every NodeFailed event; follows the orchestrator across restarts.
async fn watch_failures(
    watch: SharedChannel,
    token: Option<String>,
    sink: Arc<Mutex<Vec<Failure>>>,
    agents: Arc<HashMap<Uuid, usize>>,
    sends: Arc<Sends>,
) {
    // The watch is asked for again whenever it ends (a restart, a failover: the
    // new leader's watch starts where its term starts), following the leader.
    let mut backoff =
        Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 0.5).expect("valid backoff");
    loop {
        let (generation, channel) = watch.get();
        let mut client = FleetServiceClient::new(channel);
        let mut request = tonic::Request::new(pb::WatchEventsRequest::default());
        if let Some(bearer) = token
            .as_ref()
            .and_then(|token| format!("Bearer {token}").parse().ok())
        {
            request.metadata_mut().insert("authorization", bearer);
        }
        match client.watch_events(request).await {
            Ok(response) => {
                let mut events = response.into_inner();
                while let Ok(Some(event)) = events.message().await {
                    backoff.reset();
                    if event.r#type() == FleetEventType::NodeFailed
                        && let Some(time) = event.time
                    {
                        let at =
                            SystemTime::UNIX_EPOCH + Duration::new(time.seconds as u64, time.nanos as u32);
                        let sent = Uuid::parse_str(&event.node_id)
                            .ok()
                            .and_then(|id| agents.get(&id))
                            .map_or([None, None], |index| sends.last_two_sent(*index));
                        let before = |sent: Option<SystemTime>| {
                            sent.map(|sent| match at.duration_since(sent) {
                                Ok(before) => before.as_secs_f64(),
                                Err(after) => -after.duration().as_secs_f64(),
                            })
                        };
                        sink.lock().expect("lock").push(Failure {
                            node: event.node_id,
                            at,
                            reason: event.reason,
                            agent_sent_s_before: sent.map(before),
                        });
                    }
                }
                watch.renew(generation, None);
            }
            Err(status) => {
                let leader = leader_hint(&status).and_then(|hint| hint.leader);
                watch.renew(generation, leader.as_deref());
                if leader.is_some() {
                    continue;
                }
            }
        }
        let delay = backoff.next_delay(&mut rand::rng());
        tokio::time::sleep(delay).await;
    }
}

/// A NODE_FAILED event the watch saw.
#[derive(Debug, Clone)]
struct Failure {
    node: String,
    at: SystemTime,
    reason: String,
    /// How long before `at` the node's agent had handed its latest heartbeat,
    /// and the one before, to its connection, read when the event arrived
    /// (before the agent reconnects and sends again); negative if it sent after
    /// `at`. None: not one of ours, or it had not sent that many.
    agent_sent_s_before: [Option<f64>; 2],
}

/// One scrape of the orchestrator's /metrics, as `(series, value)` pairs.
async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<Vec<(String, f64)>> {
    let response = http_request(addr, "/metrics", &[]).await?;
    anyhow::ensure!(response.status == 200, "GET /metrics: HTTP {}", response.status);
    Ok(response
        .body
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect())
}

fn counter_delta(before: &[(String, f64)], after: &[(String, f64)], name: &str) -> Option<f64> {
    let value = |scrape: &[(String, f64)]| {
        scrape
            .iter()
            .find(|(series, _)| series == name)
            .map(|(_, value)| *value)
    };
    Some(value(after)? - value(before)?)
}

/// A histogram's cumulative buckets `(upper bound, count)` over the time between
/// two scrapes, `+Inf` last.
fn histogram_delta(before: &[(String, f64)], after: &[(String, f64)], name: &str) -> Vec<(f64, f64)> {
    let buckets = |scrape: &[(String, f64)]| -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut buckets: Vec<(f64, f64)> = scrape
            .iter()
            .filter_map(|(series, value)| {
                let bound = series.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound.parse().ok()?
                };
                Some((bound, *value))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    };
    let before = buckets(before);
    buckets(after)
        .into_iter()
        .map(|(bound, count)| {
            let earlier = before.iter().find(|(b, _)| *b == bound).map_or(0.0, |(_, c)| *c);
            (bound, count - earlier)
        })
        .collect()
}

/// The orchestrator's scheduling delay between two scrapes (its runtime's probe,
/// every 0.1 s): how late it ran due tasks, and so how late it read heartbeats.
fn scheduling_delay(before: &[(String, f64)], after: &[(String, f64)]) -> serde_json::Value {
    let buckets = histogram_delta(before, after, "orchestrator_scheduling_delay_seconds");
    let total = buckets.last().map_or(0.0, |(_, count)| *count);
    let within = |bound: f64| {
        buckets
            .iter()
            .find(|(b, _)| *b == bound)
            .map(|(_, count)| total - count)
    };
    json!({
        "probes": total,
        "p50_s_at_most": quantile_bound(&buckets, 0.5),
        "p99_s_at_most": quantile_bound(&buckets, 0.99),
        "over_0_5_s": within(0.5),
        "over_1_s": within(1.0),
    })
}

/// The upper bound of the bucket the `q` quantile falls in: the quantile is at
/// most this.
fn quantile_bound(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map(|(bound, _)| *bound)
        .filter(|bound| bound.is_finite())
}

fn message(kind: Kind) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outbound stream and what its agent's task holds of it.
    fn outbound(cpu: f64) -> (Outbound, oneshot::Sender<Plan>, Arc<Counters>) {
        let (plan, planned) = oneshot::channel();
        let counters = Arc::new(Counters::default());
        let stream = Outbound {
            hello: Some(message(Kind::Hello(pb::Hello::default()))),
            planned: Some(planned),
            beating: None,
            queued: None,
            control: Arc::default(),
            sends: Arc::new(Sends::new(1)),
            counters: counters.clone(),
            index: 0,
            cpu,
        };
        (stream, plan, counters)
    }

    fn kind(message: Option<pb::AgentMessage>) -> Kind {
        message.expect("a message").kind.expect("a kind")
    }

    /// The stream says Hello, waits for the Welcome's plan, then beats on its
    /// own timer; a stall silences it for good and the session's end ends it.
    #[tokio::test(start_paused = true)]
    async fn the_outbound_stream_beats_on_its_own_timer_until_stalled_or_ended() {
        use futures_util::{FutureExt, StreamExt};
        let (mut stream, plan, counters) = outbound(0.25);
        assert!(matches!(kind(stream.next().await), Kind::Hello(_)));
        assert!(
            stream.next().now_or_never().is_none(),
            "nothing before the Welcome"
        );

        plan.send(Plan {
            interval: Duration::from_secs(1),
            combined: true,
        })
        .ok()
        .unwrap();
        let started = tokio::time::Instant::now();
        for sequence in 1..=3 {
            let Kind::Heartbeat(beat) = kind(stream.next().await) else {
                panic!("a heartbeat")
            };
            assert_eq!(beat.sequence, sequence);
            assert_eq!(beat.cpu.unwrap().usage, 0.25, "the sample rides on the heartbeat");
        }
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(2),
            "the first at once, then one a second"
        );
        assert_eq!(counters.messages.load(Ordering::Relaxed), 3);
        assert!(stream.sends.last_two_sent(0)[0].is_some());

        stream.control.stall();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            stream.next().now_or_never().is_none(),
            "stalled: silent, stream open"
        );
        stream.control.end();
        assert!(stream.next().await.is_none(), "ended with its session");
    }

    #[tokio::test(start_paused = true)]
    async fn an_older_agents_beat_is_a_sample_then_a_heartbeat() {
        use futures_util::StreamExt;
        let (mut stream, plan, counters) = outbound(0.5);
        assert!(matches!(kind(stream.next().await), Kind::Hello(_)));
        plan.send(Plan {
            interval: Duration::from_secs(1),
            combined: false,
        })
        .ok()
        .unwrap();
        let Kind::CpuSamples(batch) = kind(stream.next().await) else {
            panic!("the sample first")
        };
        assert_eq!(batch.samples[0].usage, 0.5);
        let Kind::Heartbeat(beat) = kind(stream.next().await) else {
            panic!("then the heartbeat")
        };
        assert_eq!((beat.sequence, beat.cpu), (1, None));
        assert_eq!(counters.messages.load(Ordering::Relaxed), 2);
        // A session that ends before its Welcome ends the stream too.
        let (mut stream, plan, _) = outbound(0.5);
        assert!(matches!(kind(stream.next().await), Kind::Hello(_)));
        drop(plan);
        assert!(stream.next().await.is_none());
    }

    #[test]
    fn sends_say_how_late_timers_fired_and_when_each_agent_last_sent() {
        let sends = Sends::new(3);
        assert_eq!(sends.last_two_sent(0), [None, None], "never sent");
        assert_eq!(sends.last_two_sent(7), [None, None], "not an agent");

        let before = sends.counts();
        sends.fired(Duration::from_millis(2));
        sends.fired(Duration::from_millis(10)); // a bound is inclusive
        sends.fired(Duration::from_millis(700));
        sends.fired(Duration::from_secs(5));
        let report = Sends::report(&before, &sends.counts(), Some(sends.max_lateness_s()));
        assert_eq!(report["heartbeats"]["le_0.01s"], 2);
        assert_eq!(report["heartbeats"]["le_0.1s"], 0);
        assert_eq!(report["heartbeats"]["le_1s"], 1);
        assert_eq!(report["heartbeats"]["gt_3s"], 1);
        assert_eq!(report["max_s"], 5.0);

        // A window counts only what fired in it.
        let from = sends.counts();
        sends.fired(Duration::from_millis(1500));
        let window = Sends::report(&from, &sends.counts(), None);
        assert_eq!(window["heartbeats"]["le_2s"], 1);
        assert_eq!(window["heartbeats"]["le_0.01s"], 0);
        assert!(window["max_s"].is_null());

        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        sends.sent(1, at);
        assert_eq!(sends.last_two_sent(1), [Some(at), None]);
        let later = at + Duration::from_millis(2_500);
        sends.sent(1, later);
        assert_eq!(sends.last_two_sent(1), [Some(later), Some(at)]);
        assert_eq!(sends.last_two_sent(2), [None, None]);
    }

    #[test]
    fn a_failed_attempt_is_counted_by_what_the_orchestrator_said() {
        let dialed = |url: &str| url == "http://b:50051";
        let pointing = |leader: &str| Hint {
            leader: Some(leader.to_owned()),
            retry_after: Some(Duration::from_millis(250)),
        };
        let unavailable = Some(tonic::Code::Unavailable);
        // Named itself: elected and loading the fleet's state.
        let itself = pointing("http://b:50051");
        assert_eq!(
            cause(unavailable, Some(&itself), Stage::Open, dialed),
            "taking_over"
        );
        let other = pointing("http://a:50051");
        assert_eq!(cause(unavailable, Some(&other), Stage::Open, dialed), "standby");
        assert_eq!(cause(unavailable, None, Stage::Open, dialed), "unreachable");
        let denied = Some(tonic::Code::PermissionDenied);
        assert_eq!(cause(denied, None, Stage::Open, dialed), "refused");
        assert_eq!(
            cause(unavailable, None, Stage::Welcome, dialed),
            "cut_before_welcome"
        );
        assert_eq!(cause(None, None, Stage::Open, dialed), "open_timeout");
        assert_eq!(cause(None, None, Stage::Welcome, dialed), "no_welcome");
    }
}
