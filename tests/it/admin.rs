//! The admin API and stored clients, run against both stores: embedded
//! SQLite and a real PostgreSQL server (see `pg.rs`). Every test below is a
//! function of the store it runs on; `on_both_stores!` makes one test per
//! store of each.

use reqwest::Method;
use serde_json::{Value, json};

use crate::admin_support::{
    Backend, TestStore, admin, admin_with, code, create, eventually, gateway, gateway_on, id, key,
    mock, no_such_client_is_found, refused_naming,
};
use crate::support::{ADMIN_TOKEN, ask_as, client};

async fn the_admin_api_answers_only_to_its_token(backend: Backend) {
    let store = TestStore::new(backend).await;
    let upstream = mock().await;
    let gw = gateway(&store, &upstream, "").await;
    for token in [None, Some("wrong-token-wrong-token"), Some("")] {
        let answer = admin_with(&gw, token, Method::GET, "/admin/clients", None).await;
        assert_eq!(code(&answer), (401, "invalid_admin_token"));
    }
    // Even an unknown path says nothing without the token.
    let answer = admin_with(&gw, None, Method::GET, "/admin/nope", None).await;
    assert_eq!(answer.0, 401);
    let (status, list) = admin(&gw, Method::GET, "/admin/clients", None).await;
    assert_eq!((status, list["data"].as_array().unwrap().len()), (200, 0));
    // With the admin API on, the gateway wants a key before any client exists.
    assert_eq!(ask_as(&gw, "sk-made-up", "gpt-4o-mini", 5).await.0, 401);
    // The gateway's own listener does not serve the admin API.
    let on_gateway = client()
        .get(gw.url("/admin/clients"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(on_gateway.status(), 404);
    upstream.stop().await;
}

async fn a_client_gets_its_key_once_and_is_listed_without_it(backend: Backend) {
    let store = TestStore::new(backend).await;
    let upstream = mock().await;
    let gw = gateway(&store, &upstream, "").await;
    let made = create(
        &gw,
        json!({"name": "team-a", "rpm": 100, "burst": 10, "rate_per_second": 2.5,
               "models": ["gpt-4o-mini"], "priority": "high", "weight": 2.5, "max_concurrency": 4}),
    )
    .await;
    let key = key(&made).to_owned();
    assert!(key.starts_with("sk-bal-") && key.len() > 40, "{key}");
    assert!(key.starts_with(made["key_prefix"].as_str().unwrap()));
    assert_eq!(made["name"], "team-a");
    assert_eq!(made["source"], "api");
    assert_eq!(
        (
            &made["rpm"],
            &made["tpm"],
            &made["burst"],
            &made["rate_per_second"]
        ),
        (&json!(100), &Value::Null, &json!(10), &json!(2.5))
    );
    assert_eq!(made["models"], json!(["gpt-4o-mini"]));
    assert_eq!(
        (&made["priority"], &made["weight"], &made["max_concurrency"]),
        (&json!("high"), &json!(2.5), &json!(4))
    );
    assert_eq!(made["enabled"], true);
    assert!(made["created_at"].as_str().unwrap().ends_with('Z'));

    let (status, listed) = admin(&gw, Method::GET, "/admin/clients", None).await;
    assert_eq!(status, 200);
    let data = listed["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    let mut without_key = made.clone();
    without_key.as_object_mut().unwrap().remove("key");
    assert_eq!(data[0], without_key);
    let (status, shown) = admin(
        &gw,
        Method::GET,
        &format!("/admin/clients/{}", id(&made)),
        None,
    )
    .await;
    assert_eq!((status, &shown), (200, &without_key));

    // The key works on the gateway at once, within the client's models.
    assert_eq!(ask_as(&gw, &key, "gpt-4o-mini", 5).await.0, 200);
    let (status, _, body) = ask_as(&gw, &key, "gpt-4.1", 5).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("model_not_allowed"))
    );
    // With a client in the store the gateway is no longer open.
    assert_eq!(ask_as(&gw, "sk-made-up", "gpt-4o-mini", 5).await.0, 401);
    upstream.stop().await;
}

async fn bad_input_is_refused_naming_the_field(backend: Backend) {
    let store = TestStore::new(backend).await;
    let upstream = mock().await;
    let gw = gateway(&store, &upstream, "").await;
    let post = |body: Value| admin(&gw, Method::POST, "/admin/clients", Some(body));
    for (body, field) in [
        (json!({"name": "a", "rpm": 0}), "rpm"),
        (json!({"name": "a", "tpm": -5}), "tpm"),
        (json!({"name": "a", "rpm": "ten"}), "rpm"),
        (json!({"name": "a", "burst": 5}), "rate_per_second"),
        (json!({"name": "a", "rate_per_second": 1.0}), "burst"),
        (
            json!({"name": "a", "burst": 5, "rate_per_second": 0}),
            "rate_per_second",
        ),
        (json!({"name": "a", "models": []}), "models"),
        (json!({"name": "  "}), "name"),
        (json!({"rpm": 5}), "body"),
        (json!({"name": "a", "colour": "red"}), "colour"),
        (json!({"name": "a", "priority": "urgent"}), "priority"),
        (json!({"name": "a", "weight": 0}), "weight"),
        (json!({"name": "a", "weight": -2.5}), "weight"),
        (
            json!({"name": "a", "max_concurrency": 0}),
            "max_concurrency",
        ),
    ] {
        refused_naming(&post(body.clone()).await, &body, field);
    }
    // Not JSON at all.
    let raw = client()
        .post(gw.admin_url("/admin/clients"))
        .bearer_auth(ADMIN_TOKEN)
        .body("name=a")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);

    let made = create(&gw, json!({"name": "a"})).await;
    assert_eq!(code(&post(json!({"name": "a"})).await), (409, "name_taken"));
    let path = format!("/admin/clients/{}", id(&made));
    let answer = admin(&gw, Method::PATCH, &path, Some(json!({"rpm": 0}))).await;
    assert_eq!(
        (code(&answer), &answer.1["error"]["param"]),
        ((400, "invalid_value"), &json!("rpm"))
    );
    for (change, field) in [
        (json!({"enabled": "yes"}), "enabled"),
        (json!({"priority": "top"}), "priority"),
        (json!({"weight": 0.0}), "weight"),
    ] {
        let answer = admin(&gw, Method::PATCH, &path, Some(change)).await;
        assert_eq!(
            (code(&answer), &answer.1["error"]["param"]),
            ((400, "invalid_value"), &json!(field))
        );
    }
    no_such_client_is_found(&gw).await;
    let answer = admin(
        &gw,
        Method::GET,
        &format!("{path}/usage?from=yesterday"),
        None,
    )
    .await;
    assert_eq!(
        (code(&answer), &answer.1["error"]["param"]),
        ((400, "invalid_value"), &json!("from"))
    );
    upstream.stop().await;
}

