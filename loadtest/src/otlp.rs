//! A receiver of OTLP/gRPC traces in this process (the protocol's own
//! generated server): counts the spans a traced gateway sends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

struct Counting(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Counting {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The receiver: where to send spans, and how many arrived. Stops with
/// the load test's runtime.
pub(crate) struct Receiver {
    pub endpoint: String,
    spans: Arc<AtomicU64>,
}

impl Receiver {
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let spans = Arc::new(AtomicU64::new(0));
        #[expect(
            clippy::disallowed_methods,
            reason = "the receiver lives as long as the load test's runtime, which ends the process"
        )]
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Counting(Arc::clone(&spans))))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        Ok(Self { endpoint, spans })
    }

    pub(crate) fn spans(&self) -> u64 {
        self.spans.load(Ordering::Relaxed)
    }

    /// Waits (at most `within`) until `count` spans have arrived.
    pub(crate) async fn until(&self, count: u64, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.spans() < count {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}
