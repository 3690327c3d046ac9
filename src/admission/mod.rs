//! Admission, the one door: may this request go, to which node, or why
//! not. [`Admission::admit`] takes what a request asks for ([`Ask`]: its
//! snapshot, model, candidates, demand, client and deadline) and returns a
//! placement, or a refusal worded by the one refusal policy
//! ([`refusal`]), whether limits are kept here or shared through Redis.
//!
//! In order, for a first attempt:
//! 1. the client's model list;
//! 2. with limits shared through Redis and Redis answering, one script
//!    checks the client's limits and the candidates' windows atomically and
//!    leases the least-loaded node with headroom ([`shared`]); this
//!    replica's own windows record the request too, for the fallback;
//! 3. otherwise (no `[cluster]`, or Redis away with `on_redis_error =
//!    "local"`) the client's own limits here ([`client`]), then the local
//!    waiting room ([`queue`]): placed now, after waiting, or refused. With
//!    `on_redis_error = "reject"` and Redis away: refused.
//!
//! The client's limits are checked once per request, in either mode; a
//! retry ([`Admission::place_retry`]) takes a node with headroom now and
//! never queues or counts the client again.
//!
//! What a request holds is a guard, so every path gives it back exactly
//! once: a [`Booking`] per attempt (the node's local [`Reservation`] and,
//! in shared mode, the node's part of the lease) and a [`ClientHold`] for
//! the whole request (the client's window reservation and its part of the
//! lease). [`settle`] ends both with one shared release call. Dropped, a
//! guard keeps what was reserved counted in full (the safe side);
//! [`Booking::cancel`] gives everything back when nothing reached the node.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

mod budget;
mod client;
pub(crate) mod fair;
pub(crate) mod queue;
pub(crate) mod refusal;
pub(crate) mod shared;

use crate::clients::{Client, Registry};
use crate::config::OnRedisError;
use crate::error::GatewayError;
use crate::limits::{Demand, RateLimitReport, Reservation};
use crate::money::Cost;
use crate::snapshot::{Live, NodeId};
pub(crate) use budget::BudgetHold;
pub(crate) use queue::Queue;
use refusal::{Headroom, Refusal, refuse};
use shared::{Ending, Lease, NotPlaced, SharedLimits};

/// What a request asks of admission.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The snapshot the request began with.
    pub live: &'a Arc<Live>,
    pub model: Option<&'a str>,
    /// The nodes that serve the model in `live`.
    pub candidates: &'a Arc<[NodeId]>,
    pub demand: Demand,
    /// The caller, when it has its own key (and maybe limits).
    pub client: Option<&'a Client>,
    /// The request's `server.request_timeout`.
    pub deadline: Instant,
    /// The most the request may cost, when its client has a budget.
    pub worst_cost: Option<Cost>,
    /// Where a client's spend is read from.
    pub clients: &'a Registry,
}

/// The gateway's admission: the local waiting room and, with `[cluster]`,
/// the limits shared through Redis.
#[derive(Debug)]
pub struct Admission {
    pub queue: Arc<Queue>,
    pub shared: Option<Arc<SharedLimits>>,
    /// Requests waiting now for their client's requests in flight to give
    /// back budget.
    pub(crate) budget_waiting: std::sync::atomic::AtomicUsize,
    /// Body bytes of the requests in admission now (`queue.max_bytes`).
    pub(crate) held_bytes: std::sync::atomic::AtomicUsize,
}

/// A request's body counted in [`Admission::held_bytes`] while it is in
/// admission.
struct HeldBytes<'a>(&'a std::sync::atomic::AtomicUsize, usize);

