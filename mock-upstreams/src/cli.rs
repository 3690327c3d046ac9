//! The command line of the `mock-upstreams` binary, shared with the load
//! test, which runs the same mocks in a child process.
//!
//! `mock-upstreams --nodes 3 --base-port 9001 --rpm 100,150,200`: mock `i`
//! listens on `base-port + i` (every mock on a free port when the base is 0)
//! and accepts the key `<key-prefix><letter>` (`sk-mock-a`, `sk-mock-b`…).
//! Per-node options take a comma-separated list; the last value repeats.
//! Once every mock listens, one line per mock is printed:
//! `mock <i> listening on <base-url>`. SIGINT or SIGTERM stops them.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::{Faults, Limits, MockConfig, MockUpstream};

/// Which real service the mocks play, and how they enforce their limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Upstream {
    /// OpenAI's API, limits as buckets holding a minute's worth.
    Openai,
    /// OpenAI's API, limits as buckets holding `--burst` worth (its
    /// quantised enforcement: "60,000 RPM may be enforced as 1,000
    /// requests/second").
    OpenaiBucket,
    /// Azure OpenAI: deployment paths, `api-key`, only `remaining` headers,
    /// limits over `--window` (10 s) charged at arrival.
    Azure,
}

/// OpenAI-compatible mock upstreams that enforce quotas like the real service.
#[derive(Debug, Clone, Parser)]
#[command(name = "mock-upstreams")]
pub struct Args {
    /// How many mocks to run.
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Mock i listens on this port + i; 0 picks free ports.
    #[arg(long, default_value_t = 9001)]
    pub base_port: u16,
    /// Mock i accepts `<prefix><letter i>`.
    #[arg(long, default_value = "sk-mock-")]
    pub key_prefix: String,
    /// Requests per minute each mock allows (comma-separated per node).
    #[arg(long, value_delimiter = ',')]
    pub rpm: Vec<u64>,
    /// Tokens per minute each mock allows (comma-separated per node).
    #[arg(long, value_delimiter = ',')]
    pub tpm: Vec<u64>,
    /// Delay before each answer, e.g. `5ms`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub latency: Duration,
    /// Up to this much more delay, spread evenly over requests.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub jitter: Duration,
    /// For streams: delay before the first content event.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20ms")]
    pub first_event: Duration,
    /// For streams: delay between content events.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20ms")]
    pub event_interval: Duration,
    /// Completion length in words (one token each).
    #[arg(long, default_value_t = 16)]
    pub words: usize,
    /// Share of requests answered 500 (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub fail_500: f64,
    /// Share of requests answered 503.
    #[arg(long, default_value_t = 0.0)]
    pub fail_503: f64,
    /// Share of requests that never get an answer.
    #[arg(long, default_value_t = 0.0)]
    pub hang: f64,
    /// Share of answers cut off half-way.
    #[arg(long, default_value_t = 0.0)]
    pub close_midway: f64,
    /// A fixed `created` timestamp, for byte-identical answers.
    #[arg(long)]
    pub created: Option<u64>,
    /// The service the mocks play.
    #[arg(long, value_enum, default_value = "openai")]
    pub upstream: Upstream,
    /// With `--upstream openai-bucket`: how much of the per-minute rate a
    /// bucket holds.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub burst: Duration,
    /// With `--upstream azure`: the span the limits are counted over.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub window: Duration,
}

/// The key mock `i` accepts.
pub fn key(prefix: &str, i: u16) -> String {
    format!("{prefix}{}", char::from(b'a' + (i % 26) as u8))
}

/// The value of a per-node list for node `i`: its own, else the last one.
fn per_node(values: &[u64], i: u16) -> Option<u64> {
    values.get(usize::from(i)).or(values.last()).copied()
}

impl Args {
    /// Mock `i`'s behaviour.
    pub fn config(&self, i: u16) -> MockConfig {
        let mut config = MockConfig::new(key(&self.key_prefix, i))
            .latency(self.latency)
            .jitter(self.jitter)
            .stream_timing(self.first_event, self.event_interval)
            .completion_words(self.words)
            .faults(Faults {
                error_500: self.fail_500,
                error_503: self.fail_503,
                hang: self.hang,
                close_midway: self.close_midway,
            });
        config.limits = Limits {
            rpm: per_node(&self.rpm, i),
            tpm: per_node(&self.tpm, i),
        };
        config.created = self.created;
        match self.upstream {
            Upstream::Openai => config,
            Upstream::OpenaiBucket => config.bucket_burst(self.burst),
            Upstream::Azure => {
                let mut config = config.azure();
                config.enforcement = crate::Enforcement::Window { span: self.window };
                config
            }
        }
    }

    /// Starts every mock.
    pub async fn start(&self) -> std::io::Result<Vec<MockUpstream>> {
        let mut running = Vec::with_capacity(usize::from(self.nodes));
        for i in 0..self.nodes {
            let port = if self.base_port == 0 {
                0
            } else {
                self.base_port.saturating_add(i)
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mock = MockUpstream::start(addr, self.config(i))
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("{addr}: {e}")))?;
            running.push(mock);
        }
        Ok(running)
    }
}

/// Runs the mocks until SIGINT or SIGTERM.
pub async fn run(args: Args) -> ExitCode {
    run_until(args, stopped()).await
}

/// Runs the mocks until `stop` resolves.
pub async fn run_until(args: Args, stop: impl std::future::Future<Output = ()>) -> ExitCode {
    let running = match args.start().await {
        Ok(running) => running,
        Err(err) => {
            eprintln!("mock-upstreams: cannot listen on {err}");
            return ExitCode::from(1);
        }
    };
    for (i, mock) in running.iter().enumerate() {
        println!("mock {i} listening on {}", mock.base_url());
    }
    stop.await;
    for mock in running {
        mock.stop().await;
    }
    ExitCode::SUCCESS
}

async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
