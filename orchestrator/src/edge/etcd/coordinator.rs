//! Leader election on etcd, with a fencing token.
//!
//! Each orchestrator holds a lease of `leader_lease_ttl` seconds, renewed every
//! third of it, and campaigns for the leader key under `etcd_prefix` with one
//! transaction: "if the key does not exist, create it on my lease". The winner's
//! key revision is the term's fencing token: every later write compares it
//! ([`super::store`]). A standby watches the key (and reads it every third of the
//! TTL, in case its watch sits on a dead member) and campaigns again the moment it
//! is gone.
//!
//! A leader whose lease cannot be renewed before it runs out ends its term at
//! once, counting from when the last successful renewal was *sent* (etcd counts
//! from when it was received, later), so it stops acting before etcd lets anyone
//! else lead. A refused write ends the term too. Either way the process gives up
//! its lease and campaigns again as a standby; it never exits for this. At
//! shutdown the leader revokes its lease so that a standby takes over at once.

use std::time::Duration;

use secbeat::etcdpb::{
    etcdserverpb::{self as pb, request_op, response_op},
    mvccpb::event::EventType,
};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{LeaderInfo, client::EtcdClient, created_at, put, store::leader_key};
use crate::runtime::role::Term;

/// What the coordinator tells the server.
#[derive(Debug)]
pub enum RoleChange {
    /// This process leads for `Term` (until the term ends).
    Elected(Term),
    /// Another process leads, or none can be found.
    Following {
        /// The leader, when known.
        leader: Option<LeaderInfo>,
        /// What is wrong, if anything (etcd unreachable, another fleet's leader).
        problem: Option<String>,
        /// When the leader's lease runs out unless it renews it (read every third
        /// of the TTL): the earliest leadership can move.
        lease_ends: Option<std::time::Instant>,
    },
}

/// How the coordinator campaigns.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// `etcd_prefix`.
    pub prefix: String,
    /// `leader_lease_ttl` (whole seconds).
    pub lease_ttl: Duration,
    /// What this process puts in the leader key.
    pub me: LeaderInfo,
}

/// Starts campaigning; role changes arrive on the returned channel until
/// `shutdown`, after which the lease is revoked and the task ends.
pub fn spawn(
    client: EtcdClient,
    settings: CoordinatorSettings,
    shutdown: CancellationToken,
) -> (mpsc::UnboundedReceiver<RoleChange>, tokio::task::JoinHandle<()>) {
    let (changes, receiver) = mpsc::unbounded_channel();
    let coordinator = Coordinator {
        key: leader_key(&settings.prefix),
        client,
        settings,
        changes,
        shutdown,
        last_follow: None,
    };
    (receiver, tokio::spawn(coordinator.run()))
}

struct Coordinator {
    client: EtcdClient,
    settings: CoordinatorSettings,
    key: Vec<u8>,
    changes: mpsc::UnboundedSender<RoleChange>,
    shutdown: CancellationToken,
    /// The last Following sent (not repeated while nothing changes).
    last_follow: Option<Follow>,
}

/// How one lease's campaigning ended.
enum Ended {
    /// The lease is gone or the term ended: get a new lease and campaign again.
    Again,
    /// Shutting down.
    Shutdown,
}

/// What a standby last told the server.
type Follow = (Option<LeaderInfo>, Option<String>, Option<std::time::Instant>);

enum Campaign {
    Won {
        token: i64,
    },
    Lost {
        leader: Option<LeaderInfo>,
        /// The leader's lease.
        lease: i64,
        revision: i64,
    },
}

impl Coordinator {
    async fn run(mut self) {
        let ttl = self.settings.lease_ttl;
        // While etcd cannot grant a lease: the project's capped, jittered backoff.
        let mut retry = secbeat::backoff::Backoff::new(Duration::from_millis(200), ttl, 0.5)
            .expect("a valid backoff: 200 ms up to the lease TTL");
        loop {
            let granted = tokio::select! {
                granted = self.client.grant(ttl.as_secs() as i64) => granted,
                () = self.shutdown.cancelled() => return,
            };
            let lease = match granted {
                Ok(lease) => lease,
                Err(error) => {
                    let problem = format!("cannot get a lease from etcd: {error}");
                    let delay = retry.next_delay(&mut rand::rng());
                    warn!(retry_in_ms = delay.as_millis() as u64, "{problem}; standing by");
                    self.follow(None, Some(problem));
                    if self.pause(delay).await {
                        return;
                    }
                    continue;
                }
            };
            retry.reset();
            // The lease as a term: it ends, with its reason, when it is lost.
            let held = Term::new(lease, &CancellationToken::new());
            let keeper = tokio::spawn(keep_alive(self.client.clone(), ttl, held.clone()));
            let ended = self.campaign_on(&held).await;
            keeper.abort();
            held.end("campaigning on a new lease");
            // Gives the key up at once if it is still ours (at shutdown: so a
            // standby takes over without waiting for the TTL).
            if let Err(error) = self.client.revoke(lease).await {
                warn!(%error, lease, "could not revoke the lease; it expires by itself");
            }
            if matches!(ended, Ended::Shutdown) {
                info!("left the leader election");
                return;
            }
        }
    }

