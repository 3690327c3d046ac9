//! What the upstream says about its own quota: `x-ratelimit-limit-*`,
//! `x-ratelimit-remaining-*` and `x-ratelimit-reset-*` on its answers.
//!
//! A key may be shared with other clients the gateway cannot see, so the
//! upstream's count can be lower than the gateway's window implies. When it
//! is, the upstream wins: the gateway sends no more than the upstream said
//! remain. What remains refills toward the limit over the reset period, as
//! the real services' buckets do (OpenAI describes its limits as refilling
//! continuously), so a low `remaining` with a `6m0s` reset lets requests
//! through as the bucket refills instead of holding the node idle for six
//! minutes. The limit it refills to is the reported one, else the node's
//! configured quota; with neither, the count holds until the reset.
//!
//! An answer describes the upstream's count when it produced that answer.
//! Requests the gateway reserved after the answered one may already be in
//! that count or not; to stay on the safe side they are all subtracted from
//! what the answer says remains (`Marks` tells which came later). The newest
//! answer's word replaces older ones, but never brings the time the count
//! is full again forward: an answer overtaken by later ones describes a
//! fuller bucket than the upstream has by the time it arrives.

use std::time::Duration;

use tokio::time::Instant;

/// A node's cumulative reservations, used to tell which came after which.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marks {
    pub requests: u64,
    pub tokens: u64,
}

/// The rate-limit headers of one upstream answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitReport {
    pub limit_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
}

/// One dimension of the upstream's word: `left` at `at` (less what was
/// reserved since), refilling linearly to `limit` by `full_at`, less what
/// the gateway has `taken` since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remaining {
    pub left: u64,
    pub at: Instant,
    /// What it refills to; `left` when nothing says (it then holds).
    pub limit: u64,
    pub full_at: Instant,
    /// Reserved since `at`.
    pub taken: u64,
}

impl Remaining {
    /// What the upstream has by `now`, before what was taken.
    fn refilled(&self, now: Instant) -> u64 {
        if self.limit <= self.left {
            return self.left;
        }
        if now >= self.full_at {
            return self.limit;
        }
        let span = self
            .full_at
            .saturating_duration_since(self.at)
            .as_secs_f64();
        let passed = now.saturating_duration_since(self.at).as_secs_f64();
        let refilled = (self.limit - self.left) as f64 * (passed / span.max(f64::EPSILON));
        // A hair of slack: the instant `when` computes must see the unit.
        self.left
            .saturating_add((refilled + 1e-6) as u64)
            .min(self.limit)
    }

    /// What remains at `now`.
    pub fn available(&self, now: Instant) -> u64 {
        self.refilled(now).saturating_sub(self.taken)
    }

    /// When `need` will be available (`None`: now). Past the reset the word
    /// is forgotten, so the reset is the latest answer.
    fn when(&self, need: u64, now: Instant) -> Option<Instant> {
        if self.available(now) >= need {
            return None;
        }
        let wanted = need.saturating_add(self.taken);
        if wanted > self.limit || self.limit <= self.left {
            return Some(self.full_at);
        }
        let span = self
            .full_at
            .saturating_duration_since(self.at)
            .as_secs_f64();
        let fraction = (wanted - self.left) as f64 / (self.limit - self.left) as f64;
        let wait = Duration::try_from_secs_f64(span * fraction).unwrap_or(Duration::MAX);
        Some(
            self.at
                .checked_add(wait)
                .map_or(self.full_at, |t| t.min(self.full_at)),
        )
    }
}

/// The upstream's latest word on what remains, per dimension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reported {
    pub requests: Option<Remaining>,
    pub tokens: Option<Remaining>,
}

/// What a node's remaining counts are out of: the span the node counts
/// over (`nodes[].window`), and when its answers give no
/// `x-ratelimit-limit-*` (Azure's), the quota in force pro rata over that
/// span. A reported (per-minute) limit is taken pro rata too, and a span
/// is the reset when none is given. For an OpenAI-style node: the
/// per-minute quota, a minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub over: Duration,
}

