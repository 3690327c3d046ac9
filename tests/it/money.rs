//! Money: what each request costs at the configured prices (budgets, held
//! before a request goes, are in `budgets.rs`, on these helpers).
//!
//! Prices here are round numbers of the tests' own (`[prices."m"]`): $1
//! per million input tokens, $0.5 cached, $2 output; so a token of input
//! is a micro-dollar and costs are exact.

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::ResponseTemplate;

use crate::metrics::Metrics;
use crate::support::{
    ADMIN_TOKEN, Gateway, answering, chat, chat_answer, client, eventually, node, send_json, v1,
};

pub(crate) const TEAM: &str = "sk-team-money-key";
pub(crate) const PRICES: &str = "[prices.\"m\"]\ninput = 1.0\ncached_input = 0.5\noutput = 2.0\n";

/// A gateway in front of `upstream` (a base URL) with one declared client
/// `team` whose settings are `client`.
pub(crate) async fn gateway(upstream: &str, client: &str, extra: &str) -> Gateway {
    gateway_waiting(upstream, client, extra, "1s").await
}

/// [`gateway`] with `queue.max_wait` at `max_wait`.
pub(crate) async fn gateway_waiting(
    upstream: &str,
    client: &str,
    extra: &str,
    max_wait: &str,
) -> Gateway {
    let toml = format!(
        "[admin]\ntoken_env = \"TEST_ADMIN_TOKEN\"\n[queue]\nmax_wait = \"{max_wait}\"\n{PRICES}{extra}\n\
         [[clients]]\nname = \"team\"\nkey_env = \"TEAM\"\n{client}\n{}",
        node(
            "a",
            upstream,
            "sk-upstream",
            "models = [\"m\", \"unpriced-model\", \"whisper-1\"]"
        )
    );
    Gateway::start_file_text(&toml, &[("TEAM", TEAM)]).await
}

