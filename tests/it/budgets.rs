//! Budgets: a request's worst-case cost is held against its client's
//! budget before it goes, given back less what it cost when it ends, and
//! shared by replicas through Redis. Prices as in `money.rs`.

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::ResponseTemplate;

use crate::money::{PRICES, TEAM, close, gateway, gateway_waiting, send, settled_budget};
use crate::redis::RedisServer;
use crate::support::{
    Gateway, answering, chat, chat_answer, chat_upstream, eventually, node, send_json, tally, v1,
};

/// An upstream whose every answer costs $0.000009 (5 tokens in, 2 out)
/// and takes `delay`.
async fn slow_upstream(delay: Duration) -> wiremock::MockServer {
    answering(
        ResponseTemplate::new(200)
            .set_body_json(chat_answer(5, 2))
            .set_delay(delay),
    )
    .await
}

/// `n` requests sent through `gw` at once, each of which may cost
/// $0.002008 (1,000 output tokens and its prompt).
async fn at_once(gw: &Gateway, n: usize) -> Vec<(u16, Option<u64>, Value)> {
    futures_util::future::join_all(
        (0..n).map(|_| send(gw, "/v1/chat/completions", chat("m", "hi", 1_000))),
    )
    .await
}

#[tokio::test]
async fn fifty_requests_at_once_against_a_budget_for_ten_admit_ten_and_spend_within_it() {
    // Each request may cost 1,000 output tokens at $2/M = $0.002 (plus its
    // prompt); the budget holds ten such worst cases and a little more.
    // The answers take 2 s: every request arrives while the first ten are
    // still in flight, however slow the machine, and the other forty wait
    // for a hold to end until queue.max_wait (1 s), then are refused.
    let upstream = slow_upstream(Duration::from_secs(2)).await;
    let gw = gateway(
        &v1(&upstream),
        "budget_usd = 0.0201\nbudget_period = \"month\"",
        "",
    )
    .await;
    let sent = at_once(&gw, 50).await;
    let statuses = tally(
        &sent
            .iter()
            .map(|(status, retry, _)| crate::support::Outcome {
                status: *status,
                retry_after: *retry,
            })
            .collect::<Vec<_>>(),
    );
    assert_eq!(statuses.get(&200), Some(&10), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&40), "{statuses:?}");
    for (status, retry, body) in &sent {
        if *status == 429 {
            assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
            assert_eq!(
                *retry,
                Some(1),
                "held by requests in flight: back in a second"
            );
        }
    }
    assert_eq!(upstream.received_requests().await.unwrap().len(), 10);
    // What they cost: 10 x (5 x $1/M + 2 x $2/M), within the budget.
    let budget = settled_budget(&gw).await;
    let spent = budget["spent_usd"].as_f64().unwrap();
    assert!(close(spent, 10.0 * 9e-6), "{budget}");
    assert!(spent <= 0.0201);
}

#[tokio::test]
async fn a_request_that_finds_its_budget_held_in_flight_waits_for_a_hold_to_end() {
    // Two worst cases ($0.002 each) fit the budget and a bit; each answer
    // costs $0.000009 and takes 1 s. The third and fourth requests find
    // the first two holding what they need, wait (counted in /status), and
    // fit once those two settle.
    let upstream = slow_upstream(Duration::from_secs(1)).await;
    let gw = gateway_waiting(
        &v1(&upstream),
        "budget_usd = 0.0046\nbudget_period = \"month\"",
        "",
        "20s",
    )
    .await;
    let (sent, _) = tokio::join!(
        at_once(&gw, 4),
        gw.until(|s| s["queue"]["budget_waiting"] == 2)
    );
    for (status, _, body) in &sent {
        assert_eq!(*status, 200, "{body}");
    }
    assert_eq!(upstream.received_requests().await.unwrap().len(), 4);
    assert_eq!(gw.status().await["queue"]["budget_waiting"], 0);
    let budget = settled_budget(&gw).await;
    assert!(
        close(budget["spent_usd"].as_f64().unwrap(), 4.0 * 9e-6),
        "{budget}"
    );
}

