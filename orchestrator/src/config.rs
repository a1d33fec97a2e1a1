//! Orchestrator configuration, every key written once.
//!
//! The [`config_keys!`] table below is the one place a key is defined: its TOML
//! name, type, default, value name and documentation. From it come the
//! [`Config`] struct and its defaults, the command-line flag (`--heartbeat-timeout`)
//! and environment variable (`SECBEAT_HEARTBEAT_TIMEOUT`) of every key with its
//! `--help` text and real default, and the annotated example file
//! ([`example_toml`], kept in `examples/orchestrator.toml`).
//!
//! Layers: embedded defaults < TOML file (`--config`) < `SECBEAT_*` environment <
//! flags, merged into one TOML table, deserialized once (errors name the key, via
//! `serde_path_to_error`) and validated once (errors name the key). `main` prints
//! one line and exits 64 on any of them. The seed's keys are accepted unchanged at
//! top level. Durations are seconds (or, for the seed's
//! `self_healing_cooldown_minutes`, minutes) and may be fractions; they
//! deserialize straight into [`Duration`].

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use secbeat::signing::WebhookSecret;

use crate::domain::{
    forecast::{ForecastConfig, Model},
    healer::HealingPolicy,
    node::DisruptionBudget,
    registry::{DisruptionConfig, LifecycleConfig, disruption::MAX_DRAIN_DEADLINE},
    scaler::{ScalingMode, ScalingPolicy},
};

/// A configuration problem, naming the key it is about.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The TOML key (or `--config` for the file itself).
    pub key: String,
    /// What is wrong, lowercase.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// How a key's value is written on the command line and in the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text (addresses, paths, URLs, names).
    Text,
    /// A whole number.
    Int,
    /// A number.
    Float,
    /// `true` or `false`.
    Bool,
    /// Text that is never shown (`--help` hides the environment's value).
    Secret,
    /// A list of text values (TOML array; one comma-separated flag or variable,
    /// and the flag may repeat).
    List,
    /// A table of its own keys (`[tls]`, `[etcd_tls]`).
    Table,
}

/// One configuration key, as the table defines it.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// The TOML key (and, dashed, the flag; upper-cased, the variable).
    pub name: &'static str,
    /// The example file's section heading this key opens, if any.
    pub section: Option<&'static str>,
    /// What it does: the first line is the `--help` text; all of it annotates the
    /// example file.
    pub doc: &'static str,
    /// The value's name in `--help` (`SECS`, `ADDR`, ...).
    pub value_name: &'static str,
    /// How the value is written.
    pub kind: Kind,
}

/// Durations in seconds, fractions allowed (`30`, `0.2`).
mod seconds {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(value.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let seconds = f64::deserialize(deserializer)?;
        Duration::try_from_secs_f64(seconds)
            .map_err(|_| serde::de::Error::custom(format!("{seconds} is not a valid number of seconds")))
    }
}

/// Durations in minutes, fractions allowed (the seed's `self_healing_cooldown_minutes`).
mod minutes {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(value.as_secs_f64() / 60.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let minutes = f64::deserialize(deserializer)?;
        Duration::try_from_secs_f64(minutes * 60.0)
            .map_err(|_| serde::de::Error::custom(format!("{minutes} is not a valid number of minutes")))
    }
}

/// A bearer token from config. Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// The token itself, for the one place that compares it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

fn token<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Token>, D::Error> {
    let token = String::deserialize(deserializer)?;
    if token.len() < 16 {
        return Err(serde::de::Error::custom("must be at least 16 characters"));
    }
    Ok(Some(Token(token)))
}

fn webhook_secret<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<WebhookSecret>, D::Error> {
    let text = String::deserialize(deserializer)?;
    WebhookSecret::parse(&text)
        .map(Some)
        .map_err(|error| serde::de::Error::custom(error.to_string()))
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("a valid default address")
}

/// Defines a configuration struct from its keys: the struct (serde, defaults
/// filled in), its `Default`, and the key table flags, variables, `--help` and the
/// example file are generated from. One line per key:
/// `/// doc` then `name: Type = default, Kind "VALUE";`, optionally followed by
/// `serde(...)` attributes.
macro_rules! config_keys {
    (
        $(#[$meta:meta])*
        struct $name:ident, table $table:ident;
        $(
            $(section $section:literal;)?
            $(#[doc = $doc:literal])+
            $field:ident : $ty:ty = $default:expr, $kind:ident $value_name:literal
                $(, serde($($serde:tt)*))?;
        )+
    ) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $(
                $(#[doc = $doc])+
                $(#[serde($($serde)*)])?
                pub $field: $ty,
            )+
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    $($field: $default,)+
                }
            }
        }

        /// Every key of this table, in the order the example file lists them.
        pub const $table: &[Key] = &[
            $(Key {
                name: stringify!($field),
                section: config_keys!(@section $($section)?),
                doc: concat!($($doc, "\n"),+),
                value_name: $value_name,
                kind: Kind::$kind,
            },)+
        ];
    };
    (@section $section:literal) => { Some($section) };
    (@section) => { None };
}

config_keys! {
    /// The `[tls]` table: server certificate and key (PEM), and the CA that client
    /// certificates must chain to (mTLS).
    #[derive(Debug)]
    struct TlsConfig, table TLS_KEYS;

    /// Server certificate chain (PEM) for TLS on the gRPC listener.
    cert: Option<PathBuf> = None, Text "FILE", serde(skip_serializing_if = "Option::is_none");
    /// Server private key (PEM).
    key: Option<PathBuf> = None, Text "FILE", serde(skip_serializing_if = "Option::is_none");
    /// CA that agent and operator client certificates must chain to (turns mTLS
    /// on): agents must then present a certificate for their node id, and
    /// operators may use certificates instead of tokens.
    client_ca: Option<PathBuf> = None, Text "FILE", serde(skip_serializing_if = "Option::is_none");
    /// Key (exactly 32 random bytes) that seals TLS 1.3 session tickets, so
    /// agents resume their TLS session after a restart instead of a full
    /// handshake. Give every orchestrator of a highly available pair the same
    /// file so they resume after a failover too; you rotate it. Unset: a key in
    /// state_dir, made on first start and replaced daily.
    session_ticket_key: Option<PathBuf> = None, Text "FILE", serde(skip_serializing_if = "Option::is_none");
}

config_keys! {
    /// The `[etcd_tls]` table: how the orchestrator proves itself to etcd and
    /// checks etcd's certificate (use https:// endpoints with it).
    #[derive(Debug)]
    struct EtcdTlsConfig, table ETCD_TLS_KEYS;

    /// CA (PEM) that etcd's server certificates must chain to.
    ca: Option<PathBuf> = None, Text "FILE", serde(skip_serializing_if = "Option::is_none");
    /// Client certificate (PEM) for etcd's --client-cert-auth.
    cert: Option<PathBuf> = None, Text "FILE", serde(skip_serializing_if = "Option::is_none");
    /// Client private key (PEM).
    key: Option<PathBuf> = None, Text "FILE", serde(skip_serializing_if = "Option::is_none");
}

