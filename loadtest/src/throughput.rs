//! `throughput`: the same load first straight at one mock, then through the
//! gateway over three mocks, then through nginx in front of that mock (when
//! nginx is installed), in one run, so every figure is also a ratio.
//!
//! Every request's body differs (`--workload unique`: a ~1 KiB four-message
//! chat with a fresh last message; `conversations`: multi-turn chats that
//! grow by a turn per request), from a seeded generator, so each run sends
//! the same bodies.
//!
//! Part 1 sends `--requests` (2,000) at `--concurrency` (50), or runs for
//! `--duration`; part 2 sends a fixed `--rate` (200 requests/s) to each
//! path for `--rate-time`, the paths interleaved ([`crate::paced`]), to
//! read the latency the gateway adds when nothing queues.
//! The gateway's CPU time per request comes from its own process.
//!
//! Fails (exit 1) if any request fails or is not a 200. The targets are
//! printed as met or missed; they are judged on a release build.

use mock_upstreams::otlp::{OtlpReceiver, ReceiverOptions};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::bodies::Workload;
use crate::drive::{self, Clock, Measured, Plan};
use crate::harness::Body;
use crate::harness::{self, CLIENT_KEY, Gateway, Mocks, mb, ms, verdict};
use crate::nginx::Nginx;
use crate::paced;

#[derive(Debug, Clone, Args)]
pub(crate) struct ThroughputArgs {
    /// Requests in part 1 (ignored with --duration).
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Concurrent clients in part 1.
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// Run part 1 for this long instead of a request count, e.g. `30s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Fixed request rate for part 2, per second to each path.
    #[arg(long, default_value_t = 200)]
    pub rate: usize,
    /// How long part 2 holds that rate (whole seconds).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub rate_time: Duration,
    /// The bodies sent.
    #[arg(long, value_enum, default_value = "unique")]
    pub workload: Workload,
    /// Also run parts 1 and 2 through a second gateway whose limits live in
    /// Redis (`[cluster]`; starts `redis-server` on 127.0.0.1), to compare.
    #[arg(long)]
    pub redis: bool,
    /// Also run part 1 through a gateway with `[tracing]` on, its spans
    /// sent over OTLP/gRPC to a receiver in this process, to show what a
    /// span per request costs the gateway.
    #[arg(long)]
    pub tracing: bool,
}

struct Run {
    measured: Measured,
    span: Duration,
}

impl Run {
    fn rps(&self) -> f64 {
        self.measured.requests as f64 / self.span.as_secs_f64().max(1e-9)
    }

    fn print(&self, label: &str) {
        let m = &self.measured;
        println!("  {label}");
        println!(
            "    {} requests in {:.3} s: {:.0} requests/s",
            m.requests,
            self.span.as_secs_f64(),
            self.rps()
        );
        println!("    {}", m.latency_line());
        println!("    {}", m.status_line());
    }

    fn all_ok(&self) -> bool {
        self.measured.requests > 0
            && self.measured.failures == 0
            && self.measured.count(200) == self.measured.requests
    }
}

async fn load(host: &str, key: &str, workload: Workload, plan: &Plan) -> anyhow::Result<Run> {
    let clock = Clock::new();
    let tx = harness::chat_transaction(
        Arc::from(key),
        Body::varied(workload),
        Arc::clone(&clock),
        false,
    );
    let metrics = drive::drive(host, plan, tx).await?;
    Ok(Run {
        measured: Measured::of(&metrics),
        span: clock.span(),
    })
}

/// Part 2: every path at a fixed rate, interleaved; the runs and the
/// gateway's added p50 in milliseconds.
async fn paced_part(
    args: &ThroughputArgs,
    direct_host: &str,
    direct_key: &str,
    gateway: &Gateway,
    nginx: &Option<Nginx>,
) -> anyhow::Result<(Vec<paced::Paced>, f64)> {
    println!(
        "  at a fixed {} requests/s to each path for {}, the paths interleaved:",
        args.rate,
        humantime::format_duration(args.rate_time)
    );
    let mut paths = vec![
        paced::Path {
            origin: direct_host,
            key: direct_key,
        },
        paced::Path {
            origin: &gateway.origin,
            key: CLIENT_KEY,
        },
    ];
    if let Some(nginx) = nginx {
        paths.push(paced::Path {
            origin: &nginx.origin,
            key: direct_key,
        });
    }
    let paced = paced::run(&paths, args.rate, args.rate_time, args.workload).await?;
    let (direct_rate, through_rate) = (&paced[0], &paced[1]);
    let added_p50 = added_ms(through_rate, direct_rate);
    println!(
        "    p50 direct {}, through the gateway {}: added {added_p50:.3} ms",
        ms(direct_rate.p50_us()),
        ms(through_rate.p50_us()),
    );
    if let Some(nginx_rate) = paced.get(2) {
        println!(
            "    p50 through nginx {}: added {:.3} ms",
            ms(nginx_rate.p50_us()),
            added_ms(nginx_rate, direct_rate)
        );
    }
    Ok((paced, added_p50))
}

