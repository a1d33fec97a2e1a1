//! `secbeat-orchestrator certs ...`: a development CA and certificates with the
//! SANs SecBeat's authorization reads, so turning mTLS on takes minutes. For
//! production, issue the same SANs from your own PKI.
//!
//! - `init`: `ca.pem`/`ca.key`, and `orchestrator.pem`/`.key` for the server (DNS
//!   `localhost`, IP `127.0.0.1`, plus `--host` names and addresses);
//! - `issue-agent`: `agent-<uuid>.pem`/`.key` with `urn:secbeat:node:<uuid>`;
//! - `issue-operator`: `operator-<name>.pem`/`.key` with `urn:secbeat:operator:<name>`
//!   (or `viewer-<name>` with `urn:secbeat:viewer:<name>`).
//!
//! Keys are written with mode 0600. Certificates are valid for a year.

use std::{
    io::Write,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use chrono::Datelike;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use uuid::Uuid;

use crate::edge::auth::{NODE_URI, OPERATOR_URI, VIEWER_URI};

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Generating or signing failed.
    #[error("{0}")]
    Generate(#[from] rcgen::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A name that cannot go into a certificate.
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_owned(),
        source,
    }
}

fn ca_params() -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "SecBeat development CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    valid_for_a_year(&mut params);
    Ok(params)
}

fn valid_for_a_year(params: &mut CertificateParams) {
    let today = chrono::Utc::now().date_naive();
    let (y, m, d) = (today.year(), today.month() as u8, today.day().min(28) as u8);
    params.not_before = rcgen::date_time_ymd(y, m, d) - time_day();
    params.not_after = rcgen::date_time_ymd(y + 1, m, d);
}

fn time_day() -> std::time::Duration {
    std::time::Duration::from_secs(86_400)
}

fn write(dir: &Path, name: &str, contents: &str, secret: bool) -> Result<PathBuf, CertError> {
    let path = dir.join(name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    let mut file = options.open(&path).map_err(io(&path))?;
    file.write_all(contents.as_bytes()).map_err(io(&path))?;
    Ok(path)
}

fn issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let path = dir.join("ca.key");
    let pem = std::fs::read_to_string(&path).map_err(io(&path))?;
    Ok(Issuer::new(ca_params()?, KeyPair::from_pem(&pem)?))
}

/// A leaf certificate signed by `issuer`, and its new key, both PEM.
fn leaf_pem(
    issuer: &Issuer<'static, KeyPair>,
    common_name: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String), CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    valid_for_a_year(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn leaf(
    dir: &Path,
    stem: &str,
    common_name: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<Vec<PathBuf>, CertError> {
    let (cert, key) = leaf_pem(&issuer(dir)?, common_name, sans, usage)?;
    Ok(vec![
        write(dir, &format!("{stem}.pem"), &cert, false)?,
        write(dir, &format!("{stem}.key"), &key, true)?,
    ])
}

/// Agent certificates issued in memory by the CA in a `certs init` directory:
/// for tools that need many (the fleet simulator gives every virtual agent its
/// own), without a file per node.
pub struct AgentIssuer(Issuer<'static, KeyPair>);

impl AgentIssuer {
    /// The CA in `dir` (`ca.key`, as `init` writes it).
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        Ok(Self(issuer(dir)?))
    }

    /// A certificate for `node` and its key, PEM: what `issue-agent` writes.
    pub fn issue(&self, node: Uuid) -> Result<(String, String), CertError> {
        agent_leaf(&self.0, node)
    }
}

fn agent_leaf(issuer: &Issuer<'static, KeyPair>, node: Uuid) -> Result<(String, String), CertError> {
    if node.is_nil() {
        return Err(CertError::Invalid("the nil uuid is not a node id".into()));
    }
    let name = format!("agent-{node}");
    let sans = vec![uri(&format!("{NODE_URI}{node}"))?];
    leaf_pem(issuer, &name, sans, ExtendedKeyUsagePurpose::ClientAuth)
}

fn uri(text: &str) -> Result<SanType, CertError> {
    let ia5 = text
        .to_owned()
        .try_into()
        .map_err(|_| CertError::Invalid(format!("{text:?} is not ASCII")))?;
    Ok(SanType::URI(ia5))
}

/// Creates the CA and the server certificate in `dir` (created if missing).
pub fn init(dir: &Path, hosts: &[String]) -> Result<Vec<PathBuf>, CertError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let ca_key = KeyPair::generate()?;
    let ca = ca_params()?.self_signed(&ca_key)?;
    let mut written = vec![
        write(dir, "ca.pem", &ca.pem(), false)?,
        write(dir, "ca.key", &ca_key.serialize_pem(), true)?,
    ];
    let mut sans = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
    ];
    for host in hosts {
        sans.push(match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                host.clone()
                    .try_into()
                    .map_err(|_| CertError::Invalid(format!("--host {host:?} is not a DNS name")))?,
            ),
        });
    }
    written.extend(leaf(
        dir,
        "orchestrator",
        "secbeat-orchestrator",
        sans,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?);
    Ok(written)
}

