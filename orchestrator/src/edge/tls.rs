//! TLS on the gRPC listener: the server configuration, session tickets whose key
//! survives a restart, and handshakes run beside the accept loop.
//!
//! Why not tonic's `ServerTlsConfig`: it keeps resumable sessions in a cache of
//! 256 entries in memory. A fleet reconnecting after a restart (or a network
//! event) is tens of thousands of full handshakes, each with a signature and a
//! certificate chain check on both sides. With TLS 1.3 session tickets under a key
//! kept in `state_dir` (or a file the operator gives, shared by the orchestrators
//! of a highly available pair), an agent that was connected before resumes with a
//! pre-shared key instead. The ticket still carries the agent's certificate, so
//! authorization reads the same node id either way.
//!
//! The key is 32 random bytes (ChaCha20-Poly1305), written with mode 0600. The
//! default key is replaced when it is older than [`KEY_LIFETIME`], at start and
//! while running. While running, tickets of the previous key are still accepted
//! until the next change; a key replaced at start-up is not kept (its agents make
//! one full handshake). A key file the operator gives is used as it is.

use std::{
    fmt, io,
    io::Write as _,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use futures_util::{Stream, StreamExt};
use ring::{
    aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};
use rustls::{
    HandshakeKind, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ProducesTickets, WebPkiClientVerifier},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::edge::metrics::Metrics;

/// How long the default ticket key is used before it is replaced.
pub const KEY_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long a client may keep a ticket (a hint to it; the key's rotation bounds
/// it too).
const TICKET_LIFETIME_SECS: u32 = 12 * 3600;
/// The default key's file name in `state_dir`.
pub const DEFAULT_KEY_FILE: &str = "tls-session-ticket.key";
const KEY_LEN: usize = 32;
/// Handshakes in flight at once; more wait in the accept queue.
const HANDSHAKES_IN_FLIGHT: usize = 1024;

/// Why TLS could not be set up; the message names the config key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{key}: cannot use {path}: {source}")]
    File {
        /// The config key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file's contents are not what the key needs.
    #[error("{key}: {detail}")]
    Invalid {
        /// The config key.
        key: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// The PEM files and ticket key of the gRPC listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// `tls.cert`.
    pub cert: PathBuf,
    /// `tls.key`.
    pub key: PathBuf,
    /// `tls.client_ca`, turning client certificates on.
    pub client_ca: Option<PathBuf>,
    /// `tls.session_ticket_key`, or None for the default in `state_dir`.
    pub ticket_key: Option<PathBuf>,
}

/// A TLS file named by config `key` (`tls.*` or `etcd_tls.*`).
pub fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::File {
        key,
        path: path.to_owned(),
        source,
    })
}

/// The rustls server configuration: the server's certificate, client
/// certificates checked against `client_ca` when set (optional at the TLS layer:
/// an operator may come with a token instead; AgentService requires the
/// certificate, and each service checks its rule), HTTP/2, and session tickets.
pub fn server_config(files: &TlsFiles, state_dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&read_file("tls.cert", &files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Invalid {
            key: "tls.cert",
            detail: format!("{}: not PEM certificates: {error}", files.cert.display()),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            key: "tls.cert",
            detail: format!("{}: no certificate in the file", files.cert.display()),
        });
    }
    let private = PrivateKeyDer::from_pem_slice(&read_file("tls.key", &files.key)?).map_err(|error| {
        TlsError::Invalid {
            key: "tls.key",
            detail: format!("{}: not a PEM private key: {error}", files.key.display()),
        }
    })?;
    let builder = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Invalid {
            key: "tls",
            detail: format!("the TLS provider: {error}"),
        })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read_file("tls.client_ca", path)?) {
                let cert = cert.map_err(|error| TlsError::Invalid {
                    key: "tls.client_ca",
                    detail: format!("{}: not PEM certificates: {error}", path.display()),
                })?;
                roots.add(cert).map_err(|error| TlsError::Invalid {
                    key: "tls.client_ca",
                    detail: format!("{}: {error}", path.display()),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .allow_unauthenticated()
                .build()
                .map_err(|error| TlsError::Invalid {
                    key: "tls.client_ca",
                    detail: format!("{}: {error}", path.display()),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, private)
        .map_err(|error| TlsError::Invalid {
            key: "tls.key",
            detail: format!("does not match tls.cert: {error}"),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // The server's order decides (clients' libraries tend to put AES-256 first).
    config.ignore_client_order = true;
    config.ticketer = Arc::new(match &files.ticket_key {
        Some(path) => Tickets::given(path)?,
        None => Tickets::default_in(state_dir)?,
    });
    Ok(Arc::new(config))
}

/// The cipher suites the listener prefers, first to last: every SHA-256 suite
/// ring offers. The provider's others (AES-256-GCM with SHA-384) follow in its
/// own order.
///
/// SHA-256 suites first: the key exchange (X25519) and the certificates (P-256)
/// give 128-bit security, which AES-256 and SHA-384 do not raise. They only cost:
/// ring has no hardware path for SHA-384 on AMD CPUs, and in a 19,000-agent mTLS
/// reconnect storm it was 8.8% of the orchestrator's CPU (BENCHMARKS.md, "mTLS at
/// fleet scale"). TLS 1.2 clients get their ECDHE AES-128-GCM suites the same way.
const PREFERRED_SUITES: [rustls::CipherSuite; 6] = [
    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
    rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// ring's provider with its cipher suites in [`PREFERRED_SUITES`] order.
fn provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        PREFERRED_SUITES
            .iter()
            .position(|preferred| *preferred == suite.suite())
            .unwrap_or(PREFERRED_SUITES.len())
    });
    provider
}

/// Session tickets sealed with ChaCha20-Poly1305 under a key from a file.
pub struct Tickets {
    keys: RwLock<Keys>,
    /// Where the key lives, and whether it is ours to replace.
    file: PathBuf,
    rotates: bool,
    random: SystemRandom,
}

struct Keys {
    current: LessSafeKey,
    previous: Option<LessSafeKey>,
    since: SystemTime,
}

impl fmt::Debug for Tickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tickets")
            .field("file", &self.file)
            .field("rotates", &self.rotates)
            .finish_non_exhaustive()
    }
}

fn sealing_key(bytes: &[u8]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("a 32-byte key"))
}

