//! The etcd backend: a small client of etcd's v3 API ([`client`]), the leader
//! election with its fencing token ([`coordinator`]) and the fenced [`Store`]
//! ([`store`]).
//!
//! Layout under `etcd_prefix` (default `/secbeat/`), values JSON as in redb:
//!
//! | key | value |
//! |---|---|
//! | `leader` | the leader's [`LeaderInfo`], on its lease |
//! | `nodes/<id>` | a known node |
//! | `heals/<unix nanos, 20 digits>/<node id>` | a self-healing ledger entry |
//! | `outbox/<webhook id>` | an undelivered webhook |
//! | `dead/<webhook id>` | a webhook given up on |
//! | `history/<unix ms, 20 digits>` | a fleet CPU history point |
//! | `meta/event_epoch` | the last leader term's event epoch |
//!
//! [`Store`]: crate::edge::store::Store

pub mod client;
pub mod coordinator;
pub mod store;
#[cfg(test)]
pub(crate) mod testing;

use secbeat::etcdpb::etcdserverpb::{self as pb, compare, request_op};
use serde::{Deserialize, Serialize};

/// What the leader key holds: where to find the leader, and which fleet it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The leader's `advertise_url` (the `secbeat-leader` hint).
    pub url: String,
    /// A fingerprint of the fleet it runs (its provisioning webhook URL): two fleets
    /// put under one `etcd_prefix` by mistake tell each other apart by it.
    pub fleet: String,
}

/// The fleet fingerprint of [`LeaderInfo::fleet`].
pub fn fleet_fingerprint(provisioning_webhook_url: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(provisioning_webhook_url.as_bytes());
    digest[..8].iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A put of `key`, on `lease` (0: none).
pub fn put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestPut(pb::PutRequest {
            key,
            value,
            lease,
            ..Default::default()
        })),
    }
}

/// A delete of `key`, or of `[key, range_end)` when `range_end` is not empty.
pub fn delete(key: Vec<u8>, range_end: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
            key,
            range_end,
            prev_kv: false,
        })),
    }
}

/// "`key` was created at `revision`" (0: `key` does not exist): the fence of
/// every leader write, and the campaign's condition.
pub fn created_at(key: Vec<u8>, revision: i64) -> pb::Compare {
    pb::Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key,
        target_union: Some(compare::TargetUnion::CreateRevision(revision)),
        range_end: Vec::new(),
    }
}

/// The first key after every key that starts with `prefix` (etcd's range end for
/// "all keys with this prefix").
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: the range runs to the end of the key space.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/secbeat/nodes/"), b"/secbeat/nodes0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn the_fleet_fingerprint_is_stable_and_tells_fleets_apart() {
        let a = fleet_fingerprint("http://provisioner-a/provision");
        assert_eq!(a, fleet_fingerprint("http://provisioner-a/provision"));
        assert_ne!(a, fleet_fingerprint("http://provisioner-b/provision"));
        assert_eq!(a.len(), 16);
    }
}
