//! Quotas over a rolling 60-second window, and the [`Reservation`] guard
//! that takes capacity on admission and gives it back exactly once.
//!
//! A [`Limiter`] (one per node, and one per client with its own limits)
//! owns its window, in-flight count, outstanding token reservations and
//! cooldown behind one short `parking_lot::Mutex` (never held across an
//! `.await`). There is no global lock: requests for different nodes never
//! contend.
//!
//! Invariant: **no node receives more requests, reserved tokens or request
//! bytes than its quota in any rolling 60 s.** The window is a ring of 100 ms
//! slots, and an amount recorded at time `t` stays counted until the end of
//! the slot 60.5 s after `t`'s slot: always at least 60.5 s, at most 60.6 s.
//! The half second beyond the minute is a guard band: the upstream counts a
//! request when it arrives, a little after the gateway reserved it, and the
//! arrivals of a burst spread out by their own queueing; without the band, a
//! burst dispatched the moment last minute's slots expire could land inside
//! the upstream's view of last minute. It costs under 1% of the quota.
//! [`Limiter::try_reserve`] checks and records under one lock, so two
//! requests can never both take the last unit of headroom.
//!
//! With a node `window` below the minute (Azure counts over 10 s or 1 s), a
//! second ring over that span holds each per-minute quota pro rata (`rpm ×
//! span / 60 s`, at least 1) within every rolling span, so a minute's quota
//! is paced rather than spent in one burst. Its slots are a hundredth of
//! the span and an amount counts for 1.01 to 1.02 spans (a guard band of
//! one slot), so 98% of the allotment stays usable. One demand larger than
//! the span's allotment fits only an empty span (the minute still bounds
//! it). A reservation remembers the instant it was recorded at, which
//! names its slot in each ring.
//!
//! The limit types live here too: a node's [`Quota`], a client's
//! [`ClientLimits`] and its token bucket ([`bucket`]).
//!
//! Not here: choosing among nodes (`selection`), waiting and the limits
//! shared through Redis (`admission`, which joins this module's
//! [`Reservation`] and a shared lease in one guard).

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

mod bucket;
mod limiter;
mod reported;
pub mod share;
mod window;

pub use bucket::{BucketLimit, ClientLimits, LimitFields, TokenBucket};
pub use limiter::{Limiter, LimiterSnapshot, Reservation, ShortUse, Terms};
pub use reported::{Counted, Marks, RateLimitReport, Remaining, Reported};
pub use share::{Priority, Reserves, Share};

/// The span every per-minute limit covers.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Slot width: fine enough that a freed slot is handed on within 100 ms.
pub(super) const SLOT: Duration = Duration::from_millis(100);
/// Kept beyond the minute; see the module docs.
pub const GUARD: Duration = Duration::from_millis(500);
/// 605 slots cover the minute and the guard band; the extra slot keeps an
/// amount counted for all of that whatever its offset inside its own slot.
pub(super) const SLOTS: u64 =
    (WINDOW.as_millis() + GUARD.as_millis()) as u64 / SLOT.as_millis() as u64 + 1;

/// The most tokens one request may ask for: above every real quota, and
/// exactly representable (and printed without an exponent) by the
/// shared-limits script's numbers.
pub const MAX_DEMAND_TOKENS: u64 = 1_000_000_000_000;

/// What one request asks of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// Prompt tokens plus the completion tokens reserved; at most
    /// [`MAX_DEMAND_TOKENS`].
    pub tokens: u64,
    /// Request body bytes.
    pub bytes: u64,
    /// For a request that names no `max_tokens`: its prompt tokens and the
    /// choices it asks for, so a node with its own default completion
    /// reserves by that ([`on`](Self::on)).
    pub open_ended: Option<(u64, u64)>,
    /// What it may use of each node's quota, per million: all of it, less
    /// what the classes above its client's keep ([`Reserves`]).
    pub usable: u32,
}

impl Default for Demand {
    fn default() -> Self {
        Demand {
            tokens: 0,
            bytes: 0,
            open_ended: None,
            usable: share::WHOLE,
        }
    }
}

