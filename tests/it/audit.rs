//! The outside audit's second round (hostile clients over HTTP/2 and slow
//! bodies, escaped keys, money without `max_tokens`, model-less requests):
//! one test per finding, named by it.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wiremock::matchers::{any, header, method};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::money::{TEAM, close, gateway, send, settled_budget};
use crate::support::{
    CLIENT_KEY, Gateway, answering, chat, chat_answer, client, node, node_status, say, v1,
};

/// An HTTP/2 (prior knowledge) connection to `gw`, driven in the
/// background: the sender, and the task that ends when the connection does.
async fn h2_connect(
    gw: &Gateway,
    stream_window: u32,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(stream_window)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    (sender, tokio::spawn(connection))
}

fn h2_get(gw: &Gateway, path: &str) -> hyper::Request<http_body_util::Full<bytes::Bytes>> {
    hyper::Request::get(gw.url(path))
        .body(http_body_util::Full::default())
        .unwrap()
}

/// N1: an HTTP/2 connection that sends only its preface and SETTINGS, and
/// one that sends one request and then nothing, are closed after
/// `server.header_read_timeout`; the gateway answers others throughout.
#[tokio::test]
async fn n1_idle_http2_connections_are_closed() {
    let upstream = answering(ResponseTemplate::new(200).set_body_json(chat_answer(5, 2))).await;
    let gw = Gateway::start(&format!(
        "[server]\nheader_read_timeout = \"500ms\"\nmax_connections = 4\n{}",
        node("a", &v1(&upstream), "k", "")
    ))
    .await;
    // Preface and SETTINGS only (the handshake), never a request.
    let (_silent, silent_done) = h2_connect(&gw, 65_535).await;
    // One request, then nothing.
    let (mut once, once_done) = h2_connect(&gw, 65_535).await;
    let answer = once.send_request(h2_get(&gw, "/healthz")).await.unwrap();
    assert_eq!(answer.status(), 200);
    drop(answer);
    for done in [silent_done, once_done] {
        tokio::time::timeout(Duration::from_secs(10), done)
            .await
            .expect("the idle HTTP/2 connection was closed within 10 s")
            .unwrap()
            .ok();
    }
    // Their slots are free: four more connections are all served.
    for _ in 0..4 {
        let (mut sender, _driven) = h2_connect(&gw, 65_535).await;
        let answer = sender.send_request(h2_get(&gw, "/healthz")).await.unwrap();
        assert_eq!(answer.status(), 200);
    }
}

/// N1 (floods): a thousand streams opened and reset at once on one
/// connection leave nothing in flight, and the gateway answers.
#[tokio::test]
async fn n1_a_flood_of_reset_http2_streams_leaves_the_gateway_serving() {
    let upstream = answering(
        ResponseTemplate::new(200)
            .set_body_json(chat_answer(5, 2))
            .set_delay(Duration::from_millis(200)),
    )
    .await;
    let gw = Gateway::start(&node("a", &v1(&upstream), "k", "")).await;
    let (mut sender, _driven) = h2_connect(&gw, 65_535).await;
    let body = chat("gpt-4o-mini", "flood", 5);
    for _ in 0..1_000 {
        let request = hyper::Request::post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
            .unwrap();
        let Ok(()) = futures_util::future::poll_fn(|cx| sender.poll_ready(cx)).await else {
            break;
        };
        // Sent, then dropped at once: the stream is reset.
        drop(sender.send_request(request));
    }
    gw.until(|s| node_status(s, "a")["in_flight"] == 0).await;
    assert_eq!(
        say(&gw, chat("gpt-4o-mini", "after", 5)).await.status(),
        200
    );
}

/// 5 (HTTP/2): a client that stops reading a stream (its window at 0)
/// frees its node's slot by `server.request_timeout` + `write_timeout`.
#[tokio::test]
async fn an_http2_client_that_stops_reading_frees_its_slot() {
    let endless = "data: {\"choices\":[{\"delta\":{\"content\":\"word \"}}]}\n\n".repeat(800_000);
    let upstream =
        answering(ResponseTemplate::new(200).set_body_raw(endless, "text/event-stream")).await;
    let gw = Gateway::start(&format!(
        "[server]\nrequest_timeout = \"1s\"\nwrite_timeout = \"1s\"\n{}",
        node("a", &v1(&upstream), "k", "max_concurrency = 1")
    ))
    .await;
    // A 1-byte window: the answer's head arrives, its body cannot.
    let (mut sender, _driven) = h2_connect(&gw, 1).await;
    let request = hyper::Request::post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(chat(
            "gpt-4o-mini",
            "stream please",
            5,
        ))))
        .unwrap();
    let answer = sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), 200);
    gw.until(|s| node_status(s, "a")["in_flight"] == 1).await;
    // Never read; the connection stays open. The slot comes back.
    gw.until(|s| node_status(s, "a")["in_flight"] == 0).await;
    drop(answer);
}

