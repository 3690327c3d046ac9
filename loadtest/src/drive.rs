//! Driving load with goose, and reading what it measured.
//!
//! Goose runs one scenario with one transaction per run: `users` users
//! started at once, each doing `per_user` iterations (or running for a
//! time), optionally throttled to a fixed request rate. Goose records every
//! request's time to the response head (microsecond buckets) and its status;
//! requests/s is measured here from the first request's start to the last
//! answer's end, because goose's own run time includes starting users and
//! writing the report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use goose::config::GooseConfiguration;
use goose::goose::GooseResponse;
use goose::prelude::*;

/// How much load to apply.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub users: usize,
    /// Iterations per user; `None` runs for `run_time`.
    pub per_user: Option<usize>,
    pub run_time: Option<Duration>,
    /// A fixed total rate, requests per second.
    pub rate: Option<usize>,
    /// Where goose writes its HTML report.
    pub report: PathBuf,
}

impl Plan {
    /// `requests` spread over `users` users.
    pub(crate) fn requests(requests: usize, users: usize, report: PathBuf) -> Self {
        Self {
            users,
            per_user: Some(requests.div_ceil(users.max(1))),
            run_time: None,
            rate: None,
            report,
        }
    }

    /// `users` users for `run_time`.
    pub(crate) fn timed(users: usize, run_time: Duration, report: PathBuf) -> Self {
        Self {
            users,
            per_user: None,
            run_time: Some(run_time),
            rate: None,
            report,
        }
    }
}

/// The span from the first request's start to the last answer's end.
#[derive(Debug)]
pub(crate) struct Clock {
    origin: Instant,
    /// Nanoseconds after `origin`, +1 so that 0 means "not yet".
    first_start: AtomicU64,
    last_end: AtomicU64,
}

impl Clock {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            first_start: AtomicU64::new(0),
            last_end: AtomicU64::new(0),
        })
    }

    fn at(&self, t: Instant) -> u64 {
        t.duration_since(self.origin).as_nanos() as u64 + 1
    }

    pub(crate) fn started(&self, t: Instant) {
        let _ =
            self.first_start
                .compare_exchange(0, self.at(t), Ordering::Relaxed, Ordering::Relaxed);
    }

    pub(crate) fn ended(&self, t: Instant) {
        self.last_end.fetch_max(self.at(t), Ordering::Relaxed);
    }

    pub(crate) fn span(&self) -> Duration {
        let (a, b) = (
            self.first_start.load(Ordering::Relaxed),
            self.last_end.load(Ordering::Relaxed),
        );
        Duration::from_nanos(b.saturating_sub(a))
    }
}

/// Runs `transaction` against `host` as `plan` says.
pub(crate) async fn drive(
    host: &str,
    plan: &Plan,
    transaction: TransactionFunction,
) -> anyhow::Result<GooseMetrics> {
    if let Some(dir) = plan.report.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let report = plan.report.to_string_lossy().into_owned();
    let client = goose::client::GooseClientBuilder::new()
        .without_cookies()
        .gzip(false)
        .timeout(Duration::from_secs(120));
    let mut attack: Box<GooseAttack> =
        GooseAttack::initialize_with_config(GooseConfiguration::default())?
            .set_client_builder_without_cookies(client)?
            .register_scenario(
                scenario!("load").register_transaction(Transaction::new(transaction)),
            )
            .set_default(GooseDefault::Host, host)?
            .set_default(GooseDefault::Users, plan.users)?
            // Every user at once: the load is the concurrency, not a ramp.
            .set_default(GooseDefault::IncreaseRate, "100000")?
            .set_default(GooseDefault::NoTelnet, true)?
            .set_default(GooseDefault::NoPrintMetrics, true)?
            .set_default(GooseDefault::NoErrorSummary, true)?
            .set_default(GooseDefault::Quiet, 1)?
            .set_default(GooseDefault::ReportFile, report.as_str())?;
    if let Some(n) = plan.per_user {
        attack = attack.set_default(GooseDefault::Iterations, n)?;
    }
    if let Some(t) = plan.run_time {
        // Count from the first request, not from when every user has started.
        attack = attack
            .set_default(GooseDefault::RunTime, t.as_secs().max(1) as usize)?
            .set_default(GooseDefault::NoResetMetrics, true)?;
    }
    if let Some(rate) = plan.rate {
        attack = attack.set_default(GooseDefault::ThrottleRequests, rate)?;
    }
    attack.execute().await.map_err(|e| match e {
        GooseError::InvalidOption {
            option,
            value,
            detail,
        } => anyhow::anyhow!("goose run against {host}: {option} = {value}: {detail}"),
        other => anyhow::Error::new(other).context(format!("goose run against {host}")),
    })
}

/// POSTs `body` to `path` with `key` as a bearer token, as one goose request.
pub(crate) async fn post(
    user: &mut GooseUser,
    path: &str,
    key: &str,
    body: &Bytes,
) -> Result<GooseResponse, Box<TransactionError>> {
    let builder = user
        .get_request_builder(&GooseMethod::Post, path)?
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.clone());
    let request = GooseRequest::builder()
        .name(path)
        .set_request_builder(builder)
        .build();
    user.request(request).await
}

/// What goose measured, summed over every request name.
#[derive(Debug, Clone, Default)]
pub(crate) struct Measured {
    pub requests: usize,
    pub failures: usize,
    /// Status code → count; 0 counts requests that got no answer.
    pub statuses: BTreeMap<u16, usize>,
    /// Time to the response head, microseconds.
    pub avg_us: u64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
}

impl Measured {
    pub(crate) fn of(metrics: &GooseMetrics) -> Self {
        let mut m = Measured::default();
        let mut timing: Option<goose::metrics::GooseRequestMetricTimingData> = None;
        for aggregate in metrics.requests.values() {
            m.requests += aggregate.success_count + aggregate.fail_count;
            m.failures += aggregate.fail_count;
            for (status, n) in &aggregate.status_code_counts {
                *m.statuses.entry(*status).or_default() += n;
            }
            // One request name per run; keep the busiest one's times.
            if timing
                .as_ref()
                .is_none_or(|t| t.counter < aggregate.raw_data.counter)
            {
                timing = Some(aggregate.raw_data.clone());
            }
        }
        if let Some(t) = timing {
            m.avg_us = t.total_time_us / (t.counter.max(1) as u64);
            m.p50_us = t.percentile_us(0.50);
            m.p95_us = t.percentile_us(0.95);
            m.p99_us = t.percentile_us(0.99);
        }
        m
    }

    pub(crate) fn count(&self, status: u16) -> usize {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    /// `latency: avg …, p50 …, p95 …, p99 …` (time to the response head).
    pub(crate) fn latency_line(&self) -> String {
        let ms = |us: u64| format!("{:.3} ms", us as f64 / 1000.0);
        format!(
            "latency: avg {}, p50 {}, p95 {}, p99 {}",
            ms(self.avg_us),
            ms(self.p50_us),
            ms(self.p95_us),
            ms(self.p99_us)
        )
    }

    /// `status codes: 200: 1990 (99.5%), 429: 10 (0.5%)`.
    pub(crate) fn status_line(&self) -> String {
        let total = self.requests.max(1) as f64;
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n} ({:.1}%)", *n as f64 * 100.0 / total))
            .collect();
        format!("status codes: {}", statuses.join(", "))
    }
}

/// The report path for one run of a scenario.
pub(crate) fn report_path(dir: &Path, scenario: &str, run: &str) -> PathBuf {
    dir.join(format!("{scenario}-{run}.html"))
}
