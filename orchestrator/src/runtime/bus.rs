//! The event bus: one per orchestrator, created by the server and handed to every
//! publisher (the fleet actor, the scaling loop, the webhook sender) and every
//! reader (`WatchEvents`, the HTTP event stream).
//!
//! Publishing numbers an event, keeps it in a bounded ring and broadcasts it, all
//! under one short lock, so the sequence, the ring and the broadcast agree on one
//! order. A reader subscribes with the last sequence it has seen (for example the
//! `sequence` of a `ListNodes` snapshot) and gets every later event from the ring,
//! then the live ones, with nothing missed and nothing twice: the Kubernetes
//! list-then-watch pattern. A sequence that has left the ring (or belongs to
//! another run) is refused, naming the oldest one kept, so the reader relists.
//!
//! Sequences are `epoch << 32 | n`: the epoch is counted up on every start (kept in
//! the store), so a sequence from before a restart is never mistaken for one of
//! this run's.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::broadcast;

use crate::domain::event::FleetEvent;

/// Events a live subscriber may fall behind before it is ended (it can resume
/// from the ring with its last sequence).
pub const LIVE_BUFFER: usize = 1024;

/// The first sequence of a run with this epoch.
pub fn first_sequence(epoch: u64) -> u64 {
    (epoch << 32) | 1
}

/// A cloneable handle to the bus.
#[derive(Debug, Clone)]
pub struct EventBus {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    next: u64,
    ring: VecDeque<FleetEvent>,
    capacity: usize,
    live: Option<broadcast::Sender<FleetEvent>>,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The requested sequence is older than what the ring keeps (or from another run).
    #[error(
        "sequence {requested} is no longer kept (the oldest kept is {oldest_kept}); list again and watch from the list's sequence"
    )]
    Gone {
        /// What was asked for.
        requested: u64,
        /// The oldest sequence still in the ring.
        oldest_kept: u64,
    },
    /// The requested sequence has not happened in this run (it comes from another run).
    #[error(
        "sequence {requested} is ahead of the latest event ({latest}): it is from another orchestrator run; list again"
    )]
    Ahead {
        /// What was asked for.
        requested: u64,
        /// The latest published sequence.
        latest: u64,
    },
    /// The bus is closed: the orchestrator is shutting down.
    #[error("the orchestrator is shutting down")]
    Closed,
}

/// What a subscriber gets: the kept events after its sequence, then live ones.
#[derive(Debug)]
pub struct Subscription {
    /// Kept events after the requested sequence, oldest first.
    pub backlog: Vec<FleetEvent>,
    /// Every event published after the backlog.
    pub live: broadcast::Receiver<FleetEvent>,
}