/// Writes an HTTP/1.1 POST head declaring `length` body bytes, then `first`.
async fn trickle_start(gw: &Gateway, key: &str, length: usize, first: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    stream
}

/// N2: a body that stalls for `server.body_read_timeout` is answered 408
/// and its connection closed; while it was being read it counted against
/// its client's `max_concurrency`.
#[tokio::test]
async fn n2_a_stalled_body_is_answered_408_and_counts_against_concurrency() {
    let upstream = answering(ResponseTemplate::new(200).set_body_json(chat_answer(5, 2))).await;
    let gw = Gateway::start_file_text(
        &format!(
            "[server]\nbody_read_timeout = \"1s\"\n[[clients]]\nname = \"slow\"\nkey_env = \"SLOW\"\nmax_concurrency = 1\n{}",
            node("a", &v1(&upstream), "k", "")
        ),
        &[("SLOW", "sk-slow-client")],
    )
    .await;
    let mut trickling = trickle_start(&gw, "sk-slow-client", 200, b"{").await;
    // While its body is being read, the client has no second place.
    let second = ask_as_slow(&gw).await;
    assert_eq!(
        second, 429,
        "the body being read holds the client's one place"
    );
    let mut answer = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        trickling.read_to_string(&mut answer),
    )
    .await
    .expect("answered and closed within 10 s")
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert_eq!(upstream.received_requests().await.unwrap().len(), 0);
    // Its place is back.
    assert_eq!(ask_as_slow(&gw).await, 200);
}

