//! High availability on a real 3-member etcd cluster: two orchestrators, one
//! fenced leader, failover under SIGKILL and SIGSTOP of the leader and of etcd
//! members, and nothing healed twice. Real binaries, real etcd, real signals.

use std::time::Duration;

use secbeat_integration::*;
use uuid::Uuid;

/// Failover bound: the lease (2 s) runs out, etcd expires it (checks every 0.5 s),
/// the standby campaigns and loads, plus scheduling slack on a loaded machine.
const FAILOVER: Duration = Duration::from_secs(15);

/// Two orchestrators' config: fast lifecycle, a 2 s leader lease, and a reconnect
/// grace (10 s) that covers a failover and an agent noticing a frozen leader.
fn ha_config(etcd: &EtcdCluster, webhook_url: &str) -> String {
    let base = webhook_config(webhook_url)
        .replace("restart_reconnect_grace = 2.0", "restart_reconnect_grace = 10.0");
    format!(
        "{base}{}leader_lease_ttl = 2\netcd_request_timeout = 0.5\n",
        etcd.endpoints_toml()
    )
}

async fn readyz(orchestrator: &Orchestrator) -> (u16, serde_json::Value) {
    let response = http_request(orchestrator.http_addr, "/readyz", &[])
        .await
        .expect("GET /readyz");
    let body = serde_json::from_str(&response.body).unwrap_or(serde_json::Value::Null);
    (response.status, body)
}

/// Waits until exactly one of `orchestrators` is the ready leader and every other
/// one a standby naming it; returns the leader's index.
async fn one_leader(orchestrators: &[&Orchestrator], timeout: Duration) -> usize {
    eventually(
        timeout,
        "exactly one leader, the others standing by for it",
        || async {
            let mut leaders = Vec::new();
            let mut standbys = Vec::new();
            for (index, orchestrator) in orchestrators.iter().enumerate() {
                match readyz(orchestrator).await {
                    (200, body) if body["role"] == "leader" => leaders.push(index),
                    (503, body) if body["role"] == "standby" => standbys.push(body["leader"].clone()),
                    _ => return None,
                }
            }
            let [leader] = leaders[..] else { return None };
            let url = orchestrators[leader].url();
            standbys.iter().all(|named| *named == url).then_some(leader)
        },
    )
    .await
}

/// Waits until `orchestrator` leads (its /readyz answers 200).
async fn until_leading(orchestrator: &Orchestrator) {
    eventually(FAILOVER, "the standby to lead", || async {
        (readyz(orchestrator).await.0 == 200).then_some(())
    })
    .await;
}

/// A real 3-member etcd, a webhook receiver and two orchestrators on them.
struct ControlPlane {
    etcd: EtcdCluster,
    receiver: WebhookReceiver,
    orchestrators: [Orchestrator; 2],
}

impl ControlPlane {
    /// Starts it all (the receiver with `receiver_flags`); None when etcd is not
    /// installed (and not required).
    async fn start(receiver_flags: &[&str]) -> Option<Self> {
        Self::start_with(receiver_flags, "").await
    }

    /// [`Self::start`], with `extra` appended to both orchestrators' config.
    async fn start_with(receiver_flags: &[&str], extra: &str) -> Option<Self> {
        let etcd = EtcdCluster::start(3).await?;
        let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap(), receiver_flags)
            .await
            .expect("the receiver starts");
        let config = format!("{}{extra}", ha_config(&etcd, &receiver.url()));
        let a = Orchestrator::start(&config).await.expect("orchestrator a starts");
        let b = Orchestrator::start(&config).await.expect("orchestrator b starts");
        Some(Self {
            etcd,
            receiver,
            orchestrators: [a, b],
        })
    }

    /// Both orchestrators' URLs, as agents are given them.
    fn urls(&self) -> String {
        let [a, b] = &self.orchestrators;
        format!("{},{}", a.url(), b.url())
    }

    /// Waits for exactly one leader; returns its index in `orchestrators`.
    async fn leader_index(&self, timeout: Duration) -> usize {
        let [a, b] = &self.orchestrators;
        one_leader(&[a, b], timeout).await
    }

    /// Waits for exactly one leader; returns (leader, standby).
    async fn roles(&self, timeout: Duration) -> (&Orchestrator, &Orchestrator) {
        let leader = self.leader_index(timeout).await;
        (&self.orchestrators[leader], &self.orchestrators[1 - leader])
    }
}

