//! A client whose requests keep failing on every node tried: after
//! [`STREAK_LIMIT`] such requests in a row, its requests are tried on one
//! node only for [`STREAK_PAUSE`], so a request shaped to fail everywhere
//! cannot keep the gateway retrying (each still costs at most
//! `retry.attempts + 1` upstream calls). One request that an upstream
//! serves ends the streak.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Requests failed on every node tried, in a row, before retries stop.
pub(crate) const STREAK_LIMIT: u32 = 5;
/// How long a client's requests then get one attempt only.
pub(crate) const STREAK_PAUSE: Duration = Duration::from_secs(60);

/// One client's streak of requests that failed everywhere.
#[derive(Debug, Default)]
pub(crate) struct FailureStreak {
    in_row: AtomicU32,
    /// Until when its requests get one attempt only.
    single_until: Mutex<Option<Instant>>,
}

impl FailureStreak {
    /// Whether the client's requests get one attempt only now.
    pub(crate) fn single_attempt(&self, now: Instant) -> bool {
        if self.in_row.load(Ordering::Acquire) < STREAK_LIMIT {
            return false;
        }
        self.single_until.lock().is_some_and(|until| now < until)
    }

    /// A request of the client failed on every node it was tried on.
    pub(crate) fn failed_everywhere(&self, now: Instant) {
        let in_row = self.in_row.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        if in_row >= STREAK_LIMIT {
            let mut until = self.single_until.lock();
            if until.is_none_or(|until| until <= now) {
                tracing::warn!(
                    failed_in_a_row = in_row,
                    pause_s = STREAK_PAUSE.as_secs(),
                    "a client's requests fail on every node; they get one attempt each for a while"
                );
                *until = Some(now + STREAK_PAUSE);
            }
        }
    }

    /// A request of the client was served: the streak ends.
    pub(crate) fn served(&self) {
        if self.in_row.load(Ordering::Acquire) != 0 {
            self.in_row.store(0, Ordering::Release);
            *self.single_until.lock() = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_streak_of_failures_everywhere_limits_retries_for_a_while() {
        let streak = FailureStreak::default();
        for _ in 1..STREAK_LIMIT {
            streak.failed_everywhere(Instant::now());
        }
        assert!(!streak.single_attempt(Instant::now()), "not yet");
        streak.failed_everywhere(Instant::now());
        assert!(streak.single_attempt(Instant::now()));
        tokio::time::advance(STREAK_PAUSE).await;
        assert!(!streak.single_attempt(Instant::now()), "the pause ended");
        streak.failed_everywhere(Instant::now());
        assert!(
            streak.single_attempt(Instant::now()),
            "one more failure: again"
        );
        streak.served();
        assert!(!streak.single_attempt(Instant::now()), "served: over");
    }
}