/// What the run will do, and the gateway's memory before it.
fn describe(args: &ThroughputArgs, idle_rss: u64) {
    let what = match args.duration {
        Some(d) => format!(
            "{} at {} concurrent",
            humantime::format_duration(d),
            args.concurrency
        ),
        None => format!(
            "{} requests at {} concurrent",
            args.requests, args.concurrency
        ),
    };
    println!(
        "throughput: {what}, non-streaming chat ({:?} bodies), 3 mocks",
        args.workload
    );
    println!(
        "  gateway RSS once started, before any request: {}",
        mb(idle_rss)
    );
}

/// The gateway's memory at the end of the run and once settled (and
/// nginx's): the settled figure.
async fn print_memory(gateway: &Gateway, nginx: Option<&Nginx>) -> u64 {
    let (peak, last_rss) = gateway.memory();
    let end_rss = gateway.settled_memory().await;
    println!(
        "    gateway memory: {} at the last request, {} {:.1} s later (peak {})",
        mb(last_rss),
        mb(end_rss),
        harness::SETTLE.as_secs_f64(),
        mb(peak)
    );
    if let Some(nginx) = nginx {
        println!(
            "    nginx memory (master and workers): {}",
            mb(nginx.memory())
        );
    }
    end_rss
}

/// Part 1 through nginx: the run and nginx's CPU per request (µs).
async fn through_nginx(
    nginx: &Nginx,
    key: &str,
    workload: Workload,
    plan: &Plan,
) -> anyhow::Result<(Run, f64)> {
    let cpu_before = nginx.cpu_time();
    let run = load(&nginx.origin, key, workload, plan).await?;
    let cpu = nginx.cpu_time().saturating_sub(cpu_before);
    let us = per_request(cpu, &run.measured.requests);
    Ok((run, us))
}

pub(crate) async fn run(args: &ThroughputArgs, dir: &std::path::Path) -> anyhow::Result<bool> {
    let mocks = Mocks::start(3, &[]).await?;
    let gateway = Gateway::start(&mocks, dir, "throughput", "", &|_| String::new()).await?;
    let (_, idle_rss) = gateway.memory();
    let direct_host = mocks.origin(0).to_owned();
    let direct_key = mocks.keys[0].clone();
    let nginx = Nginx::start(dir, &direct_host).await?;
    let report = |name: &str| -> PathBuf { drive::report_path(dir, "throughput", name) };
    let workload = args.workload;

    let part1 = |name: &str| match args.duration {
        Some(d) => Plan::timed(args.concurrency, d, report(name)),
        None => Plan::requests(args.requests, args.concurrency, report(name)),
    };
    describe(args, idle_rss);

    // Warm every path (connections, tokenizer tables) before measuring.
    let warm = Plan::requests(args.concurrency * 4, args.concurrency, report("warmup"));
    load(&direct_host, &direct_key, workload, &warm).await?;
    load(&gateway.origin, CLIENT_KEY, workload, &warm).await?;
    if let Some(nginx) = &nginx {
        load(&nginx.origin, &direct_key, workload, &warm).await?;
    }

    let direct = load(&direct_host, &direct_key, workload, &part1("direct")).await?;
    let before = mocks.stats().await?;
    let cpu_before = gateway.cpu_time();
    let through = load(&gateway.origin, CLIENT_KEY, workload, &part1("gateway")).await?;
    let cpu = gateway.cpu_time().saturating_sub(cpu_before);
    let after = mocks.stats().await?;
    let proxied = match &nginx {
        Some(nginx) => Some(through_nginx(nginx, &direct_key, workload, &part1("nginx")).await?),
        None => None,
    };
    direct.print("direct to one mock");
    through.print("through the gateway");
    let cpu_us = per_request(cpu, &through.measured.requests);
    println!("    per node: {}", harness::per_node_line(&before, &after));
    println!("    gateway CPU: {cpu_us:.1} µs per request");
    if let Some((run, nginx_cpu)) = &proxied {
        run.print("through nginx to the same mock");
        println!("    nginx CPU (master and workers): {nginx_cpu:.1} µs per request");
    }

    let (paced, added_p50) = paced_part(args, &direct_host, &direct_key, &gateway, &nginx).await?;
    let end_rss = print_memory(&gateway, nginx.as_ref()).await;

    print_targets(&Summary {
        direct: &direct,
        through: &through,
        nginx: proxied.as_ref().map(|(run, _)| run),
        cpu_us,
        added_p50,
        rate: args.rate,
        end_rss,
    });
    println!(
        "  HTML reports: {}",
        dir.join("throughput-*.html").display()
    );

    let mut ok = [&direct, &through]
        .into_iter()
        .chain(proxied.as_ref().map(|(run, _)| run))
        .all(Run::all_ok)
        && paced.iter().all(paced::Paced::all_ok);
    gateway.stop().await?;
    if let Some(nginx) = nginx {
        nginx.stop().await?;
    }
    if args.tracing {
        ok &= compare_with_tracing(args, dir, &mocks, &through, cpu_us).await?;
    }
    if args.redis {
        ok &= compare_with_redis(args, dir, &mocks, &through, cpu_us, added_p50).await?;
    }
    mocks.stop().await?;
    if !ok {
        println!("FAILED: some requests failed or were not answered 200");
    }
    Ok(ok)
}

