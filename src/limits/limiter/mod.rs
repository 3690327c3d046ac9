//! A [`Limiter`]: one node's (or one client's) live use of its quota,
//! behind one short lock, and the [`Reservation`] guard that takes capacity
//! and gives it back exactly once. The invariants are the module's
//! ([`super`]).

use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::window::{Amounts, Window};
use super::{
    CooldownReason, Counted, Demand, HeadroomSignal, Limit, Load, Marks, NodeLimits, Outlook,
    Quota, RateLimitReport, Reported, SLOT, SLOTS, WINDOW, share,
};

/// Slots in a short window's span: its slots are a hundredth of the span
/// (10 ms for 1 s, 100 ms for 10 s), and it keeps two more, one as a guard
/// band against arrival spread and one for an amount's offset inside its
/// own slot: an amount counts for 1.01 to 1.02 spans, so 98% of the
/// allotment is usable.
const SHORT_SLOTS: u64 = 100;

/// A rolling span shorter than the minute, and its window.
#[derive(Debug)]
struct Short {
    span: Duration,
    window: Window,
}

impl Short {
    /// Starts from what the minute's window holds of the span.
    fn new(span: Duration, minute: &Window) -> Self {
        let width = (span / SHORT_SLOTS as u32).clamp(Duration::from_millis(1), SLOT);
        let len = span.as_nanos().div_ceil(width.as_nanos()) as u64 + 2;
        Self {
            span,
            window: minute.tail(len, width),
        }
    }

    /// The per-minute `quota` pro rata over the span, never below one.
    fn allotment(&self, quota: u64) -> u64 {
        let scaled = u128::from(quota) * self.span.as_millis() / WINDOW.as_millis();
        (scaled as u64).max(1)
    }
}

#[derive(Debug)]
struct LimiterState {
    /// As configured.
    quota: Quota,
    /// The quota in force: the configured one, lowered where the upstream
    /// reports a lower limit (`x-ratelimit-limit-*`).
    effective: Quota,
    /// Besides the minute: the per-minute limits pro rata over a shorter
    /// rolling span (`nodes[].window`), as Azure enforces them.
    short: Option<Short>,
    /// The completion an open-ended request reserves here
    /// (`nodes[].default_completion_tokens`), when the node has its own.
    default_completion: Option<u64>,
    /// The upstream charges a request's reservation at arrival and gives
    /// nothing back (Azure: prompt + `max_tokens`): a settlement never
    /// lowers the tokens counted.
    charged_at_arrival: bool,
    /// A provisioned deployment's fullness (percent) that holds it.
    utilization_high: Option<f64>,
    /// The upstream's reported (rpm, tpm) limits, when below the quota.
    upstream_limits: (Option<NonZeroU64>, Option<NonZeroU64>),
    window: Window,
    /// The latest instant any caller saw: what is recorded is recorded at
    /// it, in the newest slot of every window.
    latest: Instant,
    in_flight: u64,
    /// Tokens reserved by requests not yet settled.
    pending_tokens: u64,
    cooldown: Option<(Instant, CooldownReason)>,
    /// Every reservation ever made, to order them against upstream answers.
    marks: Marks,
    reported: Reported,
    retired: bool,
}

/// The live use of one node's quota (or one client's). A node's survives
/// config reloads (kept by node name), a client's lives as long as the
/// client (kept by id).
#[derive(Debug)]
pub struct Limiter {
    id: u64,
    state: Mutex<LimiterState>,
    signal: Arc<HeadroomSignal>,
}

static NEXT_LIMITER_ID: AtomicU64 = AtomicU64::new(1);

impl Limiter {
    pub fn new(quota: Quota, signal: Arc<HeadroomSignal>) -> Arc<Self> {
        Arc::new(Self {
            id: NEXT_LIMITER_ID.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(LimiterState {
                quota,
                effective: quota,
                short: None,
                default_completion: None,
                charged_at_arrival: false,
                utilization_high: None,
                upstream_limits: (None, None),
                window: Window::new(Instant::now(), SLOTS, SLOT),
                latest: Instant::now(),
                in_flight: 0,
                pending_tokens: 0,
                cooldown: None,
                marks: Marks::default(),
                reported: Reported::default(),
                retired: false,
            }),
            signal,
        })
    }

