//! A mock's quota and its record of what it served.
//!
//! Quotas work the way the real services enforce them ([`Enforcement`]):
//! - **OpenAI**: a request-per-minute and a token-per-minute bucket, each
//!   refilling continuously at limit/60 per second and holding `burst`
//!   worth of it: a minute's by default, one second's for the quantised
//!   enforcement OpenAI describes ("60,000 RPM may be enforced as 1,000
//!   requests/second"). A request takes one unit and its prompt plus
//!   completion tokens, or is refused with 429 and the wait until both fit.
//! - **Azure**: at most limit × span / 60 s in every rolling span (10 s),
//!   tokens charged at arrival as the prompt plus `max_tokens` (times `n`
//!   or `best_of`), nothing given back. A request larger than the span's
//!   allotment is admitted only into an empty span.
//!
//! Whether a gateway really stayed inside the quota is read from the peaks
//! below, measured over exact rolling spans: 60 s, and the enforcement span.
//!
//! Invariants: the quotas, the peak windows and the per-key counts change
//! together under one short lock, never held across an `.await`.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The rolling span every per-minute figure covers.
pub const MINUTE: Duration = Duration::from_secs(60);

/// How a mock enforces its per-minute limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Enforcement {
    /// OpenAI's: buckets holding `burst` worth of the per-minute rate,
    /// refilling continuously.
    Bucket { burst: Duration },
    /// Azure's: at most the per-minute limits pro rata within every rolling
    /// `span`, charged at arrival.
    Window { span: Duration },
}

impl Default for Enforcement {
    fn default() -> Self {
        Enforcement::Bucket { burst: MINUTE }
    }
}

/// A continuously refilling bucket of `per_minute` units per minute,
/// holding `capacity`.
#[derive(Debug, Clone)]
struct Bucket {
    per_minute: u64,
    capacity: f64,
    level: f64,
    refilled: Instant,
}

impl Bucket {
    fn new(per_minute: u64, burst: Duration, now: Instant) -> Self {
        let capacity = (per_minute as f64 * burst.as_secs_f64() / MINUTE.as_secs_f64()).max(1.0);
        Self {
            per_minute,
            capacity,
            level: capacity,
            refilled: now,
        }
    }

    fn per_second(&self) -> f64 {
        self.per_minute as f64 / MINUTE.as_secs_f64()
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.level = (self.level + elapsed * self.per_second()).min(self.capacity);
        self.refilled = now;
    }

    /// How long until `amount` fits (zero if it fits now); `None` if it never can.
    fn wait_for(&self, amount: u64) -> Option<Duration> {
        let amount = amount as f64;
        if amount > self.capacity {
            return None;
        }
        let missing = amount - self.level;
        Some(if missing <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / self.per_second())
        })
    }

    fn take(&mut self, amount: u64) {
        self.level -= amount as f64;
    }

    fn headers(&self) -> BucketHeaders {
        let until_full = (self.capacity - self.level).max(0.0) / self.per_second();
        BucketHeaders {
            limit: self.per_minute,
            remaining: self.level.max(0.0).floor() as u64,
            reset: Duration::from_secs_f64(until_full),
        }
    }
}

/// At most `per_minute × span / 60 s` within every rolling `span`.
#[derive(Debug, Clone)]
struct Rolling {
    per_minute: u64,
    allotment: f64,
    span: Duration,
    /// (arrival, amount), oldest first.
    entries: VecDeque<(Instant, u64)>,
    used: u64,
}

impl Rolling {
    fn new(per_minute: u64, span: Duration) -> Self {
        Self {
            per_minute,
            allotment: per_minute as f64 * span.as_secs_f64() / MINUTE.as_secs_f64(),
            span,
            entries: VecDeque::new(),
            used: 0,
        }
    }

    fn advance(&mut self, now: Instant) {
        while let Some(&(at, amount)) = self.entries.front() {
            if at + self.span > now {
                break;
            }
            self.used -= amount;
            self.entries.pop_front();
        }
    }

