//! The mock over real HTTP on 127.0.0.1: keys, quotas and their headers,
//! faults, and `/_stats`.
#![expect(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    reason = "tests stop loudly, and spawn their own helpers"
)]

use std::time::Duration;

use mock_upstreams::{Faults, MockConfig, MockUpstream, StatsReport};
use serde_json::{Value, json};

async fn start(config: MockConfig) -> MockUpstream {
    MockUpstream::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

fn chat(stream: bool) -> Value {
    json!({
        "model": "gpt-4o-mini", "stream": stream,
        "messages": [{"role": "user", "content": "Hello there"}],
    })
}

async fn post(mock: &MockUpstream, key: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", mock.base_url()))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn stats(mock: &MockUpstream) -> StatsReport {
    reqwest::get(format!("http://{}/_stats", mock.addr()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn header<'r>(r: &'r reqwest::Response, name: &str) -> &'r str {
    r.headers().get(name).unwrap().to_str().unwrap()
}

#[tokio::test]
async fn a_wrong_key_gets_401_in_the_openai_error_shape() {
    let mock = start(MockConfig::new("sk-right")).await;
    let r = post(&mock, "sk-wrong", &chat(false)).await;
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(stats(&mock).await.unauthorized, 1);
}

#[tokio::test]
async fn every_answer_carries_rate_limit_headers_and_the_limit_is_enforced() {
    let mock = start(MockConfig::new("sk-a").quota(Some(3), Some(100_000))).await;
    for remaining in ["2", "1", "0"] {
        let r = post(&mock, "sk-a", &chat(false)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), remaining);
        assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "100000");
        assert!(header(&r, "x-ratelimit-reset-requests").ends_with('s'));
    }
    let r = post(&mock, "sk-a", &chat(false)).await;
    assert_eq!(r.status(), 429);
    // 3 rpm refill one request every 20 s.
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((19..=20).contains(&retry), "retry-after {retry}");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    let s = stats(&mock).await;
    assert_eq!((s.requests, s.served, s.rate_limited), (4, 3, 1));
    assert_eq!(s.peak_60s.requests, 3);
}

#[tokio::test]
async fn usage_counts_the_prompt_with_the_models_tokenizer() {
    let mock = start(MockConfig::new("sk-a").completion_words(5)).await;
    let body: Value = post(&mock, "sk-a", &chat(false))
        .await
        .json()
        .await
        .unwrap();
    // 3 + (3 + "user" 1 + "Hello there" 2) = 9 with o200k_base.
    assert_eq!(body["usage"]["prompt_tokens"], 9);
    assert_eq!(body["usage"]["completion_tokens"], 5);
    let s = stats(&mock).await;
    assert_eq!((s.prompt_tokens, s.completion_tokens), (9, 5));
}

#[tokio::test]
async fn stats_are_kept_per_key_without_showing_the_key() {
    let mock = start(MockConfig::new("sk-first-1111").also_accept("sk-second-2222")).await;
    post(&mock, "sk-first-1111", &chat(false)).await;
    post(&mock, "sk-second-2222", &chat(false)).await;
    post(&mock, "sk-second-2222", &chat(false)).await;
    let s = stats(&mock).await;
    assert_eq!(s.keys["sk-…1111"].requests, 1);
    assert_eq!(s.keys["sk-…2222"].requests, 2);
    let text = serde_json::to_string(&s).unwrap();
    assert!(!text.contains("sk-first") && !text.contains("sk-second"));
}

#[tokio::test]
async fn a_share_of_requests_fails_with_500_and_503() {
    let faults = Faults {
        error_500: 0.2,
        error_503: 0.1,
        ..Faults::default()
    };
    let mock = start(MockConfig::new("sk-a").faults(faults)).await;
    let mut statuses = Vec::new();
    for _ in 0..50 {
        statuses.push(post(&mock, "sk-a", &chat(false)).await.status().as_u16());
    }
    let count = |s: u16| statuses.iter().filter(|x| **x == s).count() as i64;
    // Spread evenly: within one request of each share over any run.
    assert!((count(500) - 10).abs() <= 1, "{statuses:?}");
    assert!((count(503) - 5).abs() <= 1, "{statuses:?}");
    let s = stats(&mock).await;
    assert_eq!(s.faults["500"] as i64, count(500));
    assert_eq!(s.faults["503"] as i64, count(503));
}

#[tokio::test]
async fn a_stream_cut_midway_ends_in_an_error_before_done() {
    let faults = Faults {
        close_midway: 1.0,
        ..Faults::default()
    };
    let mock = start(MockConfig::new("sk-a").faults(faults).completion_words(8)).await;
    let r = post(&mock, "sk-a", &chat(true)).await;
    assert_eq!(r.status(), 200);
    let mut body = Vec::new();
    let mut stream = r.bytes_stream();
    let mut failed = false;
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        match chunk {
            Ok(bytes) => body.extend_from_slice(&bytes),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body should end in an error");
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("data: {") && !text.contains("[DONE]"));
    assert_eq!(stats(&mock).await.streams_completed, 0);
}

#[tokio::test]
async fn a_hanging_request_never_answers_until_the_mock_stops() {
    let faults = Faults {
        hang: 1.0,
        ..Faults::default()
    };
    let mock = start(MockConfig::new("sk-a").faults(faults)).await;
    let url = format!("{}/chat/completions", mock.base_url());
    let pending = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .bearer_auth("sk-a")
            .json(&chat(false))
            .send()
            .await
    });
    // The request is accounted as hanging once the mock has seen it.
    let addr = mock.addr();
    let seen = async {
        loop {
            let s: StatsReport = reqwest::get(format!("http://{addr}/_stats"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if s.faults.get("hang") == Some(&1) {
                break;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), seen)
        .await
        .unwrap();
    assert!(!pending.is_finished());
    mock.stop().await;
    let answer = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap();
    // Stopping ends the hang: a 503 or a closed connection, never a 200.
    assert!(answer.map_or(true, |r| r.status() == 503));
}

#[tokio::test]
async fn streams_space_their_events_and_end_with_done() {
    let mock = start(
        MockConfig::new("sk-a")
            .stream_timing(Duration::from_millis(30), Duration::from_millis(10))
            .completion_words(3)
            .fixed_created(1_700_000_000),
    )
    .await;
    let mut body = json!({"model": "gpt-4o-mini", "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Hi"}]});
    let first = post(&mock, "sk-a", &body).await.text().await.unwrap();
    body["user"] = json!("again");
    let second = post(&mock, "sk-a", &body).await.text().await.unwrap();
    assert_eq!(
        first, second,
        "a fixed created makes answers byte-identical"
    );
    let events: Vec<&str> = first.split("\n\n").filter(|e| !e.is_empty()).collect();
    // role, 3 words, finish, usage, [DONE]
    assert_eq!(events.len(), 7);
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    assert!(events[5].contains("\"usage\""));
    assert_eq!(stats(&mock).await.streams_completed, 2);
}

#[tokio::test]
async fn a_json_answer_cut_midway_fails_to_read() {
    let faults = Faults {
        close_midway: 1.0,
        ..Faults::default()
    };
    let mock = start(MockConfig::new("sk-a").faults(faults)).await;
    let r = post(&mock, "sk-a", &chat(false)).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.is_err());
    assert_eq!(stats(&mock).await.faults["close"], 1);
}
