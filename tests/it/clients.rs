//! Clients declared in the config: their own key, limits and models,
//! applied before any node is chosen.

use std::time::Duration;

use mock_upstreams::{MockConfig, MockUpstream};

use crate::support::{Gateway, ask_as as ask, node};

const TEAM_A: &str = "sk-team-a-key";
const TEAM_B: &str = "sk-team-b-key";

async fn gateway(upstream: &MockUpstream, clients: &str) -> Gateway {
    let toml = format!(
        "[queue]\nmax_wait = \"2s\"\n{clients}{}",
        node("n", &upstream.base_url(), "sk-mock", "")
    );
    Gateway::start_file_text(&toml, &[("TEAM_A", TEAM_A), ("TEAM_B", TEAM_B)]).await
}

async fn mock() -> MockUpstream {
    MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockConfig::new("sk-mock"))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_client_over_its_rpm_gets_429_and_other_clients_do_not_notice() {
    let upstream = mock().await;
    let gw = gateway(
        &upstream,
        "[[clients]]\nname = \"a\"\nkey_env = \"TEAM_A\"\nrpm = 2\n[[clients]]\nname = \"b\"\nkey_env = \"TEAM_B\"\n",
    )
    .await;
    assert_eq!(ask(&gw, TEAM_A, "gpt-4o-mini", 5).await.0, 200);
    assert_eq!(ask(&gw, TEAM_A, "gpt-4o-mini", 5).await.0, 200);
    let (status, retry, body) = ask(&gw, TEAM_A, "gpt-4o-mini", 5).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "client_rate_limit_exceeded");
    let retry: u64 = retry.expect("a Retry-After").parse().unwrap();
    assert!((59..=61).contains(&retry), "Retry-After {retry}");
    for _ in 0..3 {
        assert_eq!(ask(&gw, TEAM_B, "gpt-4o-mini", 5).await.0, 200);
    }
    // The refused request never reached the upstream.
    assert_eq!(upstream.stats().requests(), 5);
    upstream.stop().await;
}

#[tokio::test]
async fn a_token_bucket_allows_its_burst_then_one_request_per_refill() {
    let upstream = mock().await;
    let gw = gateway(
        &upstream,
        "[[clients]]\nname = \"a\"\nkey_env = \"TEAM_A\"\nburst = 2\nrate_per_second = 0.5\n",
    )
    .await;
    assert_eq!(ask(&gw, TEAM_A, "gpt-4o-mini", 5).await.0, 200);
    assert_eq!(ask(&gw, TEAM_A, "gpt-4o-mini", 5).await.0, 200);
    let (status, retry, body) = ask(&gw, TEAM_A, "gpt-4o-mini", 5).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("client_rate_limit_exceeded"))
    );
    // One token every 2 s: the next one is at most 2 s away.
    let retry: u64 = retry.unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(ask(&gw, TEAM_A, "gpt-4o-mini", 5).await.0, 200);
    upstream.stop().await;
}

#[tokio::test]
async fn tpm_counts_each_reservation_and_refuses_what_would_not_fit() {
    let upstream = mock().await;
    let gw = gateway(
        &upstream,
        "[[clients]]\nname = \"a\"\nkey_env = \"TEAM_A\"\ntpm = 40\n",
    )
    .await;
    // Prompt and 30 completion tokens fit in 40 once.
    let code = |answer: (u16, Option<String>, serde_json::Value)| {
        (
            answer.0,
            answer.2["error"]["code"].as_str().map(str::to_owned),
        )
    };
    assert_eq!(code(ask(&gw, TEAM_A, "gpt-4o-mini", 30).await), (200, None));
    // Settled to its actual use, the first leaves too little for another 30.
    assert_eq!(
        code(ask(&gw, TEAM_A, "gpt-4o-mini", 30).await),
        (429, Some("client_rate_limit_exceeded".to_owned()))
    );
    // More than the whole limit can never fit: 400, not a wait.
    assert_eq!(
        code(ask(&gw, TEAM_A, "gpt-4o-mini", 100).await),
        (400, Some("request_too_large".to_owned()))
    );
    assert_eq!(upstream.stats().requests(), 1);
    upstream.stop().await;
}

#[tokio::test]
async fn a_model_outside_the_list_is_403_and_a_disabled_client_is_401() {
    let upstream = mock().await;
    let gw = gateway(
        &upstream,
        "[[clients]]\nname = \"a\"\nkey_env = \"TEAM_A\"\nmodels = [\"gpt-4o-mini\"]\n\
         [[clients]]\nname = \"b\"\nkey_env = \"TEAM_B\"\nenabled = false\n",
    )
    .await;
    assert_eq!(ask(&gw, TEAM_A, "gpt-4o-mini", 5).await.0, 200);
    let (status, _, body) = ask(&gw, TEAM_A, "gpt-4.1", 5).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("model_not_allowed"))
    );
    let (status, _, body) = ask(&gw, TEAM_B, "gpt-4o-mini", 5).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let (status, _, _) = ask(&gw, "sk-nobody", "gpt-4o-mini", 5).await;
    assert_eq!(status, 401);
    assert_eq!(upstream.stats().requests(), 1);
    upstream.stop().await;
}
