//! `soak`: mixed traffic for a long while, with everything that goes wrong
//! in the field going wrong now and then, and nothing may leak or be lost.
//!
//! `--clients` workers send, back to back for `--duration`: JSON chat
//! requests, streams read to their end, streams the client abandons after
//! the first event, requests the client gives up on while they wait,
//! bodies sent slowly (in pieces, within `server.body_read_timeout`),
//! bodies that stall past it (the gateway must answer 408), and requests
//! of a client with a small daily budget (served until it is spent, then
//! refused). Every fourth worker speaks HTTP/2 (prior knowledge).
//! The mocks answer some requests 500 or 503, never answer some (the
//! gateway's `first_byte_timeout` cuts them), and cut some answers off
//! half-way. One node has a concurrency limit, so requests queue. Every
//! `--reload-every` the config file is replaced (that node's limit
//! alternates), and the reload must take.
//!
//! Reported: requests by outcome, the gateway's RSS after warm-up and at
//! the end, and what is left once the load stops: requests in flight,
//! reserved tokens, the queue, budget waiters, held bodies and budget held
//! in flight (all must reach 0), and the budgeted client's spend (at most
//! its budget). A request is *lost* when its client (one that did not give
//! up, nor stall its body) got no answer at all: no status within 30 s, or
//! the connection failed before one. Exits 1 on any lost request, anything
//! left over, a spend past the budget, a stalled body not answered 408, or
//! a reload that did not take.

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
const SETTINGS: &str = "[upstream]\nfirst_byte_timeout = \"2s\"\n[queue]\nmax_wait = \"2s\"\n[retry]\nattempts = 1\n[health]\ninterval = \"2s\"\n[status]\npublic = true\n\
[[clients]]\nname = \"budgeted\"\nkey_env = \"LOADTEST_BUDGETED_KEY\"\nbudget_usd = 0.05\nbudget_period = \"day\"\n";
/// The budgeted client's key, and its budget (USD a day).
const BUDGETED_KEY: &str = "sk-loadtest-budgeted";
const BUDGET_USD: f64 = 0.05;
/// A body stalls past this and is answered 408 (set through the
/// environment: the harness writes `[server]`).
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(1);

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
    slow_bodies: AtomicU64,
    stalled: AtomicU64,
    /// Stalled bodies answered 408, or whose connection the gateway closed
    /// while the body was still being sent.
    stalled_cut: AtomicU64,
    budgeted_served: AtomicU64,
    budgeted_refused: AtomicU64,
    http2: AtomicU64,
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
    let env = [
        ("LOADTEST_BUDGETED_KEY".to_owned(), BUDGETED_KEY.to_owned()),
        (
            "BALANCER_SERVER__BODY_READ_TIMEOUT".to_owned(),
            humantime::format_duration(BODY_READ_TIMEOUT).to_string(),
        ),
    ];
    let gateway =
        Gateway::start_with_env(&mocks, report_dir, SCENARIO, SETTINGS, &quota(0), &env).await?;
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
    let spent = budget_spent(&gateway).await?;
    let within = spent <= BUDGET_USD + 1e-9;
    println!(
        "  budgeted client: {} served, {} refused; spent ${spent:.6} of ${BUDGET_USD} ({})",
        Tally::get(&tally.budgeted_served),
        Tally::get(&tally.budgeted_refused),
        verdict(within)
    );
    let (stalled, cut) = (Tally::get(&tally.stalled), Tally::get(&tally.stalled_cut));
    println!(
        "  bodies: {} sent slowly and answered; {stalled} stalled, {cut} of them answered 408 or cut ({})",
        Tally::get(&tally.slow_bodies),
        verdict(cut == stalled)
    );
    println!("  requests over HTTP/2: {}", Tally::get(&tally.http2));
    let lost = Tally::get(&tally.lost);
    let ok = lost == 0 && left.is_empty() && within && cut == stalled;
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
        let http2 = index % 4 == 3;
        let http = if http2 {
            reqwest::Client::builder().http2_prior_knowledge().build()
        } else {
            reqwest::Client::builder().build()
        }
        .unwrap_or_default();
        let url = format!("{origin}{CHAT_PATH}");
        let mut turn = index;
        while Instant::now() < end {
            turn += 1;
            let kind = turn % 20;
            let stream = kind >= 12;
            let key = if matches!(kind, 3 | 4) {
                BUDGETED_KEY
            } else {
                CLIENT_KEY
            };
            let request = http
                .post(&url)
                .bearer_auth(key)
                .header("content-type", "application/json");
            if http2 {
                tally.http2.fetch_add(1, Ordering::Relaxed);
            }
            match kind {
                // A client that gives up while it waits for the answer.
                0 => give_up_waiting(request.body(harness::chat_body(false)), &tally).await,
                // A body sent in pieces, each within the stall timeout.
                1 => {
                    tally.slow_bodies.fetch_add(1, Ordering::Relaxed);
                    let body = in_pieces(harness::chat_body(false), Duration::from_millis(100));
                    read_whole(request.body(body), false, &tally).await;
                }
                // A body that stalls past `server.body_read_timeout`.
                2 => stall_body(request, &tally).await,
                3..=4 => budgeted(request.body(harness::chat_body(false)), &tally).await,
                // A client that reads one event and hangs up.
                12..=13 => abandon_stream(request.body(harness::chat_body(true)), &tally).await,
                _ => read_whole(request.body(harness::chat_body(stream)), stream, &tally).await,
            }
        }
    })
}

