//! Clients: who is calling, and what the gateway keeps for each of them.
//!
//! A client presents its own gateway key. It is declared in the config
//! (`[[clients]]`, found in the snapshot's [`Directory`]) or made through
//! the admin API and kept in the [`Store`], found through the [`Registry`]'s
//! cache. Either way it is found by the key's SHA-256: the key itself is
//! never kept. Its limits are applied by admission
//! ([`crate::admission`]) before any node is chosen.
//!
//! A client's [`ClientLimiter`] (an rpm/tpm window, the same
//! [`Limiter`] a node has, and a token bucket) and its
//! [`ClientCounters`] are kept by client id in the registry, apart from any
//! snapshot or cache entry, so neither a reload nor a cache expiry resets a
//! client's minute.
//!
//! The cache: a key's lookup is kept for `store.cache_ttl`, so another
//! replica's changes arrive within it. A change made here bumps the
//! registry's change count first: every entry cached before it is a miss
//! from then on, so a disabled, deleted or rotated-away key is refused by
//! the very next request.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::ClientConfig;
use crate::health::FailureStreak;
use crate::keys::CONFIG_ID_PREFIX;
use crate::ledger::Ledger;
use crate::limits::{ClientLimits, HeadroomSignal, Limiter, Quota, Share, TokenBucket};
use crate::metrics::Costs;
use crate::money::{Account, Budget};
use crate::store::{Store, StoreError, StoredClient};

/// A client as the request path uses it.
#[derive(Debug)]
pub struct Client {
    /// `cl_...` for a stored client, `cfg_<name>` for a declared one.
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub models: Option<Vec<String>>,
    pub enabled: bool,
    /// Its class and weight when the pool is saturated.
    pub share: Share,
    pub limiter: Arc<ClientLimiter>,
    pub counters: Arc<ClientCounters>,
    /// What it may spend per period, and what it spent.
    pub budget: Option<Budget>,
    pub account: Arc<Account>,
    /// The highest node tier its requests may use (`None`: any; a stored
    /// client has none).
    pub max_tier: Option<u32>,
}

/// A client's own limits in force: its rolling rpm/tpm window and its
/// token bucket.
#[derive(Debug)]
pub struct ClientLimiter {
    pub window: Arc<Limiter>,
    pub bucket: Option<Mutex<TokenBucket>>,
    /// The client was deleted, disabled or taken out of the config: its
    /// requests still waiting are refused. Shared by every version of its
    /// limiter (a change of limits makes a new one).
    revoked: Arc<AtomicBool>,
    /// Its requests whose bodies are being read: they count against its
    /// `max_concurrency` before admission counts them in the window, so a
    /// client trickling bodies holds no more than its concurrency allows.
    /// Shared by every version of its limiter.
    reading: Arc<AtomicU64>,
    /// Its requests waiting for budget its requests in flight hold:
    /// counted against `queue.max_depth_per_client`.
    pub(crate) budget_waiting: Arc<std::sync::atomic::AtomicUsize>,
}

/// One of a client's requests reading its body; counted in
/// [`ClientLimiter::reading`] until dropped.
#[derive(Debug)]
pub struct BodyRead(Arc<AtomicU64>);

impl Drop for BodyRead {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client's requests and tokens since start: atomics, counted when an
/// answer's relay ends, read by the `/metrics` scrape.
#[derive(Debug)]
pub struct ClientCounters {
    /// The client's name as last seen; a rename shows at the next lookup.
    name: Mutex<Arc<str>>,
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// What its requests cost, by node and model.
    pub costs: Costs,
    /// Its requests that failed on every node tried, in a row.
    pub(crate) streak: FailureStreak,
}

impl ClientCounters {
    fn new(name: &Arc<str>) -> Arc<Self> {
        Arc::new(Self {
            name: Mutex::new(Arc::clone(name)),
            requests: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            costs: Costs::default(),
            streak: FailureStreak::default(),
        })
    }

    /// Counts one answered request and the tokens it used.
    pub fn record(&self, prompt_tokens: u64, completion_tokens: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion_tokens, Ordering::Relaxed);
    }

