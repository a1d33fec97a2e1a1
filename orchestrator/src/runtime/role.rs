//! Who leads: this process's role, as the edges see it.
//!
//! The server owns the one [`RoleSender`]; every edge holds a [`Role`] and asks it,
//! per call, for the handles of the current leader term ([`Leading`]). On a
//! standby the answer is [`NotLeader`] with the leader's URL, which the gRPC edge
//! turns into UNAVAILABLE plus a `secbeat-leader` entry and the HTTP edge into 503.
//! With the embedded store the process leads from start to shutdown.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    edge::store::writer::StoreHealth,
    error::{ErrorCode, Fault},
    runtime::{bus::EventBus, fleet::FleetHandle, scaling_loop::PredictionHandle},
};

/// The gRPC metadata key (and HTTP field) naming the leader's `advertise_url`.
pub const LEADER_METADATA: &str = "secbeat-leader";
/// The gRPC metadata key saying, in milliseconds, when leadership can move at
/// the earliest (the leader's lease runs out unless renewed).
pub const RETRY_AFTER_METADATA: &str = "secbeat-retry-after-ms";

/// How long an agent's Connect call that reaches a process taking over (elected,
/// loading the fleet's state) is held for it to start leading, instead of being
/// sent away to come back. Loading takes about 0.3 s at 50,000 nodes; agents
/// give a Connect call 5 s.
pub const TAKEOVER_HOLD: std::time::Duration = std::time::Duration::from_secs(2);

/// What one leader term's parts expose to the edges.
#[derive(Debug, Clone)]
pub struct Leading {
    /// The fleet actor.
    pub fleet: FleetHandle,
    /// The scaling loop's predictions.
    pub predictions: PredictionHandle,
    /// The term's event bus.
    pub events: EventBus,
    /// Whether the term's store writes.
    pub store: StoreHealth,
}

/// This process's role now.
#[derive(Debug, Clone)]
pub enum RoleView {
    /// Leading: the term's handles.
    Leader(Leading),
    /// Not leading (yet or any more).
    Standby(NotLeader),
}

/// Why a call that needs the leader is not served here, and where to go.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
#[error("{}", match (&self.leader, &self.problem) {
    _ if self.taking_over => "this orchestrator was elected leader and is loading the fleet's state; retry shortly".to_owned(),
    (Some(leader), _) => format!("this orchestrator is a standby; the leader is {leader}"),
    (None, Some(problem)) => format!("this orchestrator is a standby and knows no leader: {problem}"),
    (None, None) => "this orchestrator is a standby and no leader is elected yet; retry".to_owned(),
})]
pub struct NotLeader {
    /// The leader's `advertise_url`, when one is known.
    pub leader: Option<String>,
    /// What keeps this process from leading or knowing the leader (etcd
    /// unreachable, another fleet on the prefix), if anything.
    pub problem: Option<String>,
    /// When the leader's lease runs out unless renewed: an agent whose way to the
    /// leader fails comes back then (`secbeat-retry-after-ms`), not later.
    pub lease_ends: Option<std::time::Instant>,
    /// Elected, and loading the fleet's state before it serves: `leader` is this
    /// process and `lease_ends` is when to try again.
    pub taking_over: bool,
}

impl NotLeader {
    /// Elected as `me` and loading state: agents are told to come back to this
    /// process in `retry_in` (then again, until it serves), instead of following
    /// the old leader's hint or stepping their backoff up.
    pub fn taking_over(me: String, retry_in: std::time::Duration) -> Self {
        Self {
            leader: Some(me),
            problem: None,
            lease_ends: Some(std::time::Instant::now() + retry_in),
            taking_over: true,
        }
    }
}

impl Fault for NotLeader {
    fn code(&self) -> ErrorCode {
        ErrorCode::Unavailable
    }
}

/// Read side: cheap to clone, one per edge.
#[derive(Debug, Clone)]
pub struct Role(watch::Receiver<RoleView>);

/// Write side: the server's.
#[derive(Debug)]
pub struct RoleSender(watch::Sender<RoleView>);

/// A role cell starting as a standby that knows no leader.
pub fn channel() -> (RoleSender, Role) {
    let (sender, receiver) = watch::channel(RoleView::Standby(NotLeader::default()));
    (RoleSender(sender), Role(receiver))
}

impl Role {
    /// The current term's handles, or where the leader is.
    pub fn leading(&self) -> Result<Leading, NotLeader> {
        match &*self.0.borrow() {
            RoleView::Leader(leading) => Ok(leading.clone()),
            RoleView::Standby(not_leader) => Err(not_leader.clone()),
        }
    }

