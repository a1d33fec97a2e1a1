//! Who is calling, and what they may do (DESIGN.md, "Security").
//!
//! A caller is identified by its TLS client certificate (a SAN URI names the role:
//! `urn:secbeat:node:<uuid>` for an agent, `urn:secbeat:operator:<name>` and
//! `urn:secbeat:viewer:<name>` for people and tools) or by a bearer token
//! (`authorization: Bearer <token>`, the scheme case-insensitive, compared in
//! constant time with the configured operator, viewer and agent tokens). The policy:
//! - `AgentService` needs an agent credential: with a client CA, a certificate for
//!   exactly the node id claimed; without one, the agent token (a shared secret:
//!   it proves the caller is one of the fleet's agents, not which one);
//! - an agent credential may only use `AgentService`, and an operator or viewer
//!   credential may never open an agent stream, so listing node ids never lets
//!   anyone take a node over;
//! - mutations (`TerminateNode`) need an operator;
//! - reads and watches need an operator or a viewer.
//!
//! Enforcement is on when any credential is configured (a client CA or a token);
//! operator or viewer tokens without a client CA also need an agent token (the
//! configuration refuses the gap). Without any (plain text on loopback,
//! development) every caller is trusted, and the orchestrator says so at start-up.
//! Health and reflection stay open: a load balancer must be able to ask, and the
//! schema reflection describes is the public API.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::domain::node::NodeId;

/// SAN URI prefix of an agent certificate.
pub const NODE_URI: &str = "urn:secbeat:node:";
/// SAN URI prefix of an operator certificate.
pub const OPERATOR_URI: &str = "urn:secbeat:operator:";
/// SAN URI prefix of a viewer certificate.
pub const VIEWER_URI: &str = "urn:secbeat:viewer:";

/// A caller, as far as the credentials presented say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An agent certificate for this node.
    Node(NodeId),
    /// An operator certificate or the operator token.
    Operator(String),
    /// A viewer certificate or the viewer token.
    Viewer(String),
    /// The agent token: one of the fleet's agents, for whichever node it claims.
    Agent,
    /// Nothing (or nothing recognised) presented.
    Anonymous,
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No usable credential: UNAUTHENTICATED.
    #[error("{0}")]
    Unauthenticated(String),
    /// A credential that does not allow this: PERMISSION_DENIED.
    #[error("{0}")]
    PermissionDenied(String),
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read fleet state or watch it.
    Read,
    /// Change fleet state.
    Operate,
}