    pub fn name(&self) -> Arc<str> {
        Arc::clone(&self.name.lock())
    }

    /// The client was renamed; the next scrape shows the new name.
    fn rename(&self, name: &Arc<str>) {
        let mut current = self.name.lock();
        if **current != **name {
            *current = Arc::clone(name);
        }
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Prompt and completion tokens.
    pub fn tokens(&self) -> (u64, u64) {
        (
            self.prompt_tokens.load(Ordering::Relaxed),
            self.completion_tokens.load(Ordering::Relaxed),
        )
    }
}

/// A client's limits as the shared windows take them (0 = none).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SharedClientLimits {
    pub rpm: u64,
    pub tpm: u64,
    /// The token bucket's size and refill rate.
    pub burst: u64,
    pub rate_per_second: f64,
    /// Requests in flight at once, across every replica.
    pub max_concurrency: u64,
}

impl ClientLimiter {
    /// The limits, as the shared windows take them.
    pub fn shared_limits(&self) -> SharedClientLimits {
        let quota = self.window.quota_in_force();
        let n = |v: Option<std::num::NonZeroU64>| v.map_or(0, u64::from);
        let (burst, rate_per_second) = self.bucket.as_ref().map_or((0, 0.0), |b| {
            let limit = b.lock().limit();
            (u64::from(limit.burst), limit.rate_per_second)
        });
        SharedClientLimits {
            rpm: n(quota.rpm),
            tpm: n(quota.tpm),
            burst,
            rate_per_second,
            max_concurrency: n(quota.max_concurrency),
        }
    }

    fn new(limits: &ClientLimits) -> Arc<Self> {
        // Nothing waits on a client's window, so it wakes nobody.
        let window = Limiter::new(quota_of(limits), Arc::new(HeadroomSignal::default()));
        Arc::new(Self {
            window,
            bucket: limits
                .bucket
                .map(|limit| Mutex::new(TokenBucket::full(limit, Instant::now()))),
            revoked: Arc::new(AtomicBool::new(false)),
            reading: Arc::new(AtomicU64::new(0)),
            budget_waiting: Arc::default(),
        })
    }

    /// Counts a request that starts reading its body, unless the client's
    /// requests in flight and bodies being read already fill its
    /// `max_concurrency`.
    pub fn start_reading(&self) -> Option<BodyRead> {
        let reading = self.reading.fetch_add(1, Ordering::AcqRel);
        let read = BodyRead(Arc::clone(&self.reading));
        match self.window.concurrency() {
            (Some(max), in_flight) if reading + in_flight >= max.get() => None,
            _ => Some(read),
        }
    }

    /// Whether the client was deleted, disabled or taken out of the config.
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    fn revoke(&self, revoked: bool) {
        self.revoked.store(revoked, Ordering::Release);
    }

    /// Applies changed limits (a reload, an admin change) without resetting
    /// what was used. A bucket whose limit changed starts full at its new size.
    fn update(self: &Arc<Self>, limits: &ClientLimits) -> Arc<Self> {
        let bucket_same = match (&self.bucket, limits.bucket) {
            (None, None) => true,
            (Some(b), Some(limit)) => b.lock().limit() == limit,
            _ => false,
        };
        self.window.set_quota(quota_of(limits));
        if bucket_same {
            return Arc::clone(self);
        }
        Arc::new(Self {
            window: Arc::clone(&self.window),
            bucket: limits
                .bucket
                .map(|limit| Mutex::new(TokenBucket::full(limit, Instant::now()))),
            revoked: Arc::clone(&self.revoked),
            reading: Arc::clone(&self.reading),
            budget_waiting: Arc::clone(&self.budget_waiting),
        })
    }
}

fn quota_of(limits: &ClientLimits) -> Quota {
    Quota {
        rpm: limits.rpm,
        tpm: limits.tpm,
        max_concurrency: limits.max_concurrency,
        ..Quota::default()
    }
}

/// A client with a budget, and its account.
#[derive(Debug)]
pub struct BudgetView {
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub budget: Budget,
    pub account: Arc<Account>,
}

