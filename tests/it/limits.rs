//! Quotas under load: exact admission, the rolling-window invariant against
//! what the upstreams received, and queueing until headroom.

use std::time::Duration;

use balancer::request;
use wiremock::ResponseTemplate;

use crate::support::{FAST, Gateway, answering_upstream, chat, node, post_many, tally};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_100_150_200_serve_exactly_450_of_600_and_refuse_150_with_retry_after() {
    let servers = [
        answering_upstream(Duration::ZERO).await,
        answering_upstream(Duration::ZERO).await,
        answering_upstream(Duration::ZERO).await,
    ];
    let mut toml = FAST.to_owned();
    for (s, rpm) in servers.iter().zip([100, 150, 200]) {
        toml.push_str(&node(
            &format!("rpm{rpm}"),
            &crate::support::v1(s),
            "k",
            &format!("rpm = {rpm}"),
        ));
    }
    let gw = Gateway::start(&toml).await;
    let outcomes = post_many(&gw, 600, 50, |_| chat("gpt-4o-mini", "hi", 5)).await;

    let served = outcomes.iter().filter(|o| o.status == 200).count();
    let refused: Vec<_> = outcomes.iter().filter(|o| o.status == 429).collect();
    assert_eq!((served, refused.len()), (450, 150));
    for outcome in refused {
        let retry = outcome.retry_after.expect("a 429 carries Retry-After");
        assert!((1..=61).contains(&retry), "Retry-After {retry}");
    }
    for (s, rpm) in servers.iter().zip([100, 150, 200]) {
        assert_eq!(s.received_requests().await.unwrap().len(), rpm);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_node_receives_more_reserved_tokens_or_bytes_than_its_quota() {
    // Answers without `usage`: the gateway cannot correct its reservations
    // downwards, so everything it admitted stays counted in full and the sum
    // of reservations the upstream received must stay within tpm.
    let mut servers = Vec::new();
    for _ in 0..2 {
        let server = crate::support::answering(
            ResponseTemplate::new(200).set_body_json(serde_json::json!({"id": "x", "choices": []})),
        )
        .await;
        servers.push(server);
    }
    let (tpm, bpm) = (3000u64, 12_000u64);
    let mut toml = FAST.to_owned();
    for (i, s) in servers.iter().enumerate() {
        toml.push_str(&node(
            &format!("n{i}"),
            &crate::support::v1(s),
            "k",
            &format!("tpm = {tpm}\nbpm = {bpm}"),
        ));
    }
    let gw = Gateway::start(&toml).await;
    let statuses: Vec<u16> = post_many(&gw, 200, 20, |i| {
        chat(
            "gpt-4o-mini",
            &"lorem ipsum dolor sit amet ".repeat(1 + i % 20),
            40,
        )
    })
    .await
    .iter()
    .map(|o| o.status)
    .collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(statuses.contains(&429), "the quotas were never reached");

    for s in &servers {
        let received = s.received_requests().await.unwrap();
        let bytes: u64 = received.iter().map(|r| r.body.len() as u64).sum();
        let reserved: u64 = received
            .iter()
            .map(|r| {
                request::inspect("/chat/completions", &r.body, true, 1024)
                    .unwrap()
                    .demand
                    .tokens
            })
            .sum();
        assert!(
            reserved <= tpm,
            "{reserved} reserved tokens against tpm {tpm}"
        );
        assert!(bytes <= bpm, "{bytes} request bytes against bpm {bpm}");
        // The quota was actually used, not left idle.
        assert!(
            reserved > tpm / 2 || bytes > bpm / 2,
            "only {reserved} tokens / {bytes} bytes used"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_requests_wait_in_the_queue_and_all_succeed() {
    let server = answering_upstream(Duration::from_millis(150)).await;
    let toml = format!(
        "{FAST}{}",
        node(
            "slow",
            &crate::support::v1(&server),
            "k",
            "max_concurrency = 2"
        )
    );
    let gw = Gateway::start(&toml).await;
    let statuses = tally(&post_many(&gw, 10, 10, |_| chat("gpt-4", "hi", 5)).await);
    assert_eq!(statuses, [(200, 10)].into());
    assert_eq!(server.received_requests().await.unwrap().len(), 10);
    let status = gw.settled_status().await;
    assert_eq!(status["queue"]["depth"], 0);
    assert_eq!(status["nodes"][0]["in_flight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once() {
    let server = answering_upstream(Duration::from_millis(500)).await;
    let toml = format!(
        "[queue]\nmax_wait = \"5s\"\nmax_depth = 2\n{}",
        node(
            "one",
            &crate::support::v1(&server),
            "k",
            "max_concurrency = 1"
        )
    );
    let gw = Gateway::start(&toml).await;
    let statuses = tally(&post_many(&gw, 6, 6, |_| chat("gpt-4", "hi", 5)).await);
    // One runs, two wait, three are refused.
    assert_eq!(statuses, [(200, 3), (429, 3)].into());
}
