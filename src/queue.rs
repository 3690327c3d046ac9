//! Admission: place a request on a node now, or wait in a bounded FIFO
//! until one has headroom, or refuse with an honest `Retry-After`.
//!
//! Fast path: while nobody waits, a request is placed directly
//! ([`Queue::place`]): no queue lock is taken. Once anyone waits, new requests join
//! the queue behind them, so requests competing for the same nodes are
//! served first come, first served.
//!
//! One dispatcher task serves the queue. It runs a pass whenever capacity may
//! have been freed (a reservation released, a quota changed, a waiter
//! arrived) and when the earliest window slide it computed is due. A pass
//! walks the waiters in arrival order; a waiter that cannot be placed blocks
//! its candidate nodes for the rest of the pass, so a later waiter never
//! overtakes it on those nodes, while a later waiter that another node can
//! serve is placed at once.
//!
//! Invariants: a waiter leaves the queue when placed, when its deadline
//! passes, or the moment its client goes away (its `WaiterGuard` drops).
//! A placement sent to a waiter that has just gone is dropped with the
//! unsent message, which releases its reservation.
//!
//! A config reload while requests wait: the next pass moves each waiter to
//! the new snapshot (its candidates recomputed for its model), so it can go
//! to a node the reload added and never to one it removed. Its placement
//! then carries that snapshot, and the request continues with it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::GatewayError;
use crate::limits::{Demand, HeadroomSignal, Limit, Outlook, Reservation};
use crate::selection;
use crate::state::Live;

/// A request placed on a node.
#[derive(Debug)]
pub struct Placement {
    /// Index into the snapshot's nodes.
    pub node: usize,
    pub reservation: Reservation,
    /// The snapshot `node` indexes, when it is not the one the request
    /// began with (it waited through a reload).
    pub rebased: Option<Arc<Live>>,
}

struct Waiter {
    id: u64,
    live: Arc<Live>,
    /// The generation of the snapshot the request began with.
    first_generation: u64,
    /// The model it asked for, to find its candidates again after a reload.
    model: Option<Box<str>>,
    candidates: Arc<[usize]>,
    excluded: Vec<usize>,
    demand: Demand,
    reply: Option<oneshot::Sender<Result<Placement, GatewayError>>>,
}

/// The waiting requests and the counter that rotates among equal nodes.
pub struct Queue {
    waiters: Mutex<VecDeque<Waiter>>,
    /// The gateway's current snapshot, to move waiters to after a reload.
    latest: Arc<ArcSwap<Live>>,
    signal: Arc<HeadroomSignal>,
    next_id: AtomicU64,
    rotation: AtomicUsize,
    /// Requests that have waited in the queue, since start.
    queued_total: AtomicU64,
    /// Requests refused as saturated (429), since start.
    refused_total: AtomicU64,
    /// Requests waiting for headroom in the shared windows ([`crate::cluster`]).
    shared_waiting: AtomicUsize,
}

/// A request waiting for shared headroom: counted in the queue's depth
/// until dropped.
#[derive(Debug)]
pub struct SharedWaiter<'a> {
    count: &'a AtomicUsize,
}

impl Drop for SharedWaiter<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Queue {
    pub fn new(signal: Arc<HeadroomSignal>, latest: Arc<ArcSwap<Live>>) -> Self {
        Self {
            waiters: Mutex::new(VecDeque::new()),
            latest,
            signal,
            next_id: AtomicU64::new(0),
            rotation: AtomicUsize::new(0),
            queued_total: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
            shared_waiting: AtomicUsize::new(0),
        }
    }

    /// The next turn of the rotation among equally loaded nodes.
    pub fn next_rotation(&self) -> usize {
        self.rotation.fetch_add(1, Ordering::Relaxed)
    }

    /// Requests waiting now, here and for shared headroom.
    pub fn depth(&self) -> usize {
        self.signal.waiting() + self.shared_waiting.load(Ordering::Acquire)
    }

