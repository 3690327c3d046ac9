//! A provisioned deployment (Azure PTU) says how full it is on every
//! answer (`azure-openai-deployment-utilization`, a percentage) and
//! answers 429 only past 100%. A reading at or above the node's
//! `utilization_high` holds the node for [`PROVISIONED_HOLD`]: it takes no
//! new request (the overflow goes to the next node or tier before the
//! deployment refuses anything); once the hold ends, requests go to it
//! again and the next answer's reading decides anew. A 429's
//! `retry-after-ms` rests it as any node's does.

use std::time::Duration;

use tokio::time::Instant;

use super::Limiter;
use crate::limits::CooldownReason;

/// How long a nearly full provisioned deployment takes no new request:
/// about the time its utilisation, a short moving measure, needs to drain.
pub(super) const PROVISIONED_HOLD: Duration = Duration::from_secs(1);

impl Limiter {
    /// A provisioned deployment's reading, `percent` full: at or above its
    /// `utilization_high` the node is held. Whether it is now.
    pub fn observe_utilization(&self, percent: f64, now: Instant) -> bool {
        let mut state = self.state.lock();
        let Some(high) = state.utilization_high else {
            return false;
        };
        if percent < high {
            return false;
        }
        let until = now + PROVISIONED_HOLD;
        if state.cooldown.is_none_or(|(t, _)| until > t) {
            state.cooldown = Some((until, CooldownReason::ProvisionedFull));
        }
        true
    }
}