impl Tickets {
    /// The operator's key file (`tls.session_ticket_key`): exactly 32 bytes,
    /// used as it is.
    pub fn given(path: &Path) -> Result<Self, TlsError> {
        const KEY: &str = "tls.session_ticket_key";
        let bytes = read_file(KEY, path)?;
        if bytes.len() != KEY_LEN {
            return Err(TlsError::Invalid {
                key: KEY,
                detail: format!(
                    "{}: {} bytes; the key is exactly {KEY_LEN} random bytes (head -c {KEY_LEN} /dev/urandom)",
                    path.display(),
                    bytes.len()
                ),
            });
        }
        Ok(Self::new(path.to_owned(), false, &bytes, SystemTime::now()))
    }

    /// The default key in `state_dir`: read if it is younger than
    /// [`KEY_LIFETIME`], else made anew (and written, mode 0600).
    pub fn default_in(state_dir: &Path) -> Result<Self, TlsError> {
        let file = state_dir.join(DEFAULT_KEY_FILE);
        let existing = std::fs::read(&file).ok().filter(|bytes| bytes.len() == KEY_LEN);
        let age = std::fs::metadata(&file)
            .and_then(|meta| meta.modified())
            .ok()
            .and_then(|modified| SystemTime::now().duration_since(modified).ok());
        let random = SystemRandom::new();
        let (bytes, since) = match (existing, age) {
            (Some(bytes), Some(age)) if age < KEY_LIFETIME => (bytes, SystemTime::now() - age),
            _ => {
                let bytes = fresh_key(&random)?;
                write_key(&file, &bytes)?;
                info!(file = %file.display(), "new TLS session ticket key");
                (bytes, SystemTime::now())
            }
        };
        Ok(Self::new(file, true, &bytes, since))
    }

