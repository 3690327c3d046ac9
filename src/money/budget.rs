//! Budgets: what a client may spend per period, and the [`Account`] that
//! keeps what it spent.
//!
//! A period is a UTC day, a UTC calendar month, or the client's whole life
//! (`total`). An account counts two amounts for the current period: what
//! settled requests cost (`spent`) and the worst cases of the requests in
//! flight (`held`). [`Account::hold`] admits a request only if
//! `spent + held + worst <= budget`, and adds `worst` to `held` in the same
//! step under the account's lock (never held across an await);
//! [`Account::end`] takes the worst case back out and adds what the
//! request cost. A request counts in the period it was admitted in: one
//! that ends after its period rolled over gives its hold back and adds
//! nothing to the new period.
//!
//! The spend survives a restart: every settled cost is in the client's
//! usage rows ([`crate::ledger`]), and an account reads the period's sum
//! from the store the first time it is used ([`Account::ready`]), after
//! the ledger has written what it had. What this replica settles while
//! that read is under way is added to it (counted twice at worst, never
//! lost: the safe side).

use std::future::Future;

use parking_lot::Mutex;
use time::{Date, OffsetDateTime};

use super::Cost;

/// The span a budget renews over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Period {
    /// A UTC day.
    Day,
    /// A UTC calendar month.
    #[default]
    Month,
    /// Never renews.
    Total,
}

const DAY_SECONDS: i64 = 86_400;

impl Period {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "day" => Some(Period::Day),
            "month" => Some(Period::Month),
            "total" => Some(Period::Total),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
            Period::Total => "total",
        }
    }

    /// The start (Unix seconds) of the period `now` is in; 0 for `total`.
    pub fn start(self, now: i64) -> i64 {
        match self {
            Period::Total => 0,
            Period::Day => now.div_euclid(DAY_SECONDS) * DAY_SECONDS,
            Period::Month => {
                let date = date_of(now);
                Date::from_calendar_date(date.year(), date.month(), 1)
                    .map_or(0, |first| first.midnight().assume_utc().unix_timestamp())
            }
        }
    }

    /// The end of the period that starts at `start`: when the budget
    /// renews. `None` for `total`.
    pub fn end(self, start: i64) -> Option<i64> {
        match self {
            Period::Total => None,
            Period::Day => Some(start + DAY_SECONDS),
            Period::Month => {
                let date = date_of(start);
                let (year, month) = match date.month().next() {
                    time::Month::January => (date.year() + 1, time::Month::January),
                    next => (date.year(), next),
                };
                Date::from_calendar_date(year, month, 1)
                    .ok()
                    .map(|first| first.midnight().assume_utc().unix_timestamp())
            }
        }
    }
}

fn date_of(unix: i64) -> Date {
    OffsetDateTime::from_unix_timestamp(unix).map_or(Date::MIN, OffsetDateTime::date)
}

/// `YYYY-MM-DD` of a Unix time, as the usage rows name days.
pub fn day_of(unix: i64) -> String {
    let date = date_of(unix);
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// RFC 3339 of a Unix time, UTC, to the second.
pub fn rfc3339(unix: i64) -> String {
    let at =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

/// A client's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub limit: Cost,
    pub period: Period,
}

/// Why a request does not fit its client's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Short {
    /// What is settled leaves less than the request's worst case: nothing
    /// helps before the period renews (at `renews`; never for `total`).
    Spent {
        remaining: Cost,
        renews: Option<i64>,
    },
    /// Requests in flight hold the rest: it frees as they end.
    Held,
}

/// A client's spend in the current period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spend {
    pub period_start: i64,
    pub spent: Cost,
    /// Worst cases of the requests in flight.
    pub held: Cost,
}

/// One client's spend: settled and held, for the current period.
#[derive(Debug, Default)]
pub struct Account {
    state: Mutex<State>,
    /// One reader of the store at a time.
    loading: tokio::sync::Mutex<()>,
    /// Woken whenever a hold here ends: requests waiting for what requests
    /// in flight hold try again.
    released: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct State {
    /// The kind and start of the period counted; `None` until read from
    /// the store.
    period: Option<(Period, i64)>,
    spent: u64,
    held: u64,
    /// While the store is read: what settled meanwhile, to add to it.
    settled_while_loading: Option<u64>,
}

impl State {
    /// Moves to the period `now` is in; a new period starts with nothing
    /// spent (what is in flight stays held).
    fn roll(&mut self, kind: Period, now: i64) -> i64 {
        let start = kind.start(now);
        if let Some((counted, at)) = &mut self.period
            && *counted == kind
            && *at != start
        {
            *at = start;
            self.spent = 0;
        }
        start
    }

