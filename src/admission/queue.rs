//! The local waiting room: place a request on a node now, or wait in a
//! bounded FIFO until one has headroom, or refuse (and say why, for the
//! refusal policy to word).
//!
//! Fast path: while nobody waits, a request is placed directly
//! ([`Queue::place`]): no queue lock is taken. Once anyone waits, new requests join
//! the queue, and requests competing for the same nodes are served in the
//! fair order ([`fair`](super::fair)): a higher priority class first, then
//! clients in proportion to their weights in tokens, each client's own
//! requests first come, first served. One client may have at most
//! `queue.max_depth_per_client` requests waiting.
//!
//! One dispatcher task serves the queue. It runs a pass whenever capacity may
//! have been freed (a reservation released, a quota changed, a waiter
//! arrived) and when the earliest window slide it computed is due. A pass
//! walks the waiters in the fair order; a waiter that cannot be placed
//! blocks its candidate nodes for the rest of the pass, so a waiter after
//! it never overtakes it on those nodes, while one that another node can
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

use super::fair::{Fairness, Turn, Who};
use super::refusal::{self, Headroom, Refusal};
use super::{Booking, Placement};
use crate::limits::{Demand, HeadroomSignal, Limit, Outlook};
use crate::selection;
use crate::snapshot::{Live, NodeId};

struct Waiter {
    id: u64,
    live: Arc<Live>,
    /// The generation of the snapshot the request began with.
    first_generation: u64,
    /// The model it asked for, to find its candidates again after a reload.
    model: Option<Box<str>>,
    candidates: Arc<[NodeId]>,
    excluded: Vec<NodeId>,
    demand: Demand,
    /// Its client, and its place in the fair order.
    who: Who,
    turn: Turn,
    reply: Option<oneshot::Sender<Result<Placement, Refusal>>>,
}

/// The waiters in arrival order, the requests waiting for shared
/// headroom (with `[cluster]`), and the fair order's bookkeeping.
#[derive(Default)]
struct Waiting {
    list: VecDeque<Waiter>,
    line: Vec<InLine>,
    fair: Fairness,
}

/// A request waiting for headroom in the shared windows: its place in the
/// fair order and the nodes it waits for.
struct InLine {
    id: u64,
    owner: Arc<str>,
    turn: Turn,
    candidates: Arc<[NodeId]>,
}

/// The waiting requests and the counter that rotates among equal nodes.
pub struct Queue {
    waiters: Mutex<Waiting>,
    /// The gateway's current snapshot, to move waiters to after a reload.
    latest: Arc<ArcSwap<Live>>,
    signal: Arc<HeadroomSignal>,
    next_id: AtomicU64,
    rotation: AtomicUsize,
    /// Requests that have waited in the queue, since start.
    queued_total: AtomicU64,
    /// Requests refused as saturated (429), since start.
    refused_total: AtomicU64,
    /// Requests waiting for headroom in the shared windows.
    shared_waiting: AtomicUsize,
    /// Rings when a request leaves the shared line: the next may try.
    line_moved: tokio::sync::Notify,
}

/// A request's place in the line for shared headroom; it leaves the line
/// when dropped.
#[derive(Debug)]
pub(crate) struct LinePlace<'q> {
    queue: &'q Queue,
    id: u64,
}

impl LinePlace<'_> {
    /// The request was placed: its class's virtual time moves on.
    pub(crate) fn placed(self) {
        let mut waiting = self.queue.waiters.lock();
        if let Some(entry) = waiting.line.iter().find(|e| e.id == self.id) {
            let turn = entry.turn;
            waiting.fair.dispatched(&turn);
        }
    }
}

impl Drop for LinePlace<'_> {
    fn drop(&mut self) {
        let mut waiting = self.queue.waiters.lock();
        let Waiting { line, fair, .. } = &mut *waiting;
        if let Some(at) = line.iter().position(|e| e.id == self.id) {
            let entry = line.swap_remove(at);
            fair.left(&entry.owner);
        }
        self.queue
            .shared_waiting
            .store(line.len(), Ordering::Release);
        drop(waiting);
        self.queue.line_moved.notify_waiters();
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("depth", &self.depth())
            .finish_non_exhaustive()
    }
}

