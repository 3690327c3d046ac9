//! `soak`: mixed traffic for a long while, with everything that goes wrong
//! in the field going wrong now and then, and nothing may leak or be lost.
//!
//! `--clients` workers send, back to back for `--duration`: JSON chat
//! requests, streams read to their end, streams the client abandons after
//! the first event, and requests the client gives up on while they wait.
//! The mocks answer some requests 500 or 503, never answer some (the
//! gateway's `first_byte_timeout` cuts them), and cut some answers off
//! half-way. One node has a concurrency limit, so requests queue. Every
//! `--reload-every` the config file is replaced (that node's limit
//! alternates), and the reload must take.
//!
//! Reported: requests by outcome, the gateway's RSS after warm-up and at
//! the end, and what is left once the load stops: requests in flight,
//! reserved tokens and the queue (all must reach 0). A request is *lost*
//! when its client (one that did not give up) got no answer at all: no
//! status within 30 s, or the connection failed before one. Exits 1 on any
//! lost request, anything left over, or a reload that did not take.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use futures_util::StreamExt;

use crate::harness::{self, CHAT_PATH, CLIENT_KEY, Gateway, Mocks, mb, verdict};

#[derive(Debug, Clone, Args)]
pub(crate) struct SoakArgs {
    /// Concurrent clients.
    #[arg(long, default_value_t = 40)]
    pub clients: usize,
    /// How long the clients send.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub duration: Duration,
    /// How often the config file is replaced.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1m")]
    pub reload_every: Duration,
}

impl SoakArgs {
    pub(crate) fn smoke(&mut self) {
        self.clients = 16;
        self.duration = Duration::from_secs(30);
        self.reload_every = Duration::from_secs(10);
    }
}

const SCENARIO: &str = "soak";
/// A client that does not give up waits this long for an answer's head.
const ANSWER_WAIT: Duration = Duration::from_secs(30);
/// Once the load stops, what is in flight must be gone within this.
const SETTLE_WAIT: Duration = Duration::from_secs(30);
/// The gateway's settings: upstream faults are cut quickly, and the node
/// with a concurrency limit queues.
const SETTINGS: &str = "[upstream]\nfirst_byte_timeout = \"2s\"\n[queue]\nmax_wait = \"2s\"\n[retry]\nattempts = 1\n[health]\ninterval = \"2s\"\n";

/// The node with a concurrency limit (mock index) and its limit in turn.
const QUEUED: usize = 2;

fn quota(generation: u64) -> impl Fn(usize) -> String {
    move |i| {
        if i == QUEUED {
            format!("max_concurrency = {}", 4 + 4 * (generation % 2))
        } else {
            "rpm = 1000000".to_owned()
        }
    }
}

/// What each kind of request came to.
#[derive(Default)]
struct Tally {
    answered: AtomicU64,
    streams_complete: AtomicU64,
    streams_broken: AtomicU64,
    abandoned: AtomicU64,
    lost: AtomicU64,
    by_status: [AtomicU64; 6],
}

impl Tally {
    fn status(&self, status: u16) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        let class = usize::from(status / 100).min(5);
        self.by_status[class].fetch_add(1, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

pub(crate) async fn run(args: &SoakArgs, report_dir: &Path) -> anyhow::Result<bool> {
    let faults = [
        "--fail-500",
        "0.02",
        "--fail-503",
        "0.01",
        "--hang",
        "0.005",
        "--close-midway",
        "0.01",
    ];
    let mut options: Vec<String> = faults.iter().map(|s| (*s).to_owned()).collect();
    options.extend(
        [
            "--first-event",
            "10ms",
            "--event-interval",
            "5ms",
            "--words",
            "24",
        ]
        .map(str::to_owned),
    );
    let mocks = Mocks::start(3, &options).await?;
    let gateway = Gateway::start(&mocks, report_dir, SCENARIO, SETTINGS, &quota(0)).await?;
    println!(
        "soak: {} clients for {:?}, a reload every {:?}, faults: 2% 500, 1% 503, 0.5% hang, 1% cut",
        args.clients, args.duration, args.reload_every
    );
    warm_up(&gateway).await?;
    let (_, rss_start) = gateway.memory();
    let tally = Arc::new(Tally::default());
    let end = Instant::now() + args.duration;
    let workers: Vec<_> = (0..args.clients)
        .map(|i| tokio_scoped_worker(i, gateway.origin.clone(), Arc::clone(&tally), end))
        .collect();
    let reloads = reload_regularly(&gateway, &mocks, args.reload_every, end).await;
    for worker in workers {
        worker.await?;
    }
    let left = gateway.settle(SETTLE_WAIT).await?;
    let (rss_peak, rss_end) = gateway.memory();
    let reloads = reloads?;
    report(&tally, rss_start, rss_end, rss_peak, reloads, &left);
    let lost = Tally::get(&tally.lost);
    let ok = lost == 0 && left.is_empty();
    gateway.stop().await?;
    mocks.stop().await?;
    Ok(ok)
}

/// A few requests of each kind, so the tokenizer tables are loaded and
/// the pools warm before the starting RSS is read.
async fn warm_up(gateway: &Gateway) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    for stream in [false, true, false, true] {
        let response = http
            .post(format!("{}{CHAT_PATH}", gateway.origin))
            .bearer_auth(CLIENT_KEY)
            .header("content-type", "application/json")
            .body(harness::chat_body(stream))
            .send()
            .await?;
        response.bytes().await.ok();
    }
    Ok(())
}

/// One client: requests back to back until `end`, each of a kind chosen
/// by turn (so the mix is exact, not random).
fn tokio_scoped_worker(
    index: usize,
    origin: String,
    tally: Arc<Tally>,
    end: Instant,
) -> tokio::task::JoinHandle<()> {
    #[expect(
        clippy::disallowed_methods,
        reason = "the load's own workers, awaited before the scenario ends"
    )]
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let url = format!("{origin}{CHAT_PATH}");
        let mut turn = index;
        while Instant::now() < end {
            turn += 1;
            let kind = turn % 20;
            let stream = kind >= 12;
            let request = http
                .post(&url)
                .bearer_auth(CLIENT_KEY)
                .header("content-type", "application/json")
                .body(harness::chat_body(stream));
            match kind {
                // A client that gives up while it waits for the answer.
                0 => give_up_waiting(request, &tally).await,
                // A client that reads one event and hangs up.
                12..=13 => abandon_stream(request, &tally).await,
                _ => read_whole(request, stream, &tally).await,
            }
        }
    })
}

