//! Stored objects behind a pool of keys: files, batches and stored
//! responses go to the node that holds them, only for the client that made
//! them; lists are the caller's, across nodes; multipart forms are routed
//! by their model. The mocks keep objects per key, so a request that
//! reached the wrong node would get the mock's 404.

use serde_json::{Value, json};

use crate::objects_kit::{At, BATCH_INPUT, OTHER_KEY, Pool, form, pool_toml};
use crate::support::{CLIENT_KEY, Gateway, client, send_json};

#[tokio::test]
async fn a_file_and_its_batch_stay_on_the_node_that_holds_them() {
    let pool = Pool::start().await;
    let (file, holder) = pool.at().upload(CLIENT_KEY, "in.jsonl", BATCH_INPUT).await;
    let (status, node, batch) = pool.at()
        .post_json(
            CLIENT_KEY,
            "/v1/batches",
            json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await;
    assert_eq!((status, node.as_str()), (200, holder.as_str()), "{batch}");
    let batch_id = batch["id"].as_str().unwrap();
    let (status, node, polled) = pool
        .at()
        .send(CLIENT_KEY, "GET", &format!("/v1/batches/{batch_id}"), None)
        .await;
    assert_eq!((status, node.as_str()), (200, holder.as_str()));
    assert_eq!(polled["status"], "completed");
    // The output file the batch made is the caller's too.
    let output = polled["output_file_id"].as_str().unwrap();
    let (status, _, content) = pool
        .at()
        .send(
            CLIENT_KEY,
            "GET",
            &format!("/v1/files/{output}/content"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(content.to_string().contains("r1"), "{content}");
    // Deleted, it is gone: the gateway answers, nothing goes upstream.
    let (status, _, _) = pool
        .at()
        .send(CLIENT_KEY, "DELETE", &format!("/v1/files/{file}"), None)
        .await;
    assert_eq!(status, 200);
    let before = pool.upstream_requests();
    let (status, node, gone) = pool
        .at()
        .send(CLIENT_KEY, "GET", &format!("/v1/files/{file}"), None)
        .await;
    assert_eq!((status, node.as_str()), (404, ""));
    assert_eq!(gone["error"]["code"], "object_not_found");
    assert_eq!(pool.upstream_requests(), before);
}

#[tokio::test]
async fn a_stored_response_is_continued_on_its_node_every_time() {
    let pool = Pool::start().await;
    let (status, first_node, mut previous) = pool
        .at()
        .post_json(
            CLIENT_KEY,
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "input": "hi"}),
        )
        .await;
    assert_eq!(status, 200);
    for turn in 0..20 {
        let (status, node, next) = pool.at()
            .post_json(
                CLIENT_KEY,
                "/v1/responses",
                json!({"model": "gpt-4o-mini", "input": "and then?", "previous_response_id": previous["id"]}),
            )
            .await;
        assert_eq!(
            (status, node.as_str()),
            (200, first_node.as_str()),
            "turn {turn}: {next}"
        );
        previous = next;
    }
    // Not stored: not recorded, so it cannot be continued.
    let (_, _, unstored) = pool
        .at()
        .post_json(
            CLIENT_KEY,
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "input": "hi", "store": false}),
        )
        .await;
    let (status, _, refused) = pool
        .at()
        .post_json(
            CLIENT_KEY,
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "input": "x", "previous_response_id": unstored["id"]}),
        )
        .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (404, Some("object_not_found"))
    );
}

