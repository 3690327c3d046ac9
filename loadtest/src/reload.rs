//! `reload`: the config changes under load, and no request may notice.
//!
//! 50 clients send chat requests back to back through the gateway over three
//! mocks for `--duration`. A third of the way in, the config file is
//! replaced by one without node `c` (the gateway's file watch picks it up);
//! two thirds in, a config with an invalid field is written and the gateway
//! is sent SIGHUP as well (both must be rejected, the running config stays).
//!
//! Fails (exit 1) if any request fails or is not a 200, if `c` receives a
//! request once the ones it had in flight have finished, or if either
//! reload does not take the expected effect.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde_json::Value;

use crate::drive::{self, Clock, Measured, Plan};
use crate::harness::{self, CLIENT_KEY, Gateway, Mocks, verdict};

#[derive(Debug, Clone, Args)]
pub(crate) struct ReloadArgs {
    /// Concurrent clients.
    #[arg(long, default_value_t = 50)]
    pub clients: usize,
    /// How long the clients send.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub duration: Duration,
}

impl ReloadArgs {
    pub(crate) fn smoke(&mut self) {
        self.duration = Duration::from_secs(6);
    }
}

const SCENARIO: &str = "reload";
/// How long a reload may take to show in `/status`.
const RELOAD_WAIT: Duration = Duration::from_secs(10);
/// The node the reload removes (mock index).
const REMOVED: usize = 2;

fn no_quota(_: usize) -> String {
    String::new()
}

/// Polls `/status` until `ready` holds, within [`RELOAD_WAIT`].
async fn until(
    gateway: &Gateway,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + RELOAD_WAIT;
    loop {
        let status = gateway.status().await?;
        if ready(&status) {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not seen within {RELOAD_WAIT:?}; last /status: {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What happened to the config while the clients ran.
struct Timeline {
    removal_took: Duration,
    removed_served_at_drain: u64,
    rejected_error: String,
}

async fn change_config(
    gateway: &Gateway,
    mocks: &Mocks,
    duration: Duration,
) -> anyhow::Result<Timeline> {
    let start = Instant::now();
    tokio::time::sleep(duration / 3).await;
    let kept: Vec<usize> = (0..mocks.urls.len()).filter(|i| *i != REMOVED).collect();
    let written = Instant::now();
    gateway.rewrite_config(mocks, SCENARIO, "", &no_quota, &kept)?;
    until(gateway, "the reload removing c", |s| {
        s["config"]["generation"] == 2
    })
    .await?;
    let removal_took = written.elapsed();
    let drained = until(gateway, "c's requests in flight finishing", |s| {
        s["retired_nodes"]
            .as_array()
            .is_some_and(|r| r.iter().all(|n| n["in_flight"] == 0))
    })
    .await?;
    let removed_served_at_drain = mocks.stats().await?[REMOVED].requests;
    println!(
        "  {:>5.1} s: config without c written; in force after {} ms ({}); c drained",
        (written - start).as_secs_f64(),
        removal_took.as_millis(),
        drained["config"]["last_reload"]["summary"]
            .as_str()
            .unwrap_or("?"),
    );

    tokio::time::sleep((duration * 2 / 3).saturating_sub(start.elapsed())).await;
    let attempts = drained["config"]["last_reload"]["attempt"]
        .as_u64()
        .unwrap_or(0);
    let quota = |i: usize| {
        if i == 0 {
            "rpm = 0".to_owned()
        } else {
            String::new()
        }
    };
    gateway.rewrite_config(mocks, SCENARIO, "", &quota, &kept)?;
    gateway.hangup()?;
    let rejected = until(gateway, "the invalid config's rejection", |s| {
        s["config"]["last_reload"]["attempt"].as_u64() > Some(attempts)
            && s["config"]["last_reload"]["ok"] == false
    })
    .await?;
    let rejected_error = rejected["config"]["last_reload"]["error"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    println!(
        "  {:>5.1} s: invalid config written and SIGHUP sent; rejected: {rejected_error}",
        start.elapsed().as_secs_f64()
    );
    if rejected["config"]["generation"] != 2 {
        bail!("the invalid config was swapped in: {rejected}");
    }
    Ok(Timeline {
        removal_took,
        removed_served_at_drain,
        rejected_error,
    })
}

/// Warms the gateway (tokenizer tables, connections) so the run measures
/// reloads.
async fn warm_up(gateway: &Gateway, clients: usize, dir: &Path) -> anyhow::Result<()> {
    let clock = Clock::new();
    let tx = harness::chat_transaction(
        Arc::from(CLIENT_KEY),
        harness::chat_body(false),
        Arc::clone(&clock),
        false,
    );
    let warm = Plan::requests(
        clients * 2,
        clients,
        drive::report_path(dir, SCENARIO, "warmup"),
    );
    drive::drive(&gateway.origin, &warm, tx).await?;
    Ok(())
}

pub(crate) async fn run(args: &ReloadArgs, dir: &Path) -> anyhow::Result<bool> {
    let mocks = Mocks::start(3, &[]).await?;
    let gateway = Gateway::start(&mocks, dir, SCENARIO, "", &no_quota).await?;
    println!(
        "reload: {} clients for {}, 3 mocks; node c removed by file change, then an invalid config by file change and SIGHUP",
        args.clients,
        humantime::format_duration(args.duration)
    );
    warm_up(&gateway, args.clients, dir).await?;

    let before = mocks.stats().await?;
    let clock = Clock::new();
    let tx = harness::chat_transaction(
        Arc::from(CLIENT_KEY),
        harness::chat_body(false),
        Arc::clone(&clock),
        false,
    );
    let plan = Plan::timed(
        args.clients,
        args.duration,
        drive::report_path(dir, SCENARIO, "gateway"),
    );
    let (metrics, timeline) = tokio::join!(
        drive::drive(&gateway.origin, &plan, tx),
        change_config(&gateway, &mocks, args.duration),
    );
    let measured = Measured::of(&metrics?);
    let after = mocks.stats().await?;
    gateway.stop().await?;
    mocks.stop().await?;
    let timeline = timeline?;

    let span = clock.span();
    println!(
        "  {} requests in {:.1} s: {:.0} requests/s",
        measured.requests,
        span.as_secs_f64(),
        measured.requests as f64 / span.as_secs_f64().max(1e-9)
    );
    println!("  {}", measured.latency_line());
    println!("  {}", measured.status_line());
    println!("  per node: {}", harness::per_node_line(&before, &after));
    let late = after[REMOVED].requests - timeline.removed_served_at_drain;
    let all_ok =
        measured.requests > 0 && measured.failures == 0 && measured.count(200) == measured.requests;
    let rejected_right = timeline
        .rejected_error
        .contains("nodes[0].rpm: must be greater than 0");
    println!("  checks:");
    println!(
        "    every request answered 200 through both reloads: {} of {} {}",
        measured.count(200),
        measured.requests,
        verdict(all_ok)
    );
    println!(
        "    requests to c after its in-flight ones finished: {late} {}",
        verdict(late == 0)
    );
    println!(
        "    (the removal was in force {} ms after the file was written)",
        timeline.removal_took.as_millis()
    );
    println!(
        "    invalid config rejected with the field named: {}",
        verdict(rejected_right)
    );
    println!("  HTML reports: {}", dir.join("reload-*.html").display());
    Ok(all_ok && late == 0 && rejected_right)
}