    /// A stable identity, for the queue's bookkeeping.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether `demand` fits now, and if not, when it could.
    pub fn outlook(&self, demand: Demand, now: Instant) -> Outlook {
        let mut state = self.state.lock();
        state.advance(now);
        let demand = demand.on(state.default_completion);
        state.outlook(demand, now)
    }

    /// The node's load if `demand` fits now.
    pub fn load_if_fits(&self, demand: Demand, now: Instant) -> Option<Load> {
        let mut state = self.state.lock();
        state.advance(now);
        let demand = demand.on(state.default_completion);
        (state.outlook(demand, now) == Outlook::Now).then(|| state.load())
    }

    /// Records `demand` and one request in flight if it fits now.
    pub fn try_reserve(self: &Arc<Self>, demand: Demand, now: Instant) -> Option<Reservation> {
        let mut state = self.state.lock();
        state.advance(now);
        let demand = demand.on(state.default_completion);
        if state.outlook(demand, now) != Outlook::Now {
            return None;
        }
        Some(self.record_locked(state, demand))
    }

    /// Records `demand` whatever the local outlook: the limits shared
    /// through Redis admitted it. This replica's window keeps
    /// counting its own requests, for `/status` and for the fallback.
    pub fn record(self: &Arc<Self>, demand: Demand, now: Instant) -> Reservation {
        let mut state = self.state.lock();
        state.advance(now);
        let demand = demand.on(state.default_completion);
        self.record_locked(state, demand)
    }

    fn record_locked(
        self: &Arc<Self>,
        mut state: parking_lot::MutexGuard<'_, LimiterState>,
        demand: Demand,
    ) -> Reservation {
        let at = state.latest;
        state.add(
            at,
            Amounts {
                requests: 1,
                tokens: demand.tokens,
                bytes: demand.bytes,
            },
        );
        state.in_flight += 1;
        state.pending_tokens = state.pending_tokens.saturating_add(demand.tokens);
        state.marks.requests += 1;
        state.marks.tokens = state.marks.tokens.saturating_add(demand.tokens);
        state.reported.take(demand.tokens);
        let mark = state.marks;
        drop(state);
        Reservation {
            usage: Arc::clone(self),
            at,
            demand,
            mark,
            open: true,
        }
    }

    /// Keeps the node out of rotation until `until`. A later call extends
    /// the rest, never shortens it; the reason of the longer rest is kept.
    pub fn cool_down(&self, until: Instant, reason: CooldownReason) {
        let mut state = self.state.lock();
        if state.cooldown.is_none_or(|(t, _)| until > t) {
            state.cooldown = Some((until, reason));
        }
    }

    /// The node is another deployment or key now (a reload changed its URL
    /// or key): the rest its old upstream asked for no longer applies.
    pub fn clear_cooldown(&self) {
        self.state.lock().cooldown = None;
    }

    /// The node left the config: it takes no new reservation and finishes
    /// what it has. Its window is kept in case it comes back.
    pub fn retire(&self) {
        self.state.lock().retired = true;
        // Waiters blocked on it must look elsewhere.
        self.signal.freed();
    }

    /// The node is in the config again, with its window intact.
    pub fn revive(&self) {
        self.state.lock().retired = false;
        self.signal.freed();
    }

    /// Whether forgetting this usage could lose anything: nothing in flight
    /// and nothing left in its window.
    pub fn is_idle(&self, now: Instant) -> bool {
        let mut state = self.state.lock();
        state.advance(now);
        state.in_flight == 0 && state.window.total == Amounts::default()
    }