/// What part 1 and part 2 measured, for the ratios and targets.
struct Summary<'a> {
    direct: &'a Run,
    through: &'a Run,
    nginx: Option<&'a Run>,
    cpu_us: f64,
    added_p50: f64,
    rate: usize,
    end_rss: u64,
}

/// The gateway's ratios to direct and to nginx, and the targets.
fn print_targets(s: &Summary<'_>) {
    let Summary {
        direct,
        through,
        cpu_us,
        added_p50,
        end_rss,
        ..
    } = *s;
    let ratio = through.rps() / direct.rps().max(1e-9);
    println!("  gateway / direct:");
    println!("    requests/s {ratio:.2}×");
    println!(
        "    p50 {:.2}×, p99 {:.2}×",
        through.measured.p50_us as f64 / direct.measured.p50_us.max(1) as f64,
        through.measured.p99_us as f64 / direct.measured.p99_us.max(1) as f64
    );
    let to_nginx = s.nginx.map(|run| through.rps() / run.rps().max(1e-9));
    if let Some(to_nginx) = to_nginx {
        println!("  gateway / nginx: requests/s {to_nginx:.2}×");
    }
    println!("  targets:");
    if let Some(to_nginx) = to_nginx {
        println!(
            "    requests/s ≥ 0.6× nginx: {to_nginx:.2}× {}",
            verdict(to_nginx >= 0.6)
        );
    }
    println!(
        "    CPU ≤ 45 µs per request: {cpu_us:.1} µs {}",
        verdict(cpu_us <= 45.0)
    );
    println!(
        "    added p50 ≤ 0.15 ms at {} requests/s: {added_p50:.3} ms {}",
        s.rate,
        verdict(added_p50 <= 0.15)
    );
    println!(
        "    RSS ≤ 60 MB at the end (idle {:.1} s): {} {}",
        harness::SETTLE.as_secs_f64(),
        mb(end_rss),
        verdict(end_rss <= 60_000_000)
    );
}

/// CPU time per request, in microseconds.
fn per_request(cpu: Duration, requests: &usize) -> f64 {
    cpu.as_secs_f64() * 1e6 / (*requests).max(1) as f64
}

/// The p50 `run` adds over `direct`, in milliseconds.
fn added_ms(run: &paced::Paced, direct: &paced::Paced) -> f64 {
    (run.p50_us() as i64 - direct.p50_us() as i64) as f64 / 1000.0
}

