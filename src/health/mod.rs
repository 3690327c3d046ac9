//! Whether a node is in rotation, and why not: active probes, passive
//! ejection by real traffic, and keys the upstream refuses.
//!
//! A node is in one [`Condition`]:
//! - `Healthy`: in rotation.
//! - `Unhealthy`: `health.unhealthy_after` probes in a row failed; probed
//!   every `health.interval`, back after `health.healthy_after` successes.
//! - `Ejected`: `health.eject_after` requests in a row failed. Re-probed
//!   after a backoff that doubles with each ejection in a row (up to
//!   `health.eject_backoff_max`); one good probe brings it back. With
//!   probes off, it comes back on trial when the backoff ends.
//! - `KeyRefused`: the upstream refused the node's key (401/403) to a
//!   probe. Out of rotation until a reload brings a different key.
//!
//! A client can shape what its request gets back (a 5xx, a timeout, a
//! 401 for a header it sent), so what a request saw counts against a node
//! only on evidence that it was the node's: the same request then
//! succeeded on another node (the proxy judges, [`NodeHealth::failed`]),
//! or, for a 401/403, a probe with the node's key alone is refused too
//! ([`crate::probes::key_refused`]). A failure every node tried shares is
//! the request's own and counts against none.
//!
//! A failure judged the node's counts twice: for the node (ejected at
//! `health.eject_after` in a row, reset by any success on it) and for the
//! model asked for ([`models`]: out for that model alone at
//! `health.eject_after` in a row for it). A node that fails for one model
//! and serves others keeps serving them; one that fails for everything it
//! is asked leaves rotation.
//!
//! This module is the state machine; [`crate::probes`] sends the probes.
//!
//! Invariants: probes never run on the request path and take nothing from a
//! node's limits; `in_rotation` is one atomic load on the request path; the
//! state survives reloads (kept by node name, like the limit windows), so a
//! reload neither readmits a failing node nor forgets a refused key, unless
//! the key changed.
//!
//! Cooldowns after 429 are not here: a rate-limited node is healthy, only
//! busy, and the limits module keeps its rest.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::HealthSettings;
use crate::keys::NodeKey;
use crate::limits::HeadroomSignal;
use models::ModelRecords;

/// Where a node stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Healthy,
    Unhealthy { reason: String },
    Ejected { reason: String, until: Instant },
    KeyRefused { reason: String },
}

impl Condition {
    pub fn name(&self) -> &'static str {
        match self {
            Condition::Healthy => "healthy",
            Condition::Unhealthy { .. } => "unhealthy",
            Condition::Ejected { .. } => "ejected",
            Condition::KeyRefused { .. } => "key_refused",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Condition::Healthy => None,
            Condition::Unhealthy { reason }
            | Condition::Ejected { reason, .. }
            | Condition::KeyRefused { reason } => Some(reason),
        }
    }
}

/// What one probe or one request told us about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It answered, and not with a 5xx or a refused key.
    Answered,
    /// No answer in time, a broken connection, or a 5xx; the text says
    /// which. From a request, the client may have caused it.
    Failed(String),
    /// No connection could be made: nothing a client could cause.
    Unreachable(String),
    /// 401 or 403. From a probe, the node's key is refused; from a
    /// request, perhaps only what the client sent.
    KeyRefused(StatusCode),
}

impl Verdict {
    /// The verdict of an HTTP answer with `status`.
    pub fn of_status(status: StatusCode) -> Self {
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            Verdict::KeyRefused(status)
        } else if status.is_server_error() {
            Verdict::Failed(format!("answered {status}"))
        } else {
            Verdict::Answered
        }
    }
}

/// After a probe accepted the node's key, a request's 401/403 is taken as
/// the client's own for this long without probing again: a client sending
/// a header the upstream refuses cannot make the gateway probe for each of
/// its requests.
pub(crate) const KEY_CONFIRMED_FOR: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct HealthState {
    condition: Condition,
    probe_failures: u32,
    probe_successes: u32,
    traffic_failures: u32,
    /// Ejections in a row without a good answer in between: the backoff's exponent.
    ejections: u32,
    /// When the next probe is due; `None` when none is planned.
    next_probe: Option<Instant>,
    last_probe: Option<(Instant, Result<(), String>)>,
    /// The key the node uses now, to tell whether a refusal is about it.
    key: NodeKey,
    /// When a probe last had the key accepted.
    key_accepted_at: Option<Instant>,
}