    /// Requests and tokens: (limit in force, used in the window, when all
    /// of that use has expired); `None` for a dimension without a limit.
    /// For the `x-ratelimit-*` headers a client gets.
    pub fn headroom(&self, now: Instant) -> [Option<(u64, u64, Option<Instant>)>; 2] {
        let mut state = self.state.lock();
        state.advance(now);
        [Limit::Rpm, Limit::Tpm].map(|limit| {
            let quota = state.effective.of(limit)?;
            Some((
                quota,
                state.window.total.of(limit),
                state.window.empty_at(limit),
            ))
        })
    }

    /// The quota in force: the configured one, lowered to what the
    /// upstream reports where that is lower.
    pub fn quota_in_force(&self) -> Quota {
        self.state.lock().effective
    }

    /// The concurrency limit in force and the requests in flight, read
    /// under one lock (nothing advanced, nothing built).
    pub fn concurrency(&self) -> (Option<std::num::NonZeroU64>, u64) {
        let state = self.state.lock();
        (state.effective.max_concurrency, state.in_flight)
    }

    /// The quota as configured.
    pub fn configured_quota(&self) -> Quota {
        self.state.lock().quota
    }

    /// The terms `demand` is admitted on here, for the limits shared
    /// through Redis: one lock for all of them.
    pub fn terms(&self, demand: Demand) -> Terms {
        let state = self.state.lock();
        let part = |q: Option<NonZeroU64>| {
            q.and_then(|q| NonZeroU64::new(share::part_of(q.get(), demand.usable)))
        };
        let q = state.effective;
        Terms {
            // What the request's class may use of each limit.
            quota: Quota {
                rpm: part(q.rpm),
                tpm: part(q.tpm),
                bpm: part(q.bpm),
                max_concurrency: part(q.max_concurrency),
            },
            tokens: demand.on(state.default_completion).tokens,
            window: state.short.as_ref().map_or(WINDOW, |s| s.span),
            charged_at_arrival: state.charged_at_arrival,
        }
    }

    /// Applies what a node's config sets (on start and on every reload),
    /// without resetting the window: its quota (what the upstream reported
    /// is forgotten until it reports again), its short window, how its
    /// upstream charges, and its default completion.
    pub fn apply(&self, limits: &NodeLimits) {
        let mut state = self.state.lock();
        state.quota = limits.quota;
        state.upstream_limits = (None, None);
        state.effective = limits.quota;
        let span = limits.window.min(WINDOW);
        if state.short.as_ref().map_or(WINDOW, |s| s.span) != span {
            state.short = (span < WINDOW).then(|| Short::new(span, &state.window));
        }
        state.charged_at_arrival = limits.charged_at_arrival;
        state.default_completion = limits.default_completion;
        state.utilization_high = limits.utilization_high;
        drop(state);
        self.signal.freed();
    }

    /// Applies a changed quota (a client's, on a change of its limits)
    /// without resetting the window.
    pub fn set_quota(&self, quota: Quota) {
        let mut state = self.state.lock();
        state.quota = quota;
        state.upstream_limits = (None, None);
        state.effective = quota;
        drop(state);
        self.signal.freed();
    }

    /// A point-in-time view for `/status`.
    pub fn snapshot(&self, now: Instant) -> LimiterSnapshot {
        let mut state = self.state.lock();
        state.advance(now);
        LimiterSnapshot {
            quota: state.quota,
            upstream_limits: state.upstream_limits,
            requests: state.window.total.requests,
            tokens: state.window.total.tokens,
            bytes: state.window.total.bytes,
            in_flight: state.in_flight,
            pending_tokens: state.pending_tokens,
            cooldown: state
                .cooldown
                .map(|(t, reason)| (t.saturating_duration_since(now), reason))
                .filter(|(d, _)| !d.is_zero()),
            reported: state.reported,
            retired: state.retired,
            short: state.short.as_ref().map(|short| {
                let allot = |limit| state.effective.of(limit).map(|q| short.allotment(q));
                let used = &short.window.total;
                ShortUse {
                    span: short.span,
                    requests: (allot(Limit::Rpm), used.requests),
                    tokens: (allot(Limit::Tpm), used.tokens),
                    bytes: (allot(Limit::Bpm), used.bytes),
                }
            }),
        }
    }
}

