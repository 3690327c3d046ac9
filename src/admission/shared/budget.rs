//! Clients' budgets shared by every replica (`budget.lua`): one script
//! call holds a request's worst case if it fits, one more (in the
//! background) ends the hold with what the request cost.

use std::sync::Arc;
use std::time::Duration;

use super::{LEASE_MARGIN, SharedLimits, Unavailable};

/// What the budget script decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BudgetVerdict {
    Held,
    /// What is spent leaves too little.
    Spent,
    /// Holds in flight leave too little.
    HeldByOthers,
}

/// The budget script's answer: its verdict, and the period's spend across
/// the cluster (nano-dollars).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BudgetAnswer {
    pub verdict: BudgetVerdict,
    pub spent: u64,
}

/// One request's hold on a shared budget.
#[derive(Debug)]
pub(crate) struct SharedBudgetHold {
    limits: Arc<SharedLimits>,
    key: String,
    id: String,
}

impl SharedLimits {
    fn budget_key(&self, client_id: &str, period_start: i64) -> String {
        format!("{}:b:{client_id}:{period_start}", self.settings.key_prefix)
    }

    /// Holds `worst` of the client's budget for the period starting at
    /// `period_start` if it fits; `seed` is where a period nobody has
    /// counted yet starts from. The hold lasts `hold_for` and a margin; the
    /// period's key outlives its end by a day (`None`: it never ends).
    #[expect(clippy::too_many_arguments, reason = "the script's arguments, named")]
    pub(crate) async fn budget_hold(
        self: &Arc<Self>,
        client_id: &str,
        period_start: i64,
        period_end: Option<i64>,
        limit: u64,
        worst: u64,
        seed: u64,
        hold_for: Duration,
    ) -> Result<(BudgetAnswer, Option<SharedBudgetHold>), Unavailable> {
        let key = self.budget_key(client_id, period_start);
        let id = self.next_id();
        let ttl = period_end.map_or(0, |end| {
            let now = crate::money::budget::unix_now();
            u64::try_from(end.saturating_sub(now)).unwrap_or(0) + 86_400
        });
        let mut invocation = self.budget.prepare_invoke();
        invocation
            .key(&key)
            .arg("hold")
            .arg(limit)
            .arg(worst)
            .arg(seed)
            .arg(&id)
            .arg((hold_for + LEASE_MARGIN).as_millis() as u64)
            .arg(ttl);
        let (verdict, spent, _held): (i64, u64, u64) = self.call(&invocation).await?;
        let verdict = match verdict {
            0 => BudgetVerdict::Held,
            1 => BudgetVerdict::Spent,
            _ => BudgetVerdict::HeldByOthers,
        };
        let hold = (verdict == BudgetVerdict::Held).then(|| SharedBudgetHold {
            limits: Arc::clone(self),
            key,
            id,
        });
        Ok((BudgetAnswer { verdict, spent }, hold))
    }

    /// The period's spend and holds across the cluster, for the admin API;
    /// `None` while Redis does not answer.
    pub(crate) async fn budget_peek(
        &self,
        client_id: &str,
        period_start: i64,
    ) -> Option<(u64, u64)> {
        if !self.is_up() {
            return None;
        }
        let mut invocation = self.budget.prepare_invoke();
        invocation
            .key(self.budget_key(client_id, period_start))
            .arg("peek");
        let (_, spent, held): (i64, u64, u64) = self.call(&invocation).await.ok()?;
        Some((spent, held))
    }
}

impl SharedBudgetHold {
    /// Ends the hold in the background: the request cost `charged`. Not
    /// ended (Redis away), it expires and counts in full.
    pub(crate) fn end(self, charged: u64) {
        let limits = Arc::clone(&self.limits);
        self.limits.tasks.run(async move {
            let mut invocation = limits.budget.prepare_invoke();
            invocation.key(&self.key).arg("end").arg(&self.id).arg(charged);
            if let Err(err) = limits.call::<(i64, u64, u64)>(&invocation).await {
                tracing::warn!(error = %err, "cannot end a shared budget hold; it counts in full when it expires");
            }
        });
    }
}