    fn new(file: PathBuf, rotates: bool, bytes: &[u8], since: SystemTime) -> Self {
        Self {
            keys: RwLock::new(Keys {
                current: sealing_key(bytes),
                previous: None,
                since,
            }),
            file,
            rotates,
            random: SystemRandom::new(),
        }
    }

    /// Replaces the default key once it is older than [`KEY_LIFETIME`], at `now`;
    /// the previous key still opens tickets.
    fn rotate_if_due(&self, now: SystemTime) {
        if !self.rotates {
            return;
        }
        let due = |keys: &Keys| now.duration_since(keys.since).unwrap_or_default() >= KEY_LIFETIME;
        if !due(&self.keys.read().expect("ticket keys")) {
            return;
        }
        let mut keys = self.keys.write().expect("ticket keys");
        if !due(&keys) {
            return;
        }
        let Ok(bytes) = fresh_key(&self.random) else {
            return;
        };
        if let Err(error) = write_key(&self.file, &bytes) {
            warn!(%error, "cannot write the new TLS session ticket key; it holds until a restart");
        }
        let current = std::mem::replace(&mut keys.current, sealing_key(&bytes));
        keys.previous = Some(current);
        keys.since = now;
        info!(file = %self.file.display(), "TLS session ticket key replaced");
    }

    fn seal(&self, plain: &[u8], now: SystemTime) -> Option<Vec<u8>> {
        self.rotate_if_due(now);
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let mut body = plain.to_vec();
        let keys = self.keys.read().expect("ticket keys");
        keys.current
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut body)
            .ok()?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + body.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&body);
        Some(sealed)
    }

    fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, body) = sealed.split_at_checked(NONCE_LEN)?;
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        let keys = self.keys.read().expect("ticket keys");
        for key in std::iter::once(&keys.current).chain(keys.previous.as_ref()) {
            let mut buffer = body.to_vec();
            if let Ok(plain) =
                key.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buffer)
            {
                let len = plain.len();
                buffer.truncate(len);
                return Some(buffer);
            }
        }
        None
    }
}

impl ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(plain, SystemTime::now())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(cipher)
    }
}

fn fresh_key(random: &SystemRandom) -> Result<Vec<u8>, TlsError> {
    let mut bytes = vec![0u8; KEY_LEN];
    random.fill(&mut bytes).map_err(|_| TlsError::Invalid {
        key: "tls.session_ticket_key",
        detail: "the system's random source failed".into(),
    })?;
    Ok(bytes)
}

/// Writes the key with mode 0600, atomically (a temp file renamed over it).
fn write_key(file: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let fail = |source| TlsError::File {
        key: "tls.session_ticket_key",
        path: file.to_owned(),
        source,
    };
    let temp = file.with_extension("key.new");
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(fail)?;
    out.write_all(bytes).and_then(|()| out.sync_all()).map_err(fail)?;
    std::fs::rename(&temp, file).map_err(fail)
}