/// POSTs `body` to `path` as the team: status, `Retry-After`, JSON body.
pub(crate) async fn send(gw: &Gateway, path: &str, body: String) -> (u16, Option<u64>, Value) {
    let response = send_json(gw.url(path), Some(TEAM), body).await;
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let body = response.bytes().await.unwrap();
    (
        status,
        retry,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

pub(crate) async fn admin_get(gw: &Gateway, path: &str) -> Value {
    let response = client()
        .get(gw.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{path}");
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

/// The team's usage report total (every request that has ended).
pub(crate) async fn usage_total(gw: &Gateway) -> Value {
    admin_get(gw, "/admin/clients/cfg_team/usage").await["total"].clone()
}

/// The team's budget, once nothing of it is held in flight.
pub(crate) async fn settled_budget(gw: &Gateway) -> Value {
    let settled = eventually(Duration::from_secs(10), async || {
        let budget = admin_get(gw, "/admin/clients/cfg_team/budget").await;
        (budget["in_flight_usd"] == 0.0).then_some(budget)
    })
    .await;
    settled.expect("the budget's holds are given back")
}

/// The team's usage total after one request (`body` to `path`, answered
/// 200) through a fresh gateway whose only node answers `answer`.
async fn usage_after(answer: ResponseTemplate, path: &str, body: String) -> Value {
    let upstream = answering(answer).await;
    let gw = gateway(&v1(&upstream), "", "").await;
    let (status, _, error) = send(&gw, path, body).await;
    assert_eq!(status, 200, "{error}");
    usage_total(&gw).await
}

pub(crate) fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[tokio::test]
async fn a_json_answer_costs_its_usage_everywhere_the_cost_is_shown() {
    let upstream =
        answering(ResponseTemplate::new(200).set_body_json(chat_answer(1_000, 500))).await;
    let gw = gateway(
        &v1(&upstream),
        "budget_usd = 1.0\nbudget_period = \"day\"",
        "",
    )
    .await;
    let (status, _, _) = send(&gw, "/v1/chat/completions", chat("m", "hi", 600)).await;
    assert_eq!(status, 200);
    // 1,000 x $1/M + 500 x $2/M = $0.002.
    let total = usage_total(&gw).await;
    assert!(close(total["cost_usd"].as_f64().unwrap(), 0.002), "{total}");
    let budget = settled_budget(&gw).await;
    assert!(
        close(budget["spent_usd"].as_f64().unwrap(), 0.002),
        "{budget}"
    );
    assert!(
        close(budget["remaining_usd"].as_f64().unwrap(), 0.998),
        "{budget}"
    );
    assert_eq!(budget["budget_period"], "day");
    let m = Metrics::scrape(&gw).await;
    let labels = [("node", "a"), ("model", "m"), ("client", "cfg_team")];
    assert!(close(m.value("balancer_cost_usd_total", &labels), 0.002));
}

#[tokio::test]
async fn cached_tokens_are_priced_as_cached_and_reasoning_tokens_once_as_output() {
    // Chat: 1,000 prompt tokens of which 600 cached; 500 completion tokens
    // of which 300 reasoning (already inside the 500).
    let chat_usage = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "choices": [],
        "usage": {
            "prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500,
            "prompt_tokens_details": {"cached_tokens": 600},
            "completion_tokens_details": {"reasoning_tokens": 300},
        },
    });
    let total = usage_after(
        ResponseTemplate::new(200).set_body_json(chat_usage),
        "/v1/chat/completions",
        chat("m", "hi", 600),
    )
    .await;
    // 400 x $1/M + 600 x $0.5/M + 500 x $2/M = $0.0017.
    assert!(
        close(total["cost_usd"].as_f64().unwrap(), 0.0017),
        "{total}"
    );

    // The Responses API says it with input_/output_tokens_details.
    let response_usage = json!({
        "id": "resp_1", "object": "response", "output": [],
        "usage": {
            "input_tokens": 1000, "output_tokens": 500, "total_tokens": 1500,
            "input_tokens_details": {"cached_tokens": 600},
            "output_tokens_details": {"reasoning_tokens": 300},
        },
    });
    let body = json!({"model": "m", "input": "hi", "max_output_tokens": 600, "store": false});
    let total = usage_after(
        ResponseTemplate::new(200).set_body_json(response_usage),
        "/v1/responses",
        body.to_string(),
    )
    .await;
    assert!(
        close(total["cost_usd"].as_f64().unwrap(), 0.0017),
        "{total}"
    );
}

fn sse(events: &[Value]) -> String {
    let mut body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    body.push_str("data: [DONE]\n\n");
    body
}

#[tokio::test]
async fn a_stream_costs_its_final_usage_or_else_its_counted_text() {
    let delta = |text: &str| json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]});
    let with_usage = sse(&[
        delta("hello"),
        json!({"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}),
    ]);
    let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]});
    let streamed = |events| ResponseTemplate::new(200).set_body_raw(events, "text/event-stream");
    let total = usage_after(
        streamed(with_usage),
        "/v1/chat/completions",
        body.to_string(),
    )
    .await;
    // 10 x $1/M + 20 x $2/M.
    assert!(
        close(total["cost_usd"].as_f64().unwrap(), 0.00005),
        "{total}"
    );

    // No usage: the prompt as the gateway counted it, and the streamed
    // text counted with the model's tokenizer ("hello world": 2 tokens).
    let without = sse(&[delta("hello"), delta(" world")]);
    let total = usage_after(streamed(without), "/v1/chat/completions", body.to_string()).await;
    assert_eq!(total["completion_tokens"], 2, "{total}");
    let prompt = total["prompt_tokens"].as_f64().unwrap();
    assert!(prompt > 0.0);
    let expected = (prompt * 1.0 + 2.0 * 2.0) / 1e6;
    assert!(
        close(total["cost_usd"].as_f64().unwrap(), expected),
        "{total}"
    );
}

#[tokio::test]
async fn a_price_changed_by_reload_applies_to_the_next_request() {
    let upstream = answering(ResponseTemplate::new(200).set_body_json(chat_answer(1_000, 0))).await;
    let gw = gateway(&v1(&upstream), "", "").await;
    assert_eq!(
        send(&gw, "/v1/chat/completions", chat("m", "hi", 5))
            .await
            .0,
        200
    );
    let before = usage_total(&gw).await["cost_usd"].as_f64().unwrap();
    assert!(close(before, 0.001));
    let toml = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(gw.config_path(), toml.replace("input = 1.0", "input = 3.0")).unwrap();
    gw.reloaded(1).await;
    assert_eq!(
        send(&gw, "/v1/chat/completions", chat("m", "hi", 5))
            .await
            .0,
        200
    );
    let after = usage_total(&gw).await["cost_usd"].as_f64().unwrap();
    assert!(close(after - before, 0.003), "{before} then {after}");
}

#[tokio::test]
async fn a_transcription_billed_by_the_second_costs_its_seconds() {
    let answer = json!({"text": "hello", "usage": {"type": "duration", "seconds": 12}});
    let upstream = answering(ResponseTemplate::new(200).set_body_json(answer)).await;
    let gw = gateway(&v1(&upstream), "", "").await;
    let boundary = "balancer-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
         Content-Type: audio/wav\r\n\r\nRIFF....WAVE\r\n--{boundary}--\r\n"
    );
    let response = client()
        .post(gw.url("/v1/audio/transcriptions"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .bearer_auth(TEAM)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    // whisper-1's shipped price: $0.006 a minute; 12 s is $0.0012.
    let total = usage_total(&gw).await;
    assert!(
        close(total["cost_usd"].as_f64().unwrap(), 0.0012),
        "{total}"
    );
}
