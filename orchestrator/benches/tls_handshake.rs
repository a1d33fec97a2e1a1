//! What one mTLS handshake costs the two ends together, in memory: the
//! orchestrator's own listener configuration (`edge::tls::server_config`, with
//! `client_ca` and its session tickets) against an agent's client configuration
//! (its own certificate from the `certs` tooling, a ticket store, rustls's
//! defaults otherwise). No sockets: the records are handed across in buffers, so
//! the figure is the TLS work alone, client and server, for one connection.
//!
//! A reconnect storm after a restart is, per agent, this plus what plain text
//! costs (TCP, HTTP/2, Hello, Welcome). On a box where the simulator shares the
//! cores with the orchestrator, both ends' work is paid on the same cores, which
//! is why both are timed together here. BENCHMARKS.md ("mTLS at fleet scale")
//! turns these figures into the storm's lower bound.
//!
//! - `full`: a client without tickets (a first connection, or
//!   `--no-tls-resumption`): ECDHE, the server's signature, the client's
//!   certificate and signature, and both chains verified;
//! - `resumed`: a client presenting a ticket from its previous connection, as
//!   every agent does after a restart: still a fresh X25519 exchange on each
//!   side, no signatures; the server issues its tickets (two, rustls's default)
//!   and the client stores them;
//! - `resumed, one ticket`: the same with the listener sending one ticket;
//! - `x25519 only`: the two ephemeral key exchanges a resumed handshake cannot
//!   skip (TLS 1.3 resumption with rustls is always `psk_dhe_ke`), the floor.
//!
//! `cargo bench -p secbeat-orchestrator --bench tls_handshake`

use std::{hint::black_box, sync::Arc};

use criterion::{Criterion, criterion_group, criterion_main};
use ring::{agreement, rand::SystemRandom};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
    client::{ClientSessionMemoryCache, Resumption},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use secbeat_orchestrator::edge::{
    certs::{self, AgentIssuer},
    tls::{self, TlsFiles},
};
use uuid::Uuid;

/// Moves everything `from` has to send into `to`, and lets `to` process it.
fn deliver(from: &mut rustls::Connection, to: &mut rustls::Connection, wire: &mut Vec<u8>) -> bool {
    wire.clear();
    while from.wants_write() {
        from.write_tls(wire).expect("writes into memory");
    }
    if wire.is_empty() {
        return false;
    }
    let mut rest = &wire[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).expect("reads from memory");
        to.process_new_packets().expect("a valid flight");
    }
    true
}

/// One connection, handshake and tickets, both ends; says whether it resumed.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>, wire: &mut Vec<u8>) -> bool {
    let name = ServerName::try_from("localhost").expect("a name");
    let mut client = rustls::Connection::Client(ClientConnection::new(client.clone(), name).expect("client"));
    let mut server = rustls::Connection::Server(ServerConnection::new(server.clone()).expect("server"));
    loop {
        let sent = deliver(&mut client, &mut server, wire);
        let answered = deliver(&mut server, &mut client, wire);
        if !sent && !answered && !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
    }
    server.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

struct Setup {
    _dir: tempfile::TempDir,
    server: Arc<ServerConfig>,
    roots: Arc<RootCertStore>,
    identity: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("a temporary directory");
    certs::init(dir.path(), &[]).expect("certs init");
    let files = TlsFiles {
        cert: dir.path().join("orchestrator.pem"),
        key: dir.path().join("orchestrator.key"),
        client_ca: Some(dir.path().join("ca.pem")),
        ticket_key: None,
    };
    let server = tls::server_config(&files, dir.path()).expect("the listener's configuration");
    let mut roots = RootCertStore::empty();
    let ca = std::fs::read(dir.path().join("ca.pem")).expect("ca.pem");
    roots
        .add(CertificateDer::from_pem_slice(&ca).expect("PEM"))
        .expect("a CA");
    let (cert, key) = AgentIssuer::load(dir.path())
        .expect("the CA")
        .issue(Uuid::new_v4())
        .expect("an agent certificate");
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM");
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("PEM");
    Setup {
        _dir: dir,
        server,
        roots: Arc::new(roots),
        identity: (chain, key),
    }
}

impl Setup {
    /// An agent's configuration: rustls's defaults, its certificate, ALPN h2.
    fn client(&self, resumption: Resumption) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.identity.0.clone(), self.identity.1.clone_key())
            .expect("the agent's certificate");
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.resumption = resumption;
        Arc::new(config)
    }
}

fn handshakes(c: &mut Criterion) {
    let setup = setup();
    let mut wire = Vec::with_capacity(16 * 1024);
    let mut group = c.benchmark_group("mtls_handshake_both_ends");

    let full = setup.client(Resumption::disabled());
    assert!(!handshake(&full, &setup.server, &mut wire));
    group.bench_function("full", |b| {
        b.iter(|| black_box(handshake(&full, &setup.server, &mut wire)))
    });

    let one_ticket = {
        let mut config = (*setup.server).clone();
        config.send_tls13_tickets = 1;
        Arc::new(config)
    };
    for (name, server) in [("resumed", &setup.server), ("resumed, one ticket", &one_ticket)] {
        let resuming = setup.client(Resumption::store(Arc::new(ClientSessionMemoryCache::new(4))));
        assert!(!handshake(&resuming, server, &mut wire), "the first is full");
        assert!(handshake(&resuming, server, &mut wire), "then each resumes");
        group.bench_function(name, |b| {
            b.iter(|| assert!(handshake(&resuming, server, &mut wire), "{name}: resumed"))
        });
    }

    let random = SystemRandom::new();
    group.bench_function("x25519 only", |b| {
        b.iter(|| {
            let client =
                agreement::EphemeralPrivateKey::generate(&agreement::X25519, &random).expect("a key");
            let server =
                agreement::EphemeralPrivateKey::generate(&agreement::X25519, &random).expect("a key");
            let client_public = client.compute_public_key().expect("public");
            let server_public = server.compute_public_key().expect("public");
            let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, server_public.as_ref().to_vec());
            let a = agreement::agree_ephemeral(client, &peer, |secret| secret[0]).expect("agreed");
            let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, client_public.as_ref().to_vec());
            let b = agreement::agree_ephemeral(server, &peer, |secret| secret[0]).expect("agreed");
            assert_eq!(a, b);
        })
    });
    group.finish();
}

criterion_group!(benches, handshakes);
criterion_main!(benches);
