//! Orchestrator configuration: embedded defaults < TOML file < `SECBEAT_*` env <
//! command-line flags, merged into one table, deserialized once and validated once.
//!
//! The seed's keys are accepted unchanged at top level. Every failure names the key
//! it is about, so `main` can print one clear line and exit with code 64.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, Serialize};

use secbeat::signing::WebhookSecret;

use crate::{
    domain::forecast::{ForecastConfig, Model},
    domain::healer::HealingPolicy,
    domain::registry::LifecycleConfig,
    domain::scaler::{ScalingMode, ScalingPolicy},
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

/// A duration written as seconds (integer or fraction), e.g. `30` or `0.2`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(into = "f64")]
pub struct Seconds(pub Duration);

impl From<Seconds> for f64 {
    fn from(value: Seconds) -> f64 {
        value.0.as_secs_f64()
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let seconds = f64::deserialize(deserializer)?;
        Duration::try_from_secs_f64(seconds)
            .map(Seconds)
            .map_err(|_| serde::de::Error::custom(format!("{seconds} is not a valid number of seconds")))
    }
}

impl Seconds {
    fn secs(seconds: f64) -> Self {
        Seconds(Duration::from_secs_f64(seconds))
    }
}

/// A duration written as minutes (integer or fraction), for the seed's
/// `self_healing_cooldown_minutes`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(into = "f64")]
pub struct Minutes(pub Duration);

impl From<Minutes> for f64 {
    fn from(value: Minutes) -> f64 {
        value.0.as_secs_f64() / 60.0
    }
}

impl<'de> Deserialize<'de> for Minutes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let minutes = f64::deserialize(deserializer)?;
        Duration::try_from_secs_f64(minutes * 60.0)
            .map(Minutes)
            .map_err(|_| serde::de::Error::custom(format!("{minutes} is not a valid number of minutes")))
    }
}

/// A secret given on the command line or in the environment. Its `Debug` never
/// shows the value.
#[derive(Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct SecretArg(String);

impl std::str::FromStr for SecretArg {
    type Err = std::convert::Infallible;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
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

/// The `[tls]` table: server certificate and key (PEM), and the CA that client
/// certificates must chain to (mTLS).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// CA of client certificates (PEM). Set: agents must present a certificate
    /// for their node id, and operators may use certificates too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

fn webhook_secret<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<WebhookSecret>, D::Error> {
    let text = String::deserialize(deserializer)?;
    WebhookSecret::parse(&text)
        .map(Some)
        .map_err(|error| serde::de::Error::custom(error.to_string()))
}

/// The orchestrator's configuration. Field names are the TOML keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC listener (agents and operators).
    pub grpc_listen: SocketAddr,
    /// HTTP listener (health, and later metrics and the JSON API).
    pub http_listen: SocketAddr,
    /// Directory for the orchestrator's durable state.
    pub state_dir: PathBuf,

    /// Heartbeat interval the orchestrator tells agents to use (Welcome).
    pub heartbeat_interval: Seconds,
    /// Silence after which a node becomes suspect.
    pub heartbeat_timeout: Seconds,
    /// How often the dead-node check runs.
    pub dead_node_check_interval: Seconds,
    /// Consecutive checks a node must stay suspect before it is declared failed.
    pub required_consecutive_failures: u32,
    /// How long a terminate may stay unacknowledged before it is cancelled.
    pub termination_deadline: Seconds,
    /// Graceful-shutdown budget sent to agents with Terminate.
    pub termination_grace_period: Seconds,
    /// How long a new stream may take to send its Hello.
    pub hello_timeout: Seconds,
    /// How long failed, terminated and departed nodes stay listed.
    pub node_retention: Seconds,
    /// How long a graceful shutdown may take before the process exits anyway.
    pub shutdown_timeout: Seconds,
    /// Latest events kept in memory for `WatchEvents { since_sequence }` resumes.
    pub event_history_size: u32,

