//! OpenAI-compatible mock upstreams for tests, the demo and load tests.
//!
//! Each mock serves `POST /v1/chat/completions` (JSON, or SSE with
//! `"stream": true`, honouring `stream_options.include_usage`),
//! `POST /v1/completions`, `POST /v1/embeddings`, `POST /v1/responses`
//! (JSON, or SSE with the Responses API's events) and `GET /v1/models`;
//! checks `Authorization: Bearer <key>` against the keys it accepts; counts
//! the prompt with the same tokenizer family as the gateway; enforces its
//! own rpm and tpm the way the real service does ([`ledger`]), with the
//! `x-ratelimit-*` headers on every answer and 429 + `Retry-After` over the
//! limit; and reports what it saw at `GET /_stats` ([`StatsReport`]).
//!
//! A mock may play Azure OpenAI instead ([`Dialect::Azure`], the `azure`
//! module): the same answers under Azure's paths, auth, headers, errors and
//! 10 s windows.
//!
//! Behaviour is set with [`MockConfig`]: latency (fixed plus jitter), time
//! to first event and spacing between events, completion length, and faults
//! (a share of 500 or 503 answers, requests that hang, streams cut off
//! mid-way).
//!
//! # Why axum and not wiremock
//! wiremock answers each request with a prepared [`ResponseTemplate`]-style
//! value: a whole body, optionally after one delay. A mock here must space a
//! stream's events in time, cut a connection after half a body, keep a
//! quota whose state every answer depends on, and serve tens of thousands of
//! requests per second without recording each one. Those are a server's
//! jobs, so the mock is a small axum app. Tests that want wiremock's request
//! matching and verification (one scripted 503, a header check) use
//! wiremock directly.
//!
//! Faults and jitter are spread deterministically (a low-discrepancy
//! sequence over the request count), so a 10% share is 10% of any run of
//! requests to within a request or two, and two runs see the same pattern.
//!
//! [`ResponseTemplate`]: https://docs.rs/wiremock/latest/wiremock/struct.ResponseTemplate.html

mod azure;
mod azure_errors;
pub mod cli;
pub mod ledger;
mod objects;
mod openai;
#[cfg(feature = "otlp")]
pub mod otlp;
mod responses;

pub use openai::EMBEDDING;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use ledger::{Enforcement, KeyUsage, Limits, Peak, StatsReport};

/// Which service a mock plays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI's API: `/v1/...`, `Authorization: Bearer`, every
    /// `x-ratelimit-*` header.
    #[default]
    OpenAi,
    /// Azure OpenAI's: `/openai/deployments/{deployment}/...?api-version=`
    /// (required) and the v1 surface `/openai/v1/...` (the deployment as
    /// `model`), `api-key` auth, only `x-ratelimit-remaining-*` headers,
    /// Azure's error shapes.
    Azure,
}

/// Shares of requests that fail, each between 0 and 1; they add up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Answered `500 Internal Server Error` with an OpenAI error body.
    pub error_500: f64,
    /// Answered `503 Service Unavailable` (the "overloaded" answer).
    pub error_503: f64,
    /// Never answered: the request hangs until the client gives up or the
    /// mock stops.
    pub hang: f64,
    /// The connection is closed after half of the body (half of a stream's
    /// events) was sent.
    pub close_midway: f64,
}

/// How a mock behaves.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Keys clients may present as `Authorization: Bearer <key>`.
    pub keys: Vec<String>,
    /// Listed by `GET /v1/models`.
    pub models: Vec<String>,
    /// Delay before the response head.
    pub latency: Duration,
    /// Up to this much more delay, spread evenly over requests.
    pub jitter: Duration,
    /// For streams: delay between the head and the first content event.
    pub first_event_delay: Duration,
    /// For streams: delay between content events.
    pub event_interval: Duration,
    /// Completion length in words (one token each), capped by `max_tokens`.
    pub completion_words: usize,
    /// The quota the mock enforces.
    pub limits: Limits,
    pub faults: Faults,
    /// A fixed `created` timestamp, so that two answers to the same request
    /// are byte-identical (load tests compare streams byte for byte).
    pub created: Option<u64>,
    pub dialect: Dialect,
    /// How the limits are enforced; Azure's mocks count over 10 s windows.
    pub enforcement: Enforcement,
}