#[tokio::test]
async fn a_streamed_response_is_recorded_as_it_starts() {
    let pool = Pool::start().await;
    let response = send_json(
        pool.gw.url("/v1/responses"),
        Some(CLIENT_KEY),
        json!({"model": "gpt-4o-mini", "input": "hi", "stream": true}).to_string(),
    )
    .await;
    let holder = response.headers()["x-balancer-node"]
        .to_str()
        .unwrap()
        .to_owned();
    let text = response.text().await.unwrap();
    let created = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .unwrap();
    let id = created["response"]["id"].as_str().unwrap().to_owned();
    // Recorded in the store just after the event: retried until it is.
    let found = crate::support::eventually(std::time::Duration::from_secs(5), async || {
        let (status, node, _) = pool
            .at()
            .send(CLIENT_KEY, "GET", &format!("/v1/responses/{id}"), None)
            .await;
        (status == 200).then_some(node)
    })
    .await;
    assert_eq!(found.as_deref(), Some(holder.as_str()));
    // Once recorded, every request for it goes there.
    for _ in 0..6 {
        let (status, node, _) = pool
            .at()
            .send(CLIENT_KEY, "GET", &format!("/v1/responses/{id}"), None)
            .await;
        assert_eq!((status, node.as_str()), (200, holder.as_str()));
    }
}