/// What the registry keeps of a client by id.
#[derive(Debug, Clone)]
struct Kept {
    limiter: Arc<ClientLimiter>,
    counters: Arc<ClientCounters>,
    account: Arc<Account>,
    /// Its budget as last seen.
    budget: Option<Budget>,
}

/// The clients declared in one snapshot's config, by key hash.
#[derive(Debug, Default)]
pub struct Directory {
    by_hash: HashMap<[u8; 32], Arc<Client>>,
}

impl Directory {
    /// Builds the directory for `configs`, each client keeping its usage in
    /// `registry` across reloads.
    pub fn build(configs: &[ClientConfig], registry: &Registry) -> Self {
        let ids: Vec<Arc<str>> = configs.iter().map(|c| config_id(&c.name)).collect();
        registry.keep_declared(&ids);
        let mut by_hash = HashMap::with_capacity(configs.len());
        for (config, id) in configs.iter().zip(ids) {
            let kept = registry.keep(&id, &config.name, &config.limits, config.budget);
            kept.limiter.revoke(!config.enabled);
            let client = Client {
                limiter: kept.limiter,
                counters: kept.counters,
                account: kept.account,
                budget: config.budget,
                id,
                name: Arc::clone(&config.name),
                models: config.models.clone(),
                enabled: config.enabled,
                share: config.share,
                max_tier: config.max_tier,
            };
            by_hash.insert(config.key.hash(), Arc::new(client));
        }
        Self { by_hash }
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The declared client whose key hashes to `hash`, if any.
    pub fn find(&self, hash: &[u8; 32]) -> Option<&Arc<Client>> {
        self.by_hash.get(hash)
    }

    /// Every declared client, in no order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Client>> {
        self.by_hash.values()
    }
}

/// The id of a client declared in the config.
pub fn config_id(name: &str) -> Arc<str> {
    Arc::from(format!("{CONFIG_ID_PREFIX}{name}"))
}

/// The clients kept in the store, looked up through a cache, and every
/// client's usage by id.
pub struct Registry {
    store: Store,
    cache: moka::future::Cache<[u8; 32], Cached>,
    /// Counts changes made through this gateway; a cache entry from before
    /// the latest is a miss.
    changes: AtomicU64,
    kept: Mutex<HashMap<Arc<str>, Kept>>,
    /// Whether the store held any client when last seen: with none, and no
    /// keys in the config, the gateway is open.
    any_stored: AtomicBool,
    ledger: Ledger,
}

#[derive(Clone)]
struct Cached {
    change: u64,
    client: Option<Arc<Client>>,
}

/// Keys looked up and cached at most; unknown keys are cached too, so a
/// flood of wrong keys costs the store one query each per `cache_ttl`.
const CACHE_CAPACITY: u64 = 100_000;

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("backend", &self.store.backend())
            .field("changes", &self.changes)
            .finish_non_exhaustive()
    }
}