impl MockConfig {
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            keys: vec![key.into()],
            models: vec!["gpt-4o-mini".to_owned()],
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            first_event_delay: Duration::ZERO,
            event_interval: Duration::ZERO,
            completion_words: 16,
            limits: Limits::default(),
            faults: Faults::default(),
            created: None,
            dialect: Dialect::OpenAi,
            enforcement: Enforcement::default(),
        }
    }

    /// Plays Azure OpenAI: its paths, auth, headers and errors, with the
    /// limits enforced over 10 s windows and charged at arrival. The
    /// deployments it serves are its [`models`](Self::models).
    pub fn azure(mut self) -> Self {
        self.dialect = Dialect::Azure;
        self.enforcement = Enforcement::Window {
            span: Duration::from_secs(10),
        };
        self
    }

    /// Enforces the limits with buckets holding `burst` worth of the
    /// per-minute rate (OpenAI's quantised limits: one second's).
    pub fn bucket_burst(mut self, burst: Duration) -> Self {
        self.enforcement = Enforcement::Bucket { burst };
        self
    }

    /// Accepts `key` as well (a rotated key, a second client).
    pub fn also_accept(mut self, key: impl Into<String>) -> Self {
        self.keys.push(key.into());
        self
    }

    pub fn models(mut self, models: &[&str]) -> Self {
        self.models = models.iter().map(|m| (*m).to_owned()).collect();
        self
    }

    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    pub fn stream_timing(mut self, first_event: Duration, interval: Duration) -> Self {
        self.first_event_delay = first_event;
        self.event_interval = interval;
        self
    }

    pub fn completion_words(mut self, words: usize) -> Self {
        self.completion_words = words;
        self
    }

    /// Enforces `rpm` requests and `tpm` tokens per minute (`None`: no limit).
    pub fn quota(mut self, rpm: Option<u64>, tpm: Option<u64>) -> Self {
        self.limits = Limits { rpm, tpm };
        self
    }

    pub fn faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    pub fn fixed_created(mut self, created: u64) -> Self {
        self.created = Some(created);
        self
    }
}

/// What a mock has seen; read it live, or as a whole with [`report`](Self::report).
#[derive(Debug)]
pub struct Stats {
    ledger: Mutex<ledger::Ledger>,
}

impl Stats {
    pub fn report(&self) -> StatsReport {
        self.ledger.lock().report()
    }
    /// Requests with a valid key, whatever the answer.
    pub fn requests(&self) -> u64 {
        self.ledger.lock().report().requests
    }
    pub fn unauthorized(&self) -> u64 {
        self.report().unauthorized
    }
    pub fn rate_limited(&self) -> u64 {
        self.report().rate_limited
    }
    pub fn prompt_tokens(&self) -> u64 {
        self.report().prompt_tokens
    }
    pub fn completion_tokens(&self) -> u64 {
        self.report().completion_tokens
    }
    /// Streams whose final `[DONE]` was written.
    pub fn streams_completed(&self) -> u64 {
        self.report().streams_completed
    }
}

/// One mock's shared state.
struct Mock {
    config: MockConfig,
    /// `Bearer <key>` for each accepted key, built once.
    bearers: Vec<(String, Vec<u8>)>,
    stats: Arc<Stats>,
    /// Numbers requests, to spread faults and jitter.
    counter: AtomicU64,
    /// Fires when the mock stops, ending hanging requests.
    stopping: CancellationToken,
    /// Files, batches and stored responses, per key.
    objects: Mutex<objects::Store>,
    /// The port it listens on: part of every id it hands out, so no two
    /// mocks hand out the same.
    port: u16,
}

impl Mock {
    fn port(&self) -> u16 {
        self.port
    }
}

/// The fractional part of `n × α` for an irrational `α`: a sequence that
/// fills [0, 1) evenly, so thresholds on it give exact shares.
fn spread(n: u64, alpha: f64) -> f64 {
    (n as f64 * alpha).fract()
}

/// What happens to one request, decided when it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Serve,
    Error500,
    Error503,
    Hang,
    CloseMidway,
}

impl Mock {
    /// Decides the request's fate and its extra latency.
    fn draw(&self) -> (Fate, Duration) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let f = self.config.faults;
        let u = spread(n, 0.618_033_988_749_895);
        let fate = [
            (f.error_500, Fate::Error500),
            (f.error_503, Fate::Error503),
            (f.hang, Fate::Hang),
            (f.close_midway, Fate::CloseMidway),
        ]
        .iter()
        .scan(0.0, |edge, &(share, fate)| {
            *edge += share;
            Some((*edge, fate))
        })
        .find(|&(edge, _)| u < edge)
        .map_or(Fate::Serve, |(_, fate)| fate);
        let jitter = self
            .config
            .jitter
            .mul_f64(spread(n, std::f64::consts::SQRT_2 - 1.0));
        (fate, self.config.latency + jitter)
    }
}

