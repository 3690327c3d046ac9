//! Sharing a saturated pool: priority classes, weighted fair queueing in
//! tokens, per-client caps, the rate-limit headers a client gets, and a
//! client revoked while its requests wait. The node takes one request at a
//! time, so the order requests reach it is the order they were dispatched.

use std::time::Duration;

use serde_json::json;
use wiremock::MockServer;

use crate::support::{Gateway, node, send_json};

/// Keys of the declared test clients.
const LOW: &str = "sk-fair-low-client";
const HIGH: &str = "sk-fair-high-client";
const HEAVY: &str = "sk-fair-heavy-client";
const LIGHT: &str = "sk-fair-light-client";

const ENV: [(&str, &str); 4] = [
    ("LOW", LOW),
    ("HIGH", HIGH),
    ("HEAVY", HEAVY),
    ("LIGHT", LIGHT),
];

const CLIENTS: &str = "[[clients]]\nname = \"low\"\nkey_env = \"LOW\"\npriority = \"low\"\n\
    [[clients]]\nname = \"high\"\nkey_env = \"HIGH\"\npriority = \"high\"\n\
    [[clients]]\nname = \"heavy\"\nkey_env = \"HEAVY\"\nweight = 3\n\
    [[clients]]\nname = \"light\"\nkey_env = \"LIGHT\"\nweight = 1\n";

/// An upstream that holds the request marked `busy` for `busy` and
/// answers the others after `each`.
async fn holding(busy: Duration, each: Duration) -> MockServer {
    use wiremock::matchers::{body_string_contains, method};
    use wiremock::{Mock, ResponseTemplate};
    let server = MockServer::start().await;
    let answer = ResponseTemplate::new(200).set_body_json(crate::support::chat_answer(5, 2));
    Mock::given(method("POST"))
        .and(body_string_contains("\"busy\""))
        .respond_with(answer.clone().set_delay(busy))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(answer.set_delay(each))
        .with_priority(2)
        .mount(&server)
        .await;
    server
}

/// A gateway in front of `upstream`, one request at a time.
async fn one_at_a_time(upstream: &MockServer, queue: &str) -> Gateway {
    let toml = format!(
        "[queue]\nmax_wait = \"20s\"\n{queue}\n{CLIENTS}{}",
        node(
            "one",
            &crate::support::v1(upstream),
            "k",
            "max_concurrency = 1"
        )
    );
    Gateway::start_file_text(&toml, &ENV).await
}

/// A chat request marked `mark` (it shows in what the upstream received).
fn marked(mark: &str) -> String {
    json!({"model": "gpt-4o-mini", "max_tokens": 5,
           "messages": [{"role": "user", "content": mark}]})
    .to_string()
}

/// Sends `mark` as `key` in the background; its status when it ends.
fn send(gw: &Gateway, key: &str, mark: &str) -> tokio::task::JoinHandle<u16> {
    let (url, key, body) = (gw.url("/v1/chat/completions"), key.to_owned(), marked(mark));
    tokio::spawn(async move {
        let response = send_json(url, Some(&key), body).await;
        let status = response.status().as_u16();
        response.bytes().await.unwrap();
        status
    })
}

/// Waits until `depth` requests wait in the queue.
async fn queued(gw: &Gateway, depth: u64) {
    gw.until(|s| s["queue"]["depth"] == depth).await;
}

