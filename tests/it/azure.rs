//! Azure OpenAI deployments as nodes, and Azure-style clients, against
//! mocks that play Azure (deployment paths, `api-version`, `api-key`, only
//! `remaining` headers, 10 s windows charged at arrival).

use mock_upstreams::{MockConfig, MockUpstream};
use serde_json::{Value, json};

use crate::support::{CLIENT_KEY, Gateway, chat, client, node, node_status, say};

pub(crate) const VERSION: &str = "2024-10-21";

pub(crate) async fn azure_mock(
    deployment: &str,
    rpm: Option<u64>,
    tpm: Option<u64>,
) -> MockUpstream {
    let config = MockConfig::new("az-key")
        .azure()
        .models(&[deployment])
        .quota(rpm, tpm);
    MockUpstream::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

/// The mock's endpoint, as an Azure node's `url`.
fn endpoint(mock: &MockUpstream) -> String {
    format!("http://{}", mock.addr())
}

pub(crate) fn azure_node(name: &str, mock: &MockUpstream, extra: &str) -> String {
    node(
        name,
        &endpoint(mock),
        "az-key",
        &format!("api = \"azure\"\ndeployments = {{ \"gpt-4o-mini\" = \"mini-east\" }}\n{extra}"),
    )
}

async fn json_of(response: reqwest::Response) -> Value {
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

#[tokio::test]
async fn an_openai_client_is_served_by_a_classic_azure_deployment() {
    let mock = azure_mock("mini-east", None, None).await;
    let gw = Gateway::start(&azure_node(
        "az",
        &mock,
        &format!("api_version = \"{VERSION}\""),
    ))
    .await;
    let response = say(&gw, chat("gpt-4o-mini", "hi", 5)).await;
    assert_eq!(response.status(), 200);
    let body = json_of(response).await;
    // The mock answers for the deployment the path named.
    assert_eq!(body["model"], "mini-east");
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
    let completion = body["usage"]["completion_tokens"].as_u64().unwrap();

    let streamed = say(
        &gw,
        json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 5,
               "messages": [{"role": "user", "content": "hi"}]})
        .to_string(),
    )
    .await;
    assert_eq!(streamed.status(), 200);
    let text = String::from_utf8(streamed.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    let stats = mock.stats().report();
    assert_eq!((stats.served, stats.unauthorized), (2, 0));
    // The node's window holds what the answer reported.
    let status = gw.settled_status().await;
    let az = node_status(&status, "az");
    assert_eq!(az["limits"]["rpm"]["used"], 2);
    assert!(az["limits"]["tpm"]["used"].as_u64().unwrap() >= prompt + completion);
    assert_eq!(az["short_window"]["seconds"], 10.0);
}

#[tokio::test]
async fn the_v1_surface_gets_the_deployment_as_the_body_model() {
    let mock = azure_mock("mini-east", None, None).await;
    // No api_version: /openai/v1/..., where the mock refuses any model that
    // is not one of its deployments.
    let gw = Gateway::start(&azure_node("az", &mock, "")).await;
    let response = say(&gw, chat("gpt-4o-mini", "hi", 5)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(json_of(response).await["model"], "mini-east");
    let responses = crate::support::post(
        &client(),
        &gw,
        "/v1/responses",
        json!({"model": "gpt-4o-mini", "input": "hi"}).to_string(),
    )
    .await;
    assert_eq!(responses.status(), 200);
    let body = json_of(responses).await;
    assert_eq!(body["object"], "response");
    assert_eq!(mock.stats().report().served, 2);
}

#[tokio::test]
async fn an_azure_style_client_is_served_by_openai_and_azure_nodes_alike() {
    let azure = azure_mock("mini-east", None, None).await;
    let openai = MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockConfig::new("sk-openai"))
        .await
        .unwrap();
    let toml = format!(
        "[auth]\nclient_keys_env = [\"TEST_CLIENT_KEY\"]\n{}{}",
        azure_node("az", &azure, &format!("api_version = \"{VERSION}\"")),
        node(
            "oa",
            &openai.base_url(),
            "sk-openai",
            "models = [\"gpt-4o-mini\"]"
        ),
    );
    let gw = Gateway::start_file_text(&toml, &[("TEST_CLIENT_KEY", CLIENT_KEY)]).await;
    let paths = [
        format!("/openai/deployments/gpt-4o-mini/chat/completions?api-version={VERSION}"),
        "/openai/v1/chat/completions".to_owned(),
    ];
    for path in &paths {
        for _ in 0..4 {
            let response = client()
                .post(gw.url(path))
                .header("api-key", CLIENT_KEY)
                .header("content-type", "application/json")
                .body(chat("gpt-4o-mini", "hi", 5))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{path}");
            response.bytes().await.unwrap();
        }
    }
    // Both nodes served; neither saw the gateway's key.
    let (a, o) = (azure.stats().report(), openai.stats().report());
    assert_eq!(a.served + o.served, 8);
    assert!(
        a.served > 0 && o.served > 0,
        "azure {} openai {}",
        a.served,
        o.served
    );
    assert_eq!((a.unauthorized, o.unauthorized), (0, 0));
    // A wrong gateway key is refused before anything reaches a node.
    let refused = client()
        .post(gw.url(&paths[0]))
        .header("api-key", "sk-not-a-client")
        .header("content-type", "application/json")
        .body(chat("gpt-4o-mini", "hi", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(
        azure.stats().report().requests + openai.stats().report().requests,
        8
    );
}

#[tokio::test]
async fn an_azure_node_is_probed_in_its_dialect_and_a_refused_key_is_confirmed() {
    let good = azure_mock("mini-east", None, None).await;
    let other = azure_mock("mini-east", None, None).await;
    let toml = format!(
        "[health]\ninterval = \"200ms\"\n{}{}",
        azure_node("good", &good, &format!("api_version = \"{VERSION}\"")),
        // A key this resource does not take.
        azure_node("bad", &other, "").replace("\"az-key\"", "\"az-wrong-key\""),
    );
    let gw = Gateway::start(&toml).await;
    let status = gw
        .until(|s| {
            node_status(s, "good")["health"]["last_probe"]["ok"] == true
                && node_status(s, "bad")["health"]["state"] == "key_refused"
        })
        .await;
    assert_eq!(node_status(&status, "good")["healthy"], true);
    // Every request now goes to the good node.
    for _ in 0..3 {
        assert_eq!(say(&gw, chat("gpt-4o-mini", "hi", 5)).await.status(), 200);
    }
    assert_eq!(good.stats().report().served, 3);
    assert_eq!(other.stats().report().served, 0);
}

#[tokio::test]
async fn an_azure_deployment_is_charged_at_arrival_within_its_ten_second_window() {
    // tpm 6000 is 1000 tokens per 10 s, at the mock and at the gateway (an
    // Azure node's default window), charged at arrival as prompt +
    // max_tokens and never given back.
    let mock = azure_mock("mini-east", None, Some(6000)).await;
    let gw = Gateway::start(&format!(
        "[queue]\nmax_wait = \"500ms\"\n{}",
        azure_node(
            "az",
            &mock,
            &format!("api_version = \"{VERSION}\"\ntpm = 6000")
        ),
    ))
    .await;
    // "hi" is 8 prompt tokens: three asking 300 take 924 of the 1000, though
    // each uses far less; a fourth does not fit.
    let asking = |_| chat("gpt-4o-mini", "hi", 300);
    let statuses: Vec<u16> = crate::support::post_many(&gw, 4, 1, asking)
        .await
        .iter()
        .map(|o| o.status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429]);
    // What is left, 76, holds five asking 5 (13 each), not six.
    let small = crate::support::post_many(&gw, 8, 8, |_| chat("gpt-4o-mini", "hi", 5)).await;
    let tally = crate::support::tally(&small);
    assert_eq!(
        (tally.get(&200), tally.get(&429)),
        (Some(&5), Some(&3)),
        "{tally:?}"
    );
    let stats = mock.stats().report();
    assert_eq!(stats.rate_limited, 0, "the mock never had to refuse");
    assert_eq!(stats.served, 8);
    let status = gw.settled_status().await;
    assert_eq!(
        node_status(&status, "az")["short_window"]["tpm"]["used"],
        989
    );
}

#[tokio::test]
async fn an_azure_deployment_takes_a_sixth_of_its_rpm_per_ten_seconds() {
    let mock = azure_mock("mini-east", Some(60), None).await;
    let gw = Gateway::start(&format!(
        "[queue]\nmax_wait = \"500ms\"\n{}",
        azure_node(
            "az",
            &mock,
            &format!("api_version = \"{VERSION}\"\nrpm = 60")
        ),
    ))
    .await;
    let outcomes = crate::support::post_many(&gw, 14, 14, |_| chat("gpt-4o-mini", "hi", 5)).await;
    let tally = crate::support::tally(&outcomes);
    assert_eq!(
        (tally.get(&200), tally.get(&429)),
        (Some(&10), Some(&4)),
        "{tally:?}"
    );
    // Refused by the gateway, with the wait until the span frees.
    assert!(
        outcomes
            .iter()
            .filter(|o| o.status == 429)
            .all(|o| o.retry_after.is_some_and(|s| (1..=11).contains(&s)))
    );
    let stats = mock.stats().report();
    assert_eq!((stats.served, stats.rate_limited), (10, 0));
}
