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

async fn azure_post(mock: &MockUpstream, path: &str, key: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{}{path}", mock.addr()))
        .header("api-key", key)
        .json(body)
        .send()
        .await
        .unwrap()
}

const DEPLOYMENT_CHAT: &str =
    "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21";

#[tokio::test]
async fn an_azure_mock_takes_api_key_on_deployment_paths_with_an_api_version() {
    let mock = start(MockConfig::new("az-key").azure()).await;
    // Its key in `api-key`; as a bearer token it is refused, Azure's way.
    let bearer = reqwest::Client::new()
        .post(format!("http://{}{DEPLOYMENT_CHAT}", mock.addr()))
        .bearer_auth("az-key")
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 401);
    let body: Value = bearer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "401");

    let missing_version = azure_post(
        &mock,
        "/openai/deployments/gpt-4o-mini/chat/completions",
        "az-key",
        &chat(false),
    )
    .await;
    assert_eq!(missing_version.status(), 404);
    let unknown = azure_post(
        &mock,
        "/openai/deployments/nope/chat/completions?api-version=2024-10-21",
        "az-key",
        &chat(false),
    )
    .await;
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "DeploymentNotFound");

    let r = azure_post(&mock, DEPLOYMENT_CHAT, "az-key", &chat(false)).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["model"], "gpt-4o-mini");
    // The v1 surface: no api-version, the deployment as the model.
    let v1 = azure_post(&mock, "/openai/v1/chat/completions", "az-key", &chat(false)).await;
    assert_eq!(v1.status(), 200);
    let s = stats(&mock).await;
    assert_eq!((s.unauthorized, s.served), (1, 2));
}

#[tokio::test]
async fn an_azure_mock_counts_over_ten_seconds_charges_max_tokens_at_arrival_and_sends_only_remaining()
 {
    // rpm 600 is 100 requests per 10 s; tpm 6000 is 1000 tokens per 10 s.
    let mock = start(
        MockConfig::new("az-key")
            .azure()
            .quota(Some(600), Some(6000)),
    )
    .await;
    let mut asking = chat(false);
    asking["max_tokens"] = json!(300);
    // Each takes 9 prompt + 300 asked: three fit in 1000, the fourth not.
    for remaining in ["691", "382", "73"] {
        let r = azure_post(&mock, DEPLOYMENT_CHAT, "az-key", &asking).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), remaining);
        assert!(r.headers().get("x-ratelimit-limit-tokens").is_none());
        assert!(r.headers().get("x-ratelimit-reset-tokens").is_none());
    }
    let r = azure_post(&mock, DEPLOYMENT_CHAT, "az-key", &asking).await;
    assert_eq!(r.status(), 429);
    let wait_ms: u64 = header(&r, "retry-after-ms").parse().unwrap();
    assert!(
        (9_000..=10_000).contains(&wait_ms),
        "retry-after-ms {wait_ms}"
    );
    assert!(r.headers().get("retry-after").is_some());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "429");
    let s = stats(&mock).await;
    // Charged 309 each; used 9 + 16 words each.
    assert_eq!(
        s.peak_span,
        Some((
            10_000,
            mock_upstreams::Peak {
                requests: 3,
                tokens: 927
            }
        ))
    );
    assert_eq!((s.prompt_tokens, s.completion_tokens), (27, 48));
}

#[tokio::test]
async fn an_openai_bucket_mock_holds_one_seconds_worth() {
    // rpm 60 refills one a second and holds one (a minute's bucket would
    // hold 60): a second request within the second is refused.
    let mock = start(
        MockConfig::new("sk-a")
            .quota(Some(60), None)
            .bucket_burst(Duration::from_secs(1)),
    )
    .await;
    assert_eq!(post(&mock, "sk-a", &chat(false)).await.status(), 200);
    let r = post(&mock, "sk-a", &chat(false)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "60");
    let wait_ms: u64 = header(&r, "retry-after-ms").parse().unwrap();
    assert!(wait_ms <= 1000, "retry-after-ms {wait_ms}");
}

fn responses_request(stream: bool) -> Value {
    json!({
        "model": "gpt-4o-mini", "stream": stream, "instructions": "Be brief.",
        "input": [{"role": "user", "content": "Hello there"}],
    })
}

#[tokio::test]
async fn responses_answer_with_input_and_output_tokens() {
    let mock = start(MockConfig::new("sk-a").completion_words(5)).await;
    let r = reqwest::Client::new()
        .post(format!("{}/responses", mock.base_url()))
        .bearer_auth("sk-a")
        .json(&responses_request(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "response");
    assert_eq!(
        body["output"][0]["content"][0]["text"],
        "The quick brown fox jumps"
    );
    // "Be brief." 3 + (3 + "user" 1 + "Hello there" 2) = 9 with o200k_base.
    assert_eq!(body["usage"]["input_tokens"], 9);
    assert_eq!(body["usage"]["output_tokens"], 5);
    assert_eq!(body["usage"]["total_tokens"], 14);
}

#[tokio::test]
async fn a_responses_stream_names_its_events_and_ends_with_the_usage() {
    let mock = start(MockConfig::new("sk-a").completion_words(3)).await;
    let text = reqwest::Client::new()
        .post(format!("{}/responses", mock.base_url()))
        .bearer_auth("sk-a")
        .json(&responses_request(true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<(&str, Value)> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').unwrap();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            (name.strip_prefix("event: ").unwrap(), data)
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], *name);
        assert_eq!(data["sequence_number"], i);
    }
    let last = &events.last().unwrap().1;
    assert_eq!(last["response"]["usage"]["input_tokens"], 9);
    assert_eq!(last["response"]["usage"]["output_tokens"], 3);
    assert_eq!(stats(&mock).await.streams_completed, 1);
}