/// A running mock; stopped when [`stop`](Self::stop) is called or it is dropped.
pub struct MockUpstream {
    addr: SocketAddr,
    stats: Arc<Stats>,
    stopping: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl MockUpstream {
    /// Starts a mock on `addr` (port 0 picks a free one).
    pub async fn start(addr: SocketAddr, config: MockConfig) -> std::io::Result<Self> {
        // A large accept backlog, like the gateway's: load tests open
        // thousands of connections at once.
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        Self::serve(socket.listen(4096)?, config)
    }

    /// Starts a mock on an already-bound listener.
    pub fn serve(listener: TcpListener, config: MockConfig) -> std::io::Result<Self> {
        use axum::serve::ListenerExt;
        let addr = listener.local_addr()?;
        let now = tokio::time::Instant::now();
        let stats = Arc::new(Stats {
            ledger: Mutex::new(ledger::Ledger::new(
                config.limits,
                config.enforcement,
                &config.keys,
                now,
            )),
        });
        let stopping = CancellationToken::new();
        let bearers = config
            .keys
            .iter()
            .map(|k| (k.clone(), format!("Bearer {k}").into_bytes()))
            .collect();
        let app = router(Arc::new(Mock {
            config,
            bearers,
            stats: Arc::clone(&stats),
            counter: AtomicU64::new(0),
            stopping: stopping.clone(),
            objects: Mutex::default(),
            port: addr.port(),
        }));
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let stopped = stopping.clone();
        #[expect(
            clippy::disallowed_methods,
            reason = "the server task is owned by its MockUpstream, whose stop() ends and awaits it"
        )]
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await });
            if let Err(err) = serve.await {
                tracing::warn!(%err, "mock upstream stopped with an error");
            }
        });
        Ok(Self {
            addr,
            stats,
            stopping,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL a gateway node points at, e.g. `http://127.0.0.1:9001/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Stops accepting, ends hanging requests, lets the others finish, and
    /// waits for the server task.
    pub async fn stop(mut self) {
        self.stopping.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.stopping.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Every route of a mock in its dialect, and `/_stats`.
fn router(mock: Arc<Mock>) -> axum::Router {
    let routes = match mock.config.dialect {
        Dialect::OpenAi => axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(openai::chat))
            .route("/v1/completions", axum::routing::post(openai::completions))
            .route("/v1/embeddings", axum::routing::post(openai::embeddings))
            .route("/v1/responses", axum::routing::post(responses::create))
            .route("/v1/models", axum::routing::get(openai::models))
            .merge(objects::routes()),
        Dialect::Azure => azure::routes(),
    };
    routes
        .route("/_stats", axum::routing::get(openai::stats))
        .with_state(mock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mock(faults: Faults, jitter: Duration) -> Mock {
        let config = MockConfig::new("k").faults(faults).jitter(jitter);
        Mock {
            stats: Arc::new(Stats {
                ledger: Mutex::new(ledger::Ledger::new(
                    config.limits,
                    config.enforcement,
                    &config.keys,
                    tokio::time::Instant::now(),
                )),
            }),
            bearers: Vec::new(),
            config,
            counter: AtomicU64::new(0),
            stopping: CancellationToken::new(),
            objects: Mutex::default(),
            port: 0,
        }
    }

    #[test]
    fn fault_shares_are_exact_over_any_long_run() {
        let m = mock(
            Faults {
                error_500: 0.1,
                error_503: 0.05,
                hang: 0.02,
                close_midway: 0.03,
            },
            Duration::ZERO,
        );
        let fates: Vec<Fate> = (0..1000).map(|_| m.draw().0).collect();
        let count = |f: Fate| fates.iter().filter(|x| **x == f).count();
        // Within 1% of the share over 1,000 requests.
        assert!((count(Fate::Error500) as i64 - 100).abs() <= 10);
        assert!((count(Fate::Error503) as i64 - 50).abs() <= 10);
        assert!((count(Fate::Hang) as i64 - 20).abs() <= 10);
        assert!((count(Fate::CloseMidway) as i64 - 30).abs() <= 10);
        assert!((count(Fate::Serve) as i64 - 800).abs() <= 10);
    }

    #[test]
    fn without_faults_every_request_is_served_and_jitter_stays_in_range() {
        let m = mock(Faults::default(), Duration::from_millis(10));
        let draws: Vec<(Fate, Duration)> = (0..200).map(|_| m.draw()).collect();
        assert!(draws.iter().all(|(f, _)| *f == Fate::Serve));
        assert!(draws.iter().all(|(_, d)| *d < Duration::from_millis(10)));
        let mean = draws.iter().map(|(_, d)| d.as_secs_f64()).sum::<f64>() / 200.0;
        assert!((mean - 0.005).abs() < 0.001, "mean jitter {mean}");
    }
}
