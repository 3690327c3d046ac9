//! Hot reload: a changed config file or key file, or SIGHUP, re-reads the
//! config and swaps it in.
//!
//! A reload reads and validates the whole config again (every key file and
//! key variable included) and builds the new snapshot before anything
//! changes ([`AppState::swap`]); an invalid file leaves the running config in
//! force and logs every problem. What survives and what does not is
//! [`snapshot`](crate::snapshot)'s business: windows, in-flight counts, cooldowns
//! and health stay with nodes that stay.
//!
//! Every attempt, whatever triggered it, is recorded in `/status` and written
//! to the outcome file beside the pid file, which `balancer reload` reads to
//! report success or the validation error. Neither ever holds a key: the
//! validation messages name fields, variables and files, not their contents.
//!
//! The watcher watches the directories of the config and key files, not the
//! files: editors and secret managers replace a file by renaming a new one
//! over it, which a watch on the old file would miss.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::snapshot::Live;
use crate::state::{AppState, ReloadOutcome};

/// Resolves the environment variables a config names (`api_key_env`, ...).
pub type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Where a config comes from, and where reload outcomes go.
#[derive(Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub env: EnvLookup,
    /// Written after every attempt for `balancer reload`; `None` in tests
    /// that need no CLI.
    pub outcome_file: Option<PathBuf>,
}

impl ConfigSource {
    /// The process environment, and the outcome file beside `pid_file`.
    pub fn from_process(path: PathBuf, pid_file: &Path) -> Self {
        Self {
            path,
            env: Arc::new(|var| std::env::var(var).ok()),
            outcome_file: Some(outcome_file_for(pid_file)),
        }
    }
}

/// The reload outcome file that belongs to `pid_file`.
pub fn outcome_file_for(pid_file: &Path) -> PathBuf {
    pid_file.with_extension("reload.json")
}

/// Quiet time after a file event before reloading: an editor's save or a
/// secret rotation is several events in a few milliseconds.
const SETTLE: Duration = Duration::from_millis(150);
/// However busy the files are, a change is applied this long after its
/// first event at the latest.
const SETTLE_MAX: Duration = Duration::from_secs(1);

/// Re-reads the config and swaps it in, or keeps the running one. Blocking
/// (files, TLS set-up): call it off the async workers.
pub fn reload(state: &AppState, source: &ConfigSource, trigger: &'static str) -> ReloadOutcome {
    let env = |var: &str| (source.env)(var);
    let result = match config::load_with(&source.path, &env) {
        Err(err) => Err(err.problems.join("\n")),
        Ok((config, _)) if opens(state, &config) => Err(OPENS.to_owned()),
        Ok((config, warnings)) => {
            for warning in &warnings.0 {
                tracing::warn!("{warning}");
            }
            let summary = describe_changes(&state.live(), &config);
            state.swap(config).map(|()| summary)
        }
    };
    match &result {
        Ok(summary) => tracing::info!(trigger, summary, "config reloaded"),
        Err(problems) => {
            for problem in problems.lines() {
                tracing::error!(
                    trigger,
                    problem,
                    "config reload rejected; the running config stays"
                );
            }
        }
    }
    let outcome = state.record_reload(trigger, result);
    if let Some(path) = &source.outcome_file
        && let Err(err) = write_outcome(path, &outcome)
    {
        tracing::warn!(path = %path.display(), error = %err, "cannot write the reload outcome file");
    }
    outcome
}

/// Why a reload that would open a closed gateway is refused.
const OPENS: &str = "auth: this config lets anyone in (no auth.client_keys_env, no [[clients]], no admin token, no stored client) while the running gateway requires a key; a reload never opens a gateway: restart it to run it open";

/// Whether `config` would open the gateway, which now requires a key. An
/// edit that drops `[auth]` and `[admin]` by mistake must not let the
/// world in; one that means it takes a restart (with its start-up warning).
fn opens(state: &AppState, config: &Config) -> bool {
    !crate::auth::is_open(&state.live(), &state.clients)
        && crate::auth::config_is_open(config, &state.clients)
}

/// One line on what a reload changes, by node name. Never a key: only
/// whether one changed.
fn describe_changes(old: &Live, new: &Config) -> String {
    let mut added = Vec::new();
    let mut changed = Vec::new();
    for node in &new.nodes {
        match old.config.nodes.iter().find(|n| n.name == node.name) {
            None => added.push(node.name.to_string()),
            Some(before) => {
                let what = node.changes_from(before);
                if !what.is_empty() {
                    changed.push(format!("{} ({})", node.name, what.join(", ")));
                }
            }
        }
    }
    let removed: Vec<String> = old
        .nodes()
        .filter(|n| !new.nodes.iter().any(|m| m.name == n.name))
        .map(|n| n.name.to_string())
        .collect();
    let mut parts = Vec::new();
    for (label, list) in [("added", added), ("removed", removed), ("changed", changed)] {
        if !list.is_empty() {
            parts.push(format!("{label}: {}", list.join(", ")));
        }
    }
    if parts.is_empty() {
        "no node changed".to_owned()
    } else {
        parts.join("; ")
    }
}

