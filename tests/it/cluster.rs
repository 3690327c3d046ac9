//! Several replicas sharing quotas through a real Redis (`[cluster]`).

use std::sync::Arc;
use std::time::Duration;

use mock_upstreams::{MockConfig, MockUpstream};
use tokio::sync::Semaphore;

use crate::redis::RedisServer;
use crate::support::{Gateway, ask_as, chat, client, node, private_ca, send_json};

async fn mock(rpm: Option<u64>) -> MockUpstream {
    MockUpstream::start(
        "127.0.0.1:0".parse().unwrap(),
        MockConfig::new("sk-mock").quota(rpm, None),
    )
    .await
    .unwrap()
}

fn cluster_toml(redis: &RedisServer, extra: &str, nodes: &[(&str, &MockUpstream, u64)]) -> String {
    let nodes: String = nodes
        .iter()
        .map(|(name, upstream, rpm)| {
            node(
                name,
                &upstream.base_url(),
                "sk-mock",
                &format!("rpm = {rpm}"),
            )
        })
        .collect();
    // A generous timeout: on a loaded test machine a call slower than the
    // default 250 ms would (rightly) fall back to local limits, which is
    // not what these tests measure.
    format!(
        "[queue]\nmax_wait = \"1s\"\n[cluster]\nredis_url = \"{}\"\ntimeout = \"5s\"\n{extra}\n{nodes}",
        redis.url()
    )
}