    /// Sleeps `delay`; true if shutdown came first.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(delay) => false,
            () = self.shutdown.cancelled() => true,
        }
    }

    fn follow(&mut self, leader: Option<LeaderInfo>, problem: Option<String>) {
        self.follow_until(leader, problem, None);
    }

    fn follow_until(
        &mut self,
        leader: Option<LeaderInfo>,
        problem: Option<String>,
        lease_ends: Option<std::time::Instant>,
    ) {
        let state = (leader.clone(), problem.clone(), lease_ends);
        if self.last_follow.as_ref() == Some(&state) {
            return;
        }
        self.last_follow = Some(state);
        let _ = self.changes.send(RoleChange::Following {
            leader,
            problem,
            lease_ends,
        });
    }

    /// When `lease` runs out unless renewed: etcd's whole seconds left, plus the
    /// second it rounded down. None when it cannot be asked.
    async fn lease_ends(&self, lease: i64) -> Option<std::time::Instant> {
        let left = self.client.time_to_live(lease).await.ok()?;
        Some(std::time::Instant::now() + Duration::from_secs(left.max(0) as u64 + 1))
    }

    async fn campaign_on(&mut self, held: &Term) -> Ended {
        let lease = held.token;
        loop {
            if self.shutdown.is_cancelled() {
                return Ended::Shutdown;
            }
            if held.ended().is_cancelled() {
                return Ended::Again;
            }
            match self.campaign(lease).await {
                Ok(Campaign::Won { token }) => {
                    let term = held.within(token);
                    info!(
                        token, lease, prefix = %self.settings.prefix,
                        "elected leader: this orchestrator now accepts agents, judges failures, heals and scales"
                    );
                    self.last_follow = None;
                    let _ = self.changes.send(RoleChange::Elected(term.clone()));
                    tokio::select! {
                        () = term.ended().cancelled() => {}
                        () = self.shutdown.cancelled() => {
                            term.end("shutting down");
                            return Ended::Shutdown;
                        }
                    }
                    error!(
                        token, reason = %term.end_reason(),
                        "leadership lost: every side effect stopped (no webhook, no Terminate, no judging); campaigning again as a standby"
                    );
                    self.follow(None, None);
                    return Ended::Again;
                }
                Ok(Campaign::Lost {
                    leader,
                    lease,
                    revision,
                }) => {
                    let problem = leader.as_ref().and_then(|leader| {
                        (leader.fleet != self.settings.me.fleet).then(|| {
                            format!(
                                "the leader under etcd_prefix {} ({}) runs another fleet (its provisioning_webhook_url differs): two fleets share one prefix; give each its own etcd_prefix",
                                self.settings.prefix, leader.url
                            )
                        })
                    });
                    if let Some(problem) = &problem {
                        error!("{problem}");
                    } else if self.last_follow.as_ref().map(|(l, _, _)| l) != Some(&leader) {
                        info!(
                            leader = leader.as_ref().map_or("unknown", |l| l.url.as_str()),
                            "standing by: another orchestrator leads"
                        );
                    }
                    let lease_ends = self.lease_ends(lease).await;
                    self.follow_until(leader.clone(), problem.clone(), lease_ends);
                    if let Ended::Shutdown = self
                        .wait_for_vacancy(revision, (leader, problem), held.ended())
                        .await
                    {
                        return Ended::Shutdown;
                    }
                }
                Err(error) => {
                    let problem = format!("campaign failed: {error}");
                    warn!("{problem}");
                    self.follow(None, Some(problem));
                    if self.pause(self.settings.lease_ttl / 3).await {
                        return Ended::Shutdown;
                    }
                }
            }
        }
    }

    /// One campaign transaction: create the leader key on `lease` if there is none.
    async fn campaign(&self, lease: i64) -> Result<Campaign, super::client::EtcdError> {
        let value = serde_json::to_vec(&self.settings.me).expect("leader info serializes");
        let request = pb::TxnRequest {
            compare: vec![created_at(self.key.clone(), 0)],
            success: vec![put(self.key.clone(), value, lease)],
            failure: vec![pb::RequestOp {
                request: Some(request_op::Request::RequestRange(pb::RangeRequest {
                    key: self.key.clone(),
                    ..Default::default()
                })),
            }],
        };
        let response = self.client.txn(request).await?;
        let revision = response.header.as_ref().map_or(0, |header| header.revision);
        if response.succeeded {
            return Ok(Campaign::Won { token: revision });
        }
        let holder = response.responses.into_iter().find_map(|op| match op.response {
            Some(response_op::Response::ResponseRange(range)) => range.kvs.into_iter().next(),
            _ => None,
        });
        match holder {
            // Our own earlier attempt won, and its answer was lost.
            Some(kv) if kv.lease == lease => Ok(Campaign::Won {
                token: kv.create_revision,
            }),
            Some(kv) => Ok(Campaign::Lost {
                leader: serde_json::from_slice(&kv.value).ok(),
                lease: kv.lease,
                revision,
            }),
            None => Ok(Campaign::Lost {
                leader: None,
                lease: 0,
                revision,
            }),
        }
    }

    /// Waits until the leader key is gone (watch, and a read every third of the
    /// TTL), our lease is lost, or shutdown. Each read also tells the server when
    /// the leader's lease runs out, which a standby passes on to agents.
    async fn wait_for_vacancy(
        &mut self,
        revision: i64,
        (leader, problem): (Option<LeaderInfo>, Option<String>),
        lease_lost: &CancellationToken,
    ) -> Ended {
        let mut watch = self.client.watch(self.key.clone(), revision + 1).await.ok();
        let mut poll = tokio::time::interval(self.settings.lease_ttl / 3);
        poll.tick().await;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return Ended::Shutdown,
                () = lease_lost.cancelled() => return Ended::Again,
                message = async { watch.as_mut().expect("guarded").message().await }, if watch.is_some() => {
                    match message {
                        Ok(Some(response)) => {
                            if response.canceled {
                                watch = None;
                            } else if response.events.iter().any(|event| event.r#type == EventType::Delete as i32) {
                                return Ended::Again;
                            }
                        }
                        _ => watch = None,
                    }
                }
                _ = poll.tick() => {
                    let read = self.client.range(pb::RangeRequest { key: self.key.clone(), ..Default::default() }).await;
                    match read {
                        Ok(response) => match response.kvs.into_iter().next() {
                            None => return Ended::Again,
                            Some(kv) => {
                                let now: Option<LeaderInfo> = serde_json::from_slice(&kv.value).ok();
                                if now != leader {
                                    // A new leader came and went between two reads:
                                    // campaign (and so learn who it is) again.
                                    return Ended::Again;
                                }
                                let lease_ends = self.lease_ends(kv.lease).await;
                                self.follow_until(leader.clone(), problem.clone(), lease_ends);
                            }
                        },
                        Err(error) => warn!(%error, "cannot read the leader key; still standing by"),
                    }
                    if watch.is_none() {
                        let from = revision + 1;
                        watch = self.client.watch(self.key.clone(), from).await.ok();
                    }
                }
            }
        }
    }
}

