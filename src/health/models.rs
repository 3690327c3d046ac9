//! The models a node is out of rotation for. A node whose failures for one
//! model were its own (its key may not use the model, its deployment of it
//! is broken) stops getting that model and keeps serving the others.
//!
//! Invariants: only failures judged the node's (the same request then
//! succeeded on another node) are recorded here; a success for a model
//! clears its record; a model out comes back on trial when its backoff
//! ends (doubling with each ejection in a row, up to
//! `health.eject_backoff_max`), and a failure on trial takes it out again
//! at once; a reload that changes the node's key or models clears every
//! record. The request path reads one atomic while no record exists. At
//! most [`MAX_RECORDS`] models are recorded per node (a client's made-up
//! names cannot grow it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::HealthSettings;

/// Models recorded per node at most.
pub(crate) const MAX_RECORDS: usize = 256;

#[derive(Debug, Default)]
struct Record {
    /// Failures judged the node's, in a row.
    failures: u32,
    /// Ejections in a row: the backoff's exponent.
    ejections: u32,
    /// Out since a failure, and why, until when.
    out: Option<(&'static str, Instant)>,
}

/// A model a node is out for, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelOut {
    pub(crate) model: String,
    /// The kind of failure: `key_refused`, `server_error`, `timeout`...
    pub(crate) reason: &'static str,
    /// Until it is tried again; zero once it is on trial.
    pub(crate) back_in: Duration,
}

/// One node's records, by model.
#[derive(Debug, Default)]
pub(crate) struct ModelRecords {
    /// Some record exists: the request path locks only then.
    any: AtomicBool,
    records: Mutex<HashMap<Box<str>, Record>>,
}

impl ModelRecords {
    /// Whether the node may get requests for `model` now: not out for it,
    /// or its backoff has ended (on trial).
    pub(crate) fn serves(&self, model: &str, now: Instant) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return true;
        }
        let records = self.records.lock();
        let out = records.get(model).and_then(|r| r.out);
        out.is_none_or(|(_, until)| until <= now)
    }

    /// The node served `model`: its record goes.
    pub(crate) fn succeeded(&self, model: &str) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut records = self.records.lock();
        records.remove(model);
        self.any.store(!records.is_empty(), Ordering::Release);
    }

    /// A failure for `model` judged the node's (`reason`: its kind). The
    /// backoff when this takes the model out.
    pub(crate) fn failed(
        &self,
        model: &str,
        reason: &'static str,
        settings: &HealthSettings,
        now: Instant,
    ) -> Option<Duration> {
        let mut records = self.records.lock();
        if !records.contains_key(model) && records.len() >= MAX_RECORDS {
            return None;
        }
        let record = records.entry(model.into()).or_default();
        self.any.store(true, Ordering::Release);
        record.failures = record.failures.saturating_add(1);
        let on_trial = record.out.is_some_and(|(_, until)| until <= now);
        let out = record.out.is_some_and(|(_, until)| until > now);
        if out || (!on_trial && record.failures < settings.eject_after.get()) {
            return None;
        }
        let backoff = settings
            .eject_backoff
            .saturating_mul(1 << record.ejections.min(16))
            .min(settings.eject_backoff_max);
        record.ejections += 1;
        record.out = Some((reason, now + backoff));
        Some(backoff)
    }

    /// A reload changed the node's key or models: every record goes.
    pub(crate) fn clear(&self) {
        self.records.lock().clear();
        self.any.store(false, Ordering::Release);
    }

    /// The models the node is out for (or on trial for), by name.
    pub(crate) fn outs(&self, now: Instant) -> Vec<ModelOut> {
        if !self.any.load(Ordering::Acquire) {
            return Vec::new();
        }
        let records = self.records.lock();
        let mut outs: Vec<ModelOut> = records
            .iter()
            .filter_map(|(model, record)| {
                let (reason, until) = record.out?;
                Some(ModelOut {
                    model: model.to_string(),
                    reason,
                    back_in: until.saturating_duration_since(now),
                })
            })
            .collect();
        outs.sort_by(|a, b| a.model.cmp(&b.model));
        outs
    }
}