impl Reported {
    /// Takes the word of an answer to the request reserved at `then`;
    /// `now_marks` are the node's marks when the answer arrived, `counted`
    /// what the counts refill to, and over how long, when the answer does
    /// not say.
    pub fn observe(
        &mut self,
        report: &RateLimitReport,
        then: Marks,
        now_marks: Marks,
        counted: Counted,
        now: Instant,
    ) {
        let since = Marks {
            requests: now_marks.requests.saturating_sub(then.requests),
            tokens: now_marks.tokens.saturating_sub(then.tokens),
        };
        let word = |left: u64, limit: Option<u64>, reset: Option<Duration>, since: u64| {
            let left = left.saturating_sub(since);
            let full_at = now
                .checked_add(reset.unwrap_or(counted.over))
                .unwrap_or(now + counted.over);
            Remaining {
                left,
                at: now,
                limit: limit.unwrap_or(left).max(left),
                full_at,
                taken: 0,
            }
        };
        // Full again no sooner than the standing word said.
        let after = |word: Remaining, standing: Option<Remaining>| Remaining {
            full_at: standing.map_or(word.full_at, |s| s.full_at.max(word.full_at)),
            ..word
        };
        // A reported limit is per minute; a remaining count over a shorter
        // span (a bucket holding a second's worth) refills to its share.
        let share = |limit: u64| {
            let scaled = u128::from(limit) * counted.over.as_millis() / super::WINDOW.as_millis();
            u64::try_from(scaled)
                .unwrap_or(limit)
                .clamp(1, limit.max(1))
        };
        if let Some(left) = report.remaining_requests {
            let limit = report.limit_requests.map(share).or(counted.rpm);
            let word = word(left, limit, report.reset_requests, since.requests);
            self.requests = Some(after(word, self.requests));
        }
        if let Some(left) = report.remaining_tokens {
            let limit = report.limit_tokens.map(share).or(counted.tpm);
            let word = word(left, limit, report.reset_tokens, since.tokens);
            self.tokens = Some(after(word, self.tokens));
        }
    }

    /// Forgets counts whose reset has passed.
    pub fn expire(&mut self, now: Instant) {
        for dimension in [&mut self.requests, &mut self.tokens] {
            if dimension.is_some_and(|r| r.full_at <= now) {
                *dimension = None;
            }
        }
    }

    /// When the upstream's word lets a request of `tokens` through: `None`
    /// when it does now.
    pub fn blocked_until(&self, tokens: u64, now: Instant) -> Option<Instant> {
        let requests = self.requests.and_then(|r| r.when(1, now));
        let tokens = self.tokens.and_then(|r| r.when(tokens, now));
        requests.max(tokens)
    }

    /// A request of `tokens` was reserved.
    pub fn take(&mut self, tokens: u64) {
        if let Some(r) = &mut self.requests {
            r.taken = r.taken.saturating_add(1);
        }
        if let Some(r) = &mut self.tokens {
            r.taken = r.taken.saturating_add(tokens);
        }
    }

    /// A reserved request never reached the upstream.
    pub fn give_back(&mut self, tokens: u64) {
        if let Some(r) = &mut self.requests {
            give_back_to(r, 1);
        }
        if let Some(r) = &mut self.tokens {
            give_back_to(r, tokens);
        }
    }
}

