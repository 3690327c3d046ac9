//! `saturation`: our predecessors' limits (nodes at 100, 150 and 200 rpm,
//! enforced by the mocks themselves) under far more demand than they allow:
//! 20,000 requests at 1,000 connections.
//!
//! Holds when: no request fails (every answer is a 200 or the gateway's own
//! 429), the mocks sent no 429 (the gateway never pushed a node past its
//! quota), no node's busiest rolling 60 s exceeded its rpm, and the requests
//! served reach 97% of what the limits allow over the run: the sum of the
//! rpms for every minute the run started (`Σ rpm × ⌈T / 60 s⌉`).

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::drive::{self, Clock, Measured, Plan};
use crate::harness::{self, CLIENT_KEY, Gateway, Mocks, verdict};

#[derive(Debug, Clone, Args)]
pub(crate) struct SaturationArgs {
    /// Requests in all.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Concurrent connections.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Each node's requests per minute (gateway and mock alike).
    #[arg(long, value_delimiter = ',', default_value = "100,150,200")]
    pub rpm: Vec<u64>,
    /// Run for this long instead of a request count (spans several windows).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// How long the gateway may queue a request for headroom.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub max_wait: Duration,
}

impl SaturationArgs {
    pub(crate) fn smoke(&mut self) {
        self.requests = 1000;
        self.connections = 100;
        self.rpm = vec![10, 15, 20];
        self.duration = None;
        self.max_wait = Duration::from_secs(1);
    }
}

pub(crate) async fn run(args: &SaturationArgs, dir: &std::path::Path) -> anyhow::Result<bool> {
    let nodes = args.rpm.len() as u16;
    let rpm_list = args
        .rpm
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mocks = Mocks::start(nodes, &["--rpm".to_owned(), rpm_list.clone()]).await?;
    let queue = format!(
        "[queue]\nmax_wait = \"{}\"\nmax_depth = {}\n",
        humantime::format_duration(args.max_wait),
        args.connections.max(1)
    );
    let rpm = args.rpm.clone();
    let gateway = Gateway::start(&mocks, dir, "saturation", &queue, &|i| {
        format!("rpm = {}", rpm[i])
    })
    .await?;
    let what = match args.duration {
        Some(d) => format!(
            "{} at {} connections",
            humantime::format_duration(d),
            args.connections
        ),
        None => format!(
            "{} requests at {} connections",
            args.requests, args.connections
        ),
    };
    println!(
        "saturation: {what}; nodes at {rpm_list} rpm, queue max_wait {}",
        humantime::format_duration(args.max_wait)
    );

    let report = drive::report_path(dir, "saturation", "gateway");
    let plan = match args.duration {
        Some(d) => Plan::timed(args.connections, d, report),
        None => Plan::requests(args.requests, args.connections, report),
    };
    let clock = Clock::new();
    let tx = harness::chat_transaction(
        Arc::from(CLIENT_KEY),
        harness::chat_body(false),
        Arc::clone(&clock),
        true,
    );
    let metrics = drive::drive(&gateway.origin, &plan, tx).await?;
    let m = Measured::of(&metrics);
    let span = clock.span();
    let status = gateway.status().await?;
    let stats = mocks.stats().await?;

    let served = m.count(200);
    let refused = m.count(429);
    let queued = status["queue"]["queued_total"].as_u64().unwrap_or(0);
    let errors = m.requests - served - refused;
    let upstream_429: u64 = stats.iter().map(|s| s.rate_limited).sum();
    let minutes = (span.as_secs_f64() / 60.0).ceil().max(1.0);
    let allowed = args.rpm.iter().sum::<u64>() as f64 * minutes;
    let used = served as f64 / allowed;

    println!(
        "  {} requests in {:.2} s: {:.0} requests/s",
        m.requests,
        span.as_secs_f64(),
        m.requests as f64 / span.as_secs_f64().max(1e-9)
    );
    println!("  {}", m.latency_line());
    println!("  {}", m.status_line());
    println!(
        "  served {served}, of which queued first {queued}; refused 429 {refused}; failed {errors}"
    );
    let before = vec![mock_upstreams::StatsReport::default(); stats.len()];
    println!("  per node: {}", harness::per_node_line(&before, &stats));
    let mut within = true;
    for (i, (s, limit)) in stats.iter().zip(&args.rpm).enumerate() {
        let ok = s.peak_60s.requests <= *limit;
        within &= ok;
        println!(
            "    node {i}: busiest rolling 60 s {} of {limit} rpm; 429s sent {}",
            s.peak_60s.requests, s.rate_limited
        );
    }
    println!("  targets:");
    println!(
        "    upstream 429s = 0: {upstream_429} {}",
        verdict(upstream_429 == 0)
    );
    println!("    every node within its quota: {}", verdict(within));
    println!(
        "    ≥ 97% of the quota used: {served} of {allowed:.0} allowed over {minutes:.0} minute(s) = {:.1}% {}",
        used * 100.0,
        verdict(used >= 0.97)
    );
    println!(
        "  HTML report: {}",
        dir.join("saturation-gateway.html").display()
    );

    gateway.stop().await?;
    mocks.stop().await?;
    let ok = errors == 0 && m.failures == 0 && upstream_429 == 0 && within && used >= 0.97;
    if !ok {
        println!("FAILED: see the targets above");
    }
    Ok(ok)
}
