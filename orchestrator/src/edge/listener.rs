//! Accepting agent connections like a production server: the open-files limit
//! is raised as far as the system allows at start-up (with a warning when it is
//! below what `max_nodes` needs), and when accept fails for lack of descriptors
//! the loop backs off (10 ms doubling to 1 s, counted, logged at most every 10 s)
//! instead of spinning, while existing connections keep being served.

use std::{
    io,
    time::{Duration, Instant},
};

use futures_util::stream::{self, Stream};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::edge::metrics::Metrics;

/// Descriptors kept for everything but agent connections (store, logs, HTTP,
/// webhooks, operators).
const RESERVED_DESCRIPTORS: u64 = 256;

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

struct Acceptor {
    listener: TcpListener,
    metrics: Metrics,
    delay: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
}

const MIN_DELAY: Duration = Duration::from_millis(10);
const MAX_DELAY: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The connections `listener` accepts, with backoff on descriptor exhaustion.
pub fn incoming(listener: TcpListener, metrics: Metrics) -> impl Stream<Item = io::Result<TcpStream>> {
    let acceptor = Acceptor {
        listener,
        metrics,
        delay: MIN_DELAY,
        last_log: None,
        suppressed: 0,
    };
    stream::unfold(acceptor, |mut acceptor| async move {
        loop {
            match acceptor.listener.accept().await {
                Ok((stream, _)) => {
                    acceptor.delay = MIN_DELAY;
                    let _ = stream.set_nodelay(true);
                    return Some((Ok(stream), acceptor));
                }
                Err(error) if is_exhaustion(&error) => {
                    acceptor.metrics.accept_errors.inc();
                    acceptor.log(&error);
                    tokio::time::sleep(acceptor.delay).await;
                    acceptor.delay = (acceptor.delay * 2).min(MAX_DELAY);
                }
                // A connection that died between SYN and accept: not our problem.
                Err(error) => {
                    acceptor.metrics.accept_errors.inc();
                    tracing::debug!(%error, "accept failed for one connection");
                }
            }
        }
    })
}

impl Acceptor {
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