impl Drop for HeldBytes<'_> {
    fn drop(&mut self) {
        self.0
            .fetch_sub(self.1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A request placed on a node.
#[derive(Debug)]
pub struct Placement {
    pub node: NodeId,
    pub booking: Booking,
    /// The snapshot `node` belongs to, when it is not the one the request
    /// began with (it waited through a reload).
    pub rebased: Option<Arc<Live>>,
}

/// Who a request waits for: its client (or the shared group).
pub(in crate::admission) fn who(client: Option<&Client>) -> fair::Who {
    client.map_or_else(fair::Who::default, |c| fair::Who {
        owner: Arc::clone(&c.id),
        share: c.share,
        limiter: Some(Arc::clone(&c.limiter)),
    })
}

/// A first attempt admitted: its placement and the client's hold.
#[derive(Debug)]
pub struct Admitted {
    pub placement: Placement,
    pub client: ClientHold,
}

impl Admission {
    /// Requests waiting for headroom now, here and in the shared windows.
    pub fn depth(&self) -> usize {
        self.queue.depth()
    }

    /// Requests waiting for budget their client's requests in flight hold.
    pub fn budget_waiting(&self) -> usize {
        self.budget_waiting
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests that have waited for headroom, since start.
    pub fn queued_total(&self) -> u64 {
        self.queue.queued_total()
    }

    /// Requests refused as saturated (429), since start.
    pub fn refused_total(&self) -> u64 {
        self.queue.refused_total()
    }

    /// The first attempt: the client's limits and model list, then a node
    /// (now, or after waiting until `queue.max_wait`), or a refusal.
    pub async fn admit(&self, ask: &Ask<'_>) -> Result<Admitted, GatewayError> {
        let _held = self.hold_bytes(ask).map_err(refuse)?;
        // One `queue.max_wait` for every wait of this admission: what a
        // wait for budget took is not given again to the wait for a node.
        let waits_until = Instant::now() + ask.live.config.queue.max_wait;
        let budget = match (ask.client, ask.worst_cost) {
            (Some(client), Some(worst)) => self
                .hold_budget_or_wait(ask, client, worst)
                .await
                .map_err(refuse)?,
            _ => None,
        };
        let ask = &Ask {
            deadline: ask.deadline.min(waits_until),
            ..*ask
        };
        let admitted = self.admit_or_refuse(ask).await;
        if let Err(Refusal::Saturated(_)) = admitted {
            self.queue.refused();
        }
        match admitted {
            Ok(mut admitted) => {
                admitted.client.budget = budget;
                Ok(admitted)
            }
            Err(refusal) => {
                // Refused: nothing spent.
                if let Some(budget) = budget {
                    budget.cancel();
                }
                Err(refuse(refusal))
            }
        }
    }

    /// Counts the request's body among those in admission, or refuses it
    /// at once when `queue.max_bytes` would be passed: waiting requests
    /// keep their bodies, and their sum must stay bounded.
    fn hold_bytes(&self, ask: &Ask<'_>) -> Result<HeldBytes<'_>, Refusal> {
        use std::sync::atomic::Ordering;
        let bytes = usize::try_from(ask.demand.bytes).unwrap_or(usize::MAX);
        let before = self.held_bytes.fetch_add(bytes, Ordering::Relaxed);
        let held = HeldBytes(&self.held_bytes, bytes);
        if before.saturating_add(bytes) > ask.live.config.queue.max_bytes {
            self.queue.refused();
            return Err(Refusal::Saturated(Headroom::In(
                std::time::Duration::from_secs(1),
            )));
        }
        Ok(held)
    }

    async fn admit_or_refuse(&self, ask: &Ask<'_>) -> Result<Admitted, Refusal> {
        if let Some(c) = ask.client {
            client::allowed(c, ask.model)?;
        }
        if let Some(shared) = self.shared_if_up()? {
            match shared::place(shared, &self.queue, ask, &[], ask.client, true).await {
                Ok((node, lease)) => return Ok(self.booked_shared(ask, node, lease)),
                Err(NotPlaced::Refused(refusal)) => return Err(refusal),
                Err(NotPlaced::NoHeadroom) => {
                    return Err(Refusal::Saturated(Headroom::OnRelease));
                }
                Err(NotPlaced::Unavailable) => self.fall_back()?,
            }
        }
        let client = match ask.client {
            Some(c) => Some(client::reserve(c, ask.demand)?),
            None => None,
        };
        let placed = self
            .queue
            .admit(
                ask.live,
                ask.model,
                ask.candidates,
                ask.demand,
                &who(ask.client),
                ask.deadline,
            )
            .await;
        match placed {
            Ok(placement) => Ok(Admitted {
                placement,
                client: ClientHold::new(client, None),
            }),
            Err(refusal) => {
                // Refused: nothing the client used.
                if let Some(reservation) = client {
                    reservation.cancel();
                }
                Err(refusal)
            }
        }
    }

    /// Before the body is read: refuses a client already over its own
    /// rate limits (what any request would find), so refusing it costs no
    /// parsing. The full check is [`admit`](Self::admit)'s.
    pub fn precheck(&self, client: &Client) -> Result<crate::clients::BodyRead, GatewayError> {
        client::precheck(client).map_err(refuse)
    }

    /// A retry: a node other than those `tried` with headroom now, or none.
    /// The client was admitted with the first attempt.
    pub async fn place_retry(&self, ask: &Ask<'_>, tried: &[NodeId]) -> Option<Placement> {
        if let Ok(Some(shared)) = self.shared_if_up() {
            match shared::place(shared, &self.queue, ask, tried, None, false).await {
                Ok((node, lease)) => {
                    let reservation = ask
                        .live
                        .node(node)
                        .limiter
                        .record(ask.demand, Instant::now());
                    return Some(Placement {
                        node,
                        booking: Booking::shared(reservation, lease),
                        rebased: None,
                    });
                }
                Err(NotPlaced::Refused(_) | NotPlaced::NoHeadroom) => return None,
                Err(NotPlaced::Unavailable) => self.fall_back().ok()?,
            }
        }
        if self.rejects_without_shared() {
            return None;
        }
        self.queue
            .place(ask.live, ask.candidates, tried, ask.demand, Instant::now())
    }

    /// The shared limits, if configured and answering; a refusal if they
    /// are configured, away, and `on_redis_error = "reject"`.
    fn shared_if_up(&self) -> Result<Option<&Arc<SharedLimits>>, Refusal> {
        match &self.shared {
            Some(shared) if shared.is_up() => Ok(Some(shared)),
            Some(_) if self.rejects_without_shared() => Err(Refusal::SharedUnavailable),
            _ => Ok(None),
        }
    }

    /// Redis did not answer just now: go on locally, or refuse.
    fn fall_back(&self) -> Result<(), Refusal> {
        if self.rejects_without_shared() {
            Err(Refusal::SharedUnavailable)
        } else {
            Ok(())
        }
    }

    fn rejects_without_shared(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.on_error() == OnRedisError::Reject)
    }

    /// Placed by the shared windows: this replica's windows count the
    /// request too (for `/status` and the fallback), unchecked.
    fn booked_shared(&self, ask: &Ask<'_>, node: NodeId, lease: Lease) -> Admitted {
        let now = Instant::now();
        let (node_lease, client_lease) = lease.split();
        let reservation = ask.live.node(node).limiter.record(ask.demand, now);
        let client = ask.client.map(|c| client::record(c, ask.demand));
        Admitted {
            placement: Placement {
                node,
                booking: Booking::shared(reservation, node_lease),
                rebased: None,
            },
            client: ClientHold::new(client, client_lease),
        }
    }
}

/// One attempt's hold on its node: the local [`Reservation`] and, with
/// shared limits, the node's part of the lease. Dropped, both stay counted
/// in full.
#[derive(Debug)]
pub struct Booking {
    reservation: Option<Reservation>,
    /// Boxed: a local booking stays small.
    shared: Option<Box<SharedHold>>,
}

/// A node's part of a lease, and the response bytes to add at release.
#[derive(Debug)]
struct SharedHold {
    lease: Lease,
    response_bytes: AtomicU64,
}

impl Booking {
    pub(crate) fn local(reservation: Reservation) -> Self {
        Self {
            reservation: Some(reservation),
            shared: None,
        }
    }

    fn shared(reservation: Reservation, lease: Lease) -> Self {
        Self {
            reservation: Some(reservation),
            shared: Some(Box::new(SharedHold {
                lease,
                response_bytes: AtomicU64::new(0),
            })),
        }
    }

    /// Counts response bytes against the node's bpm as they flow.
    pub fn record_response_bytes(&self, bytes: u64) {
        if let Some(shared) = &self.shared {
            shared.response_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        if let Some(reservation) = &self.reservation {
            reservation.record_response_bytes(bytes);
        }
    }

    /// Takes the upstream's word on the node's quota; returns the (rpm,
    /// tpm) limits it reports where they are newly in force.
    pub fn observe_upstream(&self, report: &RateLimitReport) -> Option<(Option<u64>, Option<u64>)> {
        self.reservation.as_ref()?.observe_upstream(report)
    }

    /// In shared mode, lets every replica know the node rests for `rest`.
    pub fn share_cooldown(&self, rest: Duration) {
        if let Some(shared) = &self.shared {
            shared.lease.cool_down(rest);
        }
    }

    /// Ends the attempt having used `tokens` in all (an error answer that
    /// another attempt supersedes: its prompt).
    pub fn settle(mut self, tokens: u64) {
        self.end(Ending::Settle(tokens));
    }

    /// Ends an attempt that never reached the node: everything back.
    pub fn cancel(mut self) {
        self.end(Ending::Cancel);
    }

    fn end(&mut self, ending: Ending) {
        if let Some(reservation) = self.reservation.take() {
            end_reservation(reservation, ending);
        }
        if let Some(shared) = self.shared.take() {
            let bytes = shared.response_bytes.load(Ordering::Relaxed);
            shared.lease.release(ending, bytes);
        }
    }
}

impl Drop for Booking {
    fn drop(&mut self) {
        self.end(Ending::Keep);
    }
}

fn end_reservation(reservation: Reservation, ending: Ending) {
    match ending {
        Ending::Settle(tokens) => reservation.settle(tokens),
        Ending::Cancel => reservation.cancel(),
        Ending::Keep => drop(reservation),
    }
}

/// The client's hold for a whole request: its window reservation here
/// and, in shared mode, its part of the first attempt's lease; and its
/// budget's hold. Dropped, all stay counted in full.
#[derive(Debug, Default)]
pub struct ClientHold {
    reservation: Option<Reservation>,
    shared: Option<Lease>,
    budget: Option<BudgetHold>,
}

impl ClientHold {
    fn new(reservation: Option<Reservation>, shared: Option<Lease>) -> Self {
        Self {
            reservation,
            shared,
            budget: None,
        }
    }

    /// The worst case its budget holds, if it has one.
    pub fn budget_worst(&self) -> Option<Cost> {
        self.budget.as_ref().map(BudgetHold::worst)
    }

    /// The request reached no node (every attempt failed to connect): its
    /// budget's hold is given back; its rate-limit holds stay counted.
    pub fn nothing_spent(&mut self) {
        if let Some(budget) = self.budget.take() {
            budget.cancel();
        }
    }

    fn end(&mut self, ending: Ending) {
        if let Some(reservation) = self.reservation.take() {
            end_reservation(reservation, ending);
        }
        if let Some(lease) = self.shared.take() {
            lease.release(ending, 0);
        }
    }
}

impl Drop for ClientHold {
    fn drop(&mut self) {
        self.end(Ending::Keep);
    }
}

/// Ends a request whose answer was relayed: the last attempt's booking and
/// the client's hold, settled to `used` tokens (prompt + completion) and
/// `cost`, or kept in full when they are unknown. In shared mode the
/// node's and the client's leases end in one release call.
pub(crate) fn settle(
    mut booking: Booking,
    mut client: ClientHold,
    used: Option<u64>,
    cost: Option<Cost>,
) {
    if let Some(budget) = client.budget.take() {
        match cost {
            Some(cost) => budget.settle(cost),
            None => drop(budget),
        }
    }
    let ending = used.map_or(Ending::Keep, Ending::Settle);
    if let Some(reservation) = booking.reservation.take() {
        end_reservation(reservation, ending);
    }
    if let Some(reservation) = client.reservation.take() {
        end_reservation(reservation, ending);
    }
    let client_lease = client.shared.take();
    match booking.shared.take() {
        Some(shared) => {
            let bytes = shared.response_bytes.load(Ordering::Relaxed);
            shared.lease.join(client_lease).release(ending, bytes);
        }
        None => {
            if let Some(lease) = client_lease {
                lease.release(ending, 0);
            }
        }
    }
}
