//! Webhook signatures as the Standard Webhooks specification defines them: the
//! sender puts `webhook-id`, `webhook-timestamp` (Unix seconds) and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">` on every
//! request; the receiver recomputes the MAC and compares in constant time.
//!
//! The orchestrator signs with it and the webhook receiver verifies with it, so the
//! two sides cannot drift apart.

use std::fmt;

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The header names.
pub const ID_HEADER: &str = "webhook-id";
/// Unix seconds of this attempt.
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
/// Space-separated `v1,<base64>` signatures.
pub const SIGNATURE_HEADER: &str = "webhook-signature";

/// A signing secret. `whsec_<base64>` (the Standard Webhooks form) is decoded;
/// anything else is used as raw bytes. Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

/// Why a secret or a signature was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The secret is empty or its `whsec_` part is not base64.
    #[error("the webhook secret is empty or its whsec_ part is not valid base64")]
    BadSecret,
    /// No `v1,` signature in the header matches.
    #[error("no signature matches")]
    Mismatch,
}

impl WebhookSecret {
    /// Parses a configured secret.
    pub fn parse(text: &str) -> Result<Self, SignatureError> {
        let bytes = match text.strip_prefix("whsec_") {
            Some(encoded) => STANDARD.decode(encoded).map_err(|_| SignatureError::BadSecret)?,
            None => text.as_bytes().to_vec(),
        };
        if bytes.is_empty() {
            return Err(SignatureError::BadSecret);
        }
        Ok(Self(bytes))
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` header value for one attempt.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, &timestamp.to_string(), body).finalize().into_bytes();
        format!("v1,{}", STANDARD.encode(tag))
    }

    /// Checks a `webhook-signature` header (one or more space-separated
    /// `version,signature` pairs; only `v1` counts) in constant time.
    pub fn verify(&self, id: &str, timestamp: &str, body: &[u8], header: &str) -> Result<(), SignatureError> {
        let matches = header
            .split_whitespace()
            .filter_map(|pair| pair.strip_prefix("v1,"))
            .filter_map(|encoded| STANDARD.decode(encoded).ok())
            .any(|tag| self.mac(id, timestamp, body).verify_slice(&tag).is_ok());
        if matches {
            Ok(())
        } else {
            Err(SignatureError::Mismatch)
        }
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example from the Standard Webhooks specification's reference libraries.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1614265330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_specifications_example() {
        let secret = WebhookSecret::parse(SPEC_SECRET).unwrap();
        assert_eq!(secret.sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY), SPEC_SIGNATURE);
    }

    #[test]
    fn verifies_any_matching_v1_signature_and_nothing_else() {
        let secret = WebhookSecret::parse(SPEC_SECRET).unwrap();
        let ts = SPEC_TIMESTAMP.to_string();
        let several = format!("v1,bm90IGl0 {SPEC_SIGNATURE}");
        assert_eq!(secret.verify(SPEC_ID, &ts, SPEC_BODY, &several), Ok(()));
        for bad in ["", "v2,abc", "v1,!!!", "v1,bm90IGl0"] {
            assert_eq!(
                secret.verify(SPEC_ID, &ts, SPEC_BODY, bad),
                Err(SignatureError::Mismatch)
            );
        }
        let tampered = br#"{"test": 2432232315}"#;
        assert!(secret.verify(SPEC_ID, &ts, tampered, SPEC_SIGNATURE).is_err());
        assert!(
            secret
                .verify("msg_other", &ts, SPEC_BODY, SPEC_SIGNATURE)
                .is_err()
        );
        assert!(
            secret
                .verify(SPEC_ID, "1614265331", SPEC_BODY, SPEC_SIGNATURE)
                .is_err()
        );
    }

    #[test]
    fn raw_secrets_work_and_bad_ones_are_refused() {
        let raw = WebhookSecret::parse("correct horse battery staple").unwrap();
        let signature = raw.sign("id", 1, b"{}");
        assert_eq!(raw.verify("id", "1", b"{}", &signature), Ok(()));
        assert_eq!(WebhookSecret::parse(""), Err(SignatureError::BadSecret));
        assert_eq!(WebhookSecret::parse("whsec_"), Err(SignatureError::BadSecret));
        assert_eq!(WebhookSecret::parse("whsec_***"), Err(SignatureError::BadSecret));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let secret = WebhookSecret::parse("hunter2").unwrap();
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
