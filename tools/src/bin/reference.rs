//! `secbeat-reference`: the floor the orchestrator is measured against.
//!
//! A bare tonic `AgentService` on the orchestrator's socket and codec settings
//! (TCP_NODELAY, the listen backlog, HTTP/2 keep-alive pings at a third of the
//! idle timeout, the same message size limit) and its allocator, that welcomes each stream and then
//! records when it last heard from each node: no registry, no detector, no
//! store, no events, no metrics. `scripts/fleet-ratio` runs it and the
//! orchestrator alternately against the same simulated fleet, so the ratio of
//! their CPU and memory comes from one run on one machine.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use secbeat::pb::{
    self, agent_message::Kind, agent_service_server::AgentService, agent_service_server::AgentServiceServer,
    control_message,
};
use tokio::sync::mpsc;
use tokio_stream::{
    StreamExt,
    wrappers::{ReceiverStream, TcpListenerStream},
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// The orchestrator's allocator, so that the ratio compares the two servers'
/// work, not two allocators.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The bare tonic reference server for fleet-scale comparisons.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve AgentService on
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Heartbeat interval given to agents in the Welcome, seconds
    #[arg(long, default_value_t = 1.0)]
    heartbeat_interval: f64,
    /// Largest agent message accepted, bytes (the orchestrator's max_message_bytes)
    #[arg(long, default_value_t = 64 * 1024)]
    max_message_bytes: usize,
    /// Idle timeout, seconds: connections are pinged every third of it (the
    /// orchestrator's connection_idle_timeout)
    #[arg(long, default_value_t = 90.0)]
    connection_idle_timeout: f64,
}

/// Last time each node was heard from: all the state the reference keeps.
#[derive(Debug, Default)]
struct Reference {
    last_seen: Arc<Mutex<HashMap<String, Instant>>>,
    next_session: AtomicU64,
    interval: Duration,
}

#[tonic::async_trait]
impl AgentService for Reference {
    type ConnectStream = ReceiverStream<Result<pb::ControlMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let node = match inbound.message().await? {
            Some(pb::AgentMessage {
                kind: Some(Kind::Hello(hello)),
            }) => hello.node_id,
            _ => return Err(Status::invalid_argument("the first message must be hello")),
        };
        let session = self.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        let (outbound, receiver) = mpsc::channel(4);
        let welcome = pb::Welcome {
            session_id: session,
            heartbeat_interval: Some(self.interval.try_into().expect("a valid interval")),
            node_id: node.clone(),
            heartbeat_carries_cpu: true,
        };
        let _ = outbound.try_send(Ok(pb::ControlMessage {
            kind: Some(control_message::Kind::Welcome(welcome)),
        }));
        self.last_seen
            .lock()
            .expect("lock")
            .insert(node.clone(), Instant::now());
        let last_seen = Arc::clone(&self.last_seen);
        tokio::spawn(async move {
            // Holding the sender keeps the response stream open.
            let _outbound = outbound;
            while let Ok(Some(_)) = inbound.message().await {
                if let Some(seen) = last_seen.lock().expect("lock").get_mut(&node) {
                    *seen = Instant::now();
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

fn main() -> ExitCode {
    let args = match secbeat::process::parse_args::<Args>() {
        Ok(args) => args,
        Err(exit) => return exit,
    };
    let positive = |value: f64| value.is_finite() && value > 0.0;
    if !positive(args.heartbeat_interval) || !positive(args.connection_idle_timeout) {
        eprintln!(
            "secbeat-reference: --heartbeat-interval and --connection-idle-timeout must be positive seconds"
        );
        return ExitCode::from(secbeat::process::EXIT_USAGE);
    }
    let served = secbeat::process::runtime(2).and_then(|runtime| runtime.block_on(serve(args)));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("secbeat-reference: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> std::io::Result<()> {
    // The orchestrator's own listening socket (backlog, address reuse).
    let listener = secbeat::process::listen(args.listen)?;
    let ping = Duration::from_secs_f64(args.connection_idle_timeout / 3.0);
    let reference = Reference {
        interval: Duration::from_secs_f64(args.heartbeat_interval),
        ..Default::default()
    };
    // As the orchestrator's listener does for every accepted connection.
    let incoming = TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    });
    let shutdown = CancellationToken::new();
    tokio::spawn(secbeat::process::cancel_on_signal(shutdown.clone()));
    eprintln!("secbeat-reference listening on {}", args.listen);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(ping))
        .http2_keepalive_timeout(Some(ping))
        .add_service(AgentServiceServer::new(reference).max_decoding_message_size(args.max_message_bytes))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(std::io::Error::other)
}
