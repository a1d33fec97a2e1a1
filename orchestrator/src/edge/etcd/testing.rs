//! A real single-member etcd for the backend's tests: the `etcd` binary (Debian's
//! etcd-server, which `scripts/test` installs) on free loopback ports with a
//! temporary data directory, killed when dropped. Without the binary the tests say
//! so and pass, unless `SECBEAT_REQUIRE_ETCD=1` (set by `scripts/test` and CI),
//! which makes a missing etcd a failure.

use std::{
    io::BufRead,
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use secbeat::etcdpb::etcdserverpb as pb;

use super::client::EtcdClient;
use crate::edge::metrics::Metrics;

/// A running etcd member.
pub(crate) struct TestEtcd {
    child: Child,
    _data: tempfile::TempDir,
    /// Its client URL.
    pub url: String,
    /// A runtime for the client calls (the store's sync API blocks on it).
    pub runtime: tokio::runtime::Runtime,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl TestEtcd {
    /// Starts etcd, or None (with a note on stderr) when it is not installed and
    /// not required.
    pub(crate) fn start() -> Option<Self> {
        let binary = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".to_owned());
        if Command::new(&binary).arg("--version").output().is_err() {
            assert!(
                std::env::var("SECBEAT_REQUIRE_ETCD").as_deref() != Ok("1"),
                "etcd is required (SECBEAT_REQUIRE_ETCD=1) but `{binary}` is not installed (apt-get install etcd-server)"
            );
            eprintln!(
                "SKIPPED: `{binary}` is not installed (apt-get install etcd-server, or run scripts/test)"
            );
            return None;
        }
        let data = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut child = Command::new(&binary)
            .args(["--name", "test", "--data-dir"])
            .arg(data.path())
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // etcd says when it serves clients; wait for that line, not by polling.
        let (ready_tx, ready) = mpsc::channel();
        let stderr = std::io::BufReader::new(child.stderr.take().expect("piped"));
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if line.contains("ready to serve client requests") {
                    let _ = ready_tx.send(());
                }
            }
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let etcd = Self {
            child,
            _data: data,
            url,
            runtime,
        };
        ready
            .recv_timeout(Duration::from_secs(20))
            .expect("etcd serves clients within 20 s");
        etcd.runtime
            .block_on(etcd.client().range(pb::RangeRequest {
                key: b"ready".to_vec(),
                ..Default::default()
            }))
            .expect("etcd answers once it says it is ready");
        Some(etcd)
    }

    /// A client of this member.
    pub(crate) fn client(&self) -> EtcdClient {
        let _guard = self.runtime.enter();
        EtcdClient::new(
            std::slice::from_ref(&self.url),
            None,
            Duration::from_secs(2),
            Metrics::new(),
        )
        .unwrap()
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