#[tokio::test]
async fn work_billed_after_the_answer_is_refused_to_a_budgeted_key_and_sent_for_others() {
    let upstream = answering(
        ResponseTemplate::new(200)
            .set_body_json(json!({"id": "resp_1", "object": "response", "status": "queued"})),
    )
    .await;
    let later = [
        (
            "/v1/responses",
            json!({"model": "m", "input": "hi", "background": true}),
        ),
        (
            "/v1/batches",
            json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        ),
        (
            "/v1/fine_tuning/jobs",
            json!({"model": "m", "training_file": "file-1"}),
        ),
        ("/v1/threads/runs", json!({"assistant_id": "asst_1"})),
    ];
    let budgeted = gateway(
        &v1(&upstream),
        "budget_usd = 1\nbudget_period = \"month\"",
        "",
    )
    .await;
    for (path, body) in &later {
        let (status, _, error) = send(&budgeted, path, body.to_string()).await;
        assert_eq!(status, 400, "{path}: {error}");
        assert_eq!(error["error"]["code"], "not_allowed_with_budget", "{path}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    assert_eq!(upstream.received_requests().await.unwrap().len(), 0);

    let unbudgeted = gateway(&v1(&upstream), "", "").await;
    let (status, _, answer) = send(&unbudgeted, later[0].0, later[0].1.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(upstream.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_spent_budget_refuses_until_its_period_renews_and_a_spent_total_for_good() {
    // Every answer costs 1,000 output tokens: $0.002; a request's worst
    // case is that and its prompt (a few tokens at $1/M).
    let upstream = answering(ResponseTemplate::new(200).set_body_json(chat_answer(0, 1_000))).await;
    let gw = gateway(
        &v1(&upstream),
        "budget_usd = 0.0061\nbudget_period = \"day\"",
        "",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            send(&gw, "/v1/chat/completions", chat("m", "hi", 1_000))
                .await
                .0,
            200
        );
        settled_budget(&gw).await;
    }
    let (status, retry, body) = send(&gw, "/v1/chat/completions", chat("m", "hi", 1_000)).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "budget_exceeded");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    let retry = retry.expect("Retry-After");
    assert!(
        retry.abs_diff(to_midnight) <= 5,
        "Retry-After {retry}, midnight in {to_midnight}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("T00:00:00Z"),
        "names the period's end: {message}"
    );
    let budget = settled_budget(&gw).await;
    assert!(
        close(budget["spent_usd"].as_f64().unwrap(), 0.006),
        "{budget}"
    );
    assert_eq!(upstream.received_requests().await.unwrap().len(), 3);

    let gw = gateway(
        &v1(&upstream),
        "budget_usd = 0.0021\nbudget_period = \"total\"",
        "",
    )
    .await;
    assert_eq!(
        send(&gw, "/v1/chat/completions", chat("m", "hi", 1_000))
            .await
            .0,
        200
    );
    settled_budget(&gw).await;
    let (status, retry, body) = send(&gw, "/v1/chat/completions", chat("m", "hi", 1_000)).await;
    assert_eq!((status, retry), (403, None), "{body}");
    assert_eq!(body["error"]["code"], "budget_exhausted");
}

#[tokio::test]
async fn a_budgeted_client_is_refused_a_model_without_a_price_and_a_request_larger_than_its_budget()
{
    let upstream = chat_upstream().await;
    let gw = gateway(&v1(&upstream), "budget_usd = 0.001", "").await;
    let (status, _, body) =
        send(&gw, "/v1/chat/completions", chat("unpriced-model", "hi", 5)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "model_not_priced");
    assert_eq!(body["error"]["param"], "model");
    // 1,000 output tokens may cost $0.002: more than the whole budget.
    let (status, _, body) = send(&gw, "/v1/chat/completions", chat("m", "hi", 1_000)).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("budget_usd")
    );
    assert!(upstream.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn spend_survives_a_restart() {
    let upstream = answering(ResponseTemplate::new(200).set_body_json(chat_answer(0, 1_000))).await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!(
        "[store]\nurl = \"sqlite://{}/money.db\"\n",
        dir.path().display()
    );
    let settings = "budget_usd = 0.005\nbudget_period = \"month\"";
    let gw = gateway(&v1(&upstream), settings, &store).await;
    for _ in 0..2 {
        assert_eq!(
            send(&gw, "/v1/chat/completions", chat("m", "hi", 1_000))
                .await
                .0,
            200
        );
    }
    settled_budget(&gw).await;
    gw.shutdown().await;

    let gw = gateway(&v1(&upstream), settings, &store).await;
    let budget = settled_budget(&gw).await;
    assert!(
        close(budget["spent_usd"].as_f64().unwrap(), 0.004),
        "{budget}"
    );
    // $0.001 left: a request that may cost over $0.002 is refused.
    let (status, _, body) = send(&gw, "/v1/chat/completions", chat("m", "hi", 1_000)).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert_eq!(upstream.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn two_replicas_share_one_budget() {
    let redis = RedisServer::start();
    let upstream = answering(
        ResponseTemplate::new(200)
            .set_body_json(chat_answer(0, 1_000))
            .set_delay(Duration::from_secs(2)),
    )
    .await;
    let cluster = format!(
        "[cluster]\nredis_url = \"{}\"\ntimeout = \"5s\"\n",
        redis.url()
    );
    let settings = "budget_usd = 0.0101\nbudget_period = \"day\"";
    let replicas = [
        gateway(&v1(&upstream), settings, &cluster).await,
        gateway(&v1(&upstream), settings, &cluster).await,
    ];
    // Twenty requests at once, ten on each replica: five worst cases fit.
    let sent = futures_util::future::join_all((0..20).map(|i| {
        send(
            &replicas[i % 2],
            "/v1/chat/completions",
            chat("m", "hi", 1_000),
        )
    }))
    .await;
    let admitted = sent.iter().filter(|(s, _, _)| *s == 200).count();
    assert_eq!(
        admitted,
        5,
        "{:?}",
        sent.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    // Then one at a time until the budget is spent: $0.010 in all.
    let mut more = 0;
    loop {
        let replica = &replicas[more % 2];
        let (status, _, body) = send(replica, "/v1/chat/completions", chat("m", "hi", 1_000)).await;
        if status != 200 {
            assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
            break;
        }
        more += 1;
        assert!(more <= 5, "past the budget");
    }
    assert_eq!(
        admitted + more,
        5,
        "the five answered cost $0.002 each: $0.010"
    );
    assert_eq!(upstream.received_requests().await.unwrap().len(), 5);
    for replica in &replicas {
        let budget = settled_budget(replica).await;
        assert!(
            close(budget["spent_usd"].as_f64().unwrap(), 0.010),
            "{budget}"
        );
    }
}

#[tokio::test]
async fn a_request_waits_for_holds_that_end_on_another_replica() {
    // Two worst cases fit. Replica a's two requests hold them (their
    // answers take 1 s); replica b's two, sent meanwhile, wait: the ends of
    // a's holds wake nothing on b, which looks again at the cluster's count.
    let redis = RedisServer::start();
    let upstream = slow_upstream(Duration::from_secs(1)).await;
    let cluster = format!(
        "[cluster]\nredis_url = \"{}\"\ntimeout = \"5s\"\n",
        redis.url()
    );
    let settings = "budget_usd = 0.0046\nbudget_period = \"day\"";
    let a = gateway_waiting(&v1(&upstream), settings, &cluster, "20s").await;
    let b = gateway_waiting(&v1(&upstream), settings, &cluster, "20s").await;
    let first = futures_util::future::join_all(
        (0..2).map(|_| send(&a, "/v1/chat/completions", chat("m", "hi", 1_000))),
    );
    let then_b = async {
        let both_held = eventually(Duration::from_secs(10), async || {
            (upstream.received_requests().await.unwrap().len() == 2).then_some(())
        })
        .await;
        assert!(both_held.is_some(), "a's two requests reach the upstream");
        let sent = std::time::Instant::now();
        let answers = at_once(&b, 2).await;
        (answers, sent.elapsed())
    };
    let (first, (second, waited)) = tokio::join!(first, then_b);
    for (status, _, body) in first.iter().chain(&second) {
        assert_eq!(*status, 200, "{body}");
    }
    // About a second (a's answers, then b's own); without looking again b
    // would wait out queue.max_wait (20 s).
    assert!(waited < Duration::from_secs(10), "b waited {waited:?}");
    assert_eq!(upstream.received_requests().await.unwrap().len(), 4);
}

#[tokio::test]
async fn every_way_a_request_ends_gives_back_its_hold() {
    use crate::support::closed_port;
    let budget = "budget_usd = 1.0\nbudget_period = \"day\"";
    // A worst case: 1,000 output tokens at $2/M and a few prompt tokens.
    let body = || chat("m", "hi", 1_000);

    // The node answers 500: relayed, nothing charged, nothing held.
    let failing = answering(ResponseTemplate::new(500).set_body_string("boom")).await;
    let gw = gateway(&v1(&failing), budget, "[retry]\nattempts = 0\n").await;
    assert_eq!(send(&gw, "/v1/chat/completions", body()).await.0, 500);
    let spend = settled_budget(&gw).await;
    assert_eq!(spend["spent_usd"], 0.0, "{spend}");

    // No node can be reached: nothing reached a node, nothing charged.
    let unreachable = format!("http://127.0.0.1:{}/v1", closed_port());
    let gw = gateway(&unreachable, budget, "[retry]\nattempts = 0\n").await;
    assert_eq!(send(&gw, "/v1/chat/completions", body()).await.0, 502);
    let spend = settled_budget(&gw).await;
    assert_eq!(spend["spent_usd"], 0.0, "{spend}");

    // No answer in time: the node may have billed it, so the worst case
    // stays charged (the safe side), and nothing stays held.
    let slow = slow_upstream(Duration::from_secs(5)).await;
    let gw = gateway(
        &v1(&slow),
        budget,
        "[retry]\nattempts = 0\n[upstream]\nfirst_byte_timeout = \"300ms\"\n",
    )
    .await;
    assert_eq!(send(&gw, "/v1/chat/completions", body()).await.0, 504);
    let spend = settled_budget(&gw).await;
    let spent = spend["spent_usd"].as_f64().unwrap();
    assert!(spent > 0.002 && spent < 0.00201, "the worst case: {spend}");
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_pays_for_what_streamed_and_holds_nothing() {
    use mock_upstreams::{MockConfig, MockUpstream};
    use std::time::Duration;
    let upstream = MockUpstream::start(
        "127.0.0.1:0".parse().unwrap(),
        MockConfig::new("sk-upstream")
            .models(&["m"])
            .completion_words(200)
            .stream_timing(Duration::from_millis(10), Duration::from_millis(50)),
    )
    .await
    .unwrap();
    let gw = gateway(
        &upstream.base_url(),
        "budget_usd = 1.0\nbudget_period = \"day\"",
        "",
    )
    .await;
    let body = json!({"model": "m", "stream": true, "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]});
    let mut response =
        send_json(gw.url("/v1/chat/completions"), Some(TEAM), body.to_string()).await;
    assert_eq!(response.status(), 200);
    // A few events, then the client goes away.
    let mut seen = 0;
    while seen < 3 {
        if response.chunk().await.unwrap().is_some() {
            seen += 1;
        }
    }
    drop(response);
    let spend = settled_budget(&gw).await;
    let spent = spend["spent_usd"].as_f64().unwrap();
    // The prompt and a few of the 200 words: far less than the worst case.
    assert!(spent > 0.0 && spent < 0.0005, "{spend}");
    upstream.stop().await;
}

#[tokio::test]
async fn with_redis_away_a_replica_holds_by_its_own_count_and_a_fresh_redis_starts_from_it() {
    let redis = RedisServer::start();
    let port = redis.port;
    // Every answer costs $0.002; the budget fits five.
    let upstream = answering(ResponseTemplate::new(200).set_body_json(chat_answer(0, 1_000))).await;
    let cluster = format!(
        "[cluster]\nredis_url = \"{}\"\ntimeout = \"5s\"\n",
        redis.url()
    );
    let gw = gateway(
        &v1(&upstream),
        "budget_usd = 0.0101\nbudget_period = \"day\"",
        &cluster,
    )
    .await;
    gw.until(|s| s["cluster"]["redis"] == "up").await;
    for _ in 0..2 {
        assert_eq!(
            send(&gw, "/v1/chat/completions", chat("m", "hi", 1_000))
                .await
                .0,
            200
        );
    }
    settled_budget(&gw).await;

    // Redis goes away (on_redis_error = "local"): this replica's count.
    redis.kill();
    assert_eq!(
        send(&gw, "/v1/chat/completions", chat("m", "hi", 1_000))
            .await
            .0,
        200
    );
    gw.until(|s| s["cluster"]["redis"] == "down").await;
    let local = settled_budget(&gw).await;
    assert!(
        close(local["spent_usd"].as_f64().unwrap(), 0.006),
        "{local}"
    );

    // Back, empty: the period's key starts from what this replica counted.
    let redis = RedisServer::start_on(port);
    gw.until(|s| s["cluster"]["redis"] == "up").await;
    let mut more = 0;
    while send(&gw, "/v1/chat/completions", chat("m", "hi", 1_000))
        .await
        .0
        == 200
    {
        more += 1;
        assert!(more <= 2, "past the budget");
    }
    assert_eq!(more, 2, "$0.006 spent before: two more fit");
    assert_eq!(upstream.received_requests().await.unwrap().len(), 5);
    drop(redis);
}

#[tokio::test]
async fn a_timed_out_attempt_keeps_its_worst_case_though_the_retry_finds_no_node() {
    use crate::support::closed_port;
    // Node 0 (tried first) answers too late, node 1 cannot be reached: the
    // first may have billed the request, so the worst case stays charged
    // although the last attempt reached nothing.
    let slow = slow_upstream(Duration::from_secs(5)).await;
    let toml = format!(
        "[admin]\ntoken_env = \"TEST_ADMIN_TOKEN\"\n{PRICES}[retry]\nattempts = 1\n\
         [upstream]\nfirst_byte_timeout = \"300ms\"\n\
         [[clients]]\nname = \"team\"\nkey_env = \"TEAM\"\nbudget_usd = 1.0\nbudget_period = \"day\"\n{}{}",
        node("slow", &v1(&slow), "k", "models = [\"m\"]"),
        node(
            "gone",
            &format!("http://127.0.0.1:{}/v1", closed_port()),
            "k",
            "models = [\"m\"]"
        ),
    );
    let gw = Gateway::start_file_text(&toml, &[("TEAM", TEAM)]).await;
    let (status, _, body) = send(&gw, "/v1/chat/completions", chat("m", "hi", 1_000)).await;
    assert_eq!(status, 502, "{body}");
    let spend = settled_budget(&gw).await;
    let spent = spend["spent_usd"].as_f64().unwrap();
    assert!(spent > 0.002 && spent < 0.00201, "the worst case: {spend}");
}
