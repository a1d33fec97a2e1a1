//! The fleet actor: one task that owns the [`Registry`], the [`Healer`], the live
//! sessions' signal mailboxes and the event bus, in the style of tokio-console's
//! aggregator.
//!
//! Stream handlers and operator RPCs talk to it through a cloneable [`FleetHandle`]
//! (commands over a bounded channel). It applies each input to the registry, runs
//! the dead-node check on its own timer, and then carries out the registry's
//! effects: it publishes events (logged, then numbered and kept by the [`EventBus`]),
//! signals sessions (Welcome, Terminate, close), hands unexpected failures to the
//! healer, and sends what must survive a restart (changed nodes, heal decisions,
//! webhooks) to the store writer as one batch, so a node's FAILED state and its
//! self-healing webhook are persisted together or not at all, as are a
//! scale-down's terminate and its `LOW_FLEET_CPU_LOAD` webhook. Nothing else mutates
//! fleet state, and nothing here waits for a disk or the network.
//!
//! Heartbeats and CPU samples do not come through the inbox: each session's
//! stream handler leaves them in the session's liveness cell (two atomic stores,
//! no lock), and the registry reads the cell when the node comes due. The
//! actor's channel carries what changes state: connects, closes, goodbyes,
//! terminate acks, drain results and operators' requests.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::Poll,
    time::{Duration, Instant, SystemTime},
};

use futures_util::task::AtomicWaker;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    clock,
    domain::event::{EventKind, FleetEvent},
    domain::healer::{FailedNode, HealRecord, Healer, HealingPolicy},
    domain::node::{
        Automation, FleetStats, NodeId, NodeInfo, NodeSnapshot, NodeState, PersistedNode, ScaleDown,
        SessionId,
    },
    domain::registry::{
        CloseReason, DrainAccepted, DrainError, DrainRequest, DrainThenTerminate, Effect, LifecycleConfig,
        Liveness, Registry, ServiceError, SessionError, TerminateAccepted, TerminateError,
    },
    domain::scaler::Candidate,
    domain::selector::{NodeFilter, Page, Selector},
    edge::metrics::{CauseLabel, Metrics},
    edge::store::{Write, writer::StoreWriter},
    edge::webhook::{self, WebhookEvent},
    runtime::{
        bus::EventBus,
        healing,
        lag::DelayGauge,
        log_budget::{self, Held, LogBudget},
    },
};

/// Capacity of the command channel into the actor.
const COMMAND_BUFFER: usize = 4096;
/// Most commands the actor takes from its inbox per wake-up. Under load (tens of
/// thousands of heartbeats a second) this turns one wake-up, one `select!` and one
/// effects pass per message into one per batch.
const COMMAND_BATCH: usize = 256;

/// What the actor tells one session's stream handler.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionSignal {
    /// Accepted: send Welcome.
    Welcome {
        /// The new session.
        session: SessionId,
        /// Heartbeat interval the agent must use.
        heartbeat_interval: Duration,
    },
    /// Send Terminate.
    Terminate {
        /// Why.
        reason: String,
        /// Graceful-shutdown budget.
        grace_period: Duration,
        /// W3C trace context of the request, if tracing is on.
        traceparent: Option<String>,
    },
    /// Send Drain.
    Drain {
        /// Why.
        reason: String,
        /// The hook's time budget.
        deadline: Duration,
    },
    /// Send Resume.
    Resume {
        /// Why.
        reason: String,
        /// The hook's time budget.
        deadline: Duration,
    },
    /// End the stream for this reason.
    Close(CloseReason),
    /// End the stream: the orchestrator is shutting down.
    ShuttingDown,
}

/// A new session's signal mailbox. Signals are rare (a Welcome, perhaps a
/// Terminate, a close), and every agent has a mailbox for as long as it is
/// connected: a tokio channel (its state plus a first block of 32 slots) cost
/// about 800 bytes per session; this is one allocation of about 100 bytes, plus a
/// few pointers' room once a signal is queued. The stream handler polls it
/// beside its stream on every message, so an empty mailbox answers from one
/// atomic flag, without a lock.
pub fn session_signals() -> (SignalSender, SignalReceiver) {
    let mailbox = Arc::new(Mailbox {
        state: Mutex::new(MailboxState {
            signals: VecDeque::new(),
            sender: true,
            receiver: true,
        }),
        pending: AtomicBool::new(false),
        waker: AtomicWaker::new(),
    });
    (SignalSender(mailbox.clone()), SignalReceiver(mailbox))
}

#[derive(Debug)]
struct Mailbox {
    state: Mutex<MailboxState>,
    /// Set when there is something for the receiver: a signal, or the sender gone.
    pending: AtomicBool,
    /// The receiver's waker.
    waker: AtomicWaker,
}

#[derive(Debug)]
struct MailboxState {
    signals: VecDeque<Box<SessionSignal>>,
    /// Whether the actor still holds the session; once it lets go, the
    /// receiver reads what is queued and then the end.
    sender: bool,
    /// Whether the stream handler still listens.
    receiver: bool,
}

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, MailboxState> {
        // The lock is never held across anything that can panic.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Something is there for the receiver: flag it and wake it.
    fn notify(&self) {
        self.pending.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// The fleet actor's end of a session's signal mailbox (the actor is its one
/// writer).
#[derive(Debug)]
pub struct SignalSender(Arc<Mailbox>);

impl Drop for SignalSender {
    fn drop(&mut self) {
        self.0.lock().sender = false;
        self.0.notify();
    }
}

impl SignalSender {
    /// Sends a signal; gives it back if the session's handler is gone.
    pub fn send(&self, signal: SessionSignal) -> Result<(), SessionSignal> {
        {
            let mut state = self.0.lock();
            if !state.receiver {
                return Err(signal);
            }
            state.signals.push_back(Box::new(signal));
        }
        self.0.notify();
        Ok(())
    }
}

/// The stream handler's end of a session's signal mailbox.
#[derive(Debug)]
pub struct SignalReceiver(Arc<Mailbox>);

impl Drop for SignalReceiver {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.receiver = false;
        state.signals.clear();
    }
}

impl SignalReceiver {
    /// The next signal, or None once the actor dropped the session (the tests'
    /// reader; a session polls [`SignalReceiver::poll_recv`] from its stream).
    #[cfg(test)]
    pub(crate) fn recv(&mut self) -> impl Future<Output = Option<SessionSignal>> + '_ {
        std::future::poll_fn(move |cx| self.poll_recv(cx))
    }

    /// Polls for the next signal (None once the actor dropped the session); when
    /// there is none yet, `cx` is woken when one comes.
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<SessionSignal>> {
        loop {
            if !self.0.pending.load(Ordering::Acquire) {
                self.0.waker.register(cx.waker());
                // A signal that came between the check and the registration.
                if !self.0.pending.load(Ordering::Acquire) {
                    return Poll::Pending;
                }
            }
            match self.try_recv() {
                Ok(signal) => return Poll::Ready(Some(signal)),
                Err(mpsc::error::TryRecvError::Disconnected) => return Poll::Ready(None),
                // The flag was stale (its signal already taken) and is now
                // cleared: look again, registered this time.
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
        }
    }

    /// The next signal if one is waiting.
    pub fn try_recv(&mut self) -> Result<SessionSignal, mpsc::error::TryRecvError> {
        let mut state = self.0.lock();
        let next = state.signals.pop_front();
        let disconnected = !state.sender;
        // Cleared under the lock, so a concurrent send (which sets it after
        // pushing, under the same lock's order) is never lost.
        if state.signals.is_empty() && !disconnected {
            self.0.pending.store(false, Ordering::Release);
        }
        match next {
            Some(signal) => Ok(*signal),
            None if disconnected => Err(mpsc::error::TryRecvError::Disconnected),
            None => Err(mpsc::error::TryRecvError::Empty),
        }
    }
}

/// What a session's stream handler reports to the actor, stamped with the
/// receipt time. Heartbeats and CPU samples are not reports: the handler leaves
/// them in the session's [`Liveness`] cell, which the registry reads.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionReport {
    /// The agent acknowledged a terminate.
    TerminateAck,
    /// The agent said goodbye.
    Goodbye(String),
    /// How the agent's drain hook ended.
    DrainResult {
        /// It succeeded (or there is none).
        success: bool,
        /// What happened, in words.
        detail: String,
    },
    /// How the agent's resume hook ended.
    ResumeResult {
        /// It succeeded (or there is none).
        success: bool,
        /// What happened, in words.
        detail: String,
    },
    /// The stream ended or broke (reason in words), or was ended by a protocol error.
    Closed(String),
}

/// Why a new session was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The orchestrator is shutting down.
    #[error("the orchestrator is shutting down; reconnect with backoff")]
    Stopped,
    /// A node that is not live, with `max_nodes` live nodes already (departed
    /// nodes that are only still listed do not count).
    #[error("the orchestrator is at max_nodes ({0} live nodes); not accepting new nodes")]
    AtCapacity(u32),
}

impl From<FleetStopped> for ConnectError {
    fn from(_: FleetStopped) -> Self {
        ConnectError::Stopped
    }
}

/// The actor has stopped (the orchestrator is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the orchestrator is shutting down; reconnect with backoff")]
pub struct FleetStopped;

