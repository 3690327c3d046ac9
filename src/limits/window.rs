//! The rolling window: a ring of slots (100 ms for the minute, finer for a
//! short window) with a running total, so a headroom check is O(1) and
//! advancing costs one step per elapsed slot.
//!
//! Invariant: an amount added at slot `i` counts in `total` until the window
//! has advanced to slot `i + len` (its length in slots), and never after;
//! [`Window::sub`] never
//! takes more from a slot than the slot holds.

use std::time::Duration;

use tokio::time::Instant;

use super::Limit;

/// Request, token and byte amounts in one slot or window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Amounts {
    pub requests: u64,
    pub tokens: u64,
    pub bytes: u64,
}

impl Amounts {
    pub(super) fn of(&self, limit: Limit) -> u64 {
        match limit {
            Limit::Rpm => self.requests,
            Limit::Tpm => self.tokens,
            Limit::Bpm => self.bytes,
            Limit::MaxConcurrency => 0,
        }
    }

    pub(super) fn add(&mut self, other: Amounts) {
        // Saturating: a usage an upstream reports can be anything.
        self.requests = self.requests.saturating_add(other.requests);
        self.tokens = self.tokens.saturating_add(other.tokens);
        self.bytes = self.bytes.saturating_add(other.bytes);
    }

    pub(super) fn sub(&mut self, other: Amounts) {
        self.requests = self.requests.saturating_sub(other.requests);
        self.tokens = self.tokens.saturating_sub(other.tokens);
        self.bytes = self.bytes.saturating_sub(other.bytes);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    index: u64,
    amounts: Amounts,
}

/// A rolling window of `len` slots of `width` with a running total.
#[derive(Debug)]
pub(super) struct Window {
    origin: Instant,
    width: Duration,
    slots: Vec<Slot>,
    /// The newest slot index the window has advanced to.
    pub head: u64,
    pub total: Amounts,
}

impl Window {
    /// A window of `len` slots of `width` (at least a millisecond).
    pub(super) fn new(origin: Instant, len: u64, width: Duration) -> Self {
        Self {
            origin,
            width: width.max(Duration::from_millis(1)),
            slots: vec![Slot::default(); len.max(1) as usize],
            head: 0,
            total: Amounts::default(),
        }
    }

    /// A window of `len` slots of `width` holding what this one holds of
    /// its span: each slot's amounts go to the slot of the new window that
    /// holds its last instant, so nothing is forgotten early.
    pub(super) fn tail(&self, len: u64, width: Duration) -> Self {
        let mut tail = Self::new(self.origin, len, width);
        let head_end = self.end_of(self.head);
        tail.clear(tail.slot_of(head_end));
        for index in self.head.saturating_sub(self.len() - 1)..=self.head {
            let slot = self.slots[(index % self.len()) as usize];
            if slot.index == index && slot.amounts != Amounts::default() {
                tail.add(tail.slot_of(self.end_of(index)), slot.amounts);
            }
        }
        tail
    }

    /// The last instant (to the nanosecond) of slot `index`.
    fn end_of(&self, index: u64) -> Instant {
        self.start_of(index.saturating_add(1)) - Duration::from_nanos(1)
    }

    /// The first instant of slot `index`.
    fn start_of(&self, index: u64) -> Instant {
        let nanos = (self.width.as_nanos() as u64).saturating_mul(index);
        self.origin + Duration::from_nanos(nanos)
    }

    /// Its length in slots.
    pub(super) fn len(&self) -> u64 {
        self.slots.len() as u64
    }

    pub(super) fn slot_of(&self, at: Instant) -> u64 {
        let elapsed = at.saturating_duration_since(self.origin);
        (elapsed.as_nanos() / self.width.as_nanos()) as u64
    }

    /// When the amounts recorded in slot `index` stop counting.
    pub(super) fn expiry_of(&self, index: u64) -> Instant {
        self.start_of(index.saturating_add(self.len()))
    }

    /// Drops every slot that has left the window at slot `now`.
    pub(super) fn advance(&mut self, now: u64) {
        if now <= self.head {
            return;
        }
        if now - self.head >= self.len() {
            self.clear(now);
        } else {
            for index in self.head + 1..=now {
                let len = self.len();
                let slot = &mut self.slots[(index % len) as usize];
                self.total.sub(slot.amounts);
                *slot = Slot {
                    index,
                    amounts: Amounts::default(),
                };
            }
        }
        self.head = now;
    }

    /// Empties the window with its head at slot `head`: every slot it
    /// covers is stamped with its own index, empty.
    fn clear(&mut self, head: u64) {
        let len = self.len();
        for index in (head + 1).saturating_sub(len)..=head {
            self.slots[(index % len) as usize] = Slot {
                index,
                amounts: Amounts::default(),
            };
        }
        self.total = Amounts::default();
        self.head = head;
    }

    fn is_live(&self, index: u64) -> bool {
        index + self.len() > self.head && index <= self.head
    }

    pub(super) fn add(&mut self, index: u64, amounts: Amounts) {
        if !self.is_live(index) {
            return;
        }
        let len = self.len();
        let slot = &mut self.slots[(index % len) as usize];
        if slot.index == index {
            slot.amounts.add(amounts);
            self.total.add(amounts);
        }
    }

    pub(super) fn sub(&mut self, index: u64, amounts: Amounts) {
        if !self.is_live(index) {
            return;
        }
        let len = self.len();
        let slot = &mut self.slots[(index % len) as usize];
        if slot.index == index {
            let mut taken = amounts;
            taken.requests = taken.requests.min(slot.amounts.requests);
            taken.tokens = taken.tokens.min(slot.amounts.tokens);
            taken.bytes = taken.bytes.min(slot.amounts.bytes);
            slot.amounts.sub(taken);
            self.total.sub(taken);
        }
    }

    /// When everything counted of `limit` has expired: the expiry of the
    /// newest slot holding some (found from the head back, so under load at
    /// once); `None` when nothing is counted.
    pub(super) fn empty_at(&self, limit: Limit) -> Option<Instant> {
        if self.total.of(limit) == 0 {
            return None;
        }
        let oldest = self.head.saturating_sub(self.len() - 1);
        (oldest..=self.head).rev().find_map(|index| {
            let slot = &self.slots[(index % self.len()) as usize];
            (slot.index == index && slot.amounts.of(limit) > 0).then(|| self.expiry_of(index))
        })
    }

    /// The first instant at which at least `need` of one amount has expired.
    pub(super) fn freed_at(&self, need: u64, limit: Limit) -> Option<Instant> {
        let oldest = self.head.saturating_sub(self.len() - 1);
        let mut freed: u64 = 0;
        for index in oldest..=self.head {
            let slot = &self.slots[(index % self.len()) as usize];
            if slot.index != index {
                continue;
            }
            freed = freed.saturating_add(slot.amounts.of(limit));
            if freed >= need {
                return Some(self.expiry_of(index));
            }
        }
        None
    }
}