/// The TLS connections of `incoming`: each handshake runs in a task of its own
/// (at most [`HANDSHAKES_IN_FLIGHT`] at once), bounded by `timeout`, so a slow or
/// silent client holds up nobody. Failed handshakes are counted and dropped.
pub fn accept<S, IO>(
    incoming: S,
    config: Arc<ServerConfig>,
    timeout: Duration,
    metrics: Metrics,
) -> impl Stream<Item = io::Result<TlsStream<IO>>>
where
    S: Stream<Item = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (done, ready) = mpsc::channel(HANDSHAKES_IN_FLIGHT);
    let acceptor = TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_IN_FLIGHT));
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        while let Some(connection) = incoming.next().await {
            let Ok(connection) = connection else { continue };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (acceptor, done, metrics) = (acceptor.clone(), done.clone(), metrics.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(timeout, acceptor.accept(connection)).await {
                    Ok(Ok(stream)) => {
                        let resumed = stream.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
                        metrics.tls_handshake(if resumed { "resumed" } else { "full" });
                        let _ = done.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => {
                        metrics.tls_handshake("failed");
                        debug!(%error, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics.tls_handshake("failed");
                        debug!(timeout_s = timeout.as_secs_f64(), "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_listener_chooses_aes_128_with_sha_256_over_a_client_that_lists_aes_256_first() {
        let dir = tempfile::tempdir().unwrap();
        crate::edge::certs::init(dir.path(), &[]).unwrap();
        let files = TlsFiles {
            cert: dir.path().join("orchestrator.pem"),
            key: dir.path().join("orchestrator.key"),
            client_ca: None,
            ticket_key: None,
        };
        let server = server_config(&files, dir.path()).unwrap();

        let mut roots = RootCertStore::empty();
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        roots.add(CertificateDer::from_pem_slice(&ca).unwrap()).unwrap();
        // rustls's own defaults, as the agent has them: AES-256 listed first.
        let client =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        assert_eq!(
            client.crypto_provider().cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );

        let (near, far) = tokio::io::duplex(64 * 1024);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (accepted, connected) = tokio::join!(
            TlsAcceptor::from(server).accept(far),
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, near),
        );
        let (accepted, connected) = (accepted.unwrap(), connected.unwrap());
        for suite in [
            accepted.get_ref().1.negotiated_cipher_suite(),
            connected.get_ref().1.negotiated_cipher_suite(),
        ] {
            assert_eq!(
                suite.map(|suite| suite.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
    }

    #[test]
    fn a_ticket_opens_under_its_key_and_the_previous_one_but_not_when_tampered() {
        let dir = tempfile::tempdir().unwrap();
        let tickets = Tickets::default_in(dir.path()).unwrap();
        let start = SystemTime::now();
        let sealed = tickets.seal(b"session state", start).unwrap();
        assert_ne!(&sealed[NONCE_LEN..NONCE_LEN + 13], b"session state");
        assert_eq!(tickets.open(&sealed).unwrap(), b"session state");

        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(tickets.open(&tampered), None);
        assert_eq!(tickets.open(&sealed[..5]), None, "shorter than a nonce");

        // A day later the key is replaced; the old ticket still opens, and a
        // second replacement retires it.
        let later = tickets.seal(b"new", start + KEY_LIFETIME).unwrap();
        assert_eq!(tickets.open(&sealed).unwrap(), b"session state");
        assert_eq!(tickets.open(&later).unwrap(), b"new");
        tickets.rotate_if_due(start + KEY_LIFETIME * 2);
        assert_eq!(tickets.open(&sealed), None);
        assert_eq!(tickets.open(&later).unwrap(), b"new");
    }

    #[test]
    fn the_default_key_survives_a_restart_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let before = Tickets::default_in(dir.path()).unwrap();
        let sealed = before.seal(b"resume me", SystemTime::now()).unwrap();
        let after = Tickets::default_in(dir.path()).unwrap();
        assert_eq!(after.open(&sealed).unwrap(), b"resume me");
        let mode = std::fs::metadata(dir.path().join(DEFAULT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_given_key_must_be_32_bytes_and_is_shared_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.key");
        std::fs::write(&path, b"short").unwrap();
        let error = Tickets::given(&path).unwrap_err().to_string();
        assert!(
            error.contains("tls.session_ticket_key") && error.contains("5 bytes"),
            "{error}"
        );

        std::fs::write(&path, [7u8; KEY_LEN]).unwrap();
        let one = Tickets::given(&path).unwrap();
        let other = Tickets::given(&path).unwrap();
        let sealed = one.seal(b"failover", SystemTime::now()).unwrap();
        assert_eq!(
            other.open(&sealed).unwrap(),
            b"failover",
            "a standby with the same file"
        );
        // Never rotated: the operator owns it.
        one.rotate_if_due(SystemTime::now() + KEY_LIFETIME * 3);
        assert_eq!(
            other.open(&one.seal(b"x", SystemTime::now()).unwrap()).unwrap(),
            b"x"
        );
    }
}