impl Queue {
    pub fn new(signal: Arc<HeadroomSignal>, latest: Arc<ArcSwap<Live>>) -> Self {
        Self {
            waiters: Mutex::new(Waiting::default()),
            latest,
            signal,
            next_id: AtomicU64::new(0),
            rotation: AtomicUsize::new(0),
            queued_total: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
            shared_waiting: AtomicUsize::new(0),
            line_moved: tokio::sync::Notify::new(),
        }
    }

    /// The next turn of the rotation among equally loaded nodes.
    pub fn next_rotation(&self) -> usize {
        self.rotation.fetch_add(1, Ordering::Relaxed)
    }

    /// `owner`'s requests waiting now for a node.
    pub(crate) fn waiting_of(&self, owner: &str) -> usize {
        self.waiters.lock().fair.waiting(owner)
    }

    /// Requests waiting now, here and for shared headroom.
    pub fn depth(&self) -> usize {
        self.signal.waiting() + self.shared_waiting.load(Ordering::Acquire)
    }

    /// Joins the line of requests waiting for shared headroom (for
    /// `candidates`), in the fair order; unless `queue.max_depth` requests
    /// wait, or `queue.max_depth_per_client` of this client's.
    pub(crate) fn join_line(
        &self,
        live: &Live,
        candidates: &Arc<[NodeId]>,
        demand: Demand,
        who: &Who,
    ) -> Option<LinePlace<'_>> {
        let mut waiting = self.waiters.lock();
        let full = waiting.list.len() + waiting.line.len() >= live.config.queue.max_depth
            || waiting.fair.waiting(&who.owner) >= live.config.queue.max_depth_per_client;
        if full {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let turn = waiting.fair.arrive(who, demand, id);
        waiting.line.push(InLine {
            id,
            owner: Arc::clone(&who.owner),
            turn,
            candidates: Arc::clone(candidates),
        });
        self.shared_waiting
            .store(waiting.line.len(), Ordering::Release);
        self.queued_total.fetch_add(1, Ordering::Relaxed);
        Some(LinePlace { queue: self, id })
    }

    /// Which of `candidates` a request may ask the shared windows for now:
    /// those no request waiting in the line ahead of it (`me`: its place,
    /// if it has one) waits for. A node nobody ahead can use is never
    /// held back.
    pub(crate) fn free_of_line(
        &self,
        me: Option<&LinePlace<'_>>,
        candidates: &[NodeId],
    ) -> Vec<usize> {
        let waiting = self.waiters.lock();
        let mine = me.and_then(|me| waiting.line.iter().find(|e| e.id == me.id));
        let ahead = |other: &InLine| match mine {
            Some(mine) => other.id != mine.id && other.turn.before(&mine.turn).is_lt(),
            None => true,
        };
        (0..candidates.len())
            .filter(|&at| {
                !waiting
                    .line
                    .iter()
                    .any(|other| ahead(other) && other.candidates.contains(&candidates[at]))
            })
            .collect()
    }