/// Sends `count` chat requests, spread in turn over `replicas`, 30 at a
/// time; returns how many got each status.
async fn spread(
    replicas: &[Gateway],
    count: usize,
    key: Option<&str>,
) -> std::collections::BTreeMap<u16, usize> {
    let gate = Arc::new(Semaphore::new(30));
    let mut tasks = Vec::new();
    for i in 0..count {
        let url = replicas[i % replicas.len()].url("/v1/chat/completions");
        let permit = Arc::clone(&gate).acquire_owned().await.unwrap();
        let key = key.map(str::to_owned);
        tasks.push(tokio::spawn(async move {
            let mut request = client()
                .post(url)
                .header("content-type", "application/json")
                .body(chat("gpt-4o-mini", "hi", 5));
            if let Some(key) = key {
                request = request.header("authorization", format!("Bearer {key}"));
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            response.bytes().await.unwrap();
            drop(permit);
            status
        }));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for task in tasks {
        *statuses.entry(task.await.unwrap()).or_default() += 1;
    }
    statuses
}

async fn redis_conn(redis: &RedisServer) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Waits (bounded, 10 s) until `ready` holds of what `command` on `key`
/// answers: the gateway writes to Redis in the background (releases,
/// cooldowns), so a test waits for the write to land.
async fn until_redis(redis: &RedisServer, command: &str, key: &str, ready: impl Fn(u64) -> bool) {
    let mut conn = redis_conn(redis).await;
    let mut last = 0;
    let reached = crate::support::eventually(Duration::from_secs(10), async || {
        let value: u64 = ::redis::cmd(command)
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        last = value;
        ready(value).then_some(())
    })
    .await;
    assert!(reached.is_some(), "{command} {key} is still {last}");
}

/// Every lease on node `name` is released.
async fn released(redis: &RedisServer, name: &str) {
    until_redis(redis, "ZCARD", &format!("balancer:n:{name}:fly"), |open| {
        open == 0
    })
    .await;
}

/// Node `name`'s cooldown is in Redis.
async fn rests(redis: &RedisServer, name: &str) {
    until_redis(
        redis,
        "EXISTS",
        &format!("balancer:n:{name}:cool"),
        |exists| exists == 1,
    )
    .await;
}

/// Script runs Redis has completed (admissions and releases; a first
/// `EVALSHA` that finds the script not yet loaded does not count).
async fn script_calls(redis: &RedisServer) -> u64 {
    let mut conn = redis_conn(redis).await;
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .map(|l| stat(l, "calls=") - stat(l, "failed_calls="))
        .sum()
}

fn stat(line: &str, name: &str) -> u64 {
    line.split([':', ','])
        .find_map(|field| field.strip_prefix(name)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn three_replicas_keep_each_node_exactly_at_its_quota() {
    let redis = RedisServer::start();
    let (a, b, c) = (
        mock(Some(100)).await,
        mock(Some(150)).await,
        mock(Some(200)).await,
    );
    let toml = cluster_toml(
        &redis,
        "",
        &[("a", &a, 100), ("b", &b, 150), ("c", &c, 200)],
    );
    let replicas = [
        Gateway::start(&toml).await,
        Gateway::start(&toml).await,
        Gateway::start(&toml).await,
    ];
    let statuses = spread(&replicas, 500, None).await;
    assert_eq!(statuses.get(&200), Some(&450), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&50), "{statuses:?}");
    let received: Vec<u64> = [&a, &b, &c].iter().map(|m| m.stats().requests()).collect();
    assert_eq!(received, [100, 150, 200]);
    let refused: Vec<u64> = [&a, &b, &c]
        .iter()
        .map(|m| m.stats().rate_limited())
        .collect();
    assert_eq!(refused, [0, 0, 0], "no upstream ever said 429");
    let status = replicas[0].status().await;
    assert_eq!(status["cluster"]["redis"], "up");
    // Each replica's /status shows the node's use summed over all three.
    for (i, quota) in [100, 150, 200].into_iter().enumerate() {
        assert_eq!(
            status["nodes"][i]["shared"]["requests"], quota,
            "{}",
            status["nodes"][i]
        );
    }
}

#[tokio::test]
async fn a_client_limit_holds_across_replicas() {
    let redis = RedisServer::start();
    let upstream = mock(None).await;
    let toml = cluster_toml(
        &redis,
        "[[clients]]\nname = \"team\"\nkey_env = \"TEAM\"\nrpm = 10\n",
        &[("a", &upstream, 1000)],
    );
    let env = [("TEAM", "sk-team-cluster-key")];
    let replicas = [
        Gateway::start_file_text(&toml, &env).await,
        Gateway::start_file_text(&toml, &env).await,
        Gateway::start_file_text(&toml, &env).await,
    ];
    let statuses = spread(&replicas, 30, Some("sk-team-cluster-key")).await;
    assert_eq!(statuses.get(&200), Some(&10), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&20), "{statuses:?}");
    assert_eq!(upstream.stats().requests(), 10);
    let (status, retry, body) = ask_as(&replicas[1], "sk-team-cluster-key", "gpt-4o-mini", 5).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "client_rate_limit_exceeded");
    assert!(retry.is_some());
}

#[tokio::test]
async fn redis_killed_falls_back_to_local_limits_and_sharing_resumes_when_it_returns() {
    let redis = RedisServer::start();
    let port = redis.port;
    let upstream = mock(None).await;
    let toml = cluster_toml(&redis, "", &[("a", &upstream, 30)]);
    let replicas = [Gateway::start(&toml).await, Gateway::start(&toml).await];
    for replica in &replicas {
        replica.until(|s| s["cluster"]["redis"] == "up").await;
    }
    assert_eq!(spread(&replicas, 10, None).await.get(&200), Some(&10));

    redis.kill();
    // Every request is answered, by each replica's own windows: no hang.
    let during = spread(&replicas, 10, None).await;
    assert_eq!(during.get(&200), Some(&10), "{during:?}");
    for replica in &replicas {
        let status = replica.until(|s| s["cluster"]["redis"] == "down").await;
        assert!(status["cluster"]["last_error"].is_string());
    }

    // Back, empty: the replicas reconnect by themselves and share again.
    let redis = RedisServer::start_on(port);
    for replica in &replicas {
        replica.until(|s| s["cluster"]["redis"] == "up").await;
    }
    let after = spread(&replicas, 40, None).await;
    assert_eq!(after.get(&200), Some(&30), "{after:?}");
    assert_eq!(after.get(&429), Some(&10), "{after:?}");
    assert_eq!(upstream.stats().requests(), 10 + 10 + 30);
    drop(redis);
}

#[tokio::test]
async fn with_on_redis_error_reject_an_unreachable_redis_gets_503() {
    let redis = RedisServer::start();
    let upstream = mock(None).await;
    let toml = cluster_toml(
        &redis,
        "on_redis_error = \"reject\"\n",
        &[("a", &upstream, 100)],
    );
    let gw = Gateway::start(&toml).await;
    gw.until(|s| s["cluster"]["redis"] == "up").await;
    assert_eq!(ask_as(&gw, "", "gpt-4o-mini", 5).await.0, 200);
    redis.kill();
    gw.until(|s| s["cluster"]["redis"] == "down").await;
    let (status, retry, body) = ask_as(&gw, "", "gpt-4o-mini", 5).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "cluster_unavailable");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(upstream.stats().requests(), 1);
}

