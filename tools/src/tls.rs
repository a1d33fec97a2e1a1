//! TLS for simulated agents: a client configuration per agent (its own
//! certificate, its own session tickets) and a connector that dials from a
//! chosen source address, as tonic's own TLS cannot do both.
//!
//! tonic builds a new rustls client configuration, and with it an empty
//! session cache, for every endpoint it is given; the simulator renews its
//! endpoint after every lost connection, so with tonic's TLS no reconnect could
//! ever resume. Here each agent keeps one configuration for its whole life, so
//! a reconnect after an orchestrator restart presents the ticket it was given,
//! exactly as the real agent (one endpoint per orchestrator, kept) does.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    client::{ClientSessionMemoryCache, Resumption},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::{TlsConnector, client::TlsStream};

/// Tickets one simulated agent keeps (it talks to one or two orchestrators).
const TICKETS_PER_AGENT: usize = 4;

/// How simulated agents speak TLS.
#[derive(Clone)]
pub struct ClientTls {
    roots: Arc<RootCertStore>,
    /// Whether agents keep session tickets and resume with them.
    pub resumption: bool,
}

impl ClientTls {
    /// Trusts the CA certificates in `ca_pem` for the orchestrator.
    pub fn new(ca_pem: &[u8], resumption: bool) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(cert?)?;
        }
        anyhow::ensure!(!roots.is_empty(), "no CA certificate in the file");
        Ok(Self {
            roots: Arc::new(roots),
            resumption,
        })
    }

    /// One agent's configuration: with its certificate and key (PEM) for mTLS,
    /// or none for TLS only.
    pub fn agent(&self, identity: Option<(&str, &str)>) -> anyhow::Result<Arc<ClientConfig>> {
        let builder = ClientConfig::builder().with_root_certificates(self.roots.clone());
        let mut config = match identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
                builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key.as_bytes())?)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.resumption = if self.resumption {
            Resumption::store(Arc::new(ClientSessionMemoryCache::new(TICKETS_PER_AGENT)))
        } else {
            Resumption::disabled()
        };
        Ok(Arc::new(config))
    }
}

/// Dials the orchestrator from `source` (if given) and runs the TLS handshake
/// with `config`: a connector for `Endpoint::connect_with_connector`.
#[derive(Clone)]
pub struct TlsDialer {
    /// The agent's (or group's) client configuration.
    pub config: Arc<ClientConfig>,
    /// The local address to dial from.
    pub source: Option<IpAddr>,
}

type Dialing = Pin<Box<dyn Future<Output = io::Result<TokioIo<TlsStream<TcpStream>>>> + Send>>;

impl tower_service::Service<http::Uri> for TlsDialer {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Dialing;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (config, source) = (self.config.clone(), self.source);
        Box::pin(async move {
            let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: {what}"));
            let host = uri
                .host()
                .ok_or_else(|| invalid("no host"))?
                .trim_matches(['[', ']']);
            let port = uri.port_u16().unwrap_or(443);
            let address = tokio::net::lookup_host((host, port))
                .await?
                .next()
                .ok_or_else(|| invalid("the host has no address"))?;
            let socket = if address.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            if let Some(source) = source {
                socket.bind(SocketAddr::new(source, 0))?;
            }
            socket.set_nodelay(true)?;
            let stream = socket.connect(address).await?;
            let name = ServerName::try_from(host.to_owned()).map_err(|_| invalid("not a server name"))?;
            let tls = TlsConnector::from(config).connect(name, stream).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
