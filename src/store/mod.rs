//! The store: clients, their usage and the records of their stored
//! objects ([`objects`]), in embedded SQLite (the
//! default, `sqlite://balancer.db`) or in PostgreSQL (`postgres://...`, for
//! several replicas sharing one set of clients).
//!
//! One code path serves both (sqlx's `Any` driver): every statement is
//! written once in SQL both databases run (`$N` placeholders, `ON CONFLICT`
//! upserts, portable column types), and the migrations in `migrations/` run
//! at start-up, creating a new SQLite file if there is none.
//!
//! Invariants:
//! - A key never reaches the store: a client row holds the key's SHA-256
//!   (hex) and a short prefix for people to recognise it by.
//! - Usage rows only grow: [`Store::add_usage`] adds a batch in one
//!   transaction, so a batch is counted whole or not at all.
//!
//! The request path never waits on the store but for a key it has not seen
//! within `store.cache_ttl` ([`clients::Registry`](crate::clients::Registry)).

use std::fmt::Write as _;
use std::num::NonZeroU64;
use std::path::Path;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::keys::redacted_url;
use crate::limits::{BucketLimit, ClientLimits, Priority, Share};
use crate::money::{Budget, Cost, Period};

mod objects;

pub use objects::{Order, StoredObject};

/// Which database a store URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A client as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredClient {
    pub id: String,
    pub name: String,
    pub key_hash: [u8; 32],
    pub key_prefix: String,
    pub limits: ClientLimits,
    /// Its class and weight when the pool is saturated.
    pub share: Share,
    /// `None` may use every model.
    pub models: Option<Vec<String>>,
    pub enabled: bool,
    /// What it may spend per period; `None`: no budget.
    pub budget: Option<Budget>,
    /// Unix seconds.
    pub created_at: i64,
}

/// What a client used: one day and model, or a sum of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct UsageTotals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// What the requests cost, in nano-dollars; shown in dollars.
    #[serde(rename = "cost_usd", serialize_with = "as_usd")]
    pub cost_nanos: u64,
}

fn as_usd<S: serde::Serializer>(nanos: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(Cost(*nanos).usd())
}

impl std::ops::AddAssign for UsageTotals {
    fn add_assign(&mut self, other: Self) {
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.request_bytes += other.request_bytes;
        self.response_bytes += other.response_bytes;
        self.cost_nanos += other.cost_nanos;
    }
}

/// One client's usage of one model on one UTC day (`YYYY-MM-DD`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub client_id: String,
    pub model: String,
    pub day: String,
    pub totals: UsageTotals,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the client store ({target}): {reason}")]
    Open { target: String, reason: String },
    #[error("the client store failed: {0}")]
    Failed(String),
    /// A unique column already holds the value: the column's name.
    #[error("{0} is already taken")]
    Conflict(&'static str),
    /// The database refused the data itself (not the connection): trying
    /// the same again would fail the same way.
    #[error("the client store refused the data: {0}")]
    Rejected(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err
            && db.is_unique_violation()
        {
            let column = if db.message().contains("key_hash") {
                "key"
            } else {
                "name"
            };
            return StoreError::Conflict(column);
        }
        if let sqlx::Error::Database(db) = &err {
            return StoreError::Rejected(db.message().to_owned());
        }
        StoreError::Failed(err.to_string())
    }
}

/// The client store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

const CLIENT_COLUMNS: &str = "id, name, key_hash, key_prefix, rpm, tpm, burst, rate_per_second, models, enabled, \
     max_concurrency, priority, weight, budget_usd, budget_period, created_at";

/// A lookup on the request path gives up after this: a client then gets a
/// 503 rather than a hung request.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

