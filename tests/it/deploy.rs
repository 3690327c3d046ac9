//! The files operators import: the Grafana dashboard and the Prometheus
//! alert rules name only metrics the gateway really exports. Read from a
//! scrape of a gateway that exports every family (a client with its own
//! key, priced traffic, limits shared through a real Redis).

use std::collections::BTreeSet;

use serde_json::Value;

use crate::redis::RedisServer;
use crate::support::{Gateway, chat, chat_upstream, get_text, node, send_json, v1};

const TEAM: &str = "sk-team-deploy-key";

/// Every metric name (with its `_total`, `_bucket`, ... suffix) a scrape shows.
async fn exported(gw: &Gateway) -> BTreeSet<String> {
    let text = get_text(gw.url("/metrics"), Some(crate::support::ADMIN_TOKEN)).await;
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            line[..end].to_owned()
        })
        .collect()
}

/// Every `balancer_...` metric name a file mentions.
fn named_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("balancer_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_name_only_exported_metrics() {
    let redis = RedisServer::start();
    let upstream = chat_upstream().await;
    let gw = Gateway::start_file_text(
        &format!(
            "[status]\npublic = true\n[cluster]\nredis_url = \"{}\"\ntimeout = \"5s\"\n\
             [[clients]]\nname = \"team\"\nkey_env = \"TEAM\"\n{}",
            redis.url(),
            node(
                "a",
                &v1(&upstream),
                "k",
                "models = [\"gpt-4o-mini\"]\nrpm = 100"
            )
        ),
        &[("TEAM", TEAM)],
    )
    .await;
    let response = send_json(
        gw.url("/v1/chat/completions"),
        Some(TEAM),
        chat("gpt-4o-mini", "hi", 5),
    )
    .await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    gw.until(|s| s["nodes"][0]["in_flight"] == 0).await;
    let exported = exported(&gw).await;

    let dashboard = read("deploy/grafana/balancer.json");
    let alerts = read("deploy/prometheus/alerts.yaml");
    for (file, text) in [("dashboard", &dashboard), ("alerts", &alerts)] {
        let named = named_in(text);
        assert!(named.len() >= 5, "{file} names {named:?}");
        let unknown: Vec<&String> = named.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics the gateway does not export: {unknown:?}\nexported: {exported:?}"
        );
    }

    // The dashboard is one a Grafana imports: every panel placed, with an
    // id of its own, and a query in each that is not a row.
    let dashboard: Value = serde_json::from_str(&dashboard).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for panel in panels {
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "{panel}");
        if panel["type"] != "row" {
            let targets = panel["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{}", panel["title"]);
            for target in targets {
                assert!(target["expr"].as_str().unwrap().contains("balancer_"));
            }
        }
    }
}

/// The `Balancer.toml` inside the Kubernetes ConfigMap, as the pods read it.
fn configmap_toml() -> String {
    let yaml = read("deploy/kubernetes/configmap.yaml");
    let start = yaml
        .find("Balancer.toml: |\n")
        .expect("a Balancer.toml entry")
        + 17;
    yaml[start..]
        .lines()
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| line.get(4..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A number after `key: ` in a manifest.
fn field(yaml: &str, key: &str) -> u64 {
    let at = yaml.find(&format!("{key}: ")).unwrap() + key.len() + 2;
    yaml[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

#[test]
fn the_kubernetes_config_is_one_the_gateway_accepts_and_its_drain_fits_the_grace_period() {
    let toml = configmap_toml();
    // What the pods' Secret provides.
    let env = |var: &str| match var {
        "OPENAI_KEY_A" | "OPENAI_KEY_B" => Some("sk-from-the-secret".to_owned()),
        "BALANCER_ADMIN_TOKEN" => Some("a-long-admin-token-from-the-secret".to_owned()),
        _ => None,
    };
    let (config, _) = balancer::config::from_toml_str(&toml, &env)
        .unwrap_or_else(|e| panic!("the ConfigMap's Balancer.toml: {e}\n{toml}"));
    assert_eq!(config.server.listen.to_string(), "0.0.0.0:8080");
    assert!(
        config.cluster.is_some(),
        "replicas share limits through Redis"
    );
    assert!(config.admin.token.is_some());

    // SIGTERM comes after preStop; the drain must end before the kill.
    let deployment = read("deploy/kubernetes/deployment.yaml");
    let grace = field(&deployment, "terminationGracePeriodSeconds");
    let pre_stop = field(&deployment, "seconds");
    let drain = config.server.shutdown_grace.as_secs();
    assert!(
        pre_stop + drain < grace,
        "{pre_stop} s + {drain} s within {grace} s"
    );
    assert_eq!(field(&deployment, "replicas"), 3);
}
