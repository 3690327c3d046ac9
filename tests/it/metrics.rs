//! `GET /metrics`: after known traffic, every family holds exactly what the
//! traffic did.

use std::time::Duration;

use prometheus_parse::{Scrape, Value as Sample};
use wiremock::ResponseTemplate;

use crate::support::{
    CLIENT_KEY, FAST, Gateway, answering, ask_as, chat, chat_upstream, client, closed_port, node,
    send_json,
};

const TEAM: &str = "sk-team-metrics-key";

/// One scrape, parsed by a Prometheus text-format parser.
pub(crate) struct Metrics(Scrape);

impl Metrics {
    pub(crate) async fn scrape(gw: &Gateway) -> Self {
        // The full view: gateways with an admin API take its token, the
        // others are configured `[status] public = true` where it matters.
        let response = client()
            .get(gw.url("/metrics"))
            .bearer_auth(crate::support::ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text; version=1.0.0"),
        );
        let text = response.text().await.unwrap();
        assert!(
            text.ends_with("# EOF\n"),
            "an OpenMetrics exposition ends with # EOF"
        );
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        Self(Scrape::parse(lines).unwrap())
    }

    /// The value of the one sample named `name` with exactly these labels.
    pub(crate) fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .0
            .samples
            .iter()
            .filter(|s| s.metric == name && s.labels.len() == labels.len())
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                Sample::Counter(v) | Sample::Gauge(v) | Sample::Untyped(v) => v,
                _ => panic!("{name} is not a single value"),
            })
            .collect();
        assert_eq!(found.len(), 1, "one sample {name}{labels:?}");
        found[0]
    }

    fn has(&self, name: &str) -> bool {
        self.0.samples.iter().any(|s| s.metric == name)
    }
}

/// Three chat requests (two keys), three the gateway refuses itself and
/// one `/v1/models`: the request and answer bytes of the three.
async fn send_known_traffic(gw: &Gateway) -> (usize, usize) {
    let (mut sent, mut received) = (0, 0);
    for (key, text) in [
        (CLIENT_KEY, "one"),
        (CLIENT_KEY, "two two"),
        (TEAM, "three"),
    ] {
        let body = chat("gpt-4o-mini", text, 10);
        sent += body.len();
        let response = send_json(gw.url("/v1/chat/completions"), Some(key), body).await;
        assert_eq!(response.status(), 200);
        received += response.bytes().await.unwrap().len();
    }
    // Answered by the gateway itself: a wrong key, an unknown model, bad JSON.
    assert_eq!(ask_as(gw, "sk-wrong", "gpt-4o-mini", 5).await.0, 401);
    assert_eq!(ask_as(gw, CLIENT_KEY, "no-such-model", 5).await.0, 404);
    let bad = send_json(
        gw.url("/v1/chat/completions"),
        Some(CLIENT_KEY),
        "{not json",
    )
    .await;
    assert_eq!(bad.status(), 400);
    // Answered by the gateway from its config.
    let models = client()
        .get(gw.url("/v1/models"))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    (sent, received)
}

/// Node `a`'s state after the known traffic, as `/status` reads it.
fn node_state_is_counted(m: &Metrics) {
    let limit = |name: &str, limit: &'static str| m.value(name, &[("node", "a"), ("limit", limit)]);
    assert_eq!(limit("balancer_node_limit", "rpm"), 40.0);
    assert_eq!(limit("balancer_node_used", "rpm"), 3.0);
    assert_eq!(limit("balancer_node_used", "tpm"), 21.0);
    assert_eq!(limit("balancer_node_used", "concurrency"), 0.0);
    assert_eq!(limit("balancer_node_utilization_ratio", "rpm"), 3.0 / 40.0);
    assert_eq!(m.value("balancer_node_healthy", &[("node", "a")]), 1.0);
    assert_eq!(
        m.value("balancer_node_cooldown_remaining_seconds", &[("node", "a")]),
        0.0
    );
    assert_eq!(m.value("balancer_retries_total", &[("node", "a")]), 0.0);
    let errors = [("node", "a"), ("kind", "server_error")];
    assert_eq!(m.value("balancer_upstream_errors_total", &errors), 0.0);
}