#[tokio::test]
async fn another_client_never_sees_an_object_and_nothing_is_sent_upstream() {
    let pool = Pool::start().await;
    let (file, _) = pool.at().upload(CLIENT_KEY, "in.jsonl", BATCH_INPUT).await;
    let (_, _, batch) = pool.at()
        .post_json(
            CLIENT_KEY,
            "/v1/batches",
            json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await;
    let before = pool.upstream_requests();
    for path in [
        format!("/v1/files/{file}"),
        format!("/v1/files/{file}/content"),
        format!("/v1/batches/{}", batch["id"].as_str().unwrap()),
    ] {
        let (status, node, body) = pool.at().send(OTHER_KEY, "GET", &path, None).await;
        assert_eq!((status, node.as_str()), (404, ""), "{path}");
        assert_eq!(body["error"]["code"], "object_not_found");
    }
    // Naming it in a body is no way around it.
    let (status, _, body) = pool.at()
        .post_json(
            OTHER_KEY,
            "/v1/batches",
            json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("object_not_found"))
    );
    assert_eq!(pool.upstream_requests(), before);
    // The other client's list is empty; the owner's holds both files.
    let (_, _, theirs) = pool.at().send(OTHER_KEY, "GET", "/v1/files", None).await;
    assert_eq!(theirs["data"], json!([]));
    let (_, _, ours) = pool.at().send(CLIENT_KEY, "GET", "/v1/files", None).await;
    assert_eq!(ours["data"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn lists_page_through_the_callers_objects_across_nodes() {
    let pool = Pool::start().await;
    let mut ids = Vec::new();
    let mut nodes = std::collections::BTreeSet::new();
    for i in 0..7 {
        let (id, node) = pool
            .at()
            .upload(CLIENT_KEY, &format!("f{i}.jsonl"), BATCH_INPUT)
            .await;
        ids.push(id);
        nodes.insert(node);
    }
    assert!(nodes.len() > 1, "spread over {nodes:?}");
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = after
            .as_ref()
            .map_or_else(String::new, |a| format!("&after={a}"));
        let (status, _, page) = pool
            .at()
            .send(
                CLIENT_KEY,
                "GET",
                &format!("/v1/files?limit=3{query}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 3);
        seen.extend(data.iter().map(|f| f["id"].as_str().unwrap().to_owned()));
        assert_eq!(
            page["last_id"],
            data.last().map_or(Value::Null, |f| f["id"].clone())
        );
        if page["has_more"] != true {
            break;
        }
        after = page["last_id"].as_str().map(str::to_owned);
    }
    let mut expected = ids.clone();
    expected.sort();
    let mut got = seen.clone();
    got.sort();
    assert_eq!(got, expected, "every file once, no more");
    // Newest first: the page order follows the records' creation times.
    let (_, _, asc) = pool
        .at()
        .send(CLIENT_KEY, "GET", "/v1/files?order=asc&limit=100", None)
        .await;
    let ascending: Vec<&str> = asc["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    let descending: Vec<&str> = seen.iter().map(String::as_str).rev().collect();
    assert_eq!(ascending, descending);
}

#[tokio::test]
async fn a_transcription_goes_to_the_node_that_serves_its_model() {
    let pool = Pool::start().await;
    for _ in 0..3 {
        let body = form(&[
            ("file", Some("a.wav"), &[1u8; 9_000]),
            ("model", None, b"whisper-1"),
        ]);
        let (status, node, answer) = pool
            .at()
            .send(CLIENT_KEY, "POST", "/v1/audio/transcriptions", Some(body))
            .await;
        assert_eq!((status, node.as_str()), (200, "a"), "{answer}");
    }
    // Its usage is settled on the node: 9,000 bytes are 4 tokens, plus 4.
    let status = pool.gw.settled_status().await;
    assert_eq!(
        crate::support::node_status(&status, "a")["tokens_settled"],
        json!({"prompt": 12, "completion": 12})
    );
    let no_model = form(&[("file", Some("a.wav"), b"RIFF")]);
    let (status, _, body) = pool
        .at()
        .send(
            CLIENT_KEY,
            "POST",
            "/v1/audio/transcriptions",
            Some(no_model),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("missing_model"))
    );
    let broken = (
        "multipart/form-data; boundary=bOuNdArY".to_owned(),
        b"--bOuNdArY\r\nno".to_vec(),
    );
    let (status, _, body) = pool
        .at()
        .send(CLIENT_KEY, "POST", "/v1/audio/transcriptions", Some(broken))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_multipart"))
    );
}

#[tokio::test]
async fn bad_ids_and_ids_on_two_nodes_are_refused_before_anything_is_sent() {
    let pool = Pool::start().await;
    // Two files, on two different nodes.
    let mut by_node = std::collections::BTreeMap::new();
    while by_node.len() < 2 {
        let (id, node) = pool.at().upload(CLIENT_KEY, "x.jsonl", BATCH_INPUT).await;
        by_node.insert(node, id);
    }
    let ids: Vec<&String> = by_node.values().collect();
    let before = pool.upstream_requests();
    let (status, _, body) = pool
        .at()
        .post_json(
            CLIENT_KEY,
            "/v1/vector_stores",
            json!({"file_ids": [ids[0], ids[1]]}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("objects_on_different_nodes")),
        "{body}"
    );
    for path in ["/v1/files/a.b", "/v1/batches//cancel"] {
        let (status, _, body) = pool.at().send(CLIENT_KEY, "GET", path, None).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_object_id")),
            "{path}"
        );
    }
    let (status, _, body) = pool
        .at()
        .post_json(
            CLIENT_KEY,
            "/v1/batches",
            json!({"input_file_id": "file id with spaces"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_object_id"))
    );
    assert_eq!(pool.upstream_requests(), before);
}

#[tokio::test]
async fn an_object_on_a_node_gone_from_the_config_is_unavailable_and_the_rest_works() {
    let pool = Pool::start().await;
    let mut by_node = std::collections::BTreeMap::new();
    while by_node.len() < 3 {
        let (id, node) = pool.at().upload(CLIENT_KEY, "x.jsonl", BATCH_INPUT).await;
        by_node.insert(node, id);
    }
    // Node `c` leaves the config.
    let path = pool.gw.config_path();
    std::fs::write(&path, pool_toml(&pool.mocks, &[0, 1])).unwrap();
    pool.gw.reloaded(1).await;
    let (status, _, body) = pool
        .at()
        .send(
            CLIENT_KEY,
            "GET",
            &format!("/v1/files/{}", by_node["c"]),
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("object_unavailable"))
    );
    assert!(
        body["error"]["message"].as_str().unwrap().contains("'c'"),
        "{body}"
    );
    for node in ["a", "b"] {
        let (status, served_by, _) = pool
            .at()
            .send(
                CLIENT_KEY,
                "GET",
                &format!("/v1/files/{}", by_node[node]),
                None,
            )
            .await;
        assert_eq!((status, served_by.as_str()), (200, node));
    }
    // Back in the config, its objects are back.
    std::fs::write(&path, &pool.toml).unwrap();
    pool.gw.reloaded(2).await;
    let (status, _, _) = pool
        .at()
        .send(
            CLIENT_KEY,
            "GET",
            &format!("/v1/files/{}", by_node["c"]),
            None,
        )
        .await;
    assert_eq!(status, 200);
}

/// Two replicas sharing a PostgreSQL store route each other's objects: an
/// object made through one is found, pinned and private through the other
/// at once.
#[tokio::test]
async fn two_replicas_sharing_postgresql_route_each_others_objects() {
    let pool = Pool::start().await;
    let url = crate::pg::fresh_database().await;
    let toml = format!("[store]\nurl = \"{url}\"\n{}", pool.toml);
    let env = [("OTHER", OTHER_KEY)];
    let first = Gateway::start_file_text(&toml, &env).await;
    let second = Gateway::start_file_text(&toml, &env).await;
    let (a, b) = (At(&first), At(&second));
    let (file, holder) = a.upload(CLIENT_KEY, "in.jsonl", BATCH_INPUT).await;
    let (status, node, batch) = b
        .post_json(
            CLIENT_KEY,
            "/v1/batches",
            json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await;
    assert_eq!((status, node.as_str()), (200, holder.as_str()), "{batch}");
    let (status, node, _) = a
        .send(
            CLIENT_KEY,
            "GET",
            &format!("/v1/batches/{}", batch["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!((status, node.as_str()), (200, holder.as_str()));
    let (_, started_on, mut previous) = a
        .post_json(
            CLIENT_KEY,
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "input": "hi"}),
        )
        .await;
    for gw in [&b, &a, &b] {
        let (status, node, next) = gw
            .post_json(
                CLIENT_KEY,
                "/v1/responses",
                json!({"model": "gpt-4o-mini", "input": "more", "previous_response_id": previous["id"]}),
            )
            .await;
        assert_eq!(
            (status, node.as_str()),
            (200, started_on.as_str()),
            "{next}"
        );
        previous = next;
    }
    let (status, _, _) = b
        .send(OTHER_KEY, "GET", &format!("/v1/files/{file}"), None)
        .await;
    assert_eq!(status, 404);
    let (_, _, listed) = b.send(CLIENT_KEY, "GET", "/v1/files", None).await;
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&file.as_str()), "{listed}");
}

#[tokio::test]
async fn an_operator_lists_a_clients_objects_through_the_admin_api() {
    let pool = Pool::start().await;
    let toml = format!("[admin]\ntoken_env = \"TEST_ADMIN_TOKEN\"\n{}", pool.toml);
    let gw = Gateway::start_file_text(&toml, &[("OTHER", OTHER_KEY)]).await;
    let (theirs, node) = At(&gw).upload(OTHER_KEY, "t.jsonl", BATCH_INPUT).await;
    let (ours, _) = At(&gw).upload(CLIENT_KEY, "o.jsonl", BATCH_INPUT).await;
    let objects = |who: &'static str| {
        let url = gw.admin_url(&format!("/admin/clients/{who}/objects"));
        async move {
            let response = client()
                .get(url)
                .header(
                    "authorization",
                    format!("Bearer {}", crate::support::ADMIN_TOKEN),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            serde_json::from_slice::<Value>(&response.bytes().await.unwrap()).unwrap()
        }
    };
    let listed = objects("cfg_other").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["data"][0]["id"], theirs.as_str());
    assert_eq!(listed["data"][0]["object"], "file");
    assert_eq!(listed["data"][0]["node"], node.as_str());
    let shared = objects("shared").await;
    assert_eq!(shared["data"][0]["id"], ours.as_str());
}
