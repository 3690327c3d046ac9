//! Clients: who is calling, and the limits the gateway keeps for them.
//!
//! A client presents its own gateway key. It is declared in the config
//! (`[[clients]]`, found in the snapshot's [`Directory`]) or made through
//! the admin API and kept in the [`Store`], found through the [`Registry`]'s
//! cache. Either way it is found by the key's SHA-256: the key itself is
//! never kept, and [`Client::admit`] applies its limits before any node is
//! chosen:
//! - disabled, deleted or rotated away: 401 at authentication, as if the key
//!   were unknown;
//! - a model outside its `models`: 403 `model_not_allowed`;
//! - its token bucket (`burst`, `rate_per_second`) empty, or its `rpm` /
//!   `tpm` window full: 429 `client_rate_limit_exceeded` with the honest
//!   `Retry-After`. A client over its own limit does not queue: waiting
//!   would not free anything for it sooner than the `Retry-After`.
//!
//! A client's window is the same structure as a node's
//! ([`NodeUsage`]): reserved at admission, settled to the tokens used when
//! the answer ends, released on every path. It is kept by client id in the
//! registry, apart from any snapshot or cache entry, so neither a reload nor
//! a cache expiry resets a client's minute.
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

use rand::Rng;
use rand::distr::Alphanumeric;
use secrecy::SecretString;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::{BucketLimit, ClientConfig, ClientLimits, Quota};
use crate::error::GatewayError;
use crate::limits::{Demand, HeadroomSignal, NodeUsage, Outlook, Reservation};
use crate::store::{Store, StoreError, StoredClient};
use crate::usage::UsageRecorder;

/// A client as the request path uses it.
#[derive(Debug)]
pub struct Client {
    /// `cl_...` for a stored client, `cfg_<name>` for a declared one.
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub models: Option<Vec<String>>,
    pub enabled: bool,
    pub usage: Arc<ClientUsage>,
}

/// What a client has used: its rolling window, its token bucket, and its
/// counters since start (for `/metrics`).
#[derive(Debug)]
pub struct ClientUsage {
    window: Arc<NodeUsage>,
    bucket: Option<Mutex<TokenBucket>>,
    pub counters: Arc<ClientCounters>,
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
}

