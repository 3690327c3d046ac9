//! Server-sent events relayed event by event, usage reconciliation, and
//! release of everything when clients go away mid-stream.

use std::time::Duration;

use futures_util::StreamExt;
use mock_upstreams::{MockConfig, MockUpstream};
use wiremock::ResponseTemplate;

use crate::support::{FAST, Gateway, chat_answer, client, node, node_status, post};

fn stream_request(max_tokens: u64, include_usage: bool) -> String {
    serde_json::json!({
        "model": "gpt-4o-mini", "stream": true, "max_tokens": max_tokens,
        "stream_options": {"include_usage": include_usage},
        "messages": [{"role": "user", "content": "Tell me a story"}],
    })
    .to_string()
}

async fn mock(interval: Duration, words: usize) -> MockUpstream {
    let config = MockConfig::new("sk-mock")
        .stream_timing(interval, interval)
        .completion_words(words);
    MockUpstream::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

#[tokio::test]
async fn events_reach_the_client_before_the_upstream_has_finished() {
    let upstream = mock(Duration::from_millis(250), 6).await;
    let gw = Gateway::start(&format!(
        "{FAST}{}",
        node("m", &upstream.base_url(), "sk-mock", "")
    ))
    .await;
    let response = post(
        &client(),
        &gw,
        "/v1/chat/completions",
        stream_request(100, true),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = response.bytes_stream();
    let mut seen = Vec::new();
    // Read until the first content event has arrived.
    while !String::from_utf8_lossy(&seen).contains("\"content\":\" The\"") {
        seen.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    assert_eq!(
        upstream.stats().streams_completed(),
        0,
        "the upstream had already finished"
    );
    while let Some(chunk) = body.next().await {
        seen.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(seen).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(text.matches("data: ").count(), 1 + 6 + 1 + 1 + 1);
    assert_eq!(upstream.stats().streams_completed(), 1);
}

/// One stream of 4 events through a gateway to the mock (which reports
/// its usage at the end if `include_usage`): the tokens the node's window
/// was settled at, and the mock.
async fn settled_stream(include_usage: bool) -> (u64, MockUpstream) {
    let upstream = mock(Duration::ZERO, 4).await;
    let gw = Gateway::start(&format!(
        "{FAST}{}",
        node("m", &upstream.base_url(), "sk-mock", "tpm = 100000")
    ))
    .await;
    let body = stream_request(500, include_usage);
    let response = post(&client(), &gw, "/v1/chat/completions", body).await;
    response.bytes().await.unwrap();
    let status = gw.settled_status().await;
    let used = &node_status(&status, "m")["limits"]["tpm"]["used"];
    (used.as_u64().unwrap(), upstream)
}

#[tokio::test]
async fn a_stream_is_settled_at_its_reported_usage() {
    let (used, upstream) = settled_stream(true).await;
    assert_eq!(
        used,
        upstream.stats().prompt_tokens() + upstream.stats().completion_tokens()
    );
}

#[tokio::test]
async fn a_stream_without_usage_is_settled_at_the_text_it_carried() {
    let (used, _upstream) = settled_stream(false).await;
    // " The quick brown fox" is 4 tokens; the prompt as the gateway counted it.
    let prompt = balancer::request::inspect(
        "/chat/completions",
        stream_request(500, false).as_bytes(),
        true,
        0,
    )
    .unwrap()
    .prompt_tokens;
    assert_eq!(used, prompt + 4);
}

#[tokio::test]
async fn a_json_answer_is_settled_at_its_usage() {
    let server =
        crate::support::answering(ResponseTemplate::new(200).set_body_json(chat_answer(11, 9)))
            .await;
    let gw = Gateway::start(&format!(
        "{FAST}{}",
        node("w", &crate::support::v1(&server), "k", "tpm = 100000")
    ))
    .await;
    let response = post(
        &client(),
        &gw,
        "/v1/chat/completions",
        crate::support::chat("gpt-4", "hi", 900),
    )
    .await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let status = gw.settled_status().await;
    let node = node_status(&status, "w");
    assert_eq!(node["limits"]["tpm"]["used"], 20);
    assert_eq!(node["reserved_tokens"], 0);
}

/// A Responses stream whose final event reports 40 input and 300 output
/// tokens (reasoning the text does not show) is settled at 340, split
/// 40 / 300 in the metrics.
#[tokio::test]
async fn a_responses_stream_is_settled_at_the_usage_of_its_final_event() {
    let events = [
        r#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","usage":null}}"#,
        r#"{"type":"response.output_text.delta","sequence_number":1,"item_id":"m","output_index":0,"content_index":0,"delta":"Hello"}"#,
        r#"{"type":"response.completed","sequence_number":2,"response":{"id":"resp_1","object":"response","status":"completed","usage":{"input_tokens":40,"input_tokens_details":{"cached_tokens":0},"output_tokens":300,"output_tokens_details":{"reasoning_tokens":299},"total_tokens":340}}}"#,
    ];
    let body: String = events
        .iter()
        .map(|e| {
            let kind = serde_json::from_str::<serde_json::Value>(e).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned();
            format!("event: {kind}\ndata: {e}\n\n")
        })
        .collect();
    let server = crate::support::answering(
        ResponseTemplate::new(200).set_body_raw(body, "text/event-stream"),
    )
    .await;
    let gw = Gateway::start(&format!(
        "{FAST}{}",
        node("w", &crate::support::v1(&server), "k", "tpm = 100000")
    ))
    .await;
    let response = post(
        &client(),
        &gw,
        "/v1/responses",
        serde_json::json!({"model": "o4-mini", "input": "hi", "stream": true}).to_string(),
    )
    .await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let status = gw.settled_status().await;
    let w = node_status(&status, "w");
    assert_eq!(w["limits"]["tpm"]["used"], 340);
    assert_eq!(
        w["tokens_settled"],
        serde_json::json!({"prompt": 40, "completion": 300})
    );
    let m = crate::metrics::Metrics::scrape(&gw).await;
    // No node lists it, but it has a shipped price: its own label.
    let tokens = |kind| {
        m.value(
            "balancer_tokens_total",
            &[("node", "w"), ("model", "o4-mini"), ("kind", kind)],
        )
    };
    assert_eq!((tokens("prompt"), tokens("completion")), (40.0, 300.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_abort_mid_stream_leave_nothing_in_flight() {
    let upstream = mock(Duration::from_millis(100), 200).await;
    let toml = format!(
        "{FAST}{}",
        node(
            "m",
            &upstream.base_url(),
            "sk-mock",
            "tpm = 10000000\nmax_concurrency = 500"
        )
    );
    let gw = Gateway::start(&toml).await;
    let http = client();
    // The tokenizer tables are built on first use, which in a debug build
    // blocks both runtime workers for about a second: longer than this
    // config's connect timeout. Build them before the burst.
    let first = post(&http, &gw, "/v1/chat/completions", stream_request(1, true)).await;
    first.bytes().await.unwrap();
    futures_util::stream::iter(0..200)
        .for_each_concurrent(200, |_| {
            let (http, gw) = (&http, &gw);
            async move {
                let response =
                    post(http, gw, "/v1/chat/completions", stream_request(1000, true)).await;
                assert_eq!(response.status(), 200);
                let mut body = response.bytes_stream();
                // Take the first event, then hang up.
                body.next().await.unwrap().unwrap();
            }
        })
        .await;
    let status = gw.settled_status().await;
    let node = node_status(&status, "m");
    assert_eq!(node["in_flight"], 0);
    assert_eq!(node["reserved_tokens"], 0);
    assert_eq!(node["limits"]["rpm"]["used"], 201);
    // Each stream was settled at its prompt plus the little it streamed,
    // far below the 1,000 completion tokens each one reserved.
    let used = node["limits"]["tpm"]["used"].as_u64().unwrap();
    assert!(used < 200 * 100, "{used} tokens still counted");
    assert_eq!(upstream.stats().streams_completed(), 1);
}

#[tokio::test]
async fn a_graceful_shutdown_lets_open_streams_finish() {
    let upstream = mock(Duration::from_millis(50), 10).await;
    let gw = Gateway::start(&format!(
        "{FAST}{}",
        node("m", &upstream.base_url(), "sk-mock", "")
    ))
    .await;
    let response = post(
        &client(),
        &gw,
        "/v1/chat/completions",
        stream_request(100, true),
    )
    .await;
    let mut body = response.bytes_stream();
    let mut seen = body.next().await.unwrap().unwrap().to_vec();
    // Shut down while the stream is open; the stream still ends with [DONE].
    let shutdown = tokio::spawn(gw.shutdown());
    while let Some(chunk) = body.next().await {
        seen.extend_from_slice(&chunk.unwrap());
    }
    assert!(
        String::from_utf8(seen)
            .unwrap()
            .ends_with("data: [DONE]\n\n")
    );
    shutdown.await.unwrap();
    assert_eq!(upstream.stats().streams_completed(), 1);
}