enum Command {
    Connect {
        info: NodeInfo,
        signals: SignalSender,
        at: Instant,
        reply: oneshot::Sender<Result<Admitted, ConnectError>>,
    },
    Report {
        node: NodeId,
        session: SessionId,
        report: SessionReport,
        at: Instant,
    },
    Terminate {
        node: NodeId,
        reason: String,
        traceparent: Option<String>,
        reply: oneshot::Sender<Result<TerminateAccepted, TerminateError>>,
    },
    Drain {
        node: NodeId,
        request: DrainRequest,
        reply: oneshot::Sender<Result<DrainAccepted, DrainError>>,
    },
    DrainThenTerminate {
        node: NodeId,
        reason: String,
        request: DrainRequest,
        /// Set for a scale-down: its webhook follows the terminate.
        scale_down: Option<ScaleDown>,
        /// The caller's trace, for the terminate and the webhook.
        traceparent: Option<String>,
        reply: oneshot::Sender<Result<DrainThenTerminate, DrainError>>,
    },
    Resume {
        node: NodeId,
        reason: String,
        reply: oneshot::Sender<Result<NodeSnapshot, ServiceError>>,
    },
    SetMaintenance {
        node: NodeId,
        enabled: bool,
        reason: String,
        reply: oneshot::Sender<Result<(NodeSnapshot, bool), ServiceError>>,
    },
    SetAutomation {
        change: AutomationChange,
        reply: oneshot::Sender<(Automation, u32)>,
    },
    List(NodeFilter, oneshot::Sender<(Vec<NodeSnapshot>, u64)>),
    Page(NodeFilter, Page, oneshot::Sender<(Vec<NodeSnapshot>, usize, u64)>),
    Get(NodeId, oneshot::Sender<Option<NodeSnapshot>>),
    Stats(Selector, oneshot::Sender<FleetStats>),
    ScalingView(oneshot::Sender<(FleetStats, Option<Candidate>)>),
}

/// An operator's change to automation; None keeps the current value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AutomationChange {
    /// Self-healing on or paused.
    pub healing: Option<bool>,
    /// Scaling on or paused.
    pub scaling: Option<bool>,
    /// Why.
    pub reason: String,
}

/// A session the actor accepted.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// Its id, which fences every older session of the node.
    pub session: SessionId,
    /// Where its stream handler leaves heartbeats and CPU samples.
    pub liveness: Liveness,
}

/// A cloneable handle to the fleet actor.
#[derive(Debug, Clone)]
pub struct FleetHandle {
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl FleetHandle {
    /// Registers a validated Hello as a new session; the actor sends the Welcome
    /// (and any pending Terminate) through `signals`.
    pub async fn connect(
        &self,
        info: NodeInfo,
        signals: SignalSender,
        at: Instant,
    ) -> Result<Admitted, ConnectError> {
        self.ask(|reply| Command::Connect {
            info,
            signals,
            at,
            reply,
        })
        .await?
    }

    /// Reports something that happened on a session.
    pub async fn report(
        &self,
        node: NodeId,
        session: SessionId,
        report: SessionReport,
        at: Instant,
    ) -> Result<(), FleetStopped> {
        let command = Command::Report {
            node,
            session,
            report,
            at,
        };
        self.commands.send(command).await.map_err(|_| FleetStopped)
    }

    /// Reports something that happened on a session from where nothing can
    /// wait (a stream's `Drop`): at once if the actor's inbox has room, else
    /// from a task that waits for room, so that the report is never lost to a
    /// full inbox (a thousand streams breaking together). Dropped only when the
    /// actor has stopped, or outside a runtime (at shutdown).
    pub fn report_detached(&self, node: NodeId, session: SessionId, report: SessionReport, at: Instant) {
        let command = Command::Report {
            node,
            session,
            report,
            at,
        };
        match self.commands.try_send(command) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(command)) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let commands = self.commands.clone();
                    runtime.spawn(async move {
                        let _ = commands.send(command).await;
                    });
                }
            }
        }
    }

    /// Marks a node terminating and sends it Terminate.
    pub async fn terminate(
        &self,
        node: NodeId,
        reason: String,
    ) -> Result<Result<TerminateAccepted, TerminateError>, FleetStopped> {
        // The actor runs on its own task: carry the caller's trace context along.
        let traceparent = secbeat::telemetry::current_traceparent();
        self.ask(|reply| Command::Terminate {
            node,
            reason,
            traceparent,
            reply,
        })
        .await
    }

    /// Drains a node: DRAINING, then DRAINED once its agent reports.
    pub async fn drain(
        &self,
        node: NodeId,
        request: DrainRequest,
    ) -> Result<Result<DrainAccepted, DrainError>, FleetStopped> {
        self.ask(|reply| Command::Drain { node, request, reply }).await
    }

    /// Drains a node and terminates it with `reason` once drained (at once if
    /// it is drained already).
    pub async fn drain_then_terminate(
        &self,
        node: NodeId,
        reason: String,
        request: DrainRequest,
    ) -> Result<Result<DrainThenTerminate, DrainError>, FleetStopped> {
        self.ask_drain_then_terminate(node, reason, request, None).await
    }

    /// A scale-down: drains the node, then terminates it with `reason`, and
    /// queues the `LOW_FLEET_CPU_LOAD` webhook when (and only if) that terminate
    /// is sent.
    pub async fn scale_down(
        &self,
        node: NodeId,
        reason: String,
        request: DrainRequest,
        scale_down: ScaleDown,
    ) -> Result<Result<DrainThenTerminate, DrainError>, FleetStopped> {
        self.ask_drain_then_terminate(node, reason, request, Some(scale_down))
            .await
    }

    async fn ask_drain_then_terminate(
        &self,
        node: NodeId,
        reason: String,
        request: DrainRequest,
        scale_down: Option<ScaleDown>,
    ) -> Result<Result<DrainThenTerminate, DrainError>, FleetStopped> {
        // The terminate that follows the drain (and a scale-down's webhook) is
        // part of the caller's trace: an operator's request, a scaling check.
        let traceparent = secbeat::telemetry::current_traceparent();
        self.ask(|reply| Command::DrainThenTerminate {
            node,
            reason,
            request,
            scale_down,
            traceparent,
            reply,
        })
        .await
    }

    /// Returns a draining or drained node to service.
    pub async fn resume(
        &self,
        node: NodeId,
        reason: String,
    ) -> Result<Result<NodeSnapshot, ServiceError>, FleetStopped> {
        self.ask(|reply| Command::Resume { node, reason, reply }).await
    }

    /// Puts a node in maintenance or takes it out; says whether anything changed.
    pub async fn set_maintenance(
        &self,
        node: NodeId,
        enabled: bool,
        reason: String,
    ) -> Result<Result<(NodeSnapshot, bool), ServiceError>, FleetStopped> {
        self.ask(|reply| Command::SetMaintenance {
            node,
            enabled,
            reason,
            reply,
        })
        .await
    }

    /// Pauses or resumes healing and scaling; returns how automation stands
    /// after, and how many failures held while healing was paused were handed
    /// back to the healer.
    pub async fn set_automation(&self, change: AutomationChange) -> Result<(Automation, u32), FleetStopped> {
        self.ask(|reply| Command::SetAutomation { change, reply }).await
    }

    /// Every known node, and the sequence of the last event the list reflects:
    /// watching the bus from that sequence misses no later change.
    pub async fn list(&self) -> Result<(Vec<NodeSnapshot>, u64), FleetStopped> {
        self.list_matching(NodeFilter::default()).await
    }

    /// The nodes `filter` wants, and the sequence of the last event the list
    /// reflects.
    pub async fn list_matching(&self, filter: NodeFilter) -> Result<(Vec<NodeSnapshot>, u64), FleetStopped> {
        self.ask(|reply| Command::List(filter, reply)).await
    }

    /// One node.
    pub async fn get(&self, node: NodeId) -> Result<Option<NodeSnapshot>, FleetStopped> {
        self.ask(|reply| Command::Get(node, reply)).await
    }

    /// One page of the nodes `filter` wants, how many it wants in all, and the
    /// sequence of the last event the page reflects.
    pub async fn page(
        &self,
        filter: NodeFilter,
        page: Page,
    ) -> Result<(Vec<NodeSnapshot>, usize, u64), FleetStopped> {
        self.ask(|reply| Command::Page(filter, page, reply)).await
    }

    /// Fleet-wide figures.
    pub async fn stats(&self) -> Result<FleetStats, FleetStopped> {
        self.stats_matching(Selector::everything()).await
    }

    /// Figures over the nodes `selector` matches.
    pub async fn stats_matching(&self, selector: Selector) -> Result<FleetStats, FleetStopped> {
        self.ask(|reply| Command::Stats(selector, reply)).await
    }

    /// Fleet-wide figures and the least loaded connected node, for a scaling check.
    pub async fn scaling_view(&self) -> Result<(FleetStats, Option<Candidate>), FleetStopped> {
        self.ask(Command::ScalingView).await
    }

    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, FleetStopped> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| FleetStopped)?;
        answer.await.map_err(|_| FleetStopped)
    }
}

