//! Server-streaming watches over a broadcast channel, with the one contract every
//! watch RPC shares: a bounded per-stream buffer; a subscriber that falls behind
//! the shared buffer is ended with RESOURCE_EXHAUSTED (it can resubscribe), never
//! waited for; UNAVAILABLE when the orchestrator shuts down.

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::debug;

use super::status;

/// Items buffered per stream on top of the shared broadcast buffer.
pub const STREAM_BUFFER: usize = 64;

/// Streams `first` (a backlog, oldest first), then every update `convert` keeps
/// (None skips one).
pub fn forward<T, U>(
    mut updates: broadcast::Receiver<T>,
    first: Vec<U>,
    what: &'static str,
    convert: impl Fn(&T) -> Option<U> + Send + 'static,
) -> ReceiverStream<Result<U, Status>>
where
    T: Clone + Send + 'static,
    U: Send + 'static,
{
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        for item in first {
            if tx.send(Ok(item)).await.is_err() {
                return;
            }
        }
        loop {
            let received = tokio::select! {
                received = updates.recv() => received,
                () = tx.closed() => {
                    debug!("{what} watcher went away");
                    return;
                }
            };
            let item = match received {
                Ok(update) => match convert(&update) {
                    Some(item) => Ok(item),
                    None => continue,
                },
                Err(broadcast::error::RecvError::Lagged(missed)) => Err(Status::resource_exhausted(format!(
                    "subscriber fell {missed} {what} behind; resubscribe{}",
                    if what == "events" {
                        " with since_sequence set to the last sequence received"
                    } else {
                        ""
                    }
                ))),
                Err(broadcast::error::RecvError::Closed) => Err(status::shutting_down()),
            };
            let ends = item.is_err();
            if tx.send(item).await.is_err() {
                debug!("{what} watcher went away");
                return;
            }
            if ends {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