    fn wait_for(&self, amount: u64, now: Instant) -> Option<Duration> {
        if amount > self.per_minute {
            return None;
        }
        if self.used == 0 || (self.used + amount) as f64 <= self.allotment {
            return Some(Duration::ZERO);
        }
        // Enough must leave the span; all of it for an oversized request.
        let over = (self.used + amount) as f64 - self.allotment;
        let need = (over.ceil() as u64).min(self.used);
        let mut freed = 0;
        for &(at, n) in &self.entries {
            freed += n;
            if freed >= need {
                return Some((at + self.span).saturating_duration_since(now));
            }
        }
        Some(self.span)
    }

    fn take(&mut self, amount: u64, now: Instant) {
        self.entries.push_back((now, amount));
        self.used += amount;
    }

    fn headers(&self, now: Instant) -> BucketHeaders {
        BucketHeaders {
            limit: self.per_minute,
            remaining: (self.allotment - self.used as f64).max(0.0).floor() as u64,
            reset: self.entries.front().map_or(Duration::ZERO, |(at, _)| {
                (*at + self.span).saturating_duration_since(now)
            }),
        }
    }
}

/// One limited dimension (requests or tokens), enforced one way or the other.
#[derive(Debug, Clone)]
enum Quota {
    Bucket(Bucket),
    Rolling(Rolling),
}

impl Quota {
    fn new(per_minute: u64, enforcement: Enforcement, now: Instant) -> Self {
        match enforcement {
            Enforcement::Bucket { burst } => Quota::Bucket(Bucket::new(per_minute, burst, now)),
            Enforcement::Window { span } => Quota::Rolling(Rolling::new(per_minute, span)),
        }
    }

    fn advance(&mut self, now: Instant) {
        match self {
            Quota::Bucket(b) => b.refill(now),
            Quota::Rolling(r) => r.advance(now),
        }
    }

    fn wait_for(&self, amount: u64, now: Instant) -> Option<Duration> {
        match self {
            Quota::Bucket(b) => b.wait_for(amount),
            Quota::Rolling(r) => r.wait_for(amount, now),
        }
    }

    fn take(&mut self, amount: u64, now: Instant) {
        match self {
            Quota::Bucket(b) => b.take(amount),
            Quota::Rolling(r) => r.take(amount, now),
        }
    }

    fn headers(&self, now: Instant) -> BucketHeaders {
        match self {
            Quota::Bucket(b) => b.headers(),
            Quota::Rolling(r) => r.headers(now),
        }
    }

    /// The most one request may take at all.
    fn most(&self) -> u64 {
        match self {
            Quota::Bucket(b) => b.capacity as u64,
            Quota::Rolling(r) => r.per_minute,
        }
    }
}

/// What the `x-ratelimit-*-requests` or `-tokens` headers say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketHeaders {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// The rate-limit headers every admitted or refused response carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateHeaders {
    pub requests: Option<BucketHeaders>,
    pub tokens: Option<BucketHeaders>,
}

/// Why a request was refused with 429.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// Over the request or token rate: retry after this long.
    RateLimited {
        limit: &'static str,
        retry_after: Duration,
    },
    /// Needs more tokens than the per-minute limit allows at all.
    TooLarge { tokens: u64, tpm: u64 },
}

/// Requests and tokens inside the last `span`, at millisecond resolution,
/// and the most ever seen inside one.
#[derive(Debug)]
struct PeakWindow {
    span_ms: u64,
    /// (millisecond, requests, tokens), oldest first.
    entries: VecDeque<(u64, u64, u64)>,
    requests: u64,
    tokens: u64,
    peak_requests: u64,
    peak_tokens: u64,
}

impl PeakWindow {
    fn new(span: Duration) -> Self {
        Self {
            span_ms: span.as_millis() as u64,
            entries: VecDeque::new(),
            requests: 0,
            tokens: 0,
            peak_requests: 0,
            peak_tokens: 0,
        }
    }

    fn peak(&self) -> Peak {
        Peak {
            requests: self.peak_requests,
            tokens: self.peak_tokens,
        }
    }