impl LimiterState {
    /// Lowers the quota in force to the limits the upstream reports, where
    /// they are below the configured ones; returns them if that changed.
    fn take_upstream_limits(
        &mut self,
        report: &RateLimitReport,
    ) -> Option<(Option<u64>, Option<u64>)> {
        // A report decides: below the quota it is in force, at or above it
        // lifts an earlier one; no report keeps what was.
        let decide = |reported: Option<u64>, configured: Option<NonZeroU64>, current| match reported
        {
            None => current,
            Some(reported) => {
                NonZeroU64::new(reported).filter(|r| configured.is_none_or(|c| *r < c))
            }
        };
        let limits = (
            decide(
                report.limit_requests,
                self.quota.rpm,
                self.upstream_limits.0,
            ),
            decide(report.limit_tokens, self.quota.tpm, self.upstream_limits.1),
        );
        if limits == self.upstream_limits {
            return None;
        }
        self.upstream_limits = limits;
        self.effective = Quota {
            rpm: limits.0.or(self.quota.rpm),
            tpm: limits.1.or(self.quota.tpm),
            ..self.quota
        };
        Some((limits.0.map(u64::from), limits.1.map(u64::from)))
    }

    /// What the upstream's remaining counts are out of, when it does not
    /// say: the quota in force over the node's window.
    fn counted(&self) -> Counted {
        let over = |limit| {
            let quota = self.effective.of(limit)?;
            Some(self.short.as_ref().map_or(quota, |s| s.allotment(quota)))
        };
        Counted {
            rpm: over(Limit::Rpm),
            tpm: over(Limit::Tpm),
            over: self.short.as_ref().map_or(WINDOW, |s| s.span),
        }
    }

    /// Adds to the slot holding `at`, in the minute and the short window.
    fn add(&mut self, at: Instant, amounts: Amounts) {
        self.window.add(self.window.slot_of(at), amounts);
        if let Some(short) = &mut self.short {
            short.window.add(short.window.slot_of(at), amounts);
        }
    }

    /// Takes from the slot holding `at`, in the minute and the short window.
    fn sub(&mut self, at: Instant, amounts: Amounts) {
        self.window.sub(self.window.slot_of(at), amounts);
        if let Some(short) = &mut self.short {
            short.window.sub(short.window.slot_of(at), amounts);
        }
    }

    fn advance(&mut self, now: Instant) {
        // Callers' clocks are read before the lock: time never steps back.
        self.latest = self.latest.max(now);
        let now = self.latest;
        self.window.advance(self.window.slot_of(now));
        if let Some(short) = &mut self.short {
            short.window.advance(short.window.slot_of(now));
        }
        if self.cooldown.is_some_and(|(t, _)| t <= now) {
            self.cooldown = None;
        }
        self.reported.expire(now);
    }

    fn outlook(&self, demand: Demand, now: Instant) -> Outlook {
        if self.retired {
            return Outlook::Retired;
        }
        let cooldown = self.cooldown.map(|(t, _)| t).filter(|t| *t > now);
        let reported = self.reported.blocked_until(demand.tokens, now);
        let mut wait_until = cooldown.max(reported);
        for limit in [Limit::Rpm, Limit::Tpm, Limit::Bpm] {
            let Some(quota) = self.effective.of(limit) else {
                continue;
            };
            let wanted = demand.of(limit);
            if wanted > quota {
                return Outlook::Never(limit);
            }
            // What the request's class may use: the quota less what the
            // classes above it keep.
            let quota = share::part_of(quota, demand.usable);
            let used = self.window.total.of(limit);
            let after = used.saturating_add(wanted);
            if after > quota {
                // A limit can be over-used (actual usage above the reservation,
                // response bytes); then the slots must free more than `wanted`.
                let at = self
                    .window
                    .freed_at(after - quota, limit)
                    .unwrap_or(now + WINDOW);
                wait_until = Some(wait_until.map_or(at, |t| t.max(at)));
            }
            if let Some(at) = self.short_wait(limit, quota, wanted) {
                wait_until = Some(wait_until.map_or(at, |t| t.max(at)));
            }
        }
        let concurrency_full = self
            .effective
            .max_concurrency
            .is_some_and(|max| self.in_flight >= share::part_of(u64::from(max), demand.usable));
        match (wait_until, concurrency_full) {
            (Some(at), _) => Outlook::At(at),
            (None, true) => Outlook::OnRelease,
            (None, false) => Outlook::Now,
        }
    }