impl ClientCounters {
    fn new(name: &Arc<str>) -> Arc<Self> {
        Arc::new(Self {
            name: Mutex::new(Arc::clone(name)),
            requests: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
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

impl ClientUsage {
    /// The limits, as the shared windows take them: rpm, tpm, bucket burst
    /// and rate (0 = none).
    pub fn shared_limits(&self) -> (u64, u64, u64, f64) {
        let quota = self.window.quota();
        let n = |v: Option<std::num::NonZeroU64>| v.map_or(0, u64::from);
        let (burst, rate) = self.bucket.as_ref().map_or((0, 0.0), |b| {
            let limit = b.lock().limit;
            (u64::from(limit.burst), limit.rate_per_second)
        });
        (n(quota.rpm), n(quota.tpm), burst, rate)
    }

    pub fn new(name: &Arc<str>, limits: &ClientLimits) -> Arc<Self> {
        let quota = Quota {
            rpm: limits.rpm,
            tpm: limits.tpm,
            ..Quota::default()
        };
        // Nothing waits on a client's window, so it wakes nobody.
        let window = NodeUsage::new(quota, Arc::new(HeadroomSignal::default()));
        Arc::new(Self {
            window,
            bucket: limits
                .bucket
                .map(|limit| Mutex::new(TokenBucket::full(limit, Instant::now()))),
            counters: ClientCounters::new(name),
        })
    }

    /// Applies changed limits (a reload, an admin change) without resetting
    /// what was used. A bucket whose limit changed starts full at its new size.
    fn update(self: &Arc<Self>, name: &Arc<str>, limits: &ClientLimits) -> Arc<Self> {
        {
            let mut current = self.counters.name.lock();
            if **current != **name {
                *current = Arc::clone(name);
            }
        }
        let bucket_same = match (&self.bucket, limits.bucket) {
            (None, None) => true,
            (Some(b), Some(limit)) => b.lock().limit == limit,
            _ => false,
        };
        self.window.set_quota(Quota {
            rpm: limits.rpm,
            tpm: limits.tpm,
            ..Quota::default()
        });
        if bucket_same {
            return Arc::clone(self);
        }
        Arc::new(Self {
            window: Arc::clone(&self.window),
            bucket: limits
                .bucket
                .map(|limit| Mutex::new(TokenBucket::full(limit, Instant::now()))),
            counters: Arc::clone(&self.counters),
        })
    }
}

impl Client {
    /// Applies the client's own limits to a request for `model` that asks
    /// `demand`; the reservation settles with the request.
    pub fn admit(&self, model: Option<&str>, demand: Demand) -> Result<Reservation, GatewayError> {
        // A disabled client never gets here: `auth::identify` refuses its key.
        if let (Some(allowed), Some(model)) = (&self.models, model)
            && !allowed.iter().any(|m| m == model)
        {
            return Err(GatewayError::ModelNotAllowed(model.to_owned()));
        }
        let now = Instant::now();
        // The window first: a refused request must not spend a bucket token.
        let demand = Demand { bytes: 0, ..demand };
        let Some(reservation) = self.usage.window.try_reserve(demand, now) else {
            let retry_after = match self.usage.window.outlook(demand, now) {
                Outlook::At(at) => at.saturating_duration_since(now),
                Outlook::Never(limit) => {
                    return Err(GatewayError::ClientLimitTooSmall {
                        limit: limit.field(),
                    });
                }
                _ => Duration::from_secs(1),
            };
            return Err(GatewayError::ClientRateLimited { retry_after });
        };
        if let Some(bucket) = &self.usage.bucket
            && let Err(retry_after) = bucket.lock().take(now)
        {
            reservation.cancel();
            return Err(GatewayError::ClientRateLimited { retry_after });
        }
        Ok(reservation)
    }
}

/// A token bucket: `burst` requests at once, refilled continuously at
/// `rate_per_second`.
#[derive(Debug)]
struct TokenBucket {
    limit: BucketLimit,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn full(limit: BucketLimit, now: Instant) -> Self {
        Self {
            limit,
            tokens: u64::from(limit.burst) as f64,
            at: now,
        }
    }

    /// Takes one token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let capacity = u64::from(self.limit.burst) as f64;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.rate_per_second).min(capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.limit.rate_per_second,
            ))
        }
    }
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
            let client = Client {
                usage: registry.usage_for(&id, &config.name, &config.limits),
                id,
                name: Arc::clone(&config.name),
                models: config.models.clone(),
                enabled: config.enabled,
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

pub const CONFIG_ID_PREFIX: &str = "cfg_";
const STORED_ID_PREFIX: &str = "cl_";
/// What every key the gateway makes starts with, so one is recognisable.
const KEY_PREFIX: &str = "sk-bal-";
/// 40 alphanumerics: about 238 bits.
const KEY_RANDOM_CHARS: usize = 40;

/// A new client id.
pub fn new_id() -> String {
    format!("{STORED_ID_PREFIX}{}", random_chars(16))
}

/// A new gateway key, shown once and stored only as its hash.
pub fn new_key() -> SecretString {
    SecretString::from(format!("{KEY_PREFIX}{}", random_chars(KEY_RANDOM_CHARS)))
}

/// What is shown of a key so people can tell keys apart: `sk-bal-` and 4
/// more characters of a generated key; of a shorter declared key, at most a
/// third of it.
pub fn key_prefix(key: &str) -> String {
    let shown = (KEY_PREFIX.len() + 4).min(key.chars().count() / 3);
    key.chars().take(shown).collect()
}

fn random_chars(n: usize) -> String {
    // `rand::rng()` is a CSPRNG seeded from the OS.
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// The clients kept in the store, looked up through a cache, and every
/// client's usage by id.
pub struct Registry {
    store: Store,
    cache: moka::future::Cache<[u8; 32], Cached>,
    /// Counts changes made through this gateway; a cache entry from before
    /// the latest is a miss.
    changes: AtomicU64,
    usages: Mutex<HashMap<Arc<str>, Arc<ClientUsage>>>,
    /// Whether the store held any client when last seen: with none, and no
    /// keys in the config, the gateway is open.
    any_stored: AtomicBool,
    recorder: UsageRecorder,
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
        recorder: UsageRecorder,
    ) -> Result<Self, StoreError> {
        let any_stored = store.count_clients().await? > 0;
        Ok(Self {
            store,
            cache: moka::future::Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(cache_ttl)
                .build(),
            changes: AtomicU64::new(0),
            usages: Mutex::new(HashMap::new()),
            any_stored: AtomicBool::new(any_stored),
            recorder,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn recorder(&self) -> &UsageRecorder {
        &self.recorder
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
            self.usage_for(
                &Arc::from(client.id.as_str()),
                &Arc::from(client.name.as_str()),
                &client.limits,
            );
        }
        if let Some(id) = deleted {
            self.usages.lock().remove(id);
        }
    }

    /// Re-reads whether the store holds any client: another replica may have
    /// made the first or deleted the last.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let any = self.store.count_clients().await? > 0;
        self.any_stored.store(any, Ordering::Release);
        Ok(())
    }

    /// A client's usage, made on first sight and kept by id; updated to
    /// `limits` when they changed.
    pub fn usage_for(
        &self,
        id: &Arc<str>,
        name: &Arc<str>,
        limits: &ClientLimits,
    ) -> Arc<ClientUsage> {
        let mut usages = self.usages.lock();
        let usage = match usages.get(id) {
            Some(existing) => existing.update(name, limits),
            None => ClientUsage::new(name, limits),
        };
        usages.insert(Arc::clone(id), Arc::clone(&usage));
        usage
    }

    /// Forgets the usage of declared clients no longer in the config.
    fn keep_declared(&self, ids: &[Arc<str>]) {
        self.usages
            .lock()
            .retain(|id, _| !id.starts_with(CONFIG_ID_PREFIX) || ids.contains(id));
    }

    /// Every client's counters by id, sorted, for the `/metrics` scrape.
    pub fn counters(&self) -> Vec<(Arc<str>, Arc<ClientCounters>)> {
        let mut all: Vec<_> = self
            .usages
            .lock()
            .iter()
            .map(|(id, usage)| (Arc::clone(id), Arc::clone(&usage.counters)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn client(&self, stored: &StoredClient) -> Arc<Client> {
        let id: Arc<str> = Arc::from(stored.id.as_str());
        let name: Arc<str> = Arc::from(stored.name.as_str());
        Arc::new(Client {
            usage: self.usage_for(&id, &name, &stored.limits),
            id,
            name,
            models: stored.models.clone(),
            enabled: stored.enabled,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;

    use super::*;

    fn bucket(burst: u64, rate: f64) -> TokenBucket {
        TokenBucket::full(
            BucketLimit {
                burst: NonZeroU64::new(burst).unwrap(),
                rate_per_second: rate,
            },
            Instant::now(),
        )
    }

    #[test]
    fn a_key_shows_only_its_prefix() {
        use secrecy::ExposeSecret;
        let key = new_key();
        assert_eq!(
            key.expose_secret().len(),
            KEY_PREFIX.len() + KEY_RANDOM_CHARS
        );
        assert_eq!(key_prefix(key.expose_secret()).len(), KEY_PREFIX.len() + 4);
        assert_ne!(new_key().expose_secret(), key.expose_secret());
        // A short declared key shows a third of itself at most.
        assert_eq!(key_prefix("sk-team-a-key"), "sk-t");
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let mut b = bucket(2, 4.0);
        assert!(b.take(Instant::now()).is_ok());
        assert!(b.take(Instant::now()).is_ok());
        assert_eq!(b.take(Instant::now()), Err(Duration::from_millis(250)));
        tokio::time::advance(Duration::from_millis(250)).await;
        assert!(b.take(Instant::now()).is_ok());
        // Never more than the burst, however long it rested.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(b.take(Instant::now()).is_ok());
        assert!(b.take(Instant::now()).is_ok());
        assert!(b.take(Instant::now()).is_err());
    }
}