async fn ask_as_slow(gw: &Gateway) -> u16 {
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("sk-slow-client")
        .header("content-type", "application/json")
        .body(chat("gpt-4o-mini", "hi", 5))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// N2: a body that trickles a byte at a time, never stalling for the
/// stall timeout, is still cut at `server.request_timeout`.
#[tokio::test]
async fn n2_a_trickling_body_ends_at_the_request_timeout() {
    let upstream = answering(ResponseTemplate::new(200).set_body_json(chat_answer(5, 2))).await;
    let gw = Gateway::start(&format!(
        "[server]\nrequest_timeout = \"1s\"\nbody_read_timeout = \"5s\"\n{}",
        node("a", &v1(&upstream), "k", "")
    ))
    .await;
    let mut stream = trickle_start(&gw, CLIENT_KEY, 1_000, b"{").await;
    let started = tokio::time::Instant::now();
    let mut answer = Vec::new();
    loop {
        let mut byte = [0_u8; 512];
        tokio::select! {
            read = stream.read(&mut byte) => {
                let n = read.unwrap();
                if n == 0 { break; }
                answer.extend_from_slice(&byte[..n]);
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                // One more byte, far within the stall timeout.
                if stream.write_all(b" ").await.is_err() { break; }
            }
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never cut");
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

/// Answers a chat request with as many completion tokens as it allows:
/// its `max_completion_tokens` (or `max_tokens`), else 300,000.
struct AsMuchAsAllowed;

impl Respond for AsMuchAsAllowed {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let allowed = body["max_completion_tokens"]
            .as_u64()
            .or(body["max_tokens"].as_u64())
            .unwrap_or(300_000);
        ResponseTemplate::new(200).set_body_json(chat_answer(5, allowed))
    }
}

/// N4: a budgeted client's requests without `max_tokens` are sent bounded
/// by the completion held for them, so an upstream that answers as much as
/// it may never takes spend past the budget.
#[tokio::test]
async fn n4_requests_without_max_tokens_never_spend_past_the_budget() {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(AsMuchAsAllowed)
        .mount(&upstream)
        .await;
    // Each request holds 1,024 completion tokens at $2/M (~$0.00205).
    let gw = gateway(
        &v1(&upstream),
        "budget_usd = 0.01\nbudget_period = \"day\"",
        "",
    )
    .await;
    let mut served = 0;
    for _ in 0..10 {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let (status, _, error) = send(&gw, "/v1/chat/completions", body.to_string()).await;
        match status {
            200 => served += 1,
            429 | 403 => assert!(
                error["error"]["code"] == "budget_exceeded"
                    || error["error"]["code"] == "budget_exhausted",
                "{error}"
            ),
            other => panic!("{other}: {error}"),
        }
    }
    assert!(served >= 1, "some requests fit the budget");
    for request in upstream.received_requests().await.unwrap() {
        let sent: Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(sent["max_completion_tokens"], 1024, "{sent}");
    }
    let budget = settled_budget(&gw).await;
    let spent = budget["spent_usd"].as_f64().unwrap();
    assert!(
        spent <= 0.01 || close(spent, 0.01),
        "spent {spent}: {budget}"
    );
    // A max_tokens the upstream reads otherwise (null) is refused.
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": null});
    let (status, _, error) = send(&gw, "/v1/chat/completions", body.to_string()).await;
    assert_eq!(status, 400, "{error}");
    // With the key sending `max_completion_tokens` itself, it is left alone.
    let explicit = chat("m", "hi", 3);
    let before = upstream.received_requests().await.unwrap().len();
    let (status, _, _) = send(&gw, "/v1/chat/completions", explicit.clone()).await;
    if status == 200 {
        let requests = upstream.received_requests().await.unwrap();
        assert_eq!(requests.len(), before + 1);
        assert_eq!(requests[before].body, explicit.as_bytes());
    }
}

/// N5: with the budget spent, model-less image requests are held against it
/// (as the Images API's default model) and refused; a key limited to one
/// model cannot reach another with a model-less request or a session's
/// nested model; client secrets are refused; evals and videos are not
/// served. Nothing reaches the upstream.
#[tokio::test]
async fn n5_model_less_and_nested_model_requests_are_checked() {
    let upstream = answering(ResponseTemplate::new(200).set_body_json(json!({"data": []}))).await;
    let gw = Gateway::start_file_text(
        &format!(
            "[[clients]]\nname = \"limited\"\nkey_env = \"LIMITED\"\nmodels = [\"gpt-4o-mini\"]\n{}",
            node("a", &v1(&upstream), "k", "")
        ),
        &[("LIMITED", "sk-limited")],
    )
    .await;
    let post = |path: &'static str, body: Value| {
        let gw = &gw;
        async move {
            let response = client()
                .post(gw.url(path))
                .bearer_auth("sk-limited")
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: Value =
                serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null);
            (
                status,
                body["error"]["code"].as_str().unwrap_or("").to_owned(),
            )
        }
    };
    let cases = [
        (
            "/v1/images/generations",
            json!({"prompt": "a cat"}),
            403,
            "model_not_allowed",
        ),
        (
            "/v1/realtime/client_secrets",
            json!({"session": {"type": "realtime", "model": "gpt-realtime"}}),
            403,
            "not_allowed",
        ),
        (
            "/v1/evals",
            json!({"name": "e"}),
            404,
            "endpoint_not_served",
        ),
        (
            "/v1/evals/eval_1/runs",
            json!({}),
            404,
            "endpoint_not_served",
        ),
        (
            "/v1/videos",
            json!({"prompt": "a cat"}),
            404,
            "endpoint_not_served",
        ),
        (
            "/v1/batches",
            json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}),
            400,
            "model_required",
        ),
    ];
    for (path, body, status, code) in cases {
        assert_eq!(post(path, body).await, (status, code.to_owned()), "{path}");
    }
    assert_eq!(upstream.received_requests().await.unwrap().len(), 0);
    // GETs of evals and videos are refused the same way.
    for path in ["/v1/evals", "/v1/videos/video_1"] {
        let response = client()
            .get(gw.url(path))
            .bearer_auth("sk-limited")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    assert_eq!(upstream.received_requests().await.unwrap().len(), 0);
}

