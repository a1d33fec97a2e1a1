//! A small etcd v3 client on the project's tonic: the calls the orchestrator
//! makes, each with its own deadline, rotating to the next endpoint when one fails.
//!
//! Written here rather than taken from the `etcd-client` crate because of three
//! behaviours measured with it: one global request timeout also cut the blocking
//! campaign call, it kept sending to a dead member of a multi-endpoint cluster, and
//! its build needs a system `protoc`. Here every call has its own deadline
//! (`etcd_request_timeout`), a call that fails or times out on one member is tried
//! on the next (and later calls start at the member that answered last), and the
//! stubs come from etcd's own protos built with the vendored protoc (`build.rs`).
//! Transport-level HTTP/2 keep-alive pings are left off: etcd drops clients that
//! ping more often than every 5 s; the lease keep-alive is an ordinary call.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use secbeat::etcdpb::etcdserverpb::{
    self as pb, kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient,
};
use tokio_stream::StreamExt as _;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::edge::metrics::Metrics;

/// Largest response read from etcd: a page of up to 1,000 of the largest node
/// records is about 17 MB, beyond gRPC's default of 4 MiB.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// An etcd call that failed on every endpoint, or that etcd refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered in time; what each said.
    #[error("no etcd endpoint answered {call}: {tried}")]
    Unreachable {
        /// The call.
        call: &'static str,
        /// `endpoint: error` for each endpoint tried.
        tried: String,
    },
    /// etcd answered with an error that another endpoint would repeat.
    #[error("etcd refused {call} at {endpoint}: {message}")]
    Refused {
        /// The call.
        call: &'static str,
        /// The endpoint that answered.
        endpoint: String,
        /// etcd's message.
        message: String,
    },
    /// A configuration problem (a bad URL, unreadable TLS files).
    #[error("{0}")]
    Config(String),
}

/// TLS files for etcd, read.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    /// CA certificates (PEM).
    pub ca: Option<Vec<u8>>,
    /// Client certificate and key (PEM).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// A handle to an etcd cluster. Cheap to clone; every clone shares the channels
/// and the memory of which endpoint answered last.
#[derive(Debug, Clone)]
pub struct EtcdClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    members: Vec<Member>,
    current: AtomicUsize,
    timeout: Duration,
    metrics: Metrics,
}

#[derive(Debug)]
struct Member {
    url: String,
    channel: Channel,
}

/// Whether a failed call is worth trying on another member.
fn retriable(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled | Code::Internal => true,
        // "etcdserver: leader changed", "no leader", "request timed out".
        _ => {
            let message = status.message();
            message.contains("leader changed")
                || message.contains("no leader")
                || message.contains("timed out")
                || message.contains("not capable")
        }
    }
}

