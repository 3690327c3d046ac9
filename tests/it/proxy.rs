//! Forwarding: key injection, header hygiene, spreading, models, pass-through.

use std::time::Duration;

use serde_json::Value;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{
    CLIENT_KEY, FAST, Gateway, answering_upstream, chat, client, node, node_status, post, say,
    send_json,
};

#[tokio::test]
async fn each_upstream_sees_only_its_own_key_never_the_clients() {
    let (a, b) = (
        answering_upstream(Duration::ZERO).await,
        answering_upstream(Duration::ZERO).await,
    );
    let toml = format!(
        "{FAST}[auth]\nclient_keys_env = [\"TEST_CLIENT_KEY\"]\n{}{}",
        node("a", &crate::support::v1(&a), "sk-upstream-a", ""),
        node("b", &crate::support::v1(&b), "sk-upstream-b", ""),
    );
    let gw = Gateway::start(&toml).await;
    let http = client();
    let mut served_by = Vec::new();
    for _ in 0..10 {
        let response = http
            .post(gw.url("/v1/chat/completions?api-version=2024-06-01"))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .header("api-key", CLIENT_KEY)
            .header("x-request-id", "req-42")
            .header("connection", "x-hop-secret")
            .header("x-hop-secret", "must-not-pass")
            .header("proxy-authorization", "Basic cHJveHk6cHJveHk=")
            .body(chat("gpt-4o-mini", "hello", 5))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        served_by.push(
            response.headers()["x-balancer-node"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert!(served_by.iter().any(|n| n == "a") && served_by.iter().any(|n| n == "b"));

    for (server, key) in [(&a, "sk-upstream-a"), (&b, "sk-upstream-b")] {
        let received = server.received_requests().await.unwrap();
        assert!(!received.is_empty());
        for request in received {
            let auth: Vec<_> = request.headers.get_all("authorization").iter().collect();
            assert_eq!(auth, [&format!("Bearer {key}")]);
            for (name, value) in &request.headers {
                assert!(
                    !value
                        .as_bytes()
                        .windows(CLIENT_KEY.len())
                        .any(|w| w == CLIENT_KEY.as_bytes()),
                    "client key leaked in {name}"
                );
            }
            assert!(request.headers.get("api-key").is_none());
            assert!(request.headers.get("x-hop-secret").is_none());
            assert!(request.headers.get("proxy-authorization").is_none());
            assert_eq!(request.headers["x-request-id"], "req-42");
            assert_eq!(request.url.query(), Some("api-version=2024-06-01"));
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            assert_eq!(body["model"], "gpt-4o-mini");
        }
    }
}

#[tokio::test]
async fn equal_nodes_share_requests_evenly() {
    let servers = [
        answering_upstream(Duration::ZERO).await,
        answering_upstream(Duration::ZERO).await,
        answering_upstream(Duration::ZERO).await,
    ];
    let mut toml = FAST.to_owned();
    for (i, s) in servers.iter().enumerate() {
        toml.push_str(&node(&format!("n{i}"), &crate::support::v1(s), "k", ""));
    }
    let gw = Gateway::start(&toml).await;
    let http = client();
    for _ in 0..300 {
        assert_eq!(
            post(&http, &gw, "/v1/chat/completions", chat("gpt-4", "hi", 5))
                .await
                .status(),
            200
        );
    }
    for s in &servers {
        assert_eq!(s.received_requests().await.unwrap().len(), 100);
    }
}

#[tokio::test]
async fn models_are_answered_by_the_gateway_behind_the_client_key() {
    let toml = format!(
        "[auth]\nclient_keys_env = [\"TEST_CLIENT_KEY\"]\n{}{}",
        node(
            "a",
            "http://127.0.0.1:9/v1",
            "k",
            "models = [\"gpt-4o-mini\", \"text-embedding-3-small\"]"
        ),
        node(
            "b",
            "http://127.0.0.1:9/v1",
            "k",
            "models = [\"gpt-4.1\", \"gpt-4o-mini\"]"
        ),
    );
    let gw = Gateway::start(&toml).await;
    let http = client();
    let get = |path: &str| {
        http.get(gw.url(path))
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .send()
    };
    let list: Value =
        serde_json::from_slice(&get("/v1/models").await.unwrap().bytes().await.unwrap()).unwrap();
    assert_eq!(list["object"], "list");
    let ids: Vec<_> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-4.1", "gpt-4o-mini", "text-embedding-3-small"]);

    let one = get("/v1/models/gpt-4.1").await.unwrap();
    assert_eq!(one.status(), 200);
    let one: Value = serde_json::from_slice(&one.bytes().await.unwrap()).unwrap();
    assert_eq!(
        (one["id"].as_str(), one["object"].as_str()),
        (Some("gpt-4.1"), Some("model"))
    );

    let missing = get("/v1/models/gpt-9").await.unwrap();
    assert_eq!(missing.status(), 404);
    let missing: Value = serde_json::from_slice(&missing.bytes().await.unwrap()).unwrap();
    assert_eq!(missing["error"]["code"], "model_not_found");

    assert_eq!(
        http.get(gw.url("/v1/models"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}

#[tokio::test]
async fn a_request_without_a_model_goes_to_a_node_and_counts_one_request() {
    let server = MockServer::start().await;
    // An operation on no stored object and naming no model (lists of files
    // and the like are the gateway's own answer; evals are not served).
    Mock::given(method("POST"))
        .and(path("/v1/moderations"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"object": "list", "data": []})),
        )
        .mount(&server)
        .await;
    let gw = Gateway::start(&format!(
        "{FAST}{}",
        node("a", &crate::support::v1(&server), "k", "rpm = 10")
    ))
    .await;
    let response = send_json(gw.url("/v1/moderations"), None, r#"{"input": "hi"}"#).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-balancer-node"], "a");
    let status = gw.settled_status().await;
    assert_eq!(node_status(&status, "a")["limits"]["rpm"]["used"], 1);
}

#[tokio::test]
async fn an_upstream_client_error_is_relayed_as_it_came() {
    let server = MockServer::start().await;
    let body = r#"{"error":{"message":"context too long","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(400)
                .insert_header("x-upstream-trace", "t-1")
                .set_body_raw(body, "application/json"),
        )
        .mount(&server)
        .await;
    let gw = Gateway::start(&format!(
        "{FAST}{}",
        node("a", &crate::support::v1(&server), "k", "")
    ))
    .await;
    let response = say(&gw, chat("gpt-4", "hi", 5)).await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-upstream-trace"], "t-1");
    assert_eq!(response.bytes().await.unwrap(), body.as_bytes());
    // A client error is not retried.
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}