    fn is_loaded_for(&self, kind: Period) -> bool {
        matches!(self.period, Some((counted, _)) if counted == kind)
    }
}

impl Account {
    /// Reads the period's spend with `read` (given the period's first day,
    /// `None` for `total`: the stored sum from then on), the first time,
    /// and again when the budget's period kind changed. Cheap once loaded.
    pub async fn ready<E, F, Fut>(&self, period: Period, now: i64, read: F) -> Result<(), E>
    where
        F: FnOnce(Option<String>) -> Fut,
        Fut: Future<Output = Result<u64, E>>,
    {
        if self.state.lock().is_loaded_for(period) {
            return Ok(());
        }
        let _one = self.loading.lock().await;
        if self.state.lock().is_loaded_for(period) {
            return Ok(());
        }
        self.state.lock().settled_while_loading = Some(0);
        let start = period.start(now);
        let read = read((period != Period::Total).then(|| day_of(start))).await;
        let mut state = self.state.lock();
        let meanwhile = state.settled_while_loading.take().unwrap_or(0);
        let stored = read?;
        state.spent = stored.saturating_add(meanwhile);
        state.period = Some((period, start));
        Ok(())
    }

    /// Holds `worst` against `budget` if it fits with what is spent and
    /// held; returns the period it counts in. Must be [`ready`](Self::ready).
    pub fn hold(&self, budget: &Budget, worst: Cost, now: i64) -> Result<i64, Short> {
        let mut state = self.state.lock();
        let start = state.roll(budget.period, now);
        let limit = budget.limit.0;
        if state.spent.saturating_add(worst.0) > limit {
            return Err(Short::Spent {
                remaining: Cost(limit.saturating_sub(state.spent)),
                renews: budget.period.end(start),
            });
        }
        if state
            .spent
            .saturating_add(state.held)
            .saturating_add(worst.0)
            > limit
        {
            return Err(Short::Held);
        }
        state.held += worst.0;
        Ok(start)
    }

    /// Ends a hold of `worst` made in the period starting at
    /// `period_start`: it costs `charged`.
    pub fn end(&self, period_start: i64, worst: Cost, charged: Cost) {
        {
            let mut state = self.state.lock();
            state.held = state.held.saturating_sub(worst.0);
            self.add_spent(&mut state, period_start, charged);
        }
        self.released.notify_waiters();
    }

    /// Adds what a request settled elsewhere (the cluster's hold) cost.
    pub fn settled_shared(&self, period_start: i64, charged: Cost) {
        {
            let mut state = self.state.lock();
            self.add_spent(&mut state, period_start, charged);
        }
        self.released.notify_waiters();
    }

    /// Resolves at the next end of a hold on this account (made on this
    /// replica); enable it before trying to hold, so no end is missed.
    pub fn released(&self) -> tokio::sync::futures::Notified<'_> {
        self.released.notified()
    }

    fn add_spent(&self, state: &mut State, period_start: i64, charged: Cost) {
        if let Some(meanwhile) = &mut state.settled_while_loading {
            *meanwhile = meanwhile.saturating_add(charged.0);
        }
        if matches!(state.period, Some((_, at)) if at == period_start) {
            state.spent = state.spent.saturating_add(charged.0);
        }
    }

    /// The cluster's spend for the period starting at `period_start`, as
    /// its script last answered: this replica's view follows it.
    pub fn observed_shared(&self, period_start: i64, spent: Cost) {
        let mut state = self.state.lock();
        if matches!(state.period, Some((_, at)) if at == period_start) {
            state.spent = spent.0;
        }
    }