impl Demand {
    /// What this request asks of a node whose own default completion
    /// (`nodes[].default_completion_tokens`) is `default`.
    pub fn on(self, default: Option<u64>) -> Demand {
        match (self.open_ended, default) {
            (Some((prompt, choices)), Some(default)) => Demand {
                tokens: prompt
                    .saturating_add(default.saturating_mul(choices))
                    .min(MAX_DEMAND_TOKENS),
                ..self
            },
            _ => self,
        }
    }

    /// What this request takes of `limit`.
    pub fn of(&self, limit: Limit) -> u64 {
        match limit {
            Limit::Rpm | Limit::MaxConcurrency => 1,
            Limit::Tpm => self.tokens,
            Limit::Bpm => self.bytes,
        }
    }
}

/// When a node could take a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outlook {
    /// It has headroom now.
    Now,
    /// Not before this instant (a window slides or a cooldown ends).
    At(Instant),
    /// When one of its requests in flight finishes.
    OnRelease,
    /// Never: the request alone exceeds this limit.
    Never(Limit),
    /// Not on this node: it was removed from the config and only finishes
    /// the requests it has.
    Retired,
}

/// Why a node rests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CooldownReason {
    /// It answered 429: its per-minute limit.
    RateLimited,
    /// It answered `insufficient_quota`: its billing quota is spent.
    QuotaExhausted,
    /// A provisioned deployment said it is nearly full
    /// (`azure-openai-deployment-utilization` at or above
    /// `nodes[].utilization_high`).
    ProvisionedFull,
}

impl CooldownReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CooldownReason::RateLimited => "rate_limited",
            CooldownReason::QuotaExhausted => "insufficient_quota",
            CooldownReason::ProvisionedFull => "provisioned_full",
        }
    }
}

/// A named limit, for messages and `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Rpm,
    Tpm,
    Bpm,
    MaxConcurrency,
}

impl Limit {
    pub fn field(self) -> &'static str {
        match self {
            Limit::Rpm => "rpm",
            Limit::Tpm => "tpm",
            Limit::Bpm => "bpm",
            Limit::MaxConcurrency => "max_concurrency",
        }
    }
}

/// A node's limits (or a client's rpm and tpm); `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub rpm: Option<NonZeroU64>,
    pub tpm: Option<NonZeroU64>,
    pub bpm: Option<NonZeroU64>,
    pub max_concurrency: Option<NonZeroU64>,
}

impl Quota {
    /// The quota for `limit`, if limited.
    pub fn of(&self, limit: Limit) -> Option<u64> {
        let value = match limit {
            Limit::Rpm => self.rpm,
            Limit::Tpm => self.tpm,
            Limit::Bpm => self.bpm,
            Limit::MaxConcurrency => self.max_concurrency,
        };
        value.map(u64::from)
    }
}

/// How loaded a node is, for choosing among nodes with headroom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Load {
    /// Highest use over the node's limited dimensions, in parts per million.
    pub utilisation_ppm: u32,
    pub in_flight: u64,
}

/// Wakes the queue when capacity may have been freed. Cheap to call when
/// nobody waits: one atomic load.
#[derive(Debug, Default)]
pub struct HeadroomSignal {
    waiting: AtomicUsize,
    notify: Notify,
}

impl HeadroomSignal {
    pub fn set_waiting(&self, count: usize) {
        self.waiting.store(count, Ordering::Release);
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Capacity may have been freed; wake the dispatcher if anyone waits.
    pub fn freed(&self) {
        if self.waiting() > 0 {
            self.notify.notify_one();
        }
    }

    /// Wakes the dispatcher unconditionally (a new waiter arrived).
    pub fn poke(&self) {
        self.notify.notify_one();
    }

    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

/// What a node's config sets of its limiter (`nodes[]`), applied at once
/// ([`Limiter::apply`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeLimits {
    pub quota: Quota,
    /// Besides the minute, the limits hold pro rata within every rolling
    /// span this long (`nodes[].window`; 60 s is the minute alone).
    pub window: Duration,
    /// The upstream charges a request's reservation at arrival and gives
    /// nothing back (Azure).
    pub charged_at_arrival: bool,
    /// `nodes[].default_completion_tokens`.
    pub default_completion: Option<u64>,
    /// A provisioned deployment's `nodes[].utilization_high` (percent):
    /// a reading at or above it holds the node. `None`: not provisioned.
    pub utilization_high: Option<f64>,
}
