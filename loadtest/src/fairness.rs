//! `fairness`: clients sharing a saturated pool get what their class and
//! weight say, however hard one of them pushes.
//!
//! Two mocks answer every request after a fixed `--latency`; each node
//! takes `--slots` requests at a time, so the pool is saturated and the
//! gateway's queue decides who goes next. Three phases, each for
//! `--duration`, each with clients declared in the gateway's config:
//!
//! 1. *equal weights*: client A floods (`--flood` requests at once, each
//!    sent again as soon as it is answered), client B keeps a steady
//!    `--steady` requests waiting; both weight 1. B's share of the served
//!    tokens must be 45-55%, and its p99 queue wait under 1 s.
//! 2. *weights 3:1*: the same, A with weight 3: A's share 70-80%, B's
//!    20-30%.
//! 3. *priority*: two `low` clients flood (half of `--flood` each) while a
//!    `high` client keeps `--high` requests going: its p99 queue wait
//!    must be under 100 ms.
//! 4. *priority with a reserve*: the config is reloaded with
//!    `[queue.reserve] high` = `--high` slots' share of the pool, and phase
//!    3 runs again: the high client no longer waits for a slot to free up,
//!    and its p99 queue wait must be under 20 ms.
//!
//! Shares are of the tokens the answers report (`usage.total_tokens`),
//! counted over the saturated period: answers that end after the first
//! `--warm-up` of a phase and before its end. A request's queue wait is its
//! time to answer, measured by the client, less the mock's fixed latency
//! (so it also holds the gateway's own time and the loopback round trip).
//! With `--smoke` (CI's debug build) the bounds on waits are five times
//! wider; the shares are judged as they are.
//! At a phase's end the clients hang up on what is still waiting, and the
//! gateway must be left with nothing in flight, reserved or queued before
//! the next phase. Every answer must be a 200. Exits 1 if any of this
//! fails.

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Args;

use crate::harness::{CHAT_PATH, Gateway, Mocks, verdict};

#[derive(Debug, Clone, Args)]
pub(crate) struct FairnessArgs {
    /// Requests a flooding client keeps going at once.
    #[arg(long, default_value_t = 500)]
    pub flood: usize,
    /// Requests the steady client keeps going at once.
    #[arg(long, default_value_t = 16)]
    pub steady: usize,
    /// Requests the high-priority client keeps going at once.
    #[arg(long, default_value_t = 2)]
    pub high: usize,
    /// Requests each node takes at once (its `max_concurrency`).
    #[arg(long, default_value_t = 4)]
    pub slots: u64,
    /// The mocks' fixed latency.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "50ms")]
    pub latency: Duration,
    /// How long each phase runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    pub duration: Duration,
    /// The start of each phase that is not counted (the queue fills).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    pub warm_up: Duration,
    /// The bounds on queue waits are multiplied by this (the smoke's debug
    /// build on a shared machine); shares are judged as they are.
    #[arg(long, default_value_t = 1)]
    pub slack: u32,
}

impl FairnessArgs {
    pub(crate) fn smoke(&mut self) {
        self.flood = 150;
        self.steady = 8;
        self.duration = Duration::from_secs(8);
        self.warm_up = Duration::from_secs(2);
        // A debug build on a shared machine: shorter answers keep the high
        // client's wait well inside its bound.
        self.latency = Duration::from_millis(20);
        self.slack = 5;
    }
}

const SCENARIO: &str = "fairness";
/// Once a phase's clients hang up, the gateway must be idle within this.
const SETTLE_WAIT: Duration = Duration::from_secs(30);

/// The clients the gateway knows: name, config lines, key.
const CLIENTS: [(&str, &str); 7] = [
    ("flood", ""),
    ("steady", ""),
    ("heavy", "weight = 3\n"),
    ("light", "weight = 1\n"),
    ("high", "priority = \"high\"\n"),
    ("low-1", "priority = \"low\"\n"),
    ("low-2", "priority = \"low\"\n"),
];

fn key(client: &str) -> String {
    format!("sk-loadtest-fairness-{client}")
}

fn key_env(client: &str) -> String {
    format!(
        "LOADTEST_FAIRNESS_{}",
        client.replace('-', "_").to_uppercase()
    )
}

/// One client's load in a phase: how many requests it keeps going.
struct Load {
    client: &'static str,
    at_once: usize,
}

