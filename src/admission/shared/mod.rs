//! Limits shared by several gateway replicas through Redis (`[cluster]`):
//! the connection, the admission script, and the state of the link.
//!
//! With `cluster.redis_url` set, every admission is one server-side script
//! (`admit.lua` beside this file) that, atomically: checks the client's window
//! and token bucket, advances each candidate node's window (100 ms slots
//! over 60.5 s, as in [`crate::limits`]), chooses the least-loaded node with
//! headroom and records the request on it and on the client. Every release
//! is one more script (`settle.lua`, see [`lease`]): the lease ends, the
//! tokens are corrected to what was used (or all is returned, or all kept),
//! the response bytes are added, and the node's name is published so that
//! requests waiting on other replicas try again at once. Nothing else talks
//! to Redis on the request path: one round trip to admit, one to release.
//!
//! A node's cooldown after an upstream 429 is shared too
//! (`cool.lua`, one call per 429).
//!
//! `/status` reads the shared totals with one more script
//! (`peek.lua`); `window.lua` is the window code every script shares.
//!
//! Time is Redis's own (`TIME`), so replicas' clocks never disagree about a
//! window. Requests in flight are leases that expire after
//! `server.request_timeout` and a margin, so a replica that dies does not
//! hold concurrency slots for ever.
//!
//! The queue stays local: a request that finds no headroom waits (up to
//! `queue.max_wait`) for the first of a release published by any replica or
//! the moment the script said a window frees enough, then asks again.
//!
//! Redis slow (over `cluster.timeout`) or unreachable: `on_redis_error =
//! "local"` admits by this replica's own windows (which keep counting this
//! replica's requests throughout), `"reject"` answers 503. The connection
//! is re-made in the background; both transitions are logged and shown in
//! `/status`. A single Redis primary is expected (keys of one request are
//! not hashed to one Redis SharedLimits slot).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod budget;
mod lease;
mod place;

pub(crate) use budget::{BudgetVerdict, SharedBudgetHold};
pub(crate) use lease::{Ending, Lease};
use lease::{Part, Unanswered};
pub(super) use place::{NotPlaced, place};

use crate::clients::SharedClientLimits;
use crate::config::{ClusterSettings, OnRedisError};
use crate::limits::{Demand, Limit, Terms};
use crate::tasks::Tasks;

/// A lease outlives the request by this much, so that a slow release never
/// finds its lease already gone; only a dead replica's leases expire.
const LEASE_MARGIN: Duration = Duration::from_secs(30);
/// While Redis is marked down but still connected, it is pinged this often.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Re-connecting backs off up to this.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Release messages, one per request ended on any replica.
type Releases = std::pin::Pin<Box<dyn futures_util::Stream<Item = redis::Msg> + Send>>;

/// The shared limits, and the state of the connection to them.
pub struct SharedLimits {
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    settings: ClusterSettings,
    admit: redis::Script,
    peek: redis::Script,
    settle: redis::Script,
    cool: redis::Script,
    budget: redis::Script,
    /// Rung when any replica releases capacity (Redis pub/sub).
    freed: Notify,
    up: AtomicBool,
    /// Rung when Redis becomes reachable.
    came_up: Notify,
    last_error: Mutex<Option<String>>,
    /// Identifies this replica's reservations.
    replica: String,
    next: AtomicU64,
    /// Releases and shared cooldowns run here, tracked for shutdown.
    tasks: Tasks,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("up", &self.up)
            .finish_non_exhaustive()
    }
}

/// One candidate node, as the script sees it.
#[derive(Debug, Clone)]
pub(crate) struct Candidate<'a> {
    pub name: &'a str,
    pub terms: Terms,
}

/// A client's limits, as the script sees them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientLimitsView<'a> {
    pub id: &'a str,
    pub limits: SharedClientLimits,
}

/// A node's use of the shared windows, summed over every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedUse {
    pub requests: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub in_flight: u64,
}

/// What one admission script answered.
#[derive(Debug)]
pub(crate) enum ScriptAnswer {
    /// Placed on candidate `index`; release the lease when the request ends.
    Placed { index: usize, lease: Lease },
    /// Nothing has headroom: try again on a release, or at `until`.
    Wait { until: Option<Instant> },
    /// The request alone exceeds this limit on every candidate.
    Never(Limit),
    /// The client is over its own limit.
    ClientLimited { retry_after: Option<Duration> },
    /// The request alone exceeds this limit of the client's.
    ClientTooSmall(Limit),
}