/// The keys of a table key (`tls`, `etcd_tls`).
pub fn table_keys(name: &str) -> &'static [Key] {
    match name {
        "tls" => TLS_KEYS,
        "etcd_tls" => ETCD_TLS_KEYS,
        other => unreachable!("{other} is not a table key"),
    }
}

config_keys! {
    /// The orchestrator's configuration. Field names are the TOML keys.
    #[derive(Debug)]
    struct Config, table KEYS;

    section "listeners and state";
    /// gRPC listen address for agents (AgentService) and operators (FleetService,
    /// health, reflection). Plain text: keep it on loopback unless TLS is on.
    grpc_listen: SocketAddr = addr("127.0.0.1:50051"), Text "ADDR";
    /// HTTP listen address for /healthz, /readyz, /metrics and the JSON API.
    http_listen: SocketAddr = addr("127.0.0.1:3030"), Text "ADDR";
    /// Directory for durable state (created if missing).
    state_dir: PathBuf = PathBuf::from("secbeat-data"), Text "DIR";

    section "failure detection (the seed's keys, plus the ones it left implicit)";
    /// Heartbeat interval sent to agents in Welcome, seconds.
    heartbeat_interval: Duration = Duration::from_secs(10), Float "SECS", serde(with = "seconds");
    /// Silence after which a live node is SUSPECT, seconds; at least 2x the interval.
    heartbeat_timeout: Duration = Duration::from_secs(30), Float "SECS", serde(with = "seconds");
    /// How often the dead-node check runs, seconds.
    dead_node_check_interval: Duration = Duration::from_secs(10), Float "SECS", serde(with = "seconds");
    /// Consecutive checks a node stays SUSPECT before it is FAILED.
    required_consecutive_failures: u32 = 2, Int "N";
    /// How long a Terminate may stay unacknowledged before it is cancelled, seconds
    /// (a later crash is then an unexpected failure, not an expected exit).
    termination_deadline: Duration = Duration::from_secs(30), Float "SECS", serde(with = "seconds");
    /// Graceful-shutdown budget sent to agents with Terminate, seconds.
    termination_grace_period: Duration = Duration::from_secs(30), Float "SECS", serde(with = "seconds");
    /// How long a new agent stream may take to send Hello, seconds.
    hello_timeout: Duration = Duration::from_secs(5), Float "SECS", serde(with = "seconds");
    /// How long FAILED, TERMINATED and LEFT nodes stay listed, seconds.
    node_retention: Duration = Duration::from_secs(3600), Float "SECS", serde(with = "seconds");
    /// Bound on graceful shutdown (open calls drain) before exiting anyway, seconds.
    shutdown_timeout: Duration = Duration::from_secs(10), Float "SECS", serde(with = "seconds");
    /// Latest events kept for WatchEvents resumes (since_sequence); an older
    /// sequence gets OUT_OF_RANGE and the client lists again.
    event_history_size: u32 = 10_000, Int "N";

    section "predictive scaling (the seed's keys)";
    /// Interval of scaling checks (fleet CPU history, prediction), seconds.
    scaling_check_interval_seconds: Duration = Duration::from_secs(60), Float "SECS", serde(with = "seconds");
    /// Fleet CPU fraction (0..1, not percent) above which to scale up.
    scale_up_cpu_threshold: f64 = 0.80, Float "FRACTION";
    /// Fleet CPU fraction (0..1, not percent) below which to scale down.
    scale_down_cpu_threshold: f64 = 0.30, Float "FRACTION";
    /// forecast_and_scale acts on scaling decisions (webhooks, scale-down
    /// terminates); forecast_only predicts, scores and logs what it would do.
    scaling_mode: ScalingMode = ScalingMode::ForecastAndScale, Text "MODE";
    /// Forecasting model: auto (picks by recent scored error; see BENCHMARKS.md),
    /// naive, mean, level, trend, seasonal_hour, seasonal_day, holt_winters, linear.
    forecast_model: Model = Model::Auto, Text "NAME";
    /// Checks in a row above scale_up_cpu_threshold before scaling up.
    scale_up_consecutive_checks: u32 = 2, Int "N";
    /// Checks in a row below scale_down_cpu_threshold before scaling down.
    scale_down_consecutive_checks: u32 = 5, Int "N";
    /// Quiet time after a scale-up, seconds.
    scale_up_cooldown: Duration = Duration::from_secs(300), Float "SECS", serde(with = "seconds");
    /// Quiet time after any scaling action before a scale-down, seconds.
    scale_down_cooldown: Duration = Duration::from_secs(600), Float "SECS", serde(with = "seconds");
    /// Never scale down below this many nodes.
    min_nodes: u32 = 1, Int "N";
    /// Fleet size cap: no scale-up beyond it, and a new node beyond it is refused
    /// (RESOURCE_EXHAUSTED), so a flood of fake node ids cannot grow the registry.
    max_nodes: u32 = 1000, Int "N";
    /// Predictions less confident than this are not acted on; the current CPU is
    /// (and the webhook says HIGH_FLEET_CPU_LOAD).
    min_prediction_confidence: f64 = 0.5, Float "P";
    /// URL that every webhook (self-healing, alerts, scaling) is POSTed to.
    provisioning_webhook_url: String = "http://localhost:8000/provision".to_owned(), Text "URL";

    section "webhook delivery (a durable outbox: a crash or an outage loses none)";
    /// Webhook signing secret, `whsec_<base64>` or raw; prefer the environment
    /// variable (flags show in `ps`). Unset: webhooks go unsigned, with a warning.
    webhook_secret: Option<WebhookSecret> = None, Secret "SECRET",
        serde(skip_serializing, deserialize_with = "webhook_secret");
    /// Timeout of one webhook delivery attempt, seconds.
    webhook_timeout: Duration = Duration::from_secs(10), Float "SECS", serde(with = "seconds");
    /// First retry delay of a failed webhook (doubles, jittered), seconds.
    webhook_retry_initial: Duration = Duration::from_secs(1), Float "SECS", serde(with = "seconds");
    /// Longest webhook retry delay, seconds.
    webhook_retry_max: Duration = Duration::from_secs(60), Float "SECS", serde(with = "seconds");
    /// Give up on (dead-letter) webhooks undelivered for this long, seconds.
    webhook_max_age: Duration = Duration::from_secs(86_400), Float "SECS", serde(with = "seconds");

    section "self-healing (the seed's \"Self-Healing Tuning\")";
    /// Self-healing (UNEXPECTED_NODE_FAILURE) webhooks allowed per rolling hour.
    max_self_healing_per_hour: u32 = 5, Int "N";
    /// Minimum time between replacements of one node identity, minutes.
    self_healing_cooldown_minutes: Duration = Duration::from_secs(15 * 60), Float "MINS", serde(with = "minutes");
    /// Share of the fleet failing within mass_failure_window that is a mass
    /// failure: one MASS_NODE_FAILURE alert, and none of those nodes healed; 1
    /// turns the guard off.
    mass_failure_fraction: f64 = 0.5, Float "FRACTION";
    /// Window over which failures count together for the mass-failure guard, seconds.
    mass_failure_window: Duration = Duration::from_secs(60), Float "SECS", serde(with = "seconds");
    /// Fewer failures than this in a window are never a mass failure.
    mass_failure_min_nodes: u32 = 3, Int "N";
    /// The node label whose values are the failure domains (e.g. pop): the
    /// mass-failure guard and the hourly budget then apply per domain, and nodes
    /// without the label form one domain. Empty: the whole fleet is one domain.
    failure_domain_label: String = String::new(), Text "LABEL";
    /// After a restart, time known nodes get to reconnect before they are judged,
    /// seconds (those that do not are FAILED, or TERMINATED if told to terminate).
    restart_reconnect_grace: Duration = Duration::from_secs(60), Float "SECS", serde(with = "seconds");

    section "taking nodes out of service (README, Drain, maintenance and budgets)";
    /// How long a drain's --on-drain hook may run when DrainNode names no
    /// deadline (and for scale-down drains), seconds; a drain not reported done
    /// by then fails (DRAIN_FAILED) and the node stays in service.
    drain_deadline: Duration = Duration::from_secs(60), Float "SECS", serde(with = "seconds");
    /// How long a node in maintenance may stay away (reboot, patch) before it is
    /// FAILED after all, seconds: a forgotten maintenance must not hide a dead node.
    maintenance_max: Duration = Duration::from_secs(3600), Float "SECS", serde(with = "seconds");
    /// Most nodes DRAINING, DRAINED or TERMINATING at once through drains and
    /// scale-downs: a count (2) or a percent of the live fleet ("10%", rounded
    /// up). A drain beyond it is refused (FAILED_PRECONDITION) unless forced.
    max_disrupted_nodes: DisruptionBudget = DisruptionBudget::Percent(10.0), Text "N|PCT";
    /// A node carrying this label (key=value) is never chosen for scale-down;
    /// empty turns protection off.
    protect_label: String = "secbeat.io/protect=true".to_owned(), Text "KEY=VALUE";

    section "security (SECURITY.md)";
    /// Allow plain text on a non-loopback gRPC address (anyone who reaches it can
    /// pose as a node or an operator).
    allow_insecure: bool = false, Bool "BOOL";
    /// Bearer token of the operator role (read and change the fleet), at least 16
    /// characters; prefer the environment variable. Never logged.
    admin_token: Option<Token> = None, Secret "TOKEN", serde(skip_serializing, deserialize_with = "token");
    /// Bearer token of the read-only viewer role, at least 16 characters.
    viewer_token: Option<Token> = None, Secret "TOKEN", serde(skip_serializing, deserialize_with = "token");
    /// Bearer token agents present (secbeat-agent --token) when there is no
    /// tls.client_ca, at least 16 characters; required once an operator or viewer
    /// token is set without client certificates, so no agent stream is anonymous.
    agent_token: Option<Token> = None, Secret "TOKEN", serde(skip_serializing, deserialize_with = "token");
    /// Largest agent message accepted, bytes (a larger one ends that stream).
    max_message_bytes: u32 = 64 * 1024, Int "BYTES";
    /// Messages per second one agent stream may send on average (bursts of 4 s
    /// allowed); beyond it, that stream alone ends with RESOURCE_EXHAUSTED.
    max_messages_per_second: f64 = 50.0, Float "N";
    /// A new connection (gRPC or HTTP) must send its first bytes (HTTP/2 preface
    /// or TLS ClientHello) within this time, seconds, or it is closed.
    connection_handshake_timeout: Duration = Duration::from_secs(10), Float "SECS", serde(with = "seconds");
    /// A connection that sends nothing for this long is closed, seconds. Live
    /// clients always send: agents heartbeat, and the server pings every gRPC
    /// connection every third of this.
    connection_idle_timeout: Duration = Duration::from_secs(90), Float "SECS", serde(with = "seconds");
    /// Connections one source address may hold (each agent needs one; a NAT in
    /// front of many agents needs more).
    max_connections_per_source: u32 = 64, Int "N";
    /// TLS on the gRPC listener (`secbeat-orchestrator certs init` makes a
    /// development set).
    tls: TlsConfig = TlsConfig::default(), Table "";

    section "high availability (etcd; README, High availability)";
    /// etcd client URLs (http://host:2379, https:// with [etcd_tls]). Set: the
    /// orchestrators sharing them elect one fenced leader and keep the fleet's state
    /// in etcd. Empty: one orchestrator on the embedded store in state_dir.
    etcd_endpoints: Vec<String> = Vec::new(), List "URLS";
    /// Key prefix of this fleet in etcd (several fleets may share one etcd, each
    /// under its own prefix); starts and ends with '/'.
    etcd_prefix: String = "/secbeat/".to_owned(), Text "PREFIX";
    /// Leader lease, whole seconds: a leader that cannot renew it for this long
    /// stops acting, and a standby takes over within about this time.
    leader_lease_ttl: Duration = Duration::from_secs(5), Float "SECS", serde(with = "seconds");
    /// Deadline of one etcd request, seconds (each call has its own; an endpoint
    /// that misses it is left for the next one).
    etcd_request_timeout: Duration = Duration::from_secs(2), Float "SECS", serde(with = "seconds");
    /// The URL agents and operators reach this orchestrator's gRPC API at, handed
    /// out as the secbeat-leader hint. Default: derived from grpc_listen (the host
    /// name when it listens on every address; https with [tls]).
    advertise_url: Option<String> = None, Text "URL", serde(skip_serializing_if = "Option::is_none");
    /// TLS to etcd.
    etcd_tls: EtcdTlsConfig = EtcdTlsConfig::default(), Table "";
}