    /// Resolves when a request leaves the shared line.
    pub fn line_moved(&self) -> tokio::sync::futures::Notified<'_> {
        self.line_moved.notified()
    }

    /// Counts a request refused as saturated.
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

    /// Places the request of `who` for `model` now, waits for headroom,
    /// or says why not.
    pub(crate) async fn admit(
        &self,
        live: &Arc<Live>,
        model: Option<&str>,
        candidates: &Arc<[NodeId]>,
        demand: Demand,
        who: &Who,
        deadline: Instant,
    ) -> Result<Placement, Refusal> {
        let excluded: &[NodeId] = &[];
        if self.depth() == 0
            && let Some(placed) = self.place(live, candidates, excluded, demand, Instant::now())
        {
            return Ok(placed);
        }

        let now = Instant::now();
        let max_wait = live.config.queue.max_wait;
        let headroom = match combined_outlook(live, candidates, excluded, demand, now) {
            Err(refusal) => return Err(refusal),
            Ok(Some(at)) if at > now + max_wait => {
                return Err(Refusal::Saturated(Headroom::at(Some(at), now)));
            }
            Ok(at) => Headroom::at(at, now),
        };
        let (guard, placed) = {
            let mut waiting = self.waiters.lock();
            if waiting.list.len() >= live.config.queue.max_depth
                || waiting.fair.waiting(&who.owner) >= live.config.queue.max_depth_per_client
            {
                return Err(Refusal::Saturated(headroom));
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let turn = waiting.fair.arrive(who, demand, id);
            let (reply, placed) = oneshot::channel();
            waiting.list.push_back(Waiter {
                id,
                live: Arc::clone(live),
                first_generation: live.generation,
                model: model.map(Box::from),
                candidates: Arc::clone(candidates),
                excluded: excluded.to_vec(),
                demand,
                who: who.clone(),
                turn,
                reply: Some(reply),
            });
            self.signal.set_waiting(waiting.list.len());
            self.queued_total.fetch_add(1, Ordering::Relaxed);
            (WaiterGuard { queue: self, id }, placed)
        };
        self.signal.poke();

        let wait_until = deadline.min(now + max_wait);
        let outcome = tokio::time::timeout_at(wait_until, placed).await;
        drop(guard);
        match outcome {
            Ok(Ok(placed)) => placed,
            Ok(Err(_)) => Err(Refusal::ShuttingDown),
            Err(_elapsed) => {
                let now = Instant::now();
                let at = combined_outlook(live, candidates, excluded, demand, now)?;
                Err(Refusal::Saturated(Headroom::at(at, now)))
            }
        }
    }

    /// Reserves on the least-loaded candidate that fits now, if any.
    pub fn place(
        &self,
        live: &Live,
        candidates: &[NodeId],
        excluded: &[NodeId],
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
        *self.waiters.lock() = Waiting::default();
        self.signal.set_waiting(0);
    }

    /// One pass over the waiters, in the fair order; returns when a window
    /// slide may next help.
    fn pass(&self, now: Instant) -> Option<Instant> {
        let latest = self.latest.load();
        let mut waiting = self.waiters.lock();
        let Waiting { list, fair, .. } = &mut *waiting;
        let mut order: Vec<usize> = (0..list.len()).collect();
        order.sort_by(|a, b| list[*a].turn.before(&list[*b].turn));
        let mut blocked: Vec<u64> = Vec::new();
        let mut next_slide: Option<Instant> = None;
        let mut gone = vec![false; list.len()];
        for at in order {
            let waiter = &mut list[at];
            match self.try_waiter(waiter, &latest, &blocked, now) {
                Tried::Gone => gone[at] = true,
                Tried::Placed => {
                    fair.dispatched(&waiter.turn);
                    gone[at] = true;
                }
                Tried::Waits => {
                    for &id in waiter.candidates.iter() {
                        let limiter = &waiter.live.node(id).limiter;
                        blocked.push(limiter.id());
                        if let Outlook::At(at) = limiter.outlook(waiter.demand, now) {
                            next_slide = Some(next_slide.map_or(at, |t| t.min(at)));
                        }
                    }
                }
            }
        }
        let mut index = 0;
        list.retain(|waiter| {
            let keep = !gone[index];
            index += 1;
            if !keep {
                fair.left(&waiter.who.owner);
            }
            keep
        });
        fair.prune();
        self.signal.set_waiting(list.len());
        next_slide
    }

    /// Tries to place one waiter on its candidates not `blocked`.
    fn try_waiter(
        &self,
        waiter: &mut Waiter,
        latest: &Arc<Live>,
        blocked: &[u64],
        now: Instant,
    ) -> Tried {
        let Some(reply) = waiter.reply.take_if(|r| !r.is_closed()) else {
            return Tried::Gone;
        };
        if waiter.who.is_revoked() {
            let _ = reply.send(Err(Refusal::ClientGone));
            return Tried::Gone;
        }
        if waiter.live.generation != latest.generation {
            match latest.candidates(waiter.model.as_deref()) {
                Ok(candidates) => {
                    waiter.live = Arc::clone(latest);
                    waiter.candidates = candidates;
                    // Only a first attempt queues: nothing was tried yet.
                    waiter.excluded.clear();
                }
                Err(_) => {
                    // The reload took its model away.
                    let model = waiter.model.as_deref().unwrap_or_default().to_owned();
                    let _ = reply.send(Err(Refusal::ModelGone(model)));
                    return Tried::Gone;
                }
            }
        }
        let live = &waiter.live;
        let is_open = |id: &NodeId| {
            !waiter.excluded.contains(id) && !blocked.contains(&live.node(*id).limiter.id())
        };
        let open: Vec<NodeId> = waiter.candidates.iter().copied().filter(is_open).collect();
        if !open.is_empty()
            && let Some(mut placement) = self.place(live, &open, &[], waiter.demand, now)
        {
            if live.generation != waiter.first_generation {
                placement.rebased = Some(Arc::clone(live));
            }
            // A refused send means the client left; the reservation drops.
            let _ = reply.send(Ok(placement));
            return Tried::Placed;
        }
        waiter.reply = Some(reply);
        Tried::Waits
    }
}

