//! A mock's quota and its record of what it served.
//!
//! Quotas work like the real service's: a request-per-minute and a
//! token-per-minute bucket, each holding up to its per-minute limit and
//! refilling continuously at limit/60 per second. A request takes one unit
//! from the request bucket and its prompt plus completion tokens from the
//! token bucket, or is refused with 429 and the wait until both would fit.
//! A bucket is more lenient than a rolling window (a full bucket refills
//! while it is spent), so traffic a rolling 60 s window keeps within quota
//! never trips it; whether a gateway really stayed inside the quota is read
//! from the peaks below, which are measured over exact rolling 60 s.
//!
//! Invariants: the buckets, the peak windows and the per-key counts change
//! together under one short lock, never held across an `.await`.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The rolling span every per-minute figure covers.
pub const MINUTE: Duration = Duration::from_secs(60);

/// A continuously refilling bucket of `capacity` units per minute.
#[derive(Debug, Clone)]
struct Bucket {
    capacity: f64,
    level: f64,
    refilled: Instant,
}

impl Bucket {
    fn new(per_minute: u64, now: Instant) -> Self {
        Self {
            capacity: per_minute as f64,
            level: per_minute as f64,
            refilled: now,
        }
    }

    fn per_second(&self) -> f64 {
        self.capacity / MINUTE.as_secs_f64()
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

    fn headers(&self) -> BucketHeaders {
        let until_full = (self.capacity - self.level).max(0.0) / self.per_second();
        BucketHeaders {
            limit: self.capacity as u64,
            remaining: self.level.floor() as u64,
            reset: Duration::from_secs_f64(until_full),
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

/// Requests and tokens inside the last 60 s, at millisecond resolution, and
/// the most ever seen inside one.
#[derive(Debug, Default)]
struct PeakWindow {
    /// (millisecond, requests, tokens), oldest first.
    entries: VecDeque<(u64, u64, u64)>,
    requests: u64,
    tokens: u64,
    peak_requests: u64,
    peak_tokens: u64,
}

impl PeakWindow {
    fn record(&mut self, ms: u64, tokens: u64) {
        let minute = MINUTE.as_millis() as u64;
        while let Some(&(at, r, t)) = self.entries.front() {
            if at + minute > ms {
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

/// The most a mock served inside any rolling 60 s.
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
    pub peak_60s: Peak,
    pub limits: Limits,
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
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    window: PeakWindow,
    report: StatsReport,
}

impl Ledger {
    pub fn new(limits: Limits, keys: &[String], now: Instant) -> Self {
        let mut report = StatsReport {
            limits,
            ..StatsReport::default()
        };
        for key in keys {
            report.keys.insert(key_label(key), KeyUsage::default());
        }
        Self {
            started: now,
            requests: limits.rpm.map(|n| Bucket::new(n, now)),
            tokens: limits.tpm.map(|n| Bucket::new(n, now)),
            window: PeakWindow::default(),
            report,
        }
    }

    fn headers(&self) -> RateHeaders {
        RateHeaders {
            requests: self.requests.as_ref().map(Bucket::headers),
            tokens: self.tokens.as_ref().map(Bucket::headers),
        }
    }

    /// Takes one request and `tokens` from the quota for the key at
    /// `key_index`, or refuses. Either way returns the headers to send.
    pub fn admit(
        &mut self,
        key: &str,
        prompt: u64,
        completion: u64,
        now: Instant,
    ) -> (Result<(), Refusal>, RateHeaders) {
        let tokens = prompt + completion;
        self.report.requests += 1;
        for bucket in [&mut self.requests, &mut self.tokens].into_iter().flatten() {
            bucket.refill(now);
        }
        let mut wait = Duration::ZERO;
        let mut binding = "requests";
        for (name, bucket, amount) in [
            ("requests", &self.requests, 1),
            ("tokens", &self.tokens, tokens),
        ] {
            let Some(bucket) = bucket else { continue };
            match bucket.wait_for(amount) {
                None => {
                    self.report.rate_limited += 1;
                    let refusal = Refusal::TooLarge {
                        tokens,
                        tpm: bucket.capacity as u64,
                    };
                    return (Err(refusal), self.headers());
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
            return (Err(refusal), self.headers());
        }
        if let Some(b) = &mut self.requests {
            b.level -= 1.0;
        }
        if let Some(b) = &mut self.tokens {
            b.level -= tokens as f64;
        }
        let ms = now.saturating_duration_since(self.started).as_millis() as u64;
        self.window.record(ms, tokens);
        self.report.served += 1;
        self.report.prompt_tokens += prompt;
        self.report.completion_tokens += completion;
        let usage = self.report.keys.entry(key_label(key)).or_default();
        usage.requests += 1;
        usage.tokens += tokens;
        (Ok(()), self.headers())
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
        report.peak_60s = Peak {
            requests: self.window.peak_requests,
            tokens: self.window.peak_tokens,
        };
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-test-abcd";

    fn ledger(rpm: Option<u64>, tpm: Option<u64>, now: Instant) -> Ledger {
        Ledger::new(Limits { rpm, tpm }, &[KEY.to_owned()], now)
    }

    #[test]
    fn a_full_request_bucket_admits_its_limit_then_refuses_with_the_refill_time() {
        let now = Instant::now();
        let mut l = ledger(Some(60), None, now);
        for _ in 0..60 {
            assert!(l.admit(KEY, 1, 1, now).0.is_ok());
        }
        let (refused, headers) = l.admit(KEY, 1, 1, now);
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
            assert!(l.admit(KEY, 0, 0, now).0.is_ok());
        }
        assert!(
            l.admit(KEY, 0, 0, now + Duration::from_millis(999))
                .0
                .is_err()
        );
        assert!(
            l.admit(KEY, 0, 0, now + Duration::from_millis(1001))
                .0
                .is_ok()
        );
    }

    #[test]
    fn tokens_are_limited_by_prompt_plus_completion() {
        let now = Instant::now();
        let mut l = ledger(None, Some(100), now);
        assert!(l.admit(KEY, 40, 40, now).0.is_ok());
        match l.admit(KEY, 10, 20, now).0 {
            Err(Refusal::RateLimited { limit, .. }) => assert_eq!(limit, "tokens"),
            other => unreachable!("expected a token limit, got {other:?}"),
        }
        assert_eq!(
            l.admit(KEY, 200, 0, now).0,
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
            assert!(l.admit(KEY, 1, 1, now).0.is_ok());
        }
        // 59.999 s later the first five still count; at 60 s they do not.
        assert!(
            l.admit(KEY, 1, 1, now + Duration::from_millis(59_999))
                .0
                .is_ok()
        );
        assert_eq!(l.report().peak_60s.requests, 6);
        for _ in 0..3 {
            assert!(l.admit(KEY, 1, 1, now + MINUTE).0.is_ok());
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
}
