//! Accepting connections like a production server.
//!
//! - The open-files limit is raised as far as the system allows at start-up (with
//!   a warning when it is below what `max_nodes` needs), and when accept fails for
//!   lack of descriptors the loop backs off (10 ms doubling to 1 s, counted, logged
//!   at most every 10 s) instead of spinning, while existing connections are served.
//! - A connection must send its first bytes (the HTTP/2 preface, or a TLS
//!   ClientHello) within `connection_handshake_timeout`, and one that sends nothing
//!   for `connection_idle_timeout` is closed. Live clients always send: agents
//!   heartbeat, and the gRPC server pings every connection (a ping's answer is
//!   traffic), so only half-open and abandoned sockets are closed.
//! - One source address may hold at most `max_connections_per_source` connections.
//! - The gRPC listener keeps [`RESERVED_DESCRIPTORS`] descriptors free, closing
//!   what it accepts beyond, so `/healthz`, `/readyz` and `/metrics` stay reachable
//!   when agents (or a flood) use up the rest.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures_util::stream::{self, Stream};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::Sleep,
};
use tracing::{debug, info, warn};

use crate::edge::metrics::Metrics;

/// Descriptors kept for everything but agent connections (store, logs, HTTP,
/// webhooks, operators).
pub const RESERVED_DESCRIPTORS: u64 = 256;
/// Bytes a connection must send before its handshake deadline: the HTTP/2
/// client preface is 24 bytes, and a TLS ClientHello is longer.
const FIRST_BYTES: usize = 24;

/// Connections the gRPC listener may hold under an open-files limit: all but
/// [`RESERVED_DESCRIPTORS`] (half, under a small limit), kept for HTTP, the store,
/// logs and webhooks. 0 (no cap) when the limit is unknown.
pub fn agent_descriptors(open_files: u64) -> u64 {
    open_files.saturating_sub(RESERVED_DESCRIPTORS.min(open_files / 2))
}

/// Raises the soft open-files limit to the hard limit; warns if that is below
/// what `max_nodes` agents need. Returns the limit in force.
pub fn raise_open_files_limit(max_nodes: u32) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        info!(
            from = soft,
            to = hard,
            "raised the open-files limit to the hard limit"
        );
        hard
    } else {
        soft
    };
    let needed = u64::from(max_nodes) + RESERVED_DESCRIPTORS;
    if limit < needed {
        warn!(
            limit,
            needed,
            max_nodes,
            "the open-files limit is below what max_nodes agents need: beyond about {} connections accepts will fail (raise the hard limit, e.g. LimitNOFILE in systemd)",
            limit.saturating_sub(RESERVED_DESCRIPTORS)
        );
    }
    limit
}

/// Whether an accept error means "out of descriptors or memory" (back off) rather
/// than a problem with one connection (skip it).
fn is_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == libc_code::EMFILE || code == libc_code::ENFILE || code == libc_code::ENOBUFS || code == libc_code::ENOMEM
    )
}

mod libc_code {
    pub const EMFILE: i32 = nix::errno::Errno::EMFILE as i32;
    pub const ENFILE: i32 = nix::errno::Errno::ENFILE as i32;
    pub const ENOBUFS: i32 = nix::errno::Errno::ENOBUFS as i32;
    pub const ENOMEM: i32 = nix::errno::Errno::ENOMEM as i32;
}

const MIN_DELAY: Duration = Duration::from_millis(10);
const MAX_DELAY: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(10);

/// What a listener holds each connection to.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time to send the first bytes (HTTP/2 preface or TLS ClientHello).
    pub handshake_timeout: Duration,
    /// A connection silent for this long is closed.
    pub idle_timeout: Duration,
    /// Connections one source address may hold.
    pub per_source: u32,
    /// Connections this listener may hold in all (0: no cap of its own).
    pub total: u64,
}

/// Open connections per source address, shared by a listener and its connections.
#[derive(Debug, Default)]
struct Census {
    by_source: HashMap<IpAddr, u32>,
    total: u64,
}

/// A connection's place in the census; given back when the connection closes.
#[derive(Debug)]
struct Slot {
    census: Arc<Mutex<Census>>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut census = self.census.lock().unwrap_or_else(|e| e.into_inner());
        census.total = census.total.saturating_sub(1);
        if let Some(count) = census.by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                census.by_source.remove(&self.source);
            }
        }
    }
}

/// An accepted connection held to its deadlines: its first bytes within the
/// handshake timeout, then never silent for longer than the idle timeout.
#[derive(Debug)]
pub struct Guarded {
    stream: TcpStream,
    deadline: Pin<Box<Sleep>>,
    /// Bytes read so far, up to [`FIRST_BYTES`].
    greeted: usize,
    /// When bytes last arrived (the deadline is moved lazily, when it fires, not
    /// on every read: tens of thousands of reads a second at fleet scale).
    last_read: tokio::time::Instant,
    idle_timeout: Duration,
    _slot: Slot,
}

