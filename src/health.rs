//! Whether a node is in rotation, and why not: active probes, passive
//! ejection by real traffic, and keys the upstream refuses.
//!
//! A node is in one [`Condition`]:
//! - `Healthy`: in rotation.
//! - `Unhealthy`: `health.unhealthy_after` probes in a row failed; probed
//!   every `health.interval`, back after `health.healthy_after` successes.
//! - `Ejected`: `health.eject_after` requests in a row failed (no
//!   connection, no answer in time, 5xx). Re-probed after a backoff that
//!   doubles with each ejection in a row (up to `health.eject_backoff_max`);
//!   one good probe brings it back. With probes off, it comes back on trial
//!   when the backoff ends.
//! - `KeyRefused`: the upstream answered 401/403 to the node's key. Out of
//!   rotation until a reload brings a different key.
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
    /// No connection, no answer in time, or a 5xx; the text says which.
    Failed(String),
    /// 401 or 403 to the node's key.
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
            }),
            wake,
            headroom,
        })
    }

    /// Whether requests may go to this node. One atomic load.
    pub fn in_rotation(&self) -> bool {
        self.in_rotation.load(Ordering::Acquire)
    }

    /// A reload gave the node `key`. A node out for a refused key comes back
    /// if the key is a different one.
    pub fn set_key(&self, key: NodeKey) {
        let mut state = self.state.lock();
        let changed = !state.key.same_as(&key);
        state.key = key;
        if changed && matches!(state.condition, Condition::KeyRefused { .. }) {
            tracing::info!(node = %self.name, "node key changed by reload; back in rotation");
            self.set(&mut state, Condition::Healthy);
            state.next_probe = Some(Instant::now());
            drop(state);
            self.wake.notify_one();
        }
    }

    /// Applies what a real request saw. `key` is the key that request used:
    /// a refusal of an older key (a request that began before a reload) says
    /// nothing about the current one.
    pub fn on_request(&self, verdict: Verdict, key: &NodeKey, settings: &HealthSettings) {
        if verdict == Verdict::Answered && self.clean.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.state.lock();
        match verdict {
            Verdict::Answered => {
                state.traffic_failures = 0;
                state.ejections = 0;
                self.clean.store(true, Ordering::Release);
            }
            Verdict::KeyRefused(status) => {
                if state.key.same_as(key) {
                    self.refuse_key(&mut state, status, "a request");
                }
            }
            Verdict::Failed(why) => {
                self.clean.store(false, Ordering::Release);
                state.traffic_failures += 1;
                if state.traffic_failures >= settings.eject_after.get()
                    && state.condition == Condition::Healthy
                {
                    let failures = state.traffic_failures;
                    self.eject(
                        &mut state,
                        settings,
                        &format!("{failures} requests in a row failed (last: {why})"),
                    );
                    drop(state);
                    self.wake.notify_one();
                }
            }
        }
    }

    /// Applies a probe's verdict.
    pub fn on_probe(&self, verdict: Verdict, settings: &HealthSettings, path: &str) {
        let now = Instant::now();
        let mut state = self.state.lock();
        state.next_probe = settings.enabled.then(|| now + settings.interval);
        match verdict {
            Verdict::Answered => {
                state.last_probe = Some((now, Ok(())));
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
            Verdict::Failed(why) => {
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
mod tests {
    use secrecy::SecretString;

    use super::*;

    fn key(text: &str) -> NodeKey {
        NodeKey::new(SecretString::from(text.to_owned())).unwrap()
    }

    fn settings() -> HealthSettings {
        let n = |v: u32| std::num::NonZeroU32::new(v).unwrap();
        HealthSettings {
            unhealthy_after: n(2),
            healthy_after: n(2),
            eject_after: n(3),
            ..HealthSettings::default()
        }
    }

    fn failed() -> Verdict {
        Verdict::Failed("could not connect".to_owned())
    }

    #[tokio::test(start_paused = true)]
    async fn failing_probes_take_a_node_out_and_successes_bring_it_back() {
        let s = settings();
        let h = NodeHealth::new(Arc::from("n"), key("k"), Arc::default(), Arc::default());
        h.on_probe(failed(), &s, "/models");
        assert!(h.in_rotation(), "one failure is not enough");
        h.on_probe(failed(), &s, "/models");
        assert!(!h.in_rotation());
        let reason = h.snapshot(Instant::now()).condition;
        assert!(
            reason
                .reason()
                .unwrap()
                .contains("2 probes GET /models in a row failed")
        );
        h.on_probe(Verdict::Answered, &s, "/models");
        assert!(!h.in_rotation(), "healthy_after is 2");
        h.on_probe(Verdict::Answered, &s, "/models");
        assert!(h.in_rotation());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_requests_in_a_row_eject_with_a_doubling_backoff() {
        let s = settings();
        let h = NodeHealth::new(Arc::from("n"), key("k"), Arc::default(), Arc::default());
        h.on_request(failed(), &key("k"), &s);
        h.on_request(Verdict::Answered, &key("k"), &s);
        h.on_request(failed(), &key("k"), &s);
        h.on_request(failed(), &key("k"), &s);
        assert!(h.in_rotation(), "the good answer broke the run");
        h.on_request(failed(), &key("k"), &s);
        assert!(!h.in_rotation());
        let first = h.snapshot(Instant::now()).next_probe_in.unwrap();
        assert_eq!(first, s.eject_backoff);
        // The re-probe fails: the next one waits twice as long.
        h.on_probe(failed(), &s, "/models");
        let second = h.snapshot(Instant::now()).next_probe_in.unwrap();
        assert_eq!(second, s.eject_backoff * 2);
        h.on_probe(Verdict::Answered, &s, "/models");
        assert!(h.in_rotation());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_key_stays_out_until_the_key_changes() {
        let s = settings();
        let h = NodeHealth::new(Arc::from("n"), key("old"), Arc::default(), Arc::default());
        // A request that still used an older key says nothing of this one.
        h.on_request(
            Verdict::KeyRefused(StatusCode::UNAUTHORIZED),
            &key("older"),
            &s,
        );
        assert!(h.in_rotation());
        h.on_request(
            Verdict::KeyRefused(StatusCode::UNAUTHORIZED),
            &key("old"),
            &s,
        );
        assert!(!h.in_rotation());
        assert_eq!(h.snapshot(Instant::now()).condition.name(), "key_refused");
        h.on_probe(Verdict::Answered, &s, "/models");
        h.set_key(key("old"));
        assert!(!h.in_rotation(), "the same key again changes nothing");
        h.set_key(key("new"));
        assert!(h.in_rotation());
    }
}
