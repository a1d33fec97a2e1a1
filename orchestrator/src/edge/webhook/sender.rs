//! The webhook sender: delivers outbox entries, retrying until a 2xx.
//!
//! Each entry gets its own delivery task; at most [`MAX_IN_FLIGHT`] requests are
//! on the wire at once. An attempt carries the entry's stable `webhook-id`, a fresh
//! `webhook-timestamp` and signature (Standard Webhooks), and a W3C `traceparent`
//! in the entry's trace. A failed attempt (connection error, timeout, non-2xx) is
//! retried with capped, jittered exponential backoff; only a 2xx removes the entry
//! from the outbox. An entry older than `max_age` is moved to the dead letters
//! (kept in the store, counted, logged as an error) instead of being retried
//! forever. Delivery runs on its own tasks: a slow or dead receiver never delays
//! failure detection or the agent streams.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rand::SeedableRng;
use secbeat::{
    backoff::Backoff,
    signing::{self, WebhookSecret},
};
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{OutboxEntry, UNEXPECTED_NODE_FAILURE};
use crate::{
    domain::event::{EventKind, FleetEvent, WebhookRef},
    edge::metrics::Metrics,
    edge::store::{
        Write,
        writer::{StoreHealth, StoreWriter},
    },
    runtime::bus::EventBus,
};

/// Requests on the wire at once.
pub const MAX_IN_FLIGHT: usize = 16;

/// How the sender delivers.
#[derive(Debug, Clone)]
pub struct SenderSettings {
    /// Where to POST.
    pub url: String,
    /// The signing secret; unsigned without one.
    pub secret: Option<WebhookSecret>,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Give up (dead-letter) on entries older than this.
    pub max_age: Duration,
}

/// Why the sender could not start.
#[derive(Debug, thiserror::Error)]
#[error("webhook client: {0}")]
pub struct SenderError(String);

struct Delivery {
    settings: SenderSettings,
    client: reqwest::Client,
    in_flight: Semaphore,
    store: StoreWriter,
    metrics: Metrics,
    bus: EventBus,
}

/// A failed attempt: the problem in words, and the status if the receiver answered.
#[derive(Debug)]
struct Failure {
    problem: String,
    http_status: Option<u16>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.problem)
    }
}

/// Where the sender's results go besides the receiver.
#[derive(Debug, Clone)]
pub struct SenderOutputs {
    /// Delivered and dead-lettered entries leave the outbox here.
    pub store: StoreWriter,
    /// Delivery counters and outbox gauges.
    pub metrics: Metrics,
    /// WEBHOOK_DELIVERED / _FAILED / _DEAD_LETTERED events.
    pub bus: EventBus,
    /// Webhooks decided but not yet durable count in the outbox depth too.
    pub store_health: StoreHealth,
}

