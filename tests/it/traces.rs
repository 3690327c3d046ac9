//! Traces: with `[tracing] otlp_endpoint`, every request is one span sent
//! over OTLP/gRPC. The receiver here is a real OTLP trace service (the
//! protocol's own generated server, on 127.0.0.1) that hands each span it
//! receives to the test: the spans' parent links, attributes and events
//! are checked as a collector would store them.

use std::time::Duration;

use mock_upstreams::otlp::{
    OtlpReceiver, ReceivedSpan as Received, ReceiverOptions, attribute, text,
};
use wiremock::ResponseTemplate;

use crate::support::{
    FAST, Gateway, PrivateCa, answering, chat, chat_upstream, client, node, post, private_ca,
    send_json, v1,
};

/// An OTLP trace receiver on a free port (the one in `mock-upstreams`):
/// its endpoint, and the spans it receives. It stops when the test's
/// runtime does.
async fn receiver() -> (String, OtlpReceiver) {
    serve_receiver(None).await
}

/// [`receiver`] behind TLS with `ca`'s certificate for `localhost`.
async fn tls_receiver(ca: &PrivateCa) -> (String, OtlpReceiver) {
    serve_receiver(Some((
        ca.cert_pem.clone().into(),
        ca.key_pem.clone().into(),
    )))
    .await
}

async fn serve_receiver(tls: Option<(Vec<u8>, Vec<u8>)>) -> (String, OtlpReceiver) {
    let options = ReceiverOptions {
        tls,
        keep_spans: true,
    };
    let receiver = OtlpReceiver::start(options).await.unwrap();
    (receiver.endpoint().to_owned(), receiver)
}

/// The next span the receiver gets (the exporter sends every 100 ms).
async fn next_span(spans: &mut OtlpReceiver) -> Received {
    spans
        .next_span(Duration::from_secs(15))
        .await
        .expect("a span within 15 s")
}

/// The `traceparent` of the first request `server` received.
async fn traceparent_sent(server: &wiremock::MockServer) -> String {
    let sent = server.received_requests().await.unwrap();
    let value = sent[0].headers.get("traceparent").expect("a traceparent");
    value.to_str().unwrap().to_owned()
}

