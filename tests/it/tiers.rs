//! Node tiers: the lowest tier with headroom is filled first, a request
//! goes up a tier only when the lower one is full (counted as a spill),
//! and a client's `max_tier` holds even when that means waiting.

use crate::support::{
    ADMIN_TOKEN, Gateway, ask_as, chat_upstream, get_text, node, node_status, v1,
};

/// A prepaid node (tier 0, 3 requests a minute) and a pay-as-you-go one
/// (tier 1); a client `batch` (key `sk-batch`) that may use tier 0 only,
/// and `web` (key `sk-web`) that may use any.
async fn tiered() -> (Gateway, wiremock::MockServer, wiremock::MockServer) {
    let (prepaid, payg) = (chat_upstream().await, chat_upstream().await);
    let toml = format!(
        "[queue]\nmax_wait = \"300ms\"\n[[clients]]\nname = \"batch\"\nkey_env = \"BATCH\"\nmax_tier = 0\n[[clients]]\nname = \"web\"\nkey_env = \"WEB\"\n{}{}",
        node("payg", &v1(&payg), "k", "tier = 1"),
        node("prepaid", &v1(&prepaid), "k", "tier = 0\nrpm = 3"),
    );
    let gw = Gateway::start_file_text(&toml, &[("BATCH", "sk-batch"), ("WEB", "sk-web")]).await;
    (gw, prepaid, payg)
}

const WEB: &str = "sk-web";

async fn posts(server: &wiremock::MockServer) -> usize {
    server.received_requests().await.unwrap().len()
}

#[tokio::test]
async fn the_lowest_tier_fills_first_and_only_the_overflow_spills() {
    let (gw, prepaid, payg) = tiered().await;
    for _ in 0..3 {
        assert_eq!(ask_as(&gw, WEB, "gpt-4o-mini", 5).await.0, 200);
    }
    assert_eq!(
        (posts(&prepaid).await, posts(&payg).await),
        (3, 0),
        "tier 0 first, though tier 1 is idle"
    );
    for _ in 0..4 {
        assert_eq!(ask_as(&gw, WEB, "gpt-4o-mini", 5).await.0, 200);
    }
    assert_eq!(
        (posts(&prepaid).await, posts(&payg).await),
        (3, 4),
        "tier 0 full: the rest spills"
    );
    let status = gw.status().await;
    assert_eq!(node_status(&status, "prepaid")["tier"], 0);
    assert_eq!(node_status(&status, "payg")["tier"], 1);
    let scrape = get_text(gw.url("/metrics"), Some(ADMIN_TOKEN)).await;
    assert!(
        scrape.contains(r#"balancer_spill_total{from_tier="0",to_tier="1"} 4"#),
        "{scrape}"
    );
}

#[tokio::test]
async fn a_client_limited_to_tier_0_waits_for_it_and_never_spills() {
    let (gw, prepaid, payg) = tiered().await;
    for _ in 0..3 {
        assert_eq!(ask_as(&gw, "sk-batch", "gpt-4o-mini", 5).await.0, 200);
    }
    // Tier 0 is full for a minute: the batch client waits its max_wait,
    // then is refused with a Retry-After, and tier 1 never sees it.
    let (status, retry_after, _) = ask_as(&gw, "sk-batch", "gpt-4o-mini", 5).await;
    assert_eq!(status, 429);
    assert!(retry_after.is_some());
    assert_eq!((posts(&prepaid).await, posts(&payg).await), (3, 0));
    // Anyone else spills to tier 1.
    assert_eq!(ask_as(&gw, WEB, "gpt-4o-mini", 5).await.0, 200);
    assert_eq!(posts(&payg).await, 1);
}

/// An upstream answering chat with `utilization` in its
/// `azure-openai-deployment-utilization` header, as a provisioned
/// deployment does on every answer.
async fn provisioned_at(server: &wiremock::MockServer, utilization: &str) {
    use wiremock::matchers::method;
    use wiremock::{Mock, ResponseTemplate};
    server.reset().await;
    let answer = ResponseTemplate::new(200)
        .set_body_json(crate::support::chat_answer(5, 2))
        .insert_header("azure-openai-deployment-utilization", utilization);
    Mock::given(method("POST"))
        .respond_with(answer)
        .mount(server)
        .await;
}

/// A provisioned node (tier 0) that says it is 97% full is held: the
/// overflow goes to tier 1 before it answers any 429; once its hold ends
/// and it reads lower, it takes the traffic again.
#[tokio::test]
async fn a_provisioned_node_nearly_full_sends_the_overflow_up_before_any_429() {
    let (ptu, payg) = (wiremock::MockServer::start().await, chat_upstream().await);
    provisioned_at(&ptu, "97%").await;
    let gw = Gateway::start(&format!(
        "{}{}",
        node("payg", &v1(&payg), "k", "tier = 1"),
        node("ptu", &v1(&ptu), "k", "tier = 0\nprovisioned = true"),
    ))
    .await;
    let ask = async || {
        ask_as(&gw, crate::support::CLIENT_KEY, "gpt-4o-mini", 5)
            .await
            .0
    };
    assert_eq!(ask().await, 200);
    assert_eq!((posts(&ptu).await, posts(&payg).await), (1, 0));
    for _ in 0..3 {
        assert_eq!(ask().await, 200);
    }
    assert_eq!(posts(&payg).await, 3, "held at 97%: the overflow goes up");
    let status = gw.status().await;
    assert_eq!(
        node_status(&status, "ptu")["cooldown_reason"],
        "provisioned_full"
    );
    // It drains: the next reading is low, and it takes the traffic again.
    provisioned_at(&ptu, "40%").await;
    gw.until(|s| node_status(s, "ptu")["cooldown_remaining_ms"].is_null())
        .await;
    for _ in 0..3 {
        assert_eq!(ask().await, 200);
    }
    assert_eq!((posts(&ptu).await, posts(&payg).await), (3, 3));
}