impl std::fmt::Debug for ConfigFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only which keys were given: a secret's value never reaches a log.
        f.debug_list()
            .entries(self.given.iter().map(|(path, _)| path.join(".")))
            .finish()
    }
}

/// The keys given as flags or `SECBEAT_*` variables: every key of the table is one
/// flag and one variable, generated (so `--help` and the names can never drift from
/// the table). Flags beat variables (clap), both beat the file.
#[derive(Clone, Default)]
pub struct ConfigFlags {
    /// (TOML path, value) of each key given.
    given: Vec<(Vec<&'static str>, toml::Value)>,
}

/// A flag of the table: its TOML path, its `--name` and its variable.
struct Flag {
    path: Vec<&'static str>,
    key: &'static Key,
    id: String,
}

fn flags() -> Vec<Flag> {
    let mut flags = Vec::new();
    for key in KEYS {
        if key.kind == Kind::Table {
            for inner in table_keys(key.name) {
                flags.push(Flag {
                    path: vec![key.name, inner.name],
                    key: inner,
                    id: format!("{}_{}", key.name, inner.name),
                });
            }
        } else {
            flags.push(Flag {
                path: vec![key.name],
                key,
                id: key.name.to_owned(),
            });
        }
    }
    flags
}

/// The default of `path` as `--help` shows it.
fn default_text(defaults: &toml::Table, path: &[&str]) -> String {
    match lookup(defaults, path) {
        Some(toml::Value::String(text)) => text.clone(),
        Some(toml::Value::Float(number)) => format!("{number}"),
        Some(toml::Value::Array(items)) if items.is_empty() => "none".to_owned(),
        Some(toml::Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map_or_else(|| item.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
        None => "none".to_owned(),
    }
}

/// The first paragraph of a key's doc, on one line.
fn summary(doc: &str) -> String {
    doc.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

impl clap::Args for ConfigFlags {
    fn augment_args(command: clap::Command) -> clap::Command {
        let defaults = toml::Table::try_from(Config::default()).expect("the defaults serialize");
        let mut command = command;
        for flag in flags() {
            let help = format!(
                "{} [default: {}]",
                summary(flag.key.doc),
                default_text(&defaults, &flag.path)
            );
            let mut arg = clap::Arg::new(flag.id.clone())
                .long(flag.id.replace('_', "-"))
                .env(format!("SECBEAT_{}", flag.id.to_uppercase()))
                .value_name(flag.key.value_name)
                .help(help)
                .action(clap::ArgAction::Set);
            arg = match flag.key.kind {
                Kind::Int => arg.value_parser(clap::value_parser!(i64)),
                Kind::Float => arg.value_parser(clap::value_parser!(f64)),
                Kind::Bool => arg.value_parser(clap::value_parser!(bool)),
                Kind::Secret => arg.hide_env_values(true),
                Kind::List => arg.value_delimiter(',').action(clap::ArgAction::Append),
                Kind::Text | Kind::Table => arg,
            };
            command = command.arg(arg);
        }
        command
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        Self::augment_args(command)
    }
}

impl clap::FromArgMatches for ConfigFlags {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut given = Vec::new();
        for flag in flags() {
            let value = match flag.key.kind {
                Kind::Int => matches.get_one::<i64>(&flag.id).map(|v| toml::Value::Integer(*v)),
                Kind::Float => matches.get_one::<f64>(&flag.id).map(|v| toml::Value::Float(*v)),
                Kind::Bool => matches
                    .get_one::<bool>(&flag.id)
                    .map(|v| toml::Value::Boolean(*v)),
                Kind::Text | Kind::Secret | Kind::Table => matches
                    .get_one::<String>(&flag.id)
                    .map(|v| toml::Value::String(v.clone())),
                Kind::List => matches.get_many::<String>(&flag.id).map(|values| {
                    toml::Value::Array(
                        values
                            .map(|v| v.trim())
                            .filter(|v| !v.is_empty())
                            .map(|v| toml::Value::String(v.to_owned()))
                            .collect(),
                    )
                }),
            };
            if let Some(value) = value {
                given.push((flag.path, value));
            }
        }
        Ok(Self { given })
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl ConfigFlags {
    /// Flags as if given on the command line, for tests: `[("heartbeat_timeout", 45.0.into())]`.
    pub fn from_pairs(pairs: &[(&str, toml::Value)]) -> Self {
        let flags = flags();
        let given = pairs
            .iter()
            .map(|(id, value)| {
                let flag = flags
                    .iter()
                    .find(|flag| flag.id == *id)
                    .unwrap_or_else(|| panic!("{id} is not a key"));
                (flag.path.clone(), value.clone())
            })
            .collect();
        Self { given }
    }
}

impl Config {
    /// Loads the configuration: defaults, then the TOML text of `file` (if any),
    /// then `flags` (flags and variables); then validates.
    pub fn load(file: Option<(&Path, &str)>, flags: &ConfigFlags) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some((path, text)) => toml::from_str::<toml::Table>(text).map_err(|error| {
                let message = error.message().to_owned();
                let at = error
                    .span()
                    .map(|span| format!(" at line {}", text[..span.start].lines().count().max(1)))
                    .unwrap_or_default();
                ConfigError::new("--config", format!("{}{at}: {message}", path.display()))
            })?,
            None => toml::Table::new(),
        };
        for (path, value) in &flags.given {
            let (last, parents) = path.split_last().expect("a path has a key");
            let mut at = &mut table;
            for parent in parents {
                let entry = at
                    .entry(parent.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                at = match entry {
                    toml::Value::Table(inner) => inner,
                    _ => return Err(ConfigError::new(*parent, "must be a table")),
                };
            }
            at.insert(last.to_string(), value.clone());
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|error| {
                let key = error.path().to_string();
                ConfigError::new(key, error.into_inner().message().to_owned())
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("heartbeat_interval", self.heartbeat_interval),
            ("heartbeat_timeout", self.heartbeat_timeout),
            ("dead_node_check_interval", self.dead_node_check_interval),
            ("termination_deadline", self.termination_deadline),
            ("hello_timeout", self.hello_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
            (
                "scaling_check_interval_seconds",
                self.scaling_check_interval_seconds,
            ),
            ("webhook_timeout", self.webhook_timeout),
            ("webhook_retry_initial", self.webhook_retry_initial),
            ("webhook_max_age", self.webhook_max_age),
            ("mass_failure_window", self.mass_failure_window),
            ("drain_deadline", self.drain_deadline),
            ("maintenance_max", self.maintenance_max),
        ];
        for (key, value) in positive {
            if value.is_zero() {
                return Err(ConfigError::new(key, "must be greater than zero"));
            }
        }
        if self.heartbeat_timeout < self.heartbeat_interval * 2 {
            return Err(ConfigError::new(
                "heartbeat_timeout",
                format!(
                    "{}s must be at least twice heartbeat_interval ({}s), or one late heartbeat is a false failure",
                    self.heartbeat_timeout.as_secs_f64(),
                    self.heartbeat_interval.as_secs_f64()
                ),
            ));
        }
        if self.required_consecutive_failures == 0 {
            return Err(ConfigError::new(
                "required_consecutive_failures",
                "must be at least 1",
            ));
        }
        for (key, value) in [
            ("scale_up_cpu_threshold", self.scale_up_cpu_threshold),
            ("scale_down_cpu_threshold", self.scale_down_cpu_threshold),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(ConfigError::new(
                    key,
                    format!("{value} is outside 0..1 (a fraction, not percent)"),
                ));
            }
        }
        if self.scale_up_cpu_threshold <= self.scale_down_cpu_threshold {
            return Err(ConfigError::new(
                "scale_up_cpu_threshold",
                format!(
                    "{} must be above scale_down_cpu_threshold ({})",
                    self.scale_up_cpu_threshold, self.scale_down_cpu_threshold
                ),
            ));
        }
        if self.webhook_retry_max < self.webhook_retry_initial {
            return Err(ConfigError::new(
                "webhook_retry_max",
                format!(
                    "{}s is below webhook_retry_initial ({}s)",
                    self.webhook_retry_max.as_secs_f64(),
                    self.webhook_retry_initial.as_secs_f64()
                ),
            ));
        }
        for (key, value) in [
            ("scale_up_consecutive_checks", self.scale_up_consecutive_checks),
            (
                "scale_down_consecutive_checks",
                self.scale_down_consecutive_checks,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
        }
        if self.min_nodes > self.max_nodes {
            return Err(ConfigError::new(
                "min_nodes",
                format!("{} is above max_nodes ({})", self.min_nodes, self.max_nodes),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_prediction_confidence) {
            return Err(ConfigError::new(
                "min_prediction_confidence",
                format!("{} is outside 0..1", self.min_prediction_confidence),
            ));
        }
        if self.drain_deadline > MAX_DRAIN_DEADLINE {
            return Err(ConfigError::new(
                "drain_deadline",
                format!("must be at most {}s", MAX_DRAIN_DEADLINE.as_secs()),
            ));
        }
        self.protect_label()?;
        let label = self.failure_domain_label.trim();
        if label.len() > 128
            || label
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || "=!,".contains(c))
        {
            return Err(ConfigError::new(
                "failure_domain_label",
                format!("{label:?} is not a label key (e.g. pop)"),
            ));
        }
        self.validate_security()?;
        self.validate_high_availability()?;
        let fraction = self.mass_failure_fraction;
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(ConfigError::new(
                "mass_failure_fraction",
                format!("{fraction} is outside (0, 1] (1 turns the guard off)"),
            ));
        }
        let url = &self.provisioning_webhook_url;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::new(
                "provisioning_webhook_url",
                format!("{url:?} is not an http(s) URL"),
            ));
        }
        Ok(())
    }

    fn validate_high_availability(&self) -> Result<(), ConfigError> {
        let prefix = &self.etcd_prefix;
        if !prefix.starts_with('/')
            || !prefix.ends_with('/')
            || prefix.len() > 128
            || prefix.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(ConfigError::new(
                "etcd_prefix",
                format!(
                    "{prefix:?} must start and end with '/', hold no spaces or control characters and be at most 128 bytes (e.g. /secbeat/ or /secbeat/eu-west/)"
                ),
            ));
        }
        let ttl = self.leader_lease_ttl;
        if ttl.subsec_nanos() != 0 || !(2..=60).contains(&ttl.as_secs()) {
            return Err(ConfigError::new(
                "leader_lease_ttl",
                format!(
                    "{}s must be a whole number of seconds from 2 to 60 (etcd leases count whole seconds)",
                    ttl.as_secs_f64()
                ),
            ));
        }
        if self.etcd_request_timeout.is_zero() || self.etcd_request_timeout >= ttl {
            return Err(ConfigError::new(
                "etcd_request_timeout",
                format!(
                    "must be greater than zero and shorter than leader_lease_ttl ({}s), or one slow call outlives the lease",
                    ttl.as_secs()
                ),
            ));
        }
        let tls = &self.etcd_tls;
        for endpoint in &self.etcd_endpoints {
            let scheme = endpoint.split_once("://").map(|(scheme, _)| scheme);
            let host = endpoint
                .split_once("://")
                .map(|(_, rest)| rest.trim_end_matches('/'));
            let valid = matches!(scheme, Some("http" | "https"))
                && host.is_some_and(|host| !host.is_empty() && !host.contains('/'))
                && endpoint.parse::<axum::http::Uri>().is_ok();
            if !valid {
                return Err(ConfigError::new(
                    "etcd_endpoints",
                    format!("{endpoint:?} is not an etcd client URL (http://host:2379 or https://host:2379)"),
                ));
            }
            if scheme == Some("https") && tls.ca.is_none() {
                return Err(ConfigError::new(
                    "etcd_tls.ca",
                    format!("{endpoint} is https: set etcd_tls.ca to the CA of etcd's certificates"),
                ));
            }
            if scheme == Some("http") && (tls.ca.is_some() || tls.cert.is_some()) {
                return Err(ConfigError::new(
                    "etcd_endpoints",
                    format!("{endpoint} is plain http but [etcd_tls] is set: use https:// endpoints"),
                ));
            }
        }
        match (&tls.cert, &tls.key) {
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "etcd_tls.key",
                    "etcd_tls.cert is set, etcd_tls.key is not",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "etcd_tls.cert",
                    "etcd_tls.key is set, etcd_tls.cert is not",
                ));
            }
            _ => {}
        }
        for (key, path) in [
            ("etcd_tls.ca", &tls.ca),
            ("etcd_tls.cert", &tls.cert),
            ("etcd_tls.key", &tls.key),
        ] {
            if let Some(path) = path
                && let Err(error) = std::fs::metadata(path)
            {
                return Err(ConfigError::new(key, format!("{}: {error}", path.display())));
            }
        }
        if let Some(url) = &self.advertise_url {
            let valid = (url.starts_with("http://") || url.starts_with("https://"))
                && url
                    .parse::<axum::http::Uri>()
                    .is_ok_and(|uri| uri.host().is_some())
                && !url.chars().any(|c| c.is_control() || c.is_whitespace());
            if !valid {
                return Err(ConfigError::new(
                    "advertise_url",
                    format!("{url:?} is not a URL agents can dial (http://host:port or https://host:port)"),
                ));
            }
        }
        Ok(())
    }

