//! What the upstream says about its own quota: `x-ratelimit-remaining-*`
//! and `x-ratelimit-reset-*` on every answer.
//!
//! A key may be shared with other clients the gateway cannot see, so the
//! upstream's count can be lower than the gateway's window implies. When it
//! is, the upstream wins until its reset: the gateway sends no more than the
//! upstream said remain.
//!
//! An answer describes the upstream's count when it produced that answer.
//! Requests the gateway reserved after the answered one may already be in
//! that count or not; to stay on the safe side they are all subtracted from
//! what the answer says remains (`Marks` tells which came later). The newest
//! answer's word replaces older ones.

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
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
}

/// One remaining count, valid until the upstream's reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remaining {
    pub left: u64,
    pub until: Instant,
}

/// The upstream's latest word on what remains, per dimension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reported {
    pub requests: Option<Remaining>,
    pub tokens: Option<Remaining>,
}

/// Without a reset header, a remaining count is trusted for one window.
const DEFAULT_RESET: Duration = super::WINDOW;

impl Reported {
    /// Takes the word of an answer to the request reserved at `then`; `now_marks`
    /// are the node's marks at the time the answer arrived.
    pub fn observe(
        &mut self,
        report: &RateLimitReport,
        then: Marks,
        now_marks: Marks,
        now: Instant,
    ) {
        let since = Marks {
            requests: now_marks.requests.saturating_sub(then.requests),
            tokens: now_marks.tokens.saturating_sub(then.tokens),
        };
        if let Some(left) = report.remaining_requests {
            self.requests = Some(Remaining {
                left: left.saturating_sub(since.requests),
                until: now + report.reset_requests.unwrap_or(DEFAULT_RESET),
            });
        }
        if let Some(left) = report.remaining_tokens {
            self.tokens = Some(Remaining {
                left: left.saturating_sub(since.tokens),
                until: now + report.reset_tokens.unwrap_or(DEFAULT_RESET),
            });
        }
    }

    /// Forgets counts whose reset has passed.
    pub fn expire(&mut self, now: Instant) {
        for dimension in [&mut self.requests, &mut self.tokens] {
            if dimension.is_some_and(|r| r.until <= now) {
                *dimension = None;
            }
        }
    }

    /// When the upstream's word lets a request of `tokens` through: `None`
    /// when it does now.
    pub fn blocked_until(&self, tokens: u64) -> Option<Instant> {
        let requests = self.requests.filter(|r| r.left == 0).map(|r| r.until);
        let tokens = self.tokens.filter(|r| r.left < tokens).map(|r| r.until);
        requests.max(tokens).or(requests).or(tokens)
    }

    /// A request of `tokens` was reserved.
    pub fn take(&mut self, tokens: u64) {
        if let Some(r) = &mut self.requests {
            r.left = r.left.saturating_sub(1);
        }
        if let Some(r) = &mut self.tokens {
            r.left = r.left.saturating_sub(tokens);
        }
    }

    /// A reserved request never reached the upstream.
    pub fn give_back(&mut self, tokens: u64) {
        if let Some(r) = &mut self.requests {
            r.left = r.left.saturating_add(1);
        }
        if let Some(r) = &mut self.tokens {
            r.left = r.left.saturating_add(tokens);
        }
    }
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

    #[tokio::test(start_paused = true)]
    async fn zero_remaining_blocks_until_the_reset() {
        let now = Instant::now();
        let mut reported = Reported::default();
        reported.observe(&report(0, 2), Marks::default(), Marks::default(), now);
        assert_eq!(
            reported.blocked_until(1),
            Some(now + Duration::from_secs(2))
        );
        reported.expire(now + Duration::from_secs(2));
        assert_eq!(reported.blocked_until(1), None);
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
        reported.observe(&report(5, 60), then, later, now);
        assert_eq!(reported.requests.map(|r| r.left), Some(2));
        reported.take(0);
        reported.take(0);
        assert!(reported.blocked_until(0).is_some());
        reported.give_back(0);
        assert_eq!(reported.blocked_until(0), None);
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
        reported.observe(&words, Marks::default(), Marks::default(), now);
        assert_eq!(reported.blocked_until(500), None);
        assert_eq!(
            reported.blocked_until(501),
            Some(now + Duration::from_secs(3))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_newest_answer_replaces_an_older_one() {
        let now = Instant::now();
        let mut reported = Reported::default();
        reported.observe(&report(0, 30), Marks::default(), Marks::default(), now);
        reported.observe(&report(7, 30), Marks::default(), Marks::default(), now);
        assert_eq!(reported.requests.map(|r| r.left), Some(7));
    }
}
