//! The outside audit's second round, on money and models: requests without
//! `max_tokens` against a budget, model-less and nested models, budget
//! waiters in a client's queue depth, who sees clients and budgets, and
//! which models are metric labels. One test per finding, named by it.

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::money::{TEAM, close, gateway, send, settled_budget};
use crate::support::{
    Gateway, answering, chat, chat_answer, chat_upstream, client, get_text, node, node_status, say,
    send_json, v1,
};

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
    let gw = limited_gateway(&upstream, "").await;
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
        let answer = post_as(&gw, "sk-limited", path, &body).await;
        assert_eq!(answer, (status, code.to_owned()), "{path}");
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

/// A gateway in front of `upstream` whose client `limited` (key
/// `sk-limited`) may use `gpt-4o-mini` only; `settings` before it.
async fn limited_gateway(upstream: &wiremock::MockServer, settings: &str) -> Gateway {
    let toml = format!(
        "{settings}[[clients]]\nname = \"limited\"\nkey_env = \"LIMITED\"\nmodels = [\"gpt-4o-mini\"]\n{}",
        node("a", &v1(upstream), "k", "")
    );
    Gateway::start_file_text(&toml, &[("LIMITED", "sk-limited")]).await
}

/// `body` posted to `path` with `key`: the status and the error code.
async fn post_as(gw: &Gateway, key: &str, path: &str, body: &Value) -> (u16, String) {
    let response = send_json(gw.url(path), Some(key), body.to_string()).await;
    let status = response.status().as_u16();
    let body: Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
    (status, code)
}

/// N5: with client secrets allowed, a session's nested model is the
/// request's model: a key limited to another model is refused it.
#[tokio::test]
async fn n5_a_sessions_nested_model_is_checked_when_client_secrets_are_allowed() {
    let upstream =
        answering(ResponseTemplate::new(200).set_body_json(json!({"value": "ek_1"}))).await;
    let gw = limited_gateway(&upstream, "[server]\nrealtime_ephemeral_keys = true\n").await;
    let session = json!({"session": {"type": "realtime", "model": "gpt-realtime"}});
    let answer = post_as(&gw, "sk-limited", "/v1/realtime/client_secrets", &session).await;
    assert_eq!(answer, (403, "model_not_allowed".to_owned()));
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

/// s3: without the admin token (and `[status] public` off, the default),
/// `/status` and `/metrics` show node health and use, not the clients,
/// their budgets or the nodes' URLs; with the token, everything.
#[tokio::test]
async fn s3_clients_budgets_and_node_urls_need_the_admin_token() {
    let upstream = chat_upstream().await;
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
    let response = send_json(url, Some(TEAM), chat("m", "hi", 1_000)).await;
    let status = response.status().as_u16();
    let body: Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null);
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

/// Metrics: with nodes that list no models, a model with a price (shipped
/// or configured) is its own label in cost and request metrics; a name
/// with no price is still `other`.
#[tokio::test]
async fn a_priced_model_is_a_label_when_no_node_lists_models() {
    let upstream = chat_upstream().await;
    let gw = Gateway::start(&format!(
        "[status]\npublic = true\n[prices.\"team-model\"]\ninput = 1.0\noutput = 2.0\n{}",
        node("any", &v1(&upstream), "k", "")
    ))
    .await;
    for model in ["gpt-4o-mini", "team-model", "made-up-model"] {
        assert_eq!(say(&gw, chat(model, "x", 5)).await.status(), 200);
    }
    let scrape = get_text(gw.url("/metrics"), None).await;
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
