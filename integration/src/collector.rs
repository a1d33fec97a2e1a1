//! A fake OTLP/gRPC trace collector: the real `TraceService` protocol
//! (opentelemetry-proto's generated server), keeping every span it receives so a
//! test can check names, attributes and parent links across processes.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
};
use tokio_stream::wrappers::TcpListenerStream;

use crate::eventually;

/// One received span, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectedSpan {
    /// The exporting process's `service.name`.
    pub service: String,
    /// Span name.
    pub name: String,
    /// Trace id, hex.
    pub trace_id: String,
    /// Span id, hex.
    pub span_id: String,
    /// Parent span id, hex (empty for a root span).
    pub parent_span_id: String,
    /// String forms of the span's attributes.
    pub attributes: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<CollectedSpan>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().expect("collector lock");
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(CollectedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(value_string).unwrap_or_default(),
            )
        })
        .collect()
}

fn value_string(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// A running collector on a loopback port.
pub struct Collector {
    /// Where it listens.
    pub addr: SocketAddr,
    sink: Sink,
}

impl Collector {
    /// Starts a collector on a free port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sink = Sink::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        Ok(Self { addr, sink })
    }

    /// The environment that points a SecBeat process at this collector, exporting
    /// quickly (100 ms batches) so tests need not wait for the default 5 s.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                format!("http://{}", self.addr),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ]
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.sink.0.lock().expect("collector lock").clone()
    }

    /// Waits until a span named `name` from `service` satisfying `matches` arrives.
    pub async fn wait_for_span(
        &self,
        service: &str,
        name: &str,
        timeout: Duration,
        matches: impl Fn(&CollectedSpan) -> bool,
    ) -> CollectedSpan {
        let what = format!("span {name:?} from {service}");
        eventually(timeout, &what, || async {
            self.spans()
                .into_iter()
                .find(|span| span.service == service && span.name == name && matches(span))
        })
        .await
    }
}