/// The marks of what the upstream received, in the order it did.
async fn arrivals(upstream: &MockServer) -> Vec<String> {
    upstream
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            body["messages"][0]["content"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_waiting_request_of_a_higher_class_goes_before_the_lower_ones() {
    let upstream = holding(Duration::from_secs(2), Duration::from_millis(20)).await;
    let gw = one_at_a_time(&upstream, "").await;
    high_goes_first(&gw, &gw, &upstream).await;
}

/// `holder` holds the only slot while three low requests and then a high
/// one wait on `waiter`: when the slot frees, the high one goes first.
async fn high_goes_first(holder: &Gateway, waiter: &Gateway, upstream: &MockServer) {
    let mut sent = vec![send(holder, LOW, "busy")];
    holder.until(|s| s["nodes"][0]["in_flight"] == 1).await;
    for (i, mark) in ["low-1", "low-2", "low-3"].iter().enumerate() {
        sent.push(send(waiter, LOW, mark));
        queued(waiter, i as u64 + 1).await;
    }
    sent.push(send(waiter, HIGH, "high"));
    queued(waiter, 4).await;
    for task in sent {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(
        arrivals(upstream).await,
        ["busy", "high", "low-1", "low-2", "low-3"]
    );
}

#[tokio::test]
async fn waiting_clients_are_served_tokens_in_proportion_to_their_weights() {
    // The first request holds the node while the others line up.
    let upstream = holding(Duration::from_secs(3), Duration::from_millis(20)).await;
    let gw = one_at_a_time(&upstream, "").await;
    let mut sent = vec![send(&gw, HEAVY, "busy")];
    gw.until(|s| s["nodes"][0]["in_flight"] == 1).await;
    // The light client's requests all arrive first: arrival order is not
    // what decides.
    for i in 0..8 {
        sent.push(send(&gw, LIGHT, "light"));
        queued(&gw, i + 1).await;
    }
    for i in 0..8 {
        sent.push(send(&gw, HEAVY, "heavy"));
        queued(&gw, 9 + i).await;
    }
    for task in sent {
        assert_eq!(task.await.unwrap(), 200);
    }
    let order = arrivals(&upstream).await;
    let first_eight = &order[1..9];
    let heavy = first_eight.iter().filter(|m| *m == "heavy").count();
    // 3:1 in tokens (equal requests): six of the heavy client's to two.
    assert_eq!(heavy, 6, "{order:?}");
}

#[tokio::test]
async fn one_client_cannot_fill_the_queue_and_is_refused_alone() {
    let upstream = holding(Duration::from_secs(3), Duration::from_millis(20)).await;
    let gw = one_at_a_time(&upstream, "max_depth_per_client = 2").await;
    let busy = send(&gw, LOW, "busy");
    gw.until(|s| s["nodes"][0]["in_flight"] == 1).await;
    let waiting = [send(&gw, LOW, "w1"), send(&gw, LOW, "w2")];
    queued(&gw, 2).await;
    // A third of the same client's is refused, with when to come back.
    let response = send_json(gw.url("/v1/chat/completions"), Some(LOW), marked("w3")).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    assert!(response.headers().contains_key("retry-after-ms"));
    // Another client still gets in line.
    let other = send(&gw, HIGH, "other");
    queued(&gw, 3).await;
    for task in [busy, other].into_iter().chain(waiting) {
        assert_eq!(task.await.unwrap(), 200);
    }
}

#[tokio::test]
async fn a_clients_own_concurrency_cap_holds() {
    let upstream = holding(Duration::from_secs(3), Duration::from_millis(20)).await;
    let toml = format!(
        "[[clients]]\nname = \"capped\"\nkey_env = \"CAPPED\"\nmax_concurrency = 1\n{}",
        node("n", &crate::support::v1(&upstream), "k", "")
    );
    let gw = Gateway::start_file_text(&toml, &[("CAPPED", "sk-capped-client")]).await;
    let first = send(&gw, "sk-capped-client", "busy");
    gw.until(|s| s["nodes"][0]["in_flight"] == 1).await;
    let (status, _, body) = crate::support::ask_as(&gw, "sk-capped-client", "gpt-4o-mini", 5).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "client_rate_limit_exceeded");
    assert_eq!(first.await.unwrap(), 200);
    // Released when the answer's relay ends, just after its last byte.
    gw.until(|s| s["nodes"][0]["in_flight"] == 0).await;
    let (status, _, _) = crate::support::ask_as(&gw, "sk-capped-client", "gpt-4o-mini", 5).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn answers_carry_the_clients_own_limits_or_the_pools_never_the_nodes() {
    // The node says it has 999 left of 1000: the client never sees that.
    let answer = wiremock::ResponseTemplate::new(200)
        .set_body_json(crate::support::chat_answer(5, 2))
        .insert_header("x-ratelimit-limit-requests", "1000")
        .insert_header("x-ratelimit-remaining-requests", "999");
    let upstream = crate::support::answering(answer).await;
    let toml = format!(
        "[auth]\nclient_keys_env = [\"TEST_CLIENT_KEY\"]\n\
         [[clients]]\nname = \"limited\"\nkey_env = \"LIMITED\"\nrpm = 7\ntpm = 5000\n{}{}",
        node(
            "a",
            &crate::support::v1(&upstream),
            "k",
            "rpm = 10\ntpm = 100000"
        ),
        node(
            "b",
            &crate::support::v1(&upstream),
            "k",
            "rpm = 20\ntpm = 200000"
        ),
    );
    let gw = Gateway::start_file_text(&toml, &[("LIMITED", "sk-limited-headers")]).await;
    let headers_of = async |key: &str| {
        let response = send_json(gw.url("/v1/chat/completions"), Some(key), marked("hi")).await;
        assert_eq!(response.status(), 200);
        let get = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        (
            get("x-ratelimit-limit-requests"),
            get("x-ratelimit-remaining-requests"),
            get("x-ratelimit-limit-tokens"),
            get("x-ratelimit-reset-requests"),
        )
    };
    // The client's own: 7 a minute, one used.
    let (limit, remaining, tokens, reset) = headers_of("sk-limited-headers").await;
    assert_eq!(
        (limit.as_deref(), remaining.as_deref()),
        (Some("7"), Some("6"))
    );
    assert_eq!(tokens.as_deref(), Some("5000"));
    let reset = reset.unwrap();
    assert!(reset.ends_with('s'), "{reset}");
    // Without limits of its own: the pool's, 10 + 20 a minute, two used.
    let (limit, remaining, tokens, _) = headers_of(crate::support::CLIENT_KEY).await;
    assert_eq!(
        (limit.as_deref(), remaining.as_deref()),
        (Some("30"), Some("28"))
    );
    assert_eq!(tokens.as_deref(), Some("300000"));
}

#[tokio::test]
async fn a_client_taken_out_of_the_config_while_its_request_waits_is_refused() {
    let upstream = holding(Duration::from_secs(3), Duration::from_millis(20)).await;
    let gw = one_at_a_time(&upstream, "").await;
    let busy = send(&gw, HIGH, "busy");
    gw.until(|s| s["nodes"][0]["in_flight"] == 1).await;
    let waiting = send(&gw, LOW, "waiting");
    queued(&gw, 1).await;
    // The reload drops the `low` client.
    let without_low = std::fs::read_to_string(gw.config_path()).unwrap().replace(
        "[[clients]]\nname = \"low\"\nkey_env = \"LOW\"\npriority = \"low\"\n",
        "",
    );
    std::fs::write(gw.config_path(), without_low).unwrap();
    gw.reloaded(1).await;
    assert_eq!(waiting.await.unwrap(), 401);
    assert_eq!(busy.await.unwrap(), 200);
    assert_eq!(arrivals(&upstream).await, ["busy"]);
}

/// The clients and `node` behind replicas that share their windows
/// through `redis`.
fn shared_toml(redis: &crate::redis::RedisServer, queue: &str, node: &str) -> String {
    format!(
        "[queue]\n{queue}\n[cluster]\nredis_url = \"{}\"\ntimeout = \"5s\"\n{CLIENTS}{node}",
        redis.url()
    )
}

#[tokio::test]
async fn with_shared_windows_a_replicas_line_keeps_the_class_order() {
    let redis = crate::redis::RedisServer::start();
    let upstream = holding(Duration::from_secs(2), Duration::from_millis(20)).await;
    let one = node(
        "one",
        &crate::support::v1(&upstream),
        "k",
        "max_concurrency = 1",
    );
    let toml = shared_toml(&redis, "max_wait = \"20s\"", &one);
    let holder = Gateway::start_file_text(&toml, &ENV).await;
    let waiter = Gateway::start_file_text(&toml, &ENV).await;
    // They wait on the other replica, for a release published through Redis.
    high_goes_first(&holder, &waiter, &upstream).await;
}

#[tokio::test]
async fn a_class_reserve_holds_across_replicas() {
    let redis = crate::redis::RedisServer::start();
    let upstream = holding(Duration::ZERO, Duration::ZERO).await;
    let ten = node("ten", &crate::support::v1(&upstream), "k", "rpm = 10");
    // High keeps 30% of every quota: low may use 7 of the 10 requests.
    let toml = shared_toml(
        &redis,
        "max_wait = \"1s\"\n[queue.reserve]\nhigh = 0.3",
        &ten,
    );
    let replicas = [
        Gateway::start_file_text(&toml, &ENV).await,
        Gateway::start_file_text(&toml, &ENV).await,
    ];
    let mut low = std::collections::BTreeMap::<u16, usize>::new();
    for i in 0..10 {
        let status = send(&replicas[i % 2], LOW, "low").await.unwrap();
        *low.entry(status).or_default() += 1;
    }
    assert_eq!(low, [(200, 7), (429, 3)].into(), "the low client's answers");
    // What high kept is there for it, on either replica.
    for i in 0..3 {
        assert_eq!(send(&replicas[i % 2], HIGH, "high").await.unwrap(), 200);
    }
    assert_eq!(send(&replicas[0], HIGH, "high").await.unwrap(), 429);
    assert_eq!(upstream.received_requests().await.unwrap().len(), 10);
}

#[tokio::test]
async fn a_clients_concurrency_cap_holds_across_replicas() {
    let redis = crate::redis::RedisServer::start();
    let upstream = holding(Duration::from_secs(3), Duration::from_millis(20)).await;
    let capped = format!(
        "[[clients]]\nname = \"capped\"\nkey_env = \"CAPPED\"\nmax_concurrency = 1\n{}",
        node("n", &crate::support::v1(&upstream), "k", "")
    );
    let toml = shared_toml(&redis, "max_wait = \"20s\"", &capped);
    let env = [ENV.as_slice(), &[("CAPPED", "sk-capped-client")]].concat();
    let first = Gateway::start_file_text(&toml, &env).await;
    let second = Gateway::start_file_text(&toml, &env).await;
    let held = send(&first, "sk-capped-client", "busy");
    first.until(|s| s["nodes"][0]["in_flight"] == 1).await;
    let (status, retry, body) =
        crate::support::ask_as(&second, "sk-capped-client", "gpt-4o-mini", 5).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "client_rate_limit_exceeded");
    assert!(retry.is_some());
    assert_eq!(held.await.unwrap(), 200);
    // The release reaches Redis after the answer (one script for the node
    // and the client together): wait for it, as seen by the other replica.
    second
        .until(|s| s["nodes"][0]["shared"]["in_flight"] == 0)
        .await;
    let (status, _, _) =
        crate::support::ask_as(&second, "sk-capped-client", "gpt-4o-mini", 5).await;
    assert_eq!(status, 200);
    assert_eq!(upstream.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_client_that_hangs_up_gives_back_its_concurrency_on_every_replica() {
    let redis = crate::redis::RedisServer::start();
    let upstream = holding(Duration::from_secs(30), Duration::from_millis(20)).await;
    let capped = format!(
        "[[clients]]\nname = \"capped\"\nkey_env = \"CAPPED\"\nmax_concurrency = 1\n{}",
        node("n", &crate::support::v1(&upstream), "k", "")
    );
    let toml = shared_toml(&redis, "max_wait = \"20s\"", &capped);
    let env = [ENV.as_slice(), &[("CAPPED", "sk-capped-client")]].concat();
    let first = Gateway::start_file_text(&toml, &env).await;
    let second = Gateway::start_file_text(&toml, &env).await;
    let held = send(&first, "sk-capped-client", "busy");
    second
        .until(|s| s["nodes"][0]["shared"]["in_flight"] == 1)
        .await;
    // The client gives up long before the upstream's 30 s answer.
    held.abort();
    second
        .until(|s| s["nodes"][0]["shared"]["in_flight"] == 0)
        .await;
    let (status, _, _) =
        crate::support::ask_as(&second, "sk-capped-client", "gpt-4o-mini", 5).await;
    assert_eq!(status, 200);
}
