//! Logs and traces, set up the same way by every SecBeat binary.
//!
//! - Logs go to stderr, human-readable by default or one JSON object per line with
//!   `--log-format json`; `--log-file FILE` also appends them to a file (the seed's
//!   `tail -f logs/orchestrator.log | grep ...` recipes work on it).
//! - Traces are exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and are off otherwise or with
//!   `OTEL_SDK_DISABLED=true` / `OTEL_TRACES_EXPORTER=none`. The standard `OTEL_*`
//!   variables apply; `OTEL_SERVICE_NAME` defaults to the binary's name.
//! - Trace context crosses processes as W3C `traceparent` strings:
//!   [`current_traceparent`] to send one, [`set_parent`] to continue one.

use std::{collections::HashMap, fs::OpenOptions, io::IsTerminal, path::PathBuf, sync::Mutex};

use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The logging flags both binaries take.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format: text (human-readable) or json (one object per line, for shipping)
    #[arg(long, env = "SECBEAT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Also append logs to this file (its directory is created), e.g. logs/orchestrator.log
    #[arg(long, env = "SECBEAT_LOG_FILE", value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether traces are being exported.
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every finished span, then stops the exporter. Call before exit.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "flushing traces at shutdown failed");
        }
    }
}

/// Whether the standard variables ask for OTLP trace export.
pub fn tracing_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs logging (and, when requested, trace export) for `service`. Must run
/// inside a multi-threaded tokio runtime when traces are requested.
pub fn init(service: &'static str, args: &LogArgs) -> Result<Telemetry, String> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = args.log_format == LogFormat::Json;
    let mut layers: Vec<BoxedLayer> = vec![
        fmt_layer(json, std::io::stderr().is_terminal(), std::io::stderr)
            .with_filter(filter())
            .boxed(),
    ];
    if let Some(path) = &args.log_file {
        {
            if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| format!("--log-file {}: {e}", dir.display()))?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("--log-file {}: {e}", path.display()))?;
            layers.push(
                fmt_layer(json, false, Mutex::new(file))
                    .with_filter(filter())
                    .boxed(),
            );
        }
    }
    let provider = if tracing_requested() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| format!("OTLP trace exporter: {e}"))?;
        let mut resource = Resource::builder();
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            resource = resource.with_service_name(service);
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(service))
                .with_filter(filter())
                .boxed(),
        );
        Some(provider)
    } else {
        None
    };
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|e| format!("logging: {e}"))?;
    Ok(Telemetry { provider })
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

fn fmt_layer<W>(json: bool, ansi: bool, writer: W) -> BoxedLayer
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    if json {
        layer.json().flatten_event(true).with_current_span(true).boxed()
    } else {
        layer.boxed()
    }
}

/// The W3C `traceparent` of the current span, if traces are on and it has one.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The W3C `traceparent` of `span`.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` continue the trace of a received `traceparent` (ignored if it
/// does not parse).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// A fresh, sampled W3C `traceparent`, for work that must carry one while tracing
/// is off (a webhook's trace id is stable across its retries).
pub fn generated_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = format!("{:016x}", rand::random::<u64>() | 1);
    format!("00-{trace}-{span}-01")
}

/// The trace id part of a `traceparent`, if it has one.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1).filter(|id| id.len() == 32)
}

/// Content type of the classic Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics text.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Picks the metrics format for a scrape: OpenMetrics when the `Accept` header asks
/// for it (Prometheus does), the classic text format otherwise (promtool, curl).
/// Returns the content type and the body.
pub fn negotiate_metrics(accept: Option<&str>, openmetrics: String) -> (&'static str, String) {
    if accept.is_some_and(|accept| accept.contains("application/openmetrics-text")) {
        (OPENMETRICS_TEXT, openmetrics)
    } else {
        (PROMETHEUS_TEXT, openmetrics_to_text(&openmetrics))
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4: a counter family `x` is
/// named `x_total` in its HELP and TYPE lines (as its samples already are), and the
/// OpenMetrics-only `# EOF` and `# UNIT` lines go.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        text.push_str(rewritten.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_total_in_the_classic_format() {
        let openmetrics = "# HELP x_sent Things sent.\n# TYPE x_sent counter\nx_sent_total 3\n# HELP y A gauge.\n# TYPE y gauge\ny 1\n# EOF\n";
        let (content_type, text) = negotiate_metrics(None, openmetrics.to_owned());
        assert_eq!(content_type, PROMETHEUS_TEXT);
        assert_eq!(
            text,
            "# HELP x_sent_total Things sent.\n# TYPE x_sent_total counter\nx_sent_total 3\n# HELP y A gauge.\n# TYPE y gauge\ny 1\n"
        );
        let (content_type, body) = negotiate_metrics(
            Some("application/openmetrics-text; version=1.0.0"),
            openmetrics.to_owned(),
        );
        assert_eq!((content_type, body.as_str()), (OPENMETRICS_TEXT, openmetrics));
    }
}