/// A node's health. Kept by node name across reloads.
#[derive(Debug)]
pub struct NodeHealth {
    /// For log lines.
    name: Arc<str>,
    in_rotation: AtomicBool,
    /// No failed request since the last good one and no ejection in a row:
    /// a good answer then changes nothing, and skips the lock.
    clean: AtomicBool,
    state: Mutex<HealthState>,
    /// Wakes the probe task when a node needs a probe sooner.
    wake: Arc<Notify>,
    /// Wakes the queue when the node comes back: waiters may go to it now.
    headroom: Arc<HeadroomSignal>,
    /// A probe of the key is under way (one at a time).
    checking_key: AtomicBool,
    /// The models it is out for.
    models: ModelRecords,
}

pub(crate) mod models;
pub(crate) mod streak;

pub(crate) use models::ModelOut;
pub(crate) use streak::FailureStreak;

/// What a failure judged a node's took out of rotation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ejected {
    /// The node, for every model.
    pub node: bool,
    /// The node, for the model asked for.
    pub model: bool,
}

/// What `/status` shows of a node's health.
#[derive(Debug, Clone)]
pub struct HealthSnapshot {
    pub condition: Condition,
    pub probe_failures: u32,
    pub traffic_failures: u32,
    pub last_probe: Option<(Duration, Result<(), String>)>,
    pub next_probe_in: Option<Duration>,
}

