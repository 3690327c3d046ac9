//! Clients: who is calling, and the limits the gateway keeps for them.
//!
//! A client presents its own gateway key. The directory finds it by the
//! key's SHA-256 (the key itself is never kept beside the record), and
//! [`Client::admit`] applies its limits before any node is chosen:
//! - disabled: 401 at authentication, as if the key were unknown;
//! - a model outside its `models`: 403 `model_not_allowed`;
//! - its token bucket (`burst`, `rate_per_second`) empty, or its `rpm` /
//!   `tpm` window full: 429 `client_rate_limit_exceeded` with the honest
//!   `Retry-After`. A client over its own limit does not queue: waiting
//!   would not free anything for it sooner than the `Retry-After`.
//!
//! A client's window is the same structure as a node's
//! ([`NodeUsage`]): reserved at admission, settled to the tokens used when
//! the answer ends, released on every path. It is kept by client name
//! across reloads, so a reload never resets a client's minute.
//!
//! Not here yet: clients managed through the admin API and a store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::{BucketLimit, ClientConfig, Quota, hash_key};
use crate::error::GatewayError;
use crate::limits::{Demand, HeadroomSignal, NodeUsage, Outlook, Reservation};

/// A client as the request path uses it.
#[derive(Debug)]
pub struct Client {
    pub name: Arc<str>,
    pub models: Option<Vec<String>>,
    pub enabled: bool,
    pub usage: Arc<ClientUsage>,
}

/// What a client has used: its rolling window and its token bucket.
#[derive(Debug)]
pub struct ClientUsage {
    window: Arc<NodeUsage>,
    bucket: Option<Mutex<TokenBucket>>,
}

impl ClientUsage {
    pub fn new(config: &ClientConfig) -> Arc<Self> {
        let quota = Quota {
            rpm: config.limits.rpm,
            tpm: config.limits.tpm,
            ..Quota::default()
        };
        // Nothing waits on a client's window, so it wakes nobody.
        let window = NodeUsage::new(quota, Arc::new(HeadroomSignal::default()));
        Arc::new(Self {
            window,
            bucket: config
                .limits
                .bucket
                .map(|limit| Mutex::new(TokenBucket::full(limit, Instant::now()))),
        })
    }

    /// Applies changed limits (a reload) without resetting what was used.
    /// A bucket whose limit changed starts full at its new size.
    fn update(self: &Arc<Self>, config: &ClientConfig) -> Arc<Self> {
        let bucket_same = match (&self.bucket, config.limits.bucket) {
            (None, None) => true,
            (Some(b), Some(limit)) => b.lock().limit == limit,
            _ => false,
        };
        self.window.set_quota(Quota {
            rpm: config.limits.rpm,
            tpm: config.limits.tpm,
            ..Quota::default()
        });
        if bucket_same {
            return Arc::clone(self);
        }
        Arc::new(Self {
            window: Arc::clone(&self.window),
            bucket: config
                .limits
                .bucket
                .map(|limit| Mutex::new(TokenBucket::full(limit, Instant::now()))),
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

/// The clients of one snapshot, by key hash.
#[derive(Debug, Default)]
pub struct Directory {
    by_hash: HashMap<[u8; 32], Arc<Client>>,
}

impl Directory {
    /// Builds the directory for `configs`, reusing (and updating) each
    /// client's usage from `usages`, kept by name across reloads.
    pub fn build(
        configs: &[ClientConfig],
        usages: &mut HashMap<Arc<str>, Arc<ClientUsage>>,
    ) -> Self {
        usages.retain(|name, _| configs.iter().any(|c| c.name == *name));
        let mut by_hash = HashMap::with_capacity(configs.len());
        for config in configs {
            let usage = match usages.get(&config.name) {
                Some(existing) => existing.update(config),
                None => ClientUsage::new(config),
            };
            usages.insert(Arc::clone(&config.name), Arc::clone(&usage));
            let client = Client {
                name: Arc::clone(&config.name),
                models: config.models.clone(),
                enabled: config.enabled,
                usage,
            };
            by_hash.insert(config.key.hash(), Arc::new(client));
        }
        Self { by_hash }
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The client whose key is `presented`, if any.
    pub fn find(&self, presented: &[u8]) -> Option<&Arc<Client>> {
        if self.by_hash.is_empty() {
            return None;
        }
        self.by_hash.get(&hash_key(presented))
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
