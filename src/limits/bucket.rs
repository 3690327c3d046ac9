//! A client's own limits: an rpm/tpm window (a [`Limiter`](super::Limiter)
//! like a node's) and a token bucket of `burst` requests refilled
//! continuously at `rate_per_second`.
//!
//! Invariant: a [`ClientLimits`] holds only usable values: no zero limit
//! (leave a limit out for none), and a bucket has both its size and a
//! finite, positive rate.

use std::num::NonZeroU64;
use std::time::Duration;

use tokio::time::Instant;

/// A client's own limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClientLimits {
    pub rpm: Option<NonZeroU64>,
    pub tpm: Option<NonZeroU64>,
    /// A token bucket of `burst` requests refilled at `rate_per_second`.
    pub bucket: Option<BucketLimit>,
    /// Its requests in flight at once, over every node.
    pub max_concurrency: Option<NonZeroU64>,
}

/// A client's limits as the config and the admin API give them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LimitFields {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub burst: Option<u64>,
    pub rate_per_second: Option<f64>,
    pub max_concurrency: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketLimit {
    pub burst: NonZeroU64,
    pub rate_per_second: f64,
}

/// The slowest refill a bucket may have: one request in about 17 minutes.
/// Slower would be a `Retry-After` of days; leave the bucket out instead.
const MIN_RATE: f64 = 0.001;
/// The fastest: a million requests a second is no limit at all.
const MAX_RATE: f64 = 1_000_000.0;

impl ClientLimits {
    /// Validates a client's limits as written (config or admin API): zero is
    /// refused (leave a limit out for none), and a bucket needs both its
    /// size and its rate. Errors name the field.
    pub fn from_parts(fields: LimitFields) -> Result<Self, Vec<(&'static str, &'static str)>> {
        let LimitFields {
            rpm,
            tpm,
            burst,
            rate_per_second,
            max_concurrency,
        } = fields;
        let mut problems = Vec::new();
        let mut limit = |field: &'static str, value: Option<u64>| match value {
            Some(0) => {
                problems.push((field, "must be greater than 0; leave it out for no limit"));
                None
            }
            other => other.and_then(NonZeroU64::new),
        };
        let rpm = limit("rpm", rpm);
        let tpm = limit("tpm", tpm);
        let burst_limit = limit("burst", burst);
        let max_concurrency = limit("max_concurrency", max_concurrency);
        let rate_valid = rate_per_second.map(|r| (MIN_RATE..=MAX_RATE).contains(&r));
        if rate_valid == Some(false) {
            problems.push(("rate_per_second", "must be a number from 0.001 to 1000000"));
        }
        let bucket = match (
            burst_limit,
            rate_per_second.filter(|_| rate_valid == Some(true)),
        ) {
            (Some(burst), Some(rate_per_second)) => Some(BucketLimit {
                burst,
                rate_per_second,
            }),
            (Some(_), None) if rate_valid.is_none() => {
                problems.push(("rate_per_second", "burst needs rate_per_second too"));
                None
            }
            (None, Some(_)) if burst != Some(0) => {
                problems.push(("burst", "rate_per_second needs burst too"));
                None
            }
            _ => None,
        };
        if problems.is_empty() {
            Ok(Self {
                rpm,
                tpm,
                bucket,
                max_concurrency,
            })
        } else {
            Err(problems)
        }
    }
}

/// A token bucket: `burst` requests at once, refilled continuously at
/// `rate_per_second`.
#[derive(Debug)]
pub struct TokenBucket {
    limit: BucketLimit,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn full(limit: BucketLimit, now: Instant) -> Self {
        Self {
            limit,
            tokens: u64::from(limit.burst) as f64,
            at: now,
        }
    }

    pub fn limit(&self) -> BucketLimit {
        self.limit
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.wait_for_one())
        }
    }

    /// Whether a token is there now, without taking it; if not, how long
    /// until one is.
    pub fn peek(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            Ok(())
        } else {
            Err(self.wait_for_one())
        }
    }

    /// Puts back a token taken for a request that was then refused.
    pub fn put_back(&mut self) {
        let capacity = u64::from(self.limit.burst) as f64;
        self.tokens = (self.tokens + 1.0).min(capacity);
    }

    fn refill(&mut self, now: Instant) {
        let capacity = u64::from(self.limit.burst) as f64;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.rate_per_second).min(capacity);
        self.at = now;
    }

    fn wait_for_one(&self) -> Duration {
        Duration::try_from_secs_f64((1.0 - self.tokens) / self.limit.rate_per_second)
            .unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(burst: u64, rate: f64) -> TokenBucket {
        TokenBucket::full(
            BucketLimit {
                burst: NonZeroU64::new(burst).unwrap(),
                rate_per_second: rate,
            },
            Instant::now(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let mut b = bucket(2, 4.0);
        assert!(b.take(Instant::now()).is_ok());
        assert!(b.take(Instant::now()).is_ok());
        assert_eq!(b.take(Instant::now()), Err(Duration::from_millis(250)));
        tokio::time::advance(Duration::from_millis(250)).await;
        assert!(b.take(Instant::now()).is_ok());
        // Never more than the burst, however long it rested.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(b.take(Instant::now()).is_ok());
        assert!(b.take(Instant::now()).is_ok());
        assert!(b.take(Instant::now()).is_err());
        // A peek takes nothing; a token put back is there again.
        assert_eq!(b.peek(Instant::now()), Err(Duration::from_millis(250)));
        b.put_back();
        assert_eq!(b.peek(Instant::now()), Ok(()));
    }
}