/// Redis could not answer (in time).
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub(crate) struct Unavailable(String);

impl SharedLimits {
    /// Starts connecting in the background (see [`run`](Self::run)); the
    /// gateway serves meanwhile, with `on_redis_error`'s behaviour.
    pub fn new(settings: ClusterSettings, tasks: Tasks) -> Result<Arc<Self>, String> {
        use secrecy::ExposeSecret;
        // The error's kind only: its text could quote the URL, password
        // and all.
        let url = settings.redis_url.expose_secret();
        let client = match (&settings.ca_file, &settings.client_cert) {
            (None, None) => redis::Client::open(url),
            (ca, client_cert) => {
                let read = |field: &str, path: &std::path::Path| {
                    std::fs::read(path).map_err(|e| {
                        format!("{field}: cannot read {}: {}", path.display(), e.kind())
                    })
                };
                let certificates = redis::TlsCertificates {
                    client_tls: match client_cert {
                        Some((cert, key)) => Some(redis::ClientTlsConfig {
                            client_cert: read("cluster.client_cert_file", cert)?,
                            client_key: read("cluster.client_key_file", key)?,
                        }),
                        None => None,
                    },
                    root_cert: match ca {
                        Some(ca) => Some(read("cluster.ca_file", ca)?),
                        None => None,
                    },
                };
                redis::Client::build_with_tls(url, certificates)
            }
        }
        .map_err(|e| format!("cluster.redis_url: not a usable Redis URL ({:?})", e.kind()))?;
        Ok(Arc::new(Self {
            client,
            conn: ArcSwapOption::empty(),
            admit: redis::Script::new(concat!(
                include_str!("window.lua"),
                include_str!("admit.lua")
            )),
            peek: redis::Script::new(concat!(
                include_str!("window.lua"),
                include_str!("peek.lua")
            )),
            settle: redis::Script::new(include_str!("settle.lua")),
            cool: redis::Script::new(include_str!("cool.lua")),
            budget: redis::Script::new(include_str!("budget.lua")),
            freed: Notify::new(),
            up: AtomicBool::new(false),
            came_up: Notify::new(),
            last_error: Mutex::new(Some("not connected yet".to_owned())),
            replica: crate::keys::new_id(),
            next: AtomicU64::new(0),
            tasks,
            settings,
        }))
    }

    pub fn on_error(&self) -> OnRedisError {
        self.settings.on_redis_error
    }