async fn a_change_applies_to_the_next_request(backend: Backend) {
    let store = TestStore::new(backend).await;
    let upstream = mock().await;
    let gw = gateway(&store, &upstream, "").await;
    let made = create(&gw, json!({"name": "a", "models": ["gpt-4o-mini"]})).await;
    let (key, path) = (
        key(&made).to_owned(),
        format!("/admin/clients/{}", id(&made)),
    );
    assert_eq!(ask_as(&gw, &key, "gpt-4.1", 5).await.0, 403);

    // Models lifted, an rpm of 2 set: one PATCH, applied at once.
    let (status, changed) = admin(
        &gw,
        Method::PATCH,
        &path,
        Some(json!({"models": null, "rpm": 2, "name": "a2"})),
    )
    .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(
        (&changed["models"], &changed["rpm"], &changed["name"]),
        (&Value::Null, &json!(2), &json!("a2"))
    );
    assert!(changed.get("key").is_none());
    assert_eq!(ask_as(&gw, &key, "gpt-4.1", 5).await.0, 200);
    assert_eq!(ask_as(&gw, &key, "gpt-4o-mini", 5).await.0, 200);
    let (status, retry, body) = ask_as(&gw, &key, "gpt-4o-mini", 5).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("client_rate_limit_exceeded"))
    );
    assert!(retry.is_some());
    // Raising the limit keeps the window: 2 used of 3 leaves one.
    admin(&gw, Method::PATCH, &path, Some(json!({"rpm": 3}))).await;
    assert_eq!(ask_as(&gw, &key, "gpt-4o-mini", 5).await.0, 200);
    assert_eq!(ask_as(&gw, &key, "gpt-4o-mini", 5).await.0, 429);
    // `null` removes the limit.
    admin(&gw, Method::PATCH, &path, Some(json!({"rpm": null}))).await;
    assert_eq!(ask_as(&gw, &key, "gpt-4o-mini", 5).await.0, 200);
    upstream.stop().await;
}

