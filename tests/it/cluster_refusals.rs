//! One refusal policy, local or shared: the same situation gets the same
//! answer whether limits are kept here or shared through Redis.

use std::time::Duration;

use crate::redis::RedisServer;
use crate::support::{Gateway, ask_as, chat, node};

/// Nodes for [`local_and_shared_admission_refuse_alike`]: one whose key is
/// refused, one with a tiny tpm, one with a concurrency of one.
fn refusal_nodes(refusing: &wiremock::MockServer, slow: &wiremock::MockServer) -> String {
    format!(
        "{}{}{}",
        node(
            "refused",
            &crate::support::v1(refusing),
            "k",
            "models = [\"gpt-4\"]"
        ),
        node(
            "small",
            &crate::support::v1(slow),
            "k",
            "models = [\"gpt-4o\"]\ntpm = 100"
        ),
        node(
            "one",
            &crate::support::v1(slow),
            "k",
            "models = [\"gpt-4o-mini\"]\nmax_concurrency = 1"
        ),
    )
}

/// One refusal policy: the same situation gets the same status, code,
/// message and `Retry-After` whether limits are kept here or shared
/// through Redis.
#[tokio::test]
async fn local_and_shared_admission_refuse_alike() {
    use wiremock::ResponseTemplate;
    let redis = RedisServer::start();
    // Refuses the key, to requests and to the probe that confirms it.
    let refusing = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::any())
        .respond_with(ResponseTemplate::new(401).set_body_json(
            serde_json::json!({"error": {"message": "bad key", "type": "invalid_request_error", "code": "invalid_api_key"}}),
        ))
        .mount(&refusing)
        .await;
    let slow = crate::support::answering_upstream(Duration::from_secs(3)).await;
    let nodes = refusal_nodes(&refusing, &slow);
    let settings = "[queue]\nmax_wait = \"300ms\"\n[auth]\nclient_keys_env = [\"TEST_CLIENT_KEY\"]\n[[clients]]\nname = \"tight\"\nkey_env = \"TIGHT\"\ntpm = 10\n";
    let env = [("TIGHT", "sk-tight-client")];
    let shared = format!(
        "{settings}[cluster]\nredis_url = \"{}\"\ntimeout = \"5s\"\n{nodes}",
        redis.url()
    );
    let local = Gateway::start_file_text(&format!("{settings}{nodes}"), &env).await;
    let shared = Gateway::start_file_text(&shared, &env).await;
    shared.until(|s| s["cluster"]["redis"] == "up").await;

    let answer = async |gw: &Gateway, key: &str, model: &str, max_tokens: u64| {
        let (status, retry, body) = ask_as(gw, key, model, max_tokens).await;
        let error = &body["error"];
        (
            status,
            retry,
            error["code"].clone(),
            error["message"].clone(),
        )
    };
    // The refused key takes its node out of rotation in both.
    for gw in [&local, &shared] {
        assert_eq!(
            answer(gw, crate::support::CLIENT_KEY, "gpt-4", 5).await.0,
            401
        );
    }
    let situations: [(&str, &str, u64, u16); 4] = [
        // Every node that serves it is out of rotation.
        (crate::support::CLIENT_KEY, "gpt-4", 5, 503),
        // It alone exceeds every serving node's tpm.
        (crate::support::CLIENT_KEY, "gpt-4o", 500, 400),
        // It alone exceeds the client's own tpm.
        ("sk-tight-client", "gpt-4o-mini", 500, 400),
        // Its only node is at max_concurrency until the queue's wait ends.
        (crate::support::CLIENT_KEY, "gpt-4o-mini", 5, 429),
    ];
    for (key, model, max_tokens, status) in situations {
        let held = (status == 429).then(|| {
            [&local, &shared]
                .map(|gw| crate::support::send_in_background(gw, chat(model, "hold", 5)))
        });
        if held.is_some() {
            for gw in [&local, &shared] {
                gw.until(|s| crate::support::node_status(s, "one")["in_flight"] == 1)
                    .await;
            }
        }
        let here = answer(&local, key, model, max_tokens).await;
        let there = answer(&shared, key, model, max_tokens).await;
        assert_eq!(here.0, status, "{model}: {here:?}");
        assert_eq!(here, there, "{model}: local and shared answers differ");
        for task in held.into_iter().flatten() {
            assert_eq!(task.await.unwrap().0, 200);
        }
    }
}