/// Issues an agent certificate for `node`.
pub fn issue_agent(dir: &Path, node: Uuid) -> Result<Vec<PathBuf>, CertError> {
    let (cert, key) = agent_leaf(&issuer(dir)?, node)?;
    let stem = format!("agent-{node}");
    Ok(vec![
        write(dir, &format!("{stem}.pem"), &cert, false)?,
        write(dir, &format!("{stem}.key"), &key, true)?,
    ])
}

/// Issues an operator (or, with `viewer`, a read-only viewer) certificate.
pub fn issue_operator(dir: &Path, name: &str, viewer: bool) -> Result<Vec<PathBuf>, CertError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(CertError::Invalid(format!(
            "--name {name:?}: use letters, digits and - _ . @"
        )));
    }
    let (prefix, role) = if viewer {
        (VIEWER_URI, "viewer")
    } else {
        (OPERATOR_URI, "operator")
    };
    let stem = format!("{role}-{name}");
    let sans = vec![uri(&format!("{prefix}{name}"))?];
    leaf(dir, &stem, &stem, sans, ExtendedKeyUsagePurpose::ClientAuth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::auth::san_uris;

    fn der(pem_path: &Path) -> Vec<u8> {
        let pem = std::fs::read_to_string(pem_path).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body).unwrap()
    }

    #[test]
    fn issued_certificates_carry_the_sans_authorization_reads() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(dir.path(), &["orchestrator.internal".into(), "10.0.0.5".into()]).unwrap();
        assert_eq!(files.len(), 4);
        let node = Uuid::new_v4();
        let agent = issue_agent(dir.path(), node).unwrap();
        assert_eq!(
            san_uris(&der(&agent[0])),
            vec![format!("urn:secbeat:node:{node}")]
        );
        let operator = issue_operator(dir.path(), "alice", false).unwrap();
        assert_eq!(
            san_uris(&der(&operator[0])),
            vec!["urn:secbeat:operator:alice".to_owned()]
        );
        let viewer = issue_operator(dir.path(), "grafana", true).unwrap();
        assert_eq!(
            san_uris(&der(&viewer[0])),
            vec!["urn:secbeat:viewer:grafana".to_owned()]
        );
        let mode = std::fs::metadata(&agent[1]).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        assert!(issue_operator(dir.path(), "bad name", false).is_err());
        assert!(issue_agent(dir.path(), Uuid::nil()).is_err());

        // In memory, the same SANs.
        let issuer = AgentIssuer::load(dir.path()).unwrap();
        let other = Uuid::new_v4();
        let (cert, _key) = issuer.issue(other).unwrap();
        let body: String = cert.lines().filter(|l| !l.starts_with("-----")).collect();
        let cert = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body).unwrap();
        assert_eq!(san_uris(&cert), vec![format!("urn:secbeat:node:{other}")]);
    }
}
