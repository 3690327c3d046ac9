//! `streaming`: `--streams` (1,000) concurrent chat streams of `--events`
//! content events `--interval` apart, first straight at one mock, then
//! through the gateway over three mocks.
//!
//! Every request's body differs (a fresh last message from a seeded
//! generator, as `throughput --workload unique` sends), and each run sends
//! the same bodies. Every stream is read to its end; the direct run records
//! what each body got, and every later stream is compared byte for byte
//! with that (the mocks answer with a fixed `created`, so equal requests
//! get equal bytes): a stream counts as complete only if it is identical,
//! final `data: [DONE]` included. With `--gateway-only` there is no direct
//! run to compare with beyond the warm-up's, so a stream with no reference
//! counts when it ends with `data: [DONE]`. Time to first event is
//! measured from sending to the first body bytes.
//!
//! With nginx installed, the same streams also go through nginx in front of
//! the direct mock, in the same run. Time to first event is reported for
//! the connect burst (each client's first stream, all opening connections
//! at once) and the steady state (its later streams) apart.
//!
//! Holds when every stream in every run completes identically. Targets
//! printed: streams/s ≥ 0.97× direct, first-event p99 ≤ 1.5× nginx's,
//! time-to-first-event overhead < 1 ms at p50, gateway memory at the end
//! ≤ 60 MB; for thousands of slow streams, the memory they hold: the peak
//! ≤ 250 MB.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use goose::prelude::*;
use samples::Samples;

use crate::bodies::{PerUser, Workload};
use crate::drive::{self, Clock, Measured, Plan};
use crate::harness::{self, CHAT_PATH, CLIENT_KEY, Gateway, Mocks, mb, ms, verdict};
use crate::nginx::Nginx;

#[derive(Debug, Clone, Args)]
pub(crate) struct StreamingArgs {
    /// Concurrent streams.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// Streams each client runs one after another.
    #[arg(long, default_value_t = 2)]
    pub per_client: usize,
    /// Content events per stream.
    #[arg(long, default_value_t = 20)]
    pub events: usize,
    /// Time to the first content event, and between events.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20ms")]
    pub interval: Duration,
    /// Only run through the gateway (for very large --streams, where the
    /// direct run would only measure the mock).
    #[arg(long)]
    pub gateway_only: bool,
}

impl StreamingArgs {
    pub(crate) fn smoke(&mut self) {
        self.streams = 50;
        self.per_client = 2;
        self.events = 5;
        self.interval = Duration::from_millis(10);
    }

    /// The memory target for this many streams, and whether it is the
    /// peak's (what thousands of open streams hold) or the end's (what a
    /// burst of hundreds leaves behind).
    fn memory_target(&self) -> (u64, bool) {
        if self.streams > 1000 {
            (250_000_000, true)
        } else {
            (60_000_000, false)
        }
    }
}

/// Per-stream measurements, gathered from every user.
mod samples {
    use std::sync::Mutex;

    /// Microsecond samples; a plain mutex is fine off the measured path
    /// (taken once per stream, after its first event).
    #[derive(Default)]
    pub(super) struct Samples(Mutex<Vec<u64>>);

    impl Samples {
        pub(super) fn push(&self, us: u64) {
            if let Ok(mut v) = self.0.lock() {
                v.push(us);
            }
        }

        pub(super) fn percentile(&self, p: f64) -> u64 {
            let Ok(mut v) = self.0.lock() else { return 0 };
            if v.is_empty() {
                return 0;
            }
            v.sort_unstable();
            let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
            v[i]
        }
    }
}

#[derive(Default)]
struct Tally {
    first_event: Samples,
    /// Each client's first stream (it opens its connection with all the
    /// others), and its later ones.
    first_event_burst: Samples,
    first_event_steady: Samples,
    /// The clients that have had a first event.
    started: std::sync::Mutex<std::collections::HashSet<usize>>,
    identical: AtomicU64,
    different: AtomicU64,
    broken: AtomicU64,
    open: AtomicUsize,
    peak_open: AtomicUsize,
}

struct Run {
    measured: Measured,
    span: Duration,
    tally: Arc<Tally>,
}

impl Run {
    fn streams_per_s(&self) -> f64 {
        self.tally.identical.load(Ordering::Relaxed) as f64 / self.span.as_secs_f64().max(1e-9)
    }

