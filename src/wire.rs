//! Wire <-> plain-value conversions shared by the orchestrator, the agent and the
//! test harness. Each failure names the offending field, so an edge can turn it into
//! a precise `INVALID_ARGUMENT` without re-describing the problem.

use std::time::{Duration, SystemTime};

use uuid::Uuid;

/// A wire field that does not hold an acceptable value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct WireError {
    /// The field's name as in the `.proto`, e.g. `hello.node_id`.
    pub field: &'static str,
    /// What is wrong with it, lowercase, short.
    pub problem: String,
}

impl WireError {
    /// An error for `field` saying `problem`.
    pub fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

/// Parses a node id: a UUID that is not nil.
pub fn parse_node_id(field: &'static str, raw: &str) -> Result<Uuid, WireError> {
    if raw.is_empty() {
        return Err(WireError::new(field, "missing"));
    }
    let id = Uuid::try_parse(raw).map_err(|error| WireError::new(field, format!("not a uuid ({error})")))?;
    if id.is_nil() {
        return Err(WireError::new(field, "the nil uuid is not a node id"));
    }
    Ok(id)
}

/// Checks a CPU usage value: a finite fraction in `[0.0, 1.0]`.
pub fn check_cpu_fraction(field: &'static str, usage: f64) -> Result<f64, WireError> {
    if !usage.is_finite() {
        return Err(WireError::new(field, format!("{usage} is not a finite number")));
    }
    if !(0.0..=1.0).contains(&usage) {
        return Err(WireError::new(
            field,
            format!("{usage} is outside 0.0..=1.0 (a fraction, not percent)"),
        ));
    }
    Ok(usage)
}

/// Converts a `Duration` to its protobuf form (saturating at the protobuf maximum).
pub fn duration_to_proto(duration: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(duration).unwrap_or(prost_types::Duration {
        seconds: 315_576_000_000,
        nanos: 0,
    })
}

/// Converts a protobuf duration to a `Duration`; negative or malformed ones fail.
pub fn duration_from_proto(
    field: &'static str,
    duration: Option<prost_types::Duration>,
) -> Result<Duration, WireError> {
    let duration = duration.ok_or_else(|| WireError::new(field, "missing"))?;
    Duration::try_from(duration).map_err(|error| WireError::new(field, format!("invalid duration ({error})")))
}

/// Converts a protobuf timestamp to wall-clock time; malformed ones fail.
pub fn timestamp_from_proto(
    field: &'static str,
    timestamp: Option<prost_types::Timestamp>,
) -> Result<SystemTime, WireError> {
    let timestamp = timestamp.ok_or_else(|| WireError::new(field, "missing"))?;
    SystemTime::try_from(timestamp)
        .map_err(|error| WireError::new(field, format!("invalid timestamp ({error})")))
}

/// Text from outside (an agent, a receiver) made safe to log, event and show:
/// control characters (newlines, ANSI escapes, NUL...) are written as escapes, so
/// nothing can forge a log line or drive a terminal. Printable text is unchanged.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    std::borrow::Cow::Owned(escaped)
}

/// Refuses text with control characters (a host name, a label): `field` names it.
pub fn check_printable(field: &'static str, text: &str) -> Result<(), WireError> {
    match text.chars().find(|c| c.is_control()) {
        Some(c) => Err(WireError::new(
            field,
            format!("contains the control character {:?}", c),
        )),
        None => Ok(()),
    }
}

/// Converts a wall-clock time to a protobuf timestamp.
pub fn timestamp_to_proto(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

/// A wall-clock time as RFC 3339 in UTC, whole seconds, with a `Z`
/// (`2026-11-28T06:00:45Z`): the seed's payload timestamps and the JSON API's.
pub fn rfc3339(time: SystemTime) -> String {
    let mut timestamp = prost_types::Timestamp::from(time);
    timestamp.nanos = 0;
    timestamp.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_must_be_real_uuids() {
        let id = Uuid::new_v4();
        assert_eq!(parse_node_id("f", &id.to_string()), Ok(id));
        assert_eq!(parse_node_id("f", "").unwrap_err().problem, "missing");
        assert!(
            parse_node_id("f", "not-a-uuid")
                .unwrap_err()
                .problem
                .starts_with("not a uuid")
        );
        assert!(parse_node_id("f", &Uuid::nil().to_string()).is_err());
    }

    #[test]
    fn cpu_fractions_are_finite_and_within_unit_interval() {
        assert_eq!(check_cpu_fraction("u", 0.0), Ok(0.0));
        assert_eq!(check_cpu_fraction("u", 1.0), Ok(1.0));
        for bad in [f64::NAN, f64::INFINITY, -0.01, 1.01, 85.0] {
            let error = check_cpu_fraction("u", bad).unwrap_err();
            assert_eq!(error.field, "u", "{bad}");
        }
    }

    #[test]
    fn control_characters_are_escaped_or_refused() {
        let forged = "edge-1\n2026-11-30T00:00:00Z ERROR CRITICAL UNEXPECTED NODE FAILURE\u{1b}[31m";
        let safe = escape_controls(forged);
        assert!(!safe.contains('\n') && !safe.contains('\u{1b}'), "{safe}");
        assert!(safe.contains("\\n") && safe.contains("\\u{1b}"), "{safe}");
        assert_eq!(escape_controls("edge-1 ü"), "edge-1 ü");
        assert_eq!(
            check_printable("hello.hostname", forged).unwrap_err().field,
            "hello.hostname"
        );
        assert!(check_printable("hello.hostname", "edge-1.fra1").is_ok());
    }

    #[test]
    fn rfc3339_is_utc_whole_seconds_with_a_z() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_845_645_750);
        assert_eq!(rfc3339(at), "2026-11-28T06:00:45Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn durations_round_trip_and_reject_negative() {
        let d = Duration::from_millis(1500);
        assert_eq!(duration_from_proto("d", Some(duration_to_proto(d))), Ok(d));
        let negative = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert!(duration_from_proto("d", Some(negative)).is_err());
        assert_eq!(duration_from_proto("d", None).unwrap_err().problem, "missing");
    }
}