    /// Joins the requests waiting for shared headroom, unless `max_depth`
    /// already wait.
    pub fn wait_shared(&self, max_depth: usize) -> Option<SharedWaiter<'_>> {
        let shared = self.shared_waiting.fetch_add(1, Ordering::AcqRel);
        let waiter = SharedWaiter {
            count: &self.shared_waiting,
        };
        if shared + self.signal.waiting() >= max_depth {
            return None;
        }
        self.queued_total.fetch_add(1, Ordering::Relaxed);
        Some(waiter)
    }

    /// Counts a request refused as saturated outside [`admit`](Self::admit).
    pub fn refused(&self) {
        self.refused_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests that have waited for headroom, since start.
    pub fn queued_total(&self) -> u64 {
        self.queued_total.load(Ordering::Relaxed)
    }

    /// Requests refused as saturated, since start.
    pub fn refused_total(&self) -> u64 {
        self.refused_total.load(Ordering::Relaxed)
    }

    /// Places the request for `model` now, waits for headroom, or refuses it.
    pub async fn admit(
        &self,
        live: &Arc<Live>,
        model: Option<&str>,
        candidates: &Arc<[usize]>,
        excluded: &[usize],
        demand: Demand,
        deadline: Instant,
    ) -> Result<Placement, GatewayError> {
        let admitted = self
            .admit_or_wait(live, model, candidates, excluded, demand, deadline)
            .await;
        if let Err(GatewayError::Saturated { .. }) = admitted {
            self.refused_total.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    async fn admit_or_wait(
        &self,
        live: &Arc<Live>,
        model: Option<&str>,
        candidates: &Arc<[usize]>,
        excluded: &[usize],
        demand: Demand,
        deadline: Instant,
    ) -> Result<Placement, GatewayError> {
        if self.depth() == 0
            && let Some(placed) = self.place(live, candidates, excluded, demand, Instant::now())
        {
            return Ok(placed);
        }

        let now = Instant::now();
        let max_wait = live.config.queue.max_wait;
        let retry_after = match combined_outlook(live, candidates, excluded, demand, now) {
            Combined::Never(err) => return Err(err),
            Combined::OutOfRotation(retry_after) => {
                return Err(GatewayError::NoHealthyNode { retry_after });
            }
            Combined::At(at) if at > now + max_wait => {
                return Err(GatewayError::Saturated {
                    retry_after: at - now,
                });
            }
            Combined::At(at) => at - now,
            Combined::Soon => Duration::from_secs(1),
        };
        let (guard, placed) = {
            let mut waiters = self.waiters.lock();
            if waiters.len() >= live.config.queue.max_depth {
                return Err(GatewayError::Saturated { retry_after });
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (reply, placed) = oneshot::channel();
            waiters.push_back(Waiter {
                id,
                live: Arc::clone(live),
                first_generation: live.generation,
                model: model.map(Box::from),
                candidates: Arc::clone(candidates),
                excluded: excluded.to_vec(),
                demand,
                reply: Some(reply),
            });
            self.signal.set_waiting(waiters.len());
            self.queued_total.fetch_add(1, Ordering::Relaxed);
            (WaiterGuard { queue: self, id }, placed)
        };
        self.signal.poke();

        let wait_until = deadline.min(now + max_wait);
        let outcome = tokio::time::timeout_at(wait_until, placed).await;
        drop(guard);
        match outcome {
            Ok(Ok(placed)) => placed,
            Ok(Err(_)) => Err(GatewayError::ShuttingDown),
            Err(_elapsed) => {
                let now = Instant::now();
                let retry_after = match combined_outlook(live, candidates, excluded, demand, now) {
                    Combined::At(at) => at.saturating_duration_since(now),
                    Combined::Never(err) => return Err(err),
                    Combined::OutOfRotation(retry_after) => {
                        return Err(GatewayError::NoHealthyNode { retry_after });
                    }
                    Combined::Soon => Duration::from_secs(1),
                };
                Err(GatewayError::Saturated { retry_after })
            }
        }
    }

    /// Reserves on the least-loaded candidate that fits now, if any.
    pub fn place(
        &self,
        live: &Live,
        candidates: &[usize],
        excluded: &[usize],
        demand: Demand,
        now: Instant,
    ) -> Option<Placement> {
        let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
        place_with(live, candidates, excluded, demand, now, rotation)
    }

    /// Runs passes until `cancel` fires.
    pub async fn dispatch(&self, cancel: CancellationToken) {
        loop {
            let next_slide = self.pass(Instant::now());
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.signal.notified() => {}
                () = tokio::time::sleep_until(next_slide.unwrap_or(far)) => {}
            }
        }
        // Waiters learn of the shutdown when their reply sender drops.
        self.waiters.lock().clear();
        self.signal.set_waiting(0);
    }

    /// One pass over the waiters; returns when a window slide may next help.
    fn pass(&self, now: Instant) -> Option<Instant> {
        let latest = self.latest.load();
        let mut waiters = self.waiters.lock();
        let mut blocked: Vec<u64> = Vec::new();
        let mut next_slide: Option<Instant> = None;
        waiters.retain_mut(|waiter| {
            let Some(reply) = waiter.reply.take_if(|r| !r.is_closed()) else {
                return false;
            };
            if waiter.live.generation != latest.generation {
                match latest.candidates(waiter.model.as_deref()) {
                    Ok(candidates) => {
                        waiter.live = Arc::clone(&latest);
                        waiter.candidates = candidates;
                        // Only a first attempt queues: nothing was tried yet.
                        waiter.excluded.clear();
                    }
                    Err(err) => {
                        // The reload took its model away.
                        let _ = reply.send(Err(err));
                        return false;
                    }
                }
            }
            let live = &waiter.live;
            let is_open = |i: &usize| {
                !waiter.excluded.contains(i) && !blocked.contains(&live.nodes[*i].usage.id())
            };
            let open: Vec<usize> = waiter.candidates.iter().copied().filter(is_open).collect();
            if !open.is_empty()
                && let Some(mut placement) = self.place(live, &open, &[], waiter.demand, now)
            {
                if live.generation != waiter.first_generation {
                    placement.rebased = Some(Arc::clone(live));
                }
                // A refused send means the client left; the reservation drops.
                let _ = reply.send(Ok(placement));
                return false;
            }
            for &i in waiter.candidates.iter() {
                blocked.push(live.nodes[i].usage.id());
                if let Outlook::At(at) = live.nodes[i].usage.outlook(waiter.demand, now) {
                    next_slide = Some(next_slide.map_or(at, |t| t.min(at)));
                }
            }
            waiter.reply = Some(reply);
            true
        });
        self.signal.set_waiting(waiters.len());
        next_slide
    }
}

/// Removes its waiter from the queue when the request stops waiting for any
/// reason, including the client going away.
struct WaiterGuard<'q> {
    queue: &'q Queue,
    id: u64,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        let mut waiters = self.queue.waiters.lock();
        if let Some(at) = waiters.iter().position(|w| w.id == self.id) {
            waiters.remove(at);
        }
        self.queue.signal.set_waiting(waiters.len());
    }
}

