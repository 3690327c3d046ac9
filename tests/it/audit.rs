//! The outside audit's second round, on routes, headers, reloads and
//! stored objects: a node moved by a reload, `/v1x` and `%00`, account
//! headers, multipart `model`, `Retry-After` caps, the dashboard's policy,
//! the record store down and list amplification. One test per finding,
//! named by it (the wire's and money's are in `audit_wire` and
//! `audit_money`).

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::{any, header};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{
    Gateway, answering, chat, chat_answer, chat_upstream, client, node, node_status, say,
    send_json, v1,
};

/// N17: a reload that moves a node to another host (new URL, new key)
/// sends every later request to the new host only.
#[tokio::test]
async fn n17_a_node_moved_by_a_reload_reaches_only_its_new_host() {
    let old_host = MockServer::start().await;
    let new_host = MockServer::start().await;
    for (server, key) in [(&old_host, "sk-old"), (&new_host, "sk-new")] {
        Mock::given(header("authorization", format!("Bearer {key}").as_str()))
            .respond_with(ResponseTemplate::new(200).set_body_json(chat_answer(5, 2)))
            .with_priority(1)
            .mount(server)
            .await;
        Mock::given(any())
            .respond_with(ResponseTemplate::new(401))
            .mount(server)
            .await;
    }
    let gw = Gateway::start_file_text(&node("m", &v1(&old_host), "sk-old", ""), &[]).await;
    assert_eq!(
        say(&gw, chat("gpt-4o-mini", "before", 5)).await.status(),
        200
    );
    std::fs::write(gw.config_path(), node("m", &v1(&new_host), "sk-new", "")).unwrap();
    gw.reloaded(1).await;
    let posts = async |server: &MockServer| {
        let requests = server.received_requests().await.unwrap();
        requests
            .iter()
            .filter(|r| r.method.as_str() == "POST")
            .count()
    };
    let on_old = posts(&old_host).await;
    for _ in 0..3 {
        assert_eq!(
            say(&gw, chat("gpt-4o-mini", "after", 5)).await.status(),
            200
        );
    }
    assert_eq!(
        posts(&old_host).await,
        on_old,
        "nothing more to the old host"
    );
    assert_eq!(posts(&new_host).await, 3);
}

/// N11: `/openai/v1x/...` is no `/v1` path, and `%00` is no path at all.
#[tokio::test]
async fn n11_a_v1x_prefix_and_encoded_nul_are_refused() {
    let upstream = chat_upstream().await;
    let gw = Gateway::start(&node("a", &v1(&upstream), "k", "")).await;
    let cases = [
        ("/openai/v1x/chat/completions", 404, "unknown_url"),
        ("/v1/files%00", 400, "invalid_path"),
        ("/v1/files/file-1%00/content", 400, "invalid_path"),
        ("/openai/v1/chat%1f/completions", 400, "invalid_path"),
    ];
    for (path, status, code) in cases {
        let response = send_json(gw.url(path), None, chat("gpt-4o-mini", "x", 5)).await;
        assert_eq!(response.status(), status, "{path}");
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], code, "{path}");
    }
    assert_eq!(upstream.received_requests().await.unwrap().len(), 0);
}

/// s4: the node's organisation, project and cookies never reach a client.
#[tokio::test]
async fn s4_account_headers_are_not_relayed() {
    let upstream = answering(
        ResponseTemplate::new(200)
            .set_body_json(chat_answer(5, 2))
            .insert_header("openai-organization", "org-secret")
            .insert_header("openai-project", "proj_secret")
            .insert_header("set-cookie", "__cf_bm=abc; path=/")
            .insert_header("x-request-id", "req_1"),
    )
    .await;
    let gw = Gateway::start(&node("a", &v1(&upstream), "k", "")).await;
    let response = say(&gw, chat("gpt-4o-mini", "x", 5)).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    for name in ["openai-organization", "openai-project", "set-cookie"] {
        assert!(headers.get(name).is_none(), "{name} relayed");
    }
    assert_eq!(headers["x-request-id"], "req_1");
}

/// N12: a multipart form that gives `model` twice, or names a field in the
/// extended form, is refused.
#[tokio::test]
async fn n12_a_repeated_or_encoded_multipart_model_is_refused() {
    let upstream = answering(ResponseTemplate::new(200).set_body_json(json!({"text": "hi"}))).await;
    let gw = Gateway::start(&node("a", &v1(&upstream), "k", "")).await;
    let field = |disposition: &str, value: &str| {
        format!("--XyZ\r\nContent-Disposition: form-data; {disposition}\r\n\r\n{value}\r\n")
    };
    let file = "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n";
    let bodies = [
        format!(
            "{}{}{file}--XyZ--\r\n",
            field("name=\"model\"", "whisper-1"),
            field("name=\"model\"", "gpt-4o-transcribe")
        ),
        format!(
            "{}{}{file}--XyZ--\r\n",
            field("name=\"model\"", "whisper-1"),
            field("name*=utf-8''model", "gpt-4o-transcribe")
        ),
    ];
    for body in bodies {
        let response = client()
            .post(gw.url("/v1/audio/transcriptions"))
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "invalid_multipart");
    }
    assert_eq!(upstream.received_requests().await.unwrap().len(), 0);
}

