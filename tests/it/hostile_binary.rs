//! Hostile input against the real binary (its memory, its log lines):
//! what `hostile.rs` tries in-process, where only a separate process shows
//! the effect.

use serde_json::{Value, json};

use crate::support::{chat, chat_upstream, client, send_json, v1};

/// The real binary, with its config in a fresh directory, in front of
/// `upstream` (a base URL ending in `/v1`).
fn serve_binary(upstream: &str, extra: &str) -> (crate::cli::Served, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::cli::write_config(dir.path(), upstream, extra);
    let served = crate::cli::Served::start(&config, &[("NODE_KEY", "sk-node")]);
    (served, dir)
}

/// The peak resident memory of process `pid`, in bytes.
fn peak_rss(pid: nix::unistd::Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// 12. An upstream stream line that never ends is relayed, not kept: the
/// gateway's memory does not grow with it.
#[tokio::test]
async fn an_endless_stream_line_is_relayed_without_being_kept() {
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 128;
    // One endless line for "stream"; a small answer otherwise.
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|body: String| async move {
            let chunks = if body.contains("stream") { CHUNKS } else { 1 };
            let chunks = futures_util::stream::iter(
                (0..chunks).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; CHUNK]))),
            );
            (
                [("content-type", "text/event-stream")],
                axum::body::Body::from_stream(chunks),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}/v1", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let (served, _dir) = serve_binary(&upstream, "");
    // Warmed up (tokenizer tables loaded, buffers sized) by a small one.
    let warm_up = post_binary(&served, chat("gpt-4o-mini", "hi", 5)).await;
    assert_eq!(warm_up.bytes().await.unwrap().len(), CHUNK);
    let before = peak_rss(served.pid());
    let response = post_binary(&served, chat("gpt-4o-mini", "stream", 5)).await;
    assert_eq!(response.status(), 200);
    let mut relayed = 0;
    let mut body = response.bytes_stream();
    while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
        relayed += chunk.unwrap().len();
    }
    assert_eq!(relayed, CHUNK * CHUNKS, "relayed whole");
    let grown = peak_rss(served.pid()).saturating_sub(before);
    assert!(
        grown < 48 << 20,
        "{} MiB kept for a {} MiB line",
        grown >> 20,
        CHUNKS
    );
    server.abort();
}

async fn post_binary(served: &crate::cli::Served, body: String) -> reqwest::Response {
    send_json(served.url("/v1/chat/completions"), None, body).await
}

/// 14. A model name cannot forge a log line: one with a newline is refused
/// before anything logs it, in the body or in a path.
#[tokio::test]
async fn a_model_name_cannot_forge_a_log_line() {
    let upstream = chat_upstream().await;
    let (served, _dir) = serve_binary(&v1(&upstream), "");
    let forged = json!({"model": "x\nstatus=200 forged=yes", "messages": []}).to_string();
    let response = post_binary(&served, forged).await;
    assert_eq!(response.status(), 400);
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "invalid_model");
    let path = client()
        .get(served.url("/v1/models/x%0Astatus=200%20forged=yes"))
        .send()
        .await
        .unwrap();
    assert_eq!(path.status(), 400);
    let marker = client()
        .get(served.url("/v1/models/marker-model"))
        .send()
        .await
        .unwrap();
    assert_eq!(marker.status(), 404);
    let lines = served.lines_until("marker-model");
    assert!(
        lines
            .iter()
            .all(|l| !l.trim_start().starts_with("status=200")),
        "{lines:#?}"
    );
    // Every line is a record of its own (it starts with its timestamp).
    assert!(lines.iter().all(|l| l.starts_with("20")), "{lines:#?}");
}