    /// The seed's scaling check interval (used by predictive scaling).
    pub scaling_check_interval_seconds: Seconds,
    /// Fleet CPU fraction above which to scale up.
    pub scale_up_cpu_threshold: f64,
    /// Fleet CPU fraction below which to scale down.
    pub scale_down_cpu_threshold: f64,
    /// Where provisioning webhooks are POSTed.
    pub provisioning_webhook_url: String,
    /// `forecast_and_scale` acts on decisions; `forecast_only` predicts, scores and
    /// logs what it would do, and sends nothing.
    pub scaling_mode: ScalingMode,
    /// The forecasting model (`auto` picks by recent scored error).
    pub forecast_model: Model,
    /// Checks in a row above the scale-up threshold before scaling up.
    pub scale_up_consecutive_checks: u32,
    /// Checks in a row below the scale-down threshold before scaling down.
    pub scale_down_consecutive_checks: u32,
    /// Quiet time after a scale-up.
    pub scale_up_cooldown: Seconds,
    /// Quiet time after any scaling action before a scale-down.
    pub scale_down_cooldown: Seconds,
    /// Never scale down below this many nodes.
    pub min_nodes: u32,
    /// Never scale up beyond this many nodes, and accept no more known nodes than
    /// this (a new node beyond it is refused with RESOURCE_EXHAUSTED).
    pub max_nodes: u32,
    /// Predictions less confident than this are not acted on (current CPU is).
    pub min_prediction_confidence: f64,

    /// TLS for the gRPC listener (`[tls]` table: cert, key, client_ca).
    pub tls: TlsConfig,
    /// Plain text off loopback: only with this explicit opt-in.
    pub allow_insecure: bool,
    /// Bearer token that grants the operator role (read and change the fleet).
    /// Never logged or serialized.
    #[serde(skip_serializing, deserialize_with = "token")]
    pub admin_token: Option<Token>,
    /// Bearer token that grants the viewer role (read and watch only).
    #[serde(skip_serializing, deserialize_with = "token")]
    pub viewer_token: Option<Token>,
    /// Maximum agent message size, bytes (larger messages end the stream).
    pub max_message_bytes: u32,
    /// Messages per second one agent stream may send on average.
    pub max_messages_per_second: f64,

    /// Standard-Webhooks signing secret (`whsec_<base64>` or raw). Never logged or
    /// serialized; without one, webhooks go unsigned (with a warning at start-up).
    #[serde(skip_serializing, deserialize_with = "webhook_secret")]
    pub webhook_secret: Option<WebhookSecret>,
    /// Timeout of one webhook delivery attempt.
    pub webhook_timeout: Seconds,
    /// First retry delay after a failed attempt (doubles, jittered).
    pub webhook_retry_initial: Seconds,
    /// Longest retry delay.
    pub webhook_retry_max: Seconds,
    /// Undelivered webhooks older than this are given up (kept as dead letters).
    pub webhook_max_age: Seconds,

    /// Self-healing webhooks allowed per rolling hour (the seed's 5).
    pub max_self_healing_per_hour: u32,
    /// Minimum time between replacements of the same node identity (the seed's 15).
    pub self_healing_cooldown_minutes: Minutes,
    /// More than this share of the fleet failing within `mass_failure_window` is a
    /// mass failure: one alert, no healing; 1.0 turns the guard off.
    pub mass_failure_fraction: f64,
    /// The window over which failures count together for the mass-failure guard.
    pub mass_failure_window: Seconds,
    /// Fewer failures than this are never a mass failure.
    pub mass_failure_min_nodes: u32,
    /// After a restart, how long known nodes have to reconnect before they are
    /// judged.
    pub restart_reconnect_grace: Seconds,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 3030)),
            state_dir: PathBuf::from("secbeat-data"),
            heartbeat_interval: Seconds::secs(10.0),
            heartbeat_timeout: Seconds::secs(30.0),
            dead_node_check_interval: Seconds::secs(10.0),
            required_consecutive_failures: 2,
            termination_deadline: Seconds::secs(30.0),
            termination_grace_period: Seconds::secs(30.0),
            hello_timeout: Seconds::secs(5.0),
            node_retention: Seconds::secs(3600.0),
            shutdown_timeout: Seconds::secs(10.0),
            event_history_size: 10_000,
            scaling_check_interval_seconds: Seconds::secs(60.0),
            scale_up_cpu_threshold: 0.80,
            scale_down_cpu_threshold: 0.30,
            provisioning_webhook_url: "http://localhost:8000/provision".to_owned(),
            scaling_mode: ScalingMode::ForecastAndScale,
            forecast_model: Model::Auto,
            scale_up_consecutive_checks: 2,
            scale_down_consecutive_checks: 5,
            scale_up_cooldown: Seconds::secs(300.0),
            scale_down_cooldown: Seconds::secs(600.0),
            min_nodes: 1,
            max_nodes: 1000,
            min_prediction_confidence: 0.5,
            tls: TlsConfig::default(),
            allow_insecure: false,
            admin_token: None,
            viewer_token: None,
            max_message_bytes: 64 * 1024,
            max_messages_per_second: 50.0,
            webhook_secret: None,
            webhook_timeout: Seconds::secs(10.0),
            webhook_retry_initial: Seconds::secs(1.0),
            webhook_retry_max: Seconds::secs(60.0),
            webhook_max_age: Seconds::secs(86400.0),
            max_self_healing_per_hour: 5,
            self_healing_cooldown_minutes: Minutes(Duration::from_secs(15 * 60)),
            mass_failure_fraction: 0.5,
            mass_failure_window: Seconds::secs(60.0),
            mass_failure_min_nodes: 3,
            restart_reconnect_grace: Seconds::secs(60.0),
        }
    }
}

