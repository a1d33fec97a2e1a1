//! A real 3-member etcd cluster (Debian's etcd-server) on loopback ports with
//! temporary data directories, for the high-availability tests. Members are child
//! processes: killed by PID with real signals, and when the cluster drops.
//!
//! Without the `etcd` binary [`EtcdCluster::start`] returns None and the test says
//! it is skipped, unless `SECBEAT_REQUIRE_ETCD=1` (set by `scripts/test` and CI,
//! which install etcd-server), where a missing etcd fails the test.

use std::{net::TcpListener, time::Duration};

use tokio::process::Command;

use crate::{eventually, process::Process};

/// One member.
#[derive(Debug)]
pub struct EtcdMember {
    /// Its process.
    pub process: Process,
    /// Its client URL.
    pub client_url: String,
    /// Its name in the cluster.
    pub name: String,
}

/// A running cluster.
#[derive(Debug)]
pub struct EtcdCluster {
    /// The members, in start order.
    pub members: Vec<EtcdMember>,
    _data: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

fn binary() -> String {
    std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".to_owned())
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster answers; None (and a
    /// note) when etcd is not installed and not required.
    pub async fn start(size: usize) -> Option<Self> {
        if std::process::Command::new(binary())
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var("SECBEAT_REQUIRE_ETCD").as_deref() != Ok("1"),
                "etcd is required (SECBEAT_REQUIRE_ETCD=1) but `{}` is not installed (apt-get install etcd-server)",
                binary()
            );
            eprintln!("SKIPPED: etcd is not installed (apt-get install etcd-server, or run scripts/test)");
            return None;
        }
        let data = tempfile::tempdir().expect("a temp dir");
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut command = Command::new(binary());
            command
                .args(["--name", &name, "--data-dir"])
                .arg(data.path().join(&name))
                .args([
                    "--listen-client-urls",
                    &client_url,
                    "--advertise-client-urls",
                    &client_url,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer_url,
                    "--initial-advertise-peer-urls",
                    &peer_url,
                ])
                .args(["--initial-cluster", &initial, "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "secbeat-test"])
                // Loopback: elect quickly.
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"]);
            let process = Process::spawn(&format!("etcd-{name}"), &mut command).expect("etcd starts");
            members.push(EtcdMember {
                process,
                client_url,
                name,
            });
        }
        let cluster = Self { members, _data: data };
        eventually(
            Duration::from_secs(30),
            "the etcd cluster to elect a leader",
            || async { cluster.leader().await },
        )
        .await;
        Some(cluster)
    }

    /// Every member's client URL, comma-separated (`etcd_endpoints`).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|member| member.client_url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The TOML line configuring every member as `etcd_endpoints`.
    pub fn endpoints_toml(&self) -> String {
        let quoted: Vec<String> = self
            .members
            .iter()
            .map(|member| format!("\"{}\"", member.client_url))
            .collect();
        format!("etcd_endpoints = [{}]\n", quoted.join(", "))
    }

    /// The index of the raft leader, asked of the members with etcdctl.
    pub async fn leader(&self) -> Option<usize> {
        let output = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "endpoint",
                "status",
                "-w",
                "json",
                "--command-timeout=1s",
                "--endpoints",
            ])
            .arg(self.endpoints())
            .output()
            .await
            .ok()?;
        let statuses: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        statuses.as_array()?.iter().find_map(|status| {
            let member = status["Status"]["header"]["member_id"].as_u64()?;
            let leader = status["Status"]["leader"].as_u64()?;
            (member == leader).then(|| {
                let endpoint = status["Endpoint"].as_str()?;
                self.members.iter().position(|m| m.client_url == endpoint)
            })?
        })
    }
}