    /// The spend in the period `now` is in, as this replica counts it.
    pub fn spend(&self, period: Period, now: i64) -> Spend {
        let mut state = self.state.lock();
        let period_start = if state.is_loaded_for(period) {
            state.roll(period, now)
        } else {
            period.start(now)
        };
        Spend {
            period_start,
            spent: Cost(state.spent),
            held: Cost(state.held),
        }
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-01-31T23:59:00Z.
    const JAN_31_LATE: i64 = 1_769_903_940;

    #[test]
    fn periods_are_utc_days_and_calendar_months() {
        assert_eq!(day_of(JAN_31_LATE), "2026-01-31");
        let day = Period::Day.start(JAN_31_LATE);
        assert_eq!(rfc3339(day), "2026-01-31T00:00:00Z");
        assert_eq!(
            Period::Day.end(day).map(rfc3339).as_deref(),
            Some("2026-02-01T00:00:00Z")
        );
        let month = Period::Month.start(JAN_31_LATE);
        assert_eq!(rfc3339(month), "2026-01-01T00:00:00Z");
        assert_eq!(
            Period::Month.end(month).map(rfc3339).as_deref(),
            Some("2026-02-01T00:00:00Z")
        );
        let december = Period::Month.start(1_796_083_200); // 2026-12-01
        assert_eq!(
            Period::Month.end(december).map(rfc3339).as_deref(),
            Some("2027-01-01T00:00:00Z")
        );
        assert_eq!(Period::Total.end(Period::Total.start(JAN_31_LATE)), None);
    }

    /// An account whose store holds nothing for the period.
    async fn account() -> Account {
        Account::default()
    }

    async fn nothing_stored(_from: Option<String>) -> Result<u64, ()> {
        Ok(0)
    }

    #[tokio::test]
    async fn the_stored_spend_is_read_once_from_the_period_s_first_day() {
        let account = account().await;
        let budget = budget(1.0, Period::Month);
        let asked = std::sync::Mutex::new(Vec::new());
        for _ in 0..2 {
            account
                .ready(budget.period, JAN_31_LATE, |from| {
                    asked.lock().expect("unpoisoned").push(from);
                    async { Ok::<_, ()>(Cost::from_usd(0.75).0) }
                })
                .await
                .expect("read");
        }
        assert_eq!(
            *asked.lock().expect("unpoisoned"),
            [Some("2026-01-01".to_owned())]
        );
        // $0.75 of $1 spent this month: $0.30 does not fit, $0.25 does.
        assert_eq!(
            account.hold(&budget, Cost::from_usd(0.3), JAN_31_LATE),
            Err(Short::Spent {
                remaining: Cost::from_usd(0.25),
                renews: Period::Month.end(Period::Month.start(JAN_31_LATE)),
            })
        );
        assert!(
            account
                .hold(&budget, Cost::from_usd(0.25), JAN_31_LATE)
                .is_ok()
        );
    }

    fn budget(usd: f64, period: Period) -> Budget {
        Budget {
            limit: Cost::from_usd(usd),
            period,
        }
    }

    #[tokio::test]
    async fn held_and_spent_together_never_pass_the_budget() {
        let account = account().await;
        let budget = budget(1.0, Period::Day);
        let now = JAN_31_LATE - 3_600;
        account
            .ready(budget.period, now, nothing_stored)
            .await
            .expect("read");
        let worst = Cost::from_usd(0.3);
        let holds: Vec<i64> = (0..3)
            .map(|_| account.hold(&budget, worst, now).expect("fits"))
            .collect();
        // 0.9 held: a fourth does not fit while they are in flight.
        assert_eq!(account.hold(&budget, worst, now), Err(Short::Held));
        // One ends having cost 0.1: 0.1 spent, 0.6 held, 0.3 more fits.
        account.end(holds[0], worst, Cost::from_usd(0.1));
        let fourth = account.hold(&budget, worst, now).expect("fits now");
        for start in [holds[1], holds[2], fourth] {
            account.end(start, worst, Cost::from_usd(0.3));
        }
        // 1.0 spent: nothing more until the day renews, and it says when.
        assert_eq!(
            account.hold(&budget, Cost(1), now),
            Err(Short::Spent {
                remaining: Cost::ZERO,
                renews: Some(Period::Day.start(now) + DAY_SECONDS),
            })
        );
        let spend = account.spend(budget.period, now);
        assert_eq!((spend.spent, spend.held), (Cost::from_usd(1.0), Cost::ZERO));
    }

    #[tokio::test]
    async fn a_new_period_starts_with_nothing_spent_and_late_endings_stay_in_theirs() {
        let account = account().await;
        let budget = budget(1.0, Period::Day);
        let evening = JAN_31_LATE;
        account
            .ready(budget.period, evening, nothing_stored)
            .await
            .expect("read");
        let spent_early = account
            .hold(&budget, Cost::from_usd(0.6), evening)
            .expect("fits");
        account.end(spent_early, Cost::from_usd(0.6), Cost::from_usd(0.6));
        let in_flight = account
            .hold(&budget, Cost::from_usd(0.4), evening)
            .expect("fits");
        assert_eq!(account.hold(&budget, Cost(1), evening), Err(Short::Held));
        // Midnight passes (the clock is the test's, like paused time).
        let morning = evening + 120;
        let spend = account.spend(budget.period, morning);
        assert_eq!((spend.spent, spend.held), (Cost::ZERO, Cost::from_usd(0.4)));
        // Yesterday's request in flight still holds its worst case...
        assert_eq!(
            account.hold(&budget, Cost::from_usd(0.7), morning),
            Err(Short::Held)
        );
        // ...and when it ends, its cost stays in yesterday.
        account.end(in_flight, Cost::from_usd(0.4), Cost::from_usd(0.4));
        let spend = account.spend(budget.period, morning);
        assert_eq!((spend.spent, spend.held), (Cost::ZERO, Cost::ZERO));
        assert!(account.hold(&budget, Cost::from_usd(1.0), morning).is_ok());
    }

    #[tokio::test]
    async fn a_total_budget_never_renews() {
        let account = account().await;
        let budget = budget(0.5, Period::Total);
        account
            .ready(budget.period, JAN_31_LATE, nothing_stored)
            .await
            .expect("read");
        let start = account
            .hold(&budget, Cost::from_usd(0.5), JAN_31_LATE)
            .expect("fits");
        account.end(start, Cost::from_usd(0.5), Cost::from_usd(0.5));
        let years_later = JAN_31_LATE + 3 * 365 * DAY_SECONDS;
        assert_eq!(
            account.hold(&budget, Cost(1), years_later),
            Err(Short::Spent {
                remaining: Cost::ZERO,
                renews: None
            })
        );
    }
}
