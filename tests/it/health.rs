//! Health: probes take failing nodes out of rotation and bring them back,
//! real traffic ejects a node that stops answering, a refused key takes its
//! node out, and the upstream's own rate-limit word is respected.

use std::time::Duration;

use mock_upstreams::{MockConfig, MockUpstream};
use serde_json::Value;
use tokio::time::Instant;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{
    FAST, Gateway, chat, chat_answer, client, closed_port, node, node_status, post, say,
    send_in_background,
};

fn health(name: &str, status: &Value) -> (bool, String) {
    let n = node_status(status, name);
    (
        n["healthy"].as_bool().unwrap(),
        n["health"]["state"].as_str().unwrap().to_owned(),
    )
}

/// A wiremock node: chat answers always, `GET /v1/models` with `probe`.
async fn probed_upstream(server: &MockServer, probe: u16) {
    server.reset().await;
    Mock::given(method("GET"))
        .and(path("/v1/models"))
        .respond_with(ResponseTemplate::new(probe).set_body_json(serde_json::json!({"data": []})))
        .mount(server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(chat_answer(5, 2)))
        .mount(server)
        .await;
}

async fn posts(server: &MockServer) -> usize {
    let received = server.received_requests().await.unwrap();
    received
        .iter()
        .filter(|r| r.method.as_str() == "POST")
        .count()
}