/// Starts the sender with the entries already in the outbox (`backlog`, oldest
/// first) and those committed later (`committed`). It runs until `shutdown`;
/// undelivered entries stay in the outbox for the next run.
pub fn spawn(
    settings: SenderSettings,
    backlog: Vec<OutboxEntry>,
    committed: mpsc::UnboundedReceiver<OutboxEntry>,
    outputs: SenderOutputs,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, SenderError> {
    let SenderOutputs {
        store,
        metrics,
        bus,
        store_health,
    } = outputs;
    // reqwest is built without a default crypto provider: ring is the one provider
    // in this tree. Installing it twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(settings.timeout)
        // Never follow a redirect: a 301/302/303 would be re-sent as a bodiless GET
        // whose 200 would delete an undelivered entry, and the signature would go to
        // whoever the Location names. A 3xx is a failed attempt (logged with its
        // Location) and retried at the configured URL.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("secbeat-orchestrator/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|error| SenderError(error.to_string()))?;
    Backoff::new(settings.retry_initial, settings.retry_max, 0.5)
        .map_err(|error| SenderError(format!("retry backoff: {error}")))?;
    let delivery = Arc::new(Delivery {
        settings,
        client,
        in_flight: Semaphore::new(MAX_IN_FLIGHT),
        store,
        metrics,
        bus,
    });
    Ok(tokio::spawn(run(
        delivery,
        backlog,
        committed,
        store_health,
        shutdown,
    )))
}

async fn run(
    delivery: Arc<Delivery>,
    backlog: Vec<OutboxEntry>,
    mut committed: mpsc::UnboundedReceiver<OutboxEntry>,
    store_health: StoreHealth,
    shutdown: CancellationToken,
) {
    if !backlog.is_empty() {
        info!(
            entries = backlog.len(),
            "webhook outbox holds undelivered entries from before the restart; delivering them"
        );
    }
    let mut pending: HashMap<String, SystemTime> = HashMap::new();
    let mut tasks = JoinSet::new();
    for entry in backlog {
        start(&delivery, &mut pending, &mut tasks, entry);
    }
    let mut gauges = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            entry = committed.recv() => match entry {
                Some(entry) => start(&delivery, &mut pending, &mut tasks, entry),
                None => break,
            },
            Some(done) = tasks.join_next() => {
                if let Ok(id) = done {
                    pending.remove(&id);
                }
            }
            _ = gauges.tick() => {}
        }
        update_gauges(&delivery.metrics, &pending, store_health.pending_outbox());
    }
    if !pending.is_empty() {
        info!(
            undelivered = pending.len(),
            "webhook sender stopping; undelivered entries stay in the outbox for the next start"
        );
    }
    tasks.shutdown().await;
}

fn start(
    delivery: &Arc<Delivery>,
    pending: &mut HashMap<String, SystemTime>,
    tasks: &mut JoinSet<String>,
    entry: OutboxEntry,
) {
    if pending.insert(entry.id.clone(), entry.created_at).is_some() {
        return;
    }
    tasks.spawn(deliver(delivery.clone(), entry));
}

/// The outbox depth: entries being delivered, plus those decided but still
/// waiting for a failing store to make them durable.
fn update_gauges(metrics: &Metrics, pending: &HashMap<String, SystemTime>, not_yet_durable: usize) {
    metrics
        .webhook_outbox_depth
        .set((pending.len() + not_yet_durable) as i64);
    let now = SystemTime::now();
    let oldest = pending
        .values()
        .map(|created| now.duration_since(*created).unwrap_or_default())
        .max()
        .unwrap_or_default();
    metrics
        .webhook_outbox_oldest_age_seconds
        .set(oldest.as_secs_f64());
}