/// Part 1 through a gateway that makes a span per request and sends it
/// over OTLP/gRPC to a receiver in this process (whose CPU is not the
/// gateway's): the gateway's CPU per request against the run without.
async fn compare_with_tracing(
    args: &ThroughputArgs,
    dir: &std::path::Path,
    mocks: &Mocks,
    untraced: &Run,
    untraced_cpu_us: f64,
) -> anyhow::Result<bool> {
    let receiver = OtlpReceiver::start(ReceiverOptions::default()).await?;
    let extra = format!(
        "[tracing]\notlp_endpoint = \"{}\"\nexport_interval = \"1s\"\n",
        receiver.endpoint()
    );
    let gateway =
        Gateway::start(mocks, dir, "throughput-tracing", &extra, &|_| String::new()).await?;
    let report = |name: &str| -> PathBuf { drive::report_path(dir, "throughput", name) };
    let part1 = match args.duration {
        Some(d) => Plan::timed(args.concurrency, d, report("tracing")),
        None => Plan::requests(args.requests, args.concurrency, report("tracing")),
    };
    let warm = Plan::requests(
        args.concurrency * 4,
        args.concurrency,
        report("tracing-warmup"),
    );
    let warmed = load(&gateway.origin, CLIENT_KEY, args.workload, &warm).await?;
    // The warm-up's spans arrive first: they are not this run's.
    receiver
        .until(warmed.measured.requests as u64, Duration::from_secs(10))
        .await;
    let spans_before = receiver.spans();
    let cpu_before = gateway.cpu_time();
    let traced = load(&gateway.origin, CLIENT_KEY, args.workload, &part1).await?;
    // The last batch leaves within the export interval: its CPU counts.
    let sent = traced.measured.requests as u64;
    let all_in = receiver
        .until(spans_before + sent, Duration::from_secs(10))
        .await;
    let cpu = gateway.cpu_time().saturating_sub(cpu_before);
    gateway.stop().await?;
    let cpu_us = per_request(cpu, &traced.measured.requests);
    traced.print("through the gateway, a span per request exported over OTLP/gRPC");
    println!(
        "    gateway CPU: {cpu_us:.1} µs per request, against {untraced_cpu_us:.1} µs untraced: \
         tracing costs {:.1} µs per request (export included; the receiver's CPU is not)",
        cpu_us - untraced_cpu_us
    );
    println!(
        "    requests/s {:.0} against {:.0} untraced ({:.2}×)",
        traced.rps(),
        untraced.rps(),
        traced.rps() / untraced.rps().max(1e-9)
    );
    println!(
        "    spans received: {} of {} requests: {}",
        receiver.spans() - spans_before,
        sent,
        verdict(all_in)
    );
    Ok(traced.all_ok() && all_in)
}

/// The same parts 1 and 2 through a gateway whose limits live in Redis: one
/// admission and one release script per request.
async fn compare_with_redis(
    args: &ThroughputArgs,
    dir: &std::path::Path,
    mocks: &Mocks,
    local: &Run,
    local_cpu_us: f64,
    local_added_p50: f64,
) -> anyhow::Result<bool> {
    let redis = harness::Redis::start().await?;
    let extra = format!("[cluster]\nredis_url = \"{}\"\n", redis.url);
    let gateway =
        Gateway::start(mocks, dir, "throughput-redis", &extra, &|_| String::new()).await?;
    let report = |name: &str| -> PathBuf { drive::report_path(dir, "throughput", name) };
    let part1 = match args.duration {
        Some(d) => Plan::timed(args.concurrency, d, report("redis")),
        None => Plan::requests(args.requests, args.concurrency, report("redis")),
    };
    let warm = Plan::requests(
        args.concurrency * 4,
        args.concurrency,
        report("redis-warmup"),
    );
    load(&gateway.origin, CLIENT_KEY, args.workload, &warm).await?;
    let cpu_before = gateway.cpu_time();
    let shared = load(&gateway.origin, CLIENT_KEY, args.workload, &part1).await?;
    let cpu = gateway.cpu_time().saturating_sub(cpu_before);
    let cpu_us = cpu.as_secs_f64() * 1e6 / shared.measured.requests.max(1) as f64;
    let paths = [
        paced::Path {
            origin: mocks.origin(0),
            key: &mocks.keys[0],
        },
        paced::Path {
            origin: &gateway.origin,
            key: CLIENT_KEY,
        },
    ];
    let paced = paced::run(&paths, args.rate, args.rate_time, args.workload).await?;
    let (direct_rate, shared_rate) = (&paced[0], &paced[1]);
    let status = gateway.status().await?;
    gateway.stop().await?;

    shared.print("through the gateway, limits in Redis ([cluster])");
    println!("    gateway CPU: {cpu_us:.1} µs per request (redis-server's own CPU not included)");
    let added = added_ms(shared_rate, direct_rate);
    println!(
        "    at {} requests/s: p50 {}, added {added:.3} ms",
        args.rate,
        ms(shared_rate.p50_us()),
    );
    println!("  Redis against in-process limits (same run, same mocks):");
    println!(
        "    requests/s {:.0} against {:.0} ({:.2}×)",
        shared.rps(),
        local.rps(),
        shared.rps() / local.rps().max(1e-9)
    );
    println!("    gateway CPU {cpu_us:.1} µs against {local_cpu_us:.1} µs per request");
    println!(
        "    added p50 at {} requests/s: {added:.3} ms against {local_added_p50:.3} ms",
        args.rate,
    );
    let up = status["cluster"]["redis"] == "up";
    println!("    redis stayed up: {}", verdict(up));
    drop(redis);
    Ok(shared.all_ok() && paced.iter().all(paced::Paced::all_ok) && up)
}
