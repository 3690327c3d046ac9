//! A client's budget at admission: the request's worst-case cost is held
//! against what the client has left before any node is chosen, and given
//! back (less what the request cost) when it ends.
//!
//! Without `[cluster]` the hold is the client's [`Account`] here; with it,
//! and Redis answering, one script call holds it across every replica
//! (`budget.lua`), and this replica's account follows the cluster's
//! spend. Redis away: `on_redis_error = "local"` holds on this replica's
//! account (its view of the spend), `"reject"` refuses.
//!
//! A request that finds the client's requests in flight holding what it
//! needs waits for one of them to end, up to `queue.max_wait`
//! ([`Admission::hold_budget_or_wait`]); a budget spent is refused at once.
//!
//! A [`BudgetHold`] is a guard like the others of admission: settled with
//! what the request cost, cancelled when nothing reached a node, and
//! dropped otherwise, it counts its worst case in full (the safe side).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::refusal::Refusal;
use super::shared::{BudgetVerdict, SharedBudgetHold};
use super::{Admission, Ask};
use crate::clients::{Client, Registry};
use crate::money::budget::unix_now;
use crate::money::{Account, Budget, Cost, Short};

/// One request's hold on its client's budget.
#[derive(Debug)]
pub(crate) struct BudgetHold {
    account: Arc<Account>,
    worst: Cost,
    period_start: i64,
    /// The cluster's hold, with `[cluster]`.
    shared: Option<SharedBudgetHold>,
    ended: bool,
}

impl BudgetHold {
    /// The request's worst case, held.
    pub(crate) fn worst(&self) -> Cost {
        self.worst
    }

    /// Ends the hold: the request cost `cost`.
    pub(crate) fn settle(mut self, cost: Cost) {
        self.end(cost);
    }

    /// Ends a hold whose request reached no node: nothing spent.
    pub(crate) fn cancel(mut self) {
        self.end(Cost::ZERO);
    }

    fn end(&mut self, charged: Cost) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        match self.shared.take() {
            Some(shared) => {
                shared.end(charged.nanos());
                self.account.settled_shared(self.period_start, charged);
            }
            None => self.account.end(self.period_start, self.worst, charged),
        }
    }
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        self.end(self.worst);
    }
}

/// How often a request waiting for the cluster's holds to end looks
/// again: holds that end on other replicas wake nothing here.
const CLUSTER_RECHECK: Duration = Duration::from_millis(100);

/// Counts a request among those waiting for budget, in all and for its
/// client, while it lives (the request may be dropped mid-wait: its client
/// gone).
struct Waiting<'a>(&'a AtomicUsize, &'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize, client: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        client.fetch_add(1, Ordering::Relaxed);
        Self(count, client)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// [`hold_budget`](Self::hold_budget), waiting while the client's
    /// requests in flight hold what this one needs: until `queue.max_wait`
    /// (or the request's deadline), trying again whenever one of them ends
    /// here (and every [`CLUSTER_RECHECK`] with `[cluster]`). A budget
    /// spent, not held, is refused at once.
    pub(super) async fn hold_budget_or_wait(
        &self,
        ask: &Ask<'_>,
        client: &Client,
        worst: Cost,
    ) -> Result<Option<BudgetHold>, Refusal> {
        let wait_until = ask
            .deadline
            .min(Instant::now() + ask.live.config.queue.max_wait);
        let mut waiting = None;
        loop {
            let released = client.account.released();
            let mut released = std::pin::pin!(released);
            released.as_mut().enable();
            let hold_for = ask.deadline.saturating_duration_since(Instant::now());
            let held = self.hold_budget(ask.clients, client, worst, hold_for).await;
            let now = Instant::now();
            match held {
                Err(Refusal::OverBudget {
                    short: Short::Held, ..
                }) if now < wait_until => {
                    if waiting.is_none() {
                        // A waiter counts in `queue.max_depth_per_client`
                        // like one waiting for a node.
                        let queue = &ask.live.config.queue;
                        let of_client = client.limiter.budget_waiting.load(Ordering::Relaxed)
                            + self.queue.waiting_of(&client.id);
                        if of_client >= queue.max_depth_per_client
                            || self.budget_waiting.load(Ordering::Relaxed) >= queue.max_depth
                        {
                            return held;
                        }
                        waiting = Some(Waiting::new(
                            &self.budget_waiting,
                            &client.limiter.budget_waiting,
                        ));
                    }
                    let look_again = match self.shared {
                        Some(_) => wait_until.min(now + CLUSTER_RECHECK),
                        None => wait_until,
                    };
                    tokio::select! {
                        () = released => {}
                        () = tokio::time::sleep_until(look_again) => {}
                    }
                }
                other => return other,
            }
        }
    }

    /// Holds `worst` of `client`'s budget, if it has one; the hold lasts
    /// at most `hold_for` in the cluster (then counts in full).
    pub(super) async fn hold_budget(
        &self,
        clients: &Registry,
        client: &Client,
        worst: Cost,
        hold_for: Duration,
    ) -> Result<Option<BudgetHold>, Refusal> {
        let Some(budget) = client.budget else {
            return Ok(None);
        };
        if worst > budget.limit {
            return Err(Refusal::BudgetTooSmall);
        }
        let now = unix_now();
        let account = &client.account;
        account
            .ready(budget.period, now, |from| {
                clients.stored_spend(&client.id, from)
            })
            .await
            .map_err(|err| {
                tracing::error!(error = %err, client = %client.id, "cannot read a client's spend");
                Refusal::StoreUnavailable
            })?;
        let hold = |period_start, shared| BudgetHold {
            account: Arc::clone(account),
            worst,
            period_start,
            shared,
            ended: false,
        };
        let over = |short| Refusal::OverBudget {
            budget,
            short,
            worst,
            now,
        };
        if let Some(shared) = self.shared_if_up()? {
            let start = budget.period.start(now);
            let seed = account.spend(budget.period, now).spent;
            let answer = shared
                .budget_hold(
                    &client.id,
                    start,
                    budget.period.end(start),
                    budget.limit.nanos(),
                    worst.nanos(),
                    seed.nanos(),
                    hold_for,
                )
                .await;
            match answer {
                Ok((answer, held)) => {
                    account.observed_shared(start, Cost(answer.spent));
                    return match answer.verdict {
                        BudgetVerdict::Held => Ok(Some(hold(start, held))),
                        BudgetVerdict::Spent => Err(over(spent_short(budget, start, answer.spent))),
                        BudgetVerdict::HeldByOthers => Err(over(Short::Held)),
                    };
                }
                Err(_) => self.fall_back()?,
            }
        }
        match account.hold(&budget, worst, now) {
            Ok(start) => Ok(Some(hold(start, None))),
            Err(short) => Err(over(short)),
        }
    }
}

fn spent_short(budget: Budget, period_start: i64, spent: u64) -> Short {
    Short::Spent {
        remaining: Cost(budget.limit.nanos().saturating_sub(spent)),
        renews: budget.period.end(period_start),
    }
}