async fn each_limit_of_a_stored_client_is_enforced(backend: Backend) {
    let store = TestStore::new(backend).await;
    let upstream = mock().await;
    let gw = gateway(&store, &upstream, "").await;
    // A bucket of 2 that refills once in 1000 s.
    let bucket = create(
        &gw,
        json!({"name": "bucket", "burst": 2, "rate_per_second": 0.001}),
    )
    .await;
    assert_eq!(ask_as(&gw, key(&bucket), "gpt-4o-mini", 5).await.0, 200);
    assert_eq!(ask_as(&gw, key(&bucket), "gpt-4o-mini", 5).await.0, 200);
    let (status, retry, body) = ask_as(&gw, key(&bucket), "gpt-4o-mini", 5).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("client_rate_limit_exceeded"))
    );
    let retry: u64 = retry.unwrap().parse().unwrap();
    assert!((900..=1000).contains(&retry), "Retry-After {retry}");

    let rpm = create(&gw, json!({"name": "rpm", "rpm": 1})).await;
    assert_eq!(ask_as(&gw, key(&rpm), "gpt-4o-mini", 5).await.0, 200);
    assert_eq!(ask_as(&gw, key(&rpm), "gpt-4o-mini", 5).await.0, 429);

    let tpm = create(&gw, json!({"name": "tpm", "tpm": 40})).await;
    assert_eq!(ask_as(&gw, key(&tpm), "gpt-4o-mini", 30).await.0, 200);
    assert_eq!(ask_as(&gw, key(&tpm), "gpt-4o-mini", 30).await.0, 429);
    let (status, _, body) = ask_as(&gw, key(&tpm), "gpt-4o-mini", 100).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("request_too_large"))
    );
    // Only admitted requests reached the upstream.
    assert_eq!(upstream.stats().requests(), 4);
    upstream.stop().await;
}