/// Per-key overrides from env and flags (clap fills these; see `main`). `None`
/// means "not given". Serialized into a TOML table, so field names are TOML keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, clap::Args)]
pub struct ConfigOverrides {
    /// gRPC listen address for agents and operators [default: 127.0.0.1:50051]
    #[arg(long, env = "SECBEAT_GRPC_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_listen: Option<String>,
    /// HTTP listen address for /healthz and /readyz [default: 127.0.0.1:3030]
    #[arg(long, env = "SECBEAT_HTTP_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<String>,
    /// Directory for durable state, created if missing [default: ./secbeat-data]
    #[arg(long, env = "SECBEAT_STATE_DIR", value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
    /// Heartbeat interval sent to agents in Welcome, seconds [default: 10]
    #[arg(long, env = "SECBEAT_HEARTBEAT_INTERVAL", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval: Option<f64>,
    /// Silence after which a node is SUSPECT, seconds; at least 2x the interval [default: 30]
    #[arg(long, env = "SECBEAT_HEARTBEAT_TIMEOUT", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout: Option<f64>,
    /// How often the dead-node check runs, seconds [default: 10]
    #[arg(long, env = "SECBEAT_DEAD_NODE_CHECK_INTERVAL", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_node_check_interval: Option<f64>,
    /// Consecutive checks a node stays SUSPECT before it is FAILED [default: 2]
    #[arg(long, env = "SECBEAT_REQUIRED_CONSECUTIVE_FAILURES", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub required_consecutive_failures: Option<i64>,
    /// How long a Terminate may stay unacknowledged before it is cancelled, seconds [default: 30]
    #[arg(long, env = "SECBEAT_TERMINATION_DEADLINE", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub termination_deadline: Option<f64>,
    /// Graceful-shutdown budget sent to agents with Terminate, seconds [default: 30]
    #[arg(long, env = "SECBEAT_TERMINATION_GRACE_PERIOD", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub termination_grace_period: Option<f64>,
    /// How long a new agent stream may take to send Hello, seconds [default: 5]
    #[arg(long, env = "SECBEAT_HELLO_TIMEOUT", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hello_timeout: Option<f64>,
    /// How long FAILED/TERMINATED/LEFT nodes stay listed, seconds [default: 3600]
    #[arg(long, env = "SECBEAT_NODE_RETENTION", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_retention: Option<f64>,
    /// Bound on graceful shutdown before exiting anyway, seconds [default: 10]
    #[arg(long, env = "SECBEAT_SHUTDOWN_TIMEOUT", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout: Option<f64>,
    /// Latest events kept for WatchEvents resumes (since_sequence); older ones get OUT_OF_RANGE [default: 10000]
    #[arg(long, env = "SECBEAT_EVENT_HISTORY_SIZE", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_history_size: Option<i64>,
    /// Interval of scaling checks (fleet CPU history, prediction), seconds [default: 60]
    #[arg(long, env = "SECBEAT_SCALING_CHECK_INTERVAL_SECONDS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling_check_interval_seconds: Option<f64>,
    /// Fleet CPU fraction (0..1) above which to scale up [default: 0.80]
    #[arg(long, env = "SECBEAT_SCALE_UP_CPU_THRESHOLD", value_name = "FRACTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_up_cpu_threshold: Option<f64>,
    /// Fleet CPU fraction (0..1) below which to scale down [default: 0.30]
    #[arg(long, env = "SECBEAT_SCALE_DOWN_CPU_THRESHOLD", value_name = "FRACTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_down_cpu_threshold: Option<f64>,
    /// URL that provisioning webhooks are POSTed to [default: http://localhost:8000/provision]
    #[arg(long, env = "SECBEAT_PROVISIONING_WEBHOOK_URL", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provisioning_webhook_url: Option<String>,
    /// forecast_and_scale acts on scaling decisions; forecast_only only predicts and logs [default: forecast_and_scale]
    #[arg(long, env = "SECBEAT_SCALING_MODE", value_name = "MODE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling_mode: Option<String>,
    /// Forecasting model: auto, naive, mean, level, trend, seasonal_hour, seasonal_day, linear [default: auto]
    #[arg(long, env = "SECBEAT_FORECAST_MODEL", value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast_model: Option<String>,
    /// Checks in a row above scale_up_cpu_threshold before scaling up [default: 2]
    #[arg(long, env = "SECBEAT_SCALE_UP_CONSECUTIVE_CHECKS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_up_consecutive_checks: Option<i64>,
    /// Checks in a row below scale_down_cpu_threshold before scaling down [default: 5]
    #[arg(long, env = "SECBEAT_SCALE_DOWN_CONSECUTIVE_CHECKS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_down_consecutive_checks: Option<i64>,
    /// Quiet time after a scale-up, seconds [default: 300]
    #[arg(long, env = "SECBEAT_SCALE_UP_COOLDOWN", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_up_cooldown: Option<f64>,
    /// Quiet time after any scaling action before a scale-down, seconds [default: 600]
    #[arg(long, env = "SECBEAT_SCALE_DOWN_COOLDOWN", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_down_cooldown: Option<f64>,
    /// Never scale down below this many nodes [default: 1]
    #[arg(long, env = "SECBEAT_MIN_NODES", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_nodes: Option<i64>,
    /// Fleet size cap: no scale-up beyond it, and new nodes beyond it are refused [default: 1000]
    #[arg(long, env = "SECBEAT_MAX_NODES", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_nodes: Option<i64>,
    /// Predictions less confident than this are not acted on; current CPU is [default: 0.5]
    #[arg(long, env = "SECBEAT_MIN_PREDICTION_CONFIDENCE", value_name = "P")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_prediction_confidence: Option<f64>,
    /// Server certificate (PEM) for TLS on the gRPC listener [default: none: plain text]
    #[arg(long, env = "SECBEAT_TLS_CERT", value_name = "FILE")]
    #[serde(skip)]
    pub tls_cert: Option<String>,
    /// Server private key (PEM) [default: none]
    #[arg(long, env = "SECBEAT_TLS_KEY", value_name = "FILE")]
    #[serde(skip)]
    pub tls_key: Option<String>,
    /// CA that agent and operator client certificates must chain to (turns mTLS on) [default: none]
    #[arg(long, env = "SECBEAT_TLS_CLIENT_CA", value_name = "FILE")]
    #[serde(skip)]
    pub tls_client_ca: Option<String>,
    /// Allow plain text on a non-loopback gRPC address (anyone who reaches it can act as a node) [default: false]
    #[arg(long, env = "SECBEAT_ALLOW_INSECURE", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_insecure: Option<bool>,
    /// Bearer token of the operator role; prefer the environment variable [default: none]
    #[arg(
        long,
        env = "SECBEAT_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<SecretArg>,
    /// Bearer token of the read-only viewer role [default: none]
    #[arg(
        long,
        env = "SECBEAT_VIEWER_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viewer_token: Option<SecretArg>,
    /// Largest agent message accepted, bytes [default: 65536]
    #[arg(long, env = "SECBEAT_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<i64>,
    /// Messages per second one agent stream may send on average (bursts of 4 s allowed) [default: 50]
    #[arg(long, env = "SECBEAT_MAX_MESSAGES_PER_SECOND", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_messages_per_second: Option<f64>,
    /// Webhook signing secret, `whsec_<base64>` or raw; prefer the environment
    /// variable or the config file, flags show in `ps` [default: none: unsigned]
    #[arg(
        long,
        env = "SECBEAT_WEBHOOK_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<SecretArg>,
    /// Timeout of one webhook delivery attempt, seconds [default: 10]
    #[arg(long, env = "SECBEAT_WEBHOOK_TIMEOUT", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_timeout: Option<f64>,
    /// First retry delay of a failed webhook (doubles, jittered), seconds [default: 1]
    #[arg(long, env = "SECBEAT_WEBHOOK_RETRY_INITIAL", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_retry_initial: Option<f64>,
    /// Longest webhook retry delay, seconds [default: 60]
    #[arg(long, env = "SECBEAT_WEBHOOK_RETRY_MAX", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_retry_max: Option<f64>,
    /// Give up on (dead-letter) webhooks undelivered for this long, seconds [default: 86400]
    #[arg(long, env = "SECBEAT_WEBHOOK_MAX_AGE", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_max_age: Option<f64>,
    /// Self-healing webhooks allowed per rolling hour [default: 5]
    #[arg(long, env = "SECBEAT_MAX_SELF_HEALING_PER_HOUR", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_self_healing_per_hour: Option<i64>,
    /// Minimum time between replacements of one node identity, minutes [default: 15]
    #[arg(long, env = "SECBEAT_SELF_HEALING_COOLDOWN_MINUTES", value_name = "MINS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_healing_cooldown_minutes: Option<f64>,
    /// Share of the fleet failing within the window that is a mass failure (alert, no healing); 1 turns it off [default: 0.5]
    #[arg(long, env = "SECBEAT_MASS_FAILURE_FRACTION", value_name = "FRACTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mass_failure_fraction: Option<f64>,
    /// Window over which failures count together for the mass-failure guard, seconds [default: 60]
    #[arg(long, env = "SECBEAT_MASS_FAILURE_WINDOW", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mass_failure_window: Option<f64>,
    /// Fewer failures than this in a window are never a mass failure [default: 3]
    #[arg(long, env = "SECBEAT_MASS_FAILURE_MIN_NODES", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mass_failure_min_nodes: Option<i64>,
    /// After a restart, time known nodes get to reconnect before they are judged, seconds [default: 60]
    #[arg(long, env = "SECBEAT_RESTART_RECONNECT_GRACE", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_reconnect_grace: Option<f64>,
}

