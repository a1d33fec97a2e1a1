//! The tests every [`Store`] backend passes (redb and etcd run the same ones).

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, SystemTime},
};

use uuid::Uuid;

use super::{PersistedNode, PersistedTermination, Store, Write};
use crate::{
    domain::forecast::Point,
    domain::healer::HealRecord,
    domain::node::{Automation, NodeId, NodeState},
    edge::webhook::OutboxEntry,
};

/// Where a backend keeps its data: opening it again sees what was written.
pub(crate) trait Backing {
    /// Opens the store (again).
    fn open(&mut self) -> Box<dyn Store>;
}

pub(crate) fn node(n: u16, state: NodeState) -> PersistedNode {
    PersistedNode {
        id: NodeId(Uuid::from_u128(u128::from(n) + 1)),
        hostname: format!("edge-{n}"),
        ip: IpAddr::V4(Ipv4Addr::new(10, 0, (n >> 8) as u8, n as u8)),
        agent_version: "1".into(),
        labels: [("zone".to_owned(), "a".to_owned())].into(),
        state,
        state_reason: String::new(),
        termination: None,
        // Some records carry a drain mark or maintenance: both round-trip.
        drain: (n % 3 == 1).then(|| crate::domain::node::PersistedDrain {
            reason: format!("drain {n}"),
            completed: n.is_multiple_of(2),
            timeout_seconds: 60.0,
            then_terminate: n.is_multiple_of(5).then(|| "scale down".to_owned()),
            scale_down: n
                .is_multiple_of(5)
                .then_some(crate::domain::node::ScaleDown { cpu: 0.05 }),
        }),
        maintenance: (n % 4 == 2).then(|| crate::domain::node::PersistedMaintenance {
            reason: format!("kernel patch {n}"),
        }),
        boot_id: (n % 2 == 1).then(|| format!("boot-{n}")),
    }
}

pub(crate) fn entry(id: &str, seconds: u64) -> OutboxEntry {
    OutboxEntry {
        id: id.into(),
        reason: "UNEXPECTED_NODE_FAILURE".into(),
        created_at: SystemTime::UNIX_EPOCH + Duration::from_secs(seconds),
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        body: br#"{"reason":"UNEXPECTED_NODE_FAILURE"}"#.to_vec(),
    }
}

fn sorted(mut nodes: Vec<PersistedNode>) -> Vec<PersistedNode> {
    nodes.sort_by_key(|node| node.id);
    nodes
}

pub(crate) fn everything_written_is_there_after_reopening(backing: &mut dyn Backing) {
    let mut terminating = node(2, NodeState::Terminating);
    terminating.termination = Some(PersistedTermination {
        reason: "scale down".into(),
        acknowledged: true,
    });
    let heal = HealRecord {
        at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        node: node(1, NodeState::Failed).id,
        domain: "pop=fra1".into(),
    };
    {
        let mut store = backing.open();
        store
            .apply(&[
                Write::PutNode(node(1, NodeState::Connected)),
                Write::PutNode(terminating.clone()),
                Write::PutOutbox(entry("msg_b", 20)),
                Write::PutOutbox(entry("msg_a", 10)),
                Write::PutHeal(heal.clone()),
                Write::PutEventEpoch(6),
                Write::PutAutomation(Automation {
                    healing: true,
                    scaling: true,
                }),
            ])
            .unwrap();
        store
            .apply(&[
                Write::PutNode(node(1, NodeState::Failed)),
                Write::PutNode(node(3, NodeState::Left)),
                Write::DeleteNode(node(3, NodeState::Left).id),
                Write::PutAutomation(Automation {
                    healing: false,
                    scaling: true,
                }),
            ])
            .unwrap();
    }
    let state = backing.open().load().unwrap();
    assert_eq!(
        sorted(state.nodes),
        sorted(vec![node(1, NodeState::Failed), terminating])
    );
    let ids: Vec<_> = state.outbox.iter().map(|entry| entry.id.as_str()).collect();
    assert_eq!(ids, ["msg_a", "msg_b"], "oldest first");
    assert_eq!(state.outbox[0], entry("msg_a", 10));
    assert_eq!(state.heals, vec![heal]);
    assert_eq!(state.event_epoch, 6);
    assert_eq!(
        state.automation,
        Automation {
            healing: false,
            scaling: true
        },
        "the latest automation switch is kept"
    );
}