/// One chat request through `gw`, answered 200 and read to its end.
async fn answered(gw: &Gateway) {
    let response = post(
        &client(),
        gw,
        "/v1/chat/completions",
        chat("gpt-4o-mini", "hi", 5),
    )
    .await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn traced(endpoint: &str) -> String {
    format!(
        "{FAST}[tracing]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"gateway-under-test\"\nexport_interval = \"100ms\"\n"
    )
}

/// [`traced`] with `tracing` (more of `[tracing]`), then one node `a`
/// at `upstream` serving gpt-4o-mini.
fn traced_to(endpoint: &str, tracing: &str, upstream: &wiremock::MockServer) -> String {
    format!(
        "{}{tracing}{}",
        traced(endpoint),
        node("a", &v1(upstream), "k", "models = [\"gpt-4o-mini\"]")
    )
}

const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

#[tokio::test]
async fn a_request_is_a_span_in_the_caller_s_trace_and_the_upstream_s_parent() {
    let (endpoint, mut spans) = receiver().await;
    let upstream = chat_upstream().await;
    let gw = Gateway::start(&traced_to(&endpoint, "", &upstream)).await;
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .body(chat("gpt-4o-mini", "hi", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();

    let Received { service, span, .. } = next_span(&mut spans).await;
    assert_eq!(service, "gateway-under-test");
    assert_eq!(span.name, "POST /v1/chat/completions");
    assert_eq!(span.kind, 2, "a server span");
    assert_eq!(hex(&span.trace_id), CALLER_TRACE, "the caller's trace");
    assert_eq!(
        hex(&span.parent_span_id),
        CALLER_SPAN,
        "the caller's span is its parent"
    );
    for (key, value) in [
        ("http.request.method", "POST"),
        ("url.path", "/v1/chat/completions"),
        ("http.response.status_code", "200"),
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.request.model", "gpt-4o-mini"),
        ("gen_ai.usage.input_tokens", "5"),
        ("gen_ai.usage.output_tokens", "2"),
        ("balancer.node", "a"),
        ("balancer.attempts", "1"),
        ("balancer.queue_wait_ms", "0"),
    ] {
        assert_eq!(attribute(&span, key).as_deref(), Some(value), "{key}");
    }
    // The upstream got the gateway's span as its parent, in the same trace.
    assert_eq!(
        traceparent_sent(&upstream).await,
        format!("00-{CALLER_TRACE}-{}-01", hex(&span.span_id))
    );
}

#[tokio::test]
async fn a_retry_is_an_event_and_a_refusal_a_span_with_its_error() {
    let (endpoint, mut spans) = receiver().await;
    let broken = answering(ResponseTemplate::new(500).set_body_string("boom")).await;
    let healthy = chat_upstream().await;
    // A fresh gateway tries node 0 first.
    let gw = Gateway::start(&format!(
        "{}{}{}",
        traced(&endpoint),
        node("first", &v1(&broken), "k", "models = [\"gpt-4o-mini\"]"),
        node("second", &v1(&healthy), "k", "models = [\"gpt-4o-mini\"]"),
    ))
    .await;
    let response = send_json(
        gw.url("/v1/chat/completions"),
        None,
        chat("gpt-4o-mini", "hi", 5),
    )
    .await;
    assert_eq!(response.headers()["x-balancer-node"], "second");
    response.bytes().await.unwrap();
    let span = next_span(&mut spans).await.span;
    assert!(
        span.parent_span_id.is_empty(),
        "no caller trace: a root span"
    );
    assert_eq!(attribute(&span, "balancer.node").as_deref(), Some("second"));
    assert_eq!(attribute(&span, "balancer.attempts").as_deref(), Some("2"));
    let retry = span
        .events
        .iter()
        .find(|e| e.name == "balancer.retry")
        .expect("a retry event");
    let on = |key: &str| {
        retry
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
    };
    assert_eq!(on("balancer.node").as_deref(), Some("first"));
    assert_eq!(on("balancer.reason").as_deref(), Some("server_error"));
    // Each attempt carried the same parent: the gateway's span.
    for server in [&broken, &healthy] {
        let traceparent = traceparent_sent(server).await;
        assert!(traceparent.contains(&hex(&span.span_id)), "{traceparent}");
    }

    // A model no node serves: the gateway's own 404, a span all the same.
    let response = send_json(
        gw.url("/v1/chat/completions"),
        None,
        chat("no-such-model", "hi", 5),
    )
    .await;
    assert_eq!(response.status(), 404);
    let span = next_span(&mut spans).await.span;
    assert_eq!(
        attribute(&span, "http.response.status_code").as_deref(),
        Some("404")
    );
    assert_eq!(
        attribute(&span, "error.type").as_deref(),
        Some("model_not_found")
    );
}

#[tokio::test]
async fn an_https_collector_behind_a_private_ca_gets_spans_with_the_configured_headers() {
    let ca = private_ca();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("collector-ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let (endpoint, mut spans) = tls_receiver(&ca).await;
    let upstream = chat_upstream().await;
    let config = traced_to(
        &endpoint,
        &format!(
            "ca_file = \"{}\"\n[tracing.headers_env]\nx-collector-key = \"COLLECTOR_KEY\"\n",
            ca_file.display()
        ),
        &upstream,
    );
    let gw = Gateway::start_file_text(&config, &[("COLLECTOR_KEY", "ck-test-value")]).await;
    answered(&gw).await;

    let received = next_span(&mut spans).await;
    assert_eq!(received.service, "gateway-under-test");
    assert_eq!(
        attribute(&received.span, "gen_ai.request.model").as_deref(),
        Some("gpt-4o-mini")
    );
    assert_eq!(received.collector_key.as_deref(), Some("ck-test-value"));
    let status = gw.status().await;
    assert!(!status.to_string().contains("ck-test-value"));
}

#[tokio::test]
async fn exports_are_gzip_compressed_when_asked_and_plain_by_default() {
    let (endpoint, mut spans) = receiver().await;
    let upstream = chat_upstream().await;
    for (setting, expected) in [("", None), ("compression = \"gzip\"\n", Some("gzip"))] {
        let gw = Gateway::start(&traced_to(&endpoint, setting, &upstream)).await;
        answered(&gw).await;
        let received = next_span(&mut spans).await;
        assert_eq!(received.encoding.as_deref(), expected, "{setting:?}");
    }
}