    /// Whether the orchestrators share state in etcd (else: the embedded store).
    pub fn high_availability(&self) -> bool {
        !self.etcd_endpoints.is_empty()
    }

    /// The URL agents reach this orchestrator at: `advertise_url`, or one derived
    /// from `grpc_listen` (`bound` is the address actually bound, for port 0).
    pub fn advertise_url(&self, bound: SocketAddr) -> String {
        if let Some(url) = &self.advertise_url {
            return url.clone();
        }
        let scheme = if self.tls.cert.is_some() { "https" } else { "http" };
        let host = if bound.ip().is_unspecified() {
            secbeat::process::kernel_hostname().unwrap_or_else(|| "localhost".to_owned())
        } else {
            match bound.ip() {
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            }
        };
        format!("{scheme}://{host}:{}", bound.port())
    }

    fn validate_security(&self) -> Result<(), ConfigError> {
        let tls = &self.tls;
        let people = self.admin_token.is_some() || self.viewer_token.is_some();
        if people && tls.client_ca.is_none() && self.agent_token.is_none() {
            return Err(ConfigError::new(
                "agent_token",
                "admin_token/viewer_token protect the operator API, but without tls.client_ca agent streams would be open to anyone (who could take a node over by its id): set agent_token (agents: --token or SECBEAT_AGENT_TOKEN) or tls.client_ca",
            ));
        }
        let tokens = [
            ("admin_token", &self.admin_token),
            ("viewer_token", &self.viewer_token),
            ("agent_token", &self.agent_token),
        ];
        for (i, (key, token)) in tokens.iter().enumerate() {
            for (other, other_token) in &tokens[..i] {
                if token.is_some() && token == other_token {
                    return Err(ConfigError::new(
                        *key,
                        format!("is the same as {other}: each role needs its own token"),
                    ));
                }
            }
        }
        match (&tls.cert, &tls.key) {
            (Some(_), None) => return Err(ConfigError::new("tls.key", "tls.cert is set, tls.key is not")),
            (None, Some(_)) => return Err(ConfigError::new("tls.cert", "tls.key is set, tls.cert is not")),
            _ => {}
        }
        if tls.client_ca.is_some() && tls.cert.is_none() {
            return Err(ConfigError::new(
                "tls.client_ca",
                "client certificates need TLS: set tls.cert and tls.key",
            ));
        }
        if tls.session_ticket_key.is_some() && tls.cert.is_none() {
            return Err(ConfigError::new(
                "tls.session_ticket_key",
                "session tickets need TLS: set tls.cert and tls.key",
            ));
        }
        for (key, path) in [
            ("tls.cert", &tls.cert),
            ("tls.key", &tls.key),
            ("tls.client_ca", &tls.client_ca),
            ("tls.session_ticket_key", &tls.session_ticket_key),
        ] {
            if let Some(path) = path
                && let Err(error) = std::fs::metadata(path)
            {
                return Err(ConfigError::new(key, format!("{}: {error}", path.display())));
            }
        }
        if tls.cert.is_none() && !self.grpc_listen.ip().is_loopback() && !self.allow_insecure {
            return Err(ConfigError::new(
                "allow_insecure",
                format!(
                    "grpc_listen {} is not loopback and TLS is off: set [tls] cert and key, or allow_insecure = true to accept plain text (anyone who reaches the port can pose as a node or an operator)",
                    self.grpc_listen
                ),
            ));
        }
        if !(1..=1_000_000).contains(&self.event_history_size) {
            return Err(ConfigError::new(
                "event_history_size",
                "must be between 1 and 1000000",
            ));
        }
        if self.connection_handshake_timeout.is_zero() {
            return Err(ConfigError::new(
                "connection_handshake_timeout",
                "must be greater than zero",
            ));
        }
        if self.connection_idle_timeout < self.heartbeat_interval * 3 {
            return Err(ConfigError::new(
                "connection_idle_timeout",
                format!(
                    "{}s must be at least three heartbeat intervals ({}s), or live agents are cut off",
                    self.connection_idle_timeout.as_secs_f64(),
                    (self.heartbeat_interval * 3).as_secs_f64()
                ),
            ));
        }
        if self.max_connections_per_source == 0 {
            return Err(ConfigError::new(
                "max_connections_per_source",
                "must be at least 1",
            ));
        }
        if self.max_message_bytes < 1024 {
            return Err(ConfigError::new("max_message_bytes", "must be at least 1024"));
        }
        if !(self.max_messages_per_second.is_finite() && self.max_messages_per_second >= 1.0) {
            return Err(ConfigError::new("max_messages_per_second", "must be at least 1"));
        }
        Ok(())
    }

