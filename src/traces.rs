//! Traces: with `[tracing] otlp_endpoint`, every request through the
//! gateway is one OpenTelemetry span, exported over OTLP/gRPC.
//!
//! - The span continues the caller's trace: a `traceparent` header (W3C
//!   Trace Context) is its parent. The request sent upstream carries the
//!   gateway span's own `traceparent` (the caller's is replaced), so the
//!   upstream's spans are its children.
//! - It is a server span named `{method} {path}` with the semantic
//!   conventions' attributes for HTTP (`http.request.method`, `url.path`,
//!   `http.response.status_code`) and for GenAI where they apply
//!   (`gen_ai.operation.name`, `gen_ai.request.model`,
//!   `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`), and the
//!   gateway's own (`balancer.node`, `balancer.queue_wait_ms`,
//!   `balancer.attempts`, `balancer.cost_usd`, `balancer.client`). A retry
//!   on another node is an event (`balancer.retry`, with the node that
//!   failed and why).
//! - Export is off the request path: a finished span goes into the SDK's
//!   batch processor (a bounded queue; its own thread sends a batch every
//!   `tracing.export_interval`, and what is left at shutdown). A full
//!   queue drops spans, never waits.
//! - An `https://` endpoint is reached over TLS (rustls) trusting the
//!   system's roots and `tracing.ca_file`; `tracing.headers_env` adds
//!   headers to every export (a vendor's key), their values read from the
//!   environment, held as secrets and marked sensitive.
//!
//! Tracing off, nothing here runs: no span, no header touched.

use std::borrow::Cow;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_otlp::tonic_types::metadata::MetadataMap;
use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, Span,
};

use secrecy::{ExposeSecret, SecretString};

use crate::config::{TraceCompression, TracingSettings};

/// The exporter and the tracer requests take their spans from.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    /// Whether [`shutdown`](Self::shutdown) ran.
    stopped: std::sync::atomic::AtomicBool,
}

/// The headers every export carries, marked sensitive (never printed by
/// the gRPC stack's own logs).
fn export_metadata(headers: &[(String, SecretString)]) -> Result<MetadataMap, String> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("tracing.headers_env.{name}: not a header name"))?;
        let mut value = HeaderValue::from_str(value.expose_secret())
            .map_err(|_| format!("tracing.headers_env.{name}: not a header value"))?;
        value.set_sensitive(true);
        map.insert(name, value);
    }
    Ok(MetadataMap::from_headers(map))
}

/// TLS for an `https://` endpoint: the system's roots, and `ca_file`'s.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<ClientTlsConfig, String> {
    let tls = ClientTlsConfig::new().with_enabled_roots();
    let Some(path) = ca_file else {
        return Ok(tls);
    };
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "tracing.ca_file: cannot read {}: {}",
            path.display(),
            e.kind()
        )
    })?;
    Ok(tls.ca_certificate(Certificate::from_pem(pem)))
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracing")
    }
}

impl Tracing {
    /// Starts the exporter when `settings` name an endpoint; `None` when
    /// they do not. Must run inside the Tokio runtime (the gRPC client's
    /// connection lives there).
    pub fn start(settings: &TracingSettings) -> Result<Option<Self>, String> {
        let Some(endpoint) = &settings.otlp_endpoint else {
            return Ok(None);
        };
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone());
        if settings.compression == TraceCompression::Gzip {
            exporter = exporter.with_compression(opentelemetry_otlp::Compression::Gzip);
        }
        if !settings.headers.is_empty() {
            exporter = exporter.with_metadata(export_metadata(&settings.headers)?);
        }
        if endpoint
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
        {
            exporter = exporter.with_tls_config(tls_config(settings.ca_file.as_deref())?);
        }
        let exporter = exporter
            .build()
            .map_err(|e| format!("tracing.otlp_endpoint: cannot make the OTLP exporter: {e}"))?;
        let batches = BatchConfigBuilder::default()
            .with_scheduled_delay(settings.export_interval)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batches)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                Resource::builder()
                    .with_service_name(settings.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("balancer");
        Ok(Some(Self {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            stopped: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The span of a request that just arrived, as a child of the
    /// caller's `traceparent` when it sent one.
    pub fn begin(&self, method: &Method, path: &str, headers: &HeaderMap) -> RequestSpan {
        let parent = self.propagator.extract(&Headers(headers));
        // The usual names and paths are static: no copy per request.
        // Any other path is named by its route, not itself, and kept to
        // MAX_ATTRIBUTE_BYTES: a client's path must not grow a span (nor an
        // exporter's queue when the collector is slow) without bound.
        let (name, path): (Cow<'static, str>, Value) = match (method.as_str(), known_path(path)) {
            ("POST", Some((path, name))) => (Cow::Borrowed(name), Value::from(path)),
            _ => (
                Cow::Owned(format!("{method} {}", route_of(path))),
                Value::from(truncated(path).to_owned()),
            ),
        };
        let method = match *method {
            Method::POST => Value::from("POST"),
            Method::GET => Value::from("GET"),
            _ => Value::from(method.as_str().to_owned()),
        };
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method),
                KeyValue::new("url.path", path),
            ])
            .start_with_context(&self.tracer, &parent);
        RequestSpan { span }
    }
}