async fn disabled_deleted_and_rotated_keys_are_refused_at_once(backend: Backend) {
    let store = TestStore::new(backend).await;
    let upstream = mock().await;
    let gw = gateway(&store, &upstream, "").await;
    let made = create(&gw, json!({"name": "a"})).await;
    let path = format!("/admin/clients/{}", id(&made));
    let old_key = key(&made).to_owned();
    // Looked up once: now in the cache.
    assert_eq!(ask_as(&gw, &old_key, "gpt-4o-mini", 5).await.0, 200);

    let (status, _) = admin(&gw, Method::PATCH, &path, Some(json!({"enabled": false}))).await;
    assert_eq!(status, 200);
    let (status, _, body) = ask_as(&gw, &old_key, "gpt-4o-mini", 5).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    admin(&gw, Method::PATCH, &path, Some(json!({"enabled": true}))).await;
    assert_eq!(ask_as(&gw, &old_key, "gpt-4o-mini", 5).await.0, 200);

    let (status, rotated) = admin(&gw, Method::POST, &format!("{path}/rotate"), None).await;
    assert_eq!(status, 200);
    let new_key = key(&rotated).to_owned();
    assert_ne!(new_key, old_key);
    assert_eq!(rotated["id"], made["id"]);
    assert_eq!(ask_as(&gw, &old_key, "gpt-4o-mini", 5).await.0, 401);
    assert_eq!(ask_as(&gw, &new_key, "gpt-4o-mini", 5).await.0, 200);

    let response = client()
        .delete(gw.admin_url(&path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert!(response.bytes().await.unwrap().is_empty());
    assert_eq!(ask_as(&gw, &new_key, "gpt-4o-mini", 5).await.0, 401);
    assert_eq!(admin(&gw, Method::GET, &path, None).await.0, 404);
    upstream.stop().await;
}

async fn declared_clients_are_listed_and_refuse_changes(backend: Backend) {
    let store = TestStore::new(backend).await;
    let upstream = mock().await;
    let declared = "[[clients]]\nname = \"team-a\"\nkey_env = \"TEAM_A\"\nrpm = 60\n";
    let gw = gateway(&store, &upstream, declared).await;
    let (status, listed) = admin(&gw, Method::GET, "/admin/clients", None).await;
    assert_eq!(status, 200);
    let team = &listed["data"][0];
    assert_eq!(
        (&team["id"], &team["name"], &team["source"], &team["rpm"]),
        (
            &json!("cfg_team-a"),
            &json!("team-a"),
            &json!("config"),
            &json!(60)
        )
    );
    assert!(team.get("key").is_none());
    assert!("sk-declared-team-a-key".starts_with(team["key_prefix"].as_str().unwrap()));
    let path = "/admin/clients/cfg_team-a";
    assert_eq!(admin(&gw, Method::GET, path, None).await.1, *team);
    for (method, path) in [
        (Method::PATCH, path.to_owned()),
        (Method::DELETE, path.to_owned()),
        (Method::POST, format!("{path}/rotate")),
    ] {
        let body = (method == Method::PATCH).then(|| json!({"rpm": 1}));
        let answer = admin(&gw, method.clone(), &path, body).await;
        assert_eq!(
            code(&answer),
            (409, "client_declared_in_config"),
            "{method} {path}"
        );
    }
    let answer = admin(
        &gw,
        Method::POST,
        "/admin/clients",
        Some(json!({"name": "team-a"})),
    )
    .await;
    assert_eq!(code(&answer), (409, "name_taken"));
    // Its usage is kept like any client's.
    assert_eq!(
        ask_as(&gw, "sk-declared-team-a-key", "gpt-4o-mini", 5)
            .await
            .0,
        200
    );
    gw.settled_status().await;
    let (status, usage) = admin(&gw, Method::GET, &format!("{path}/usage"), None).await;
    assert_eq!((status, &usage["total"]["requests"]), (200, &json!(1)));
    upstream.stop().await;
}

async fn usage_matches_what_the_upstream_received(backend: Backend) {
    let store = TestStore::new(backend).await;
    let upstream = mock().await;
    let gw = gateway(&store, &upstream, "").await;
    let a = create(&gw, json!({"name": "a"})).await;
    let b = create(&gw, json!({"name": "b"})).await;
    let http = client();
    let mut sent_bytes = 0u64;
    let mut received_bytes = 0u64;
    for i in 0..6u64 {
        let model = if i % 2 == 0 { "gpt-4o-mini" } else { "gpt-4.1" };
        let body = json!({
            "model": model,
            "max_tokens": 10 + i,
            "stream": i >= 4,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": format!("question number {i}, please answer")}],
        })
        .to_string();
        sent_bytes += body.len() as u64;
        let response = http
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(key(&a))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        received_bytes += response.bytes().await.unwrap().len() as u64;
    }
    // Another client's request is not counted for this one.
    assert_eq!(ask_as(&gw, key(&b), "gpt-4o-mini", 5).await.0, 200);
    let b_upstream = upstream.stats().report();
    gw.settled_status().await;

    let (status, usage) = admin(
        &gw,
        Method::GET,
        &format!("/admin/clients/{}/usage", id(&a)),
        None,
    )
    .await;
    assert_eq!(status, 200, "{usage}");
    let (_, usage_b) = admin(
        &gw,
        Method::GET,
        &format!("/admin/clients/{}/usage", id(&b)),
        None,
    )
    .await;
    let stats = upstream.stats();
    let total = &usage["total"];
    let both =
        |field: &str| total[field].as_u64().unwrap() + usage_b["total"][field].as_u64().unwrap();
    assert_eq!(both("requests"), stats.requests());
    assert_eq!(both("prompt_tokens"), stats.prompt_tokens());
    assert_eq!(both("completion_tokens"), stats.completion_tokens());
    assert_eq!(total["requests"], 6);
    assert_eq!(total["request_bytes"], sent_bytes);
    assert_eq!(total["response_bytes"], received_bytes);
    assert!(total["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(usage_b["total"]["requests"], 1);
    assert_eq!(b_upstream.requests, 7);
    // By model and by day.
    assert_eq!(usage["by_model"]["gpt-4o-mini"]["requests"], 3);
    assert_eq!(usage["by_model"]["gpt-4.1"]["requests"], 3);
    let today = usage["to"].as_str().unwrap();
    assert_eq!(usage["by_day"][today]["requests"], 6);
    assert_eq!(usage["data"].as_array().unwrap().len(), 2);
    upstream.stop().await;
}

async fn clients_and_usage_survive_a_restart(backend: Backend) {
    let store = TestStore::new(backend).await;
    let upstream = mock().await;
    // No batch is due before the stop: only the stop itself can write.
    let gw = gateway_on(&store, "usage_flush_interval = \"1h\"", &upstream, "").await;
    let made = create(&gw, json!({"name": "a", "rpm": 50})).await;
    for _ in 0..3 {
        assert_eq!(ask_as(&gw, key(&made), "gpt-4o-mini", 5).await.0, 200);
    }
    // A graceful stop writes what the requests used; nothing asked for it before.
    gw.shutdown().await;

    let gw = gateway(&store, &upstream, "").await;
    let (status, shown) = admin(
        &gw,
        Method::GET,
        &format!("/admin/clients/{}", id(&made)),
        None,
    )
    .await;
    assert_eq!(
        (status, &shown["rpm"], &shown["name"]),
        (200, &json!(50), &json!("a"))
    );
    let (_, usage) = admin(
        &gw,
        Method::GET,
        &format!("/admin/clients/{}/usage", id(&made)),
        None,
    )
    .await;
    assert_eq!(usage["total"]["requests"], 3);
    assert_eq!(
        usage["total"]["prompt_tokens"],
        upstream.stats().prompt_tokens()
    );
    assert_eq!(ask_as(&gw, key(&made), "gpt-4o-mini", 5).await.0, 200);
    upstream.stop().await;
}

async fn the_store_never_holds_a_key(backend: Backend) {
    let store = TestStore::new(backend).await;
    let upstream = mock().await;
    let gw = gateway(&store, &upstream, "").await;
    let made = create(&gw, json!({"name": "a"})).await;
    let first = key(&made).to_owned();
    assert_eq!(ask_as(&gw, &first, "gpt-4o-mini", 5).await.0, 200);
    let (_, rotated) = admin(
        &gw,
        Method::POST,
        &format!("/admin/clients/{}/rotate", id(&made)),
        None,
    )
    .await;
    let second = key(&rotated).to_owned();
    assert_eq!(ask_as(&gw, &second, "gpt-4o-mini", 5).await.0, 200);
    gw.shutdown().await;
    let dump = store.dump().await;
    // The rows are there (the name, the hash of the current key)...
    assert!(dump.contains(&id(&made)));
    let hash: String = balancer::keys::hash_key(second.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(dump.contains(&hash), "the key's hash is stored");
    // ...and neither key, nor even the part past the shown prefix.
    for key in [&first, &second] {
        assert!(!dump.contains(key.as_str()));
        assert!(!dump.contains(&key[12..]));
    }
    upstream.stop().await;
}

async fn admin_nodes_shows_each_node_and_never_a_key(backend: Backend) {
    let store = TestStore::new(backend).await;
    let upstream = mock().await;
    let gw = gateway(&store, &upstream, "").await;
    let (status, nodes) = admin(&gw, Method::GET, "/admin/nodes", None).await;
    assert_eq!(status, 200);
    let node = &nodes["data"][0];
    assert_eq!(
        (&node["name"], &node["healthy"]),
        (&json!("n"), &json!(true))
    );
    assert!(node["limits"].is_object());
    assert!(!nodes.to_string().contains("sk-mock"));
    upstream.stop().await;
}

async fn changes_on_one_replica_reach_another_within_the_cache_ttl(backend: Backend) {
    let store = TestStore::new(backend).await;
    let upstream = mock().await;
    let ttl = "cache_ttl = \"200ms\"";
    let one = gateway_on(&store, ttl, &upstream, "").await;
    let other = gateway_on(&store, ttl, &upstream, "").await;
    let made = create(&one, json!({"name": "a"})).await;
    let key = key(&made).to_owned();
    // `other` learns of the new client within its cache TTL.
    // Every answer served counts in the client's usage.
    let served = std::cell::Cell::new(0u64);
    let ask_other = || async {
        let status = ask_as(&other, &key, "gpt-4o-mini", 5).await.0;
        served.set(served.get() + u64::from(status == 200));
        status
    };
    eventually(|| async { ask_other().await == 200 }).await;
    let path = format!("/admin/clients/{}", id(&made));
    admin(&one, Method::PATCH, &path, Some(json!({"enabled": false}))).await;
    // At once on the replica that made the change...
    assert_eq!(ask_as(&one, &key, "gpt-4o-mini", 5).await.0, 401);
    // ...and within the TTL on the other.
    eventually(|| async { ask_other().await == 401 }).await;
    // Both see the same clients and the same usage.
    let (_, listed) = admin(&other, Method::GET, "/admin/clients", None).await;
    assert_eq!(listed["data"][0]["enabled"], false);
    // (The request was served by `other`: its report writes it first.)
    let (_, usage_other) = admin(&other, Method::GET, &format!("{path}/usage"), None).await;
    let (_, usage) = admin(&one, Method::GET, &format!("{path}/usage"), None).await;
    assert_eq!(usage["total"]["requests"], served.get());
    assert_eq!(usage["total"], usage_other["total"]);
    upstream.stop().await;
}

macro_rules! on_both_stores {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Backend::Sqlite).await;
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Backend::Postgres).await;
            })*
        }
    };
}

on_both_stores!(
    the_admin_api_answers_only_to_its_token,
    a_client_gets_its_key_once_and_is_listed_without_it,
    bad_input_is_refused_naming_the_field,
    a_change_applies_to_the_next_request,
    each_limit_of_a_stored_client_is_enforced,
    disabled_deleted_and_rotated_keys_are_refused_at_once,
    declared_clients_are_listed_and_refuse_changes,
    usage_matches_what_the_upstream_received,
    clients_and_usage_survive_a_restart,
    the_store_never_holds_a_key,
    admin_nodes_shows_each_node_and_never_a_key,
    changes_on_one_replica_reach_another_within_the_cache_ttl,
);