/// The actor's settings.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// Lifecycle parameters for the registry and detector.
    pub lifecycle: LifecycleConfig,
    /// Heartbeat interval handed to agents.
    pub heartbeat_interval: Duration,
    /// The self-healing limits.
    pub healing: HealingPolicy,
    /// After a restart, how long restored nodes have to reconnect.
    pub restart_reconnect_grace: Duration,
    /// Known nodes at most; a new node beyond it is refused.
    pub max_nodes: u32,
}

/// What a previous run left in the store.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// Known nodes.
    pub nodes: Vec<PersistedNode>,
    /// The self-healing ledger.
    pub heals: Vec<HealRecord>,
    /// Which automation runs.
    pub automation: Automation,
}

/// Where the actor's results go.
#[derive(Debug, Clone)]
pub struct Outputs {
    /// Durable state.
    pub store: StoreWriter,
    /// Counters.
    pub metrics: Metrics,
    /// Events (node lifecycle and healing decisions).
    pub bus: EventBus,
    /// The runtime's scheduling delay, which the detector allows for.
    pub delay: DelayGauge,
}

/// Starts the fleet actor; it runs until `shutdown` is cancelled, then ends every
/// session with "shutting down" and stops.
pub fn spawn(
    settings: FleetSettings,
    restored: Restored,
    outputs: Outputs,
    shutdown: CancellationToken,
) -> (FleetHandle, tokio::task::JoinHandle<()>) {
    let (commands, inbox) = mpsc::channel(COMMAND_BUFFER);
    let check_every = settings.lifecycle.dead_node_check_interval;
    let actor = FleetActor::new(settings, restored, outputs);
    let task = tokio::spawn(actor.run(inbox, check_every, shutdown));
    (FleetHandle { commands }, task)
}

struct FleetActor {
    registry: Registry,
    healer: Healer,
    /// Whether scaling runs (the scaling loop reads it at each check). Whether
    /// healing runs is the healer's to know (`Healer::is_paused`).
    scaling: bool,
    sessions: HashMap<SessionId, SignalSender>,
    heartbeat_interval: Duration,
    outputs: Outputs,
    /// Trace context of pending terminates, so a re-sent one joins the same trace.
    terminate_traces: HashMap<NodeId, String>,
    max_nodes: u32,
    /// The durable digest of each node as last sent to the store: a node event
    /// that changes nothing a restart needs is not written (etcd is written on
    /// joins and real state changes, never per reconnect or suspicion).
    written: HashMap<NodeId, u64>,
    /// Routine per-node log lines beyond a rate are counted, not written.
    log_budget: LogBudget,
}