    /// `protect_label` as (key, value); None when empty.
    fn protect_label(&self) -> Result<Option<(String, String)>, ConfigError> {
        let text = self.protect_label.trim();
        if text.is_empty() {
            return Ok(None);
        }
        match text.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                Ok(Some((key.trim().to_owned(), value.trim().to_owned())))
            }
            _ => Err(ConfigError::new(
                "protect_label",
                format!("{text:?} is not key=value (e.g. secbeat.io/protect=true), or empty"),
            )),
        }
    }

    /// The lifecycle parameters for the registry and detector.
    pub fn lifecycle(&self) -> LifecycleConfig {
        LifecycleConfig {
            disruption: DisruptionConfig {
                drain_deadline: self.drain_deadline,
                maintenance_max: self.maintenance_max,
                budget: self.max_disrupted_nodes,
                protect_label: self.protect_label().expect("validated at load"),
                failure_domain_label: Some(self.failure_domain_label.trim())
                    .filter(|label| !label.is_empty())
                    .map(str::to_owned),
            },
            heartbeat_timeout: self.heartbeat_timeout,
            dead_node_check_interval: self.dead_node_check_interval,
            required_consecutive_failures: self.required_consecutive_failures,
            termination_deadline: self.termination_deadline,
            termination_grace_period: self.termination_grace_period,
            node_retention: self.node_retention,
        }
    }

    /// The scaler's parameters.
    pub fn scaling(&self) -> ScalingPolicy {
        ScalingPolicy {
            up_threshold: self.scale_up_cpu_threshold,
            down_threshold: self.scale_down_cpu_threshold,
            up_consecutive: self.scale_up_consecutive_checks,
            down_consecutive: self.scale_down_consecutive_checks,
            up_cooldown: self.scale_up_cooldown,
            down_cooldown: self.scale_down_cooldown,
            min_nodes: self.min_nodes,
            max_nodes: self.max_nodes,
            min_confidence: self.min_prediction_confidence,
            mode: self.scaling_mode,
        }
    }

    /// The forecaster's parameters: the seed's window and horizon at this check
    /// interval.
    pub fn forecast(&self) -> ForecastConfig {
        ForecastConfig::seed(self.scaling_check_interval_seconds, self.forecast_model)
    }

    /// The healer's limits.
    pub fn healing(&self) -> HealingPolicy {
        HealingPolicy {
            max_per_hour: self.max_self_healing_per_hour,
            cooldown: self.self_healing_cooldown_minutes,
            mass_failure_fraction: self.mass_failure_fraction,
            mass_failure_window: self.mass_failure_window,
            mass_failure_min_nodes: self.mass_failure_min_nodes,
        }
    }
}

