//! An OTLP/gRPC trace receiver (the protocol's own generated server, on
//! 127.0.0.1), as a collector would run it: for the gateway's tests,
//! benches and load tests alike. It counts the spans it receives and, when
//! asked to, hands each one over with what its export carried.
//!
//! It runs on the Tokio runtime it is started on, and stops with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::{Notify, mpsc};
use tonic::transport::{Identity, ServerTlsConfig};

/// A span as received, with its resource's `service.name` and two
/// headers of the export that carried it.
#[derive(Debug)]
pub struct ReceivedSpan {
    pub service: String,
    pub span: Span,
    /// The export's `x-collector-key` header (a collector's credential).
    pub collector_key: Option<String>,
    /// The export's `grpc-encoding` (`gzip` when compressed).
    pub encoding: Option<String>,
}

/// How to run a receiver.
#[derive(Debug, Default)]
pub struct ReceiverOptions {
    /// Serve TLS with this certificate and key (PEM), as `localhost`.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// Hand every span over ([`OtlpReceiver::next_span`]); else only count.
    pub keep_spans: bool,
}

/// A running receiver: where to export, and what arrived.
#[derive(Debug)]
pub struct OtlpReceiver {
    endpoint: String,
    count: Arc<Arrivals>,
    spans: Option<mpsc::UnboundedReceiver<ReceivedSpan>>,
}

/// Spans received so far, and a signal rung on every export.
#[derive(Debug, Default)]
struct Arrivals {
    spans: AtomicU64,
    rung: Notify,
}

struct Service {
    count: Arc<Arrivals>,
    keep: Option<mpsc::UnboundedSender<ReceivedSpan>>,
}

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (collector_key, encoding) = (header("x-collector-key"), header("grpc-encoding"));
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                let spans = scope.spans.len() as u64;
                if let Some(keep) = &self.keep {
                    for span in scope.spans {
                        let _ = keep.send(ReceivedSpan {
                            service: service.clone(),
                            span,
                            collector_key: collector_key.clone(),
                            encoding: encoding.clone(),
                        });
                    }
                }
                self.count.spans.fetch_add(spans, Ordering::Relaxed);
            }
        }
        self.count.rung.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl OtlpReceiver {
    /// Starts a receiver on a free port of 127.0.0.1, on the current
    /// runtime.
    pub async fn start(options: ReceiverOptions) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let mut server = tonic::transport::Server::builder();
        let endpoint = match options.tls {
            Some((cert, key)) => {
                let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
                server = server.tls_config(tls).map_err(std::io::Error::other)?;
                format!("https://localhost:{port}")
            }
            None => format!("http://127.0.0.1:{port}"),
        };
        let count = Arc::new(Arrivals::default());
        let (keep, spans) = match options.keep_spans {
            true => {
                let (keep, spans) = mpsc::unbounded_channel();
                (Some(keep), Some(spans))
            }
            false => (None, None),
        };
        let service = TraceServiceServer::new(Service {
            count: Arc::clone(&count),
            keep,
        })
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        #[expect(
            clippy::disallowed_methods,
            reason = "the receiver lives as long as the runtime it is started on"
        )]
        tokio::spawn(server.add_service(service).serve_with_incoming(incoming));
        Ok(Self {
            endpoint,
            count,
            spans,
        })
    }

    /// Where to export: `http://127.0.0.1:{port}`, or
    /// `https://localhost:{port}` with TLS.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Spans received so far.
    pub fn spans(&self) -> u64 {
        self.count.spans.load(Ordering::Relaxed)
    }

    /// Waits (at most `within`) until `count` spans have arrived; whether
    /// they did.
    pub async fn until(&self, count: u64, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Registered before the count is read: no export is missed.
            let rung = self.count.rung.notified();
            tokio::pin!(rung);
            rung.as_mut().enable();
            if self.spans() >= count {
                return true;
            }
            if tokio::time::timeout_at(deadline, rung).await.is_err() {
                return self.spans() >= count;
            }
        }
    }

    /// The next span received, waiting at most `within`; `None` if none
    /// came or spans are not kept.
    pub async fn next_span(&mut self, within: Duration) -> Option<ReceivedSpan> {
        let spans = self.spans.as_mut()?;
        tokio::time::timeout(within, spans.recv()).await.ok()?
    }
}

/// `span`'s attribute `key`, as text.
pub fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
}

/// An attribute's value as text (strings, integers, floats).
pub fn text(value: &Any) -> Option<String> {
    match value {
        Any::StringValue(s) => Some(s.clone()),
        Any::IntValue(n) => Some(n.to_string()),
        Any::DoubleValue(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};

    use super::*;

    /// One export of `n` spans.
    fn export(n: usize) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span::default(); n],
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        }
    }

    #[tokio::test]
    async fn until_wakes_on_the_export_that_brings_the_count() {
        let receiver = OtlpReceiver::start(ReceiverOptions::default())
            .await
            .unwrap();
        let mut client = TraceServiceClient::connect(receiver.endpoint().to_owned())
            .await
            .unwrap();
        let waiting = receiver.until(3, Duration::from_secs(10));
        let sending = async {
            client.export(export(1)).await.unwrap();
            client.export(export(2)).await.unwrap();
        };
        let (arrived, ()) = tokio::join!(waiting, sending);
        assert!(arrived);
        assert_eq!(receiver.spans(), 3);
        assert!(
            !receiver.until(4, Duration::from_millis(100)).await,
            "none more came"
        );
    }
}