#[tokio::test]
async fn the_hot_path_makes_one_redis_call_to_admit_and_one_to_release() {
    let redis = RedisServer::start();
    let upstream = mock(None).await;
    let gw = Gateway::start(&cluster_toml(&redis, "", &[("a", &upstream, 1000)])).await;
    for _ in 0..5 {
        assert_eq!(ask_as(&gw, "", "gpt-4o-mini", 5).await.0, 200);
    }
    released(&redis, "a").await;
    assert_eq!(script_calls(&redis).await, 10);
}

#[tokio::test]
async fn a_node_that_answered_429_rests_on_every_replica() {
    use wiremock::ResponseTemplate;
    let redis = RedisServer::start();
    let limited = crate::support::answering(ResponseTemplate::new(429)
                .insert_header("retry-after", "30")
                .set_body_json(serde_json::json!({"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}})),).await;
    let answer = mock(None).await;
    let toml = format!(
        "[queue]\nmax_wait = \"1s\"\n[cluster]\nredis_url = \"{}\"\ntimeout = \"5s\"\n{}{}",
        redis.url(),
        node("limited", &crate::support::v1(&limited), "k", ""),
        node("answer", &answer.base_url(), "sk-mock", ""),
    );
    let first = Gateway::start(&toml).await;
    let second = Gateway::start(&toml).await;
    // A fresh gateway tries its first node first: the 429 is retried on
    // the other, and the first node's rest is shared.
    assert_eq!(ask_as(&first, "", "gpt-4o-mini", 5).await.0, 200);
    assert_eq!(limited.received_requests().await.unwrap().len(), 1);
    first.settled_status().await;
    released(&redis, "limited").await;
    rests(&redis, "limited").await;
    for _ in 0..4 {
        assert_eq!(ask_as(&second, "", "gpt-4o-mini", 5).await.0, 200);
    }
    assert_eq!(
        limited.received_requests().await.unwrap().len(),
        1,
        "the other replica kept away from the resting node"
    );
}

#[tokio::test]
async fn a_request_waits_for_a_release_on_another_replica_and_the_queue_bound_holds() {
    use crate::support::{answering_upstream, send_in_background};
    let redis = RedisServer::start();
    let slow = answering_upstream(Duration::from_millis(1500)).await;
    let toml = format!(
        "[queue]\nmax_wait = \"15s\"\nmax_depth = 1\n[cluster]\nredis_url = \"{}\"\ntimeout = \"5s\"\n{}",
        redis.url(),
        node("a", &crate::support::v1(&slow), "k", "max_concurrency = 1"),
    );
    let (first, second) = (Gateway::start(&toml).await, Gateway::start(&toml).await);
    let held = send_in_background(&first, chat("gpt-4o-mini", "one", 5));
    first.until(|s| s["nodes"][0]["in_flight"] == 1).await;
    // The only slot is taken on the first replica: this one waits on the second.
    let waiting = send_in_background(&second, chat("gpt-4o-mini", "two", 5));
    second.until(|s| s["queue"]["depth"] == 1).await;
    // One waits already (max_depth = 1): the next is refused at once.
    let (status, retry, _) = ask_as(&second, "", "gpt-4o-mini", 5).await;
    assert_eq!(status, 429);
    assert!(retry.is_some());
    assert_eq!(held.await.unwrap().0, 200);
    // The release on the first replica, published through Redis, lets the
    // waiter through long before its 15 s max_wait.
    let started = tokio::time::Instant::now();
    assert_eq!(waiting.await.unwrap().0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(slow.received_requests().await.unwrap().len(), 2);
    assert_eq!(second.status().await["queue"]["depth"], 0);
}

#[tokio::test]
async fn an_admission_that_times_out_leaves_no_concurrency_slot_behind() {
    let redis = RedisServer::start();
    let upstream = mock(None).await;
    let toml = format!(
        "[queue]\nmax_wait = \"1s\"\n[cluster]\nredis_url = \"{}\"\ntimeout = \"300ms\"\n{}",
        redis.url(),
        node("a", &upstream.base_url(), "sk-mock", "max_concurrency = 4"),
    );
    let gw = Gateway::start(&toml).await;
    assert_eq!(ask_as(&gw, "", "gpt-4o-mini", 5).await.0, 200);
    released(&redis, "a").await;
    // Redis holds every script for 2 s: the admission times out, the
    // request is served by the local fallback, and the script runs later,
    // leasing a slot nobody will release.
    let mut conn = redis_conn(&redis).await;
    let () = ::redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ask_as(&gw, "", "gpt-4o-mini", 5).await.0, 200);
    assert_eq!(gw.status().await["cluster"]["redis"], "down");
    // Redis answers on one connection in order: the held script, then the
    // ending of its lease, then the ping that marks Redis up again.
    gw.until(|s| s["cluster"]["redis"] == "up").await;
    // The unanswered admission's lease is gone, not left to expire
    // (request_timeout + 30 s).
    let mut conn = redis_conn(&redis).await;
    let open: u64 = ::redis::cmd("ZCARD")
        .arg("balancer:n:a:fly")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(open, 0, "a lease of the unanswered admission is left");
    // The script did run: the request stays counted in the window.
    let requests: u64 = ::redis::cmd("HGET")
        .arg("balancer:n:a:amt")
        .arg("r")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(requests, 2);
}

#[tokio::test]
async fn a_client_that_hangs_up_while_waiting_for_shared_headroom_leaves_the_queue() {
    use crate::support::{answering_upstream, send_in_background};
    let redis = RedisServer::start();
    let slow = answering_upstream(Duration::from_secs(3)).await;
    let toml = format!(
        "[queue]\nmax_wait = \"15s\"\n[cluster]\nredis_url = \"{}\"\ntimeout = \"5s\"\n{}",
        redis.url(),
        node("a", &crate::support::v1(&slow), "k", "max_concurrency = 1"),
    );
    let gw = Gateway::start(&toml).await;
    let held = send_in_background(&gw, chat("gpt-4o-mini", "one", 5));
    gw.until(|s| s["nodes"][0]["in_flight"] == 1).await;
    let waiter = send_in_background(&gw, chat("gpt-4o-mini", "two", 5));
    gw.until(|s| s["queue"]["depth"] == 1).await;
    waiter.abort();
    gw.until(|s| s["queue"]["depth"] == 0).await;
    assert_eq!(held.await.unwrap().0, 200);
    released(&redis, "a").await;
    // The one that hung up never reached the node.
    assert_eq!(slow.received_requests().await.unwrap().len(), 1);
}

/// A node's short window (Azure's 10 s) and its own default completion
/// hold alike whether limits are kept here or shared through Redis.
#[tokio::test]
async fn local_and_shared_hold_a_short_window_and_a_nodes_own_default_completion() {
    let redis = RedisServer::start();
    let (here, there) = (mock(None).await, mock(None).await);
    // rpm 60 within 10 s allots 10; tpm 3000 cannot hold the node's own
    // default completion of 3500, though it holds the gateway's 100.
    let nodes = |upstream: &MockUpstream| {
        node(
            "paced",
            &upstream.base_url(),
            "sk-mock",
            "rpm = 60\ntpm = 3000\nwindow = \"10s\"\ndefault_completion_tokens = 3500",
        )
    };
    let settings = "[queue]\nmax_wait = \"1s\"\n[accounting]\ndefault_completion_tokens = 100\n";
    let local = Gateway::start(&format!("{settings}{}", nodes(&here))).await;
    let shared_toml = format!(
        "{settings}[cluster]\nredis_url = \"{}\"\ntimeout = \"5s\"\n{}",
        redis.url(),
        nodes(&there)
    );
    let replicas = [
        Gateway::start(&shared_toml).await,
        Gateway::start(&shared_toml).await,
    ];
    replicas[0].until(|s| s["cluster"]["redis"] == "up").await;

    let open_ended = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
    });
    for gw in [&local, &replicas[1]] {
        let response =
            send_json(gw.url("/v1/chat/completions"), None, open_ended.to_string()).await;
        assert_eq!(response.status(), 400);
        let body: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "request_too_large", "{body}");
    }

    let local_statuses = spread(std::slice::from_ref(&local), 20, None).await;
    let shared_statuses = spread(&replicas, 20, None).await;
    for statuses in [&local_statuses, &shared_statuses] {
        assert_eq!(statuses.get(&200), Some(&10), "{statuses:?}");
        assert_eq!(statuses.get(&429), Some(&10), "{statuses:?}");
    }
    assert_eq!(
        (here.stats().requests(), there.stats().requests()),
        (10, 10)
    );
    let status = local.status().await;
    assert_eq!(status["nodes"][0]["short_window"]["rpm"]["limit"], 10);
    assert_eq!(status["nodes"][0]["short_window"]["rpm"]["used"], 10);
}

/// An Azure deployment's charge at arrival holds across replicas: a
/// settlement through Redis never gives back what it reserved.
#[tokio::test]
async fn a_charge_at_arrival_holds_across_replicas() {
    use crate::azure::{VERSION, azure_mock, azure_node};
    let redis = RedisServer::start();
    let upstream = azure_mock("mini-east", None, Some(6000)).await;
    let toml = format!(
        "[queue]\nmax_wait = \"500ms\"\n[cluster]\nredis_url = \"{}\"\ntimeout = \"5s\"\n{}",
        redis.url(),
        azure_node(
            "az",
            &upstream,
            &format!("api_version = \"{VERSION}\"\ntpm = 6000")
        ),
    );
    let replicas = [Gateway::start(&toml).await, Gateway::start(&toml).await];
    replicas[0].until(|s| s["cluster"]["redis"] == "up").await;
    // Three asking 300 (308 each with the prompt) through one replica...
    for _ in 0..3 {
        let (status, _, _) = ask_as(&replicas[0], "", "gpt-4o-mini", 300).await;
        assert_eq!(status, 200);
    }
    released(&redis, "az").await;
    // ...leave 76 tokens of the span for the other: five asking 5.
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for _ in 0..7 {
        let (status, _, _) = ask_as(&replicas[1], "", "gpt-4o-mini", 5).await;
        *statuses.entry(status).or_default() += 1;
    }
    assert_eq!(
        (statuses.get(&200), statuses.get(&429)),
        (Some(&5), Some(&2)),
        "{statuses:?}"
    );
    assert_eq!(upstream.stats().report().rate_limited, 0);
}

#[tokio::test]
async fn replicas_share_limits_through_a_redis_that_speaks_only_tls() {
    let ca = private_ca();
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_tls(&ca, dir.path());
    let ca_file = dir.path().join("ca.crt");
    let a = mock(Some(10)).await;
    let trusting = cluster_toml(
        &redis,
        &format!("ca_file = \"{}\"\n", ca_file.display()),
        &[("a", &a, 10)],
    );
    let replicas = [
        Gateway::start(&trusting).await,
        Gateway::start(&trusting).await,
    ];
    for replica in &replicas {
        replica.until(|s| s["cluster"]["redis"] == "up").await;
    }
    // Ten requests a minute for the node, counted once for both replicas.
    let statuses = spread(&replicas, 20, None).await;
    assert_eq!(statuses.get(&200), Some(&10), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&10), "{statuses:?}");
    assert_eq!(a.stats().requests(), 10);

    // Without the CA, the server's certificate is not trusted: no session.
    let untrusting = Gateway::start(&cluster_toml(&redis, "", &[("a", &a, 10)])).await;
    let status = untrusting
        .until(|s| s["cluster"]["last_error"] != "not connected yet")
        .await;
    assert_eq!(status["cluster"]["redis"], "down", "{}", status["cluster"]);
    let error = status["cluster"]["last_error"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(error.contains("certificate"), "{error}");
}

#[tokio::test]
async fn a_redis_that_asks_for_a_client_certificate_gets_the_configured_one() {
    let ca = private_ca();
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_tls_asking(&ca, dir.path(), true);
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let ca_file = dir.path().join("ca.crt").display().to_string();
    let (cert, key) = (
        file("gateway.crt", &ca.client_cert_pem),
        file("gateway.key", &ca.client_key_pem),
    );
    let a = mock(Some(10)).await;
    let with_cert = Gateway::start(&cluster_toml(
        &redis,
        &format!(
            "ca_file = \"{ca_file}\"\nclient_cert_file = \"{cert}\"\nclient_key_file = \"{key}\"\n"
        ),
        &[("a", &a, 10)],
    ))
    .await;
    with_cert.until(|s| s["cluster"]["redis"] == "up").await;
    let statuses = spread(std::slice::from_ref(&with_cert), 1, None).await;
    assert_eq!(statuses.get(&200), Some(&1), "{statuses:?}");

    let without = Gateway::start(&cluster_toml(
        &redis,
        &format!("ca_file = \"{ca_file}\"\n"),
        &[("a", &a, 10)],
    ))
    .await;
    let status = without
        .until(|s| s["cluster"]["last_error"] != "not connected yet")
        .await;
    assert_eq!(status["cluster"]["redis"], "down", "{}", status["cluster"]);
}
