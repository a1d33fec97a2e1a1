//! `GET /api/v1/events`: the fleet's events as server-sent events, for the console
//! and for `curl -N`.
//!
//! The stream contract is `WatchEvents`' (list, then watch), in SSE's terms: each
//! message's `id:` is the event's sequence, so a client that reconnects with
//! `Last-Event-ID` (browsers' EventSource do by themselves; `?since=` does the same
//! for others) gets every kept event after it, then live ones: nothing lost,
//! nothing twice. One that has fallen out of the kept window (or names another
//! orchestrator run's sequence) gets a single `event: reload` message saying so,
//! and should list again. A client too slow to keep up gets `event: lagged` and the
//! stream ends; it resumes from its last id. `?selector=` keeps only events about
//! matching nodes; `?backlog=N`, without a position, starts with the latest N kept
//! events. A comment every 15 s keeps proxies from closing an idle stream.

use std::{convert::Infallible, time::Duration};

use axum::{
    extract::{Query, State, rejection::QueryRejection},
    http::{HeaderMap, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::{AppState, api::ApiError};
use crate::{domain::selector::Selector, error::Fault, runtime::bus::SubscribeError};

/// Messages buffered for one client before it counts as too slow.
const CLIENT_BUFFER: usize = 256;
/// How often an idle stream carries a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The query of `/api/v1/events`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Resume after this sequence (as `Last-Event-ID`, which wins when both are given).
    since: Option<u64>,
    /// Only events about nodes whose labels match.
    selector: Option<String>,
    /// Without a position to resume from: start with up to this many of the
    /// latest kept events (a console's first view), then live ones.
    backlog: Option<u64>,
}

fn message(event: &crate::domain::event::FleetEvent) -> Event {
    Event::default()
        .id(event.sequence.to_string())
        .event("fleet")
        .data(super::api::event_json(event).to_string())
}

/// `GET /api/v1/events[?since=&selector=]` (and `Last-Event-ID`).
pub async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|rejection| ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text()))?;
    let resume = match headers.get("last-event-id") {
        Some(value) => {
            let text = value.to_str().unwrap_or_default().trim();
            Some(text.parse::<u64>().map_err(|_| {
                secbeat::wire::WireError::new("Last-Event-ID", format!("{text:?} is not an event sequence"))
            })?)
        }
        None => query.since,
    };
    let selector: Selector = query.selector.as_deref().unwrap_or_default().parse().map_err(
        |error: crate::domain::selector::SelectorError| {
            secbeat::wire::WireError::new("selector", error.to_string())
        },
    )?;
    let bus = state.role.leading()?.events.clone();
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(CLIENT_BUFFER);
    let subscribed = match (resume, query.backlog) {
        (None, Some(backlog)) => {
            let wanted = bus.last_sequence().saturating_sub(backlog);
            match bus.subscribe(Some(wanted)) {
                // Fewer kept than asked for: all that is kept.
                Err(SubscribeError::Gone { oldest_kept, .. }) => bus.subscribe(Some(oldest_kept - 1)),
                other => other,
            }
        }
        (resume, _) => bus.subscribe(resume),
    };
    match subscribed {
        Err(refused @ (SubscribeError::Gone { .. } | SubscribeError::Ahead { .. })) => {
            let data = json!({ "error": refused.to_string() }).to_string();
            let _ = tx.try_send(Ok(Event::default().event("reload").data(data)));
        }
        Err(closed @ SubscribeError::Closed) => {
            let status =
                StatusCode::from_u16(closed.code().http()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Err(ApiError::new(status, closed.to_string()));
        }
        Ok(subscription) => {
            let wanted = move |event: &crate::domain::event::FleetEvent| {
                selector.is_empty()
                    || event
                        .node
                        .as_ref()
                        .is_some_and(|node| selector.matches(&node.labels))
            };
            tokio::spawn(async move {
                for event in subscription.backlog.iter().filter(|event| wanted(event)) {
                    if tx.send(Ok(message(event))).await.is_err() {
                        return;
                    }
                }
                let mut live = subscription.live;
                loop {
                    let next = tokio::select! {
                        next = live.recv() => next,
                        () = tx.closed() => return,
                    };
                    match next {
                        Ok(event) if wanted(&event) => {
                            if tx.send(Ok(message(&event))).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            let data = json!({ "missed": missed }).to_string();
                            let _ = tx.send(Ok(Event::default().event("lagged").data(data))).await;
                            return;
                        }
                        // The bus closed: this orchestrator stopped leading or shuts down.
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
        }
    }
    let stream = Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE));
    Ok(stream.into_response())
}