fn place_with(
    live: &Live,
    candidates: &[usize],
    excluded: &[usize],
    demand: Demand,
    now: Instant,
    rotation: usize,
) -> Option<Placement> {
    // Another request may take the chosen node's last headroom between the
    // look and the reservation; then that node is skipped and we choose again.
    let mut lost_race: Vec<usize> = Vec::new();
    loop {
        let eligible = candidates
            .iter()
            .copied()
            .filter(|i| !excluded.contains(i) && !lost_race.contains(i))
            .filter(|&i| live.nodes[i].health.in_rotation())
            .filter_map(|i| {
                live.nodes[i]
                    .usage
                    .load_if_fits(demand, now)
                    .map(|l| (i, l))
            });
        let node = selection::choose(eligible, rotation, live.nodes.len())?;
        match live.nodes[node].usage.try_reserve(demand, now) {
            Some(reservation) => {
                return Some(Placement {
                    node,
                    reservation,
                    rebased: None,
                });
            }
            None => lost_race.push(node),
        }
    }
}

enum Combined {
    /// Headroom by this instant at the latest (the earliest over nodes).
    At(Instant),
    /// Headroom when a request in flight finishes: soon, but unknown.
    Soon,
    Never(GatewayError),
    /// Every candidate is out of rotation (unhealthy, ejected, key refused
    /// or removed); one may be back after this long.
    OutOfRotation(Duration),
}

/// The `Retry-After` when no candidate is in rotation and none says when
/// it may be back (a refused key waits for a reload).
const OUT_OF_ROTATION_RETRY: Duration = Duration::from_secs(5);

fn combined_outlook(
    live: &Live,
    candidates: &[usize],
    excluded: &[usize],
    demand: Demand,
    now: Instant,
) -> Combined {
    let mut earliest: Option<Instant> = None;
    let mut soon = false;
    let mut never: Option<Limit> = None;
    let mut back_in: Option<Duration> = None;
    let mut out_of_rotation = false;
    for &i in candidates.iter().filter(|i| !excluded.contains(i)) {
        let node = &live.nodes[i];
        if !node.health.in_rotation() {
            out_of_rotation = true;
            if let Some(d) = node.health.back_in(now, &live.config.health) {
                back_in = Some(back_in.map_or(d, |t| t.min(d)));
            }
            continue;
        }
        match node.usage.outlook(demand, now) {
            Outlook::Now => earliest = Some(now),
            Outlook::At(at) => earliest = Some(earliest.map_or(at, |t| t.min(at))),
            Outlook::OnRelease => soon = true,
            Outlook::Never(limit) => never = never.or(Some(limit)),
            Outlook::Retired => out_of_rotation = true,
        }
    }
    match (earliest, soon, never) {
        (Some(at), _, _) => Combined::At(at),
        (None, true, _) => Combined::Soon,
        (None, false, Some(limit)) => Combined::Never(too_large(live, candidates, limit, demand)),
        (None, false, None) if out_of_rotation => Combined::OutOfRotation(
            back_in
                .filter(|d| !d.is_zero())
                .unwrap_or(OUT_OF_ROTATION_RETRY),
        ),
        // No candidate left at all (every one excluded): as good as saturated.
        (None, false, None) => Combined::Soon,
    }
}

pub(crate) fn too_large(
    live: &Live,
    candidates: &[usize],
    limit: Limit,
    demand: Demand,
) -> GatewayError {
    let now = Instant::now();
    let largest = candidates
        .iter()
        .filter_map(|&i| live.nodes[i].usage.snapshot(now).quota.of(limit))
        .max()
        .unwrap_or(0);
    GatewayError::request_too_large(limit, demand.of(limit), largest)
}
