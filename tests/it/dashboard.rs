//! `GET /dashboard` in a real browser: headless Chromium loads the page
//! from a gateway with traffic and the page draws every node with its bars.
//!
//! Needs Chromium: Debian's `chromium` package (CI installs it), or the
//! binary named by `BALANCER_TEST_CHROMIUM`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use crate::support::{Gateway, answering_upstream, chat, client, node, node_status, send_json};

/// The browser to drive: `BALANCER_TEST_CHROMIUM`, else the first of the
/// usual names on `PATH`.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("BALANCER_TEST_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "no Chromium found: install Debian's chromium package (apt-get install chromium) \
         or set BALANCER_TEST_CHROMIUM"
    );
}

/// Runs headless Chromium on `url` with `args` and returns its stdout. The
/// page's scripts run for a virtual 5 s first (time that does not pass
/// while the page waits on the network), so `/status` has been drawn.
async fn headless(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = Command::new(chromium());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            // This machine has no network but loopback: no background calls.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("Chromium finished within 60 s")
        .expect("Chromium starts");
    assert!(
        output.status.success(),
        "Chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// One bar the page drew: its node, its limit, and its fill (used / limit).
#[derive(Debug)]
struct Bar {
    node: String,
    limit: String,
    ratio: f64,
}

/// The bars in the page's DOM (each a `div` with `role="meter"`).
fn bars(dom: &str) -> Vec<Bar> {
    let attr = |tag: &str, name: &str| -> String {
        let start = tag.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
        let end = start + tag[start..].find('"').unwrap();
        tag[start..end].to_owned()
    };
    dom.match_indices("<div ")
        .map(|(start, _)| &dom[start..start + dom[start..].find('>').unwrap()])
        .filter(|tag| tag.contains("role=\"meter\""))
        .map(|tag| Bar {
            node: attr(tag, "data-node"),
            limit: attr(tag, "data-limit"),
            ratio: attr(tag, "data-ratio").parse().unwrap(),
        })
        .collect()
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path)
        .is_ok_and(|bytes| bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000)
}

#[tokio::test]
async fn the_dashboard_draws_each_node_with_live_bars_in_headless_chromium() {
    let slow = answering_upstream(Duration::from_secs(30)).await;
    let fast = answering_upstream(Duration::ZERO).await;
    let limits = "rpm = 100\ntpm = 20000\nbpm = 1000000\nmax_concurrency = 4";
    let gw = Gateway::start(&format!(
        "[upstream]\nfirst_byte_timeout = \"60s\"\n{}{}",
        node("slow", &crate::support::v1(&slow), "k", limits),
        node("fast", &crate::support::v1(&fast), "k", limits),
    ))
    .await;

    // A fresh gateway places its first request on its first node: "slow"
    // holds it in flight while the page loads.
    let url = gw.url("/v1/chat/completions");
    let held = tokio::spawn(async move {
        let _ = client()
            .post(url)
            .header("content-type", "application/json")
            .body(chat("gpt-4o-mini", "hold on", 10))
            .send()
            .await;
    });
    gw.until(|s| node_status(s, "slow")["in_flight"] == 1).await;
    for text in ["one", "two"] {
        let response = send_json(
            gw.url("/v1/chat/completions"),
            None,
            chat("gpt-4o-mini", text, 10),
        )
        .await;
        assert_eq!(response.headers()["x-balancer-node"], "fast");
        response.bytes().await.unwrap();
    }
    gw.until(|s| node_status(s, "fast")["in_flight"] == 0).await;

    let page = gw.url("/dashboard");
    let dom = headless(&page, &["--dump-dom"]).await;
    for name in ["slow", "fast"] {
        assert!(
            dom.contains(&format!("data-node=\"{name}\"")),
            "node {name} on the page"
        );
        for limit in ["rpm", "tpm", "bpm"] {
            let bar = bars(&dom)
                .into_iter()
                .find(|b| b.node == name && b.limit == limit)
                .unwrap_or_else(|| panic!("a {limit} bar for {name}"));
            assert!(bar.ratio > 0.0, "{bar:?} is drawn non-zero");
        }
    }
    let concurrency: Vec<Bar> = bars(&dom)
        .into_iter()
        .filter(|b| b.limit == "max_concurrency")
        .collect();
    assert_eq!(concurrency.len(), 2);
    for bar in concurrency {
        // One of slow's 4 slots is taken; fast has finished.
        let expected = if bar.node == "slow" { 0.25 } else { 0.0 };
        assert_eq!(bar.ratio, expected, "{bar:?}");
    }
    assert_eq!(dom.matches("data-health=\"healthy\"").count(), 2);

    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    headless(
        &page,
        &[
            "--window-size=1280,800",
            "--hide-scrollbars",
            &format!("--screenshot={}", screenshot.display()),
        ],
    )
    .await;
    assert!(
        is_png(&screenshot),
        "a screenshot at {}",
        screenshot.display()
    );
    println!("dashboard screenshot: {}", screenshot.display());

    held.abort();
    // The held request's client is gone: its slot is released.
    gw.until(|s| node_status(s, "slow")["in_flight"] == 0).await;
}

#[tokio::test]
async fn the_dashboard_draws_each_client_s_spend_against_its_budget() {
    let answer = crate::support::chat_answer(0, 1_000);
    let upstream =
        crate::support::answering(wiremock::ResponseTemplate::new(200).set_body_json(answer)).await;
    // 1,000 output tokens at $2/M: $0.002 of a $0.008 budget.
    let gw = Gateway::start_file_text(
        &format!(
            "[status]\npublic = true\n[prices.\"m\"]\ninput = 0.0\noutput = 2.0\n\
             [[clients]]\nname = \"team\"\nkey_env = \"TEAM\"\nbudget_usd = 0.008\nbudget_period = \"month\"\n{}",
            node(
                "a",
                &crate::support::v1(&upstream),
                "k",
                "rpm = 100\ntpm = 100000\nbpm = 1000000\nmax_concurrency = 4"
            )
        ),
        &[("TEAM", "sk-team-dashboard-key")],
    )
    .await;
    let response = send_json(
        gw.url("/v1/chat/completions"),
        Some("sk-team-dashboard-key"),
        chat("m", "hi", 1_000),
    )
    .await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    gw.until(|s| s["budgets"][0]["spent_usd"] == 0.002 && s["budgets"][0]["in_flight_usd"] == 0.0)
        .await;

    let dom = headless(&gw.url("/dashboard"), &["--dump-dom"]).await;
    assert!(
        dom.contains("data-budget=\"cfg_team\""),
        "the client's card"
    );
    let bar = bars(&dom)
        .into_iter()
        .find(|b| b.node == "cfg_team" && b.limit == "budget")
        .expect("a budget bar for the client");
    assert_eq!(bar.ratio, 0.25, "{bar:?}");
}
