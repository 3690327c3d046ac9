//! A node judged by what happened to the same request elsewhere: a
//! failure another node did not share is the node's (it leaves rotation,
//! for the model it failed or for all), a failure every node shares is the
//! request's (no node is touched), and a client whose requests fail
//! everywhere cannot keep the gateway retrying.

use std::time::{Duration, Instant};

use serde_json::json;
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{
    FAST, Gateway, chat, chat_upstream, get_text, node, node_status, probe_answers, say,
    trapped_upstream, v1,
};

/// An upstream that answers every POST with a chat answer, and
/// `GET /v1/models` (its probe).
async fn healthy_upstream() -> MockServer {
    let server = chat_upstream().await;
    probe_answers(&server).await;
    server
}

/// POSTs `server` received whose body contains `text`.
async fn posts_with(server: &MockServer, text: &str) -> usize {
    let received = server.received_requests().await.unwrap();
    received
        .iter()
        .filter(|r| r.method.as_str() == "POST" && String::from_utf8_lossy(&r.body).contains(text))
        .count()
}

/// One chat request: its status and the node that answered.
async fn ask(gw: &Gateway, model: &str, text: &str) -> (u16, String) {
    let response = say(gw, chat(model, text, 5)).await;
    let node = response
        .headers()
        .get("x-balancer-node")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    if std::env::var("DEBUG_JUDGED").is_ok() {
        eprintln!("{status} {node} {}", String::from_utf8_lossy(&body));
    }
    (status, node)
}

/// A key that may list models but not call one of them (OpenAI's
/// restricted keys): clients never see its 401, and after `eject_after`
/// refusals the node is out for that model alone and still serves the
/// other.
#[tokio::test]
async fn a_key_that_may_list_but_not_call_a_model_is_out_for_that_model_only() {
    let restricted = ResponseTemplate::new(401).set_body_json(json!({"error": {
        "message": "You have insufficient permissions for this operation. Missing scopes: model.request.",
        "type": "invalid_request_error", "code": null}}));
    let a = trapped_upstream("\"model\":\"gpt-4o\"", restricted).await;
    let b = healthy_upstream().await;
    // `a` alone serves gpt-4o-mini, so its successes there keep it in
    // rotation: its failures are for gpt-4o only.
    let gw = Gateway::start(&format!(
        "{FAST}[health]\nenabled = false\neject_after = 3\neject_backoff = \"10m\"\neject_backoff_max = \"10m\"\n{}{}",
        node("a", &v1(&a), "k", "models = [\"gpt-4o\", \"gpt-4o-mini\"]"),
        node("b", &v1(&b), "k", "models = [\"gpt-4o\"]"),
    ))
    .await;
    let refused = async || posts_with(&a, "\"model\":\"gpt-4o\"").await;
    let mut rounds = 0;
    while node_status(&gw.status().await, "a")["health"]["out_for_models"] == json!([]) {
        rounds += 1;
        assert!(rounds <= 40, "a was never taken out for gpt-4o");
        let before = refused().await;
        let answered = ask(&gw, "gpt-4o", "hi").await;
        assert_eq!(answered, (200, "b".to_owned()), "no client sees a's 401");
        if refused().await > before {
            // a serves its other model meanwhile.
            assert_eq!(ask(&gw, "gpt-4o-mini", "hi").await, (200, "a".to_owned()));
        }
    }
    assert_eq!(
        posts_with(&a, "\"model\":\"gpt-4o\"").await,
        3,
        "eject_after refusals"
    );
    for _ in 0..10 {
        assert_eq!(ask(&gw, "gpt-4o", "hi").await, (200, "b".to_owned()));
    }
    assert_eq!(
        posts_with(&a, "\"model\":\"gpt-4o\"").await,
        3,
        "not tried again"
    );
    assert_eq!(ask(&gw, "gpt-4o-mini", "hi").await, (200, "a".to_owned()));
    let status = gw.status().await;
    let a_status = node_status(&status, "a");
    assert_eq!(a_status["healthy"], true, "in rotation for its other model");
    let out = &a_status["health"]["out_for_models"];
    assert_eq!(out[0]["model"], "gpt-4o");
    assert_eq!(out[0]["reason"], "key_refused");
    let scrape = get_text(gw.url("/metrics"), Some(crate::support::ADMIN_TOKEN)).await;
    assert!(
        scrape.contains(
            r#"balancer_node_ejections_total{node="a",scope="model",kind="key_refused"} 1"#
        ),
        "{scrape}"
    );
}

/// A node that answers 403 to every chat request (a project without
/// access to the model): retried elsewhere, so clients get 200.
#[tokio::test]
async fn a_node_refusing_every_chat_is_retried_and_clients_are_served() {
    let denied = ResponseTemplate::new(403).set_body_json(json!({"error": {
        "message": "Project does not have access to model", "type": "invalid_request_error",
        "code": "model_not_found"}}));
    let a = trapped_upstream("messages", denied).await;
    let b = healthy_upstream().await;
    let gw = Gateway::start(&format!(
        "{FAST}[health]\nenabled = false\neject_after = 3\n{}{}",
        node("a", &v1(&a), "k", ""),
        node("b", &v1(&b), "k", ""),
    ))
    .await;
    for _ in 0..10 {
        assert_eq!(ask(&gw, "gpt-4o-mini", "hi").await, (200, "b".to_owned()));
    }
    assert!(
        posts_with(&a, "messages").await <= 3,
        "out after eject_after"
    );
}