impl FleetActor {
    /// The actor with its restored state, not yet running.
    fn new(settings: FleetSettings, restored: Restored, outputs: Outputs) -> Self {
        let now = clock::now();
        let mut registry = Registry::new(settings.lifecycle.clone(), now, SystemTime::now());
        if !restored.nodes.is_empty() {
            let live = restored
                .nodes
                .iter()
                .filter(|node| !node.state.is_final())
                .count();
            info!(
                nodes = restored.nodes.len(),
                awaiting_reconnect = live,
                grace_s = settings.restart_reconnect_grace.as_secs_f64(),
                "restored known nodes from the state store; live ones get a reconnect grace"
            );
        }
        let written = restored
            .nodes
            .iter()
            .map(|node| (node.id, node.durable_digest()))
            .collect();
        if !restored.nodes.is_empty() {
            registry.restore(restored.nodes, now, settings.restart_reconnect_grace);
        }
        let mut healer = Healer::new(settings.healing.clone(), restored.heals);
        if !restored.automation.healing {
            warn!("self-healing is paused (SetAutomation): failures are held until an operator resumes it");
            healer.pause();
        }
        if !restored.automation.scaling {
            warn!("scaling is paused (SetAutomation): checks predict and decide, and act on nothing");
        }
        FleetActor {
            registry,
            healer,
            scaling: restored.automation.scaling,
            sessions: HashMap::new(),
            heartbeat_interval: settings.heartbeat_interval,
            outputs,
            terminate_traces: HashMap::new(),
            max_nodes: settings.max_nodes,
            written,
            log_budget: LogBudget::default(),
        }
    }

    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Command>,
        check_every: Duration,
        shutdown: CancellationToken,
    ) {
        let mut checks = tokio::time::interval(check_every);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(COMMAND_BATCH);
        loop {
            tokio::select! {
                // The check goes before commands: under a flood of heartbeats the
                // inbox is always ready, and detection must not starve. The tick is
                // ready once per interval, so commands cannot starve either.
                biased;
                () = shutdown.cancelled() => break,
                _ = checks.tick() => self.judge(&mut inbox),
                received = inbox.recv_many(&mut batch, COMMAND_BATCH) => {
                    if received == 0 {
                        break;
                    }
                    for command in batch.drain(..) {
                        self.handle(command);
                    }
                }
            }
            self.apply_effects();
        }
        info!(
            sessions = self.sessions.len(),
            "fleet actor stopping: closing agent streams"
        );
        for (_, signals) in self.sessions.drain() {
            let _ = signals.send(SessionSignal::ShuttingDown);
        }
    }

    /// One detector round. It judges only once every command already received is
    /// applied: a suspect node's reconnect waiting in the inbox (behind a reconnect
    /// storm, say) is not a node still away, and judging it so would be a false
    /// failure of our own making. Heartbeats never wait here: they are in the
    /// sessions' liveness cells, which the round reads. The draining is bounded by
    /// the inbox's capacity.
    fn judge(&mut self, inbox: &mut mpsc::Receiver<Command>) {
        for _ in 0..COMMAND_BUFFER {
            let Ok(command) = inbox.try_recv() else { break };
            self.handle(command);
        }
        let now = clock::now();
        let own_delay = self.outputs.delay.current(now);
        let visits = self.registry.check_with_own_delay(now, own_delay);
        self.outputs.metrics.detector_nodes_checked.inc_by(visits as u64);
        if let Some(held) = self.log_budget.roll(now) {
            log_held(&held);
        }
    }

    /// Applies one command.
    fn handle(&mut self, command: Command) {
        match command {
            Command::Connect {
                info,
                signals,
                at,
                reply,
            } => {
                if !self.registry.is_live(info.id) && self.registry.live_count() >= self.max_nodes as usize {
                    warn!(node.id = %info.id, max_nodes = self.max_nodes, "new node refused: the fleet is at max_nodes live nodes");
                    let _ = reply.send(Err(ConnectError::AtCapacity(self.max_nodes)));
                    return;
                }
                let node = info.id;
                let session = self.registry.connect(info, at);
                let liveness = self
                    .registry
                    .liveness(node)
                    .expect("a node just connected has a live session");
                // The Welcome goes first, before any effect (a re-sent Terminate) for it.
                let welcome = SessionSignal::Welcome {
                    session,
                    heartbeat_interval: self.heartbeat_interval,
                };
                if signals.send(welcome).is_ok() {
                    self.sessions.insert(session, signals);
                }
                let _ = reply.send(Ok(Admitted { session, liveness }));
            }
            Command::Report {
                node,
                session,
                report,
                at,
            } => self.handle_report(node, session, report, at),
            Command::Terminate {
                node,
                reason,
                traceparent,
                reply,
            } => {
                if let Some(traceparent) = traceparent {
                    self.terminate_traces.insert(node, traceparent);
                }
                let outcome = self.registry.request_terminate(node, &reason, clock::now());
                let _ = reply.send(outcome);
            }
            Command::Drain { node, request, reply } => {
                let _ = reply.send(self.registry.request_drain(node, request, clock::now()));
            }
            Command::DrainThenTerminate {
                node,
                reason,
                request,
                scale_down,
                traceparent,
                reply,
            } => {
                if let Some(traceparent) = traceparent {
                    self.terminate_traces.insert(node, traceparent);
                }
                let now = clock::now();
                let outcome = match scale_down {
                    Some(scale_down) => self.registry.scale_down(node, &reason, request, scale_down, now),
                    None => self.registry.drain_then_terminate(node, &reason, request, now),
                };
                let _ = reply.send(outcome);
            }
            Command::Resume { node, reason, reply } => {
                let _ = reply.send(self.registry.resume(node, &reason, clock::now()));
            }
            Command::SetMaintenance {
                node,
                enabled,
                reason,
                reply,
            } => {
                let outcome = self
                    .registry
                    .set_maintenance(node, enabled, &reason, clock::now());
                let _ = reply.send(outcome);
            }
            Command::SetAutomation { change, reply } => {
                let resumed = self.set_automation(change);
                let _ = reply.send((self.automation(), resumed));
            }
            Command::List(filter, reply) => {
                // Publish what earlier commands of this batch changed first, so the
                // snapshot reflects exactly the events up to the sequence it names.
                self.apply_effects();
                let sequence = self.outputs.bus.last_sequence();
                let _ = reply.send((self.registry.list_matching(&filter), sequence));
            }
            Command::Page(filter, page, reply) => {
                self.apply_effects();
                let sequence = self.outputs.bus.last_sequence();
                let (nodes, total) = self.registry.page(&filter, page);
                let _ = reply.send((nodes, total, sequence));
            }
            Command::Get(node, reply) => {
                let _ = reply.send(self.registry.snapshot(node));
            }
            Command::Stats(selector, reply) => {
                let _ = reply.send(self.stats(&selector));
            }
            Command::ScalingView(reply) => {
                let stats = self.stats(&Selector::everything());
                let _ = reply.send((stats, self.registry.least_loaded()));
            }
        }
    }

    /// Which automation runs now.
    fn automation(&self) -> Automation {
        Automation {
            healing: !self.healer.is_paused(),
            scaling: self.scaling,
        }
    }

    /// The registry's figures, with what the actor itself knows: automation and
    /// how healing stands in each failure domain.
    fn stats(&self, selector: &Selector) -> FleetStats {
        let mut stats = self.registry.stats_matching(selector);
        stats.automation = self.automation();
        let now = SystemTime::now();
        for (name, domain) in &mut stats.domains {
            domain.healing = self.healer.domain(name, now);
        }
        stats
    }

    /// Applies an operator's automation change: persisted, evented, and on a
    /// healing resume, the failures held meanwhile that are still FAILED go to
    /// the healer (returns how many).
    fn set_automation(&mut self, change: AutomationChange) -> u32 {
        let before = self.automation();
        let after = Automation {
            healing: change.healing.unwrap_or(before.healing),
            scaling: change.scaling.unwrap_or(before.scaling),
        };
        if after == before {
            return 0;
        }
        self.scaling = after.scaling;
        let mut writes = vec![Write::PutAutomation(after)];
        let now = SystemTime::now();
        let mut resumed = 0;
        for (what, was, is) in [
            ("healing", before.healing, after.healing),
            ("scaling", before.scaling, after.scaling),
        ] {
            if was == is {
                continue;
            }
            let verb = if is { "resumed" } else { "paused" };
            warn!(automation = what, reason = %change.reason, "{what} {verb} by an operator");
            self.publish(FleetEvent::new(
                EventKind::AutomationChanged,
                format!("{what} {verb}: {}", change.reason),
                now,
            ));
        }
        if !before.healing && after.healing {
            let held: Vec<_> = self
                .healer
                .resume()
                .into_iter()
                .filter(|node| {
                    self.registry
                        .snapshot(node.id)
                        .is_some_and(|snapshot| snapshot.state == NodeState::Failed)
                })
                .collect();
            resumed = u32::try_from(held.len()).unwrap_or(u32::MAX);
            if !held.is_empty() {
                info!(
                    failures = held.len(),
                    "healing resumed: failures held while paused are decided now"
                );
                self.heal(held, &mut writes);
            }
        } else if before.healing && !after.healing {
            self.healer.pause();
        }
        self.outputs.store.write(writes);
        resumed
    }

    fn handle_report(&mut self, node: NodeId, session: SessionId, report: SessionReport, at: Instant) {
        let outcome = match &report {
            SessionReport::TerminateAck => self.registry.terminate_ack(node, session, at),
            SessionReport::Goodbye(reason) => self.registry.goodbye(node, session, reason, at),
            SessionReport::DrainResult { success, detail } => {
                self.registry.drain_result(node, session, *success, detail, at)
            }
            SessionReport::ResumeResult { success, detail } => {
                self.registry.resume_result(node, session, *success, detail, at)
            }
            SessionReport::Closed(cause) => {
                self.sessions.remove(&session);
                self.registry.stream_closed(node, session, cause, at);
                Ok(())
            }
        };
        match outcome {
            Ok(()) => {}
            // A fenced or closed session's last messages can still be in flight.
            Err(SessionError::Stale | SessionError::UnknownNode) => {
                debug!(node.id = %node, session = %session, ?report, "message from a session that is no longer live");
            }
            Err(error @ SessionError::NoTerminatePending) => {
                warn!(node.id = %node, session = %session, %error, "terminate ack ignored");
            }
            Err(error @ SessionError::NoDrainPending) => {
                info!(node.id = %node, session = %session, %error, "late drain result ignored");
            }
        }
    }

    fn apply_effects(&mut self) {
        let effects = self.registry.take_effects();
        if effects.is_empty() {
            return;
        }
        let mut changed = BTreeSet::new();
        let mut failed = Vec::new();
        let mut scaled_down = Vec::new();
        for effect in effects {
            match effect {
                Effect::Publish(event) => {
                    let Some(node) = &event.node else {
                        self.publish(event);
                        continue;
                    };
                    changed.insert(node.id);
                    // No terminate (still) to come: its trace is done with.
                    let no_terminate = matches!(
                        event.kind,
                        EventKind::TerminateCancelled | EventKind::DrainFailed | EventKind::NodeResumed
                    );
                    if node.state.is_final() || no_terminate {
                        self.terminate_traces.remove(&node.id);
                    }
                    match event.kind {
                        EventKind::NodeFailed => {
                            self.outputs.metrics.unexpected_node_failures.inc();
                            if let Some(node) = self.registry.failed_node(node.id) {
                                failed.push(node);
                            }
                        }
                        EventKind::NodeTerminated => {
                            self.outputs.metrics.nodes_gracefully_terminated.inc();
                        }
                        EventKind::SessionFenced => {
                            self.outputs.metrics.sessions_fenced.inc();
                        }
                        _ => {}
                    }
                    self.publish(event);
                }
                Effect::SendTerminate {
                    node,
                    session,
                    reason,
                    grace_period,
                } => {
                    info!(node.id = %node, session = %session, %reason, grace_s = grace_period.as_secs_f64(), "sending terminate");
                    let traceparent = self.terminate_traces.get(&node).cloned();
                    self.signal(
                        session,
                        SessionSignal::Terminate {
                            reason,
                            grace_period,
                            traceparent,
                        },
                    );
                }
                Effect::SendDrain {
                    node,
                    session,
                    reason,
                    deadline,
                } => {
                    info!(node.id = %node, session = %session, %reason, deadline_s = deadline.as_secs_f64(), "sending drain");
                    self.signal(session, SessionSignal::Drain { reason, deadline });
                }
                Effect::SendResume {
                    node,
                    session,
                    reason,
                    deadline,
                } => {
                    info!(node.id = %node, session = %session, %reason, "sending resume");
                    self.signal(session, SessionSignal::Resume { reason, deadline });
                }
                Effect::ScaledDown { node, ip, scale_down } => {
                    changed.insert(node);
                    scaled_down.push(Candidate {
                        id: node,
                        ip,
                        cpu: scale_down.cpu,
                    });
                }
                Effect::DetectorStalled { gap } => warn!(
                    gap_s = gap.as_secs_f64(),
                    "dead-node check ran late: the orchestrator itself stalled, so nobody was judged this round and live nodes get a fresh heartbeat window"
                ),
                Effect::CloseSession {
                    node,
                    session,
                    reason,
                } => {
                    debug!(node.id = %node, session = %session, ?reason, "closing session");
                    self.signal(session, SessionSignal::Close(reason));
                    self.sessions.remove(&session);
                }
            }
        }
        let mut writes: Vec<Write> = changed
            .into_iter()
            .filter_map(|id| match self.registry.persisted(id) {
                Some(node) => {
                    let digest = node.durable_digest();
                    (self.written.insert(id, digest) != Some(digest)).then_some(Write::PutNode(node))
                }
                None => {
                    self.written.remove(&id);
                    Some(Write::DeleteNode(id))
                }
            })
            .collect();
        if !failed.is_empty() {
            self.heal(failed, &mut writes);
        }
        if !scaled_down.is_empty() {
            let stats = self.registry.stats();
            for node in scaled_down {
                let mut entry = webhook::outbox_entry(
                    &WebhookEvent::ScaleDown { node: node.clone() },
                    &stats,
                    SystemTime::now(),
                );
                if let Some(traceparent) = self.terminate_traces.get(&node.id) {
                    entry.traceparent = traceparent.clone();
                }
                info!(node.id = %node.id, node.ip = %node.ip, webhook.id = %entry.id, "scale-down: drained node told to terminate; LOW_FLEET_CPU_LOAD webhook queued");
                writes.push(Write::PutOutbox(entry));
            }
        }
        self.outputs.store.write(writes);
    }

    /// Hands failures declared together to the healer (through the pure
    /// [`healing::on_failures`]) and applies what it says. Runs in a
    /// `failure_detection` span, the root of each self-healing trace.
    fn heal(&mut self, failed: Vec<FailedNode>, writes: &mut Vec<Write>) {
        let span =
            tracing::info_span!("failure_detection", node.id = %span_ids(&failed), failed = failed.len());
        let _entered = span.enter();
        let stats = self.registry.stats();
        let live = self.registry.mass_failure_population();
        let outcome = healing::on_failures(&mut self.healer, failed, &live, &stats, SystemTime::now());
        let metrics = &self.outputs.metrics;
        for cause in outcome.held {
            metrics
                .self_healing_held
                .get_or_create(&CauseLabel {
                    cause: cause.to_owned(),
                })
                .inc();
        }
        metrics.mass_failure_alerts.inc_by(u64::from(outcome.mass_alerts));
        for event in outcome.events {
            self.publish(event);
        }
        writes.extend(outcome.writes);
    }

    fn signal(&mut self, session: SessionId, signal: SessionSignal) {
        let Some(signals) = self.sessions.get(&session) else {
            return;
        };
        if signals.send(signal).is_err() {
            // The handler is gone; its Closed report is on the way.
            self.sessions.remove(&session);
        }
    }

    fn publish(&mut self, event: FleetEvent) {
        match routine_line(event.kind) {
            Some(line) => {
                let (admitted, held) = self.log_budget.admit(line, clock::now());
                if let Some(held) = held {
                    log_held(&held);
                }
                if admitted {
                    log_event(&event);
                }
            }
            None => log_event(&event),
        }
        self.outputs.bus.publish(event);
    }
}