    fn record(&mut self, ms: u64, tokens: u64) {
        while let Some(&(at, r, t)) = self.entries.front() {
            if at + self.span_ms > ms {
                break;
            }
            self.requests -= r;
            self.tokens -= t;
            self.entries.pop_front();
        }
        match self.entries.back_mut() {
            Some((at, r, t)) if *at == ms => {
                *r += 1;
                *t += tokens;
            }
            _ => self.entries.push_back((ms, 1, tokens)),
        }
        self.requests += 1;
        self.tokens += tokens;
        self.peak_requests = self.peak_requests.max(self.requests);
        self.peak_tokens = self.peak_tokens.max(self.tokens);
    }
}

/// Requests and tokens served for one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsage {
    pub requests: u64,
    pub tokens: u64,
}

/// The most a mock served inside one rolling span.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peak {
    pub requests: u64,
    pub tokens: u64,
}

/// The per-minute limits a mock enforces; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

/// Everything `GET /_stats` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Requests with a valid key (refused with 429 or not).
    pub requests: u64,
    /// Requests answered 401.
    pub unauthorized: u64,
    /// Requests answered 429.
    pub rate_limited: u64,
    /// Requests served (admitted under the quota).
    pub served: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Streams whose final `data: [DONE]` was written.
    pub streams_completed: u64,
    /// Injected faults, by kind: `500`, `503`, `hang`, `close`.
    pub faults: BTreeMap<String, u64>,
    /// Served requests and tokens per key, keyed by the key's last four
    /// characters (`sk-…abcd`), never by the key itself.
    pub keys: BTreeMap<String, KeyUsage>,
    /// The busiest rolling 60 s (tokens as charged).
    pub peak_60s: Peak,
    /// With a span below the minute (a window, or a bucket holding less
    /// than a minute's worth): the busiest rolling span of it, and the span
    /// in milliseconds.
    pub peak_span: Option<(u64, Peak)>,
    /// When the first and the last served request arrived, in milliseconds
    /// since the mock started: the run's span as the upstream saw it.
    pub served_between_ms: Option<(u64, u64)>,
    pub limits: Limits,
    pub enforcement: Enforcement,
}

/// The label a key is reported under: its last four characters, the way
/// OpenAI's dashboard shows keys.
pub fn key_label(key: &str) -> String {
    let tail: String = {
        let chars: Vec<char> = key.chars().collect();
        chars[chars.len().saturating_sub(4)..].iter().collect()
    };
    format!("sk-…{tail}")
}

/// A mock's quota state and served counts.
#[derive(Debug)]
pub struct Ledger {
    started: Instant,
    requests: Option<Quota>,
    tokens: Option<Quota>,
    minute: PeakWindow,
    span: Option<PeakWindow>,
    report: StatsReport,
}

/// What one request takes of the quota and what it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub prompt: u64,
    pub completion: u64,
    /// Tokens taken from the quota: prompt plus completion (OpenAI), or
    /// prompt plus the completion asked for (Azure, at arrival).
    pub tokens: u64,
}

impl Ledger {
    pub fn new(limits: Limits, enforcement: Enforcement, keys: &[String], now: Instant) -> Self {
        let mut report = StatsReport {
            limits,
            enforcement,
            ..StatsReport::default()
        };
        for key in keys {
            report.keys.insert(key_label(key), KeyUsage::default());
        }
        Self {
            started: now,
            requests: limits.rpm.map(|n| Quota::new(n, enforcement, now)),
            tokens: limits.tpm.map(|n| Quota::new(n, enforcement, now)),
            minute: PeakWindow::new(MINUTE),
            span: match enforcement {
                Enforcement::Window { span } => Some(PeakWindow::new(span)),
                Enforcement::Bucket { burst } => (burst < MINUTE).then(|| PeakWindow::new(burst)),
            },
            report,
        }
    }

    fn headers(&self, now: Instant) -> RateHeaders {
        RateHeaders {
            requests: self.requests.as_ref().map(|q| q.headers(now)),
            tokens: self.tokens.as_ref().map(|q| q.headers(now)),
        }
    }