#[tokio::test]
async fn a_scrape_after_known_traffic_counts_requests_tokens_bytes_and_latency() {
    let answer = chat_upstream().await;
    let toml = format!(
        "{FAST}[status]\npublic = true\n[auth]\nclient_keys_env = [\"TEST_CLIENT_KEY\"]\n\
         [[clients]]\nname = \"team\"\nkey_env = \"TEAM\"\n{}",
        node(
            "a",
            &crate::support::v1(&answer),
            "k",
            "models = [\"gpt-4o-mini\"]\nrpm = 40\ntpm = 10000\nbpm = 1000000\nmax_concurrency = 8",
        ),
    );
    let gw =
        Gateway::start_file_text(&toml, &[("TEST_CLIENT_KEY", CLIENT_KEY), ("TEAM", TEAM)]).await;

    let (sent, received) = send_known_traffic(&gw).await;
    // Metrics are counted as each relay ends: wait for the last to settle.
    gw.settled_status().await;

    let m = Metrics::scrape(&gw).await;
    let route = [("node", "a"), ("model", "gpt-4o-mini")];
    let with = |extra: (&'static str, &'static str)| [route[0], route[1], extra];
    assert_eq!(
        m.value("balancer_requests_total", &with(("code", "200"))),
        3.0
    );
    for (code, model) in [("401", ""), ("404", ""), ("400", ""), ("200", "")] {
        let labels = [("node", ""), ("model", model), ("code", code)];
        assert_eq!(m.value("balancer_requests_total", &labels), 1.0, "{code}");
    }
    assert_eq!(
        m.value("balancer_tokens_total", &with(("kind", "prompt"))),
        15.0
    );
    assert_eq!(
        m.value("balancer_tokens_total", &with(("kind", "completion"))),
        6.0
    );
    let bytes = |direction| {
        m.value(
            "balancer_transferred_bytes_total",
            &with(("direction", direction)),
        )
    };
    assert_eq!(bytes("request"), sent as f64);
    assert_eq!(bytes("response"), received as f64);
    for histogram in [
        "balancer_request_duration_seconds",
        "balancer_time_to_first_byte_seconds",
    ] {
        assert_eq!(
            m.value(&format!("{histogram}_count"), &route),
            3.0,
            "{histogram}"
        );
        assert!(
            m.value(&format!("{histogram}_sum"), &route) > 0.0,
            "{histogram}"
        );
    }
    // The gateway's own answers are timed too; only placed requests queue.
    let own = [("node", ""), ("model", "")];
    assert_eq!(
        m.value("balancer_request_duration_seconds_count", &own),
        4.0
    );
    assert_eq!(m.value("balancer_queue_wait_seconds_count", &[]), 3.0);
    assert_eq!(m.value("balancer_queue_depth", &[]), 0.0);

    node_state_is_counted(&m);

    // The declared client's own counters.
    let team = [("client", "cfg_team"), ("name", "team")];
    assert_eq!(m.value("balancer_client_requests_total", &team), 1.0);
    let tokens = |kind| {
        m.value(
            "balancer_client_tokens_total",
            &[team[0], team[1], ("kind", kind)],
        )
    };
    assert_eq!((tokens("prompt"), tokens("completion")), (5.0, 2.0));
}

#[tokio::test]
async fn failures_count_as_upstream_errors_by_kind_and_retries_by_node() {
    let failing = answering(ResponseTemplate::new(503).set_body_string("down")).await;
    let limited = answering(
        ResponseTemplate::new(429)
            .insert_header("retry-after", "30")
            .set_body_json(serde_json::json!({"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}})),
    )
    .await;
    let answer = chat_upstream().await;
    // A fresh gateway places its first request on its first node; each
    // failure is retried on the next.
    let toml = format!(
        "{FAST}[retry]\nattempts = 3\n{}{}{}{}",
        node(
            "refused",
            &format!("http://127.0.0.1:{}/v1", closed_port()),
            "k",
            "rpm = 1"
        ),
        node("failing", &crate::support::v1(&failing), "k", "rpm = 1"),
        node("limited", &crate::support::v1(&limited), "k", "rpm = 1"),
        node("answer", &crate::support::v1(&answer), "k", ""),
    );
    let gw = Gateway::start(&toml).await;
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat("gpt-4o-mini", "hi", 5))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-balancer-node"], "answer");
    response.bytes().await.unwrap();
    gw.settled_status().await;

    let m = Metrics::scrape(&gw).await;
    let errors = |node: &str, kind: &str| {
        m.value(
            "balancer_upstream_errors_total",
            &[("node", node), ("kind", kind)],
        )
    };
    assert_eq!(errors("refused", "connect"), 1.0);
    assert_eq!(errors("failing", "server_error"), 1.0);
    assert_eq!(errors("limited", "rate_limited"), 1.0);
    assert_eq!(errors("answer", "server_error"), 0.0);
    for failed in ["refused", "failing", "limited"] {
        assert_eq!(
            m.value("balancer_retries_total", &[("node", failed)]),
            1.0,
            "{failed}"
        );
    }
    assert_eq!(
        m.value("balancer_retries_total", &[("node", "answer")]),
        0.0
    );
    // The 429's Retry-After cools its node down.
    let cooldown = m.value(
        "balancer_node_cooldown_remaining_seconds",
        &[("node", "limited")],
    );
    assert!((25.0..=30.0).contains(&cooldown), "cooldown {cooldown}");
    // The client got one answer: only the node that gave it counts it.
    // No node lists the model, but it has a shipped price: it is a label
    // (the audit's finding: cost per model was lost as `other`).
    let answered = [
        ("node", "answer"),
        ("model", "gpt-4o-mini"),
        ("code", "200"),
    ];
    assert_eq!(m.value("balancer_requests_total", &answered), 1.0);
    assert!(
        !m.has("balancer_client_requests_total"),
        "no clients, no client families"
    );
}