async fn send(gw: &Gateway, n: usize) -> Vec<String> {
    let http = client();
    let mut nodes = Vec::new();
    for _ in 0..n {
        let response = post(&http, gw, "/v1/chat/completions", chat("gpt-4", "hi", 5)).await;
        assert_eq!(response.status(), 200);
        nodes.push(
            response.headers()["x-balancer-node"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    nodes
}

#[tokio::test]
async fn a_node_failing_its_probe_leaves_rotation_and_returns_when_it_recovers() {
    let flaky = MockServer::start().await;
    let steady = MockServer::start().await;
    probed_upstream(&flaky, 200).await;
    probed_upstream(&steady, 200).await;
    let interval = Duration::from_millis(200);
    let unhealthy_after = 2;
    let gw = Gateway::start(&format!(
        "{FAST}[health]\ninterval = \"200ms\"\ntimeout = \"1s\"\nunhealthy_after = {unhealthy_after}\nhealthy_after = 2\n{}{}",
        node("flaky", &crate::support::v1(&flaky), "k", ""),
        node("steady", &crate::support::v1(&steady), "k", ""),
    ))
    .await;
    gw.until(|s| node_status(s, "flaky")["health"]["last_probe"]["ok"] == true)
        .await;

    probed_upstream(&flaky, 503).await;
    let failing_since = Instant::now();
    let status = gw.until(|s| !health("flaky", s).0).await;
    // The bound: `unhealthy_after` probes, plus up to one interval until the
    // first of them and scheduling slack on a loaded machine.
    let bound = interval * (unhealthy_after + 1) + Duration::from_secs(1);
    assert!(
        failing_since.elapsed() <= bound,
        "out after {:?}",
        failing_since.elapsed()
    );
    assert_eq!(health("flaky", &status).1, "unhealthy");
    let reason = node_status(&status, "flaky")["health"]["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        reason.contains("probes GET /models in a row failed (last: answered 503"),
        "{reason}"
    );

    let before = posts(&flaky).await;
    assert!(send(&gw, 6).await.iter().all(|n| n == "steady"));
    assert_eq!(
        posts(&flaky).await,
        before,
        "no request to a node out of rotation"
    );

    probed_upstream(&flaky, 200).await;
    gw.until(|s| health("flaky", s) == (true, "healthy".to_owned()))
        .await;
    assert!(send(&gw, 6).await.iter().any(|n| n == "flaky"));
}

#[tokio::test]
async fn refused_connections_eject_a_node_at_once_and_it_returns_when_it_answers() {
    let port = closed_port();
    let steady = MockServer::start().await;
    probed_upstream(&steady, 200).await;
    // Probes are due only after an hour: what happens here is passive
    // ejection and its re-probes.
    let gw = Gateway::start(&format!(
        "{FAST}[retry]\nattempts = 2\n[health]\ninterval = \"1h\"\neject_after = 3\neject_backoff = \"100ms\"\neject_backoff_max = \"400ms\"\n{}{}",
        node("gone", &format!("http://127.0.0.1:{port}/v1"), "sk-mocka", ""),
        node("steady", &crate::support::v1(&steady), "k", ""),
    ))
    .await;

    // Every request succeeds: a refused connection is retried elsewhere.
    let served = send(&gw, 8).await;
    assert!(served.iter().all(|n| n == "steady"));
    let status = gw.until(|s| health("gone", s).1 == "ejected").await;
    let gone = node_status(&status, "gone");
    let reason = gone["health"]["reason"].as_str().unwrap();
    // Ejected by the requests (a re-probe may since have failed too).
    assert!(
        reason.starts_with("ejected:") && reason.contains("could not connect"),
        "{reason}"
    );
    assert!(
        gone["health"]["request_failures_in_a_row"]
            .as_u64()
            .unwrap()
            >= 3
    );
    assert!(!health("gone", &status).0);

    // The node starts answering on its port: a re-probe brings it back.
    let mock = MockUpstream::start(
        format!("127.0.0.1:{port}").parse().unwrap(),
        MockConfig::new("sk-mocka"),
    )
    .await
    .unwrap();
    gw.until(|s| health("gone", s) == (true, "healthy".to_owned()))
        .await;
    let served = send(&gw, 6).await;
    assert!(served.iter().any(|n| n == "gone"));
    assert!(mock.stats().requests() > 0);
    mock.stop().await;
}

#[tokio::test]
async fn a_node_whose_key_is_refused_leaves_rotation_and_status_says_why() {
    let wrong = MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockConfig::new("sk-right"))
        .await
        .unwrap();
    let steady = MockServer::start().await;
    probed_upstream(&steady, 200).await;
    // Probes off: a real request is refused, a probe of the key confirms
    // it, and the request is retried on the other node.
    let gw = Gateway::start(&format!(
        "{FAST}[health]\nenabled = false\n{}{}",
        node("wrong", &wrong.base_url(), "sk-wrong", ""),
        node("steady", &crate::support::v1(&steady), "k", ""),
    ))
    .await;
    assert!(send(&gw, 4).await.iter().all(|n| n == "steady"));
    let status = gw.status().await;
    assert_eq!(health("wrong", &status), (false, "key_refused".to_owned()));
    let reason = node_status(&status, "wrong")["health"]["reason"]
        .as_str()
        .unwrap();
    assert!(
        reason.contains("401 Unauthorized") && reason.contains("until a reload changes the key"),
        "{reason}"
    );
    assert!(
        !status.to_string().contains("sk-wrong"),
        "no key in /status"
    );
    assert_eq!(
        wrong.stats().unauthorized(),
        2,
        "the request, the probe that confirmed it, then left alone"
    );
    wrong.stop().await;
}

#[tokio::test]
async fn a_spent_quota_rests_the_node_far_longer_than_a_busy_minute() {
    let spent = crate::support::answering(ResponseTemplate::new(429).set_body_json(serde_json::json!({
            "error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}
        }))).await;
    let busy = crate::support::answering(ResponseTemplate::new(429)
                .insert_header("retry-after", "2")
                .set_body_json(serde_json::json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}})),).await;
    let gw = Gateway::start(&format!(
        "{FAST}[retry]\nattempts = 1\n[health]\nenabled = false\nquota_exhausted_cooldown = \"30m\"\n{}{}",
        node("spent", &crate::support::v1(&spent), "k", ""),
        node("busy", &crate::support::v1(&busy), "k", ""),
    ))
    .await;
    let response = say(&gw, chat("gpt-4", "hi", 5)).await;
    assert_eq!(
        response.status(),
        429,
        "both refused: the last answer is relayed"
    );
    let status = gw.settled_status().await;
    let spent = node_status(&status, "spent");
    assert_eq!(spent["cooldown_reason"], "insufficient_quota");
    assert!(spent["cooldown_remaining_ms"].as_u64().unwrap() > 29 * 60 * 1000);
    let busy = node_status(&status, "busy");
    assert_eq!(busy["cooldown_reason"], "rate_limited");
    assert!(busy["cooldown_remaining_ms"].as_u64().unwrap() <= 2000);
    // Both still healthy: a 429 is a busy node, not a broken one.
    assert!(health("spent", &status).0 && health("busy", &status).0);
}