/// `body` as a stream of three pieces with `gap` between them.
fn in_pieces(body: bytes::Bytes, gap: Duration) -> reqwest::Body {
    let third = body.len().div_ceil(3);
    let pieces: Vec<bytes::Bytes> = (0..3)
        .map(|i| body.slice((i * third).min(body.len())..((i + 1) * third).min(body.len())))
        .collect();
    let stream = futures_util::stream::iter(pieces).then(move |piece| async move {
        tokio::time::sleep(gap).await;
        Ok::<_, std::io::Error>(piece)
    });
    reqwest::Body::wrap_stream(stream)
}

/// Sends the first third of a body, then nothing for twice the stall
/// timeout: the gateway must answer 408 (or close the connection).
async fn stall_body(request: reqwest::RequestBuilder, tally: &Tally) {
    tally.stalled.fetch_add(1, Ordering::Relaxed);
    let body = in_pieces(harness::chat_body(false), BODY_READ_TIMEOUT * 2);
    match tokio::time::timeout(ANSWER_WAIT, request.body(body).send()).await {
        Ok(Ok(response)) if response.status() == 408 => {
            tally.stalled_cut.fetch_add(1, Ordering::Relaxed);
        }
        // The connection closed under the body being sent: cut too.
        Ok(Err(err)) if !err.is_timeout() => {
            tally.stalled_cut.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Ok(_)) | Ok(Err(_)) | Err(_) => {}
    }
}

/// A request that got no answer: counted, and why printed (a lost
/// request fails the run, so the reason must be in its output).
fn lost(tally: &Tally, why: &str) {
    tally.lost.fetch_add(1, Ordering::Relaxed);
    eprintln!("  lost: {why}");
}

/// A request of the budgeted client: served, or refused for its budget.
async fn budgeted(request: reqwest::RequestBuilder, tally: &Tally) {
    let response = match tokio::time::timeout(ANSWER_WAIT, request.send()).await {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => return lost(tally, &format!("{err:?}")),
        Err(_) => return lost(tally, "no answer's head within 30 s"),
    };
    let status = response.status().as_u16();
    tally.status(status);
    let _ = response.bytes().await;
    let counter = if status == 200 {
        &tally.budgeted_served
    } else {
        &tally.budgeted_refused
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What the budgeted client spent, as `/status` shows it.
async fn budget_spent(gateway: &Gateway) -> anyhow::Result<f64> {
    let status = gateway.status().await?;
    let budgets = status["budgets"].as_array().cloned().unwrap_or_default();
    let Some(budget) = budgets.iter().find(|b| b["name"] == "budgeted") else {
        bail!("no budget for the budgeted client in /status: {status}");
    };
    Ok(budget["spent_usd"].as_f64().unwrap_or(f64::MAX))
}

async fn read_whole(request: reqwest::RequestBuilder, stream: bool, tally: &Tally) {
    let response = match tokio::time::timeout(ANSWER_WAIT, request.send()).await {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => return lost(tally, &format!("{err:?}")),
        Err(_) => return lost(tally, "no answer's head within 30 s"),
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
