//! Hostile clients and broken upstreams: what an attacker (or a careless
//! team, or a misbehaving upstream) tried, one test each, against the
//! in-process gateway or the real binary on 127.0.0.1.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{
    ADMIN_TOKEN, CLIENT_KEY, FAST, Gateway, answering, ask_as, chat, chat_answer, chat_upstream,
    client, get_text, node, node_status, say, send_json, trapped_upstream, v1,
};

/// Sends `request` (raw HTTP/1.1, as written) and returns the whole answer
/// as text; the connection is closed by `Connection: close`.
async fn raw(gw: &Gateway, request: &str) -> String {
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

fn healthy_everywhere(status: &Value) -> bool {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["health"]["state"] == "healthy")
}

/// 1. A 401 the client provoked (the real API answers 401 to a request
/// naming another organisation) is tried on the other node, which refuses
/// it too, and the last refusal is relayed; no node leaves rotation: the
/// failure was shared, and a probe of each node's own key says it is fine.
#[tokio::test]
async fn a_refusal_the_client_provoked_is_relayed_and_takes_no_node_out() {
    let refused = ResponseTemplate::new(401).set_body_json(
        json!({"error": {"message": "You do not belong to that organization", "type": "invalid_request_error", "code": "invalid_organization"}}),
    );
    let a = trapped_upstream("org-not-mine", refused.clone()).await;
    let b = trapped_upstream("org-not-mine", refused).await;
    let gw = Gateway::start(&format!(
        "{FAST}{}{}",
        node("a", &v1(&a), "k", ""),
        node("b", &v1(&b), "k", "")
    ))
    .await;
    let response = say(&gw, chat("gpt-4o-mini", "org-not-mine", 5)).await;
    assert_eq!(response.status(), 401, "the client's own refusal, relayed");
    let mut posts = 0;
    for server in [&a, &b] {
        let requests = server.received_requests().await.unwrap();
        posts += requests
            .iter()
            .filter(|r| r.method.as_str() == "POST")
            .count();
    }
    assert_eq!(posts, 2, "tried once on each node, no more");
    assert!(healthy_everywhere(&gw.status().await));
    assert_eq!(ask_as(&gw, CLIENT_KEY, "gpt-4o-mini", 5).await.0, 200);
}

/// 1. Likewise, 5xx a client's requests provoke on every node count
/// against none of them.
#[tokio::test]
async fn server_errors_the_client_provoked_eject_no_node() {
    let boom = ResponseTemplate::new(500).set_body_string("poisoned prompt");
    let a = trapped_upstream("poison", boom.clone()).await;
    let b = trapped_upstream("poison", boom).await;
    let gw = Gateway::start(&format!(
        "{FAST}[health]\nenabled = false\neject_after = 2\n[retry]\nattempts = 1\n{}{}",
        node("a", &v1(&a), "k", ""),
        node("b", &v1(&b), "k", "")
    ))
    .await;
    for _ in 0..4 {
        let response = say(&gw, chat("gpt-4o-mini", "poison", 5)).await;
        assert_eq!(response.status(), 500);
    }
    // Every request failed on both nodes: the failures were the requests'.
    let status = gw.status().await;
    assert!(healthy_everywhere(&status));
    for node in status["nodes"].as_array().unwrap() {
        assert_eq!(node["health"]["request_failures_in_a_row"], 0, "{node}");
    }
    assert_eq!(ask_as(&gw, CLIENT_KEY, "gpt-4o-mini", 5).await.0, 200);
}