/// What one waiter's turn in a pass came to.
enum Tried {
    /// Its client left (or its model did): it leaves the queue.
    Gone,
    Placed,
    /// It waits on; its candidates are blocked for the rest of the pass.
    Waits,
}

/// Removes its waiter from the queue when the request stops waiting for any
/// reason, including the client going away.
struct WaiterGuard<'q> {
    queue: &'q Queue,
    id: u64,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        let mut waiting = self.queue.waiters.lock();
        let Waiting { list, fair, .. } = &mut *waiting;
        if let Some(at) = list.iter().position(|w| w.id == self.id)
            && let Some(waiter) = list.remove(at)
        {
            fair.left(&waiter.who.owner);
        }
        self.queue.signal.set_waiting(list.len());
    }
}

fn place_with(
    live: &Live,
    candidates: &[NodeId],
    excluded: &[NodeId],
    demand: Demand,
    now: Instant,
    rotation: usize,
) -> Option<Placement> {
    // Another request may take the chosen node's last headroom between the
    // look and the reservation; then that node is skipped and we choose again.
    let mut lost_race: Vec<NodeId> = Vec::new();
    loop {
        let eligible = candidates
            .iter()
            .copied()
            .filter(|id| !excluded.contains(id) && !lost_race.contains(id))
            .filter(|&id| live.node(id).health.in_rotation())
            .filter_map(|id| {
                live.node(id)
                    .limiter
                    .load_if_fits(demand, now)
                    .map(|load| (id, (live.tier(id), load)))
            });
        let node = selection::choose(eligible, rotation, live.node_count())?;
        match live.node(node).limiter.try_reserve(demand, now) {
            Some(reservation) => {
                return Some(Placement {
                    node,
                    booking: Booking::local(reservation),
                    rebased: None,
                });
            }
            None => lost_race.push(node),
        }
    }
}

/// When the request could be placed, looking at every candidate not
/// excluded: `Ok(Some(at))` by that instant at the latest, `Ok(None)` when
/// a request in flight ends; or why it never can be (too large, nothing in
/// rotation).
fn combined_outlook(
    live: &Live,
    candidates: &[NodeId],
    excluded: &[NodeId],
    demand: Demand,
    now: Instant,
) -> Result<Option<Instant>, Refusal> {
    if let Some(refusal) = refusal::out_of_rotation(live, candidates, excluded, now) {
        return Err(refusal);
    }
    let mut earliest: Option<Instant> = None;
    let mut on_release = false;
    let mut never: Option<Limit> = None;
    let mut retired = false;
    for &id in candidates.iter().filter(|id| !excluded.contains(id)) {
        let node = live.node(id);
        if !node.health.in_rotation() {
            continue;
        }
        match node.limiter.outlook(demand, now) {
            Outlook::Now => earliest = Some(now),
            Outlook::At(at) => earliest = Some(earliest.map_or(at, |t| t.min(at))),
            Outlook::OnRelease => on_release = true,
            Outlook::Never(limit) => never = never.or(Some(limit)),
            // Removed by a reload: out of rotation for good.
            Outlook::Retired => retired = true,
        }
    }
    match (earliest, on_release, never) {
        (Some(at), _, _) => Ok(Some(at)),
        (None, true, _) => Ok(None),
        (None, false, Some(limit)) => Err(refusal::too_large(live, candidates, limit, demand)),
        (None, false, None) if retired => Err(Refusal::OutOfRotation(None)),
        // No candidate left at all (every one excluded): as good as saturated.
        (None, false, None) => Ok(None),
    }
}