/// N14: `Retry-After: 1e300` rests a node for `health.max_rest` at most,
/// and a reload that moves the node ends the rest at once.
#[tokio::test]
async fn n14_an_absurd_retry_after_is_capped_and_a_moved_node_starts_fresh() {
    let refusing = answering(
        ResponseTemplate::new(429)
            .insert_header("retry-after", "1e300")
            .set_body_json(json!({"error": {"message": "slow down", "type": "rate_limit_error"}})),
    )
    .await;
    let serving = chat_upstream().await;
    let gw = Gateway::start_file_text(
        &format!(
            "[health]\nenabled = false\nmax_rest = \"2m\"\n[queue]\nmax_wait = \"0s\"\n{}",
            node("m", &v1(&refusing), "k", "")
        ),
        &[],
    )
    .await;
    let _ = say(&gw, chat("gpt-4o-mini", "x", 5)).await;
    let status = gw
        .until(|s| !node_status(s, "m")["cooldown_remaining_ms"].is_null())
        .await;
    let rest = node_status(&status, "m")["cooldown_remaining_ms"]
        .as_u64()
        .unwrap();
    assert!(rest <= 120_000, "rest {rest} ms");
    std::fs::write(
        gw.config_path(),
        format!(
            "[health]\nenabled = false\nmax_rest = \"2m\"\n[queue]\nmax_wait = \"0s\"\n{}",
            node("m", &v1(&serving), "k", "")
        ),
    )
    .unwrap();
    gw.reloaded(1).await;
    assert_eq!(say(&gw, chat("gpt-4o-mini", "y", 5)).await.status(), 200);
}

/// N15: the dashboard may not be framed and runs only its own script.
#[tokio::test]
async fn n15_the_dashboard_sends_a_content_security_policy() {
    let upstream = chat_upstream().await;
    let gw = Gateway::start(&node("a", &v1(&upstream), "k", "")).await;
    let response = client().get(gw.url("/dashboard")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    assert_eq!(headers["x-frame-options"], "DENY");
    let policy = headers["content-security-policy"].to_str().unwrap();
    for part in [
        "default-src 'none'",
        "script-src 'sha256-",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(part), "{policy}");
    }
}

/// N16: with the record store down, a request that would create an object
/// is refused with 503 before it reaches the upstream (its record would be
/// lost, and its owner could never use or delete it).
#[tokio::test]
async fn n16_creating_requests_are_refused_while_records_cannot_be_written() {
    use sqlx::Connection;
    let url = crate::pg::fresh_database().await;
    let database = url.rsplit('/').next().unwrap().to_owned();
    let admin_url = format!("{}/postgres", url.rsplit_once('/').unwrap().0);
    let mock = mock_upstreams::MockUpstream::start(
        "127.0.0.1:0".parse().unwrap(),
        mock_upstreams::MockConfig::new("sk-mock"),
    )
    .await
    .unwrap();
    let gw = Gateway::start(&format!(
        "[store]\nurl = \"{url}\"\n{}",
        node("a", &mock.base_url(), "sk-mock", "")
    ))
    .await;
    let upload = || upload_file(&gw);
    assert_eq!(upload().await.0, 200);
    let sent = mock.stats().report().requests;
    // The store goes away: no new connection, the open ones ended.
    let mut admin = sqlx::postgres::PgConnection::connect(&admin_url)
        .await
        .unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE {database} ALLOW_CONNECTIONS false"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::query(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    // A store that answered within the last second is taken as writable
    // (at most one ping a second): wait that documented second out.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (status, body) = upload().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert_eq!(
        mock.stats().report().requests,
        sent,
        "nothing sent upstream"
    );
    // Back: creating works again.
    sqlx::query(&format!("ALTER DATABASE {database} ALLOW_CONNECTIONS true"))
        .execute(&mut admin)
        .await
        .unwrap();
    assert_eq!(upload().await.0, 200);
}

/// N7: a filtered list page costs at most `limit + 1` upstream calls,
/// however many of the caller's objects the filter drops.
#[tokio::test]
async fn n7_a_filtered_list_page_costs_at_most_limit_plus_one_upstream_calls() {
    let mock = mock_upstreams::MockUpstream::start(
        "127.0.0.1:0".parse().unwrap(),
        mock_upstreams::MockConfig::new("sk-mock"),
    )
    .await
    .unwrap();
    let gw = Gateway::start(&node("a", &mock.base_url(), "sk-mock", "")).await;
    for _ in 0..12 {
        assert_eq!(upload_file(&gw).await.0, 200);
    }
    let before = mock.stats().report().requests;
    let response = client()
        .get(gw.url("/v1/files?purpose=fine-tune&limit=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let page: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(page["data"], json!([]), "{page}");
    assert_eq!(page["has_more"], true, "more records follow: {page}");
    let calls = mock.stats().report().requests - before;
    assert!(calls <= 2, "{calls} upstream calls for a page of 1");
}

/// Uploads a small batch file (no key): the status and the answer.
async fn upload_file(gw: &Gateway) -> (u16, Value) {
    let form = "--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n{}\r\n--XyZ--\r\n";
    let response = client()
        .post(gw.url("/v1/files"))
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body(form)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    (status, body)
}
