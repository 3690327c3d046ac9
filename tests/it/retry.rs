//! Upstream failures before the response starts are retried on another node.

use std::time::Duration;

use serde_json::Value;
use wiremock::ResponseTemplate;

use crate::support::{
    FAST, Gateway, answering, chat, chat_answer, client, closed_port, node, node_status, post, say,
};

fn ok() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(chat_answer(5, 2))
}

/// Node `first` is tried first: a fresh gateway's rotation starts at node 0.
async fn gateway(first: &str, second: &str, extra: &str) -> Gateway {
    Gateway::start(&format!(
        "{FAST}{extra}{}{}",
        node("first", first, "k", ""),
        node("second", second, "k", "")
    ))
    .await
}

#[tokio::test]
async fn a_500_is_retried_on_another_node() {
    let broken = answering(ResponseTemplate::new(500).set_body_string("boom")).await;
    let healthy = answering(ok()).await;
    let gw = gateway(
        &crate::support::v1(&broken),
        &crate::support::v1(&healthy),
        "",
    )
    .await;
    let response = say(&gw, chat("gpt-4", "hi", 5)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-balancer-node"], "second");
    assert_eq!(broken.received_requests().await.unwrap().len(), 1);
    let status = gw.settled_status().await;
    // The failed attempt reached the node: its request stays counted.
    assert_eq!(node_status(&status, "first")["limits"]["rpm"]["used"], 1);
}

#[tokio::test]
async fn a_429_cools_the_node_down_for_its_retry_after_and_is_retried() {
    let limited = answering(ResponseTemplate::new(429).insert_header("retry-after", "30")).await;
    let healthy = answering(ok()).await;
    let gw = gateway(
        &crate::support::v1(&limited),
        &crate::support::v1(&healthy),
        "",
    )
    .await;
    let http = client();
    for _ in 0..4 {
        let response = post(&http, &gw, "/v1/chat/completions", chat("gpt-4", "hi", 5)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-balancer-node"], "second");
    }
    // Only the first request reached the rate-limited node.
    assert_eq!(limited.received_requests().await.unwrap().len(), 1);
    let status = gw.settled_status().await;
    let cooldown = node_status(&status, "first")["cooldown_remaining_ms"]
        .as_u64()
        .unwrap();
    assert!(
        (25_000..=30_000).contains(&cooldown),
        "cooldown {cooldown} ms"
    );
}

#[tokio::test]
async fn a_refused_connection_is_retried_and_takes_nothing_from_the_quota() {
    let healthy = answering(ok()).await;
    let dead = format!("http://127.0.0.1:{}/v1", closed_port());
    let gw = gateway(&dead, &crate::support::v1(&healthy), "").await;
    let response = say(&gw, chat("gpt-4", "hi", 5)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-balancer-node"], "second");
    let status = gw.settled_status().await;
    let first = node_status(&status, "first");
    assert_eq!(first["limits"]["rpm"]["used"], 0);
    assert_eq!(first["limits"]["tpm"]["used"], 0);
}

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap(),
    )
}

#[tokio::test]
async fn no_reachable_node_is_502_upstream_unavailable() {
    let a = format!("http://127.0.0.1:{}/v1", closed_port());
    let b = format!("http://127.0.0.1:{}/v1", closed_port());
    let gw = gateway(&a, &b, "").await;
    let (status, body) = error_of(say(&gw, chat("gpt-4", "hi", 5)).await).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"]["code"], "upstream_unavailable");
    let status = gw.settled_status().await;
    for n in status["nodes"].as_array().unwrap() {
        assert_eq!(
            (n["in_flight"].as_u64(), n["reserved_tokens"].as_u64()),
            (Some(0), Some(0))
        );
    }
}

#[tokio::test]
async fn no_head_within_first_byte_timeout_is_504_upstream_timeout() {
    let slow = || answering(ok().set_delay(Duration::from_secs(5)));
    let (a, b) = (slow().await, slow().await);
    let extra = "[upstream]\nfirst_byte_timeout = \"200ms\"\n";
    let toml = format!(
        "{extra}{}{}",
        node("first", &crate::support::v1(&a), "k", ""),
        node("second", &crate::support::v1(&b), "k", "")
    );
    let gw = Gateway::start(&toml).await;
    let (status, body) = error_of(say(&gw, chat("gpt-4", "hi", 5)).await).await;
    assert_eq!(status, 504);
    assert_eq!(body["error"]["code"], "upstream_timeout");
    // Both nodes were tried.
    assert_eq!(a.received_requests().await.unwrap().len(), 1);
    assert_eq!(b.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn when_every_attempt_got_an_answer_the_last_one_is_relayed() {
    let a = answering(ResponseTemplate::new(503).set_body_string("first down")).await;
    let b = answering(ResponseTemplate::new(503).set_body_string("second down")).await;
    let gw = gateway(&crate::support::v1(&a), &crate::support::v1(&b), "").await;
    let response = say(&gw, chat("gpt-4", "hi", 5)).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["x-balancer-node"], "second");
    assert_eq!(response.text().await.unwrap(), "second down");
}