/// The configured credentials. Its `Debug` never shows the tokens.
#[derive(Clone, Default)]
pub struct Authority {
    /// Client certificates are verified against a CA (mTLS is on).
    pub client_certs: bool,
    operator_token: Option<Arc<[u8]>>,
    viewer_token: Option<Arc<[u8]>>,
    agent_token: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("client_certs", &self.client_certs)
            .field(
                "operator_token",
                &self.operator_token.as_ref().map(|_| "<redacted>"),
            )
            .field("viewer_token", &self.viewer_token.as_ref().map(|_| "<redacted>"))
            .field("agent_token", &self.agent_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Authority {
    /// Credentials from config.
    pub fn new(
        client_certs: bool,
        operator_token: Option<&str>,
        viewer_token: Option<&str>,
        agent_token: Option<&str>,
    ) -> Self {
        let token = |t: Option<&str>| t.map(|t| Arc::from(t.as_bytes()));
        Self {
            client_certs,
            operator_token: token(operator_token),
            viewer_token: token(viewer_token),
            agent_token: token(agent_token),
        }
    }

    /// Whether an operator or viewer token is configured (the HTTP API's only
    /// credentials).
    pub fn tokens_configured(&self) -> bool {
        self.operator_token.is_some() || self.viewer_token.is_some()
    }

    /// Whether anything is enforced.
    pub fn enforcing(&self) -> bool {
        self.client_certs || self.tokens_configured() || self.agent_token.is_some()
    }

    /// Identifies a caller from its client certificate's SAN URIs (already verified
    /// by TLS against the client CA) and its `authorization` header value.
    pub fn identify(&self, cert_uris: &[String], authorization: Option<&str>) -> Caller {
        for uri in cert_uris {
            if let Some(id) = uri.strip_prefix(NODE_URI)
                && let Ok(id) = Uuid::parse_str(id)
                && !id.is_nil()
            {
                return Caller::Node(NodeId(id));
            }
            if let Some(name) = uri.strip_prefix(OPERATOR_URI) {
                return Caller::Operator(name.to_owned());
            }
            if let Some(name) = uri.strip_prefix(VIEWER_URI) {
                return Caller::Viewer(name.to_owned());
            }
        }
        // RFC 7235: the scheme is case-insensitive.
        let Some(token) = authorization
            .and_then(|value| value.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
        else {
            return Caller::Anonymous;
        };
        let matches = |expected: &Option<Arc<[u8]>>| {
            expected
                .as_ref()
                .is_some_and(|expected| bool::from(expected.as_ref().ct_eq(token.as_bytes())))
        };
        if matches(&self.operator_token) {
            Caller::Operator("token".into())
        } else if matches(&self.viewer_token) {
            Caller::Viewer("token".into())
        } else if matches(&self.agent_token) {
            Caller::Agent
        } else {
            Caller::Anonymous
        }
    }

    /// May `caller` make an operator-API call that needs `need`?
    pub fn allow(&self, caller: &Caller, need: Need) -> Result<(), Denied> {
        if !self.enforcing() {
            return Ok(());
        }
        match (caller, need) {
            (Caller::Operator(_), _) | (Caller::Viewer(_), Need::Read) => Ok(()),
            (Caller::Viewer(name), Need::Operate) => Err(Denied::PermissionDenied(format!(
                "viewer {name:?} may read but not change the fleet"
            ))),
            (Caller::Node(id), _) => Err(Denied::PermissionDenied(format!(
                "an agent credential (node {id}) may only use AgentService"
            ))),
            (Caller::Agent, _) => Err(Denied::PermissionDenied(
                "the agent token may only use AgentService".into(),
            )),
            (Caller::Anonymous, _) => Err(Denied::Unauthenticated(
                "an operator or viewer credential is required (client certificate or authorization: Bearer <token>)"
                    .into(),
            )),
        }
    }

    /// May `caller` open an agent stream for `claimed`? With client certificates on,
    /// only with a certificate for exactly that node; without, only with the agent
    /// token once any credential is configured.
    pub fn allow_agent(&self, caller: &Caller, claimed: NodeId) -> Result<(), Denied> {
        if !self.enforcing() {
            return Ok(());
        }
        if !self.client_certs {
            return match caller {
                Caller::Agent => Ok(()),
                Caller::Anonymous => Err(Denied::Unauthenticated(
                    "agents must present the agent token (authorization: Bearer <agent_token>)".into(),
                )),
                _ => Err(Denied::PermissionDenied(
                    "only an agent credential may open an agent stream".into(),
                )),
            };
        }
        match caller {
            Caller::Node(id) if *id == claimed => Ok(()),
            Caller::Node(id) => Err(Denied::PermissionDenied(format!(
                "this certificate is for node {id}, not {claimed}"
            ))),
            Caller::Anonymous => Err(Denied::Unauthenticated(
                "agents must present a client certificate for their node id".into(),
            )),
            _ => Err(Denied::PermissionDenied(
                "only an agent certificate may open an agent stream".into(),
            )),
        }
    }
}

/// The SAN URIs of a DER certificate (empty if it does not parse).
pub fn san_uris(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId(Uuid::from_bytes([n; 16]))
    }

    #[test]
    fn certificates_name_the_role() {
        let authority = Authority::new(true, None, None, None);
        let uri = format!("{NODE_URI}{}", node(1));
        assert_eq!(authority.identify(&[uri], None), Caller::Node(node(1)));
        assert_eq!(
            authority.identify(&[format!("{OPERATOR_URI}alice")], None),
            Caller::Operator("alice".into())
        );
        assert_eq!(
            authority.identify(&[format!("{VIEWER_URI}grafana")], None),
            Caller::Viewer("grafana".into())
        );
        assert_eq!(authority.identify(&["urn:other".into()], None), Caller::Anonymous);
        let nil = format!("{NODE_URI}{}", Uuid::nil());
        assert_eq!(authority.identify(&[nil], None), Caller::Anonymous);
    }

    #[test]
    fn tokens_are_matched_exactly() {
        let authority = Authority::new(
            false,
            Some("op-secret"),
            Some("view-secret"),
            Some("agent-secret"),
        );
        assert_eq!(
            authority.identify(&[], Some("Bearer op-secret")),
            Caller::Operator("token".into())
        );
        assert_eq!(
            authority.identify(&[], Some("Bearer view-secret")),
            Caller::Viewer("token".into())
        );
        assert_eq!(
            authority.identify(&[], Some("Bearer agent-secret")),
            Caller::Agent
        );
        // RFC 7235: the scheme is case-insensitive.
        assert_eq!(
            authority.identify(&[], Some("bearer op-secret")),
            Caller::Operator("token".into())
        );
        assert_eq!(
            authority.identify(&[], Some("BEARER view-secret")),
            Caller::Viewer("token".into())
        );
        for wrong in [
            "Bearer op-secre",
            "Bearer op-secret2",
            "op-secret",
            "Basic op-secret",
            "",
        ] {
            assert_eq!(authority.identify(&[], Some(wrong)), Caller::Anonymous, "{wrong}");
        }
        assert!(!format!("{authority:?}").contains("secret"));
    }

    #[test]
    fn the_policy() {
        let authority = Authority::new(true, Some("t"), None, None);
        let operator = Caller::Operator("a".into());
        let viewer = Caller::Viewer("v".into());
        let agent = Caller::Node(node(1));
        assert_eq!(authority.allow(&operator, Need::Operate), Ok(()));
        assert_eq!(authority.allow(&viewer, Need::Read), Ok(()));
        assert!(matches!(
            authority.allow(&viewer, Need::Operate),
            Err(Denied::PermissionDenied(_))
        ));
        assert!(matches!(
            authority.allow(&agent, Need::Read),
            Err(Denied::PermissionDenied(_))
        ));
        assert!(matches!(
            authority.allow(&Caller::Anonymous, Need::Read),
            Err(Denied::Unauthenticated(_))
        ));
        assert_eq!(authority.allow_agent(&agent, node(1)), Ok(()));
        assert!(matches!(
            authority.allow_agent(&agent, node(2)),
            Err(Denied::PermissionDenied(_))
        ));
        assert!(matches!(
            authority.allow_agent(&Caller::Anonymous, node(1)),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            authority.allow_agent(&operator, node(1)),
            Err(Denied::PermissionDenied(_))
        ));
        // Tokens without a client CA: agents need the agent token, and an operator
        // or viewer token never opens an agent stream (no take-over by id).
        let tokens = Authority::new(false, Some("op"), Some("view"), Some("agent"));
        assert_eq!(tokens.allow_agent(&Caller::Agent, node(1)), Ok(()));
        assert!(matches!(
            tokens.allow_agent(&Caller::Anonymous, node(1)),
            Err(Denied::Unauthenticated(_))
        ));
        for person in [operator.clone(), viewer.clone()] {
            assert!(matches!(
                tokens.allow_agent(&person, node(1)),
                Err(Denied::PermissionDenied(_))
            ));
        }
        assert!(matches!(
            tokens.allow(&Caller::Agent, Need::Read),
            Err(Denied::PermissionDenied(_))
        ));
        // Nothing configured: development mode, everyone is trusted.
        let open = Authority::default();
        assert_eq!(open.allow(&Caller::Anonymous, Need::Operate), Ok(()));
        assert_eq!(open.allow_agent(&Caller::Anonymous, node(1)), Ok(()));
    }
}