#[tokio::test]
async fn remaining_requests_of_zero_hold_requests_until_the_upstream_refills() {
    // None left of 2, full again in 1 s: the next one in half a second.
    let server = crate::support::answering(
        ResponseTemplate::new(200)
            .insert_header("x-ratelimit-limit-requests", "2")
            .insert_header("x-ratelimit-remaining-requests", "0")
            .insert_header("x-ratelimit-reset-requests", "1s")
            .set_body_json(chat_answer(5, 2)),
    )
    .await;
    // The gateway's own limit (rpm 100) has room; only the upstream's word
    // holds the second request back.
    let gw = Gateway::start(&format!(
        "[queue]\nmax_wait = \"5s\"\n{}",
        node("shared", &crate::support::v1(&server), "k", "rpm = 100")
    ))
    .await;
    let http = client();
    let first = post(&http, &gw, "/v1/chat/completions", chat("gpt-4", "hi", 5)).await;
    assert_eq!(first.status(), 200);
    let status = gw.status().await;
    let reported = &node_status(&status, "shared")["upstream_reported"]["remaining_requests"];
    assert_eq!(reported["left"], 0);

    let sent_at = Instant::now();
    let second = send_in_background(&gw, chat("gpt-4", "hi", 5));
    // It waits in the queue and the upstream hears nothing meanwhile.
    gw.until(|s| s["queue"]["depth"] == 1).await;
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    assert_eq!(second.await.unwrap().0, 200);
    assert!(
        sent_at.elapsed() >= Duration::from_millis(400),
        "sent before the upstream had refilled one"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_request_waiting_for_headroom_goes_to_a_node_the_moment_it_is_back() {
    let port = closed_port();
    let full = MockServer::start().await;
    probed_upstream(&full, 200).await;
    // `back` (node 0, tried first) refuses connections and is ejected by the
    // first request, which `full` then serves, using its whole rpm.
    let gw = Gateway::start(&format!(
        "[queue]\nmax_wait = \"90s\"\n[upstream]\nconnect_timeout = \"1s\"\n[health]\ninterval = \"1h\"\neject_after = 1\neject_backoff = \"300ms\"\n{}{}",
        node("back", &format!("http://127.0.0.1:{port}/v1"), "sk-mocka", ""),
        node("full", &crate::support::v1(&full), "k", "rpm = 1"),
    ))
    .await;
    assert_eq!(send(&gw, 1).await, ["full"]);
    assert_eq!(health("back", &gw.status().await).1, "ejected");

    // The next request waits: `full` frees its slot only in a minute.
    let waiting = send_in_background(&gw, chat("gpt-4", "hi", 5));
    gw.until(|s| s["queue"]["depth"] == 1).await;
    let mock = MockUpstream::start(
        format!("127.0.0.1:{port}").parse().unwrap(),
        MockConfig::new("sk-mocka"),
    )
    .await
    .unwrap();
    // A re-probe brings `back` into rotation, and that wakes the queue.
    let (status, served_by) = waiting.await.unwrap();
    assert_eq!((status, served_by.as_str()), (200, "back"));
    mock.stop().await;
}