pub(crate) fn delivered_entries_go_and_dead_letters_are_kept_aside(backing: &mut dyn Backing) {
    let mut store = backing.open();
    store
        .apply(&[
            Write::PutOutbox(entry("msg_1", 1)),
            Write::PutOutbox(entry("msg_2", 2)),
            Write::PutOutbox(entry("msg_3", 3)),
        ])
        .unwrap();
    let moves = [
        Write::DeleteOutbox("msg_1".into()),
        Write::DeadLetter("msg_2".into()),
    ];
    store.apply(&moves).unwrap();
    // A retried batch (its answer was lost) changes nothing more.
    store.apply(&moves).unwrap();
    let state = store.load().unwrap();
    assert_eq!(state.outbox, vec![entry("msg_3", 3)]);
    assert_eq!(state.dead_letters, 1);
}

pub(crate) fn pruning_keeps_only_recent_heals(backing: &mut dyn Backing) {
    let mut store = backing.open();
    let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
    let heals: Vec<_> = [100, 200, 300]
        .into_iter()
        .map(|s| HealRecord {
            at: at(s),
            node: NodeId(Uuid::from_u128(s.into())),
            domain: String::new(),
        })
        .collect();
    store
        .apply(&heals.iter().cloned().map(Write::PutHeal).collect::<Vec<_>>())
        .unwrap();
    store.apply(&[Write::PruneHeals { before: at(200) }]).unwrap();
    assert_eq!(store.load().unwrap().heals, heals[1..].to_vec());
}

pub(crate) fn history_is_kept_in_time_order_and_pruned_by_time(backing: &mut dyn Backing) {
    let mut store = backing.open();
    let point = |t: f64| Point { t, value: t / 1e10 };
    store
        .apply(&[
            Write::PutHistory(point(1_700_000_120.0)),
            Write::PutHistory(point(1_700_000_000.0)),
            Write::PutHistory(point(1_700_000_060.5)),
        ])
        .unwrap();
    store
        .apply(&[Write::PruneHistory {
            before: 1_700_000_060.0,
        }])
        .unwrap();
    assert_eq!(
        store.load().unwrap().history,
        vec![point(1_700_000_060.5), point(1_700_000_120.0)]
    );
}

/// A reconnect storm's batch (more writes than one etcd transaction holds), with
/// the same node written twice and a heal at its end, applied twice.
pub(crate) fn a_large_batch_is_written_whole_and_a_repeated_one_changes_nothing(backing: &mut dyn Backing) {
    let mut store = backing.open();
    let mut batch: Vec<Write> = (0..1500)
        .map(|n| Write::PutNode(node(n, NodeState::Connected)))
        .collect();
    batch.push(Write::PutNode(node(7, NodeState::Failed)));
    let heal = HealRecord {
        at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        node: node(7, NodeState::Failed).id,
        domain: String::new(),
    };
    batch.push(Write::PutHeal(heal.clone()));
    batch.push(Write::PutOutbox(entry("msg_heal_7", 5)));
    store.apply(&batch).unwrap();
    store.apply(&batch).unwrap();
    let state = store.load().unwrap();
    assert_eq!(state.nodes.len(), 1500);
    let seven = state
        .nodes
        .iter()
        .find(|n| n.id == node(7, NodeState::Failed).id)
        .unwrap();
    assert_eq!(seven.state, NodeState::Failed, "the later write of a node wins");
    assert_eq!(state.heals, vec![heal]);
    assert_eq!(state.outbox, vec![entry("msg_heal_7", 5)]);
}

/// Nodes with the most and longest labels a Hello may carry, every character one
/// that JSON escapes: more bytes than one etcd request or one default gRPC
/// response holds, written in one batch and read back whole.
pub(crate) fn nodes_with_the_largest_labels_are_written_and_loaded(backing: &mut dyn Backing) {
    let mut store = backing.open();
    let heavy = |n: u16, i: usize| {
        let mut text = format!("{n}-{i}-");
        while text.len() < 128 {
            text.push(if text.len() % 2 == 0 { '"' } else { '\\' });
        }
        text
    };
    let nodes: Vec<PersistedNode> = (0..1200)
        .map(|n| PersistedNode {
            labels: (0..32).map(|i| (heavy(n, i), heavy(n, i + 100))).collect(),
            ..node(n, NodeState::Connected)
        })
        .collect();
    let batch: Vec<Write> = nodes.iter().cloned().map(Write::PutNode).collect();
    store.apply(&batch).unwrap();
    let state = store.load().unwrap();
    assert_eq!(sorted(state.nodes), sorted(nodes));
}