/// The loads of a phase: each client and how many requests it keeps going.
fn loads(clients: &[(&'static str, usize)]) -> Vec<Load> {
    clients
        .iter()
        .map(|&(client, at_once)| Load { client, at_once })
        .collect()
}

/// What one answered request came to.
struct Answered {
    ended: Instant,
    wait: Duration,
    tokens: u64,
    status: u16,
}

/// What a phase measured for one client.
struct Measured {
    client: &'static str,
    tokens: u64,
    requests: usize,
    not_ok: usize,
    p50: Duration,
    p99: Duration,
}

pub(crate) async fn run(args: &FairnessArgs, report_dir: &Path) -> anyhow::Result<bool> {
    let latency = humantime::format_duration(args.latency).to_string();
    let mocks = Mocks::start(2, &["--latency".to_owned(), latency]).await?;
    let settings = settings(args);
    let env: Vec<(String, String)> = CLIENTS
        .iter()
        .map(|(name, _)| (key_env(name), key(name)))
        .collect();
    let slots = args.slots;
    let quota = move |_| format!("max_concurrency = {slots}");
    let gateway =
        Gateway::start_with_env(&mocks, report_dir, SCENARIO, &settings, &quota, &env).await?;
    println!(
        "fairness: 2 nodes x {} slots, {:?} per answer; phases of {:?}, the first {:?} not counted",
        args.slots, args.latency, args.duration, args.warm_up
    );
    let mut held = true;

    let equal = loads(&[("flood", args.flood), ("steady", args.steady)]);
    println!(
        "equal weights: A floods with {}, B keeps {} going",
        args.flood, args.steady
    );
    let m = phase(&gateway, args, &equal).await?;
    held &= judge_share(&m, 1, 0.45..=0.55);
    held &= judge_wait(&m[1], Duration::from_secs(1) * args.slack);

    let weighted = loads(&[("heavy", args.flood), ("light", args.steady)]);
    println!(
        "weights 3:1: A (weight 3) floods with {}, B (weight 1) keeps {} going",
        args.flood, args.steady
    );
    let m = phase(&gateway, args, &weighted).await?;
    held &= judge_share(&m, 0, 0.70..=0.80);
    held &= judge_share(&m, 1, 0.20..=0.30);

    let classes = loads(&[
        ("high", args.high),
        ("low-1", args.flood / 2),
        ("low-2", args.flood / 2),
    ]);
    println!(
        "priority: two low clients flood with {} each, a high client keeps {} going",
        args.flood / 2,
        args.high
    );
    let m = phase(&gateway, args, &classes).await?;
    held &= judge_wait(&m[0], Duration::from_millis(100) * args.slack);

    let reserve = args.high as f64 / (2 * args.slots) as f64;
    println!("priority with a reserve: the same, high keeping {reserve} of every node's quota");
    gateway.rewrite_config(
        &mocks,
        SCENARIO,
        &format!("{settings}\n[queue.reserve]\nhigh = {reserve}\n"),
        &quota,
        &[0, 1],
    )?;
    reloaded(&gateway).await?;
    let m = phase(&gateway, args, &classes).await?;
    held &= judge_wait(&m[0], Duration::from_millis(20) * args.slack);

    gateway.stop().await?;
    mocks.stop().await?;
    Ok(held)
}

/// Waits for the rewritten config to be in force.
async fn reloaded(gateway: &Gateway) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE_WAIT;
    while gateway.status().await?["config"]["generation"] != 2 {
        if Instant::now() > deadline {
            anyhow::bail!("the config with a reserve did not take within {SETTLE_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn settings(args: &FairnessArgs) -> String {
    let mut toml = format!(
        "[queue]\nmax_wait = \"60s\"\nmax_depth = {}\nmax_depth_per_client = {}\n\n",
        4 * args.flood + 100,
        args.flood + 10
    );
    for (name, lines) in CLIENTS {
        toml.push_str(&format!(
            "[[clients]]\nname = \"{name}\"\nkey_env = \"{}\"\n{lines}\n",
            key_env(name)
        ));
    }
    toml
}

/// Runs `loads` for a phase, prints what each client got, and waits for
/// the gateway to be idle.
async fn phase(
    gateway: &Gateway,
    args: &FairnessArgs,
    loads: &[Load],
) -> anyhow::Result<Vec<Measured>> {
    let start = Instant::now();
    let counted_from = start + args.warm_up;
    let end = start + args.duration;
    let mut tasks = Vec::new();
    for load in loads {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(load.at_once)
            .build()?;
        for _ in 0..load.at_once {
            tasks.push((
                load.client,
                worker(
                    http.clone(),
                    gateway.origin.clone(),
                    load.client,
                    args.latency,
                    end,
                ),
            ));
        }
    }
    let mut answers: Vec<(&str, Vec<Answered>)> = Vec::with_capacity(tasks.len());
    for (client, task) in tasks {
        answers.push((client, task.await?));
    }
    let measured: Vec<Measured> = loads
        .iter()
        .map(|load| {
            let counted = answers
                .iter()
                .filter(|(client, _)| *client == load.client)
                .flat_map(|(_, a)| a)
                .filter(|a| a.ended >= counted_from && a.ended <= end);
            measure(load.client, counted)
        })
        .collect();
    let total: u64 = measured.iter().map(|m| m.tokens).sum::<u64>().max(1);
    for m in &measured {
        println!(
            "  {:<7} {:>5} requests, {:>8} tokens ({:>5.1}%), queue wait p50 {:>4} ms, p99 {:>4} ms, not 200: {}",
            m.client,
            m.requests,
            m.tokens,
            100.0 * m.tokens as f64 / total as f64,
            m.p50.as_millis(),
            m.p99.as_millis(),
            m.not_ok
        );
    }
    let left = gateway.settle(SETTLE_WAIT).await?;
    if !left.is_empty() {
        anyhow::bail!("left once the phase's clients hung up: {}", left.join(", "));
    }
    Ok(measured)
}

/// One of a client's requests, sent again as soon as it is answered,
/// until `end`; what is still waiting then is hung up on.
fn worker(
    http: reqwest::Client,
    origin: String,
    client: &'static str,
    latency: Duration,
    end: Instant,
) -> tokio::task::JoinHandle<Vec<Answered>> {
    #[expect(
        clippy::disallowed_methods,
        reason = "the load's own workers, awaited before the phase ends"
    )]
    tokio::spawn(async move {
        let url = format!("{origin}{CHAT_PATH}");
        let key = key(client);
        let body = crate::harness::chat_body(false);
        let mut answered = Vec::new();
        let deadline = tokio::time::Instant::from_std(end);
        while Instant::now() < end {
            let sent = Instant::now();
            let request = http
                .post(&url)
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body(body.clone())
                .send();
            let Ok(answer) = tokio::time::timeout_at(deadline, answer_of(request)).await else {
                break;
            };
            let (status, tokens) = answer;
            let ended = Instant::now();
            answered.push(Answered {
                ended,
                wait: (ended - sent).saturating_sub(latency),
                tokens,
                status,
            });
        }
        answered
    })
}

/// The answer's status and the tokens its usage reports (0 when it has
/// none, or the request failed: status 0).
async fn answer_of(
    request: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
) -> (u16, u64) {
    let Ok(response) = request.await else {
        return (0, 0);
    };
    let status = response.status().as_u16();
    let tokens = match response.json::<serde_json::Value>().await {
        Ok(body) => body["usage"]["total_tokens"].as_u64().unwrap_or(0),
        Err(_) => 0,
    };
    (status, tokens)
}

fn measure<'a>(client: &'static str, answers: impl Iterator<Item = &'a Answered>) -> Measured {
    let mut waits = Vec::new();
    let (mut tokens, mut not_ok) = (0, 0);
    for a in answers {
        if a.status == 200 {
            tokens += a.tokens;
        } else {
            not_ok += 1;
        }
        waits.push(a.wait);
    }
    waits.sort_unstable();
    let at = |p: f64| {
        waits
            .get(((waits.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    Measured {
        client,
        tokens,
        requests: waits.len(),
        not_ok,
        p50: at(0.50),
        p99: at(0.99),
    }
}

/// Whether client `at`'s share of the served tokens is within `bounds`
/// (and every answer was a 200).
fn judge_share(measured: &[Measured], at: usize, bounds: std::ops::RangeInclusive<f64>) -> bool {
    let total: u64 = measured.iter().map(|m| m.tokens).sum();
    let share = measured[at].tokens as f64 / total.max(1) as f64;
    let all_ok = measured.iter().all(|m| m.not_ok == 0 && m.requests > 0);
    let held = bounds.contains(&share) && all_ok;
    println!(
        "  {}'s share {:.1}% within {:.0}-{:.0}%, every answer 200: {}",
        measured[at].client,
        100.0 * share,
        100.0 * bounds.start(),
        100.0 * bounds.end(),
        verdict(held)
    );
    held
}

/// Whether `m`'s p99 queue wait is under `limit`.
fn judge_wait(m: &Measured, limit: Duration) -> bool {
    let held = m.p99 < limit && m.requests > 0 && m.not_ok == 0;
    println!(
        "  {}'s p99 queue wait {} ms under {} ms: {}",
        m.client,
        m.p99.as_millis(),
        limit.as_millis(),
        verdict(held)
    );
    held
}