/// What a routine node event's log line says (see [`LogBudget`]); None for the
/// events that are always written line by line.
fn routine_line(kind: EventKind) -> Option<&'static str> {
    match kind {
        EventKind::NodeJoined => Some("node joined"),
        EventKind::NodeReconnected => Some("node reconnected"),
        EventKind::NodeSuspected => Some(SUSPECTED_LINE),
        EventKind::NodeRecovered => Some("suspect node recovered"),
        _ => None,
    }
}

/// A suspicion's line, which makes a count that holds any a WARN.
const SUSPECTED_LINE: &str = "node suspected";

/// Says how many routine lines a second held, at WARN if suspicions were among
/// them.
fn log_held(held: &Held) {
    let counts = held
        .counts
        .iter()
        .map(|(line, count)| format!("{line}: {count}"))
        .collect::<Vec<_>>()
        .join(", ");
    let (total, over_s) = (held.total(), held.over.as_secs_f64());
    let message = format!(
        "{total} more routine node events than the {} a second logged one by one ({counts}); every event is in the event stream",
        log_budget::ROUTINE_LINES_PER_SECOND
    );
    if held.counts.contains_key(SUSPECTED_LINE) {
        warn!(held = total, over_s, %counts, "{message}");
    } else {
        info!(held = total, over_s, %counts, "{message}");
    }
}

/// Most node ids a `failure_detection` span names: every log line inside the span
/// repeats its fields, so a round of 50,000 failures naming them all would write
/// gigabytes (each line its own node id anyway).
const SPAN_IDS: usize = 8;

/// The ids a `failure_detection` span names: all of a small round, the first few
/// and a count of a large one.
fn span_ids(failed: &[FailedNode]) -> String {
    let mut ids: Vec<String> = failed
        .iter()
        .take(SPAN_IDS)
        .map(|node| node.id.to_string())
        .collect();
    if failed.len() > SPAN_IDS {
        ids.push(format!("(+{} more)", failed.len() - SPAN_IDS));
    }
    ids.join(",")
}