/// The annotated example file: every key at its default, with its documentation,
/// in the table's order and sections. `examples/orchestrator.toml` is this text
/// (a test holds it so); `secbeat-orchestrator example-config` prints it.
pub fn example_toml() -> String {
    let defaults = toml::Table::try_from(Config::default()).expect("the defaults serialize");
    let mut out = String::from(
        "# secbeat-orchestrator configuration: every key, at its default.\n\
         # Precedence: these defaults < this file (--config) < SECBEAT_* env < flags.\n\
         # Every key is also a flag (--heartbeat-timeout) and a variable\n\
         # (SECBEAT_HEARTBEAT_TIMEOUT). Durations are seconds and may be fractions (0.2).\n\
         # Invalid values exit 64 naming the key.\n\
         # Generated from the key table in orchestrator/src/config.rs\n\
         # (secbeat-orchestrator example-config).\n",
    );
    let write_key = |out: &mut String, key: &Key, path: &[&str]| {
        for line in key.doc.lines() {
            let _ = writeln!(out, "#{line}");
        }
        match lookup(&defaults, path) {
            Some(value) => {
                let _ = writeln!(out, "{} = {value}", key.name);
            }
            None => {
                let _ = writeln!(out, "# {} = \"...\"", key.name);
            }
        }
    };
    for key in KEYS {
        if let Some(section) = key.section {
            let _ = write!(out, "\n# --- {section} ");
            let used = section.chars().count() + 7;
            let _ = writeln!(out, "{}", "-".repeat(84usize.saturating_sub(used)));
        }
        if key.kind != Kind::Table {
            write_key(&mut out, key, &[key.name]);
        }
    }
    // Tables last: in TOML every key after a [table] heading belongs to it.
    for key in KEYS.iter().filter(|key| key.kind == Kind::Table) {
        out.push('\n');
        for line in key.doc.lines() {
            let _ = writeln!(out, "#{line}");
        }
        let _ = writeln!(out, "[{}]", key.name);
        for inner in table_keys(key.name) {
            write_key(&mut out, inner, &[key.name, inner.name]);
        }
    }
    out
}