    /// When the short window has room for `wanted` of `limit` (under the
    /// per-minute `quota`), if it has none now. A demand above the
    /// allotment fits an empty short window: the minute still bounds it.
    fn short_wait(&self, limit: Limit, quota: u64, wanted: u64) -> Option<Instant> {
        let short = self.short.as_ref()?;
        let allotment = short.allotment(quota);
        let used = short.window.total.of(limit);
        let after = used.saturating_add(wanted);
        if used == 0 || after <= allotment {
            return None;
        }
        let need = (after - allotment).min(used);
        Some(
            short
                .window
                .freed_at(need, limit)
                .unwrap_or_else(|| short.window.expiry_of(short.window.head)),
        )
    }

    fn load(&self) -> Load {
        fn ppm(used: u64, quota: Option<std::num::NonZeroU64>) -> u32 {
            quota.map_or(0, |q| {
                (used.saturating_mul(1_000_000) / u64::from(q)).min(u64::from(u32::MAX)) as u32
            })
        }
        let q = &self.effective;
        let t = &self.window.total;
        let mut utilisation_ppm = ppm(t.requests, q.rpm)
            .max(ppm(t.tokens, q.tpm))
            .max(ppm(t.bytes, q.bpm))
            .max(ppm(self.in_flight, q.max_concurrency));
        if let Some(short) = &self.short {
            let allot =
                |q: Option<NonZeroU64>| q.and_then(|q| NonZeroU64::new(short.allotment(q.get())));
            let s = &short.window.total;
            utilisation_ppm = utilisation_ppm
                .max(ppm(s.requests, allot(q.rpm)))
                .max(ppm(s.tokens, allot(q.tpm)))
                .max(ppm(s.bytes, allot(q.bpm)));
        }
        Load {
            utilisation_ppm,
            in_flight: self.in_flight,
        }
    }
}

/// What a request is admitted on at one node: the quota in force, the
/// tokens it reserves there, the span the quota is also held over (the
/// minute when the node has no shorter one), and whether the upstream
/// charges the reservation at arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    pub quota: Quota,
    pub tokens: u64,
    pub window: Duration,
    pub charged_at_arrival: bool,
}

/// What `/status` shows of a node's usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimiterSnapshot {
    /// As configured.
    pub quota: Quota,
    /// The upstream's (rpm, tpm) limits, where they are below the quota
    /// (and in force).
    pub upstream_limits: (Option<NonZeroU64>, Option<NonZeroU64>),
    pub requests: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub in_flight: u64,
    pub pending_tokens: u64,
    pub cooldown: Option<(Duration, CooldownReason)>,
    /// What the upstream last said remains, until its reset.
    pub reported: Reported,
    pub retired: bool,
    /// The short window's use, with `nodes[].window` below the minute.
    pub short: Option<ShortUse>,
}

/// A short window's (allotment, used) per limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShortUse {
    pub span: Duration,
    pub requests: (Option<u64>, u64),
    pub tokens: (Option<u64>, u64),
    pub bytes: (Option<u64>, u64),
}

