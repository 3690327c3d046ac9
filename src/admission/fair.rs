//! The order waiting requests are dispatched in: priority classes first,
//! then weighted fair queueing within a class.
//!
//! Within a class, each waiting request gets a start and a finish tag in
//! the class's virtual time (start-time fair queueing): its start is the
//! later of the class's virtual time and its client's last finish, its
//! finish is the start plus its tokens over its client's weight. Waiters
//! are dispatched by finish tag, so clients that keep requests waiting are
//! served tokens in proportion to their weights, and one client's requests
//! keep their arrival order. The class's virtual time moves to the start
//! of each request dispatched; a client that was idle starts at the
//! virtual time, so it banks no credit for the time it sent nothing.
//!
//! Invariants: a client's finish tags only grow; the class's virtual time
//! only grows; every client's count of waiters is the number of its
//! requests in the queue (it goes to zero, and the entry away, with the
//! last).

use std::collections::HashMap;
use std::sync::Arc;

use crate::clients::ClientLimiter;
#[cfg(test)]
use crate::limits::Priority;
use crate::limits::{Demand, Share};

/// Who a waiting request is for: its client (`""` for the shared group)
/// and how that client shares the pool.
#[derive(Debug, Clone)]
pub(crate) struct Who {
    pub(crate) owner: Arc<str>,
    pub(crate) share: Share,
    /// Its client's limiter, which says when the client is revoked.
    pub(crate) limiter: Option<Arc<ClientLimiter>>,
}

/// The owner of requests without a client of their own, made once (a
/// `Who` is built for every admission).
static SHARED_GROUP: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

impl Default for Who {
    fn default() -> Self {
        Who {
            owner: Arc::clone(&SHARED_GROUP),
            share: Share::default(),
            limiter: None,
        }
    }
}

impl Who {
    /// Whether its client was deleted, disabled or taken out of the config.
    pub(crate) fn is_revoked(&self) -> bool {
        self.limiter.as_ref().is_some_and(|l| l.is_revoked())
    }
}

/// A waiter's place in the order: class, then finish tag, then arrival.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Turn {
    pub(crate) rank: usize,
    pub(crate) start: f64,
    pub(crate) finish: f64,
    pub(crate) id: u64,
}

impl Turn {
    /// The dispatch order: a higher class first, then the earlier finish,
    /// then the earlier arrival.
    pub(crate) fn before(&self, other: &Turn) -> std::cmp::Ordering {
        self.rank
            .cmp(&other.rank)
            .then(self.finish.total_cmp(&other.finish))
            .then(self.id.cmp(&other.id))
    }
}

/// The classes' virtual times, each client's last finish tag, and each
/// client's waiters.
#[derive(Debug, Default)]
pub(crate) struct Fairness {
    virtual_time: [f64; 3],
    last_finish: HashMap<(usize, Arc<str>), f64>,
    waiting: HashMap<Arc<str>, usize>,
}

impl Fairness {
    /// How many requests `owner` has waiting.
    pub(crate) fn waiting(&self, owner: &str) -> usize {
        self.waiting.get(owner).copied().unwrap_or(0)
    }

    /// Tags a request of `who` asking `demand`, and counts it waiting.
    pub(crate) fn arrive(&mut self, who: &Who, demand: Demand, id: u64) -> Turn {
        let rank = who.share.priority.rank();
        let key = (rank, Arc::clone(&who.owner));
        let start = self
            .last_finish
            .get(&key)
            .copied()
            .unwrap_or(0.0)
            .max(self.virtual_time[rank]);
        let cost = demand.tokens.max(1) as f64 / who.share.weight;
        let finish = start + cost;
        self.last_finish.insert(key, finish);
        *self.waiting.entry(Arc::clone(&who.owner)).or_default() += 1;
        Turn {
            rank,
            start,
            finish,
            id,
        }
    }

    /// A request of `owner` with `turn` was dispatched: its class's virtual
    /// time reaches its start.
    pub(crate) fn dispatched(&mut self, turn: &Turn) {
        let time = &mut self.virtual_time[turn.rank];
        *time = time.max(turn.start);
    }

    /// A request of `owner` left the queue (dispatched, refused or gone).
    pub(crate) fn left(&mut self, owner: &Arc<str>) {
        if let Some(count) = self.waiting.get_mut(owner) {
            *count -= 1;
            if *count == 0 {
                self.waiting.remove(owner);
            }
        }
    }