async fn read_whole(request: reqwest::RequestBuilder, stream: bool, tally: &Tally) {
    let response = match tokio::time::timeout(ANSWER_WAIT, request.send()).await {
        Ok(Ok(response)) => response,
        Ok(Err(_)) | Err(_) => {
            tally.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    tally.status(response.status().as_u16());
    let body = response.bytes().await;
    if stream {
        let complete = body.is_ok_and(|b| b.ends_with(b"data: [DONE]\n\n"));
        let counter = if complete {
            &tally.streams_complete
        } else {
            &tally.streams_broken
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

async fn abandon_stream(request: reqwest::RequestBuilder, tally: &Tally) {
    tally.abandoned.fetch_add(1, Ordering::Relaxed);
    if let Ok(Ok(response)) = tokio::time::timeout(ANSWER_WAIT, request.send()).await {
        let mut body = response.bytes_stream();
        let _ = body.next().await;
    }
}

async fn give_up_waiting(request: reqwest::RequestBuilder, tally: &Tally) {
    tally.abandoned.fetch_add(1, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_millis(5), request.send()).await;
}

/// Replaces the config every `every` until `end`; each must take effect.
async fn reload_regularly(
    gateway: &Gateway,
    mocks: &Mocks,
    every: Duration,
    end: Instant,
) -> anyhow::Result<u64> {
    let mut generation = 1;
    while Instant::now() + every < end {
        tokio::time::sleep(every).await;
        let all: Vec<usize> = (0..mocks.urls.len()).collect();
        gateway.rewrite_config(mocks, SCENARIO, SETTINGS, &quota(generation), &all)?;
        generation += 1;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = gateway.status().await?;
            if status["config"]["generation"].as_u64() == Some(generation) {
                break;
            }
            if Instant::now() > deadline {
                bail!("reload {generation} did not take within 10 s: {status}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
    Ok(generation - 1)
}

fn report(tally: &Tally, start: u64, end: u64, peak: u64, reloads: u64, left: &[String]) {
    let get = Tally::get;
    let classes: Vec<String> = (1..6)
        .map(|c| format!("{c}xx {}", get(&tally.by_status[c])))
        .collect();
    println!(
        "  answered {} ({})",
        get(&tally.answered),
        classes.join(", ")
    );
    println!(
        "  streams read whole: {} complete, {} cut by an upstream fault; {} requests abandoned by their clients",
        get(&tally.streams_complete),
        get(&tally.streams_broken),
        get(&tally.abandoned),
    );
    println!("  reloads applied: {reloads}");
    println!(
        "  gateway RSS: {} after warm-up, {} at the end (peak {})",
        mb(start),
        mb(end),
        mb(peak)
    );
    let lost = get(&tally.lost);
    println!(
        "  requests lost (no answer): {lost} ({})",
        verdict(lost == 0)
    );
    println!(
        "  left once the load stopped (in flight, reserved tokens, queue): {} ({})",
        if left.is_empty() {
            "nothing".to_owned()
        } else {
            left.join(", ")
        },
        verdict(left.is_empty())
    );
}
