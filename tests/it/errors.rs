//! Every error the gateway produces, in the OpenAI error shape.

use serde_json::Value;
use wiremock::{MockServer, ResponseTemplate};

use crate::support::{CLIENT_KEY, Gateway, chat, chat_answer, client, node};

async fn gateway(extra: &str, node_extra: &str) -> (Gateway, MockServer) {
    let server =
        crate::support::answering(ResponseTemplate::new(200).set_body_json(chat_answer(5, 2)))
            .await;
    let toml = format!(
        "[auth]\nclient_keys_env = [\"TEST_CLIENT_KEY\"]\n{extra}{}",
        node(
            "a",
            &crate::support::v1(&server),
            "sk-node-secret",
            &format!("models = [\"gpt-4o-mini\"]\n{node_extra}")
        )
    );
    (Gateway::start(&toml).await, server)
}

/// Sends `body` and returns status, Retry-After and the parsed error.
async fn send(
    gw: &Gateway,
    path: &str,
    key: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Option<String>, Value) {
    let mut request = client()
        .post(gw.url(path))
        .header("content-type", content_type)
        .body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    assert!(
        !text.contains("sk-node-secret"),
        "a node key leaked: {text}"
    );
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    for field in ["message", "type", "code"] {
        assert!(
            body["error"][field].is_string(),
            "error.{field} missing in {body}"
        );
    }
    (status, retry, body)
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap()
}

const JSON: &str = "application/json";

#[tokio::test]
async fn malformed_json_is_400_invalid_json() {
    let (gw, upstream) = gateway("", "").await;
    let (status, _, body) = send(
        &gw,
        "/v1/chat/completions",
        Some(CLIENT_KEY),
        JSON,
        b"{\"model\": ".to_vec(),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "invalid_json"));
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(upstream.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_missing_model_is_400_missing_model() {
    let (gw, _) = gateway("", "").await;
    let (status, _, body) = send(
        &gw,
        "/v1/chat/completions",
        Some(CLIENT_KEY),
        JSON,
        br#"{"messages":[]}"#.to_vec(),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "missing_model"));
}

#[tokio::test]
async fn a_request_that_can_never_fit_is_400_request_too_large_naming_the_limit() {
    let (gw, upstream) = gateway("", "tpm = 100").await;
    let (status, _, body) = send(
        &gw,
        "/v1/chat/completions",
        Some(CLIENT_KEY),
        JSON,
        chat("gpt-4o-mini", "hi", 500).into_bytes(),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "request_too_large"));
    assert!(body["error"]["message"].as_str().unwrap().contains("tpm"));
    assert!(upstream.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_401_invalid_api_key() {
    let (gw, _) = gateway("", "").await;
    for key in [None, Some("sk-wrong")] {
        let (status, _, body) = send(
            &gw,
            "/v1/chat/completions",
            key,
            JSON,
            chat("gpt-4o-mini", "hi", 5).into_bytes(),
        )
        .await;
        assert_eq!((status, code(&body)), (401, "invalid_api_key"));
    }
}

#[tokio::test]
async fn a_model_no_node_serves_is_404_model_not_found() {
    let (gw, _) = gateway("", "").await;
    let (status, _, body) = send(
        &gw,
        "/v1/chat/completions",
        Some(CLIENT_KEY),
        JSON,
        chat("gpt-9-turbo", "hi", 5).into_bytes(),
    )
    .await;
    assert_eq!((status, code(&body)), (404, "model_not_found"));
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_body_too_large() {
    let (gw, _) = gateway("[server]\nmax_body_bytes = 1000\n", "").await;
    let big = chat("gpt-4o-mini", &"x".repeat(2000), 5).into_bytes();
    let (status, _, body) = send(&gw, "/v1/chat/completions", Some(CLIENT_KEY), JSON, big).await;
    assert_eq!((status, code(&body)), (413, "body_too_large"));
}

#[tokio::test]
async fn saturation_is_429_rate_limit_exceeded_with_retry_after() {
    let (gw, _) = gateway("[queue]\nmax_wait = \"1s\"\n", "rpm = 1").await;
    let request = || chat("gpt-4o-mini", "hi", 5).into_bytes();
    let first = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .header("content-type", JSON)
        .body(request())
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let (status, retry, body) = send(
        &gw,
        "/v1/chat/completions",
        Some(CLIENT_KEY),
        JSON,
        request(),
    )
    .await;
    assert_eq!((status, code(&body)), (429, "rate_limit_exceeded"));
    let retry: u64 = retry.unwrap().parse().unwrap();
    assert!((59..=61).contains(&retry), "Retry-After {retry}");
    let queue = &gw.status().await["queue"];
    assert_eq!(
        (
            queue["refused_total"].as_u64(),
            queue["queued_total"].as_u64()
        ),
        (Some(1), Some(0))
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_in_the_openai_shape() {
    let (gw, _) = gateway("", "").await;
    let (status, _, body) = send(&gw, "/nowhere", Some(CLIENT_KEY), JSON, Vec::new()).await;
    assert_eq!((status, code(&body)), (404, "unknown_url"));
    let (status, _, body) = send(&gw, "/v1/models", Some(CLIENT_KEY), JSON, Vec::new()).await;
    assert_eq!((status, code(&body)), (405, "method_not_allowed"));
}

#[tokio::test]
async fn status_and_healthz_need_no_key_and_show_no_key() {
    let (gw, _) = gateway("", "rpm = 10").await;
    let health = client().get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let status = client().get(gw.url("/status")).send().await.unwrap();
    assert_eq!(status.status(), 200);
    let text = status.text().await.unwrap();
    assert!(!text.contains("sk-node-secret") && !text.contains(CLIENT_KEY));
    let status: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status["nodes"][0]["limits"]["rpm"]["limit"], 10);
}
