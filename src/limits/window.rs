//! The rolling window: a ring of 100 ms slots with a running total, so a
//! headroom check is O(1) and advancing costs one step per elapsed slot.
//!
//! Invariant: an amount added at slot `i` counts in `total` until the window
//! has advanced to slot `i + SLOTS`, and never after; [`Window::sub`] never
//! takes more from a slot than the slot holds.

use std::time::Duration;

use tokio::time::Instant;

use super::{Limit, SLOT, SLOTS};

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

/// A rolling 60 s window of 100 ms slots with a running total.
#[derive(Debug)]
pub(super) struct Window {
    origin: Instant,
    slots: Vec<Slot>,
    /// The newest slot index the window has advanced to.
    pub head: u64,
    pub total: Amounts,
}

impl Window {
    pub(super) fn new(origin: Instant) -> Self {
        Self {
            origin,
            slots: vec![Slot::default(); SLOTS as usize],
            head: 0,
            total: Amounts::default(),
        }
    }

    pub(super) fn slot_of(&self, at: Instant) -> u64 {
        let elapsed = at.saturating_duration_since(self.origin);
        (elapsed.as_millis() / SLOT.as_millis()) as u64
    }

    /// When the amounts recorded in slot `index` stop counting.
    pub(super) fn expiry_of(&self, index: u64) -> Instant {
        self.origin + Duration::from_millis((index + SLOTS) * SLOT.as_millis() as u64)
    }

    /// Drops every slot that has left the window at slot `now`.
    pub(super) fn advance(&mut self, now: u64) {
        if now <= self.head {
            return;
        }
        if now - self.head >= SLOTS {
            self.slots.fill(Slot::default());
            self.total = Amounts::default();
        } else {
            for index in self.head + 1..=now {
                let slot = &mut self.slots[(index % SLOTS) as usize];
                self.total.sub(slot.amounts);
                *slot = Slot {
                    index,
                    amounts: Amounts::default(),
                };
            }
        }
        self.head = now;
    }

    fn is_live(&self, index: u64) -> bool {
        index + SLOTS > self.head && index <= self.head
    }

    pub(super) fn add(&mut self, index: u64, amounts: Amounts) {
        if !self.is_live(index) {
            return;
        }
        let slot = &mut self.slots[(index % SLOTS) as usize];
        if slot.index == index {
            slot.amounts.add(amounts);
            self.total.add(amounts);
        }
    }

    pub(super) fn sub(&mut self, index: u64, amounts: Amounts) {
        if !self.is_live(index) {
            return;
        }
        let slot = &mut self.slots[(index % SLOTS) as usize];
        if slot.index == index {
            let mut taken = amounts;
            taken.requests = taken.requests.min(slot.amounts.requests);
            taken.tokens = taken.tokens.min(slot.amounts.tokens);
            taken.bytes = taken.bytes.min(slot.amounts.bytes);
            slot.amounts.sub(taken);
            self.total.sub(taken);
        }
    }

    /// The first instant at which at least `need` of one amount has expired.
    pub(super) fn freed_at(&self, need: u64, limit: Limit) -> Option<Instant> {
        let oldest = self.head.saturating_sub(SLOTS - 1);
        let mut freed: u64 = 0;
        for index in oldest..=self.head {
            let slot = &self.slots[(index % SLOTS) as usize];
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