/// A node whose chat answers 500 while `/models` answers (a broken
/// deployment) leaves rotation after `eject_after` such failures, which
/// another node served; later requests do not touch it.
#[tokio::test]
async fn a_node_failing_chat_while_its_probe_passes_leaves_rotation() {
    let a = trapped_upstream("messages", ResponseTemplate::new(500)).await;
    let b = healthy_upstream().await;
    let gw = Gateway::start(&format!(
        "{FAST}[health]\ninterval = \"10ms\"\neject_after = 3\neject_backoff = \"10m\"\neject_backoff_max = \"10m\"\n{}{}",
        node("a", &v1(&a), "k", ""),
        node("b", &v1(&b), "k", ""),
    ))
    .await;
    let mut rounds = 0;
    while posts_with(&a, "messages").await < 3 {
        rounds += 1;
        assert!(rounds <= 40, "a was never tried three times");
        assert_eq!(ask(&gw, "gpt-4o-mini", "hi").await.0, 200);
    }
    let status = gw.until(|s| node_status(s, "a")["healthy"] == false).await;
    let reason = node_status(&status, "a")["health"]["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(reason.contains("succeeded elsewhere"), "{reason}");
    for _ in 0..10 {
        assert_eq!(ask(&gw, "gpt-4o-mini", "hi").await, (200, "b".to_owned()));
    }
    assert_eq!(
        posts_with(&a, "messages").await,
        3,
        "no request touched it since"
    );
}

/// The same with an answer that never comes: once the node is out, a
/// request is answered within a fraction of `first_byte_timeout`.
#[tokio::test]
async fn a_node_that_hangs_leaves_rotation_and_requests_stop_waiting_for_it() {
    let hang = ResponseTemplate::new(200).set_delay(Duration::from_secs(30));
    let a = trapped_upstream("messages", hang).await;
    let b = healthy_upstream().await;
    let gw = Gateway::start(&format!(
        "[upstream]\nfirst_byte_timeout = \"2s\"\n[health]\nenabled = false\neject_after = 2\neject_backoff = \"10m\"\neject_backoff_max = \"10m\"\n{}{}",
        node("a", &v1(&a), "k", ""),
        node("b", &v1(&b), "k", ""),
    ))
    .await;
    let mut rounds = 0;
    while node_status(&gw.status().await, "a")["healthy"] == true {
        rounds += 1;
        assert!(rounds <= 20, "a never left rotation");
        assert_eq!(ask(&gw, "gpt-4o-mini", "hi").await.0, 200);
    }
    let tried = posts_with(&a, "messages").await;
    assert_eq!(tried, 2, "eject_after timeouts");
    for _ in 0..5 {
        let sent = Instant::now();
        assert_eq!(ask(&gw, "gpt-4o-mini", "hi").await, (200, "b".to_owned()));
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "{:?}",
            sent.elapsed()
        );
    }
    assert_eq!(posts_with(&a, "messages").await, tried);
}

/// A client sending what every node refuses (400, 403 or 500 by turns),
/// 200 times: no node leaves rotation or counts a failure, and the
/// upstream calls stay within 200 × (attempts + 1), far fewer once its
/// requests are tried on one node only.
#[tokio::test]
async fn a_client_whose_requests_fail_everywhere_ejects_nothing_and_is_bounded() {
    let (a, b) = (MockServer::start().await, MockServer::start().await);
    for server in [&a, &b] {
        for code in [400, 403, 500] {
            Mock::given(method("POST"))
                .and(body_string_contains(format!("poison-{code}")))
                .respond_with(ResponseTemplate::new(code))
                .mount(server)
                .await;
        }
        probe_answers(server).await;
    }
    let gw = Gateway::start(&format!(
        "{FAST}[retry]\nattempts = 2\n[health]\nenabled = false\neject_after = 2\n{}{}",
        node("a", &v1(&a), "k", ""),
        node("b", &v1(&b), "k", ""),
    ))
    .await;
    for i in 0..200 {
        let code = [400, 403, 500][i % 3];
        let (status, _) = ask(&gw, "gpt-4o-mini", &format!("poison-{code}")).await;
        assert_eq!(status, code, "the last refusal, relayed as it came");
    }
    let calls =
        a.received_requests().await.unwrap().len() + b.received_requests().await.unwrap().len();
    assert!(calls <= 200 * 3, "{calls} upstream calls");
    // 5 requests in a row failed everywhere: the rest got one node each.
    assert!(
        calls < 260,
        "{calls} upstream calls: the streak did not limit retries"
    );
    let status = gw.status().await;
    for name in ["a", "b"] {
        let node = node_status(&status, name);
        assert_eq!(node["healthy"], true, "{node}");
        assert_eq!(node["health"]["request_failures_in_a_row"], 0, "{node}");
        assert_eq!(node["health"]["out_for_models"], json!([]), "{node}");
    }
}
