//! Placing a request through the shared windows: one admission script per
//! try, and between tries a wait for a release published by any replica or
//! for the moment the script said a window frees enough. The wait is local
//! and bounded by `queue.max_wait`; nothing polls Redis.

use std::sync::Arc;

use tokio::time::Instant;

use super::{Candidate, ClientLimitsView, Lease, ScriptAnswer, SharedLimits};
use crate::admission::Ask;
use crate::admission::queue::Queue;
use crate::admission::refusal::{self, Headroom, Refusal};
use crate::clients::Client;
use crate::snapshot::NodeId;

/// Why the shared windows placed nothing.
#[derive(Debug)]
pub(in crate::admission) enum NotPlaced {
    /// Refused, as the local queue would refuse.
    Refused(Refusal),
    /// Nothing has headroom now (a retry does not wait).
    NoHeadroom,
    /// Redis could not answer: `on_redis_error` decides.
    Unavailable,
}

/// Places the request on the least-loaded candidate (not `excluded`) that
/// has headroom in the shared windows, checking `client`'s limits in the
/// same script; waits for headroom if `wait` (a first attempt), else takes
/// only what is free now (a retry).
pub(in crate::admission) async fn place(
    shared: &Arc<SharedLimits>,
    queue: &Queue,
    ask: &Ask<'_>,
    excluded: &[NodeId],
    client: Option<&Client>,
    wait: bool,
) -> Result<(NodeId, Lease), NotPlaced> {
    let live = ask.live;
    let script = Script::new(
        shared,
        queue,
        ask,
        in_rotation(ask, excluded, wait)?,
        client,
    );
    let give_up = ask
        .deadline
        .min(Instant::now() + live.config.queue.max_wait);
    let who = crate::admission::who(ask.client);
    let waits_for: Arc<[NodeId]> = Arc::from(script.in_rotation.as_slice());
    // Its place in this replica's line, once it waits (counted in the
    // queue's depth); it asks the script only in its turn.
    let mut place = None;
    loop {
        // Listen before asking, so a release between the answer and the
        // wait is not missed.
        let freed = shared.freed();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let moved = queue.line_moved();
        tokio::pin!(moved);
        moved.as_mut().enable();
        if place.is_some() && who.is_revoked() {
            return Err(NotPlaced::Refused(Refusal::ClientGone));
        }
        // A retry takes what is free now, in or out of turn; a first
        // attempt asks for the nodes no request ahead of it waits for.
        let usable: Vec<usize> = if wait {
            queue.free_of_line(place.as_ref(), &script.in_rotation)
        } else {
            (0..script.in_rotation.len()).collect()
        };
        let mut wake = None;
        if !usable.is_empty() {
            match script.ask_by_tier(&usable).await? {
                Asked::Placed(node, lease) => {
                    if let Some(place) = place {
                        place.placed();
                    }
                    return Ok((node, lease));
                }
                Asked::Wait(_) if !wait => return Err(NotPlaced::NoHeadroom),
                Asked::Wait(until) => wake = until,
            }
        }
        let now = Instant::now();
        let saturated = || NotPlaced::Refused(Refusal::Saturated(Headroom::at(wake, now)));
        if now >= give_up || wake.is_some_and(|at| at > give_up) {
            return Err(saturated());
        }
        if place.is_none() {
            place = Some(
                queue
                    .join_line(live, &waits_for, ask.demand, &who)
                    .ok_or_else(saturated)?,
            );
        }
        tokio::select! {
            () = &mut freed => {}
            () = &mut moved => {}
            () = tokio::time::sleep_until(wake.unwrap_or(give_up).min(give_up)) => {}
        }
    }
}

/// The candidates not `excluded` and in rotation; none is a refusal (or,
/// for a retry, nothing free).
fn in_rotation(ask: &Ask<'_>, excluded: &[NodeId], wait: bool) -> Result<Vec<NodeId>, NotPlaced> {
    let live = ask.live;
    let in_rotation: Vec<NodeId> = ask
        .candidates
        .iter()
        .copied()
        .filter(|id| !excluded.contains(id) && live.node(*id).health.in_rotation())
        .collect();
    if !in_rotation.is_empty() {
        return Ok(in_rotation);
    }
    if !wait {
        return Err(NotPlaced::NoHeadroom);
    }
    let out = refusal::out_of_rotation(live, ask.candidates, excluded, Instant::now());
    Err(NotPlaced::Refused(
        out.unwrap_or(Refusal::Saturated(Headroom::OnRelease)),
    ))
}