    /// Takes one request and its charge from the quota for `key`, or
    /// refuses. Either way returns the headers to send.
    pub fn admit(
        &mut self,
        key: &str,
        charge: Charge,
        now: Instant,
    ) -> (Result<(), Refusal>, RateHeaders) {
        let tokens = charge.tokens;
        self.report.requests += 1;
        for quota in [&mut self.requests, &mut self.tokens].into_iter().flatten() {
            quota.advance(now);
        }
        let mut wait = Duration::ZERO;
        let mut binding = "requests";
        for (name, quota, amount) in [
            ("requests", &self.requests, 1),
            ("tokens", &self.tokens, tokens),
        ] {
            let Some(quota) = quota else { continue };
            match quota.wait_for(amount, now) {
                None => {
                    self.report.rate_limited += 1;
                    let refusal = Refusal::TooLarge {
                        tokens,
                        tpm: quota.most(),
                    };
                    return (Err(refusal), self.headers(now));
                }
                Some(w) if w > wait => {
                    wait = w;
                    binding = name;
                }
                Some(_) => {}
            }
        }
        if !wait.is_zero() {
            self.report.rate_limited += 1;
            let refusal = Refusal::RateLimited {
                limit: binding,
                retry_after: wait,
            };
            return (Err(refusal), self.headers(now));
        }
        if let Some(q) = &mut self.requests {
            q.take(1, now);
        }
        if let Some(q) = &mut self.tokens {
            q.take(tokens, now);
        }
        let ms = now.saturating_duration_since(self.started).as_millis() as u64;
        self.minute.record(ms, tokens);
        if let Some(span) = &mut self.span {
            span.record(ms, tokens);
        }
        self.report.served += 1;
        let first = self.report.served_between_ms.map_or(ms, |(first, _)| first);
        self.report.served_between_ms = Some((first, ms));
        self.report.prompt_tokens += charge.prompt;
        self.report.completion_tokens += charge.completion;
        let usage = self.report.keys.entry(key_label(key)).or_default();
        usage.requests += 1;
        usage.tokens += tokens;
        (Ok(()), self.headers(now))
    }

    pub fn unauthorized(&mut self) {
        self.report.unauthorized += 1;
    }

    pub fn fault(&mut self, kind: &str) {
        *self.report.faults.entry(kind.to_owned()).or_default() += 1;
    }

    pub fn stream_completed(&mut self) {
        self.report.streams_completed += 1;
    }

