//! Giving the memory a burst freed back to the system.
//!
//! glibc's allocator keeps what a program frees for its next allocations:
//! after a burst (500 streams opened at once, the tokenizer tables' build
//! at start) the process stays resident at its peak long after the memory
//! is free, because only the top of each heap is returned by itself
//! (measured: `loadtest streaming --streams 500` ended at its peak in every
//! run, and glibc's own tuning by environment did not change that; see
//! BENCHMARKS.md, "Proxy-class cost"). `malloc_trim(0)` returns every whole
//! free page of every arena.
//!
//! Invariants:
//! - a trim never runs under load: [`trim_when_quiet`] trims once after a
//!   second in which the runtime's workers were nearly idle follows one in
//!   which they were not, so a steady load is never paused by it (glibc
//!   locks each arena while it walks it);
//! - it runs on a blocking thread, never on a runtime worker;
//! - off glibc it does nothing (musl, and the allocators of other
//!   systems, return memory themselves or have no such call).
//!
//! The crate's one `unsafe` block is the call itself: `malloc_trim` takes
//! no pointer and glibc serialises it with every other allocator call, so
//! no Rust invariant rests on it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the runtime's busy time is sampled.
const TICK: Duration = Duration::from_secs(1);
/// Worker time in one tick above which the gateway counts as busy.
const BUSY: Duration = Duration::from_millis(20);
/// Worker time in one tick below which it counts as quiet.
const QUIET: Duration = Duration::from_millis(2);

/// Returns the allocator's free pages to the system now; whether any were.
pub fn give_back() -> bool {
    release()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(
    unsafe_code,
    reason = "FFI to glibc's malloc_trim, which has no caller-side invariant"
)]
fn release() -> bool {
    // SAFETY: malloc_trim(3) takes no pointer, is MT-Safe and only changes
    // the allocator's own free lists (returning their whole pages).
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() -> bool {
    false
}

/// Whether the gateway was busy, quiet, or in between over one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    Busy,
    Quiet,
    Between,
}

impl Load {
    fn of(worker_time: Duration) -> Self {
        if worker_time >= BUSY {
            Load::Busy
        } else if worker_time < QUIET {
            Load::Quiet
        } else {
            Load::Between
        }
    }
}

/// When to trim: once after load, at the first quiet tick.
#[derive(Debug, Default)]
struct Trimmer {
    /// Whether there was load since the last trim.
    loaded: bool,
}

impl Trimmer {
    /// Takes one tick's load; whether to trim now.
    fn tick(&mut self, load: Load) -> bool {
        match load {
            Load::Busy => {
                self.loaded = true;
                false
            }
            Load::Between => false,
            Load::Quiet => std::mem::take(&mut self.loaded),
        }
    }
}

/// Samples the runtime's busy time every second and trims after a burst,
/// until `cancel`. (Where the target has no 64-bit atomics tokio keeps no
/// busy time, and nothing is trimmed after bursts.)
#[cfg(target_has_atomic = "64")]
pub async fn trim_when_quiet(cancel: CancellationToken) {
    let metrics = tokio::runtime::Handle::current().metrics();
    let busy = || {
        (0..metrics.num_workers())
            .map(|worker| metrics.worker_total_busy_duration(worker))
            .sum::<Duration>()
    };
    let mut trimmer = Trimmer::default();
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut before = busy();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = busy();
        let load = Load::of(now.saturating_sub(before));
        before = now;
        if trimmer.tick(load) {
            let released = tokio::task::spawn_blocking(give_back)
                .await
                .unwrap_or(false);
            tracing::debug!(
                released,
                "gave the allocator's free pages back after a burst"
            );
            // The trim's own blocking thread is not a worker: its time does
            // not count as load.
            before = busy();
        }
    }
}

#[cfg(not(target_has_atomic = "64"))]
pub async fn trim_when_quiet(cancel: CancellationToken) {
    cancel.cancelled().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_trimmed_once_at_the_first_quiet_second() {
        let mut trimmer = Trimmer::default();
        let ms = Duration::from_millis;
        let trims: Vec<bool> = [0, 300, 900, 40, 1, 0, 0, 500, 5, 0]
            .into_iter()
            .map(|busy| trimmer.tick(Load::of(ms(busy))))
            .collect();
        assert_eq!(
            trims,
            [
                false, false, false, false, true, false, false, false, false, true
            ]
        );
    }

    #[test]
    fn steady_load_is_never_trimmed() {
        let mut trimmer = Trimmer::default();
        assert!((0..100).all(|_| !trimmer.tick(Load::of(Duration::from_millis(8)))));
        assert!((0..100).all(|_| !trimmer.tick(Load::of(Duration::from_millis(300)))));
    }

    #[test]
    fn an_idle_gateway_is_never_trimmed() {
        let mut trimmer = Trimmer::default();
        assert!((0..100).all(|_| !trimmer.tick(Load::Quiet)));
    }
}