/// Writes the outcome atomically (a temporary file renamed over it), so a
/// reader never sees half of it.
fn write_outcome(path: &Path, outcome: &ReloadOutcome) -> std::io::Result<()> {
    let body = json!({
        "pid": std::process::id(),
        "attempt": outcome.attempt,
        "trigger": outcome.trigger,
        "ok": outcome.result.is_ok(),
        "summary": outcome.result.as_ref().ok(),
        "error": outcome.result.as_ref().err(),
    });
    let tmp = path.with_extension("reload.json.tmp");
    std::fs::write(&tmp, body.to_string())?;
    std::fs::rename(&tmp, path)
}

/// Runs [`reload`] on a blocking thread.
async fn reload_blocking(state: &Arc<AppState>, source: &ConfigSource, trigger: &'static str) {
    let state = Arc::clone(state);
    let source = source.clone();
    if let Err(err) = tokio::task::spawn_blocking(move || reload(&state, &source, trigger)).await {
        tracing::error!(error = %err, "config reload task failed");
    }
}

/// Takes over SIGHUP (whose default would end the process). Call it before
/// the pid file announces the process, so `balancer reload` cannot kill a
/// gateway that is still starting.
pub fn listen_for_sighup() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Reloads on every SIGHUP until `cancel` fires.
pub async fn on_sighup(
    state: Arc<AppState>,
    source: ConfigSource,
    mut hangups: tokio::signal::unix::Signal,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            received = hangups.recv() => {
                if received.is_none() {
                    return;
                }
                reload_blocking(&state, &source, "SIGHUP").await;
            }
        }
    }
}

/// Reloads whenever the config file or one of its key files changes, until
/// `cancel` fires.
pub async fn watch(state: Arc<AppState>, source: ConfigSource, cancel: CancellationToken) {
    let (events, mut changed) = mpsc::unbounded_channel::<PathBuf>();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        ) {
            for path in event.paths {
                let _ = events.send(path);
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(err) => {
            tracing::error!(error = %err, "cannot watch the config file; reload by SIGHUP or `balancer reload`");
            return;
        }
    };
    let mut watched = Watched::default();
    watched.update(&mut watcher, &source.path, &state.live().config);
    state
        .watching
        .store(true, std::sync::atomic::Ordering::Release);
    loop {
        // Events for files the gateway does not read (a log beside the
        // config, say) are passed over: they neither start nor delay a reload.
        let first = tokio::select! {
            () = cancel.cancelled() => return,
            path = changed.recv() => path,
        };
        let Some(first) = first else { return };
        if !watched.covers(&first) {
            continue;
        }
        // Let a burst of events on the files it reads settle into one
        // reload, for at most SETTLE_MAX.
        let latest = tokio::time::Instant::now() + SETTLE_MAX;
        let mut quiet_from = tokio::time::Instant::now();
        loop {
            let until = (quiet_from + SETTLE).min(latest);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep_until(until) => break,
                path = changed.recv() => match path {
                    Some(path) if watched.covers(&path) => quiet_from = tokio::time::Instant::now(),
                    Some(_) => {}
                    None => return,
                },
            }
        }
        reload_blocking(&state, &source, "file change").await;
        // Key files may have been added or removed.
        watched.update(&mut watcher, &source.path, &state.live().config);
    }
}

/// The files a reload depends on, and the directories watched for them.
#[derive(Default)]
struct Watched {
    files: HashSet<PathBuf>,
    dirs: HashSet<PathBuf>,
}

impl Watched {
    fn update(&mut self, watcher: &mut impl Watcher, config_path: &Path, config: &Config) {
        let files: HashSet<PathBuf> = std::iter::once(config_path.to_owned())
            .chain(config.watched_files())
            .filter_map(|p| std::path::absolute(p).ok())
            .collect();
        let dirs: HashSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_owned))
            .collect();
        for dir in self.dirs.difference(&dirs) {
            let _ = watcher.unwatch(dir);
        }
        for dir in dirs.difference(&self.dirs) {
            if let Err(err) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %err, "cannot watch directory");
            }
        }
        self.files = files;
        self.dirs = dirs;
    }

    fn covers(&self, path: &Path) -> bool {
        std::path::absolute(path).is_ok_and(|p| self.files.contains(&p))
    }
}