/// Agents given every orchestrator's URL. Quick reconnects, and HTTP/2 pings every
/// 0.5 s so that a frozen (SIGSTOP) leader is noticed within a second.
fn agents(urls: &str, count: usize) -> Vec<Agent> {
    (0..count).map(|_| agent(urls, &[])).collect()
}

/// One agent as [`agents`] starts them, with `extra` flags.
fn agent(urls: &str, extra: &[&str]) -> Agent {
    let mut flags = FAST_RECONNECT.to_vec();
    flags.extend(["--keepalive", "0.5"]);
    flags.extend(extra);
    Agent::start(urls, Uuid::new_v4(), &flags).expect("agent starts")
}

/// The `webhook.id` the leader logged when it queued the heal of `node`.
fn queued_webhook_id(orchestrator: &Orchestrator, node: &str) -> Option<String> {
    orchestrator
        .process
        .logs
        .lines()
        .into_iter()
        .filter(|line| line.contains("self-healing requested") && line.contains(node))
        .find_map(|line| {
            let start = line.find("webhook.id=")? + "webhook.id=".len();
            Some(line[start..].split_whitespace().next()?.to_owned())
        })
}

#[tokio::test]
async fn one_leader_standby_points_at_it_and_a_leader_kill_loses_no_agent_and_heals_once() {
    let Some(plane) = ControlPlane::start(&[]).await else {
        return;
    };
    let receiver = &plane.receiver;
    let (leader, standby) = plane.roles(STARTUP).await;

    // The standby refuses agents with UNAVAILABLE and the leader's URL.
    let mut client = standby.agent_client().await.unwrap();
    let Err(refused) = raw_connect(&mut client, vec![hello(Uuid::new_v4())]).await else {
        panic!("a standby refuses agent streams");
    };
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let hint = refused
        .metadata()
        .get("secbeat-leader")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(hint, Some(leader.url()));
    // ...and when leadership can move at the earliest: within the 2 s lease, plus
    // the second etcd rounds down.
    let retry_ms: u64 = refused
        .metadata()
        .get("secbeat-retry-after-ms")
        .expect("a standby says when leadership can move")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_ms <= 3000, "{retry_ms} ms");
    standby.assert_metric("orchestrator_leader", 0.0).await;
    leader.assert_metric("orchestrator_leader", 1.0).await;
    // A load balancer's health check finds the leader.
    for (orchestrator, status) in [(leader, "SERVING"), (standby, "NOT_SERVING")] {
        let addr = orchestrator.grpc_addr.to_string();
        let (_, out, err) = run_grpcurl(&[
            "-plaintext",
            "-d",
            r#"{"service": "secbeat.v1.AgentService"}"#,
            &addr,
            "grpc.health.v1.Health/Check",
        ])
        .await
        .unwrap();
        assert!(out.contains(&format!("\"{status}\"")), "{addr}: {out}{err}");
    }

    // Agents given both URLs all end up on the leader; one given only the
    // standby's URL gets there by following the standby's pointer.
    let mut agents = agents(&plane.urls(), 3);
    agents.extend(self::agents(&standby.url(), 1));
    leader.wait_all_connected(&agents, STARTUP).await;

    // SIGKILL the leader: the standby leads, and every agent is back on it.
    leader.process.signal(Sig::SIGKILL);
    until_leading(standby).await;
    standby.wait_all_connected(&agents, FAILOVER).await;
    standby.assert_metric("orchestrator_leader", 1.0).await;
    // No live agent was ever judged failed, so nothing was healed.
    standby
        .assert_metric("orchestrator_unexpected_node_failures_total", 0.0)
        .await;
    assert!(receiver.events().is_empty(), "{:?}", receiver.events());

    // After failover, a crashed agent is healed exactly once.
    let crashed = agents[0].id();
    agents[0].process.signal(Sig::SIGKILL);
    let healed = receiver
        .wait_for_events("UNEXPECTED_NODE_FAILURE", 1, FAILOVER)
        .await;
    standby.wait_outbox_drained(STARTUP).await;
    let healed_now = receiver.events_with_reason("UNEXPECTED_NODE_FAILURE");
    assert_eq!(healed_now.len(), 1, "{healed_now:?}");
    assert_eq!(healed[0]["payload"]["failed_node_id"], crashed.as_str());
}