impl Guarded {
    fn expired(&self, what: &'static str) -> io::Error {
        debug!(peer = ?self.stream.peer_addr().ok(), "{what}: closing the connection");
        io::Error::new(io::ErrorKind::TimedOut, what)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                if read > 0 {
                    self.last_read = tokio::time::Instant::now();
                    if self.greeted < FIRST_BYTES {
                        self.greeted = (self.greeted + read).min(FIRST_BYTES);
                        if self.greeted == FIRST_BYTES {
                            let next = self.last_read + self.idle_timeout;
                            self.deadline.as_mut().reset(next);
                        }
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => loop {
                if self.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if self.greeted < FIRST_BYTES {
                    return Poll::Ready(Err(
                        self.expired("no handshake within connection_handshake_timeout")
                    ));
                }
                let due = self.last_read + self.idle_timeout;
                if due <= tokio::time::Instant::now() {
                    return Poll::Ready(Err(self.expired("silent for connection_idle_timeout")));
                }
                // Bytes came since the deadline was set: move it and wait again.
                self.deadline.as_mut().reset(due);
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// The connections `listener` accepts for the gRPC server, within `limits`.
pub fn incoming(
    listener: TcpListener,
    metrics: Metrics,
    limits: ConnectionLimits,
) -> impl Stream<Item = io::Result<Guarded>> {
    let acceptor = Acceptor::new(listener, metrics, limits);
    stream::unfold(acceptor, |mut acceptor| async move {
        let connection = acceptor.accept().await;
        Some((Ok(connection), acceptor))
    })
}

/// The HTTP listener, held to the same limits, for `axum::serve`.
pub struct HttpListener(Acceptor);

impl HttpListener {
    /// Serves `listener` within `limits`.
    pub fn new(listener: TcpListener, metrics: Metrics, limits: ConnectionLimits) -> Self {
        Self(Acceptor::new(listener, metrics, limits))
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        let connection = self.0.accept().await;
        let peer = connection
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        (connection, peer)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.listener.local_addr()
    }
}

struct Acceptor {
    listener: TcpListener,
    metrics: Metrics,
    limits: ConnectionLimits,
    census: Arc<Mutex<Census>>,
    delay: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl Acceptor {
    fn new(listener: TcpListener, metrics: Metrics, limits: ConnectionLimits) -> Self {
        Self {
            listener,
            metrics,
            limits,
            census: Arc::default(),
            delay: MIN_DELAY,
            last_log: None,
            suppressed: 0,
        }
    }

    /// The next connection within the limits; connections beyond them are closed
    /// at once (counted), and descriptor exhaustion is waited out.
    async fn accept(&mut self) -> Guarded {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) if is_exhaustion(&error) => {
                    self.metrics.accept_errors.inc();
                    self.log(&error);
                    tokio::time::sleep(self.delay).await;
                    self.delay = (self.delay * 2).min(MAX_DELAY);
                    continue;
                }
                // A connection that died between SYN and accept: not our problem.
                Err(error) => {
                    self.metrics.accept_errors.inc();
                    debug!(%error, "accept failed for one connection");
                    continue;
                }
            };
            self.delay = MIN_DELAY;
            let source = peer.ip();
            {
                let mut census = self.census.lock().unwrap_or_else(|e| e.into_inner());
                let from_source = census.by_source.get(&source).copied().unwrap_or(0);
                let refusal = if from_source >= self.limits.per_source {
                    Some("per_source")
                } else if self.limits.total > 0 && census.total >= self.limits.total {
                    Some("descriptors")
                } else {
                    None
                };
                if let Some(reason) = refusal {
                    drop(census);
                    self.metrics.refused_connection(reason);
                    debug!(%peer, reason, "connection refused: over its limit");
                    continue; // dropping the stream closes it
                }
                census.total += 1;
                *census.by_source.entry(source).or_default() += 1;
            }
            let _ = stream.set_nodelay(true);
            return Guarded {
                stream,
                deadline: Box::pin(tokio::time::sleep(self.limits.handshake_timeout)),
                greeted: 0,
                last_read: tokio::time::Instant::now(),
                idle_timeout: self.limits.idle_timeout,
                _slot: Slot {
                    census: Arc::clone(&self.census),
                    source,
                },
            };
        }
    }

    fn log(&mut self, error: &io::Error) {
        let now = Instant::now();
        if self
            .last_log
            .is_some_and(|last| now.duration_since(last) < LOG_EVERY)
        {
            self.suppressed += 1;
            return;
        }
        warn!(
            %error,
            backoff_ms = self.delay.as_millis() as u64,
            suppressed = self.suppressed,
            "cannot accept connections: out of file descriptors; backing off (existing agents are still served)"
        );
        self.last_log = Some(now);
        self.suppressed = 0;
    }
}