fn lookup<'a>(table: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let mut value = table.get(path[0]);
    for part in &path[1..] {
        value = value.and_then(|value| value.get(part));
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::load(Some((Path::new("test.toml"), text)), &ConfigFlags::default())
    }

    #[test]
    fn embedded_defaults_are_valid_and_match_the_seed() {
        let config = Config::load(None, &ConfigFlags::default()).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.heartbeat_timeout, Duration::from_secs(30));
        assert_eq!(config.dead_node_check_interval, Duration::from_secs(10));
        assert_eq!(config.required_consecutive_failures, 2);
    }

    #[test]
    fn the_seeds_config_file_loads_unchanged() {
        let seed = r#"
            scaling_check_interval_seconds = 60
            scale_up_cpu_threshold = 0.80     # 80%
            scale_down_cpu_threshold = 0.30   # 30%
            provisioning_webhook_url = "http://localhost:8000/provision"
            dead_node_check_interval = 10     # seconds
            heartbeat_timeout = 30            # seconds
        "#;
        let config = load(seed).unwrap();
        assert_eq!(config.scale_up_cpu_threshold, 0.8);
        assert_eq!(config.heartbeat_timeout, Duration::from_secs(30));
    }

    #[test]
    fn fractional_seconds_are_accepted() {
        let config =
            load("heartbeat_interval = 0.2\nheartbeat_timeout = 1\ndead_node_check_interval = 0.2").unwrap();
        assert_eq!(config.heartbeat_interval, Duration::from_millis(200));
        assert_eq!(config.dead_node_check_interval, Duration::from_millis(200));
    }

    #[test]
    fn flags_beat_the_file_and_reach_nested_tables() {
        let flags = ConfigFlags::from_pairs(&[
            ("heartbeat_timeout", toml::Value::Float(45.0)),
            ("tls_client_ca", toml::Value::String("/etc/hostname".into())),
        ]);
        let error = Config::load(Some((Path::new("f"), "heartbeat_timeout = 40")), &flags).unwrap_err();
        // The CA reached [tls]: without a certificate it is refused, naming tls.client_ca.
        assert_eq!(error.key, "tls.client_ca");
        let flags = ConfigFlags::from_pairs(&[("heartbeat_timeout", toml::Value::Float(45.0))]);
        let config = Config::load(Some((Path::new("f"), "heartbeat_timeout = 40")), &flags).unwrap();
        assert_eq!(config.heartbeat_timeout, Duration::from_secs(45));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("no_such_key = 1", "no_such_key"),
            ("heartbeat_timeout = \"soon\"", "heartbeat_timeout"),
            ("heartbeat_timeout = -1", "heartbeat_timeout"),
            ("heartbeat_timeout = 0", "heartbeat_timeout"),
            (
                "heartbeat_interval = 10\nheartbeat_timeout = 10",
                "heartbeat_timeout",
            ),
            ("dead_node_check_interval = 0", "dead_node_check_interval"),
            (
                "required_consecutive_failures = 0",
                "required_consecutive_failures",
            ),
            (
                "required_consecutive_failures = -3",
                "required_consecutive_failures",
            ),
            ("scale_up_cpu_threshold = 80", "scale_up_cpu_threshold"),
            ("scale_down_cpu_threshold = -0.1", "scale_down_cpu_threshold"),
            (
                "scale_up_cpu_threshold = 0.3\nscale_down_cpu_threshold = 0.3",
                "scale_up_cpu_threshold",
            ),
            ("grpc_listen = \"nowhere\"", "grpc_listen"),
            (
                "provisioning_webhook_url = \"ftp://x\"",
                "provisioning_webhook_url",
            ),
            ("webhook_secret = \"whsec_!!\"", "webhook_secret"),
            ("webhook_secret = \"\"", "webhook_secret"),
            ("scaling_mode = \"yolo\"", "scaling_mode"),
            ("grpc_listen = \"0.0.0.0:50051\"", "allow_insecure"),
            ("[tls]\ncert = \"/nonexistent.pem\"", "tls.key"),
            ("[tls]\nclient_ca = \"/etc/hostname\"", "tls.client_ca"),
            (
                "[tls]\nsession_ticket_key = \"/etc/hostname\"",
                "tls.session_ticket_key",
            ),
            (
                "[tls]\ncert = \"/nonexistent.pem\"\nkey = \"/nonexistent.key\"",
                "tls.cert",
            ),
            ("[tls]\nbogus = 1", "tls.bogus"),
            ("admin_token = \"short\"", "admin_token"),
            ("admin_token = \"0123456789abcdef\"", "agent_token"),
            (
                "admin_token = \"0123456789abcdef\"\nviewer_token = \"0123456789abcdef\"\nagent_token = \"0123456789abcdefX\"",
                "viewer_token",
            ),
            ("max_message_bytes = 10", "max_message_bytes"),
            ("event_history_size = 0", "event_history_size"),
            ("forecast_model = \"arima\"", "forecast_model"),
            ("scale_up_consecutive_checks = 0", "scale_up_consecutive_checks"),
            ("min_nodes = 5\nmax_nodes = 2", "min_nodes"),
            ("min_prediction_confidence = 2", "min_prediction_confidence"),
            (
                "webhook_retry_initial = 5\nwebhook_retry_max = 1",
                "webhook_retry_max",
            ),
            ("mass_failure_fraction = 0", "mass_failure_fraction"),
            ("mass_failure_fraction = 1.5", "mass_failure_fraction"),
            ("max_self_healing_per_hour = -1", "max_self_healing_per_hour"),
            ("max_disrupted_nodes = \"ten\"", "max_disrupted_nodes"),
            ("max_disrupted_nodes = \"150%\"", "max_disrupted_nodes"),
            ("max_disrupted_nodes = -2", "max_disrupted_nodes"),
            ("protect_label = \"protected\"", "protect_label"),
            ("failure_domain_label = \"pop=fra1\"", "failure_domain_label"),
            ("drain_deadline = 0", "drain_deadline"),
            ("drain_deadline = 7200", "drain_deadline"),
            ("maintenance_max = 0", "maintenance_max"),
            (
                "self_healing_cooldown_minutes = -1",
                "self_healing_cooldown_minutes",
            ),
        ];
        for (text, key) in cases {
            let error = load(text).unwrap_err();
            assert!(
                error.key == key || error.message.contains(key),
                "{text:?} gave {error} which does not name {key}"
            );
        }
    }

    #[test]
    fn secrets_are_read_but_never_shown() {
        let config =
            load("webhook_secret = \"hunter2-secret\"\nadmin_token = \"0123456789abcdef-admin\"\nagent_token = \"0123456789abcdef-agent\"").unwrap();
        assert_eq!(
            config.webhook_secret,
            Some(WebhookSecret::parse("hunter2-secret").unwrap())
        );
        assert_eq!(
            config.admin_token.as_ref().map(Token::expose),
            Some("0123456789abcdef-admin")
        );
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("0123456789abcdef"),
            "{shown}"
        );
        let table = toml::Table::try_from(&config).unwrap();
        assert!(!table.contains_key("webhook_secret") && !table.contains_key("admin_token"));
        let flags = ConfigFlags::from_pairs(&[("webhook_secret", toml::Value::String("from-env".into()))]);
        assert!(!format!("{flags:?}").contains("from-env"));
        let config = Config::load(None, &flags).unwrap();
        assert_eq!(
            config.webhook_secret,
            Some(WebhookSecret::parse("from-env").unwrap())
        );
    }

    #[test]
    fn the_seeds_self_healing_constants_are_the_defaults() {
        let healing = Config::default().healing();
        assert_eq!(healing.max_per_hour, 5);
        assert_eq!(healing.cooldown, Duration::from_secs(15 * 60));
        assert_eq!(Config::default().required_consecutive_failures, 2);
        let config = load("self_healing_cooldown_minutes = 0.5").unwrap();
        assert_eq!(config.healing().cooldown, Duration::from_secs(30));
    }

    #[test]
    fn toml_syntax_errors_name_the_file_and_line() {
        let error = load("heartbeat_timeout = 30\nthis is not toml").unwrap_err();
        assert_eq!(error.key, "--config");
        assert!(error.message.contains("test.toml at line 2"), "{error}");
    }
}