/// Returns `n` to what remains: first from what was taken since the word,
/// the rest (a request the word's `left` already left out) to `left`.
fn give_back_to(r: &mut Remaining, n: u64) {
    let from_taken = n.min(r.taken);
    r.taken -= from_taken;
    r.left = r
        .left
        .saturating_add(n - from_taken)
        .min(r.limit.max(r.left));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(requests: u64, reset_s: u64) -> RateLimitReport {
        RateLimitReport {
            remaining_requests: Some(requests),
            reset_requests: Some(Duration::from_secs(reset_s)),
            ..RateLimitReport::default()
        }
    }

    const NONE: Counted = Counted {
        rpm: None,
        tpm: None,
        over: crate::limits::WINDOW,
    };

    #[tokio::test(start_paused = true)]
    async fn zero_remaining_with_no_limit_known_blocks_until_the_reset() {
        let now = Instant::now();
        let mut reported = Reported::default();
        reported.observe(&report(0, 2), Marks::default(), Marks::default(), NONE, now);
        assert_eq!(
            reported.blocked_until(1, now),
            Some(now + Duration::from_secs(2))
        );
        reported.expire(now + Duration::from_secs(2));
        assert_eq!(reported.blocked_until(1, now), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_low_remaining_refills_toward_the_limit_over_the_reset() {
        let now = Instant::now();
        let mut reported = Reported::default();
        // 0 of 60 left, full again in 6 minutes: one request every 6 s.
        let words = RateLimitReport {
            limit_requests: Some(60),
            ..report(0, 360)
        };
        reported.observe(&words, Marks::default(), Marks::default(), NONE, now);
        assert_eq!(
            reported.blocked_until(1, now),
            Some(now + Duration::from_secs(6))
        );
        let later = now + Duration::from_secs(60);
        assert_eq!(reported.requests.unwrap().available(later), 10);
        // Without a limit header, the configured quota is the limit.
        let mut configured = Reported::default();
        configured.observe(
            &report(0, 360),
            Marks::default(),
            Marks::default(),
            Counted {
                rpm: Some(60),
                ..NONE
            },
            now,
        );
        assert_eq!(configured.requests.unwrap().available(later), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_reserved_after_the_answered_one_are_subtracted() {
        let now = Instant::now();
        let mut reported = Reported::default();
        let then = Marks {
            requests: 10,
            tokens: 0,
        };
        let later = Marks {
            requests: 13,
            tokens: 0,
        };
        reported.observe(&report(5, 60), then, later, NONE, now);
        assert_eq!(reported.requests.map(|r| r.left), Some(2));
        reported.take(0);
        reported.take(0);
        assert!(reported.blocked_until(0, now).is_some());
        reported.give_back(0);
        assert_eq!(reported.blocked_until(0, now), None);
    }

    #[tokio::test(start_paused = true)]
    async fn remaining_tokens_are_compared_with_the_reservation() {
        let now = Instant::now();
        let mut reported = Reported::default();
        let words = RateLimitReport {
            remaining_tokens: Some(500),
            reset_tokens: Some(Duration::from_secs(3)),
            ..RateLimitReport::default()
        };
        reported.observe(&words, Marks::default(), Marks::default(), NONE, now);
        assert_eq!(reported.blocked_until(500, now), None);
        assert_eq!(
            reported.blocked_until(501, now),
            Some(now + Duration::from_secs(3))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_newest_answer_replaces_an_older_one() {
        let now = Instant::now();
        let mut reported = Reported::default();
        reported.observe(
            &report(0, 30),
            Marks::default(),
            Marks::default(),
            NONE,
            now,
        );
        reported.observe(
            &report(7, 30),
            Marks::default(),
            Marks::default(),
            NONE,
            now,
        );
        assert_eq!(reported.requests.map(|r| r.left), Some(7));
    }

    #[tokio::test(start_paused = true)]
    async fn an_overtaken_answer_never_brings_the_refill_forward() {
        let now = Instant::now();
        let mut reported = Reported::default();
        let limited = |left, reset_ms| RateLimitReport {
            limit_requests: Some(600),
            remaining_requests: Some(left),
            reset_requests: Some(Duration::from_millis(reset_ms)),
            ..RateLimitReport::default()
        };
        let second = Counted {
            over: Duration::from_secs(1),
            ..NONE
        };
        // The tenth request's answer: the bucket of 10 is empty, full in 1 s.
        let tenth = Marks {
            requests: 10,
            tokens: 0,
        };
        reported.observe(&limited(0, 1000), tenth, tenth, second, now);
        // Then the first request's answer, overtaken: 9 left, full in 100 ms.
        let first = Marks {
            requests: 1,
            tokens: 0,
        };
        reported.observe(&limited(9, 100), first, tenth, second, now);
        let words = reported.requests.unwrap();
        assert_eq!((words.left, words.limit), (0, 10));
        assert_eq!(words.full_at, now + Duration::from_secs(1));
        assert_eq!(
            reported.blocked_until(0, now + Duration::from_millis(500)),
            None
        );
        assert_eq!(
            words.available(now + Duration::from_millis(500)),
            5,
            "refills 10 a second"
        );
    }
}
