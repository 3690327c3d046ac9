//! A request's hold on the shared windows: a [`Lease`], ended by one
//! release script call (`settle.lua`) in the background, never on the
//! response path.
//!
//! An admission leases a node and, when the request has client limits,
//! the client, under one reservation id. Admission splits the two: the
//! node's part goes with the attempt, the client's with the request, so a
//! retry on another node keeps the client's hold (the client is admitted
//! once). When the answer ends, the two are joined again and released in
//! one call.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;

use super::SharedLimits;
use crate::limits::Demand;

/// One thing leased: its key prefix, the reservation id, the window slot
/// it was recorded in and the tokens it reserved there (a node with its
/// own default completion reserves otherwise than the client).
#[derive(Debug)]
pub(crate) struct Part {
    pub(super) key: String,
    pub(super) id: String,
    pub(super) slot: i64,
    pub(super) tokens: u64,
    /// The node charges its reservation at arrival (Azure): settled, it
    /// counts at least what it reserved.
    pub(super) charged_at_arrival: bool,
}

impl Part {
    /// Key, reservation id, slot and tokens, as the release script takes them.
    fn fields(&self) -> (&str, &str, i64, u64) {
        (&self.key, &self.id, self.slot, self.tokens)
    }

    /// What a settlement at `used` tokens counts here.
    fn settled(&self, used: u64) -> u64 {
        if self.charged_at_arrival {
            used.max(self.tokens)
        } else {
            used
        }
    }
}

/// How a request ended, for its release.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ending {
    /// Used this many tokens in all.
    Settle(u64),
    /// Nothing reached the node: give everything back.
    Cancel,
    /// Unknown: keep the reservation counted in full.
    Keep,
}

/// A hold on the shared windows; released by one script call.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(super) limits: Arc<SharedLimits>,
    pub(super) node: Option<Part>,
    pub(super) client: Option<Part>,
    pub(super) demand: Demand,
}

impl Lease {
    /// The node's part and the client's, apart.
    pub(crate) fn split(self) -> (Lease, Option<Lease>) {
        let client = self.client.map(|part| Lease {
            limits: Arc::clone(&self.limits),
            node: None,
            client: Some(part),
            demand: self.demand,
        });
        let node = Lease {
            limits: self.limits,
            node: self.node,
            client: None,
            demand: self.demand,
        };
        (node, client)
    }

    /// This lease and a client's, to be released in one call.
    pub(crate) fn join(mut self, client: Option<Lease>) -> Lease {
        if let Some(client) = client {
            self.client = client.client;
        }
        self
    }

    /// The leased node rests for `rest` on every replica (after its 429):
    /// one script call in the background.
    pub(crate) fn cool_down(&self, rest: Duration) {
        let Some(node) = &self.node else { return };
        let limits = Arc::clone(&self.limits);
        let key = format!("{}:cool", node.key);
        self.limits.tasks.run(async move {
            let mut invocation = limits.cool.prepare_invoke();
            invocation.key(&key).arg(rest.as_millis().max(1) as u64);
            if let Err(err) = limits.call::<i64>(&invocation).await {
                tracing::warn!(error = %err, "cannot share a node's cooldown");
            }
        });
    }

    /// Ends the lease in the background (a release never delays the
    /// response): one script call.
    pub(crate) fn release(self, ending: Ending, response_bytes: u64) {
        let (how, used) = match ending {
            Ending::Settle(tokens) => ("settle", tokens),
            Ending::Cancel => ("cancel", 0),
            Ending::Keep => ("keep", 0),
        };
        if self.node.is_none() && self.client.is_none() {
            return;
        }
        let limits = Arc::clone(&self.limits);
        self.limits.tasks.run(async move {
            let empty = || ("", "", 0, 0);
            let (node_key, node_id, node_slot, node_tokens) =
                self.node.as_ref().map_or_else(empty, Part::fields);
            let (client_key, client_id, client_slot, client_tokens) =
                self.client.as_ref().map_or_else(empty, Part::fields);
            let mut invocation = limits.settle.prepare_invoke();
            invocation
                .key(node_key)
                .key(client_key)
                .arg(node_id)
                .arg(node_slot)
                .arg(node_tokens)
                .arg(self.demand.bytes)
                .arg(how)
                .arg(used)
                .arg(response_bytes)
                .arg(limits.channel())
                .arg(node_key)
                .arg(client_id)
                .arg(client_slot)
                .arg(client_tokens)
                .arg(self.node.as_ref().map_or(used, |p| p.settled(used)));
            if let Err(err) = limits.call::<i64>(&invocation).await {
                // The lease expires by itself; the window entry stays as
                // reserved (the safe side).
                tracing::warn!(error = %err, "cannot release a shared reservation");
            }
        });
    }
}

/// An admission whose answer never arrived (`cluster.timeout`, or the
/// client went away during the round trip): the script may still have run
/// and leased a concurrency slot under this id. Dropped armed, it ends that
/// lease on every candidate in the background; the window keeps the
/// request counted (the safe side).
pub(super) struct Unanswered {
    pub(super) limits: Arc<SharedLimits>,
    pub(super) id: String,
    pub(super) keys: Vec<String>,
    pub(super) client: Option<String>,
    pub(super) armed: bool,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let limits = Arc::clone(&self.limits);
        let id = std::mem::take(&mut self.id);
        let keys: Vec<String> = self
            .keys
            .drain(..)
            .chain(self.client.take())
            .map(|key| format!("{key}:fly"))
            .collect();
        self.limits.tasks.run(async move {
            let Some(conn) = limits.conn.load_full() else {
                return;
            };
            let mut conn = ConnectionManager::clone(&conn);
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("ZREM").arg(key).arg(&id).ignore();
            }
            // Bounded by the lease itself if this fails too.
            let _ = tokio::time::timeout(
                limits.settings.timeout.max(Duration::from_secs(5)),
                pipe.query_async::<()>(&mut conn),
            )
            .await;
        });
    }
}