/// The longest attribute value a span keeps from a client (a path).
pub(crate) const MAX_ATTRIBUTE_BYTES: usize = 1024;

/// `text` cut to [`MAX_ATTRIBUTE_BYTES`] at a character boundary.
fn truncated(text: &str) -> &str {
    if text.len() <= MAX_ATTRIBUTE_BYTES {
        return text;
    }
    let mut end = MAX_ATTRIBUTE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The route a path falls under, for a span's name.
fn route_of(path: &str) -> &'static str {
    if path.starts_with("/openai/") {
        "/openai/*"
    } else if path.starts_with("/v1/") {
        "/v1/*"
    } else {
        "/*"
    }
}

impl Tracing {
    /// Sends every finished span now and waits until it is sent (blocks:
    /// for benchmarks and tests).
    pub fn flush(&self) {
        if let Err(err) = self.provider.force_flush() {
            tracing::warn!(error = %err, "the trace exporter could not flush");
        }
    }

    /// Sends what is left and stops the exporter (blocks until done:
    /// call it off the runtime's workers).
    pub fn shutdown(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Err(err) = self.provider.shutdown() {
            tracing::warn!(error = %err, "the trace exporter did not stop cleanly");
        }
    }
}

impl Drop for Tracing {
    /// A `Tracing` dropped without [`shutdown`](Self::shutdown) (the state
    /// dropped on a path that did not drain) would stop its exporter in
    /// the SDK's own drop, blocking whatever thread drops it, a runtime
    /// worker included, while the export waits on that very runtime. The
    /// stop goes to a thread of its own instead; after a shutdown it does
    /// nothing.
    fn drop(&mut self) {
        if *self.stopped.get_mut() {
            return;
        }
        let provider = self.provider.clone();
        let spawned = std::thread::Builder::new()
            .name("trace-exporter-stop".to_owned())
            .spawn(move || {
                let _ = provider.shutdown();
            });
        if let Err(err) = spawned {
            tracing::warn!(error = %err, "cannot stop the trace exporter apart");
        }
    }
}

/// The paths most requests take, and their spans' names.
const KNOWN_PATHS: [(&str, &str); 4] = [
    ("/v1/chat/completions", "POST /v1/chat/completions"),
    ("/v1/responses", "POST /v1/responses"),
    ("/v1/embeddings", "POST /v1/embeddings"),
    ("/v1/completions", "POST /v1/completions"),
];

fn known_path(path: &str) -> Option<(&'static str, &'static str)> {
    KNOWN_PATHS
        .iter()
        .copied()
        .find(|(known, _)| *known == path)
}

/// A request's headers, as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// One request's span. Dropped, it ends as it stands.
#[derive(Debug)]
pub struct RequestSpan {
    span: Span,
}

/// The OpenTelemetry GenAI operation of an API path.
fn operation_of(path: &str) -> Option<&'static str> {
    let path = path.strip_prefix("/v1").unwrap_or(path);
    Some(match path {
        "/chat/completions" => "chat",
        "/completions" => "text_completion",
        "/embeddings" => "embeddings",
        "/responses" => "chat",
        _ => return None,
    })
}

