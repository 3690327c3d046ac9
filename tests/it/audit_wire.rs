//! The outside audit's second round, on the wire: idle and flooded HTTP/2
//! connections, a client that stops reading over HTTP/2, bodies that stall
//! or trickle, and the bound on bodies held by waiting requests. One test
//! per finding, named by it.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wiremock::ResponseTemplate;

use crate::support::{
    CLIENT_KEY, Gateway, answering, chat, chat_answer, chat_upstream, client, node, node_status,
    say, send_json, v1,
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
    let upstream = chat_upstream().await;
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
    let upstream = chat_upstream().await;
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
    send_json(
        gw.url("/v1/chat/completions"),
        Some("sk-slow-client"),
        chat("gpt-4o-mini", "hi", 5),
    )
    .await
    .status()
    .as_u16()
}

/// N2: a body that trickles a byte at a time, never stalling for the
/// stall timeout, is still cut at `server.request_timeout`.
#[tokio::test]
async fn n2_a_trickling_body_ends_at_the_request_timeout() {
    let upstream = chat_upstream().await;
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
