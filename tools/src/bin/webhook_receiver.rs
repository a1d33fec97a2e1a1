//! `secbeat-webhook-receiver`: a small provisioning-webhook endpoint for
//! docker-compose and the end-to-end tests.
//!
//! It does what a production receiver must: verifies the Standard-Webhooks
//! signature and the timestamp's freshness, dedupes on `webhook-id` (so a retried
//! delivery is recorded once, also across restarts of the receiver), and appends
//! each accepted event as one JSON line to a file (the seed's `logs/webhook.log`).
//! `--fail-first N` answers 500 to the first N requests, to exercise retries.

use std::{
    collections::HashSet,
    io::{BufRead, Write},
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use secbeat::signing::{self, WebhookSecret};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Receives SecBeat webhooks, verifies and dedupes them, and appends each to a
/// JSON-lines file.
///
/// Answers 2xx for an accepted or duplicate delivery, 400 for a body that is not
/// JSON, 401 for a missing or wrong signature or a stale timestamp.
#[derive(Debug, clap::Parser)]
#[command(name = "secbeat-webhook-receiver", version, verbatim_doc_comment)]
struct Args {
    /// Listen address (port 0 picks a free one; the bound address is logged)
    #[arg(long, env = "SECBEAT_RECEIVER_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// JSON-lines file that accepted webhooks are appended to (directories are created)
    #[arg(long, env = "SECBEAT_RECEIVER_LOG", default_value = "logs/webhook.log")]
    log: PathBuf,
    /// The signing secret shared with the orchestrator (`whsec_<base64>` or raw).
    /// Without it, signatures are not checked (and each line says so)
    #[arg(
        long,
        env = "SECBEAT_WEBHOOK_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    secret: Option<String>,
    /// Reject deliveries whose webhook-timestamp is further than this from now, seconds
    #[arg(long, default_value_t = 300)]
    tolerance: u64,
    /// Answer 500 to the first N requests (to exercise the sender's retries)
    #[arg(long, default_value_t = 0)]
    fail_first: u64,
}

struct Receiver {
    secret: Option<WebhookSecret>,
    tolerance: Duration,
    fail_first: u64,
    state: Mutex<Ledger>,
}

struct Ledger {
    requests: u64,
    seen: HashSet<String>,
    file: std::fs::File,
}

fn main() -> ExitCode {
    let args = match secbeat::process::parse_args::<Args>() {
        Ok(args) => args,
        Err(exit) => return exit,
    };
    secbeat::process::init_logging();
    let secret = match args.secret.as_deref().map(WebhookSecret::parse).transpose() {
        Ok(secret) => secret,
        Err(error) => {
            eprintln!("secbeat-webhook-receiver: --secret: {error}");
            return ExitCode::from(secbeat::process::EXIT_USAGE);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(args, secret)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, secret: Option<WebhookSecret>) -> anyhow::Result<()> {
    if let Some(dir) = args.log.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let seen = read_seen(&args.log)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log)?;
    if secret.is_none() {
        warn!("no secret: signatures are NOT checked");
    }
    let receiver = Arc::new(Receiver {
        secret,
        tolerance: Duration::from_secs(args.tolerance),
        fail_first: args.fail_first,
        state: Mutex::new(Ledger {
            requests: 0,
            seen,
            file,
        }),
    });
    let app = Router::new().fallback(post(receive)).with_state(receiver);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    info!(addr = %listener.local_addr()?, log = %args.log.display(), "webhook receiver listening");
    let shutdown = CancellationToken::new();
    tokio::spawn(secbeat::process::cancel_on_signal(shutdown.clone()));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Ids already recorded in the log, so a restarted receiver still dedupes.
fn read_seen(path: &PathBuf) -> anyhow::Result<HashSet<String>> {
    let Ok(file) = std::fs::File::open(path) else {
        return Ok(HashSet::new());
    };
    let mut seen = HashSet::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        if let Some(id) = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|value| value["webhook_id"].as_str().map(str::to_owned))
        {
            seen.insert(id);
        }
    }
    Ok(seen)
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    };
    let id = header(signing::ID_HEADER).to_owned();
    let timestamp = header(signing::TIMESTAMP_HEADER);
    let mut ledger = receiver.state.lock().expect("ledger lock");
    ledger.requests += 1;
    let request = ledger.requests;
    let answer = |status: StatusCode, why: &str| {
        info!(request, webhook.id = %id, status = status.as_u16(), "{why}");
        (status, format!("{why}\n"))
    };
    if request <= receiver.fail_first {
        return answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "failing on purpose (--fail-first)",
        );
    }
    if id.is_empty() {
        return answer(StatusCode::BAD_REQUEST, "missing webhook-id");
    }
    if let Some(secret) = &receiver.secret {
        let Ok(sent) = timestamp.parse::<u64>() else {
            return answer(StatusCode::UNAUTHORIZED, "missing or malformed webhook-timestamp");
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if now.abs_diff(sent) > receiver.tolerance.as_secs() {
            return answer(
                StatusCode::UNAUTHORIZED,
                "webhook-timestamp outside the tolerance",
            );
        }
        if secret
            .verify(&id, timestamp, &body, header(signing::SIGNATURE_HEADER))
            .is_err()
        {
            return answer(StatusCode::UNAUTHORIZED, "signature does not verify");
        }
    }
    let Ok(payload) = serde_json::from_slice::<Value>(&body) else {
        return answer(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    if ledger.seen.contains(&id) {
        return answer(StatusCode::OK, "duplicate delivery, already recorded");
    }
    let line = json!({
        "webhook_id": id,
        "received_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "webhook_timestamp": timestamp,
        "verified": receiver.secret.is_some(),
        "traceparent": header("traceparent"),
        "payload": payload,
    });
    // One write of the whole line: a reader never sees half a record.
    let written = ledger.file.write_all(format!("{line}\n").as_bytes());
    if let Err(error) = written {
        error!(%error, "cannot append to the log");
        return answer(StatusCode::SERVICE_UNAVAILABLE, "cannot record the event");
    }
    ledger.seen.insert(id.clone());
    let reason = payload["reason"].as_str().unwrap_or("?").to_owned();
    answer(StatusCode::OK, &format!("recorded {reason}"))
}