impl RequestSpan {
    /// The `traceparent` to send upstream: this span as the parent.
    pub fn traceparent(&self) -> Option<HeaderValue> {
        let context = self.span.span_context();
        if !context.is_valid() {
            return None;
        }
        let value = format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8()
        );
        HeaderValue::from_str(&value).ok()
    }

    /// The model, its GenAI operation and the client asking.
    pub fn asked(&mut self, path: &str, model: Option<&str>, client: Option<&Arc<str>>) {
        if let Some(operation) = operation_of(path) {
            self.span
                .set_attribute(KeyValue::new("gen_ai.operation.name", operation));
        }
        if let Some(model) = model {
            self.span
                .set_attribute(KeyValue::new("gen_ai.request.model", model.to_owned()));
        }
        if let Some(client) = client {
            self.span
                .set_attribute(KeyValue::new("balancer.client", Arc::clone(client)));
        }
    }

    /// Admitted after waiting `queue_wait_ms`.
    pub fn admitted(&mut self, queue_wait_ms: u64) {
        self.span.set_attribute(KeyValue::new(
            "balancer.queue_wait_ms",
            i64::try_from(queue_wait_ms).unwrap_or(i64::MAX),
        ));
    }

    /// An attempt on `node` failed (`why`) and the request goes elsewhere.
    pub fn retry(&mut self, node: &Arc<str>, why: &'static str) {
        self.span.add_event(
            "balancer.retry",
            vec![
                KeyValue::new("balancer.node", Arc::clone(node)),
                KeyValue::new("balancer.reason", why),
            ],
        );
    }

    /// The request ended with an answer from `node`.
    pub fn answered(mut self, answer: Answered<'_>) {
        let n = |v: u64| Value::I64(i64::try_from(v).unwrap_or(i64::MAX));
        let span = &mut self.span;
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(answer.status),
        ));
        span.set_attribute(KeyValue::new("balancer.node", Arc::clone(answer.node)));
        span.set_attribute(KeyValue::new(
            "balancer.attempts",
            i64::from(answer.attempts),
        ));
        span.set_attribute(KeyValue::new("balancer.end", answer.end));
        span.set_attribute(KeyValue::new(
            "gen_ai.usage.input_tokens",
            n(answer.input_tokens),
        ));
        span.set_attribute(KeyValue::new(
            "gen_ai.usage.output_tokens",
            n(answer.output_tokens),
        ));
        if let Some(cost) = answer.cost_usd {
            span.set_attribute(KeyValue::new("balancer.cost_usd", cost));
        }
        if answer.status >= 500 || answer.end != "complete" {
            span.set_status(Status::error(Cow::Borrowed(answer.end)));
        }
        span.end();
    }

    /// The gateway answered itself (an error's `code`, if it was one).
    pub fn answered_by_gateway(mut self, status: u16, error: Option<&'static str>) {
        self.span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(code) = error {
            self.span.set_attribute(KeyValue::new("error.type", code));
            if status >= 500 {
                self.span.set_status(Status::error(Cow::Borrowed(code)));
            }
        }
        self.span.end();
    }
}

/// What a request that was answered ends with, for its span.
#[derive(Debug, Clone, Copy)]
pub struct Answered<'a> {
    pub status: u16,
    pub node: &'a Arc<str>,
    pub attempts: u32,
    /// How the relay ended (`complete`, `client_gone`, ...).
    pub end: &'static str,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// N9: a client's long path is kept to 1 KiB in a span, cut at a
    /// character boundary, and an unknown path names the span by its route.
    #[test]
    fn a_long_path_is_truncated_and_an_unknown_one_named_by_its_route() {
        let long = format!("/v1/{}é", "x".repeat(63 * 1024));
        let kept = truncated(&long);
        assert!(kept.len() <= MAX_ATTRIBUTE_BYTES && long.starts_with(kept));
        let accents = "é".repeat(1000);
        assert!(truncated(&accents).len() <= MAX_ATTRIBUTE_BYTES);
        assert_eq!(truncated("/v1/files"), "/v1/files");
        assert_eq!(route_of(&long), "/v1/*");
        assert_eq!(
            route_of("/openai/deployments/x/chat/completions"),
            "/openai/*"
        );
    }
}