    /// Whether the last call to Redis succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// For `/status`: up or not, and the last error.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "redis": if self.is_up() { "up" } else { "down" },
            "on_redis_error": self.settings.on_redis_error.as_str(),
            "last_error": *self.last_error.lock(),
        })
    }

    fn channel(&self) -> String {
        format!("{}:freed", self.settings.key_prefix)
    }

    fn node_key(&self, name: &str) -> String {
        format!("{}:n:{name}", self.settings.key_prefix)
    }

    fn client_key(&self, id: &str) -> String {
        format!("{}:c:{id}", self.settings.key_prefix)
    }

    /// Resolves when any replica releases capacity (or the subscription
    /// breaks, so nobody sleeps on a bell that no longer rings).
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// One admission: the client's limits and the candidates, atomically.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        candidates: &[Candidate<'_>],
        demand: Demand,
        client: Option<ClientLimitsView<'_>>,
        rotation: usize,
        lease_for: Duration,
    ) -> Result<ScriptAnswer, Unavailable> {
        let id = self.next_id();
        let client_key = client.map(|c| self.client_key(c.id));
        let mut unanswered = Unanswered {
            limits: Arc::clone(self),
            id: id.clone(),
            keys: candidates.iter().map(|c| self.node_key(c.name)).collect(),
            client: client_key.clone(),
            armed: true,
        };
        let mut invocation = self.admit.prepare_invoke();
        invocation.key(client_key.as_deref().unwrap_or(""));
        for key in &unanswered.keys {
            invocation.key(key);
        }
        let lease_ms = (lease_for + LEASE_MARGIN).as_millis() as u64;
        invocation
            .arg(demand.tokens)
            .arg(demand.bytes)
            .arg(&id)
            .arg(lease_ms)
            .arg(rotation as u64);
        push_limits(&mut invocation, client, candidates);
        let sent = Instant::now();
        let (kind, a, redis_now, slot): (i64, i64, i64, i64) = self.call(&invocation).await?;
        unanswered.armed = false;
        // Redis time to ours: the script ran about when we sent it.
        let local =
            |ms: i64| sent + Duration::from_millis(ms.saturating_sub(redis_now).max(0) as u64);
        let limit = |code: i64| match code {
            1 => Limit::Rpm,
            2 => Limit::Tpm,
            _ => Limit::Bpm,
        };
        Ok(match kind {
            0 => {
                let index = (a.max(1) - 1) as usize;
                let node = std::mem::take(&mut unanswered.keys)
                    .into_iter()
                    .nth(index)
                    .unwrap_or_default();
                let placed = Placed {
                    node,
                    client: client_key,
                    id,
                    slot,
                    terms: candidates.get(index).map(|c| c.terms),
                };
                ScriptAnswer::Placed {
                    index,
                    lease: placed.lease(self, demand),
                }
            }
            1 => ScriptAnswer::Wait {
                until: (a > 0).then(|| local(a)),
            },
            2 => ScriptAnswer::Never(limit(a)),
            3 => ScriptAnswer::ClientLimited {
                retry_after: (a > 0).then(|| Duration::from_millis(a as u64)),
            },
            _ => ScriptAnswer::ClientTooSmall(limit(a)),
        })
    }

    /// What each named node has used in the shared windows (requests,
    /// tokens, bytes in the rolling minute; requests in flight), for
    /// `/status`. `None` while Redis is down or does not answer.
    pub async fn peek(&self, nodes: &[&str]) -> Option<Vec<SharedUse>> {
        if !self.is_up() || nodes.is_empty() {
            return None;
        }
        let mut invocation = self.peek.prepare_invoke();
        for name in nodes {
            invocation.key(self.node_key(name));
        }
        let flat: Vec<u64> = self.call(&invocation).await.ok()?;
        Some(
            flat.chunks_exact(4)
                .map(|c| SharedUse {
                    requests: c[0],
                    tokens: c[1],
                    bytes: c[2],
                    in_flight: c[3],
                })
                .collect(),
        )
    }

    /// A new reservation id, unique across replicas.
    fn next_id(&self) -> String {
        format!(
            "{}-{}",
            self.replica,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Runs a script with `cluster.timeout`; notes whether Redis answered.
    async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        let Some(conn) = self.conn.load_full() else {
            return Err(self.down("not connected".to_owned()));
        };
        let mut conn = ConnectionManager::clone(&conn);
        match tokio::time::timeout(self.settings.timeout, invocation.invoke_async(&mut conn)).await
        {
            Ok(Ok(value)) => {
                self.mark_up();
                Ok(value)
            }
            // Redis answered, with an error about this call: it is up.
            Ok(Err(err)) if !is_unreachable(&err) => {
                self.mark_up();
                tracing::warn!(kind = ?err.kind(), "a shared-limits script failed; this request falls back");
                Err(Unavailable(format!("script failed ({:?})", err.kind())))
            }
            Ok(Err(err)) => Err(self.down(err.to_string())),
            Err(_) => Err(self.down(format!(
                "no answer within {} ms",
                self.settings.timeout.as_millis()
            ))),
        }
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            tracing::info!("redis reachable: limits are shared");
            *self.last_error.lock() = None;
            self.came_up.notify_waiters();
        }
    }

    /// Waits (at most `limit`) for the first connection, so a gateway that
    /// starts beside a reachable Redis never admits by its own windows.
    pub async fn connected(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let came_up = self.came_up.notified();
            if self.is_up() {
                return true;
            }
            if tokio::time::timeout_at(deadline, came_up).await.is_err() {
                return self.is_up();
            }
        }
    }

    fn down(&self, why: String) -> Unavailable {
        if self.up.swap(false, Ordering::AcqRel) {
            let fallback = match self.settings.on_redis_error {
                OnRedisError::Local => "admitting by this replica's own windows",
                OnRedisError::Reject => "refusing requests with 503",
            };
            tracing::error!(error = %why, "redis unreachable: {fallback} until it is back");
        }
        *self.last_error.lock() = Some(why.clone());
        Unavailable(why)
    }

    /// Connects, listens for releases, and re-connects whenever the
    /// connection is lost, until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let connected = tokio::select! {
                () = cancel.cancelled() => return,
                connected = self.connect() => connected,
            };
            match connected {
                Ok(mut messages) => {
                    backoff = Duration::from_millis(100);
                    self.mark_up();
                    // A call that timed out marks Redis down while the
                    // subscription lives on: a ping each second tells when
                    // it answers again.
                    let mut probe = tokio::time::interval(PROBE_EVERY);
                    loop {
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            message = messages.next() => match message {
                                Some(_) => self.freed.notify_waiters(),
                                None => break,
                            },
                            // Ticks always: a branch disabled while Redis was
                            // up would not be looked at again until a message.
                            _ = probe.tick() => if !self.is_up() { self.ping().await },
                        }
                    }
                    // The subscription ended: the server went away.
                    let _ = self.down("connection lost".to_owned());
                    // Waiters must not sleep on a bell that no longer rings.
                    self.freed.notify_waiters();
                }
                Err(err) => {
                    let _ = self.down(err);
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
        }
    }

    async fn ping(&self) {
        let Some(conn) = self.conn.load_full() else {
            return;
        };
        let mut conn = ConnectionManager::clone(&conn);
        let pinged = tokio::time::timeout(
            self.settings.timeout,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        match pinged {
            Ok(Ok(_)) => self.mark_up(),
            Ok(Err(err)) => drop(self.down(err.to_string())),
            Err(_) => drop(self.down("ping timed out".to_owned())),
        }
    }

    /// A fresh command connection and a subscription to the release channel.
    async fn connect(&self) -> Result<Releases, String> {
        let timeout = self.settings.timeout.max(Duration::from_secs(1));
        // `cluster.timeout` bounds every call (see `call`); the client's own
        // 500 ms default would cut in first when it is set longer.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(timeout));
        let attempt = async {
            // The subscription first: it connects once, so a failure says
            // why (a refused connection, an untrusted certificate) where
            // the manager would retry until the timeout.
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(self.channel()).await?;
            let manager = ConnectionManager::new_with_config(self.client.clone(), config).await?;
            Ok::<_, redis::RedisError>((manager, pubsub))
        };
        let (manager, pubsub) = tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| format!("no connection within {} ms", timeout.as_millis()))?
            .map_err(|e| e.to_string())?;
        self.conn.store(Some(Arc::new(manager)));
        Ok(Box::pin(pubsub.into_on_message()))
    }
}

