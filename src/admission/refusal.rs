//! The refusal policy, written once: why admission said no ([`Refusal`])
//! and what the client is told ([`refuse`]): the error, its message and
//! its `Retry-After`. Local and shared (Redis) admission both describe a
//! refusal as a [`Refusal`] and word it here, so the same situation gets
//! the same answer in either mode.
//!
//! How long to ask a client to wait:
//! - saturated, headroom expected at a known time (a window slides, a
//!   cooldown ends, the upstream's reset): that time;
//! - saturated, headroom when a request in flight ends (a concurrency
//!   limit), which nobody can know: [`ON_RELEASE`];
//! - no node in rotation: when the first may be back (an ejection's
//!   backoff, the next probe), else [`OUT_OF_ROTATION_UNKNOWN`];
//! - Redis unreachable in `reject` mode: [`SHARED_UNAVAILABLE`].
//!
//! Every wait is rounded up to whole seconds, at least 1, by
//! [`RetryAfter`], which the message and the header both show.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::{GatewayError, RetryAfter};
use crate::limits::{Demand, Limit};
use crate::money::budget::rfc3339;
use crate::money::{Budget, Cost, Short};
use crate::snapshot::{Live, NodeId};

/// Headroom that waits on requests in flight comes back when one of them
/// ends: a moment nobody can know. A second is a short, honest guess; a
/// client that comes back too early is told again.
pub(crate) const ON_RELEASE: Duration = Duration::from_secs(1);

/// No node in rotation and none says when it may be back (a refused key
/// waits for a reload): a few seconds, long enough not to hammer.
pub(crate) const OUT_OF_ROTATION_UNKNOWN: Duration = Duration::from_secs(5);

/// Redis cannot be reached (`on_redis_error = "reject"`): the gateway
/// pings it every second while it is down, so a second is when an answer
/// may change.
pub(crate) const SHARED_UNAVAILABLE: Duration = Duration::from_secs(1);

/// When headroom comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Headroom {
    /// After this long.
    In(Duration),
    /// When a request in flight ends.
    OnRelease,
}

impl Headroom {
    fn wait(self) -> Duration {
        match self {
            Headroom::In(wait) => wait,
            Headroom::OnRelease => ON_RELEASE,
        }
    }

    /// The headroom of an instant (`None`: on release), seen from `now`.
    pub(crate) fn at(at: Option<Instant>, now: Instant) -> Self {
        at.map_or(Headroom::OnRelease, |at| {
            Headroom::In(at.saturating_duration_since(now))
        })
    }
}

/// Why admission refused a request.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// Every candidate is at its limit (or the queue is full).
    Saturated(Headroom),
    /// Every candidate is out of rotation; the first may be back after
    /// this long (`None`: nobody knows).
    OutOfRotation(Option<Duration>),
    /// The request alone exceeds `limit` on every candidate: `wanted`
    /// against at most `largest`.
    TooLarge {
        limit: Limit,
        wanted: u64,
        largest: u64,
    },
    /// The client is over its own limit.
    ClientLimited(Headroom),
    /// The request alone exceeds the client's own `limit`.
    ClientTooSmall(Limit),
    /// The client may not use this model.
    ModelNotAllowed(String),
    /// A reload took the model away while the request waited.
    ModelGone(String),
    /// The client was deleted, disabled or taken out of the config while
    /// its request waited.
    ClientGone,
    /// The client's budget has too little left for the request's worst
    /// case (`now`: Unix seconds).
    OverBudget {
        budget: Budget,
        short: Short,
        worst: Cost,
        now: i64,
    },
    /// The request's worst case alone exceeds the client's whole budget.
    BudgetTooSmall,
    /// The store (a client's spend) cannot be read.
    StoreUnavailable,
    /// Redis cannot be reached and `on_redis_error = "reject"`.
    SharedUnavailable,
    /// The gateway is stopping.
    ShuttingDown,
}