/// Delivers one entry: attempts until a 2xx or the maximum age. Returns its id.
async fn deliver(delivery: Arc<Delivery>, entry: OutboxEntry) -> String {
    let settings = &delivery.settings;
    let mut backoff =
        Backoff::new(settings.retry_initial, settings.retry_max, 0.5).expect("validated at spawn");
    let mut rng = rand::rngs::SmallRng::from_os_rng();
    let reason = Metrics::reason(&entry.reason);
    let self_healing = entry.reason == UNEXPECTED_NODE_FAILURE;
    for attempt in 1u32.. {
        let span =
            info_span!("webhook_delivery", webhook.id = %entry.id, webhook.reason = %entry.reason, attempt);
        secbeat::telemetry::set_parent(&span, &entry.traceparent);
        let result = {
            let _permit = delivery.in_flight.acquire().await.expect("never closed");
            let traceparent = secbeat::telemetry::traceparent_of(&span).unwrap_or_else(|| {
                // Tracing is off: same trace id on every attempt, a new span id each.
                let trace = secbeat::telemetry::trace_id(&entry.traceparent)
                    .unwrap_or("00000000000000000000000000000001");
                format!("00-{trace}-{:016x}-01", rand::random::<u64>() | 1)
            });
            delivery.attempt(&entry, &traceparent).instrument(span).await
        };
        match result {
            Ok(status) => {
                // Counted before the store write, as dead letters are.
                delivery.metrics.webhooks_sent.get_or_create(&reason).inc();
                if self_healing {
                    delivery.metrics.self_healing_webhooks_sent.inc();
                }
                delivery.store.write(vec![Write::DeleteOutbox(entry.id.clone())]);
                delivery.publish(
                    &entry,
                    EventKind::WebhookDelivered,
                    attempt,
                    Some(status),
                    format!("delivered on attempt {attempt} (HTTP {status})"),
                );
                if self_healing {
                    info!(webhook.id = %entry.id, attempt, status, "Self-healing webhook sent successfully");
                } else if entry.reason == super::PREDICTED_HIGH_FLEET_CPU_LOAD {
                    info!(webhook.id = %entry.id, attempt, status, "Predictive scale-up webhook called successfully");
                } else {
                    info!(webhook.id = %entry.id, webhook.reason = %entry.reason, attempt, status, "webhook delivered");
                }
                return entry.id;
            }
            Err(problem) => {
                delivery.metrics.webhook_errors.get_or_create(&reason).inc();
                if self_healing {
                    delivery.metrics.self_healing_webhook_errors.inc();
                }
                let age = SystemTime::now()
                    .duration_since(entry.created_at)
                    .unwrap_or_default();
                if age >= settings.max_age {
                    // Counted before the store write: whoever sees the store sees the count.
                    delivery.metrics.webhook_dead_letters.inc();
                    delivery.store.write(vec![Write::DeadLetter(entry.id.clone())]);
                    delivery.publish(
                        &entry,
                        EventKind::WebhookDeadLettered,
                        attempt,
                        problem.http_status,
                        format!(
                            "given up after {attempt} attempts and {}s (webhook_max_age): {problem}",
                            age.as_secs()
                        ),
                    );
                    error!(
                        webhook.id = %entry.id, webhook.reason = %entry.reason, attempt, %problem,
                        age_s = age.as_secs(),
                        "webhook given up after webhook_max_age; kept in the store's dead letters"
                    );
                    return entry.id;
                }
                let delay = backoff.next_delay(&mut rng);
                delivery.publish(
                    &entry,
                    EventKind::WebhookFailed,
                    attempt,
                    problem.http_status,
                    format!("{problem}; retry in {} ms", delay.as_millis()),
                );
                // A receiver down for an hour fails every entry dozens of times:
                // attempts 1, 2, 4, 8, ... are warnings, the rest debug lines (the
                // event bus and webhook_errors_total still see every one).
                if attempt.is_power_of_two() {
                    warn!(
                        webhook.id = %entry.id, webhook.reason = %entry.reason, attempt, %problem,
                        retry_in_ms = delay.as_millis() as u64,
                        "webhook delivery failed; will retry (logged again at attempt {})",
                        attempt.saturating_mul(2)
                    );
                } else {
                    debug!(
                        webhook.id = %entry.id, webhook.reason = %entry.reason, attempt, %problem,
                        retry_in_ms = delay.as_millis() as u64,
                        "webhook delivery failed; will retry"
                    );
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
    unreachable!("the attempt loop only ends by returning")
}

impl Delivery {
    fn publish(
        &self,
        entry: &OutboxEntry,
        kind: EventKind,
        attempt: u32,
        http_status: Option<u16>,
        reason: String,
    ) {
        self.bus.publish(FleetEvent {
            webhook: Some(WebhookRef {
                id: entry.id.clone(),
                reason: entry.reason.clone(),
                attempt,
                http_status,
            }),
            ..FleetEvent::new(kind, reason, SystemTime::now())
        });
    }

    /// One POST. Ok with the status on a 2xx; the problem otherwise.
    async fn attempt(&self, entry: &OutboxEntry, traceparent: &str) -> Result<u16, Failure> {
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        let mut request = self
            .client
            .post(&self.settings.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(signing::ID_HEADER, &entry.id)
            .header(signing::TIMESTAMP_HEADER, timestamp.to_string())
            .header("traceparent", traceparent)
            .body(entry.body.clone());
        if let Some(secret) = &self.settings.secret {
            request = request.header(
                signing::SIGNATURE_HEADER,
                secret.sign(&entry.id, timestamp, &entry.body),
            );
        }
        let failed = |problem: String| Failure {
            problem,
            http_status: None,
        };
        match request.send().await {
            Ok(response) if response.status().is_success() => Ok(response.status().as_u16()),
            Ok(response) if response.status().is_redirection() => {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|value| value.to_str().ok())
                    .map(|location| secbeat::wire::escape_controls(location).into_owned())
                    .unwrap_or_else(|| "nowhere".into());
                Err(Failure {
                    problem: format!(
                        "HTTP {}: redirect to {location} not followed (set provisioning_webhook_url to the final URL)",
                        response.status()
                    ),
                    http_status: Some(response.status().as_u16()),
                })
            }
            Ok(response) => Err(Failure {
                problem: format!("HTTP {}", response.status()),
                http_status: Some(response.status().as_u16()),
            }),
            Err(error) if error.is_timeout() => {
                Err(failed(format!("timed out after {:?}", self.settings.timeout)))
            }
            Err(error) if error.is_connect() => {
                Err(failed(format!("cannot connect: {}", root_cause(&error))))
            }
            Err(error) => Err(failed(root_cause(&error))),
        }
    }
}

/// The innermost cause, which is the part that says what went wrong.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    //! The sender against a real HTTP server on loopback.

    use std::sync::Mutex;

    use axum::{Router, extract::State, http::HeaderMap, http::StatusCode, routing::post};

    use super::*;
    use crate::edge::store::{memory::MemoryStore, writer};

    #[derive(Debug, Clone)]
    struct Attempt {
        id: String,
        timestamp: String,
        signature: String,
        traceparent: String,
        body: Vec<u8>,
    }

    /// Answers 500 to the first `fail_first` requests, 200 after; records them all.
    #[derive(Clone)]
    struct Receiver {
        attempts: Arc<Mutex<Vec<Attempt>>>,
        fail_first: usize,
    }

    async fn receive(
        State(receiver): State<Receiver>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> StatusCode {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let mut attempts = receiver.attempts.lock().unwrap();
        attempts.push(Attempt {
            id: header(signing::ID_HEADER),
            timestamp: header(signing::TIMESTAMP_HEADER),
            signature: header(signing::SIGNATURE_HEADER),
            traceparent: header("traceparent"),
            body: body.to_vec(),
        });
        if attempts.len() <= receiver.fail_first {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::NO_CONTENT
        }
    }

    async fn serve(fail_first: usize) -> (String, Arc<Mutex<Vec<Attempt>>>) {
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/provision", post(receive))
            .with_state(Receiver {
                attempts: attempts.clone(),
                fail_first,
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/provision", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, attempts)
    }

    fn settings(url: String, max_age: Duration) -> SenderSettings {
        SenderSettings {
            url,
            secret: Some(WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()),
            timeout: Duration::from_secs(5),
            retry_initial: Duration::from_millis(5),
            retry_max: Duration::from_millis(20),
            max_age,
        }
    }

    fn entry() -> OutboxEntry {
        OutboxEntry {
            id: "msg_test".into(),
            reason: UNEXPECTED_NODE_FAILURE.into(),
            created_at: SystemTime::now(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            body: br#"{"reason":"UNEXPECTED_NODE_FAILURE"}"#.to_vec(),
        }
    }

    struct Running {
        store: MemoryStore,
        metrics: Metrics,
        events: tokio::sync::broadcast::Receiver<FleetEvent>,
        shutdown: CancellationToken,
    }

    impl Running {
        /// The next `n` delivery events, as (kind, attempt, status, webhook id).
        async fn next_events(&mut self, n: usize) -> Vec<(EventKind, u32, Option<u16>, String)> {
            let mut seen = Vec::new();
            while seen.len() < n {
                let event = self.events.recv().await.unwrap();
                let webhook = event.webhook.expect("delivery events name their webhook");
                assert_eq!(webhook.reason, UNEXPECTED_NODE_FAILURE);
                assert!(event.node.is_none());
                seen.push((event.kind, webhook.attempt, webhook.http_status, webhook.id));
            }
            seen
        }
    }

    /// The writer and sender wired as in the server; `entry` goes through the
    /// writer, so it is sent only once it is committed.
    fn run_sender(settings: SenderSettings, entry: OutboxEntry) -> Running {
        let store = MemoryStore::default();
        let (committed_tx, committed) = mpsc::unbounded_channel();
        let (writer, store_health, _thread) = writer::spawn(Box::new(store.clone()), committed_tx);
        let metrics = Metrics::new();
        let shutdown = CancellationToken::new();
        let bus = EventBus::new(1, 64);
        let events = bus.subscribe(None).unwrap().live;
        let outputs = SenderOutputs {
            store: writer.clone(),
            metrics: metrics.clone(),
            bus,
            store_health,
        };
        spawn(settings, Vec::new(), committed, outputs, shutdown.clone()).unwrap();
        writer.write(vec![Write::PutOutbox(entry)]);
        Running {
            store,
            metrics,
            events,
            shutdown,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_attempts_are_retried_with_the_same_id_until_a_2xx_removes_the_entry() {
        let (url, attempts) = serve(3).await;
        let mut running = run_sender(settings(url, Duration::from_secs(3600)), entry());
        // The entry was put before it was sent; the delete follows the 2xx.
        let store = running.store.clone();
        tokio::task::spawn_blocking(move || store.wait_for_deleted("msg_test"))
            .await
            .unwrap();
        assert!(
            running
                .store
                .wait_for(|state| state.outbox.is_empty())
                .outbox
                .is_empty()
        );
        assert_eq!(running.metrics.self_healing_webhooks_sent.get(), 1);

        let attempts = attempts.lock().unwrap().clone();
        assert_eq!(attempts.len(), 4, "three 500s, then delivered once");
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        for attempt in &attempts {
            assert_eq!(attempt.id, "msg_test", "the id is stable across retries");
            assert_eq!(attempt.body, entry().body);
            secret
                .verify(&attempt.id, &attempt.timestamp, &attempt.body, &attempt.signature)
                .expect("every attempt is validly signed");
            let parts: Vec<_> = attempt.traceparent.split('-').collect();
            assert_eq!(parts.len(), 4, "{}", attempt.traceparent);
            assert_eq!(
                (parts[0], parts[1], parts[3]),
                ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
            );
        }
        assert_eq!(running.metrics.self_healing_webhook_errors.get(), 3);
        let id = || "msg_test".to_owned();
        assert_eq!(
            running.next_events(4).await,
            vec![
                (EventKind::WebhookFailed, 1, Some(500), id()),
                (EventKind::WebhookFailed, 2, Some(500), id()),
                (EventKind::WebhookFailed, 3, Some(500), id()),
                (EventKind::WebhookDelivered, 4, Some(204), id()),
            ]
        );
        assert_eq!(
            running
                .metrics
                .webhook_errors
                .get_or_create(&Metrics::reason(UNEXPECTED_NODE_FAILURE))
                .get(),
            3
        );
        running.shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_past_its_maximum_age_becomes_a_dead_letter() {
        let (url, attempts) = serve(usize::MAX).await;
        let mut running = run_sender(settings(url, Duration::ZERO), entry());
        let store = running.store.clone();
        let state = tokio::task::spawn_blocking(move || store.wait_for(|state| state.dead_letters == 1))
            .await
            .unwrap();
        assert!(state.outbox.is_empty());
        assert_eq!(attempts.lock().unwrap().len(), 1);
        assert_eq!(running.metrics.webhook_dead_letters.get(), 1);
        assert_eq!(
            running.next_events(1).await,
            vec![(
                EventKind::WebhookDeadLettered,
                1,
                Some(500),
                "msg_test".to_owned()
            )]
        );
        running.shutdown.cancel();
    }
}