/// 2. Dot segments, plain or percent-encoded, never reach the upstream
/// (with the node's key, on another of its routes).
#[tokio::test]
async fn dot_segments_are_refused_and_never_forwarded() {
    let upstream = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_string("upstream internals"))
        .mount(&upstream)
        .await;
    let gw = Gateway::start(&node("a", &v1(&upstream), "sk-node-secret", "")).await;
    for target in [
        "/v1/../_stats",
        "/v1/%2e%2e/_stats",
        "/v1/.%2E/.%2e/tenant-b/v1/files",
        "/v1/files%2F..%2F_stats",
    ] {
        let answer = raw(
            &gw,
            &format!("GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
        assert!(answer.contains("invalid_path"), "{target}: {answer}");
    }
    assert!(upstream.received_requests().await.unwrap().is_empty());
}

/// 3. A client over its own limit is refused before its body is read or
/// parsed: refusing it costs nothing.
#[tokio::test]
async fn a_client_over_its_own_limit_is_refused_before_its_body_is_parsed() {
    let upstream = chat_upstream().await;
    let gw = Gateway::start_file_text(
        &format!(
            "[[clients]]\nname = \"one\"\nkey_env = \"ONE\"\nrpm = 1\n{}",
            node("a", &v1(&upstream), "k", "")
        ),
        &[("ONE", "sk-one-per-minute")],
    )
    .await;
    assert_eq!(
        ask_as(&gw, "sk-one-per-minute", "gpt-4o-mini", 5).await.0,
        200
    );
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .bearer_auth("sk-one-per-minute")
        .body(format!(
            "{{\"model\":\"gpt-4o-mini\",\"messages\":[{}",
            "0,".repeat(100_000)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429, "not 400: the body was never parsed");
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "client_rate_limit_exceeded");
}

/// 4. An idle connection is closed after `server.header_read_timeout`, and
/// no more than `server.max_connections` are open: a newcomer is served
/// once an idle one has gone.
#[tokio::test]
async fn idle_connections_are_closed_and_their_number_is_capped() {
    let upstream = chat_upstream().await;
    let gw = Gateway::start(&format!(
        "[server]\nheader_read_timeout = \"500ms\"\nmax_connections = 2\n{}",
        node("a", &v1(&upstream), "k", "")
    ))
    .await;
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    let newcomer = tokio::spawn(async move {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        (answer, tokio::time::Instant::now())
    });
    let mut closed_at = Vec::new();
    for mut stream in idle {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("the idle connection was closed within 10 s");
        assert_eq!(read.unwrap(), 0, "closed, not answered");
        closed_at.push(tokio::time::Instant::now());
    }
    let (answer, answered_at) = newcomer.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let first_closed = closed_at.iter().min().unwrap();
    assert!(
        *first_closed <= answered_at,
        "served only once a slot was free"
    );
}

/// 4b. The gateway tells HTTP/1 from HTTP/2 by a client's first bytes:
/// a client that speaks HTTP/2 with prior knowledge is served, and so is an
/// HTTP/1 request whose first byte arrives alone (`P` may begin either).
#[tokio::test]
async fn http2_with_prior_knowledge_and_a_split_http1_head_are_both_served() {
    let upstream = chat_upstream().await;
    let gw = Gateway::start(&node("a", &v1(&upstream), "k", "")).await;

    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut h2, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let driven = tokio::spawn(connection);
    let request = hyper::Request::get(gw.url("/healthz"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let answer = h2.send_request(request).await.unwrap();
    assert_eq!(answer.version(), hyper::Version::HTTP_2);
    assert_eq!(answer.status(), 200);
    drop(h2);
    driven.await.unwrap().unwrap();

    let body = chat("gpt-4o-mini", "split", 5);
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(b"P").await.unwrap();
    stream.flush().await.unwrap();
    let rest = format!(
        "OST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nauthorization: Bearer {CLIENT_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// 5. A client that stops reading its stream is cut at
/// `server.request_timeout`, and its node's slot is released.
#[tokio::test]
async fn a_client_that_stops_reading_a_stream_frees_its_slot_at_the_deadline() {
    let endless = "data: {\"choices\":[{\"delta\":{\"content\":\"word \"}}]}\n\n".repeat(800_000);
    let upstream =
        answering(ResponseTemplate::new(200).set_body_raw(endless, "text/event-stream")).await;
    let gw = Gateway::start(&format!(
        "[server]\nrequest_timeout = \"1s\"\n{}",
        node("a", &v1(&upstream), "k", "max_concurrency = 1")
    ))
    .await;
    let body = chat("gpt-4o-mini", "stream please", 5);
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 64];
    let _ = stream.read(&mut first).await.unwrap();
    // Reads nothing more, and keeps the connection open.
    gw.until(|s| node_status(s, "a")["in_flight"] == 1).await;
    gw.until(|s| node_status(s, "a")["in_flight"] == 0).await;
    drop(stream);
}

/// 6. A model name a client makes up is no metric label.
#[tokio::test]
async fn made_up_model_names_never_become_metric_labels() {
    let upstream = chat_upstream().await;
    let gw = Gateway::start(&node("any", &v1(&upstream), "k", "")).await;
    let made_up = format!("made-up-{}", "x".repeat(200));
    assert_eq!(ask_as(&gw, CLIENT_KEY, &made_up, 5).await.0, 200);
    let scrape = get_text(gw.url("/metrics"), None).await;
    assert!(
        !scrape.contains("made-up-"),
        "a client's name became a label"
    );
    assert!(scrape.contains("model=\"other\""), "{scrape}");
}

/// 7. A usage row the store refuses (a NUL byte PostgreSQL will not take)
/// is dropped and counted; the rest is written, and the writer goes on.
#[tokio::test]
async fn a_usage_row_the_store_refuses_is_dropped_not_retried_for_ever() {
    use balancer::ledger::{Entry, channel};
    use balancer::store::{Store, UsageTotals};
    use secrecy::SecretString;
    let url = SecretString::from(crate::pg::fresh_database().await);
    let store = Store::open(&url, std::path::Path::new(".")).await.unwrap();
    let (ledger, writer) = channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(writer.run(store.clone(), Duration::from_secs(3600), stop.clone()));
    let one = UsageTotals {
        requests: 1,
        prompt_tokens: 5,
        ..UsageTotals::default()
    };
    for model in ["good-model", "bad\0model"] {
        ledger.record(Entry {
            client_id: "cl_x".into(),
            model: model.to_owned(),
            totals: one,
        });
    }
    ledger
        .flush()
        .await
        .expect("the writer wrote what it could");
    assert_eq!(ledger.dropped(), 1);
    let rows = store
        .usage("cl_x", "1970-01-01", "9999-12-31")
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].model, "good-model");
    // Later usage is still written.
    ledger.record(Entry {
        client_id: "cl_x".into(),
        model: "good-model".to_owned(),
        totals: one,
    });
    ledger.flush().await.unwrap();
    let rows = store
        .usage("cl_x", "1970-01-01", "9999-12-31")
        .await
        .unwrap();
    assert_eq!(rows[0].totals.requests, 2);
    stop.cancel();
    task.await.unwrap();
}

/// 8. A `max_tokens` far past any quota neither breaks the shared-limits
/// script nor marks Redis down.
#[tokio::test]
async fn a_huge_max_tokens_never_marks_redis_down() {
    let redis = crate::redis::RedisServer::start();
    let upstream = chat_upstream().await;
    let gw = Gateway::start(&format!(
        "[cluster]\nredis_url = \"{}\"\ntimeout = \"5s\"\non_redis_error = \"reject\"\n{}",
        redis.url(),
        node("a", &v1(&upstream), "k", "rpm = 100")
    ))
    .await;
    gw.until(|s| s["cluster"]["redis"] == "up").await;
    let huge = json!({"model": "gpt-4o-mini", "max_tokens": 100_000_000_000_000_000u64,
                      "messages": [{"role": "user", "content": "hi"}]});
    let response = say(&gw, huge.to_string()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(gw.status().await["cluster"]["redis"], "up");
    assert_eq!(ask_as(&gw, CLIENT_KEY, "gpt-4o-mini", 5).await.0, 200);
}

/// 9. A typo on a secret's line is reported by line and column; the line
/// itself (the key) appears nowhere.
#[tokio::test]
async fn a_typo_on_a_secret_line_never_shows_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("Balancer.toml");
    let good = node("a", "http://127.0.0.1:9/v1", "sk-first-key", "");
    std::fs::write(&config, &good).unwrap();
    let gw = Gateway::start_file(&config, &[]).await;
    let typo = good.replace(
        "api_key = \"sk-first-key\"",
        "api_key = \"sk-typo-secret-0123456789",
    );
    std::fs::write(&config, typo).unwrap();
    let status = gw.reloaded(1).await;
    let error = status["config"]["last_reload"]["error"].as_str().unwrap();
    assert!(error.contains("line 4"), "{error}");
    assert!(!status.to_string().contains("sk-typo-secret"), "{status}");
}

/// 10. Rate-limit headers no real service sends (negative, astronomical)
/// are ignored or clamped: the client gets its answer.
#[tokio::test]
async fn absurd_upstream_rate_limit_headers_are_answered_not_panicked() {
    let headers = [
        ("x-ratelimit-remaining-tokens", "5"),
        ("x-ratelimit-reset-tokens", "-1s"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", "10000000000000000000s"),
    ];
    let mut ok = ResponseTemplate::new(200).set_body_json(chat_answer(5, 2));
    for (name, value) in headers {
        ok = ok.insert_header(name, value);
    }
    let limited = ResponseTemplate::new(429)
        .insert_header("retry-after", "1e300")
        .set_body_json(json!({"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}));
    let a = answering(ok).await;
    let b = answering(limited).await;
    let gw = Gateway::start(&format!("{FAST}{}", node("a", &v1(&a), "k", ""))).await;
    assert_eq!(ask_as(&gw, CLIENT_KEY, "gpt-4o-mini", 5).await.0, 200);
    let gw = Gateway::start(&format!(
        "{FAST}[retry]\nattempts = 0\n{}",
        node("b", &v1(&b), "k", "")
    ))
    .await;
    assert_eq!(ask_as(&gw, CLIENT_KEY, "gpt-4o-mini", 5).await.0, 429);
    let status = gw.status().await;
    let rest = node_status(&status, "b")["cooldown_remaining_ms"]
        .as_u64()
        .unwrap();
    assert!(rest <= 86_400_000, "a day at most, not {rest} ms");
}

/// 11. A `max_tokens` that would wrap the reservation around is as large
/// as it says: too large for the node.
#[tokio::test]
async fn a_max_tokens_that_would_wrap_is_refused_as_too_large() {
    let upstream = chat_upstream().await;
    let gw = Gateway::start(&node("a", &v1(&upstream), "k", "tpm = 1000")).await;
    let (status, _, body) = ask_as(&gw, CLIENT_KEY, "gpt-4o-mini", u64::MAX).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("request_too_large"))
    );
    assert!(upstream.received_requests().await.unwrap().is_empty());
}

/// 13. The admin API refuses a bucket that would refill once in an age.
#[tokio::test]
async fn a_bucket_rate_too_small_is_refused_by_the_admin_api() {
    let upstream = chat_upstream().await;
    let gw = Gateway::start(&format!(
        "[admin]\ntoken_env = \"TEST_ADMIN_TOKEN\"\n{}",
        node("a", &v1(&upstream), "k", "")
    ))
    .await;
    let response = send_json(
        gw.admin_url("/admin/clients"),
        Some(ADMIN_TOKEN),
        json!({"name": "glacial", "burst": 1, "rate_per_second": 1e-300}).to_string(),
    )
    .await;
    assert_eq!(response.status(), 400);
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["param"], "rate_per_second");
}

/// 15. A reload that would open a gateway that requires keys is refused.
#[tokio::test]
async fn a_reload_that_would_open_the_gateway_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("Balancer.toml");
    let upstream = chat_upstream().await;
    let nodes = node("a", &v1(&upstream), "k", "");
    std::fs::write(
        &config,
        format!("[auth]\nclient_keys_env = [\"TEST_CLIENT_KEY\"]\n{nodes}"),
    )
    .unwrap();
    let gw = Gateway::start_file(&config, &[]).await;
    std::fs::write(&config, &nodes).unwrap();
    let status = gw.reloaded(1).await;
    assert_eq!(status["config"]["last_reload"]["ok"], false);
    let error = status["config"]["last_reload"]["error"].as_str().unwrap();
    assert!(error.contains("lets anyone in"), "{error}");
    let anonymous = send_json(
        gw.url("/v1/chat/completions"),
        None,
        chat("gpt-4o-mini", "hi", 5),
    )
    .await;
    assert_eq!(anonymous.status(), 401);
}

/// 16. A client's `OpenAI-Organization` and `OpenAI-Project` never reach
/// the upstream; a node's own do.
#[tokio::test]
async fn a_client_cannot_pick_which_organisation_a_key_bills() {
    let upstream = chat_upstream().await;
    let gw = Gateway::start(&format!(
        "{}{}",
        node(
            "own",
            &v1(&upstream),
            "k",
            "models = [\"gpt-4o\"]\norganization = \"org-ours\""
        ),
        node("plain", &v1(&upstream), "k", "models = [\"gpt-4o-mini\"]"),
    ))
    .await;
    for model in ["gpt-4o", "gpt-4o-mini"] {
        let response = client()
            .post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("openai-organization", "org-not-mine")
            .header("openai-project", "proj-not-mine")
            .body(chat(model, "hi", 5))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let received = upstream.received_requests().await.unwrap();
    let orgs: Vec<Option<&str>> = received
        .iter()
        .map(|r| {
            r.headers
                .get("openai-organization")
                .and_then(|v| v.to_str().ok())
        })
        .collect();
    assert_eq!(orgs, [Some("org-ours"), None]);
    assert!(
        received
            .iter()
            .all(|r| !r.headers.contains_key("openai-project"))
    );
}

/// 17. A file written all the time beside the config (a log) neither
/// starts nor delays a reload.
#[tokio::test]
async fn a_busy_neighbour_file_does_not_hold_up_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("Balancer.toml");
    std::fs::write(&config, node("a", "http://127.0.0.1:9/v1", "k", "rpm = 10")).unwrap();
    let gw = Gateway::start_file(&config, &[]).await;
    let neighbour = dir.path().join("gateway.log");
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut line = 0u64;
            while !stop.is_cancelled() {
                line += 1;
                std::fs::write(&neighbour, format!("line {line}\n")).unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    std::fs::write(&config, node("a", "http://127.0.0.1:9/v1", "k", "rpm = 20")).unwrap();
    let status = gw.reloaded(1).await;
    assert_eq!(status["config"]["last_reload"]["ok"], true);
    assert_eq!(node_status(&status, "a")["limits"]["rpm"]["limit"], 20);
    stop.cancel();
    writer.await.unwrap();
}

/// 18. An empty body is no JSON: `invalid_json`, not `missing_model`.
#[tokio::test]
async fn an_empty_json_body_is_invalid_json() {
    let upstream = chat_upstream().await;
    let gw = Gateway::start(&node("a", &v1(&upstream), "k", "")).await;
    for endpoint in ["/v1/chat/completions", "/v1/embeddings"] {
        let response = client()
            .post(gw.url(endpoint))
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "invalid_json", "{endpoint}");
    }
}