#[cfg(test)]
mod generated {
    //! What the key table generates: the example file, flags, variables, `--help`.

    use clap::Args;

    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/orchestrator.toml");

    #[test]
    fn the_example_file_is_the_generated_one_and_loads_to_the_defaults() {
        assert!(
            EXAMPLE == example_toml(),
            "examples/orchestrator.toml is out of date: run `cargo run -p secbeat-orchestrator -- example-config > examples/orchestrator.toml`"
        );
        let config = Config::load(
            Some((Path::new("examples/orchestrator.toml"), EXAMPLE)),
            &ConfigFlags::default(),
        )
        .expect("the example loads");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn high_availability_mistakes_are_errors_naming_the_key() {
        use clap::FromArgMatches as _;
        let load = |text: &str| Config::load(Some((Path::new("test.toml"), text)), &ConfigFlags::default());
        for (text, key) in [
            ("etcd_prefix = \"secbeat\"", "etcd_prefix"),
            ("etcd_prefix = \"/a b/\"", "etcd_prefix"),
            ("leader_lease_ttl = 2.5", "leader_lease_ttl"),
            ("leader_lease_ttl = 1", "leader_lease_ttl"),
            ("etcd_request_timeout = 5", "etcd_request_timeout"),
            ("etcd_endpoints = [\"etcd-1:2379\"]", "etcd_endpoints"),
            ("etcd_endpoints = [\"https://etcd-1:2379\"]", "etcd_tls.ca"),
            ("etcd_endpoints = [\"http://etcd-1:2379/v3\"]", "etcd_endpoints"),
            ("advertise_url = \"orch-1:50051\"", "advertise_url"),
        ] {
            let error = load(text).unwrap_err();
            assert_eq!(error.key, key, "{text}: {error:?}");
        }
        let config = load("etcd_endpoints = [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]").unwrap();
        assert!(config.high_availability());
        let flags = ConfigFlags::augment_args(clap::Command::new("orchestrator"))
            .try_get_matches_from(["orchestrator", "--etcd-endpoints", "http://a:2379,http://b:2379"])
            .unwrap();
        let flags = ConfigFlags::from_arg_matches(&flags).unwrap();
        let config = Config::load(None, &flags).unwrap();
        assert_eq!(config.etcd_endpoints, ["http://a:2379", "http://b:2379"]);
        assert_eq!(
            config
                .advertise_url("0.0.0.0:50051".parse().unwrap())
                .split(':')
                .next(),
            Some("http")
        );
        assert_eq!(
            Config::default().advertise_url("127.0.0.1:5000".parse().unwrap()),
            "http://127.0.0.1:5000"
        );
    }

    #[test]
    fn every_key_is_in_the_table_once_and_has_a_flag_and_a_variable() {
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let names: Vec<&str> = KEYS.iter().map(|key| key.name).collect();
        for key in defaults.keys() {
            assert_eq!(names.iter().filter(|name| **name == key).count(), 1, "{key}");
        }
        let command = ConfigFlags::augment_args(clap::Command::new("orchestrator"));
        let mut ids: Vec<String> = names
            .iter()
            .filter(|name| **name != "tls" && **name != "etcd_tls")
            .map(|name| name.to_string())
            .collect();
        ids.extend(
            [
                "tls_cert",
                "tls_key",
                "tls_client_ca",
                "tls_session_ticket_key",
                "etcd_tls_ca",
                "etcd_tls_cert",
                "etcd_tls_key",
            ]
            .map(str::to_owned),
        );
        for id in &ids {
            let arg = command
                .get_arguments()
                .find(|arg| arg.get_id() == id.as_str())
                .unwrap_or_else(|| panic!("{id} has no flag"));
            assert_eq!(arg.get_long(), Some(id.replace('_', "-").as_str()));
            let env = arg.get_env().map(|env| env.to_string_lossy().into_owned());
            assert_eq!(env, Some(format!("SECBEAT_{}", id.to_uppercase())));
        }
        assert_eq!(command.get_arguments().count(), ids.len());
    }

    #[test]
    fn help_states_the_real_defaults_and_hides_secrets() {
        let command = ConfigFlags::augment_args(clap::Command::new("orchestrator"));
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let documented = help
                .split("[default: ")
                .nth(1)
                .and_then(|rest| rest.split(']').next())
                .unwrap_or_else(|| panic!("--help of {id} states no [default: ...]"));
            let path: Vec<&str> = match (id.strip_prefix("etcd_tls_"), id.strip_prefix("tls_")) {
                (Some(inner), _) => vec!["etcd_tls", inner],
                (None, Some(inner)) => vec!["tls", inner],
                (None, None) => vec![id],
            };
            match lookup(&defaults, &path) {
                None => assert_eq!(documented, "none", "--help of {id}"),
                Some(actual) => {
                    let same = match actual {
                        toml::Value::Float(value) => documented.parse::<f64>().ok() == Some(*value),
                        toml::Value::Integer(value) => documented.parse::<i64>().ok() == Some(*value),
                        toml::Value::String(value) => documented == value,
                        toml::Value::Boolean(value) => documented.parse::<bool>().ok() == Some(*value),
                        toml::Value::Array(items) if items.is_empty() => documented == "none",
                        _ => false,
                    };
                    assert!(same, "--help of {id} says {documented}, the default is {actual}");
                }
            }
        }
        for secret in ["admin_token", "viewer_token", "agent_token", "webhook_secret"] {
            let arg = command
                .get_arguments()
                .find(|arg| arg.get_id() == secret)
                .unwrap();
            assert!(arg.is_hide_env_values_set(), "{secret}");
        }
    }
}