impl Store {
    /// Opens the store at `url` and brings its schema up to date. A relative
    /// SQLite path is taken from `base_dir` (the config file's directory).
    pub async fn open(url: &SecretString, base_dir: &Path) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let target = redacted_url(url.expose_secret());
        let failed = |reason: String| StoreError::Open {
            target: target.clone(),
            reason,
        };
        let (url, backend) = resolve(url.expose_secret(), base_dir).map_err(failed)?;
        // An in-memory SQLite database lives and dies with its connection:
        // keep exactly one, for good.
        let in_memory = url.expose_secret().contains(":memory:");
        let connections = match backend {
            _ if in_memory => 1,
            // One writer at a time anyway; a few readers beside it.
            Backend::Sqlite => 4,
            Backend::Postgres => 8,
        };
        let mut options = AnyPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(ACQUIRE_TIMEOUT);
        if in_memory {
            options = options
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        }
        let pool = options
            .connect(url.expose_secret())
            .await
            .map_err(|e| failed(e.to_string()))?;
        if backend == Backend::Sqlite {
            // Readers no longer wait for the usage writer. Kept by the file.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .map_err(|e| failed(e.to_string()))?;
        }
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| failed(format!("migration failed: {e}")))?;
        Ok(Self { pool, backend })
    }

    /// Whether the store answers now (one trivial query).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes every connection; waits for those in use.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn insert_client(&self, client: &StoredClient) -> Result<(), StoreError> {
        let insert = sqlx::query(
            "INSERT INTO clients (id, name, key_hash, key_prefix, rpm, tpm, burst, rate_per_second, models, enabled, \
             max_concurrency, priority, weight, budget_usd, budget_period, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $16)",
        )
        .bind(&client.id)
        .bind(&client.name)
        .bind(hex(&client.key_hash))
        .bind(&client.key_prefix);
        bind_settings(insert, client)
            .bind(client.created_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn client(&self, id: &str) -> Result<Option<StoredClient>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CLIENT_COLUMNS} FROM clients WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| client_from_row(&r)).transpose()
    }

    /// The client whose key hashes to `key_hash`.
    pub async fn client_by_key(
        &self,
        key_hash: &[u8; 32],
    ) -> Result<Option<StoredClient>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CLIENT_COLUMNS} FROM clients WHERE key_hash = $1"
        ))
        .bind(hex(key_hash))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| client_from_row(&r)).transpose()
    }

    /// Every client, oldest first.
    pub async fn clients(&self) -> Result<Vec<StoredClient>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CLIENT_COLUMNS} FROM clients ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(client_from_row).collect()
    }

    pub async fn name_taken(&self, name: &str, except_id: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM clients WHERE name = $1 AND id <> $2")
            .bind(name)
            .bind(except_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)? > 0)
    }

    /// Writes everything but the key and the creation time; `false` if
    /// there is no such client.
    pub async fn update_client(&self, client: &StoredClient, now: i64) -> Result<bool, StoreError> {
        let update = sqlx::query(
            "UPDATE clients SET name = $2, rpm = $3, tpm = $4, burst = $5, rate_per_second = $6, \
             models = $7, enabled = $8, max_concurrency = $9, priority = $10, weight = $11, \
             budget_usd = $12, budget_period = $13, updated_at = $14 WHERE id = $1",
        )
        .bind(&client.id)
        .bind(&client.name);
        let done = bind_settings(update, client)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Replaces a client's key; `false` if there is no such client.
    pub async fn set_key(
        &self,
        id: &str,
        key_hash: &[u8; 32],
        key_prefix: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE clients SET key_hash = $2, key_prefix = $3, updated_at = $4 WHERE id = $1",
        )
        .bind(id)
        .bind(hex(key_hash))
        .bind(key_prefix)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes a client and its usage; `false` if there is no such client.
    pub async fn delete_client(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM client_usage WHERE client_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM clients WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn count_clients(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM clients")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0))
    }

    /// Adds a batch of usage in one transaction.
    pub async fn add_usage(&self, rows: &[UsageRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for row in rows {
            let t = &row.totals;
            sqlx::query(
                "INSERT INTO client_usage (client_id, model, day, requests, prompt_tokens, completion_tokens, request_bytes, response_bytes, cost_nanousd) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (client_id, model, day) DO UPDATE SET \
                 requests = client_usage.requests + excluded.requests, \
                 prompt_tokens = client_usage.prompt_tokens + excluded.prompt_tokens, \
                 completion_tokens = client_usage.completion_tokens + excluded.completion_tokens, \
                 request_bytes = client_usage.request_bytes + excluded.request_bytes, \
                 response_bytes = client_usage.response_bytes + excluded.response_bytes, \
                 cost_nanousd = client_usage.cost_nanousd + excluded.cost_nanousd",
            )
            .bind(&row.client_id)
            .bind(&row.model)
            .bind(&row.day)
            .bind(column(t.requests))
            .bind(column(t.prompt_tokens))
            .bind(column(t.completion_tokens))
            .bind(column(t.request_bytes))
            .bind(column(t.response_bytes))
            .bind(column(t.cost_nanos))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A client's usage from day `from` to day `to` (inclusive), by day then model.
    pub async fn usage(
        &self,
        client_id: &str,
        from: &str,
        to: &str,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT model, day, requests, prompt_tokens, completion_tokens, request_bytes, response_bytes, cost_nanousd \
             FROM client_usage WHERE client_id = $1 AND day >= $2 AND day <= $3 ORDER BY day, model",
        )
        .bind(client_id)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let n = |c: &str| {
                    r.try_get::<i64, _>(c)
                        .map(|v| u64::try_from(v).unwrap_or(0))
                };
                Ok(UsageRow {
                    client_id: client_id.to_owned(),
                    model: r.try_get("model")?,
                    day: r.try_get("day")?,
                    totals: UsageTotals {
                        requests: n("requests")?,
                        prompt_tokens: n("prompt_tokens")?,
                        completion_tokens: n("completion_tokens")?,
                        request_bytes: n("request_bytes")?,
                        response_bytes: n("response_bytes")?,
                        cost_nanos: n("cost_nanousd")?,
                    },
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

impl Store {
    /// What a client's requests cost from day `from` on (every day for
    /// `None`), in nano-dollars.
    pub async fn spend(&self, client_id: &str, from: Option<&str>) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(cost_nanousd), 0) AS BIGINT) FROM client_usage \
             WHERE client_id = $1 AND day >= $2",
        )
        .bind(client_id)
        .bind(from.unwrap_or(""))
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0))
    }
}

/// The URL to connect to: a SQLite path made absolute (from `base_dir`)
/// and opened read-write-create.
fn resolve(url: &str, base_dir: &Path) -> Result<(SecretString, Backend), String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok((SecretString::from(url.to_owned()), Backend::Postgres));
    }
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return Err("store.url: must start with sqlite:// or postgres://".to_owned());
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path == ":memory:" {
        return Ok((SecretString::from(url.to_owned()), Backend::Sqlite));
    }
    if path.is_empty() {
        return Err("store.url: names no SQLite file".to_owned());
    }
    // `base_dir` may itself be relative (or empty, for `--config Balancer.toml`).
    let path = std::path::absolute(base_dir.join(path)).map_err(|e| e.to_string())?;
    let mut resolved = reqwest::Url::parse("sqlite:///").map_err(|e| e.to_string())?;
    resolved.set_path(&path.to_string_lossy());
    let mut query = query.to_owned();
    if !query.split('&').any(|p| p.starts_with("mode=")) {
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str("mode=rwc");
    }
    resolved.set_query(Some(&query));
    Ok((SecretString::from(resolved.to_string()), Backend::Sqlite))
}

