//! Label selectors, as Kubernetes writes equality-based ones: comma-separated
//! requirements that must all hold.
//!
//! - `pop=fra1` (or `pop==fra1`): the label is present with that value;
//! - `pop!=fra1`: the label is absent or has another value (as in Kubernetes);
//! - `pop`: the label is present, any value;
//! - `!pop`: the label is absent.
//!
//! An empty selector matches every node. Keys and values follow the Hello's
//! label rules (at most 128 bytes, printable); whitespace around terms is ignored.

use std::{collections::BTreeMap, fmt, str::FromStr};

/// Longest key or value in a requirement (the Hello's label limit).
const MAX_PART: usize = 128;
/// Most requirements in one selector.
const MAX_TERMS: usize = 32;

/// One requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

/// A parsed selector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Term>);

/// Why a selector does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} (selectors look like \"pop=fra1,role!=canary,!draining\")")]
pub struct SelectorError(String);

impl Selector {
    /// The selector that matches everything.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Whether it matches everything (no requirement).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `labels` meet every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|term| match term {
            Term::Equals(key, value) => labels.get(key) == Some(value),
            Term::NotEquals(key, value) => labels.get(key) != Some(value),
            Term::Exists(key) => labels.contains_key(key),
            Term::Absent(key) => !labels.contains_key(key),
        })
    }
}

fn part<'a>(what: &str, text: &'a str) -> Result<&'a str, SelectorError> {
    let text = text.trim();
    if text.len() > MAX_PART {
        return Err(SelectorError(format!("{what} longer than {MAX_PART} bytes")));
    }
    if text
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || "=!,".contains(c))
    {
        return Err(SelectorError(format!(
            "{what} {text:?} has a character a selector cannot hold"
        )));
    }
    Ok(text)
}

fn key(text: &str) -> Result<String, SelectorError> {
    let key = part("a key", text)?;
    if key.is_empty() {
        return Err(SelectorError("a requirement has no key".to_owned()));
    }
    Ok(key.to_owned())
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut terms = Vec::new();
        for raw in text.split(',') {
            let raw = raw.trim();
            if raw.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(SelectorError("an empty requirement between commas".to_owned()));
            }
            let term = if let Some((k, v)) = raw.split_once("!=") {
                Term::NotEquals(key(k)?, part("a value", v)?.to_owned())
            } else if let Some((k, v)) = raw.split_once("==").or_else(|| raw.split_once('=')) {
                Term::Equals(key(k)?, part("a value", v)?.to_owned())
            } else if let Some(k) = raw.strip_prefix('!') {
                Term::Absent(key(k)?)
            } else {
                Term::Exists(key(raw)?)
            };
            terms.push(term);
            if terms.len() > MAX_TERMS {
                return Err(SelectorError(format!("more than {MAX_TERMS} requirements")));
            }
        }
        Ok(Selector(terms))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, term) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match term {
                Term::Equals(k, v) => write!(f, "{k}={v}")?,
                Term::NotEquals(k, v) => write!(f, "{k}!={v}")?,
                Term::Exists(k) => write!(f, "{k}")?,
                Term::Absent(k) => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

/// Which nodes a query is about: a label selector and, optionally, states.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFilter {
    /// Labels the node must match.
    pub selector: Selector,
    /// States the node must be in; empty: any.
    pub states: Vec<crate::domain::node::NodeState>,
}

impl NodeFilter {
    /// Whether a node with these labels in this state is wanted.
    pub fn matches(&self, labels: &BTreeMap<String, String>, state: crate::domain::node::NodeState) -> bool {
        (self.states.is_empty() || self.states.contains(&state)) && self.selector.matches(labels)
    }
}

/// What a page of nodes is ordered by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SortKey {
    /// Node id (the default).
    #[default]
    Id,
    /// Host name.
    Hostname,
    /// Lifecycle state, by name.
    State,
    /// Latest CPU (nodes without a sample first).
    Cpu,
    /// Last heartbeat, oldest first: the nodes closest to being suspected.
    Heartbeat,
}

impl std::str::FromStr for SortKey {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "id" => Ok(SortKey::Id),
            "hostname" => Ok(SortKey::Hostname),
            "state" => Ok(SortKey::State),
            "cpu" => Ok(SortKey::Cpu),
            "heartbeat" => Ok(SortKey::Heartbeat),
            other => Err(format!(
                "{other:?} is not one of id, hostname, state, cpu, heartbeat"
            )),
        }
    }
}

/// One page of a node list: order, then offset and limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// The order.
    pub by: SortKey,
    /// Reversed.
    pub descending: bool,
    /// Nodes skipped.
    pub offset: usize,
    /// Nodes at most.
    pub limit: usize,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    #[test]
    fn requirements_match_as_kubernetes_matches_them() {
        let edge_fra = labels(&[("pop", "fra1"), ("role", "edge")]);
        let canary_ams = labels(&[("pop", "ams1"), ("role", "canary")]);
        let bare = labels(&[]);
        let cases = [
            ("", [true, true, true]),
            ("pop=fra1", [true, false, false]),
            ("pop==fra1", [true, false, false]),
            ("pop!=fra1", [false, true, true]),
            ("pop=fra1,role=edge", [true, false, false]),
            (" pop = fra1 , role != canary ", [true, false, false]),
            ("role", [true, true, false]),
            ("!role", [false, false, true]),
            ("pop=", [false, false, false]),
        ];
        for (text, expected) in cases {
            let selector: Selector = text.parse().unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let got = [
                selector.matches(&edge_fra),
                selector.matches(&canary_ams),
                selector.matches(&bare),
            ];
            assert_eq!(got, expected, "{text:?}");
        }
        assert!(Selector::everything().is_empty());
    }

    #[test]
    fn malformed_selectors_say_what_is_wrong() {
        for (text, needle) in [
            ("pop=fra1,,role=edge", "empty requirement"),
            ("=fra1", "no key"),
            ("!", "no key"),
            ("pop=fra 1", "character"),
            ("pop=a=b", "character"),
            ("po\u{7}p=x", "character"),
        ] {
            let error = text.parse::<Selector>().unwrap_err().to_string();
            assert!(error.contains(needle), "{text:?}: {error}");
        }
        let long = format!("k={}", "v".repeat(129));
        assert!(long.parse::<Selector>().is_err());
        let many = (0..33).map(|i| format!("k{i}")).collect::<Vec<_>>().join(",");
        assert!(many.parse::<Selector>().is_err());
    }

    proptest! {
        #[test]
        fn any_text_parses_or_errs_and_a_parsed_selector_round_trips(text in ".{0,64}") {
            if let Ok(selector) = text.parse::<Selector>() {
                let again: Selector = selector.to_string().parse().unwrap();
                prop_assert_eq!(again, selector);
            }
        }
    }
}
