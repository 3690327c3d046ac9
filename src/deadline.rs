//! An HTTP/1 answer's write deadline: set by the proxy from the request's
//! `server.request_timeout`, enforced by the connection
//! ([`crate::server`]) on every write of that answer. A leaf: the server
//! and the proxy both use it, neither through the other.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// An HTTP/1 connection's deadline for writing the answer in progress,
/// set by the proxy from the request's `server.request_timeout`. Found in
/// the request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct WriteDeadline {
    opened: Instant,
    /// Milliseconds after `opened`; 0 for none.
    at_ms: Arc<AtomicU64>,
}

impl WriteDeadline {
    pub(crate) fn new() -> Self {
        Self {
            opened: Instant::now(),
            at_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Writes of this answer must be done by `at`.
    pub(crate) fn until(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.opened).as_millis();
        let ms = u64::try_from(ms).unwrap_or(u64::MAX).max(1);
        self.at_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn clear(&self) {
        self.at_ms.store(0, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> Option<Instant> {
        match self.at_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.opened + Duration::from_millis(ms)),
        }
    }
}