    /// Forgets finish tags the virtual time has passed: they give their
    /// client nothing a fresh start would not.
    pub(crate) fn prune(&mut self) {
        let times = self.virtual_time;
        self.last_finish
            .retain(|(rank, _), finish| *finish > times[*rank]);
    }

    /// The class's virtual time, for tests.
    #[cfg(test)]
    pub(crate) fn virtual_time(&self, priority: Priority) -> f64 {
        self.virtual_time[priority.rank()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(owner: &str, priority: Priority, weight: f64) -> Who {
        Who {
            owner: Arc::from(owner),
            share: Share { priority, weight },
            limiter: None,
        }
    }

    fn asking(tokens: u64) -> Demand {
        Demand {
            tokens,
            ..Demand::default()
        }
    }

    /// Dispatches, in the fair order, until `count` are served; returns
    /// the owners in the order served.
    fn serve(
        fair: &mut Fairness,
        waiting: &mut Vec<(Turn, Arc<str>)>,
        count: usize,
    ) -> Vec<String> {
        let mut served = Vec::new();
        for _ in 0..count {
            waiting.sort_by(|a, b| a.0.before(&b.0));
            let (turn, owner) = waiting.remove(0);
            fair.dispatched(&turn);
            fair.left(&owner);
            served.push(owner.to_string());
        }
        served
    }

    #[test]
    fn two_equal_clients_alternate_whatever_their_arrival() {
        let mut fair = Fairness::default();
        let a = who("a", Priority::Normal, 1.0);
        let b = who("b", Priority::Normal, 1.0);
        let mut waiting = Vec::new();
        // A floods first; B's requests come after all of A's.
        for id in 0..10 {
            waiting.push((fair.arrive(&a, asking(100), id), Arc::clone(&a.owner)));
        }
        for id in 10..15 {
            waiting.push((fair.arrive(&b, asking(100), id), Arc::clone(&b.owner)));
        }
        let served = serve(&mut fair, &mut waiting, 10);
        assert_eq!(served, ["a", "b", "a", "b", "a", "b", "a", "b", "a", "b"]);
        assert_eq!(fair.waiting("b"), 0);
        assert_eq!(fair.waiting("a"), 5);
    }

    #[test]
    fn weights_share_tokens_not_requests() {
        let mut fair = Fairness::default();
        let heavy = who("heavy", Priority::Normal, 3.0);
        let light = who("light", Priority::Normal, 1.0);
        let mut waiting = Vec::new();
        for id in 0..40 {
            waiting.push((
                fair.arrive(&heavy, asking(100), id),
                Arc::clone(&heavy.owner),
            ));
            // The light client's requests are twice as large.
            waiting.push((
                fair.arrive(&light, asking(200), 100 + id),
                Arc::clone(&light.owner),
            ));
        }
        let served = serve(&mut fair, &mut waiting, 28);
        let tokens =
            |name: &str, each: u64| served.iter().filter(|s| *s == name).count() as u64 * each;
        // 3:1 in tokens: heavy 2,400 of 3,200 served tokens, light 800.
        assert_eq!((tokens("heavy", 100), tokens("light", 200)), (2_400, 800));
    }

    #[test]
    fn a_higher_class_goes_first_and_an_idle_client_banks_nothing() {
        let mut fair = Fairness::default();
        let low = who("batch", Priority::Low, 1.0);
        let high = who("web", Priority::High, 1.0);
        let mut waiting = Vec::new();
        for id in 0..5 {
            waiting.push((fair.arrive(&low, asking(10), id), Arc::clone(&low.owner)));
        }
        waiting.push((fair.arrive(&high, asking(10), 5), Arc::clone(&high.owner)));
        assert_eq!(serve(&mut fair, &mut waiting, 2), ["web", "batch"]);
        // A normal client idle while the virtual time moved starts at it.
        let a = who("a", Priority::Normal, 1.0);
        let b = who("b", Priority::Normal, 1.0);
        let mut normal = Vec::new();
        for id in 10..20 {
            normal.push((fair.arrive(&a, asking(10), id), Arc::clone(&a.owner)));
        }
        serve(&mut fair, &mut normal, 8);
        let late = fair.arrive(&b, asking(10), 30);
        assert!(late.start >= fair.virtual_time(Priority::Normal));
        normal.push((late, Arc::clone(&b.owner)));
        // B is next, and after it A again: no run of B's banked turns.
        let late_again = fair.arrive(&b, asking(10), 31);
        normal.push((late_again, Arc::clone(&b.owner)));
        assert_eq!(serve(&mut fair, &mut normal, 4), ["b", "a", "b", "a"]);
        fair.prune();
    }
}