/// Logs a node event; the operator-facing lines keep the seed's wording.
fn log_event(event: &FleetEvent) {
    let Some(node) = &event.node else {
        return;
    };
    let (id, ip, reason) = (&node.id, &node.ip, &event.reason);
    match event.kind {
        EventKind::NodeFailed => error!(
            node.id = %id, node.ip = %ip, %reason,
            "CRITICAL UNEXPECTED NODE FAILURE DETECTED for Node {id} at IP {ip}. Initiating self-healing."
        ),
        EventKind::NodeTerminated => info!(
            node.id = %id, node.ip = %ip, %reason,
            "Node gracefully terminated as commanded - expected shutdown"
        ),
        EventKind::NodeJoined => {
            info!(node.id = %id, node.ip = %ip, hostname = %node.hostname, "node joined")
        }
        EventKind::NodeReconnected => info!(node.id = %id, node.ip = %ip, %reason, "node reconnected"),
        EventKind::NodeSuspected => warn!(node.id = %id, node.ip = %ip, %reason, "node suspected"),
        EventKind::NodeRecovered => info!(node.id = %id, node.ip = %ip, "suspect node recovered"),
        EventKind::TerminateRequested => info!(node.id = %id, node.ip = %ip, %reason, "terminate requested"),
        EventKind::TerminateAcknowledged => info!(node.id = %id, "terminate acknowledged"),
        EventKind::TerminateCancelled => warn!(node.id = %id, node.ip = %ip, %reason, "terminate cancelled"),
        EventKind::NodeLeft => info!(node.id = %id, node.ip = %ip, %reason, "node left on its own"),
        EventKind::SessionFenced => warn!(node.id = %id, %reason, "older session fenced"),
        EventKind::DrainRequested => info!(node.id = %id, node.ip = %ip, %reason, "drain requested"),
        EventKind::NodeDrained => {
            info!(node.id = %id, node.ip = %ip, %reason, "node drained: out of service")
        }
        EventKind::DrainFailed => {
            warn!(node.id = %id, node.ip = %ip, %reason, "drain failed: the node stays in service")
        }
        EventKind::NodeResumed => {
            info!(node.id = %id, node.ip = %ip, %reason, "node resumed: back in service")
        }
        EventKind::ResumeFailed => {
            warn!(node.id = %id, node.ip = %ip, %reason, "resume failed: the node is out of service")
        }
        EventKind::MaintenanceStarted => info!(node.id = %id, node.ip = %ip, %reason, "maintenance started"),
        EventKind::MaintenanceEnded => info!(node.id = %id, node.ip = %ip, %reason, "maintenance ended"),
        EventKind::NodeForgotten => debug!(node.id = %id, %reason, "node forgotten"),
        // The healer's own log lines say more; the others are not node events.
        EventKind::SelfHealingRequested
        | EventKind::SelfHealingHeld
        | EventKind::ScaleDecided
        | EventKind::WebhookDelivered
        | EventKind::WebhookFailed
        | EventKind::WebhookDeadLettered
        | EventKind::LeaderElected
        | EventKind::LeaderLost
        | EventKind::MassNodeFailure
        | EventKind::AutomationChanged => {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The actor on paused tokio time: its own timer drives detection, in virtual
    //! seconds that take microseconds.

    use std::net::{IpAddr, Ipv4Addr};

    use uuid::Uuid;

    use super::*;
    use crate::{domain::node::NodeState, edge::store::memory::MemoryStore};

    pub(crate) fn settings() -> FleetSettings {
        FleetSettings {
            lifecycle: LifecycleConfig {
                heartbeat_timeout: Duration::from_secs(3),
                dead_node_check_interval: Duration::from_secs(1),
                required_consecutive_failures: 2,
                termination_deadline: Duration::from_secs(5),
                termination_grace_period: Duration::from_secs(2),
                node_retention: Duration::from_secs(3600),
                disruption: Default::default(),
            },
            heartbeat_interval: Duration::from_secs(1),
            healing: HealingPolicy {
                max_per_hour: 5,
                cooldown: Duration::from_secs(900),
                mass_failure_fraction: 0.5,
                mass_failure_window: Duration::from_secs(60),
                mass_failure_min_nodes: 3,
            },
            restart_reconnect_grace: Duration::from_secs(10),
            max_nodes: 10_000,
        }
    }

    /// A running actor whose durable writes land in a [`MemoryStore`].
    pub(crate) struct TestFleet {
        pub(crate) handle: FleetHandle,
        pub(crate) actor: tokio::task::JoinHandle<()>,
        pub(crate) store: MemoryStore,
        pub(crate) metrics: Metrics,
        pub(crate) bus: EventBus,
    }

    pub(crate) fn start(
        settings: FleetSettings,
        restored: Restored,
        shutdown: &CancellationToken,
    ) -> TestFleet {
        start_running_late(settings, restored, shutdown, DelayGauge::default())
    }

    /// [`start`] on a runtime whose scheduling delay `delay` reports.
    fn start_running_late(
        settings: FleetSettings,
        restored: Restored,
        shutdown: &CancellationToken,
        delay: DelayGauge,
    ) -> TestFleet {
        let store = MemoryStore::default();
        let (committed, _) = mpsc::unbounded_channel();
        let (writer, _health, _thread) =
            crate::edge::store::writer::spawn(Box::new(store.clone()), committed);
        let metrics = Metrics::new();
        let bus = EventBus::new(crate::runtime::bus::first_sequence(1), 1024);
        let outputs = Outputs {
            store: writer,
            metrics: metrics.clone(),
            bus: bus.clone(),
            delay,
        };
        let (handle, actor) = spawn(settings, restored, outputs, shutdown.clone());
        TestFleet {
            handle,
            actor,
            store,
            metrics,
            bus,
        }
    }

    pub(crate) fn info(node: NodeId) -> NodeInfo {
        NodeInfo {
            id: node,
            hostname: "edge".into(),
            ip: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            agent_version: "test".into(),
            labels: Default::default(),
            host: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_mailbox_delivers_in_order_wakes_its_reader_and_ends_after_its_sender() {
        let (tx, mut rx) = session_signals();
        // A reader waiting before anything is sent is woken by the send.
        let reader = tokio::spawn(async move {
            let first = rx.recv().await;
            (first, rx)
        });
        tokio::task::yield_now().await;
        tx.send(SessionSignal::ShuttingDown).unwrap();
        let (first, mut rx) = reader.await.unwrap();
        assert_eq!(first, Some(SessionSignal::ShuttingDown));

        let close = SessionSignal::Close(CloseReason::DeclaredFailed);
        tx.send(close.clone()).unwrap();
        tx.send(SessionSignal::ShuttingDown).unwrap();
        assert_eq!(rx.try_recv(), Ok(close));
        assert_eq!(rx.try_recv(), Ok(SessionSignal::ShuttingDown));
        assert_eq!(
            rx.try_recv(),
            Err(mpsc::error::TryRecvError::Empty),
            "the sender is still there"
        );
        // What was queued is still read after the sender is gone; then None.
        tx.send(SessionSignal::ShuttingDown).unwrap();
        drop(tx);
        assert_eq!(rx.try_recv(), Ok(SessionSignal::ShuttingDown));
        assert_eq!(rx.recv().await, None);
    }

    /// Sends racing the reader on two threads: every signal arrives, in order,
    /// and the end is seen; a lost wake-up would hang the reader (bounded here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mailbox_loses_no_wake_up_under_concurrent_sends() {
        const SIGNALS: usize = 20_000;
        let (tx, mut rx) = session_signals();
        tokio::spawn(async move {
            for n in 0..SIGNALS {
                let signal = SessionSignal::Drain {
                    reason: n.to_string(),
                    deadline: Duration::ZERO,
                };
                tx.send(signal).unwrap();
                if n % 3 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        let reading = async move {
            let mut next = 0;
            while let Some(signal) = rx.recv().await {
                let SessionSignal::Drain { reason, .. } = signal else {
                    panic!("{signal:?}")
                };
                assert_eq!(reason, next.to_string());
                next += 1;
            }
            next
        };
        let read = tokio::time::timeout(Duration::from_secs(60), reading)
            .await
            .expect("the reader was woken for every signal and for the end");
        assert_eq!(read, SIGNALS);
    }

    #[tokio::test]
    async fn a_signal_to_a_session_whose_handler_is_gone_comes_back() {
        let (tx, rx) = session_signals();
        drop(rx);
        assert_eq!(
            tx.send(SessionSignal::ShuttingDown),
            Err(SessionSignal::ShuttingDown)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn welcome_first_then_a_silent_node_is_failed_by_the_actors_timer() {
        let shutdown = CancellationToken::new();
        let TestFleet {
            handle: fleet,
            actor,
            bus,
            ..
        } = start(settings(), Restored::default(), &shutdown);
        let mut events = bus.subscribe(None).unwrap().live;
        let (tx, mut signals) = session_signals();
        let node = NodeId(Uuid::new_v4());
        let started = tokio::time::Instant::now();
        let session = fleet.connect(info(node), tx, clock::now()).await.unwrap().session;
        let welcome = SessionSignal::Welcome {
            session,
            heartbeat_interval: Duration::from_secs(1),
        };
        assert_eq!(signals.recv().await, Some(welcome));
        let joined = events.recv().await.unwrap();
        assert_eq!(joined.kind, EventKind::NodeJoined);

        let suspected = events.recv().await.unwrap();
        assert_eq!(suspected.kind, EventKind::NodeSuspected);
        let failed = events.recv().await.unwrap();
        assert_eq!(
            (failed.kind, failed.node_id(), failed.sequence),
            (EventKind::NodeFailed, Some(node), joined.sequence + 2)
        );
        let elapsed = started.elapsed();
        // Silent for more than 3s, then one more check: at 4s and 5s on a 1s timer.
        assert!(
            elapsed > Duration::from_secs(3) && elapsed <= Duration::from_secs(5),
            "{elapsed:?}"
        );
        assert_eq!(
            signals.recv().await,
            Some(SessionSignal::Close(CloseReason::DeclaredFailed))
        );

        shutdown.cancel();
        actor.await.unwrap();
    }

    /// A suspect node's reconnect received before a check but still in the inbox
    /// when the check's tick fires (the actor was busy, e.g. with a reconnect
    /// storm) is applied before the node is judged: no failure of a node that
    /// came back. A node that did not come back is judged in the same round.
    #[tokio::test(start_paused = true)]
    async fn a_reconnect_waiting_in_the_inbox_is_applied_before_judging() {
        let metrics = Metrics::new();
        let bus = EventBus::new(crate::runtime::bus::first_sequence(1), 1024);
        let (committed, _) = mpsc::unbounded_channel();
        let (writer, _health, _thread) =
            crate::edge::store::writer::spawn(Box::new(MemoryStore::default()), committed);
        let outputs = Outputs {
            store: writer,
            metrics,
            bus: bus.clone(),
            delay: DelayGauge::default(),
        };
        let mut actor = FleetActor::new(settings(), Restored::default(), outputs);
        let mut events = bus.subscribe(None).unwrap().live;
        let (commands, mut inbox) = mpsc::channel(COMMAND_BUFFER);
        let mut receivers = Vec::new();
        let connect = |actor: &mut FleetActor, node: NodeId, receivers: &mut Vec<SignalReceiver>| {
            let (reply, admitted) = oneshot::channel();
            let (signals, receiver) = session_signals();
            actor.handle(Command::Connect {
                info: info(node),
                signals,
                at: clock::now(),
                reply,
            });
            receivers.push(receiver);
            admitted
        };
        let (back, away) = (NodeId(Uuid::new_v4()), NodeId(Uuid::new_v4()));
        for node in [back, away] {
            let session = connect(&mut actor, node, &mut receivers)
                .await
                .unwrap()
                .unwrap()
                .session;
            actor.handle(Command::Report {
                node,
                session,
                report: SessionReport::Closed("stream broke".into()),
                at: clock::now(),
            });
        }
        // Both streams broke: SUSPECT. The first check counts one suspect check.
        tokio::time::advance(Duration::from_millis(1000)).await;
        actor.judge(&mut inbox);
        // `back` reconnects; its Connect is still queued when the second check
        // (the one that would declare it FAILED) fires.
        let (reply, _admitted) = oneshot::channel();
        let (signals, _receiver) = session_signals();
        commands
            .try_send(Command::Connect {
                info: info(back),
                signals,
                at: clock::now(),
                reply,
            })
            .unwrap();
        tokio::time::advance(Duration::from_millis(1000)).await;
        actor.judge(&mut inbox);
        actor.apply_effects();
        let mut failed = Vec::new();
        while let Ok(event) = events.try_recv() {
            if event.kind == EventKind::NodeFailed {
                failed.extend(event.node_id());
            }
        }
        assert_eq!(failed, [away], "only the node that did not come back is failed");
    }

    /// Beats left in a session's liveness cell, never sent to the actor, are what
    /// the detector reads: a node silent on the actor's channel but beating in its
    /// cell stays CONNECTED; one whose cell goes quiet is judged.
    #[tokio::test(start_paused = true)]
    async fn beats_in_the_liveness_cell_keep_a_node_alive_and_their_end_is_judged() {
        let shutdown = CancellationToken::new();
        let TestFleet {
            handle: fleet,
            actor,
            bus,
            ..
        } = start(settings(), Restored::default(), &shutdown);
        let mut events = bus.subscribe(None).unwrap().live;
        let (tx, _signals) = session_signals();
        let node = NodeId(Uuid::new_v4());
        let admitted = fleet.connect(info(node), tx, clock::now()).await.unwrap();
        assert_eq!(events.recv().await.unwrap().kind, EventKind::NodeJoined);
        let beats = keep_beating(admitted.liveness.clone());
        let quiet = tokio::time::timeout(Duration::from_secs(60), events.recv()).await;
        assert!(quiet.is_err(), "a beating node produced an event: {quiet:?}");
        let snapshot = fleet.get(node).await.unwrap().unwrap();
        assert_eq!(snapshot.state, NodeState::Connected);
        assert_eq!(
            snapshot.last_cpu_usage,
            Some(0.5),
            "the cell's CPU value is listed"
        );

        beats.abort();
        let stopped = tokio::time::Instant::now();
        assert_eq!(events.recv().await.unwrap().kind, EventKind::NodeSuspected);
        assert_eq!(events.recv().await.unwrap().kind, EventKind::NodeFailed);
        // Last beat up to 0.5 s before the stop; judged after 3 s of silence
        // and two checks on a 1 s timer.
        let elapsed = stopped.elapsed();
        assert!(
            elapsed > Duration::from_millis(2500) && elapsed <= Duration::from_secs(5),
            "{elapsed:?}"
        );
        shutdown.cancel();
        actor.await.unwrap();
    }

    /// The actor hands its runtime's delay to each check: a silent node on an
    /// orchestrator running 2 s late is suspected 2 s later, and says why.
    #[tokio::test(start_paused = true)]
    async fn a_check_allows_for_the_delay_the_runtime_reports() {
        for (delay, suspected_after) in [(0, 4), (2, 6)] {
            let shutdown = CancellationToken::new();
            let TestFleet {
                handle: fleet, bus, ..
            } = start_running_late(
                settings(),
                Restored::default(),
                &shutdown,
                DelayGauge::fixed(Duration::from_secs(delay)),
            );
            let mut events = bus.subscribe(None).unwrap().live;
            let (tx, _signals) = session_signals();
            let started = tokio::time::Instant::now();
            fleet
                .connect(info(NodeId(Uuid::new_v4())), tx, clock::now())
                .await
                .unwrap();
            assert_eq!(events.recv().await.unwrap().kind, EventKind::NodeJoined);
            let suspected = events.recv().await.unwrap();
            assert_eq!(suspected.kind, EventKind::NodeSuspected);
            // Checks run every second; silence must exceed 3 s plus the delay.
            assert_eq!(
                started.elapsed(),
                Duration::from_secs(suspected_after),
                "delay {delay} s"
            );
            assert_eq!(
                suspected.reason.contains("for the orchestrator's own delay"),
                delay > 0,
                "{}",
                suspected.reason
            );
            shutdown.cancel();
        }
    }

    /// A suspect node whose cell shows a beat again recovers at the next check.
    #[tokio::test(start_paused = true)]
    async fn a_suspect_node_beating_again_in_its_cell_recovers_at_the_next_check() {
        let shutdown = CancellationToken::new();
        let mut settings = settings();
        settings.lifecycle.required_consecutive_failures = 5;
        let TestFleet {
            handle: fleet,
            actor,
            bus,
            ..
        } = start(settings, Restored::default(), &shutdown);
        let mut events = bus.subscribe(None).unwrap().live;
        let (tx, _signals) = session_signals();
        let node = NodeId(Uuid::new_v4());
        let admitted = fleet.connect(info(node), tx, clock::now()).await.unwrap();
        assert_eq!(events.recv().await.unwrap().kind, EventKind::NodeJoined);
        assert_eq!(events.recv().await.unwrap().kind, EventKind::NodeSuspected);
        let spoke = tokio::time::Instant::now();
        admitted.liveness.beat(clock::now(), Some(0.1));
        let recovered = events.recv().await.unwrap();
        assert_eq!(recovered.kind, EventKind::NodeRecovered);
        assert!(
            spoke.elapsed() <= Duration::from_secs(1),
            "within one check interval"
        );
        assert_eq!(
            fleet.get(node).await.unwrap().unwrap().state,
            NodeState::Connected
        );
        shutdown.cancel();
        actor.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_pending_terminate_follows_the_welcome_on_the_new_session() {
        let shutdown = CancellationToken::new();
        let TestFleet {
            handle: fleet,
            actor: _actor,
            ..
        } = start(settings(), Restored::default(), &shutdown);
        let node = NodeId(Uuid::new_v4());
        let (tx1, mut first) = session_signals();
        let s1 = fleet
            .connect(info(node), tx1, clock::now())
            .await
            .unwrap()
            .session;
        fleet.terminate(node, "drain".into()).await.unwrap().unwrap();
        first.recv().await.unwrap(); // welcome
        assert!(matches!(
            first.recv().await,
            Some(SessionSignal::Terminate { .. })
        ));
        fleet
            .report(node, s1, SessionReport::Closed("blip".into()), clock::now())
            .await
            .unwrap();

        let (tx2, mut second) = session_signals();
        let s2 = fleet
            .connect(info(node), tx2, clock::now())
            .await
            .unwrap()
            .session;
        assert!(matches!(second.recv().await, Some(SessionSignal::Welcome { session, .. }) if session == s2));
        let resent = second.recv().await;
        assert!(
            matches!(resent, Some(SessionSignal::Terminate { ref reason, .. }) if reason == "drain"),
            "{resent:?}"
        );
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_every_session() {
        let shutdown = CancellationToken::new();
        let TestFleet {
            handle: fleet, actor, ..
        } = start(settings(), Restored::default(), &shutdown);
        let (tx, mut signals) = session_signals();
        fleet
            .connect(info(NodeId(Uuid::new_v4())), tx, clock::now())
            .await
            .unwrap();
        signals.recv().await.unwrap();
        shutdown.cancel();
        actor.await.unwrap();
        assert_eq!(signals.recv().await, Some(SessionSignal::ShuttingDown));
        assert_eq!(fleet.stats().await, Err(FleetStopped));
    }

    #[tokio::test(start_paused = true)]
    async fn only_live_nodes_count_against_max_nodes() {
        let shutdown = CancellationToken::new();
        let mut capped = settings();
        capped.max_nodes = 2;
        let TestFleet { handle: fleet, .. } = start(capped, Restored::default(), &shutdown);
        let connect = |node: NodeId| {
            let fleet = fleet.clone();
            async move {
                let (tx, signals) = session_signals();
                fleet
                    .connect(info(node), tx, clock::now())
                    .await
                    .map(|admitted| (admitted.session, signals))
            }
        };
        let [gone, stays, replacement, one_too_many] =
            [1u8, 2, 3, 4].map(|n| NodeId(Uuid::from_bytes([n; 16])));
        let (session, _gone_signals) = connect(gone).await.unwrap();
        let _stays = connect(stays).await.unwrap();
        assert_eq!(
            connect(replacement).await.err(),
            Some(ConnectError::AtCapacity(2)),
            "two live nodes: full"
        );
        // One leaves: it is still listed (LEFT) but no longer holds a slot.
        fleet
            .report(
                gone,
                session,
                SessionReport::Goodbye("shutdown".into()),
                clock::now(),
            )
            .await
            .unwrap();
        fleet
            .report(gone, session, SessionReport::Closed("ended".into()), clock::now())
            .await
            .unwrap();
        let _replacement = connect(replacement)
            .await
            .expect("a departed node frees its slot");
        assert_eq!(
            fleet.list().await.unwrap().0.len(),
            3,
            "the departed node is still listed"
        );
        assert_eq!(
            connect(one_too_many).await.err(),
            Some(ConnectError::AtCapacity(2))
        );
        // A live node reconnecting is never refused.
        assert!(connect(stays).await.is_ok());
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_list_names_the_sequence_of_the_last_event_it_reflects() {
        let shutdown = CancellationToken::new();
        let TestFleet {
            handle: fleet, bus, ..
        } = start(settings(), Restored::default(), &shutdown);
        let (before, empty) = fleet.list().await.unwrap();
        assert!(before.is_empty());
        assert_eq!(empty, bus.last_sequence());
        let node = NodeId(Uuid::new_v4());
        let (tx, _signals) = session_signals();
        fleet.connect(info(node), tx, clock::now()).await.unwrap();
        let (nodes, sequence) = fleet.list().await.unwrap();
        assert_eq!(nodes.len(), 1);
        // The join is reflected and numbered; watching from here starts after it.
        assert_eq!(sequence, empty + 1);
        let resumed = bus.subscribe(Some(empty)).unwrap();
        assert_eq!(resumed.backlog.len(), 1);
        assert_eq!(resumed.backlog[0].kind, EventKind::NodeJoined);
        assert!(bus.subscribe(Some(sequence)).unwrap().backlog.is_empty());
        shutdown.cancel();
    }

    fn restored_node(n: u8, state: NodeState, terminating: bool) -> PersistedNode {
        PersistedNode {
            id: NodeId(Uuid::from_bytes([n; 16])),
            hostname: format!("edge-{n}"),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)),
            agent_version: "test".into(),
            labels: Default::default(),
            state,
            state_reason: String::new(),
            termination: terminating.then(|| crate::domain::node::PersistedTermination {
                reason: "scale down".into(),
                acknowledged: true,
            }),
            drain: None,
            maintenance: None,
            boot_id: None,
        }
    }

    /// Beats every 500 ms (virtual) into a session's liveness cell, as its stream
    /// handler would, until aborted.
    fn keep_beating(liveness: Liveness) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(500));
            loop {
                ticks.tick().await;
                liveness.beat(clock::now(), Some(0.5));
            }
        })
    }

    fn body(entry: &crate::edge::webhook::OutboxEntry) -> serde_json::Value {
        serde_json::from_slice(&entry.body).unwrap()
    }

    async fn next_of(
        events: &mut tokio::sync::broadcast::Receiver<FleetEvent>,
        kind: EventKind,
    ) -> FleetEvent {
        loop {
            let event = events.recv().await.unwrap();
            if event.kind == kind {
                return event;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_node_and_its_self_healing_webhook_are_persisted_together() {
        let shutdown = CancellationToken::new();
        let test = start(settings(), Restored::default(), &shutdown);
        let mut events = test.bus.subscribe(None).unwrap().live;
        let (tx, _signals) = session_signals();
        let node = NodeId(Uuid::new_v4());
        test.handle.connect(info(node), tx, clock::now()).await.unwrap();

        let failed = next_of(&mut events, EventKind::NodeFailed).await;
        let requested = events.recv().await.unwrap();
        assert_eq!(
            (requested.kind, requested.node_id()),
            (EventKind::SelfHealingRequested, Some(node))
        );

        let state = test.store.wait_for(|state| !state.outbox.is_empty());
        assert_eq!(state.nodes.len(), 1);
        assert_eq!(state.nodes[0].state, NodeState::Failed);
        assert_eq!(state.outbox.len(), 1, "exactly one webhook");
        let payload = body(&state.outbox[0]);
        assert_eq!(payload["reason"], "UNEXPECTED_NODE_FAILURE");
        assert_eq!(payload["failed_node_id"], node.to_string());
        assert_eq!(payload["failed_node_ip"], failed.node.unwrap().ip.to_string());
        assert!(
            requested.reason.contains(&state.outbox[0].id),
            "{}",
            requested.reason
        );
        assert_eq!(state.heals.len(), 1);
        assert_eq!(test.metrics.unexpected_node_failures.get(), 1);

        shutdown.cancel();
        test.actor.await.unwrap();
    }

    #[test]
    fn a_large_round_is_named_by_its_first_ids_and_a_count() {
        let failed: Vec<FailedNode> = (0..20u128)
            .map(|n| FailedNode {
                id: NodeId(Uuid::from_u128(n)),
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                hostname: "edge".into(),
                out_of_service: None,
                domain: String::new(),
                labels: Default::default(),
            })
            .collect();
        assert_eq!(span_ids(&failed[..1]), failed[0].id.to_string());
        let named = span_ids(&failed);
        assert_eq!(named.matches(',').count(), SPAN_IDS, "{named}");
        assert!(named.ends_with("(+12 more)"), "{named}");
    }

    #[tokio::test(start_paused = true)]
    async fn paused_healing_holds_a_failure_and_a_resume_heals_it_once_and_both_are_persisted() {
        let shutdown = CancellationToken::new();
        let test = start(settings(), Restored::default(), &shutdown);
        let mut events = test.bus.subscribe(None).unwrap().live;
        let pause = AutomationChange {
            healing: Some(false),
            reason: "investigating an upstream outage".into(),
            ..Default::default()
        };
        let (automation, resumed) = test.handle.set_automation(pause).await.unwrap();
        assert_eq!(
            (automation.healing, automation.scaling, resumed),
            (false, true, 0)
        );
        let changed = next_of(&mut events, EventKind::AutomationChanged).await;
        assert!(changed.reason.contains("healing paused"), "{}", changed.reason);
        assert!(!test.handle.stats().await.unwrap().automation.healing);

        let (tx, _signals) = session_signals();
        let node = NodeId(Uuid::new_v4());
        test.handle.connect(info(node), tx, clock::now()).await.unwrap();
        next_of(&mut events, EventKind::NodeFailed).await;
        let held = next_of(&mut events, EventKind::SelfHealingHeld).await;
        assert!(held.reason.contains("paused"), "{}", held.reason);
        let state = test.store.wait_for(|state| !state.automation.healing);
        assert!(state.outbox.is_empty(), "nothing healed while paused");

        let resume = AutomationChange {
            healing: Some(true),
            reason: "outage over".into(),
            ..Default::default()
        };
        let (automation, resumed) = test.handle.set_automation(resume.clone()).await.unwrap();
        assert_eq!((automation.healing, resumed), (true, 1));
        let requested = next_of(&mut events, EventKind::SelfHealingRequested).await;
        assert_eq!(requested.node_id(), Some(node));
        let state = test.store.wait_for(|state| !state.outbox.is_empty());
        assert!(state.automation.healing);
        assert_eq!(state.outbox.len(), 1);
        assert_eq!(body(&state.outbox[0])["failed_node_id"], node.to_string());
        // Resuming again changes nothing and heals nothing twice.
        assert_eq!(test.handle.set_automation(resume).await.unwrap().1, 0);
        shutdown.cancel();
        test.actor.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_keeps_healing_paused() {
        let shutdown = CancellationToken::new();
        let restored = Restored {
            automation: Automation {
                healing: false,
                scaling: false,
            },
            ..Restored::default()
        };
        let test = start(settings(), restored, &shutdown);
        let stats = test.handle.stats().await.unwrap();
        assert_eq!(
            stats.automation,
            Automation {
                healing: false,
                scaling: false
            }
        );
        let mut events = test.bus.subscribe(None).unwrap().live;
        let (tx, _signals) = session_signals();
        test.handle
            .connect(info(NodeId(Uuid::new_v4())), tx, clock::now())
            .await
            .unwrap();
        let held = next_of(&mut events, EventKind::SelfHealingHeld).await;
        assert!(held.reason.contains("paused"), "{}", held.reason);
        shutdown.cancel();
        test.actor.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn most_of_the_fleet_going_silent_at_once_raises_one_alert_and_heals_nobody() {
        let shutdown = CancellationToken::new();
        let test = start(settings(), Restored::default(), &shutdown);
        let mut events = test.bus.subscribe(None).unwrap().live;
        let mut nodes = Vec::new();
        let mut keep = Vec::new();
        for _ in 0..5 {
            let (tx, signals) = session_signals();
            let node = NodeId(Uuid::new_v4());
            let admitted = test.handle.connect(info(node), tx, clock::now()).await.unwrap();
            nodes.push((node, admitted.liveness));
            keep.push(signals);
        }
        // One keeps beating; four go silent together.
        let beats = keep_beating(nodes[0].1.clone());
        let mut held = 0;
        while held < 4 {
            let event = events.recv().await.unwrap();
            assert_ne!(event.kind, EventKind::SelfHealingRequested, "{event:?}");
            if event.kind == EventKind::SelfHealingHeld {
                assert!(event.reason.contains("mass failure: 4 of 5"), "{}", event.reason);
                held += 1;
            }
        }
        let state = test.store.wait_for(|state| !state.outbox.is_empty());
        assert_eq!(state.outbox.len(), 1);
        let alert = body(&state.outbox[0]);
        assert_eq!(alert["reason"], "MASS_NODE_FAILURE");
        assert_eq!(alert["failed_nodes"].as_array().unwrap().len(), 4);
        assert!(state.heals.is_empty());
        assert_eq!(test.metrics.mass_failure_alerts.get(), 1);
        beats.abort();
        shutdown.cancel();
        test.actor.await.unwrap();
    }

    #[tokio::test]
    async fn a_reconnect_changes_nothing_durable_and_writes_nothing() {
        let shutdown = CancellationToken::new();
        let test = start(settings(), Restored::default(), &shutdown);
        let mut events = test.bus.subscribe(None).unwrap().live;
        let (a, b) = (NodeId(Uuid::new_v4()), NodeId(Uuid::new_v4()));
        let mut receivers = Vec::new();
        let mut signals = || {
            let (tx, rx) = session_signals();
            receivers.push(rx);
            tx
        };
        test.handle
            .connect(info(a), signals(), clock::now())
            .await
            .unwrap();
        assert_eq!(events.recv().await.unwrap().kind, EventKind::NodeJoined);
        // A new session for the same node: an event, but nothing a restart needs.
        test.handle
            .connect(info(a), signals(), clock::now())
            .await
            .unwrap();
        let mut kinds = Vec::new();
        while !kinds.contains(&EventKind::NodeReconnected) {
            kinds.push(events.recv().await.unwrap().kind);
        }
        // Another node joins: its write comes after anything the reconnect wrote.
        test.handle
            .connect(info(b), signals(), clock::now())
            .await
            .unwrap();
        test.store.wait_for(|state| state.nodes.len() == 2);
        assert_eq!(
            test.store.node_writes(),
            vec![a, b],
            "the reconnect wrote nothing"
        );
        shutdown.cancel();
        test.actor.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_restart_known_nodes_get_a_grace_then_are_judged_once() {
        let shutdown = CancellationToken::new();
        let restored = Restored {
            nodes: vec![
                restored_node(1, NodeState::Connected, false),
                restored_node(2, NodeState::Terminating, true),
                restored_node(3, NodeState::Connected, false),
                restored_node(4, NodeState::Failed, false),
            ],
            heals: Vec::new(),
            automation: Default::default(),
        };
        let test = start(settings(), restored, &shutdown);
        let mut events = test.bus.subscribe(None).unwrap().live;
        let started = tokio::time::Instant::now();
        let (listed, _) = test.handle.list().await.unwrap();
        assert_eq!(listed.len(), 4, "restored nodes are listed at once");
        assert_eq!(listed[0].state, NodeState::Suspect);
        assert!(listed[0].state_reason.contains("orchestrator restarted"));
        assert_eq!(listed[3].state, NodeState::Failed);

        // Node 3 comes back within the grace.
        let (tx, _signals) = session_signals();
        let back = restored_node(3, NodeState::Connected, false).id;
        let admitted = test.handle.connect(info(back), tx, clock::now()).await.unwrap();
        assert_eq!(events.recv().await.unwrap().kind, EventKind::NodeReconnected);
        let beats = keep_beating(admitted.liveness);

        let mut judged = Vec::new();
        while judged.len() < 3 {
            let event = events.recv().await.unwrap();
            judged.push((event.kind, event.node_id().unwrap()));
        }
        assert!(
            started.elapsed() >= Duration::from_secs(10),
            "not before the grace"
        );
        let one = restored_node(1, NodeState::Connected, false).id;
        let two = restored_node(2, NodeState::Connected, false).id;
        assert_eq!(
            judged,
            vec![
                (EventKind::NodeFailed, one),
                (EventKind::NodeTerminated, two),
                (EventKind::SelfHealingRequested, one),
            ]
        );
        let state = test.store.wait_for(|state| !state.outbox.is_empty());
        assert_eq!(state.outbox.len(), 1, "the terminating node is not healed");
        assert_eq!(body(&state.outbox[0])["failed_node_id"], one.to_string());
        // Nothing more happens to anyone (the failed node 4 is not judged again).
        let quiet = tokio::time::timeout(Duration::from_secs(60), events.recv()).await;
        assert!(quiet.is_err(), "unexpected event {quiet:?}");
        beats.abort();
        shutdown.cancel();
        test.actor.await.unwrap();
    }
}