fn client_from_row(row: &AnyRow) -> Result<StoredClient, StoreError> {
    let positive = |column: &str| -> Result<Option<NonZeroU64>, sqlx::Error> {
        let value: Option<i64> = row.try_get(column)?;
        Ok(value.and_then(|v| NonZeroU64::new(u64::try_from(v).unwrap_or(0))))
    };
    let burst = positive("burst")?;
    let rate: Option<f64> = row.try_get("rate_per_second")?;
    let bucket = match (burst, rate) {
        (Some(burst), Some(rate_per_second)) => Some(BucketLimit {
            burst,
            rate_per_second,
        }),
        _ => None,
    };
    let models: Option<String> = row.try_get("models")?;
    let models = models
        .map(|m| serde_json::from_str::<Vec<String>>(&m))
        .transpose()
        .map_err(|e| StoreError::Failed(format!("clients.models is not a JSON list: {e}")))?;
    let key_hash: String = row.try_get("key_hash")?;
    Ok(StoredClient {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        key_hash: unhex(&key_hash)
            .ok_or_else(|| StoreError::Failed("clients.key_hash is not a SHA-256".to_owned()))?,
        key_prefix: row.try_get("key_prefix")?,
        limits: ClientLimits {
            rpm: positive("rpm")?,
            tpm: positive("tpm")?,
            bucket,
            max_concurrency: positive("max_concurrency")?,
        },
        share: Share {
            priority: Priority::parse(&row.try_get::<String, _>("priority")?).unwrap_or_default(),
            weight: row.try_get("weight")?,
        },
        models,
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        budget: budget_from_columns(
            row.try_get("budget_usd")?,
            row.try_get::<Option<String>, _>("budget_period")?
                .as_deref(),
        ),
        created_at: row.try_get("created_at")?,
    })
}