impl EtcdClient {
    /// Channels to every endpoint, connected lazily (a member that is down at start
    /// is tried again on every call that reaches it).
    pub fn new(
        endpoints: &[String],
        tls: Option<EtcdTls>,
        timeout: Duration,
        metrics: Metrics,
    ) -> Result<Self, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::Config("etcd_endpoints: no endpoint given".into()));
        }
        let mut members = Vec::with_capacity(endpoints.len());
        for url in endpoints {
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|error| EtcdError::Config(format!("etcd_endpoints: {url}: {error}")))?
                .connect_timeout(timeout)
                .tcp_nodelay(true);
            if let Some(tls) = &tls {
                let mut config = ClientTlsConfig::new();
                if let Some(ca) = &tls.ca {
                    config = config.ca_certificate(tonic::transport::Certificate::from_pem(ca));
                }
                if let Some((cert, key)) = &tls.identity {
                    config = config.identity(tonic::transport::Identity::from_pem(cert, key));
                }
                endpoint = endpoint
                    .tls_config(config)
                    .map_err(|error| EtcdError::Config(format!("etcd_tls: {url}: {error}")))?;
            }
            members.push(Member {
                url: url.clone(),
                channel: endpoint.connect_lazy(),
            });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                members,
                current: AtomicUsize::new(0),
                timeout,
                metrics,
            }),
        })
    }

    /// The deadline of one call.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Runs `call` on the member that answered last, then on each other member in
    /// turn while it fails in a way another member might not.
    async fn call<T, F, Fut>(&self, name: &'static str, call: F) -> Result<T, EtcdError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let members = &self.inner.members;
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut tried = Vec::new();
        for step in 0..members.len() {
            let index = (start + step) % members.len();
            let member = &members[index];
            match tokio::time::timeout(self.inner.timeout, call(member.channel.clone())).await {
                Ok(Ok(value)) => {
                    self.inner.current.store(index, Ordering::Relaxed);
                    return Ok(value);
                }
                Ok(Err(status)) if !retriable(&status) => {
                    self.inner.metrics.etcd_errors.inc();
                    return Err(EtcdError::Refused {
                        call: name,
                        endpoint: member.url.clone(),
                        message: status.message().to_owned(),
                    });
                }
                Ok(Err(status)) => {
                    self.inner.metrics.etcd_errors.inc();
                    let detail = if status.message().is_empty() {
                        format!("{:?}", status.code())
                    } else {
                        status.message().to_owned()
                    };
                    tried.push(format!("{}: {detail}", member.url));
                }
                Err(_) => {
                    self.inner.metrics.etcd_errors.inc();
                    tried.push(format!(
                        "{}: no answer within {:?} (etcd_request_timeout)",
                        member.url, self.inner.timeout
                    ));
                }
            }
        }
        // Next time, start past the member that failed first.
        self.inner
            .current
            .store((start + 1) % members.len(), Ordering::Relaxed);
        Err(EtcdError::Unreachable {
            call: name,
            tried: tried.join("; "),
        })
    }

    /// One range read. `revision` 0 reads the latest.
    pub async fn range(&self, request: pb::RangeRequest) -> Result<pb::RangeResponse, EtcdError> {
        self.call("Range", |channel| {
            let request = request.clone();
            async move {
                Ok(KvClient::new(channel)
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
                    .range(request)
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    /// One transaction, timed into `orchestrator_etcd_txn_seconds`.
    ///
    /// A transaction whose answer was lost may have been applied; the orchestrator's
    /// transactions are written so that applying one twice changes nothing more.
    pub async fn txn(&self, request: pb::TxnRequest) -> Result<pb::TxnResponse, EtcdError> {
        let started = Instant::now();
        let outcome = self
            .call("Txn", |channel| {
                let request = request.clone();
                async move {
                    Ok(KvClient::new(channel)
                        .max_decoding_message_size(MAX_RESPONSE_BYTES)
                        .txn(request)
                        .await?
                        .into_inner())
                }
            })
            .await;
        self.inner
            .metrics
            .etcd_txn_seconds
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    /// Grants a lease of `ttl` seconds; returns its id.
    pub async fn grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let response = self
            .call("LeaseGrant", |channel| async move {
                Ok(LeaseClient::new(channel)
                    .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
                    .await?
                    .into_inner())
            })
            .await?;
        if !response.error.is_empty() {
            return Err(EtcdError::Refused {
                call: "LeaseGrant",
                endpoint: String::new(),
                message: response.error,
            });
        }
        Ok(response.id)
    }

    /// Revokes a lease (its keys go at once).
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("LeaseRevoke", |channel| async move {
            LeaseClient::new(channel)
                .lease_revoke(pb::LeaseRevokeRequest { id })
                .await?;
            Ok(())
        })
        .await
    }

    /// Renews a lease once; returns the TTL etcd granted (0: the lease is gone).
    pub async fn keep_alive(&self, id: i64) -> Result<i64, EtcdError> {
        self.call("LeaseKeepAlive", |channel| async move {
            let request = tokio_stream::once(pb::LeaseKeepAliveRequest { id });
            let mut responses = LeaseClient::new(channel)
                .lease_keep_alive(request)
                .await?
                .into_inner();
            match responses.message().await? {
                Some(response) => Ok(response.ttl),
                None => Err(tonic::Status::unavailable(
                    "keep-alive stream closed without an answer",
                )),
            }
        })
        .await
    }

    /// Seconds left on a lease (etcd rounds down; -1 once it has expired).
    pub async fn time_to_live(&self, id: i64) -> Result<i64, EtcdError> {
        self.call("LeaseTimeToLive", |channel| async move {
            Ok(LeaseClient::new(channel)
                .lease_time_to_live(pb::LeaseTimeToLiveRequest { id, keys: false })
                .await?
                .into_inner()
                .ttl)
        })
        .await
    }

    /// Opens a watch of `key` from `start_revision` on the member that answered
    /// last. The stream ends or errs when that member goes; callers poll as well.
    pub async fn watch(
        &self,
        key: Vec<u8>,
        start_revision: i64,
    ) -> Result<tonic::Streaming<pb::WatchResponse>, EtcdError> {
        self.call("Watch", |channel| {
            let key = key.clone();
            async move {
                let create = pb::WatchRequest {
                    request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                        pb::WatchCreateRequest {
                            key,
                            start_revision,
                            ..Default::default()
                        },
                    )),
                };
                // The request stream stays open (pending) so etcd keeps the watch.
                let requests = tokio_stream::once(create).chain(tokio_stream::pending());
                Ok(WatchClient::new(channel).watch(requests).await?.into_inner())
            }
        })
        .await
    }
}