    /// As [`Role::leading`], but a process taking over (elected, loading the
    /// fleet's state) is waited for, up to `hold`: a caller held then is served
    /// the moment the term starts, where one sent away would come back up to a
    /// second and a quarter later, into the storm of everyone else doing so.
    /// A process that stops taking over without leading (the load failed)
    /// answers with what it is then.
    pub async fn leading_soon(&self, hold: std::time::Duration) -> Result<Leading, NotLeader> {
        let taking_over =
            |view: &RoleView| matches!(view, RoleView::Standby(not_leader) if not_leader.taking_over);
        if taking_over(&self.0.borrow()) {
            let mut view = self.0.clone();
            // A timeout or a closed cell leaves the view as it is; it is read below.
            let _ = tokio::time::timeout(hold, view.wait_for(|view| !taking_over(view))).await;
        }
        self.leading()
    }

    /// A role fixed to one term (tests and tools that run the parts directly).
    pub fn fixed(leading: Leading) -> Self {
        let (_, receiver) = watch::channel(RoleView::Leader(leading));
        Self(receiver)
    }
}

impl RoleSender {
    /// This process leads with `leading`.
    pub fn lead(&self, leading: Leading) {
        self.0.send_replace(RoleView::Leader(leading));
    }

    /// This process stands by.
    pub fn stand_by(&self, not_leader: NotLeader) {
        self.0.send_replace(RoleView::Standby(not_leader));
    }
}

/// One leader term: its fencing token and the signal that it is over.
///
/// Whoever sees the term end first (the lease keeper, a fenced write, shutdown)
/// ends it with a reason; every leader-only part stops on [`Term::ended`].
#[derive(Debug, Clone)]
pub struct Term {
    /// The fencing token (the etcd leader key's create revision; 0 on the embedded
    /// store, fenced by its file lock).
    pub token: i64,
    ended: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Term {
    /// A term that ends when `parent` is cancelled or [`Term::end`] is called.
    pub fn new(token: i64, parent: &CancellationToken) -> Self {
        Self {
            token,
            ended: parent.child_token(),
            reason: Arc::default(),
        }
    }

    /// A term inside this one (a leader term inside its lease): it ends when this
    /// one does, and both keep the first reason either was ended for.
    pub fn within(&self, token: i64) -> Self {
        Self {
            token,
            ended: self.ended.child_token(),
            reason: Arc::clone(&self.reason),
        }
    }

    /// Ends the term (the first reason given is kept).
    pub fn end(&self, reason: impl Into<String>) {
        let mut kept = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if kept.is_none() {
            *kept = Some(reason.into());
        }
        self.ended.cancel();
    }

    /// The token every leader-only part of this term stops on.
    pub fn ended(&self) -> &CancellationToken {
        &self.ended
    }

    /// Why the term ended ("shutting down" when its parent was cancelled).
    pub fn end_reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "shutting down".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_keeps_the_first_reason_it_ended_for() {
        let shutdown = CancellationToken::new();
        let term = Term::new(7, &shutdown);
        assert!(!term.ended().is_cancelled());
        term.end("lease lost");
        term.end("fenced");
        assert!(term.ended().is_cancelled());
        assert_eq!(term.end_reason(), "lease lost");
        let other = Term::new(8, &shutdown);
        shutdown.cancel();
        assert!(other.ended().is_cancelled());
        assert_eq!(other.end_reason(), "shutting down");
    }

    #[test]
    fn a_term_within_a_lease_ends_with_it_and_tells_why() {
        let lease = Term::new(42, &CancellationToken::new());
        let leader = lease.within(7);
        assert_eq!(leader.token, 7);
        lease.end("leader lease ran out");
        assert!(leader.ended().is_cancelled());
        // The reason is there before anyone can see the term ended.
        assert_eq!(leader.end_reason(), "leader lease ran out");
    }

    #[test]
    fn a_standby_names_the_leader_or_what_is_wrong() {
        let (_sender, role) = channel();
        assert_eq!(
            role.leading().unwrap_err().to_string(),
            "this orchestrator is a standby and no leader is elected yet; retry"
        );
        let not_leader = NotLeader {
            leader: Some("http://10.0.0.2:50051".into()),
            problem: None,
            lease_ends: Some(std::time::Instant::now() + std::time::Duration::from_secs(2)),
            taking_over: false,
        };
        assert_eq!(
            not_leader.to_string(),
            "this orchestrator is a standby; the leader is http://10.0.0.2:50051"
        );
        // On the wire: where the leader is, and when leadership can move.
        let status = tonic::Status::from(not_leader.clone());
        let metadata = |key| status.metadata().get(key).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            metadata(LEADER_METADATA).as_deref(),
            Some("http://10.0.0.2:50051")
        );
        let retry: u64 = metadata(RETRY_AFTER_METADATA).unwrap().parse().unwrap();
        assert!((1000..=2000).contains(&retry), "{retry}");
        assert_eq!(not_leader.code().grpc(), tonic::Code::Unavailable);
    }