    fn print(&self, label: &str, expected: usize) {
        let t = &self.tally;
        println!("  {label}");
        println!(
            "    {} of {expected} streams complete and byte-identical ({} different, {} broken) in {:.2} s: {:.0} streams/s; peak {} open at once",
            t.identical.load(Ordering::Relaxed),
            t.different.load(Ordering::Relaxed),
            t.broken.load(Ordering::Relaxed),
            self.span.as_secs_f64(),
            self.streams_per_s(),
            t.peak_open.load(Ordering::Relaxed),
        );
        println!(
            "    time to first event: p50 {}, p95 {}, p99 {}; response head p50 {}",
            ms(t.first_event.percentile(0.50)),
            ms(t.first_event.percentile(0.95)),
            ms(t.first_event.percentile(0.99)),
            ms(self.measured.p50_us),
        );
        for (label, samples) in [
            ("connect burst", &t.first_event_burst),
            ("steady state", &t.first_event_steady),
        ] {
            println!(
                "      {label}: p50 {}, p99 {}",
                ms(samples.percentile(0.50)),
                ms(samples.percentile(0.99))
            );
        }
        println!("    {}", self.measured.status_line());
    }

    fn all_complete(&self, expected: usize) -> bool {
        self.tally.identical.load(Ordering::Relaxed) as usize == expected
            && self.measured.failures == 0
    }
}

/// The answer each body got straight from the mock (the direct run
/// records them); every later run must match them byte for byte.
#[derive(Default)]
struct References(std::sync::Mutex<HashMap<Bytes, Bytes>>);

impl References {
    fn record(&self, body: Bytes, answer: Bytes) {
        if let Ok(mut all) = self.0.lock() {
            all.insert(body, answer);
        }
    }

    /// Whether `received` is what `body` got directly; with no reference
    /// (no direct run), whether it is complete.
    fn matches(&self, body: &Bytes, received: &[u8]) -> bool {
        let reference = self.0.lock().ok().and_then(|all| all.get(body).cloned());
        match reference {
            Some(reference) => received == reference,
            None => received.ends_with(DONE),
        }
    }
}

/// How a stream ends, `[DONE]` included.
const DONE: &[u8] = b"data: [DONE]\n\n";

/// Whether a run records the references or checks against them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Record,
    Compare,
}