    pub fn report(&self) -> StatsReport {
        let mut report = self.report.clone();
        report.peak_60s = self.minute.peak();
        report.peak_span = self.span.as_ref().map(|s| (s.span_ms, s.peak()));
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-test-abcd";

    fn ledger(rpm: Option<u64>, tpm: Option<u64>, now: Instant) -> Ledger {
        Ledger::new(
            Limits { rpm, tpm },
            Enforcement::default(),
            &[KEY.to_owned()],
            now,
        )
    }

    /// What a request used, charged as OpenAI charges it.
    fn used(prompt: u64, completion: u64) -> Charge {
        Charge {
            prompt,
            completion,
            tokens: prompt + completion,
        }
    }

    #[test]
    fn a_full_request_bucket_admits_its_limit_then_refuses_with_the_refill_time() {
        let now = Instant::now();
        let mut l = ledger(Some(60), None, now);
        for _ in 0..60 {
            assert!(l.admit(KEY, used(1, 1), now).0.is_ok());
        }
        let (refused, headers) = l.admit(KEY, used(1, 1), now);
        match refused {
            Err(Refusal::RateLimited { limit, retry_after }) => {
                assert_eq!(limit, "requests");
                // 60 rpm refills one request per second.
                assert!((retry_after.as_secs_f64() - 1.0).abs() < 1e-6);
            }
            other => unreachable!("expected a rate limit, got {other:?}"),
        }
        let h = headers.requests.unwrap();
        assert_eq!((h.limit, h.remaining), (60, 0));
        assert!((h.reset.as_secs_f64() - 60.0).abs() < 1e-6);
        assert_eq!(l.report().rate_limited, 1);
        assert_eq!(l.report().served, 60);
    }

    #[test]
    fn the_bucket_refills_continuously() {
        let now = Instant::now();
        let mut l = ledger(Some(60), None, now);
        for _ in 0..60 {
            assert!(l.admit(KEY, used(0, 0), now).0.is_ok());
        }
        assert!(
            l.admit(KEY, used(0, 0), now + Duration::from_millis(999))
                .0
                .is_err()
        );
        assert!(
            l.admit(KEY, used(0, 0), now + Duration::from_millis(1001))
                .0
                .is_ok()
        );
    }

    #[test]
    fn tokens_are_limited_by_prompt_plus_completion() {
        let now = Instant::now();
        let mut l = ledger(None, Some(100), now);
        assert!(l.admit(KEY, used(40, 40), now).0.is_ok());
        match l.admit(KEY, used(10, 20), now).0 {
            Err(Refusal::RateLimited { limit, .. }) => assert_eq!(limit, "tokens"),
            other => unreachable!("expected a token limit, got {other:?}"),
        }
        assert_eq!(
            l.admit(KEY, used(200, 0), now).0,
            Err(Refusal::TooLarge {
                tokens: 200,
                tpm: 100
            })
        );
    }

    #[test]
    fn peak_counts_the_busiest_rolling_minute_only() {
        let now = Instant::now();
        let mut l = ledger(None, None, now);
        for _ in 0..5 {
            assert!(l.admit(KEY, used(1, 1), now).0.is_ok());
        }
        // 59.999 s later the first five still count; at 60 s they do not.
        assert!(
            l.admit(KEY, used(1, 1), now + Duration::from_millis(59_999))
                .0
                .is_ok()
        );
        assert_eq!(l.report().peak_60s.requests, 6);
        for _ in 0..3 {
            assert!(l.admit(KEY, used(1, 1), now + MINUTE).0.is_ok());
        }
        let report = l.report();
        assert_eq!(report.peak_60s.requests, 6);
        assert_eq!(report.peak_60s.tokens, 12);
        assert_eq!(report.keys[&key_label(KEY)].requests, 9);
    }

    #[test]
    fn keys_are_reported_by_their_last_four_characters() {
        assert_eq!(key_label("sk-secret-value-wxyz"), "sk-…wxyz");
        assert_eq!(key_label("ab"), "sk-…ab");
    }

    #[test]
    fn a_rolling_span_admits_an_oversized_request_only_when_empty() {
        let now = Instant::now();
        let span = Duration::from_secs(10);
        // tpm 600 allots 100 tokens per 10 s.
        let mut l = Ledger::new(
            Limits {
                rpm: None,
                tpm: Some(600),
            },
            Enforcement::Window { span },
            &[KEY.to_owned()],
            now,
        );
        assert!(l.admit(KEY, used(10, 0), now).0.is_ok());
        match l.admit(KEY, used(250, 0), now).0 {
            Err(Refusal::RateLimited { retry_after, .. }) => assert_eq!(retry_after, span),
            other => unreachable!("expected a wait, got {other:?}"),
        }
        assert!(l.admit(KEY, used(250, 0), now + span).0.is_ok());
        assert!(l.admit(KEY, used(1, 0), now + span).0.is_err());
        // Above the minute's limit it never fits.
        assert!(matches!(
            l.admit(KEY, used(601, 0), now + span * 3).0,
            Err(Refusal::TooLarge { .. })
        ));
    }

    #[test]
    fn a_bucket_holding_a_seconds_worth_admits_that_then_refills_at_the_rate() {
        let now = Instant::now();
        let mut l = Ledger::new(
            Limits {
                rpm: Some(600),
                tpm: None,
            },
            Enforcement::Bucket {
                burst: Duration::from_secs(1),
            },
            &[KEY.to_owned()],
            now,
        );
        for _ in 0..10 {
            assert!(l.admit(KEY, used(1, 1), now).0.is_ok());
        }
        assert!(l.admit(KEY, used(1, 1), now).0.is_err());
        // 600 rpm is one every 100 ms.
        assert!(
            l.admit(KEY, used(1, 1), now + Duration::from_millis(99))
                .0
                .is_err()
        );
        assert!(
            l.admit(KEY, used(1, 1), now + Duration::from_millis(101))
                .0
                .is_ok()
        );
        let (_, headers) = l.admit(KEY, used(1, 1), now + Duration::from_millis(101));
        assert_eq!(headers.requests.unwrap().limit, 600);
    }
}