impl Config {
    /// Loads the configuration: defaults, then the TOML text of `file` (if any),
    /// then `overrides`; then validates.
    pub fn load(file: Option<(&Path, &str)>, overrides: &ConfigOverrides) -> Result<Config, ConfigError> {
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
        let tls_overrides = [
            ("cert", &overrides.tls_cert),
            ("key", &overrides.tls_key),
            ("client_ca", &overrides.tls_client_ca),
        ];
        let overrides = toml::Table::try_from(overrides)
            .map_err(|error| ConfigError::new("flags", format!("cannot apply overrides: {error}")))?;
        table.extend(overrides);
        for (key, value) in tls_overrides {
            if let Some(value) = value {
                let tls = table
                    .entry("tls")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(tls) = tls {
                    tls.insert(key.to_owned(), toml::Value::String(value.clone()));
                }
            }
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
        ];
        for (key, Seconds(value)) in positive {
            if value.is_zero() {
                return Err(ConfigError::new(key, "must be greater than zero"));
            }
        }
        if self.heartbeat_timeout.0 < self.heartbeat_interval.0 * 2 {
            return Err(ConfigError::new(
                "heartbeat_timeout",
                format!(
                    "{}s must be at least twice heartbeat_interval ({}s), or one late heartbeat is a false failure",
                    self.heartbeat_timeout.0.as_secs_f64(),
                    self.heartbeat_interval.0.as_secs_f64()
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
        if self.webhook_retry_max.0 < self.webhook_retry_initial.0 {
            return Err(ConfigError::new(
                "webhook_retry_max",
                format!(
                    "{}s is below webhook_retry_initial ({}s)",
                    self.webhook_retry_max.0.as_secs_f64(),
                    self.webhook_retry_initial.0.as_secs_f64()
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
        self.validate_security()?;
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

    fn validate_security(&self) -> Result<(), ConfigError> {
        let tls = &self.tls;
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
        for (key, path) in [
            ("tls.cert", &tls.cert),
            ("tls.key", &tls.key),
            ("tls.client_ca", &tls.client_ca),
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
        if self.max_message_bytes < 1024 {
            return Err(ConfigError::new("max_message_bytes", "must be at least 1024"));
        }
        if !(self.max_messages_per_second.is_finite() && self.max_messages_per_second >= 1.0) {
            return Err(ConfigError::new("max_messages_per_second", "must be at least 1"));
        }
        Ok(())
    }

    /// The lifecycle parameters for the registry and detector.
    pub fn lifecycle(&self) -> LifecycleConfig {
        LifecycleConfig {
            heartbeat_timeout: self.heartbeat_timeout.0,
            dead_node_check_interval: self.dead_node_check_interval.0,
            required_consecutive_failures: self.required_consecutive_failures,
            termination_deadline: self.termination_deadline.0,
            termination_grace_period: self.termination_grace_period.0,
            node_retention: self.node_retention.0,
        }
    }

    /// The scaler's parameters.
    pub fn scaling(&self) -> ScalingPolicy {
        ScalingPolicy {
            up_threshold: self.scale_up_cpu_threshold,
            down_threshold: self.scale_down_cpu_threshold,
            up_consecutive: self.scale_up_consecutive_checks,
            down_consecutive: self.scale_down_consecutive_checks,
            up_cooldown: self.scale_up_cooldown.0,
            down_cooldown: self.scale_down_cooldown.0,
            min_nodes: self.min_nodes,
            max_nodes: self.max_nodes,
            min_confidence: self.min_prediction_confidence,
            mode: self.scaling_mode,
        }
    }

    /// The forecaster's parameters: the seed's window and horizon at this check
    /// interval.
    pub fn forecast(&self) -> ForecastConfig {
        ForecastConfig::seed(self.scaling_check_interval_seconds.0, self.forecast_model)
    }

    /// The healer's limits.
    pub fn healing(&self) -> HealingPolicy {
        HealingPolicy {
            max_per_hour: self.max_self_healing_per_hour,
            cooldown: self.self_healing_cooldown_minutes.0,
            mass_failure_fraction: self.mass_failure_fraction,
            mass_failure_window: self.mass_failure_window.0,
            mass_failure_min_nodes: self.mass_failure_min_nodes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::load(Some((Path::new("test.toml"), text)), &ConfigOverrides::default())
    }

    #[test]
    fn embedded_defaults_are_valid_and_match_the_seed() {
        let config = Config::load(None, &ConfigOverrides::default()).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.heartbeat_timeout.0, Duration::from_secs(30));
        assert_eq!(config.dead_node_check_interval.0, Duration::from_secs(10));
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
        assert_eq!(config.heartbeat_timeout.0, Duration::from_secs(30));
    }

    #[test]
    fn fractional_seconds_are_accepted() {
        let config =
            load("heartbeat_interval = 0.2\nheartbeat_timeout = 1\ndead_node_check_interval = 0.2").unwrap();
        assert_eq!(config.heartbeat_interval.0, Duration::from_millis(200));
        assert_eq!(config.dead_node_check_interval.0, Duration::from_millis(200));
    }

    #[test]
    fn overrides_beat_the_file() {
        let overrides = ConfigOverrides {
            heartbeat_timeout: Some(45.0),
            ..Default::default()
        };
        let config = Config::load(Some((Path::new("f"), "heartbeat_timeout = 40")), &overrides).unwrap();
        assert_eq!(config.heartbeat_timeout.0, Duration::from_secs(45));
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
                "[tls]\ncert = \"/nonexistent.pem\"\nkey = \"/nonexistent.key\"",
                "tls.cert",
            ),
            ("[tls]\nbogus = 1", "tls.bogus"),
            ("admin_token = \"short\"", "admin_token"),
            ("max_message_bytes = 10", "max_message_bytes"),
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
    fn the_webhook_secret_is_read_but_never_shown() {
        let config = load("webhook_secret = \"hunter2-secret\"").unwrap();
        assert_eq!(
            config.webhook_secret,
            Some(WebhookSecret::parse("hunter2-secret").unwrap())
        );
        assert!(!format!("{config:?}").contains("hunter2"));
        let table = toml::Table::try_from(&config).unwrap();
        assert!(!table.contains_key("webhook_secret"));
        let overrides = ConfigOverrides {
            webhook_secret: Some("from-env".parse().unwrap()),
            ..Default::default()
        };
        assert!(!format!("{overrides:?}").contains("from-env"));
        let config = Config::load(None, &overrides).unwrap();
        assert_eq!(
            config.webhook_secret,
            Some(WebhookSecret::parse("from-env").unwrap())
        );
    }

    #[test]
    fn tokens_are_read_but_never_shown() {
        let config = load("admin_token = \"0123456789abcdef-admin\"").unwrap();
        assert_eq!(
            config.admin_token.as_ref().map(Token::expose),
            Some("0123456789abcdef-admin")
        );
        assert!(!format!("{config:?}").contains("0123456789abcdef"));
        assert!(
            !toml::Table::try_from(&config)
                .unwrap()
                .contains_key("admin_token")
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
mod example_file {
    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/orchestrator.toml");

    #[test]
    fn the_example_config_lists_every_key_at_its_default() {
        let config = Config::load(
            Some((Path::new("examples/orchestrator.toml"), EXAMPLE)),
            &ConfigOverrides::default(),
        )
        .expect("the example loads");
        assert_eq!(config, Config::default(), "the example's values are the defaults");
        let example: toml::Table = toml::from_str(EXAMPLE).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for key in defaults.keys() {
            assert!(
                example.contains_key(key),
                "examples/orchestrator.toml lacks {key}"
            );
        }
    }

    #[test]
    fn every_key_has_a_flag_and_an_environment_variable() {
        use clap::Args;
        let command = ConfigOverrides::augment_args(clap::Command::new("orchestrator"));
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let mut keys: Vec<String> = defaults.keys().filter(|key| *key != "tls").cloned().collect();
        keys.extend(["tls_cert", "tls_key", "tls_client_ca"].map(str::to_owned));
        for key in &keys {
            let arg = command.get_arguments().find(|arg| arg.get_id() == key.as_str());
            let arg = arg.unwrap_or_else(|| panic!("{key} has no flag"));
            assert_eq!(arg.get_long(), Some(key.replace('_', "-").as_str()));
            let env = arg.get_env().map(|env| env.to_string_lossy().into_owned());
            assert_eq!(env, Some(format!("SECBEAT_{}", key.to_uppercase())));
        }
    }

    #[test]
    fn help_states_the_real_defaults() {
        use clap::Args;
        let command = ConfigOverrides::augment_args(clap::Command::new("orchestrator"));
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for arg in command.get_arguments() {
            let key = arg.get_id().as_str();
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let documented = help
                .split("[default: ")
                .nth(1)
                .and_then(|rest| rest.split(']').next())
                .unwrap_or_else(|| panic!("--help of {key} states no [default: ...]"));
            let Some(actual) = defaults.get(key).filter(|_| !key.starts_with("tls_")) else {
                // Secrets are never serialized; their default is "none".
                assert!(
                    documented.starts_with("none"),
                    "--help of {key} says {documented}"
                );
                continue;
            };
            let same = match actual {
                toml::Value::Float(value) => documented.parse::<f64>().ok() == Some(*value),
                toml::Value::Integer(value) => documented.parse::<i64>().ok() == Some(*value),
                toml::Value::String(value) => documented.trim_start_matches("./") == value,
                toml::Value::Boolean(value) => documented.parse::<bool>().ok() == Some(*value),
                _ => false,
            };
            assert!(same, "--help of {key} says {documented}, the default is {actual}");
        }
    }
}