type LimitColumns = (Option<i64>, Option<i64>, Option<i64>, Option<f64>);

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds a client's settings, in their column order: rpm, tpm, burst,
/// rate_per_second, models, enabled, max_concurrency, priority, weight,
/// budget_usd, budget_period.
fn bind_settings<'q>(query: AnyQuery<'q>, client: &'q StoredClient) -> AnyQuery<'q> {
    let (rpm, tpm, burst, rate) = limit_columns(&client.limits);
    query
        .bind(rpm)
        .bind(tpm)
        .bind(burst)
        .bind(rate)
        .bind(models_column(client.models.as_deref()))
        .bind(i64::from(client.enabled))
        .bind(client.limits.max_concurrency.map(|v| column(v.get())))
        .bind(client.share.priority.as_str())
        .bind(client.share.weight)
        .bind(client.budget.map(|b| b.limit.usd()))
        .bind(client.budget.map(|b| b.period.as_str()))
}

/// A budget as its two columns hold it; an unknown period reads as the
/// default (the columns are only written from validated budgets).
fn budget_from_columns(usd: Option<f64>, period: Option<&str>) -> Option<Budget> {
    usd.map(|usd| Budget {
        limit: Cost::from_usd(usd),
        period: period.and_then(Period::parse).unwrap_or_default(),
    })
}

fn limit_columns(limits: &ClientLimits) -> LimitColumns {
    let n = |v: Option<NonZeroU64>| v.map(|v| column(v.get()));
    (
        n(limits.rpm),
        n(limits.tpm),
        n(limits.bucket.map(|b| b.burst)),
        limits.bucket.map(|b| b.rate_per_second),
    )
}

fn models_column(models: Option<&[String]>) -> Option<String> {
    models.map(|m| serde_json::Value::from(m).to_string())
}

/// A count as a BIGINT: both databases' integers are signed.
fn column(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn hex(bytes: &[u8; 32]) -> String {
    let mut out = String::with_capacity(64);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_sqlite_path_is_taken_from_the_config_directory() {
        let (url, backend) = resolve("sqlite://balancer.db", Path::new("/etc/balancer")).unwrap();
        assert_eq!(backend, Backend::Sqlite);
        assert_eq!(
            url.expose_secret(),
            "sqlite:///etc/balancer/balancer.db?mode=rwc"
        );
        let (url, _) = resolve("sqlite:/var/lib/b.db?mode=rw", Path::new("/etc")).unwrap();
        assert_eq!(url.expose_secret(), "sqlite:///var/lib/b.db?mode=rw");
        // `--config Balancer.toml`: the config's directory is the working one.
        let (url, _) = resolve("sqlite://balancer.db", Path::new("")).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            url.expose_secret(),
            format!("sqlite://{}/balancer.db?mode=rwc", cwd.display())
        );
    }

    #[tokio::test]
    async fn an_in_memory_store_is_one_database_however_many_ask_at_once() {
        let url = SecretString::from("sqlite::memory:".to_owned());
        let store = Store::open(&url, Path::new(".")).await.unwrap();
        let counts = futures_util::future::join_all((0..8).map(|_| store.count_clients())).await;
        for count in counts {
            assert_eq!(count.unwrap(), 0);
        }
    }

    #[test]
    fn a_hash_survives_its_hex_column() {
        let hash = crate::keys::hash_key(b"sk-anything");
        assert_eq!(unhex(&hex(&hash)), Some(hash));
        assert_eq!(unhex("zz"), None);
    }
}