/// Renews the lease `held` stands for every third of `ttl` until it cannot be
/// renewed before it runs out (by this process's clock, counting from each
/// renewal's sending), then ends `held` saying why.
async fn keep_alive(client: EtcdClient, ttl: Duration, held: Term) {
    let lease = held.token;
    let lost = held.ended().clone();
    // Granted just before this task started: valid for at least `ttl` from the
    // grant's sending, which was earlier than now.
    let mut valid_until = Instant::now() + ttl - client.timeout().min(ttl / 2);
    loop {
        let next = (Instant::now() + ttl / 3).min(valid_until);
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = lost.cancelled() => return,
        }
        if Instant::now() >= valid_until {
            warn!(lease, "leader lease ran out before it could be renewed");
            held.end("the lease ran out before it could be renewed");
            return;
        }
        let sent = Instant::now();
        let renewed = tokio::select! {
            renewed = client.keep_alive(lease) => Some(renewed),
            () = tokio::time::sleep_until(valid_until) => None,
        };
        match renewed {
            Some(Ok(granted)) if granted > 0 => {
                valid_until = sent + Duration::from_secs(granted as u64);
            }
            Some(Ok(_)) => {
                warn!(lease, "etcd says the lease has expired");
                held.end("etcd says the lease has expired");
                return;
            }
            Some(Err(error)) => {
                warn!(lease, %error, left_ms = valid_until.saturating_duration_since(Instant::now()).as_millis() as u64, "lease renewal failed; retrying until the lease runs out");
            }
            None => {
                warn!(lease, "leader lease ran out before it could be renewed");
                held.end("the lease ran out before it could be renewed");
                return;
            }
        }
    }
}