/// What one request asks the admission script, attempt after attempt.
struct Script<'a> {
    shared: &'a Arc<SharedLimits>,
    ask: &'a Ask<'a>,
    in_rotation: Vec<NodeId>,
    candidates: Vec<Candidate<'a>>,
    client: Option<ClientLimitsView<'a>>,
    rotation: usize,
    lease_for: std::time::Duration,
}

/// The script's answer for the nodes asked: placed, or when to look again
/// (`None`: when something is released).
enum Asked {
    Placed(NodeId, Lease),
    Wait(Option<Instant>),
}

impl<'a> Script<'a> {
    fn new(
        shared: &'a Arc<SharedLimits>,
        queue: &Queue,
        ask: &'a Ask<'a>,
        in_rotation: Vec<NodeId>,
        client: Option<&'a Client>,
    ) -> Self {
        let live = ask.live;
        let candidates = in_rotation
            .iter()
            .map(|&id| Candidate {
                name: &live.node(id).name,
                terms: live.node(id).limiter.terms(ask.demand),
            })
            .collect();
        Script {
            shared,
            ask,
            in_rotation,
            candidates,
            client: client.map(client_view),
            rotation: queue.next_rotation(),
            lease_for: live.config.server.request_timeout,
        }
    }

    /// Asks tier by tier, lowest first, for the candidates at `usable`: the
    /// first tier with headroom places it; else the soonest any tier may.
    async fn ask_by_tier(&self, usable: &[usize]) -> Result<Asked, NotPlaced> {
        let live = self.ask.live;
        let tier = |at: &usize| live.tier(self.in_rotation[*at]);
        let mut tiers: Vec<u32> = usable.iter().map(tier).collect();
        tiers.sort_unstable();
        tiers.dedup();
        if tiers.len() < 2 {
            return self.ask_for(usable).await;
        }
        let mut soonest: Option<Option<Instant>> = None;
        for t in tiers {
            let in_tier: Vec<usize> = usable.iter().copied().filter(|at| tier(at) == t).collect();
            match self.ask_for(&in_tier).await? {
                Asked::Placed(node, lease) => return Ok(Asked::Placed(node, lease)),
                Asked::Wait(until) => {
                    soonest = Some(match (soonest.flatten(), until) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    });
                }
            }
        }
        Ok(Asked::Wait(soonest.flatten()))
    }

    /// Asks for the candidates at `usable` (indices into `in_rotation`).
    async fn ask_for(&self, usable: &[usize]) -> Result<Asked, NotPlaced> {
        let asked: Vec<Candidate<'_>> = usable
            .iter()
            .map(|&at| self.candidates[at].clone())
            .collect();
        let answer = self
            .shared
            .admit(
                &asked,
                self.ask.demand,
                self.client,
                self.rotation,
                self.lease_for,
            )
            .await
            .map_err(|_| NotPlaced::Unavailable)?;
        match answer {
            ScriptAnswer::Placed { index, lease } => {
                Ok(Asked::Placed(self.in_rotation[usable[index]], lease))
            }
            ScriptAnswer::Wait { until } => Ok(Asked::Wait(until)),
            // Too large for the nodes asked; the others may take it.
            ScriptAnswer::Never(_) if usable.len() < self.in_rotation.len() => {
                Ok(Asked::Wait(None))
            }
            refused => Err(NotPlaced::Refused(refusal_of(
                refused,
                self.ask,
                &self.in_rotation,
            ))),
        }
    }
}

/// A client's limits, as the script takes them.
fn client_view(client: &Client) -> ClientLimitsView<'_> {
    ClientLimitsView {
        id: &client.id,
        limits: client.limiter.shared_limits(),
    }
}

/// The refusal a script's answer means (neither placed nor waiting).
fn refusal_of(answer: ScriptAnswer, ask: &Ask<'_>, in_rotation: &[NodeId]) -> Refusal {
    match answer {
        ScriptAnswer::Never(limit) => refusal::too_large(ask.live, in_rotation, limit, ask.demand),
        ScriptAnswer::ClientLimited { retry_after } => {
            Refusal::ClientLimited(retry_after.map_or(Headroom::OnRelease, Headroom::In))
        }
        ScriptAnswer::ClientTooSmall(limit) => Refusal::ClientTooSmall(limit),
        // Not refusals: the caller took these.
        ScriptAnswer::Placed { .. } | ScriptAnswer::Wait { .. } => {
            Refusal::Saturated(Headroom::OnRelease)
        }
    }
}