/// N5: with client secrets allowed, a session's nested model is the
/// request's model: a key limited to another model is refused it.
#[tokio::test]
async fn n5_a_sessions_nested_model_is_checked_when_client_secrets_are_allowed() {
    let upstream =
        answering(ResponseTemplate::new(200).set_body_json(json!({"value": "ek_1"}))).await;
    let gw = Gateway::start_file_text(
        &format!(
            "[server]\nrealtime_ephemeral_keys = true\n[[clients]]\nname = \"limited\"\nkey_env = \"LIMITED\"\nmodels = [\"gpt-4o-mini\"]\n{}",
            node("a", &v1(&upstream), "k", "")
        ),
        &[("LIMITED", "sk-limited")],
    )
    .await;
    let response = client()
        .post(gw.url("/v1/realtime/client_secrets"))
        .bearer_auth("sk-limited")
        .header("content-type", "application/json")
        .body(json!({"session": {"type": "realtime", "model": "gpt-realtime"}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(upstream.received_requests().await.unwrap().len(), 0);
}

/// N5: a model-less image request from a budgeted key is priced as the
/// Images API's default model: unpriced, it is refused, not let through.
#[tokio::test]
async fn n5_a_model_less_image_request_is_held_against_the_budget() {
    let upstream = answering(ResponseTemplate::new(200).set_body_json(json!({"data": []}))).await;
    let gw = gateway(
        &v1(&upstream),
        "budget_usd = 1\nbudget_period = \"day\"",
        "",
    )
    .await;
    let body = json!({"prompt": "a cat"}).to_string();
    let (status, _, error) = send(&gw, "/v1/images/generations", body).await;
    assert_eq!(
        status, 404,
        "dall-e-2 is not among the node's models: {error}"
    );
    assert_eq!(upstream.received_requests().await.unwrap().len(), 0);
    let _ = TEAM;
}

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
    let upstream = answering(ResponseTemplate::new(200).set_body_json(chat_answer(5, 2))).await;
    let gw = Gateway::start(&node("a", &v1(&upstream), "k", "")).await;
    let cases = [
        ("/openai/v1x/chat/completions", 404, "unknown_url"),
        ("/v1/files%00", 400, "invalid_path"),
        ("/v1/files/file-1%00/content", 400, "invalid_path"),
        ("/openai/v1/chat%1f/completions", 400, "invalid_path"),
    ];
    for (path, status, code) in cases {
        let response = client()
            .post(gw.url(path))
            .header("content-type", "application/json")
            .body(chat("gpt-4o-mini", "x", 5))
            .send()
            .await
            .unwrap();
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
    let serving = answering(ResponseTemplate::new(200).set_body_json(chat_answer(5, 2))).await;
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
    let upstream = answering(ResponseTemplate::new(200).set_body_json(chat_answer(5, 2))).await;
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
    let upload = || async {
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
    };
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
    let form = "--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n{}\r\n--XyZ--\r\n";
    for _ in 0..12 {
        let response = client()
            .post(gw.url("/v1/files"))
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
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

/// s3: without the admin token (and `[status] public` off, the default),
/// `/status` and `/metrics` show node health and use, not the clients,
/// their budgets or the nodes' URLs; with the token, everything.
#[tokio::test]
async fn s3_clients_budgets_and_node_urls_need_the_admin_token() {
    let upstream = answering(ResponseTemplate::new(200).set_body_json(chat_answer(5, 2))).await;
    let gw = gateway(
        &v1(&upstream),
        "budget_usd = 1\nbudget_period = \"day\"",
        "",
    )
    .await;
    let (status, _, _) = send(&gw, "/v1/chat/completions", chat("m", "hi", 5)).await;
    assert_eq!(status, 200);
    let public: Value = serde_json::from_slice(
        &client()
            .get(gw.url("/status"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(public["budgets"].is_null(), "{public}");
    assert!(public["nodes"][0]["url"].is_null(), "{public}");
    assert_eq!(public["nodes"][0]["name"], "a");
    let full = gw.status().await;
    assert_eq!(full["budgets"][0]["name"], "team", "{full}");
    assert!(
        full["nodes"][0]["url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1")
    );
    let scrape = |token: Option<&'static str>| {
        let gw = &gw;
        async move {
            let mut request = client().get(gw.url("/metrics"));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            request.send().await.unwrap().text().await.unwrap()
        }
    };
    let public = scrape(None).await;
    assert!(public.contains("balancer_requests_total"));
    assert!(
        !public.contains("cfg_team") && !public.contains("balancer_client_requests"),
        "{public}"
    );
    let wrong = scrape(Some("not-the-admin-token-at-all")).await;
    assert!(!wrong.contains("cfg_team"));
    let full = scrape(Some(crate::support::ADMIN_TOKEN)).await;
    assert!(
        full.contains("balancer_client_requests_total{client=\"cfg_team\""),
        "{full}"
    );
}

/// N8: requests waiting for budget count in `queue.max_depth_per_client`:
/// past it, a client's next request is refused at once.
#[tokio::test]
async fn n8_budget_waiters_count_in_the_clients_queue_depth() {
    let upstream = answering(
        ResponseTemplate::new(200)
            .set_body_json(chat_answer(5, 2))
            .set_delay(Duration::from_secs(20)),
    )
    .await;
    // The budget holds one worst case ($0.002008) and a little more.
    let toml = format!(
        "[queue]\nmax_wait = \"30s\"\nmax_depth_per_client = 2\n{}\
         [[clients]]\nname = \"team\"\nkey_env = \"TEAM\"\nbudget_usd = 0.003\nbudget_period = \"month\"\n{}",
        crate::money::PRICES,
        node("a", &v1(&upstream), "sk-upstream", "models = [\"m\"]")
    );
    let gw = Gateway::start_file_text(&toml, &[("TEAM", TEAM)]).await;
    let spawn_post = || {
        let url = gw.url("/v1/chat/completions");
        tokio::spawn(async move { post_team(&url).await })
    };
    let first = spawn_post();
    gw.until(|s| node_status(s, "a")["in_flight"] == 1).await;
    let waiting = [spawn_post(), spawn_post()];
    gw.until(|s| s["queue"]["budget_waiting"] == 2).await;
    // A third waiter would pass the client's depth: refused at once, while
    // the first is still in flight.
    let (status, code) = post_team(&gw.url("/v1/chat/completions")).await;
    assert_eq!((status, code.as_str()), (429, "budget_exceeded"));
    assert!(!first.is_finished(), "refused before the first answer came");
    let status = gw.status().await;
    assert_eq!(node_status(&status, "a")["in_flight"], 1);
    assert_eq!(status["queue"]["budget_waiting"], 2);
    first.abort();
    for waiter in waiting {
        waiter.abort();
    }
    gw.until(|s| s["queue"]["budget_waiting"] == 0).await;
}

async fn post_team(url: &str) -> (u16, String) {
    let response = client()
        .post(url)
        .bearer_auth(TEAM)
        .header("content-type", "application/json")
        .body(chat("m", "hi", 1_000))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null);
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

/// N8: the bodies of requests in admission are bounded by
/// `queue.max_bytes`: past it a request is refused at once, not held.
#[tokio::test]
async fn n8_waiting_bodies_are_bounded_by_queue_max_bytes() {
    let upstream = answering(
        ResponseTemplate::new(200)
            .set_body_json(chat_answer(5, 2))
            .set_delay(Duration::from_secs(20)),
    )
    .await;
    let gw = Gateway::start(&format!(
        "[server]\nmax_body_bytes = 1048576\n[queue]\nmax_wait = \"30s\"\nmax_bytes = 2097152\n{}",
        node("a", &v1(&upstream), "k", "max_concurrency = 1")
    ))
    .await;
    let spawn_post = |body: String| {
        let url = gw.url("/v1/chat/completions");
        tokio::spawn(async move {
            client()
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    let first = spawn_post(chat("gpt-4o-mini", "first", 5));
    gw.until(|s| node_status(s, "a")["in_flight"] == 1).await;
    let big = chat("gpt-4o-mini", &"x ".repeat(450_000), 5);
    let waiting = [spawn_post(big.clone()), spawn_post(big.clone())];
    let held = 2 * big.len() as u64;
    gw.until(|s| s["queue"]["depth"] == 2 && s["queue"]["held_bytes"] == held)
        .await;
    let response = say(&gw, big.clone()).await;
    assert_eq!(response.status(), 429);
    assert!(!first.is_finished(), "refused before the first answer came");
    // Refused at once: the first is still in flight, two still wait.
    let status = gw.status().await;
    assert_eq!(node_status(&status, "a")["in_flight"], 1);
    assert_eq!(status["queue"]["depth"], 2);
    first.abort();
    for waiter in waiting {
        waiter.abort();
    }
    gw.until(|s| s["queue"]["held_bytes"] == 0 && node_status(s, "a")["in_flight"] == 0)
        .await;
}

/// Metrics: with nodes that list no models, a model with a price (shipped
/// or configured) is its own label in cost and request metrics; a name
/// with no price is still `other`.
#[tokio::test]
async fn a_priced_model_is_a_label_when_no_node_lists_models() {
    let upstream = answering(ResponseTemplate::new(200).set_body_json(chat_answer(5, 2))).await;
    let gw = Gateway::start(&format!(
        "[status]\npublic = true\n[prices.\"team-model\"]\ninput = 1.0\noutput = 2.0\n{}",
        node("any", &v1(&upstream), "k", "")
    ))
    .await;
    for model in ["gpt-4o-mini", "team-model", "made-up-model"] {
        assert_eq!(say(&gw, chat(model, "x", 5)).await.status(), 200);
    }
    let scrape = client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for model in ["gpt-4o-mini", "team-model"] {
        assert!(
            scrape.contains(&format!(
                "balancer_cost_usd_total{{node=\"any\",model=\"{model}\""
            )),
            "{model}: {scrape}"
        );
    }
    assert!(!scrape.contains("made-up-model"));
    assert!(scrape.contains("model=\"other\""));
}
