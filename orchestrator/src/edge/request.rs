//! Operator inputs validated once for both APIs (gRPC and HTTP): a reason, a
//! label selector, a drain deadline. Errors name the field, as every
//! INVALID_ARGUMENT (HTTP 400) does.

use std::time::Duration;

use secbeat::wire::WireError;

use crate::domain::{registry::disruption::MAX_DRAIN_DEADLINE, selector::Selector};

/// Longest operator-given reason.
pub const MAX_REASON: usize = 256;

/// An operator's reason: "operator request" when blank; an error naming `field`
/// when too long or carrying control characters (it reaches logs and events).
pub fn reason(field: &'static str, given: String) -> Result<String, WireError> {
    if given.trim().is_empty() {
        return Ok("operator request".to_owned());
    }
    if given.len() > MAX_REASON {
        return Err(WireError::new(field, format!("longer than {MAX_REASON} bytes")));
    }
    secbeat::wire::check_printable(field, &given)?;
    Ok(given)
}

/// A label selector; an error naming `field` when it does not parse.
pub fn selector(field: &'static str, text: &str) -> Result<Selector, WireError> {
    text.parse()
        .map_err(|error: crate::domain::selector::SelectorError| WireError::new(field, error.to_string()))
}

/// A drain deadline: None means the orchestrator's `drain_deadline`; else more
/// than zero and at most an hour.
pub fn drain_deadline(field: &'static str, given: Option<Duration>) -> Result<Option<Duration>, WireError> {
    match given {
        Some(deadline) if deadline.is_zero() || deadline > MAX_DRAIN_DEADLINE => Err(WireError::new(
            field,
            format!(
                "must be more than 0 and at most {}s",
                MAX_DRAIN_DEADLINE.as_secs()
            ),
        )),
        given => Ok(given),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_checked_and_errors_name_the_field() {
        assert_eq!(reason("reason", "  ".into()).unwrap(), "operator request");
        assert_eq!(reason("reason", "kernel patch".into()).unwrap(), "kernel patch");
        assert_eq!(reason("reason", "x".repeat(257)).unwrap_err().field, "reason");
        assert_eq!(reason("reason", "a\nb".into()).unwrap_err().field, "reason");
        assert!(selector("label_selector", "pop=fra1").is_ok());
        assert_eq!(
            selector("label_selector", "=").unwrap_err().field,
            "label_selector"
        );
        assert_eq!(drain_deadline("deadline", None).unwrap(), None);
        assert!(drain_deadline("deadline", Some(Duration::ZERO)).is_err());
        assert!(drain_deadline("deadline", Some(Duration::from_secs(7200))).is_err());
        assert_eq!(
            drain_deadline("deadline", Some(Duration::from_secs(30))).unwrap(),
            Some(Duration::from_secs(30))
        );
    }
}