/// Capacity taken on one node for one request.
///
/// Dropping it ends the request: the in-flight slot and the outstanding token
/// reservation are released exactly once, on every path. What stays in the
/// window depends on how it ended:
/// - [`settle`](Self::settle): tokens corrected to what the request used;
/// - [`cancel`](Self::cancel): nothing reached the upstream, all is returned;
/// - plain drop: the reservation stays counted in full (we cannot know what
///   the upstream consumed, so we assume the most).
#[derive(Debug)]
pub struct Reservation {
    usage: Arc<Limiter>,
    /// When it was recorded: its slot in each window.
    at: Instant,
    demand: Demand,
    /// The node's marks right after this reservation.
    mark: Marks,
    open: bool,
}

impl Reservation {
    pub fn demand(&self) -> Demand {
        self.demand
    }

    /// Counts response bytes against the node's bpm as they flow.
    pub fn record_response_bytes(&self, bytes: u64) {
        let mut state = self.usage.state.lock();
        state.advance(Instant::now());
        let now = state.latest;
        state.add(
            now,
            Amounts {
                bytes,
                ..Amounts::default()
            },
        );
    }

    /// Takes the upstream's word on the node's quota from the answer to
    /// this request (the `reported` module explains the arithmetic).
    /// Returns the (rpm, tpm) limits the upstream reports where they are
    /// newly in force, below the configured quota (to be logged once).
    pub fn observe_upstream(&self, report: &RateLimitReport) -> Option<(Option<u64>, Option<u64>)> {
        let mut state = self.usage.state.lock();
        let lowered = state.take_upstream_limits(report);
        if report.remaining_requests.is_none() && report.remaining_tokens.is_none() {
            return lowered;
        }
        let now = Instant::now();
        let marks = state.marks;
        let counted = state.counted();
        state
            .reported
            .observe(report, self.mark, marks, counted, now);
        drop(state);
        // A later reset may let waiters through sooner; a lower count only
        // holds them back, which the next pass sees.
        self.usage.signal.freed();
        lowered
    }

    /// Ends the request having used `tokens` in all (prompt + completion);
    /// on an upstream that charges at arrival, at least what was reserved.
    pub fn settle(mut self, tokens: u64) {
        let reserved = self.demand.tokens;
        let mut state = self.usage.state.lock();
        state.advance(Instant::now());
        let tokens = if state.charged_at_arrival {
            tokens.max(reserved)
        } else {
            tokens
        };
        if tokens < reserved {
            let unused = Amounts {
                tokens: reserved - tokens,
                ..Amounts::default()
            };
            state.sub(self.at, unused);
        } else if tokens > reserved {
            let extra = Amounts {
                tokens: tokens - reserved,
                ..Amounts::default()
            };
            state.add(self.at, extra);
        }
        Self::release(&mut self.open, self.demand, &self.usage, &mut state);
    }

    /// Ends a request that never reached the upstream (it could not connect).
    pub fn cancel(mut self) {
        let mut state = self.usage.state.lock();
        state.advance(Instant::now());
        let everything = Amounts {
            requests: 1,
            tokens: self.demand.tokens,
            bytes: self.demand.bytes,
        };
        state.sub(self.at, everything);
        state.reported.give_back(self.demand.tokens);
        Self::release(&mut self.open, self.demand, &self.usage, &mut state);
    }

    /// Gives back the in-flight slot and the outstanding reservation, once.
    fn release(open: &mut bool, demand: Demand, usage: &Limiter, state: &mut LimiterState) {
        if !std::mem::take(open) {
            return;
        }
        state.in_flight = state.in_flight.saturating_sub(1);
        state.pending_tokens = state.pending_tokens.saturating_sub(demand.tokens);
        usage.signal.freed();
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.open {
            let usage = Arc::clone(&self.usage);
            let mut state = usage.state.lock();
            Self::release(&mut self.open, self.demand, &self.usage, &mut state);
        }
    }
}

mod provisioned;
#[cfg(test)]
mod tests;