impl NodeHealth {
    /// A new node: in rotation, probed at once.
    pub fn new(
        name: Arc<str>,
        key: NodeKey,
        wake: Arc<Notify>,
        headroom: Arc<HeadroomSignal>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            in_rotation: AtomicBool::new(true),
            clean: AtomicBool::new(true),
            state: Mutex::new(HealthState {
                condition: Condition::Healthy,
                probe_failures: 0,
                probe_successes: 0,
                traffic_failures: 0,
                ejections: 0,
                next_probe: Some(Instant::now()),
                last_probe: None,
                key,
                key_accepted_at: None,
            }),
            models: ModelRecords::default(),
            wake,
            headroom,
            checking_key: AtomicBool::new(false),
        })
    }

    /// Whether requests may go to this node. One atomic load.
    pub fn in_rotation(&self) -> bool {
        self.in_rotation.load(Ordering::Acquire)
    }

    /// A reload gave the node `key`. A node out for a refused key comes back
    /// if the key is a different one.
    /// Whether `key` is the key this node's health was judged with.
    pub fn has_key(&self, key: &NodeKey) -> bool {
        self.state.lock().key.same_as(key)
    }

    pub fn set_key(&self, key: NodeKey) {
        let mut state = self.state.lock();
        let changed = !state.key.same_as(&key);
        state.key = key;
        if changed {
            self.models.clear();
        }
        if changed && matches!(state.condition, Condition::KeyRefused { .. }) {
            tracing::info!(node = %self.name, "node key changed by reload; back in rotation");
            self.set(&mut state, Condition::Healthy);
            state.next_probe = Some(Instant::now());
            drop(state);
            self.wake.notify_one();
        }
    }

    /// Whether requests for `model` may go to this node now (it is not
    /// out for that model, or is on trial for it).
    pub fn serves(&self, model: &str, now: Instant) -> bool {
        self.models.serves(model, now)
    }

    /// The models this node is out for, for `/status`.
    pub(crate) fn models_out(&self, now: Instant) -> Vec<ModelOut> {
        self.models.outs(now)
    }

    /// A reload changed the models the node lists: every model it was out
    /// for is back.
    pub fn models_changed(&self) {
        self.models.clear();
    }

    /// The node answered a request (for `model`): its failures in a row
    /// end, for the node and for the model.
    pub fn answered(&self, model: Option<&str>) {
        if let Some(model) = model {
            self.models.succeeded(model);
        }
        if self.clean.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.state.lock();
        state.traffic_failures = 0;
        state.ejections = 0;
        self.clean.store(true, Ordering::Release);
    }

    /// A request's failure on this node, judged the node's (the same
    /// request succeeded elsewhere): counted for the node and for `model`;
    /// `reason` is its kind (`server_error`, `timeout`, ...). What it took
    /// out of rotation.
    pub fn failed(
        &self,
        verdict: Verdict,
        model: Option<&str>,
        reason: &'static str,
        settings: &HealthSettings,
    ) -> Ejected {
        // A refused connection fails every model alike: the node's alone.
        let model = model.filter(|_| !matches!(verdict, Verdict::Unreachable(_)));
        let model_out = model.and_then(|model| {
            let backoff = self.models.failed(model, reason, settings, Instant::now())?;
            tracing::warn!(node = %self.name, model, reason, backoff = %human(backoff), "node out of rotation for a model");
            Some(())
        });
        let was_in = self.in_rotation();
        self.on_request(verdict, settings);
        Ejected {
            node: was_in && !self.in_rotation(),
            model: model_out.is_some(),
        }
    }

    /// Applies a request's outcome to the node's own count: a success
    /// ends the run of failures; a failure judged the node's counts, and
    /// `health.eject_after` in a row eject it.
    pub fn on_request(&self, verdict: Verdict, settings: &HealthSettings) {
        let why = match verdict {
            Verdict::Answered => return self.answered(None),
            Verdict::KeyRefused(status) => format!("answered {status}"),
            Verdict::Failed(why) | Verdict::Unreachable(why) => why,
        };
        let mut state = self.state.lock();
        self.clean.store(false, Ordering::Release);
        state.traffic_failures = state.traffic_failures.saturating_add(1);
        if state.traffic_failures < settings.eject_after.get()
            || state.condition != Condition::Healthy
        {
            return;
        }
        let reason = format!(
            "{} requests in a row failed here and succeeded elsewhere (last: {why})",
            state.traffic_failures
        );
        self.eject(&mut state, settings, &reason);
        drop(state);
        self.wake.notify_one();
    }

    /// Starts checking the key after a request's 401/403, unless a probe
    /// accepted it lately or a check is under way: `false` means the
    /// refusal is the client's own.
    pub(crate) fn begin_key_check(&self, now: Instant) -> bool {
        let accepted = self.state.lock().key_accepted_at;
        if accepted.is_some_and(|at| now.saturating_duration_since(at) < KEY_CONFIRMED_FOR) {
            return false;
        }
        !self.checking_key.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn end_key_check(&self) {
        self.checking_key.store(false, Ordering::Release);
    }

    /// Applies a probe's verdict.
    pub fn on_probe(&self, verdict: Verdict, settings: &HealthSettings, path: &str) {
        let now = Instant::now();
        let mut state = self.state.lock();
        state.next_probe = settings.enabled.then(|| now + settings.interval);
        match verdict {
            Verdict::Answered => {
                state.last_probe = Some((now, Ok(())));
                state.key_accepted_at = Some(now);
                state.probe_failures = 0;
                state.probe_successes += 1;
                match state.condition {
                    Condition::Ejected { .. } => {
                        state.traffic_failures = 0;
                        self.set(&mut state, Condition::Healthy);
                    }
                    Condition::Unhealthy { .. }
                        if state.probe_successes >= settings.healthy_after.get() =>
                    {
                        self.set(&mut state, Condition::Healthy);
                    }
                    _ => {}
                }
            }
            Verdict::KeyRefused(status) => {
                state.last_probe = Some((now, Err(format!("answered {status}"))));
                self.refuse_key(&mut state, status, &format!("probe GET {path}"));
            }
            Verdict::Failed(why) | Verdict::Unreachable(why) => {
                state.last_probe = Some((now, Err(why.clone())));
                state.probe_successes = 0;
                state.probe_failures += 1;
                match state.condition {
                    Condition::Ejected { .. } => {
                        self.eject(&mut state, settings, &format!("re-probe GET {path} {why}"));
                    }
                    Condition::Healthy
                        if state.probe_failures >= settings.unhealthy_after.get() =>
                    {
                        let reason = format!(
                            "{} probes GET {path} in a row failed (last: {why})",
                            state.probe_failures
                        );
                        self.set(&mut state, Condition::Unhealthy { reason });
                    }
                    Condition::Unhealthy { .. } => {
                        let reason = format!(
                            "{} probes GET {path} in a row failed (last: {why})",
                            state.probe_failures
                        );
                        state.condition = Condition::Unhealthy { reason };
                    }
                    _ => {}
                }
            }
        }
    }

    /// When the next probe (or trial re-admission) is due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.state.lock().next_probe
    }

    /// An ejected node whose backoff ended, with probes off: back on trial.
    pub(crate) fn readmit_on_trial(&self, settings: &HealthSettings) {
        let mut state = self.state.lock();
        state.next_probe = None;
        if matches!(state.condition, Condition::Ejected { .. }) {
            state.traffic_failures = settings.eject_after.get() - 1;
            self.set(&mut state, Condition::Healthy);
        }
    }

    /// The probe schedule after a reload: probes on or off, a new interval.
    pub(crate) fn reschedule(&self, settings: &HealthSettings, now: Instant) {
        let mut state = self.state.lock();
        state.next_probe = match &state.condition {
            Condition::Ejected { until, .. } => Some(*until),
            Condition::KeyRefused { .. } => None,
            _ if !settings.enabled => None,
            _ => Some(
                state
                    .next_probe
                    .map_or(now, |t| t.min(now + settings.interval)),
            ),
        };
    }

    pub fn snapshot(&self, now: Instant) -> HealthSnapshot {
        let state = self.state.lock();
        HealthSnapshot {
            condition: state.condition.clone(),
            probe_failures: state.probe_failures,
            traffic_failures: state.traffic_failures,
            last_probe: state
                .last_probe
                .clone()
                .map(|(at, result)| (now.saturating_duration_since(at), result)),
            next_probe_in: state.next_probe.map(|t| t.saturating_duration_since(now)),
        }
    }

    /// How long until this node may be back, for a `Retry-After`.
    pub fn back_in(&self, now: Instant, settings: &HealthSettings) -> Option<Duration> {
        let state = self.state.lock();
        match &state.condition {
            Condition::Healthy => Some(Duration::ZERO),
            Condition::Ejected { until, .. } => Some(until.saturating_duration_since(now)),
            Condition::Unhealthy { .. } => Some(settings.interval),
            Condition::KeyRefused { .. } => None,
        }
    }

    fn eject(&self, state: &mut HealthState, settings: &HealthSettings, why: &str) {
        let backoff = settings
            .eject_backoff
            .saturating_mul(1 << state.ejections.min(16))
            .min(settings.eject_backoff_max);
        state.ejections += 1;
        self.clean.store(false, Ordering::Release);
        let until = Instant::now() + backoff;
        let reason = format!("ejected: {why}; re-probe in {}", human(backoff));
        tracing::warn!(node = %self.name, reason, "node out of rotation");
        self.set(state, Condition::Ejected { reason, until });
        state.next_probe = Some(until);
    }

    fn refuse_key(&self, state: &mut HealthState, status: StatusCode, by: &str) {
        let reason = format!(
            "key refused: {by} was answered {status}; out of rotation until a reload changes the key"
        );
        if !matches!(state.condition, Condition::KeyRefused { .. }) {
            tracing::error!(node = %self.name, reason, "node out of rotation");
        }
        self.set(state, Condition::KeyRefused { reason });
        state.next_probe = None;
    }

    fn set(&self, state: &mut HealthState, condition: Condition) {
        let healthy = condition == Condition::Healthy;
        if healthy && state.condition != Condition::Healthy {
            // Logged here; the queue is woken once the state is stored.
            tracing::info!(node = %self.name, was = state.condition.name(), "node back in rotation");
        }
        if let Condition::Unhealthy { reason } = &condition {
            tracing::warn!(node = %self.name, reason, "node out of rotation");
        }
        let back = healthy && state.condition != Condition::Healthy;
        state.condition = condition;
        state.probe_successes = 0;
        self.in_rotation.store(healthy, Ordering::Release);
        if back {
            self.headroom.freed();
        }
    }
}

pub(crate) fn human(d: Duration) -> String {
    humantime_serde::re::humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests;