    #[test]
    fn a_lease_that_ended_long_ago_gives_no_retry_time() {
        let Some(long_ago) = std::time::Instant::now().checked_sub(std::time::Duration::from_secs(10)) else {
            return;
        };
        let stale = NotLeader {
            leader: Some("http://10.0.0.2:50051".into()),
            problem: None,
            lease_ends: Some(long_ago),
            taking_over: false,
        };
        let status = tonic::Status::from(stale);
        assert!(status.metadata().get(LEADER_METADATA).is_some());
        assert!(
            status.metadata().get(RETRY_AFTER_METADATA).is_none(),
            "agents keep their backoff when the standby cannot see leadership move"
        );
    }

    fn a_term(shutdown: &CancellationToken) -> Leading {
        let test = crate::runtime::fleet::tests::start(
            crate::runtime::fleet::tests::settings(),
            crate::runtime::fleet::Restored::default(),
            shutdown,
        );
        Leading {
            fleet: test.handle.clone(),
            predictions: crate::runtime::scaling_loop::PredictionHandle::none(),
            events: test.bus.clone(),
            store: Default::default(),
        }
    }

    fn loading() -> NotLeader {
        NotLeader::taking_over("http://me:50051".into(), std::time::Duration::from_millis(250))
    }

    #[tokio::test]
    async fn a_call_reaching_a_process_taking_over_is_held_until_it_leads() {
        let shutdown = CancellationToken::new();
        let (sender, role) = channel();
        sender.stand_by(loading());
        let held = tokio::spawn({
            let role = role.clone();
            async move { role.leading_soon(std::time::Duration::from_secs(3600)).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!held.is_finished(), "held while the state loads");
        sender.lead(a_term(&shutdown));
        assert!(held.await.unwrap().is_ok(), "served once the term starts");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_takeover_that_fails_answers_held_calls_with_the_standby_it_became() {
        let (sender, role) = channel();
        sender.stand_by(loading());
        let held = tokio::spawn({
            let role = role.clone();
            async move { role.leading_soon(std::time::Duration::from_secs(3600)).await }
        });
        tokio::task::yield_now().await;
        let other = NotLeader {
            leader: Some("http://other:50051".into()),
            ..NotLeader::default()
        };
        sender.stand_by(other.clone());
        assert_eq!(held.await.unwrap().unwrap_err(), other);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_is_bounded_and_a_plain_standby_holds_nobody() {
        let (sender, role) = channel();
        let hold = std::time::Duration::from_secs(2);
        sender.stand_by(loading());
        let start = tokio::time::Instant::now();
        let refused = role.leading_soon(hold).await.unwrap_err();
        assert!(refused.taking_over, "still loading: sent back to retry");
        assert_eq!(start.elapsed(), hold);

        let standby = NotLeader {
            leader: Some("http://other:50051".into()),
            ..NotLeader::default()
        };
        sender.stand_by(standby.clone());
        let start = tokio::time::Instant::now();
        assert_eq!(role.leading_soon(hold).await.unwrap_err(), standby);
        assert!(start.elapsed().is_zero(), "a standby sends agents on at once");
    }

    #[test]
    fn an_elected_process_loading_state_sends_agents_back_to_itself_shortly() {
        let loading = NotLeader::taking_over(
            "http://10.0.0.3:50051".into(),
            std::time::Duration::from_millis(250),
        );
        assert!(
            loading.to_string().contains("loading the fleet's state"),
            "{loading}"
        );
        let status = tonic::Status::from(loading);
        let metadata = |key| status.metadata().get(key).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            metadata(LEADER_METADATA).as_deref(),
            Some("http://10.0.0.3:50051")
        );
        let retry: u64 = metadata(RETRY_AFTER_METADATA).unwrap().parse().unwrap();
        assert!(retry <= 250, "{retry}");
    }
}