/// What the client is told: the one place a refusal becomes an error.
pub(crate) fn refuse(refusal: Refusal) -> GatewayError {
    match refusal {
        Refusal::Saturated(headroom) => GatewayError::Saturated {
            retry_after: RetryAfter::after(headroom.wait()),
        },
        Refusal::OutOfRotation(back_in) => GatewayError::NoHealthyNode {
            retry_after: RetryAfter::after(
                back_in
                    .filter(|d| !d.is_zero())
                    .unwrap_or(OUT_OF_ROTATION_UNKNOWN),
            ),
        },
        Refusal::TooLarge {
            limit,
            wanted,
            largest,
        } => GatewayError::request_too_large(limit, wanted, largest),
        Refusal::ClientLimited(headroom) => GatewayError::ClientRateLimited {
            retry_after: RetryAfter::after(headroom.wait()),
        },
        Refusal::ClientTooSmall(limit) => GatewayError::ClientLimitTooSmall {
            limit: limit.field(),
        },
        Refusal::ModelNotAllowed(model) => GatewayError::ModelNotAllowed(model),
        Refusal::ModelGone(model) => GatewayError::ModelNotFound(model),
        Refusal::ClientGone => GatewayError::InvalidApiKey,
        Refusal::OverBudget {
            budget,
            short,
            worst,
            now,
        } => over_budget(budget, short, worst, now),
        Refusal::BudgetTooSmall => GatewayError::ClientLimitTooSmall {
            limit: "budget_usd",
        },
        Refusal::SharedUnavailable => GatewayError::ClusterUnavailable {
            retry_after: RetryAfter::after(SHARED_UNAVAILABLE),
        },
        Refusal::StoreUnavailable => GatewayError::StoreUnavailable,
        Refusal::ShuttingDown => GatewayError::ShuttingDown,
    }
}

/// A budget's refusal: until the period renews (429), for good (a spent
/// `total`: 403), or until requests in flight end (429, [`ON_RELEASE`]).
fn over_budget(budget: Budget, short: Short, worst: Cost, now: i64) -> GatewayError {
    let period = budget.period.as_str();
    match short {
        Short::Held => GatewayError::BudgetHeld {
            period,
            worst_usd: worst.usd(),
            retry_after: RetryAfter::after(ON_RELEASE),
        },
        Short::Spent {
            remaining,
            renews: Some(renews),
        } => GatewayError::BudgetExceeded {
            period,
            worst_usd: worst.usd(),
            remaining_usd: remaining.usd(),
            renews: rfc3339(renews),
            retry_after: RetryAfter::after(Duration::from_secs(
                u64::try_from(renews.saturating_sub(now)).unwrap_or(0),
            )),
        },
        Short::Spent {
            remaining,
            renews: None,
        } => GatewayError::BudgetExhausted {
            worst_usd: worst.usd(),
            remaining_usd: remaining.usd(),
        },
    }
}

/// `None` when some candidate (not excluded) is in rotation; else the
/// refusal, with the soonest any of them may be back.
pub(crate) fn out_of_rotation(
    live: &Live,
    candidates: &[NodeId],
    excluded: &[NodeId],
    now: Instant,
) -> Option<Refusal> {
    let mut back_in: Option<Duration> = None;
    for &id in candidates.iter().filter(|id| !excluded.contains(id)) {
        let node = live.node(id);
        if node.health.in_rotation() {
            return None;
        }
        if let Some(d) = node.health.back_in(now, &live.config.health) {
            back_in = Some(back_in.map_or(d, |t| t.min(d)));
        }
    }
    Some(Refusal::OutOfRotation(back_in))
}

/// The request alone exceeds `limit` on every candidate: names the largest
/// quota any of them has.
pub(crate) fn too_large(
    live: &Live,
    candidates: &[NodeId],
    limit: Limit,
    demand: Demand,
) -> Refusal {
    let now = Instant::now();
    let largest = candidates
        .iter()
        .filter_map(|&id| live.node(id).limiter.snapshot(now).quota.of(limit))
        .max()
        .unwrap_or(0);
    Refusal::TooLarge {
        limit,
        wanted: demand.of(limit),
        largest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(error: &GatewayError) -> u64 {
        error.retry_after().map_or(0, RetryAfter::seconds)
    }

    #[test]
    fn a_wait_on_requests_in_flight_is_one_second() {
        let error = refuse(Refusal::Saturated(Headroom::OnRelease));
        assert_eq!(retry(&error), 1);
        assert!(error.to_string().ends_with("Retry after 1 s."), "{error}");
    }

    #[test]
    fn a_known_wait_is_rounded_up_in_the_message_and_the_header_alike() {
        let error = refuse(Refusal::Saturated(Headroom::In(Duration::from_millis(400))));
        assert_eq!(retry(&error), 1);
        assert!(error.to_string().ends_with("Retry after 1 s."), "{error}");
        let error = refuse(Refusal::ClientLimited(Headroom::In(Duration::from_millis(
            2_100,
        ))));
        assert_eq!(retry(&error), 3);
        assert!(error.to_string().ends_with("Retry after 3 s."), "{error}");
    }

    #[test]
    fn out_of_rotation_without_an_estimate_asks_for_a_few_seconds() {
        let unknown = refuse(Refusal::OutOfRotation(None));
        assert_eq!(retry(&unknown), OUT_OF_ROTATION_UNKNOWN.as_secs());
        let soon = refuse(Refusal::OutOfRotation(Some(Duration::from_millis(1_500))));
        assert_eq!(retry(&soon), 2);
        let shared = refuse(Refusal::SharedUnavailable);
        assert_eq!(retry(&shared), 1);
    }
}