#[tokio::test]
async fn a_webhook_pending_when_the_leader_dies_is_delivered_by_the_new_leader_under_its_id() {
    let Some(mut plane) = ControlPlane::start(&["--fail-first", "1000000"]).await else {
        return;
    };
    let agents = agents(&plane.urls(), 2);
    let leader_index = plane.leader_index(STARTUP).await;
    let leader = &plane.orchestrators[leader_index];
    leader.wait_all_connected(&agents, STARTUP).await;

    // An agent crashes; the receiver refuses every attempt: the webhook waits.
    let crashed = agents[0].id();
    agents[0].process.signal(Sig::SIGKILL);
    let id = eventually(STARTUP, "the heal to be queued", || async {
        queued_webhook_id(leader, &crashed)
    })
    .await;
    eventually(STARTUP, "a failed delivery attempt", || async {
        (leader
            .metric("orchestrator_self_healing_webhook_errors_total")
            .await
            >= 1.0)
            .then_some(())
    })
    .await;

    // The leader dies with the webhook undelivered; the receiver recovers.
    leader.process.signal(Sig::SIGKILL);
    let addr = plane.receiver.addr;
    plane.receiver.process.kill(STARTUP).await.unwrap();
    plane.receiver = eventually(STARTUP, "the receiver to listen again", || async {
        WebhookReceiver::start(addr, &[]).await.ok()
    })
    .await;
    let (standby, receiver) = (&plane.orchestrators[1 - leader_index], &plane.receiver);
    until_leading(standby).await;
    let delivered = receiver
        .wait_for_events("UNEXPECTED_NODE_FAILURE", 1, FAILOVER)
        .await;
    standby.wait_outbox_drained(STARTUP).await;
    assert_eq!(
        delivered[0]["webhook_id"],
        id.as_str(),
        "resent under its original id"
    );
    assert_eq!(delivered[0]["payload"]["failed_node_id"], crashed.as_str());
    let all = receiver.events_with_reason("UNEXPECTED_NODE_FAILURE");
    assert_eq!(all.len(), 1, "decided once, delivered once: {all:?}");
    // The crashed node was judged by the old leader; the new one did not judge it again.
    standby
        .assert_metric("orchestrator_unexpected_node_failures_total", 0.0)
        .await;
}