fn stream_transaction(
    key: Arc<str>,
    references: Arc<References>,
    check: Check,
    clock: Arc<Clock>,
    tally: Arc<Tally>,
) -> TransactionFunction {
    let generators = Arc::new(PerUser::new(Workload::Unique));
    Arc::new(move |user| {
        let body = generators.next(user.weighted_users_index, true);
        let (key, references, clock, tally) = (
            Arc::clone(&key),
            Arc::clone(&references),
            Arc::clone(&clock),
            Arc::clone(&tally),
        );
        Box::pin(async move {
            let start = Instant::now();
            clock.started(start);
            let open = tally.open.fetch_add(1, Ordering::Relaxed) + 1;
            tally.peak_open.fetch_max(open, Ordering::Relaxed);
            let mut goose = drive::post(user, CHAT_PATH, &key, &body).await?;
            let mut received = Vec::with_capacity(4096);
            let mut failure = None;
            match goose.response {
                Ok(response) if response.status().is_success() => {
                    let mut chunks = response.bytes_stream();
                    while let Some(chunk) = chunks.next().await {
                        match chunk {
                            Ok(bytes) => {
                                if received.is_empty() && !bytes.is_empty() {
                                    let us = start.elapsed().as_micros() as u64;
                                    tally.first_event.push(us);
                                    let first = tally
                                        .started
                                        .lock()
                                        .is_ok_and(|mut s| s.insert(user.weighted_users_index));
                                    let phase = if first {
                                        &tally.first_event_burst
                                    } else {
                                        &tally.first_event_steady
                                    };
                                    phase.push(us);
                                }
                                received.extend_from_slice(&bytes);
                            }
                            Err(e) => {
                                failure = Some(format!("stream broke: {e}"));
                                break;
                            }
                        }
                    }
                }
                Ok(response) => failure = Some(format!("status {}", response.status())),
                Err(e) => failure = Some(e.to_string()),
            }
            tally.open.fetch_sub(1, Ordering::Relaxed);
            clock.ended(Instant::now());
            if failure.is_none() {
                let same = match check {
                    Check::Record => received.ends_with(DONE),
                    Check::Compare => references.matches(&body, &received),
                };
                if !same {
                    tally.different.fetch_add(1, Ordering::Relaxed);
                    failure = Some("stream differs from the direct reference".to_owned());
                } else if check == Check::Record {
                    references.record(body, Bytes::from(received));
                }
            }
            match failure {
                None => {
                    tally.identical.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Some(e) => {
                    if !e.starts_with("stream differs") {
                        tally.broken.fetch_add(1, Ordering::Relaxed);
                    }
                    user.set_failure(&e, &mut goose.request, None, None)
                }
            }
        })
    })
}

async fn load(
    host: &str,
    key: &str,
    references: &Arc<References>,
    check: Check,
    plan: &Plan,
) -> anyhow::Result<Run> {
    let clock = Clock::new();
    let tally = Arc::new(Tally::default());
    let tx = stream_transaction(
        Arc::from(key),
        Arc::clone(references),
        check,
        Arc::clone(&clock),
        Arc::clone(&tally),
    );
    let metrics = drive::drive(host, plan, tx).await?;
    Ok(Run {
        measured: Measured::of(&metrics),
        span: clock.span(),
        tally,
    })
}

pub(crate) async fn run(args: &StreamingArgs, dir: &std::path::Path) -> anyhow::Result<bool> {
    let setup = start(args, dir).await?;
    let runs = drive_all(args, dir, &setup).await?;
    runs.print(args);
    let ok = runs.judge(args);
    println!("  HTML reports: {}", dir.join("streaming-*.html").display());
    setup.gateway.stop().await?;
    if let Some(nginx) = setup.nginx {
        nginx.stop().await?;
    }
    setup.mocks.stop().await?;
    if !ok {
        println!("FAILED: some streams were incomplete or differed");
    }
    Ok(ok)
}

/// What a streaming run talks to: the mocks, the gateway, and nginx
/// (unless `--gateway-only`).
struct Setup {
    mocks: Mocks,
    gateway: Gateway,
    nginx: Option<Nginx>,
}

async fn start(args: &StreamingArgs, dir: &std::path::Path) -> anyhow::Result<Setup> {
    let interval = humantime::format_duration(args.interval).to_string();
    let mocks = Mocks::start(
        3,
        &[
            "--words".to_owned(),
            args.events.to_string(),
            "--first-event".to_owned(),
            interval.clone(),
            "--event-interval".to_owned(),
            interval.clone(),
        ],
    )
    .await?;
    let gateway = Gateway::start(&mocks, dir, "streaming", "", &|_| String::new()).await?;
    let nginx = if args.gateway_only {
        None
    } else {
        Nginx::start(dir, mocks.origin(0)).await?
    };
    println!(
        "streaming: {} concurrent streams × {} each, {} content events {interval} apart",
        args.streams, args.per_client, args.events
    );

    Ok(Setup {
        mocks,
        gateway,
        nginx,
    })
}

/// What the paths did, and what the gateway used doing it.
struct Runs {
    direct: Option<Run>,
    through: Run,
    /// Through nginx, and nginx's CPU time.
    proxied: Option<(Run, Duration)>,
    gateway_cpu: Duration,
    /// The gateway's RSS before the run, at its peak, at the last
    /// stream's end, and once settled.
    rss: [u64; 4],
    before: Vec<mock_upstreams::StatsReport>,
    stats: Vec<mock_upstreams::StatsReport>,
}

/// Warms nginx's path, then streams through it: the run and nginx's CPU.
async fn through_nginx(
    nginx: &Nginx,
    key: &str,
    references: &Arc<References>,
    warm_plan: &Plan,
    plan: &Plan,
) -> anyhow::Result<(Run, Duration)> {
    load(&nginx.origin, key, references, Check::Compare, warm_plan).await?;
    let cpu_before = nginx.cpu_time();
    let run = load(&nginx.origin, key, references, Check::Compare, plan).await?;
    Ok((run, nginx.cpu_time().saturating_sub(cpu_before)))
}

/// Warms every path, then streams straight to the mock (unless
/// `--gateway-only`), through the gateway, and through nginx.
async fn drive_all(
    args: &StreamingArgs,
    dir: &std::path::Path,
    setup: &Setup,
) -> anyhow::Result<Runs> {
    let expected = args.streams * args.per_client;
    let references = Arc::new(References::default());
    let plan = |name: &str| Plan {
        per_user: Some(args.per_client),
        ..Plan::requests(
            expected,
            args.streams,
            drive::report_path(dir, "streaming", name),
        )
    };

    // Warm both paths (connections, tokenizer tables) before measuring.
    let warm = args.streams.min(50);
    let warm_plan = Plan::requests(warm, warm, drive::report_path(dir, "streaming", "warmup"));
    load(
        setup.mocks.origin(0),
        &setup.mocks.keys[0],
        &references,
        Check::Record,
        &warm_plan,
    )
    .await?;
    load(
        &setup.gateway.origin,
        CLIENT_KEY,
        &references,
        Check::Compare,
        &warm_plan,
    )
    .await?;
    let before = setup.mocks.stats().await?;

    let direct = if args.gateway_only {
        None
    } else {
        Some(
            load(
                setup.mocks.origin(0),
                &setup.mocks.keys[0],
                &references,
                Check::Record,
                &plan("direct"),
            )
            .await?,
        )
    };
    let (_, rss_before) = setup.gateway.memory();
    let cpu_before = setup.gateway.cpu_time();
    let through = load(
        &setup.gateway.origin,
        CLIENT_KEY,
        &references,
        Check::Compare,
        &plan("gateway"),
    )
    .await?;
    let gateway_cpu = setup.gateway.cpu_time().saturating_sub(cpu_before);
    let (peak, last_rss) = setup.gateway.memory();
    let end_rss = setup.gateway.settled_memory().await;
    let stats = setup.mocks.stats().await?;
    let proxied = match &setup.nginx {
        Some(nginx) => {
            let key = &setup.mocks.keys[0];
            Some(through_nginx(nginx, key, &references, &warm_plan, &plan("nginx")).await?)
        }
        None => None,
    };

    Ok(Runs {
        direct,
        through,
        proxied,
        gateway_cpu,
        rss: [rss_before, peak, last_rss, end_rss],
        before,
        stats,
    })
}

impl Runs {
    fn print(&self, args: &StreamingArgs) {
        let expected = args.streams * args.per_client;
        let (direct, through, proxied) = (&self.direct, &self.through, &self.proxied);
        let (gateway_cpu, before, stats) = (self.gateway_cpu, &self.before, &self.stats);
        let [rss_before, peak, last_rss, end_rss] = self.rss;
        if let Some(direct) = &direct {
            direct.print("direct to one mock", expected);
        }
        through.print("through the gateway", expected);
        println!(
            "    gateway CPU: {:.1} µs per stream",
            per_stream(gateway_cpu, expected)
        );
        println!(
            "    per node (direct run included on node a): {}",
            harness::per_node_line(before, stats)
        );
        println!(
            "    gateway memory: {} before the run, {} at the last stream's end, {} {:.1} s later, peak {}",
            mb(rss_before),
            mb(last_rss),
            mb(end_rss),
            harness::SETTLE.as_secs_f64(),
            mb(peak)
        );
        if let Some((proxied, nginx_cpu)) = &proxied {
            proxied.print("through nginx to the same mock", expected);
            println!(
                "    nginx CPU (master and workers): {:.1} µs per stream",
                per_stream(*nginx_cpu, expected)
            );
        }
    }

    /// Whether every stream was whole, and the targets (printed).
    fn judge(&self, args: &StreamingArgs) -> bool {
        let expected = args.streams * args.per_client;
        let (direct, through, proxied) = (&self.direct, &self.through, &self.proxied);
        let [_, peak, _, end_rss] = self.rss;
        let mut ok = through.all_complete(expected);
        println!("  targets:");
        if let Some(direct) = &direct {
            ok &= direct.all_complete(expected);
            let ratio = through.streams_per_s() / direct.streams_per_s().max(1e-9);
            let overhead = through.tally.first_event.percentile(0.5) as i64
                - direct.tally.first_event.percentile(0.5) as i64;
            println!(
                "    streams/s ≥ 0.97× direct: {ratio:.3}× {}",
                verdict(ratio >= 0.97)
            );
            println!(
                "    time-to-first-event overhead < 1 ms at p50: {:.3} ms {}",
                overhead as f64 / 1000.0,
                verdict(overhead < 1000)
            );
        }
        if let Some((proxied, _)) = &proxied {
            ok &= proxied.all_complete(expected);
            let ours = through.tally.first_event.percentile(0.99) as f64;
            let theirs = proxied.tally.first_event.percentile(0.99).max(1) as f64;
            println!(
                "    first-event p99 ≤ 1.5× nginx's: {:.2}× {}",
                ours / theirs,
                verdict(ours <= 1.5 * theirs)
            );
        }
        match args.memory_target() {
            (target, true) => println!(
                "    gateway memory at its peak, {} streams open ≤ {}: {} {}",
                args.streams,
                mb(target),
                mb(peak),
                verdict(peak <= target)
            ),
            (target, false) => println!(
                "    gateway memory at the end (idle {:.1} s) ≤ {}: {} (peak {}) {}",
                harness::SETTLE.as_secs_f64(),
                mb(target),
                mb(end_rss),
                mb(peak),
                verdict(end_rss <= target)
            ),
        }
        println!(
            "    every stream complete, [DONE] included, byte-identical: {}",
            verdict(ok)
        );
        ok
    }
}

/// CPU time per stream, in microseconds.
fn per_stream(cpu: Duration, streams: usize) -> f64 {
    cpu.as_secs_f64() * 1e6 / streams.max(1) as f64
}