impl EventBus {
    /// A bus whose first event gets `first_sequence`, keeping the latest
    /// `ring_capacity` events for resuming readers.
    pub fn new(first_sequence: u64, ring_capacity: usize) -> Self {
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        Self {
            state: Arc::new(Mutex::new(State {
                next: first_sequence.max(1),
                ring: VecDeque::with_capacity(ring_capacity.min(4096)),
                capacity: ring_capacity.max(1),
                live: Some(live),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves only a consistent ring behind:
        // every mutation below is a single push/pop.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Numbers `event`, keeps it and broadcasts it; returns its sequence. After
    /// [`EventBus::close`] events are still numbered and kept, but nobody hears them.
    pub fn publish(&self, mut event: FleetEvent) -> u64 {
        let mut state = self.lock();
        let sequence = state.next;
        state.next += 1;
        event.sequence = sequence;
        if state.ring.len() == state.capacity {
            state.ring.pop_front();
        }
        if let Some(live) = &state.live {
            // No subscriber is fine.
            let _ = live.send(event.clone());
        }
        state.ring.push_back(event);
        sequence
    }

    /// The sequence of the latest published event (the first sequence minus one
    /// before any).
    pub fn last_sequence(&self) -> u64 {
        self.lock().next - 1
    }

    /// Events after `since` (None: only events published from now on).
    pub fn subscribe(&self, since: Option<u64>) -> Result<Subscription, SubscribeError> {
        let state = self.lock();
        let live = state.live.as_ref().ok_or(SubscribeError::Closed)?.subscribe();
        let Some(since) = since else {
            return Ok(Subscription {
                backlog: Vec::new(),
                live,
            });
        };
        let latest = state.next - 1;
        if since > latest {
            return Err(SubscribeError::Ahead {
                requested: since,
                latest,
            });
        }
        let oldest_kept = state.ring.front().map_or(state.next, |event| event.sequence);
        if since + 1 < oldest_kept {
            return Err(SubscribeError::Gone {
                requested: since,
                oldest_kept,
            });
        }
        // The ring is in sequence order without gaps: skip straight to `since`.
        let skip = (since + 1 - oldest_kept) as usize;
        let backlog = state.ring.iter().skip(skip).cloned().collect();
        Ok(Subscription { backlog, live })
    }

    /// The kept events `wanted` picks, oldest first (a node's recent history).
    pub fn kept(&self, wanted: impl Fn(&FleetEvent) -> bool) -> Vec<FleetEvent> {
        self.lock()
            .ring
            .iter()
            .filter(|event| wanted(event))
            .cloned()
            .collect()
    }

    /// Ends every subscription (after it has read what was sent) and refuses new
    /// ones: the orchestrator is shutting down.
    pub fn close(&self) {
        self.lock().live = None;
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use proptest::prelude::*;
    use tokio::sync::broadcast::error::TryRecvError;

    use super::*;
    use crate::domain::event::EventKind;

    fn event(n: u32) -> FleetEvent {
        FleetEvent {
            sequence: 0,
            time: SystemTime::UNIX_EPOCH,
            kind: EventKind::ScaleDecided,
            node: None,
            reason: n.to_string(),
            webhook: None,
            decision: None,
            failure_domain: None,
            rebooted: None,
        }
    }

    #[test]
    fn sequences_start_at_the_epoch_and_count_up() {
        let bus = EventBus::new(first_sequence(3), 8);
        assert_eq!(bus.last_sequence(), 3 << 32);
        assert_eq!(bus.publish(event(0)), (3 << 32) + 1);
        assert_eq!(bus.publish(event(1)), (3 << 32) + 2);
        assert_eq!(bus.last_sequence(), (3 << 32) + 2);
    }

    #[test]
    fn a_sequence_out_of_the_ring_or_from_another_run_is_refused_with_the_oldest_kept() {
        let bus = EventBus::new(first_sequence(2), 3);
        let first = first_sequence(2);
        for n in 0..5 {
            bus.publish(event(n));
        }
        // Kept: first+2, first+3, first+4.
        assert_eq!(
            bus.subscribe(Some(first)).unwrap_err(),
            SubscribeError::Gone {
                requested: first,
                oldest_kept: first + 2
            }
        );
        let resumed = bus.subscribe(Some(first + 1)).unwrap();
        assert_eq!(resumed.backlog.len(), 3);
        // A sequence of the previous run is older than anything kept.
        assert!(matches!(
            bus.subscribe(Some(first_sequence(1) + 40)),
            Err(SubscribeError::Gone { .. })
        ));
        // A sequence of a later run (the client talked to another orchestrator).
        assert!(matches!(
            bus.subscribe(Some(first_sequence(3))),
            Err(SubscribeError::Ahead { .. })
        ));
        let message = bus.subscribe(Some(first)).unwrap_err().to_string();
        assert!(message.contains(&(first + 2).to_string()), "{message}");
    }

    #[test]
    fn close_ends_subscribers_after_what_they_were_sent() {
        let bus = EventBus::new(1, 8);
        let mut sub = bus.subscribe(None).unwrap();
        bus.publish(event(0));
        bus.close();
        assert_eq!(sub.live.try_recv().unwrap().reason, "0");
        assert_eq!(sub.live.try_recv().unwrap_err(), TryRecvError::Closed);
        assert_eq!(bus.subscribe(None).unwrap_err(), SubscribeError::Closed);
    }

    /// One step of a run: a publisher publishes, or a client lists (remembering
    /// what it saw and the sequence), or a listed client starts watching, or a
    /// watching client reads what is available.
    #[derive(Debug, Clone)]
    enum Step {
        Publish,
        List(usize),
        Watch(usize),
        Read(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => Just(Step::Publish),
            1 => (0..4usize).prop_map(Step::List),
            1 => (0..4usize).prop_map(Step::Watch),
            2 => (0..4usize).prop_map(Step::Read),
        ]
    }

    #[derive(Debug, Default)]
    struct Client {
        /// What the client knows: the snapshot's events, then what it watched.
        seen: Vec<String>,
        listed_at: Option<u64>,
        watching: Option<broadcast::Receiver<FleetEvent>>,
        relisted: bool,
    }

    proptest! {
        /// A client that lists (the snapshot reflects every event up to the list's
        /// sequence) and then watches from that sequence ends up with exactly the
        /// published events, in order, none missed and none twice, however the
        /// steps interleave; or it is told to relist because the ring moved on.
        #[test]
        fn list_then_watch_misses_nothing_and_sees_nothing_twice(
            capacity in 1usize..12,
            steps in proptest::collection::vec(step(), 1..120),
        ) {
            let bus = EventBus::new(first_sequence(1), capacity);
            let mut published: Vec<String> = Vec::new();
            let mut clients: Vec<Client> = (0..4).map(|_| Client::default()).collect();
            for step in steps {
                match step {
                    Step::Publish => {
                        let n = published.len() as u32;
                        bus.publish(event(n));
                        published.push(n.to_string());
                    }
                    Step::List(c) => {
                        // The snapshot and its sequence, taken together (the fleet
                        // actor answers both from one state).
                        clients[c] = Client {
                            seen: published.clone(),
                            listed_at: Some(bus.last_sequence()),
                            ..Client::default()
                        };
                    }
                    Step::Watch(c) => {
                        let client = &mut clients[c];
                        let (Some(since), None) = (client.listed_at, client.watching.as_ref()) else {
                            continue;
                        };
                        match bus.subscribe(Some(since)) {
                            Ok(sub) => {
                                client.seen.extend(sub.backlog.iter().map(|e| e.reason.clone()));
                                client.watching = Some(sub.live);
                            }
                            Err(SubscribeError::Gone { oldest_kept, .. }) => {
                                prop_assert!(oldest_kept > since + 1);
                                client.relisted = true;
                                client.listed_at = None;
                            }
                            Err(other) => prop_assert!(false, "unexpected {other}"),
                        }
                    }
                    Step::Read(c) => {
                        let client = &mut clients[c];
                        let Some(live) = client.watching.as_mut() else { continue };
                        loop {
                            match live.try_recv() {
                                Ok(event) => client.seen.push(event.reason),
                                Err(TryRecvError::Empty) => break,
                                Err(TryRecvError::Lagged(_)) => {
                                    // Capacity of the live buffer is far above the
                                    // steps here; a lag would be a bug.
                                    prop_assert!(false, "lagged");
                                }
                                Err(TryRecvError::Closed) => prop_assert!(false, "closed"),
                            }
                        }
                    }
                }
            }
            // Drain every watcher; each must now hold exactly what was published.
            for client in &mut clients {
                if let Some(live) = client.watching.as_mut() {
                    while let Ok(event) = live.try_recv() {
                        client.seen.push(event.reason);
                    }
                    prop_assert_eq!(&client.seen, &published);
                }
            }
        }
    }
}