/// Waits until `orchestrator` logged sending Drain to `node`.
async fn sent_drain(orchestrator: &Orchestrator, node: &str, timeout: Duration) {
    eventually(timeout, "a drain sent to the node", || async {
        orchestrator
            .process
            .logs
            .lines()
            .iter()
            .any(|line| line.contains("sending drain") && line.contains(node))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_scale_down_draining_when_the_leader_dies_is_finished_by_the_new_leader_with_one_webhook() {
    let Some(plane) = ControlPlane::start_with(&[], QUICK_SCALE_DOWN).await else {
        return;
    };
    let (leader, standby) = plane.roles(STARTUP).await;
    // The idle node's route withdrawal takes until the test lets it finish: the
    // hook reads a FIFO to its end, which comes when the test opens and closes
    // it. (A hook whose session is lost is killed with its process group.)
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("withdrawn");
    let made = std::process::Command::new("mkfifo").arg(&gate).status().unwrap();
    assert!(made.success(), "mkfifo {}", gate.display());
    let hook = format!("cat {} > /dev/null", gate.display());
    let mut idle = agent(
        &plane.urls(),
        &["--cpu-source", "const:0.05", "--on-drain", &hook],
    );
    let busier = agent(&plane.urls(), &["--cpu-source", "const:0.2"]);
    leader
        .wait_all_connected(std::slice::from_ref(&busier), STARTUP)
        .await;
    let node = idle.id();
    sent_drain(leader, &node, STARTUP).await;

    // The leader dies mid-drain: no webhook was sent, as none was queued.
    leader.process.signal(Sig::SIGKILL);
    until_leading(standby).await;
    standby
        .wait_all_connected(std::slice::from_ref(&busier), FAILOVER)
        .await;
    sent_drain(standby, &node, FAILOVER).await;
    assert!(
        plane.receiver.events().is_empty(),
        "{:?}",
        plane.receiver.events()
    );

    // The route is withdrawn: the new leader terminates the node and says so, once.
    // Opening the FIFO waits for the hook to read it; closing it ends the hook.
    let opened = tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(gate));
    let opened = tokio::time::timeout(STARTUP, opened).await;
    drop(
        opened
            .expect("the new leader's drain hook reads the gate")
            .unwrap()
            .unwrap(),
    );
    let said = plane
        .receiver
        .wait_for_events("LOW_FLEET_CPU_LOAD", 1, FAILOVER)
        .await;
    assert_eq!(said[0]["payload"]["terminated_node_id"], node.as_str());
    assert_eq!(said[0]["payload"]["terminated_node_cpu_usage"], 0.05);
    assert!(idle.process.wait_exit(STARTUP).await.unwrap().success());
    standby.wait_outbox_drained(STARTUP).await;
    let all = plane.receiver.events_with_reason("LOW_FLEET_CPU_LOAD");
    assert_eq!(all.len(), 1, "{all:?}");
    standby
        .assert_metric("orchestrator_unexpected_node_failures_total", 0.0)
        .await;
}

#[tokio::test]
async fn a_paused_leader_that_wakes_after_losing_its_lease_steps_down_and_its_writes_are_fenced() {
    let Some(plane) = ControlPlane::start(&[]).await else {
        return;
    };
    let receiver = &plane.receiver;
    let (old, new) = plane.roles(STARTUP).await;
    let agents = agents(&plane.urls(), 3);
    old.wait_all_connected(&agents, STARTUP).await;

    // SIGSTOP the leader past its lease: the standby takes over.
    old.process.signal(Sig::SIGSTOP);
    until_leading(new).await;
    new.wait_all_connected(&agents, FAILOVER).await;

    // An agent crashes meanwhile: the new leader heals it.
    let crashed = agents[0].id();
    agents[0].process.signal(Sig::SIGKILL);
    receiver
        .wait_for_events("UNEXPECTED_NODE_FAILURE", 1, FAILOVER)
        .await;

    // The old leader wakes up: it sees its lease gone, steps down and names the
    // new leader; whatever it judged on waking was refused by etcd.
    old.process.signal(Sig::SIGCONT);
    eventually(FAILOVER, "the old leader to stand by for the new one", || async {
        let (status, body) = readyz(old).await;
        (status == 503 && body["role"] == "standby" && body["leader"] == new.url().as_str()).then_some(())
    })
    .await;
    old.process
        .logs
        .wait_for("leadership lost", STARTUP)
        .await
        .expect("the old leader logs that it stepped down");
    new.wait_outbox_drained(STARTUP).await;
    let webhooks = receiver.events_with_reason("UNEXPECTED_NODE_FAILURE");
    assert_eq!(
        webhooks.len(),
        1,
        "exactly one webhook for the crash: {webhooks:?}"
    );
    assert_eq!(webhooks[0]["payload"]["failed_node_id"], crashed.as_str());
    old.assert_metric(
        "orchestrator_webhooks_sent_total{reason=\"UNEXPECTED_NODE_FAILURE\"}",
        0.0,
    )
    .await;
    // The survivors stayed connected to the new leader throughout.
    new.wait_all_connected(&agents[1..], STARTUP).await;
}

#[tokio::test]
async fn losing_etcd_members_makes_no_false_failure_and_the_state_survives_a_full_restart() {
    let Some(plane) = ControlPlane::start(&[]).await else {
        return;
    };
    let (etcd, receiver) = (&plane.etcd, &plane.receiver);
    let agents = agents(&plane.urls(), 3);
    let (leader, _) = plane.roles(STARTUP).await;
    leader.wait_all_connected(&agents, STARTUP).await;

    // Kill the etcd raft leader: etcd elects another; the orchestrators keep (or
    // cleanly hand over) leadership, and no live agent is judged.
    let raft_leader = etcd.leader().await.expect("etcd has a leader");
    etcd.members[raft_leader].process.signal(Sig::SIGKILL);
    eventually(FAILOVER, "etcd to elect another leader", || async {
        etcd.leader().await.filter(|leader| *leader != raft_leader)
    })
    .await;
    let (leader, _) = plane.roles(FAILOVER).await;
    leader.wait_all_connected(&agents, FAILOVER).await;

    // SIGSTOP both remaining members: no quorum. The leader cannot renew its
    // lease and stops leading; nobody leads, nobody judges.
    let stopped: Vec<usize> = (0..3).filter(|i| *i != raft_leader).collect();
    for i in &stopped {
        etcd.members[*i].process.signal(Sig::SIGSTOP);
    }
    eventually(FAILOVER, "the leader to step down without quorum", || async {
        (readyz(leader).await.0 == 503).then_some(())
    })
    .await;
    for i in &stopped {
        etcd.members[*i].process.signal(Sig::SIGCONT);
    }
    let (leader, _) = plane.roles(FAILOVER).await;
    leader.wait_all_connected(&agents, FAILOVER).await;
    for orchestrator in &plane.orchestrators {
        orchestrator
            .assert_metric("orchestrator_unexpected_node_failures_total", 0.0)
            .await;
    }
    assert!(
        receiver.events().is_empty(),
        "no heal, no duplicate decision: {:?}",
        receiver.events()
    );

    // Restart the whole control plane: the fleet's state is in etcd. The agents
    // are held while it is down so that the new leader's watch sees them return
    // (a long reconnect grace covers the pause).
    let ControlPlane {
        etcd: _etcd,
        receiver: _receiver,
        orchestrators: [mut a, mut b],
    } = plane;
    for orchestrator in [&mut a, &mut b] {
        orchestrator.process.signal(Sig::SIGTERM);
        orchestrator.process.wait_exit(STARTUP).await.unwrap();
    }
    for agent in &agents {
        agent.process.signal(Sig::SIGSTOP);
    }
    let grace = [("SECBEAT_RESTART_RECONNECT_GRACE".to_owned(), "30".to_owned())];
    let c = a.restart_with_env(&grace).await.unwrap();
    let d = b.restart_with_env(&grace).await.unwrap();
    let pair = [&c, &d];
    let leader = pair[one_leader(&pair, STARTUP).await];
    let mut watch = leader.watch_events().await.unwrap();
    for agent in &agents {
        agent.process.signal(Sig::SIGCONT);
    }
    leader.wait_all_connected(&agents, FAILOVER).await;
    let mut reconnected = std::collections::HashSet::new();
    while reconnected.len() < agents.len() {
        let event = tokio::time::timeout(FAILOVER, watch.message())
            .await
            .expect("events")
            .unwrap()
            .unwrap();
        assert_ne!(
            event.r#type(),
            secbeat::pb::FleetEventType::NodeJoined,
            "a node the restarted control plane should have known: {event:?}"
        );
        if event.r#type() == secbeat::pb::FleetEventType::NodeReconnected {
            reconnected.insert(event.node_id);
        }
    }
    leader
        .assert_metric("orchestrator_unexpected_node_failures_total", 0.0)
        .await;
}

#[tokio::test]
async fn unreachable_etcd_keeps_the_orchestrator_a_standby_that_says_which_endpoint_fails() {
    // Nothing listens on this port: etcd is down at start.
    let endpoint = format!("http://{}", free_addr());
    let config = format!(
        "{FAST_CONFIG}etcd_endpoints = [\"{endpoint}\"]\nleader_lease_ttl = 2\netcd_request_timeout = 0.5\n"
    );
    let orchestrator = Orchestrator::start(&config).await.expect("it starts anyway");
    let (status, body) = eventually(STARTUP, "readiness to name the failing endpoint", || async {
        let (status, body) = readyz(&orchestrator).await;
        body["problem"]
            .as_str()
            .is_some_and(|problem| problem.contains(&endpoint))
            .then_some((status, body))
    })
    .await;
    assert_eq!(status, 503);
    assert_eq!(body["role"], "standby");
    assert_eq!(body["leader"], serde_json::Value::Null);
    // It refuses agents rather than serving them without a fence.
    let mut client = orchestrator.agent_client().await.unwrap();
    let Err(refused) = raw_connect(&mut client, vec![hello(Uuid::new_v4())]).await else {
        panic!("no leader, no agent streams");
    };
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    // The log says the same, naming the endpoint.
    let line = orchestrator
        .process
        .logs
        .wait_for("cannot get a lease from etcd", STARTUP)
        .await
        .unwrap();
    assert!(line.contains(&endpoint), "{line}");
}

#[tokio::test]
async fn a_second_fleet_on_the_same_prefix_is_told_so_and_never_leads_beside_the_first() {
    let Some(plane) = ControlPlane::start(&[]).await else {
        return;
    };
    let (leader, _) = plane.roles(STARTUP).await;
    // Another fleet's orchestrator (another provisioning webhook), same etcd and prefix.
    let other = format!(
        "{}{}leader_lease_ttl = 2\netcd_request_timeout = 0.5\n",
        webhook_config("http://127.0.0.1:9/other-fleet"),
        plane.etcd.endpoints_toml()
    );
    let stranger = Orchestrator::start(&other).await.unwrap();
    let (status, body) = eventually(STARTUP, "the stranger to report the clash", || async {
        let (status, body) = readyz(&stranger).await;
        body["problem"]
            .as_str()
            .is_some_and(|problem| problem.contains("another fleet") && problem.contains("/secbeat/"))
            .then_some((status, body))
    })
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["leader"],
        leader.url().as_str(),
        "one leader for the prefix: no split brain"
    );
    assert_eq!(readyz(leader).await.0, 200);
}