impl Registry {
    pub async fn new(
        store: Store,
        cache_ttl: Duration,
        ledger: Ledger,
    ) -> Result<Self, StoreError> {
        let any_stored = store.count_clients().await? > 0;
        Ok(Self {
            store,
            cache: moka::future::Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(cache_ttl)
                .build(),
            changes: AtomicU64::new(0),
            kept: Mutex::new(HashMap::new()),
            any_stored: AtomicBool::new(any_stored),
            ledger,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Whether the store may hold clients (then every request needs a key).
    pub fn any_stored(&self) -> bool {
        self.any_stored.load(Ordering::Acquire)
    }

    /// The enabled stored client whose key hashes to `hash`.
    pub async fn find(&self, hash: &[u8; 32]) -> Result<Option<Arc<Client>>, StoreError> {
        let change = self.changes.load(Ordering::Acquire);
        if let Some(cached) = self.cache.get(hash).await
            && cached.change == change
        {
            return Ok(cached.client);
        }
        let client = self
            .store
            .client_by_key(hash)
            .await?
            .filter(|c| c.enabled)
            .map(|c| self.client(&c));
        self.cache
            .insert(
                *hash,
                Cached {
                    change,
                    client: client.clone(),
                },
            )
            .await;
        Ok(client)
    }

    /// After a change to stored clients: every cached lookup is stale, the
    /// client's limits apply to its window at once, and a deleted client's
    /// window goes.
    pub fn changed(&self, client: Option<&StoredClient>, deleted: Option<&str>) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
        if let Some(client) = client {
            self.any_stored.store(true, Ordering::Release);
            let kept = self.keep(
                &Arc::from(client.id.as_str()),
                &Arc::from(client.name.as_str()),
                &client.limits,
                client.budget,
            );
            kept.limiter.revoke(!client.enabled);
        }
        if let Some(id) = deleted
            && let Some(gone) = self.kept.lock().remove(id)
        {
            gone.limiter.revoke(true);
        }
    }

    /// Re-reads whether the store holds any client: another replica may have
    /// made the first or deleted the last.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let any = self.store.count_clients().await? > 0;
        self.any_stored.store(any, Ordering::Release);
        Ok(())
    }

    /// A client's limiter and counters, made on first sight and kept by
    /// id; its limits updated when they changed, its name renamed.
    fn keep(
        &self,
        id: &Arc<str>,
        name: &Arc<str>,
        limits: &ClientLimits,
        budget: Option<Budget>,
    ) -> Kept {
        let mut kept = self.kept.lock();
        let entry = match kept.get(id) {
            Some(existing) => {
                existing.counters.rename(name);
                Kept {
                    limiter: existing.limiter.update(limits),
                    counters: Arc::clone(&existing.counters),
                    account: Arc::clone(&existing.account),
                    budget,
                }
            }
            None => Kept {
                limiter: ClientLimiter::new(limits),
                counters: ClientCounters::new(name),
                account: Arc::default(),
                budget,
            },
        };
        kept.insert(Arc::clone(id), entry.clone());
        entry
    }

    /// Forgets what was kept of declared clients no longer in the config.
    fn keep_declared(&self, ids: &[Arc<str>]) {
        self.kept.lock().retain(|id, kept| {
            let stays = !id.starts_with(CONFIG_ID_PREFIX) || ids.contains(id);
            if !stays {
                kept.limiter.revoke(true);
            }
            stays
        });
    }

    /// What a client's requests cost from day `from` on (all days for
    /// `None`), nano-dollars, counting every request that has ended here:
    /// the ledger writes what it holds first.
    pub async fn stored_spend(
        &self,
        client_id: &str,
        from: Option<String>,
    ) -> Result<u64, StoreError> {
        self.ledger.flush().await?;
        self.store.spend(client_id, from.as_deref()).await
    }

    /// A client's account, if this gateway has seen the client.
    pub fn account(&self, id: &str) -> Option<Arc<Account>> {
        self.kept.lock().get(id).map(|k| Arc::clone(&k.account))
    }

    /// Every client seen with a budget, by id, for `/status`.
    pub fn budgets(&self) -> Vec<BudgetView> {
        let mut all: Vec<_> = self
            .kept
            .lock()
            .iter()
            .filter_map(|(id, kept)| {
                Some(BudgetView {
                    id: Arc::clone(id),
                    name: kept.counters.name(),
                    budget: kept.budget?,
                    account: Arc::clone(&kept.account),
                })
            })
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Every client's counters by id, sorted, for the `/metrics` scrape.
    pub fn counters(&self) -> Vec<(Arc<str>, Arc<ClientCounters>)> {
        let mut all: Vec<_> = self
            .kept
            .lock()
            .iter()
            .map(|(id, kept)| (Arc::clone(id), Arc::clone(&kept.counters)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn client(&self, stored: &StoredClient) -> Arc<Client> {
        let id: Arc<str> = Arc::from(stored.id.as_str());
        let name: Arc<str> = Arc::from(stored.name.as_str());
        let kept = self.keep(&id, &name, &stored.limits, stored.budget);
        Arc::new(Client {
            limiter: kept.limiter,
            counters: kept.counters,
            account: kept.account,
            budget: stored.budget,
            id,
            name,
            models: stored.models.clone(),
            enabled: stored.enabled,
            share: stored.share,
            max_tier: None,
        })
    }
}