/// Whether an error says Redis cannot be reached (as opposed to Redis
/// answering that one call failed).
fn is_unreachable(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
}

/// The admission script's limit arguments: the client's rpm, tpm, bucket
/// burst and rate, then each candidate's rpm, tpm, bpm and concurrency
/// (0 = none).
/// What an admission that placed a request leased: the node's key, the
/// client's, under one reservation id and window slot.
struct Placed {
    node: String,
    client: Option<String>,
    id: String,
    slot: i64,
    /// The placed candidate's terms (its tokens, whether it charges at
    /// arrival).
    terms: Option<Terms>,
}

impl Placed {
    fn lease(self, limits: &Arc<SharedLimits>, demand: Demand) -> Lease {
        let part = |key: String, tokens: u64, charged_at_arrival: bool| Part {
            key,
            id: self.id.clone(),
            slot: self.slot,
            tokens,
            charged_at_arrival,
        };
        let tokens = self.terms.map_or(demand.tokens, |t| t.tokens);
        let charged = self.terms.is_some_and(|t| t.charged_at_arrival);
        Lease {
            limits: Arc::clone(limits),
            node: Some(part(self.node, tokens, charged)),
            client: self.client.map(|key| part(key, demand.tokens, false)),
            demand,
        }
    }
}

fn push_limits(
    invocation: &mut redis::ScriptInvocation<'_>,
    client: Option<ClientLimitsView<'_>>,
    candidates: &[Candidate<'_>],
) {
    let c = client.map(|c| c.limits).unwrap_or_default();
    invocation
        .arg(c.rpm)
        .arg(c.tpm)
        .arg(c.burst)
        .arg(c.rate_per_second)
        .arg(c.max_concurrency);
    let n = |v: Option<std::num::NonZeroU64>| v.map_or(0, u64::from);
    for candidate in candidates {
        let Terms {
            quota: q,
            tokens,
            window,
            ..
        } = candidate.terms;
        invocation
            .arg(n(q.rpm))
            .arg(n(q.tpm))
            .arg(n(q.bpm))
            .arg(n(q.max_concurrency))
            .arg(tokens)
            .arg(window.as_millis() as u64);
    }
}
