//! Configuration: the `Balancer.toml` contract, its defaults, and validation.
//!
//! Loading happens in two steps. [`load`] merges the TOML file with
//! `BALANCER_*` environment overrides (figment; `__` separates levels) into
//! the raw serde structs below, which reject unknown fields. `validate`
//! then turns the raw form into a [`Config`] that cannot hold an invalid
//! state: every limit is non-zero, every URL parses, every key was read.
//!
//! Invariants:
//! - A key is a [`secrecy`] type from the moment it is read (env var, file or
//!   literal). Nothing here implements `Serialize`; [`Config::render`] prints
//!   keys as `[redacted]`.
//! - Every validation message starts with the field path, e.g.
//!   `nodes[1].rpm: must be greater than 0`.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "./Balancer.toml";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// 10 MiB: large enough for long chat histories and small file uploads.
pub const DEFAULT_MAX_BODY_BYTES: usize = 10 * 1024 * 1024;
/// Long generations from reasoning models can take minutes.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(60);
/// What a request that names no `max_tokens` reserves for its completion.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 1024;
pub const DEFAULT_QUEUE_MAX_WAIT: Duration = Duration::from_secs(5);
pub const DEFAULT_QUEUE_MAX_DEPTH: usize = 1024;
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
/// The pid file's name when `server.pid_file` is not set; it sits beside the
/// config file, so `balancer reload --config X` finds the gateway started
/// with `--config X`.
pub const DEFAULT_PID_FILE: &str = "balancer.pid";
/// Often enough to take a dead node out within seconds, rare enough to be
/// noise to the upstream (one `GET /models` per node).
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_HEALTH_PATH: &str = "/models";
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_UNHEALTHY_AFTER: u32 = 3;
pub const DEFAULT_HEALTHY_AFTER: u32 = 2;
pub const DEFAULT_MAX_CONCURRENT_PROBES: usize = 8;
/// Consecutive failed requests (connect error, timeout, 5xx) that eject a node.
pub const DEFAULT_EJECT_AFTER: u32 = 3;
/// The first re-probe after an ejection; each further ejection in a row
/// doubles it, up to the maximum.
pub const DEFAULT_EJECT_BACKOFF: Duration = Duration::from_secs(1);
pub const DEFAULT_EJECT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long a node whose quota is exhausted (`insufficient_quota`) rests when
/// the upstream gives no reset time: billing quotas do not refill by the minute.
pub const DEFAULT_QUOTA_EXHAUSTED_COOLDOWN: Duration = Duration::from_secs(3600);

/// Embedded SQLite beside the config file: created and migrated at start-up.
pub const DEFAULT_STORE_URL: &str = "sqlite://balancer.db";
/// How long a key lookup is cached. Changes made through this gateway's
/// admin API apply at once; this bounds how late another replica's arrive.
pub const DEFAULT_CLIENT_CACHE_TTL: Duration = Duration::from_secs(5);
/// Usage is written in one batch this often, off the request path.
pub const DEFAULT_USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";

/// The environment variable that names the config file (a path, not an override).
pub const CONFIG_PATH_ENV: &str = "BALANCER_CONFIG";
const ENV_PREFIX: &str = "BALANCER_";

// ---------------------------------------------------------------------------
// Raw form: what serde reads.

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    server: ServerSettings,
    upstream: UpstreamSettings,
    accounting: AccountingSettings,
    queue: QueueSettings,
    retry: RetrySettings,
    health: HealthSettings,
    auth: RawAuth,
    store: RawStore,
    admin: RawAdmin,
    log: LogSettings,
    cluster: Option<RawCluster>,
    clients: Vec<RawClient>,
    nodes: Vec<RawNode>,
}

/// `[store]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    url: String,
    #[serde(with = "humantime_serde")]
    cache_ttl: Duration,
    #[serde(with = "humantime_serde")]
    usage_flush_interval: Duration,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            url: DEFAULT_STORE_URL.to_owned(),
            cache_ttl: DEFAULT_CLIENT_CACHE_TTL,
            usage_flush_interval: DEFAULT_USAGE_FLUSH_INTERVAL,
        }
    }
}

/// `[cluster]`: limits shared with other replicas through Redis.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    redis_url: String,
    #[serde(default)]
    on_redis_error: OnRedisError,
    #[serde(default = "default_key_prefix")]
    key_prefix: String,
    #[serde(default = "default_redis_timeout", with = "humantime_serde")]
    timeout: Duration,
}

fn default_key_prefix() -> String {
    "balancer".to_owned()
}

fn default_redis_timeout() -> Duration {
    DEFAULT_REDIS_TIMEOUT
}

/// How long one call to Redis may take before it counts as unreachable: a
/// healthy Redis on the same network answers in about a millisecond.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// `cluster.on_redis_error`: what to do while Redis cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisError {
    /// Admit by this replica's own windows (availability over exactness).
    #[default]
    Local,
    /// Answer 503 `cluster_unavailable` (exactness over availability).
    Reject,
}

impl OnRedisError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnRedisError::Local => "local",
            OnRedisError::Reject => "reject",
        }
    }
}

/// `[cluster]`, validated. Read at start-up only.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// `redis://...`; secret, as it may hold a password.
    pub redis_url: SecretString,
    pub on_redis_error: OnRedisError,
    /// Namespaces the keys, so gateways of different teams can share a Redis.
    pub key_prefix: String,
    pub timeout: Duration,
}

/// `[log]`: how log lines are written; the level comes from `RUST_LOG`.
/// Read at start-up only.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line, its fields at the top level.
    Json,
}

impl LogFormat {
    fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    listen: SocketAddr,
    token_env: Option<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            token_env: None,
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Where `serve` writes its pid for `balancer reload` and `balancer
    /// stop`; relative paths are beside the config file. Read at start-up.
    pub pid_file: Option<PathBuf>,
    /// Reload by itself when the config file or a key file changes.
    pub watch_config: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            pid_file: None,
            watch_config: true,
        }
    }
}

/// `[upstream]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSettings {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            first_byte_timeout: DEFAULT_FIRST_BYTE_TIMEOUT,
        }
    }
}

/// `[accounting]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountingSettings {
    pub default_completion_tokens: u64,
}

impl Default for AccountingSettings {
    fn default() -> Self {
        Self {
            default_completion_tokens: DEFAULT_COMPLETION_TOKENS,
        }
    }
}

/// `[queue]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    pub max_depth: usize,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            max_wait: DEFAULT_QUEUE_MAX_WAIT,
            max_depth: DEFAULT_QUEUE_MAX_DEPTH,
        }
    }
}

/// `[retry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    pub attempts: u32,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            attempts: DEFAULT_RETRY_ATTEMPTS,
        }
    }
}

/// `[health]`: active probes and passive ejection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSettings {
    /// Active probes; passive health (real traffic) always applies.
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Probed as `GET {node url}{path}` with the node's key.
    pub path: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
    pub max_concurrent_probes: usize,
    pub eject_after: u32,
    #[serde(with = "humantime_serde")]
    pub eject_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub eject_backoff_max: Duration,
    #[serde(with = "humantime_serde")]
    pub quota_exhausted_cooldown: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: DEFAULT_HEALTH_INTERVAL,
            path: DEFAULT_HEALTH_PATH.to_owned(),
            timeout: DEFAULT_HEALTH_TIMEOUT,
            unhealthy_after: DEFAULT_UNHEALTHY_AFTER,
            healthy_after: DEFAULT_HEALTHY_AFTER,
            max_concurrent_probes: DEFAULT_MAX_CONCURRENT_PROBES,
            eject_after: DEFAULT_EJECT_AFTER,
            eject_backoff: DEFAULT_EJECT_BACKOFF,
            eject_backoff_max: DEFAULT_EJECT_BACKOFF_MAX,
            quota_exhausted_cooldown: DEFAULT_QUOTA_EXHAUSTED_COOLDOWN,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    client_keys_env: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: String,
    key_env: String,
    rpm: Option<u64>,
    tpm: Option<u64>,
    burst: Option<u64>,
    rate_per_second: Option<f64>,
    models: Option<Vec<String>>,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
}

fn enabled_by_default() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    url: String,
    api_key_env: Option<String>,
    api_key_file: Option<PathBuf>,
    api_key: Option<String>,
    models: Option<Vec<String>>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    bpm: Option<u64>,
    max_concurrency: Option<u64>,
    ca_file: Option<PathBuf>,
}

// ---------------------------------------------------------------------------
// Validated form.

/// A validated configuration: every field holds a usable value.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub accounting: AccountingSettings,
    pub queue: QueueSettings,
    pub retry: RetrySettings,
    pub health: HealthSettings,
    /// Gateway keys clients must present; empty (and no `clients`) means
    /// an open gateway.
    pub client_keys: Vec<ClientKey>,
    /// Clients with their own key, limits and models (`[[clients]]`).
    pub clients: Vec<ClientConfig>,
    /// Read at start-up only.
    pub store: StoreSettings,
    /// Read at start-up only.
    pub admin: AdminSettings,
    /// Read at start-up only.
    pub log: LogSettings,
    /// Shared limits; `None` keeps them in this process. Start-up only.
    pub cluster: Option<ClusterSettings>,
    pub nodes: Vec<NodeConfig>,
}

/// `[store]`: where clients and their usage are kept.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// `sqlite://<path>` or `postgres://...`; secret, as it may hold a password.
    pub url: SecretString,
    pub cache_ttl: Duration,
    pub usage_flush_interval: Duration,
}

/// `[admin]`: the admin API's listener and bearer token.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// From `admin.token_env`; `None` turns the admin API off. Compared in
    /// constant time, like a client key.
    pub token: Option<ClientKey>,
}

/// One upstream deployment and its quota.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: Arc<str>,
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:9001/v1`.
    pub url: Arc<str>,
    pub key: NodeKey,
    /// `None` serves any model.
    pub models: Option<Vec<String>>,
    pub quota: Quota,
    pub ca_file: Option<PathBuf>,
    /// Where the key was read from, when from a file: reload watches it.
    pub key_file: Option<PathBuf>,
}

/// A client declared in the config: its own gateway key and limits.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: Arc<str>,
    pub key: ClientKey,
    pub limits: ClientLimits,
    /// `None` may use every model.
    pub models: Option<Vec<String>>,
    pub enabled: bool,
}

/// A client's own limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClientLimits {
    pub rpm: Option<NonZeroU64>,
    pub tpm: Option<NonZeroU64>,
    /// A token bucket of `burst` requests refilled at `rate_per_second`.
    pub bucket: Option<BucketLimit>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketLimit {
    pub burst: NonZeroU64,
    pub rate_per_second: f64,
}

impl ClientLimits {
    /// Validates a client's limits as written (config or admin API): zero is
    /// refused (leave a limit out for none), and a bucket needs both its
    /// size and its rate. Errors name the field.
    pub fn from_parts(
        rpm: Option<u64>,
        tpm: Option<u64>,
        burst: Option<u64>,
        rate_per_second: Option<f64>,
    ) -> Result<Self, Vec<(&'static str, &'static str)>> {
        let mut problems = Vec::new();
        let mut limit = |field: &'static str, value: Option<u64>| match value {
            Some(0) => {
                problems.push((field, "must be greater than 0; leave it out for no limit"));
                None
            }
            other => other.and_then(NonZeroU64::new),
        };
        let rpm = limit("rpm", rpm);
        let tpm = limit("tpm", tpm);
        let burst_limit = limit("burst", burst);
        let rate_valid = rate_per_second.map(|r| r.is_finite() && r > 0.0);
        if rate_valid == Some(false) {
            problems.push(("rate_per_second", "must be a number greater than 0"));
        }
        let bucket = match (
            burst_limit,
            rate_per_second.filter(|_| rate_valid == Some(true)),
        ) {
            (Some(burst), Some(rate_per_second)) => Some(BucketLimit {
                burst,
                rate_per_second,
            }),
            (Some(_), None) if rate_valid.is_none() => {
                problems.push(("rate_per_second", "burst needs rate_per_second too"));
                None
            }
            (None, Some(_)) if burst != Some(0) => {
                problems.push(("burst", "rate_per_second needs burst too"));
                None
            }
            _ => None,
        };
        if problems.is_empty() {
            Ok(Self { rpm, tpm, bucket })
        } else {
            Err(problems)
        }
    }
}

/// What is wrong with a client's `models` list, if anything.
pub fn models_problem(models: &[String]) -> Option<&'static str> {
    (models.is_empty() || models.iter().any(|m| m.trim().is_empty()))
        .then_some("must list model names; leave it out to allow every model")
}

/// A node's limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub rpm: Option<NonZeroU64>,
    pub tpm: Option<NonZeroU64>,
    pub bpm: Option<NonZeroU64>,
    pub max_concurrency: Option<NonZeroU64>,
}

impl Quota {
    /// The quota for `limit`, if limited.
    pub fn of(&self, limit: crate::limits::Limit) -> Option<u64> {
        use crate::limits::Limit;
        let value = match limit {
            Limit::Rpm => self.rpm,
            Limit::Tpm => self.tpm,
            Limit::Bpm => self.bpm,
            Limit::MaxConcurrency => self.max_concurrency,
        };
        value.map(u64::from)
    }
}

/// An upstream key. The `Authorization` value is built once, marked
/// sensitive, so the request path neither formats nor exposes the secret.
#[derive(Clone)]
pub struct NodeKey {
    secret: Arc<SecretString>,
    authorization: HeaderValue,
}

impl NodeKey {
    pub(crate) fn new(secret: SecretString) -> Result<Self, String> {
        let mut authorization = HeaderValue::try_from(format!("Bearer {}", secret.expose_secret()))
            .map_err(|_| "the key contains characters not allowed in a header".to_owned())?;
        authorization.set_sensitive(true);
        Ok(Self {
            secret: Arc::new(secret),
            authorization,
        })
    }

    /// The `Authorization: Bearer …` value to send upstream.
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }

    /// The key itself, for code that must compare it (tests, probes).
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A gateway key a client presents.
#[derive(Clone)]
pub struct ClientKey(Arc<SecretString>);

impl ClientKey {
    pub fn new(secret: SecretString) -> Self {
        Self(Arc::new(secret))
    }

    /// SHA-256 of the key: how a client is looked up (and, later, stored).
    pub fn hash(&self) -> [u8; 32] {
        hash_key(self.0.expose_secret().as_bytes())
    }

    /// Constant-time comparison with a presented key.
    /// What may be shown of the key ([`crate::clients::key_prefix`]).
    pub fn prefix(&self) -> String {
        crate::clients::key_prefix(self.0.expose_secret())
    }

    pub fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.expose_secret().as_bytes().ct_eq(presented).into()
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// SHA-256 of a presented key.
pub fn hash_key(key: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key).into()
}

/// Everything wrong with a configuration, one line per problem.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("\n"))
    }
}

impl ConfigError {
    fn one(problem: impl Into<String>) -> Self {
        Self {
            problems: vec![problem.into()],
        }
    }
}

impl Config {
    /// The files whose change should reload this config: every key file
    /// and CA bundle it reads.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        self.nodes
            .iter()
            .flat_map(|n| n.key_file.iter().chain(n.ca_file.iter()))
            .cloned()
            .collect()
    }
}

/// The pid file of the gateway started with the config at `config_path`:
/// `server.pid_file` (relative to the config's directory), else
/// `balancer.pid` beside it. Reads only that one field, so it works even when
/// the rest of the file is invalid (`balancer reload` must report that).
pub fn pid_file_for(config_path: &Path, configured: Option<&Path>) -> PathBuf {
    let dir = config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match configured {
        Some(path) if path.is_absolute() => path.to_owned(),
        Some(path) => dir.join(path),
        None => dir.join(DEFAULT_PID_FILE),
    }
}

/// One setting (`"server.listen"`) as the file at `config_path` and the
/// `BALANCER_*` overrides set it, read alone: it works even when the rest
/// of the file is invalid (`balancer reload` must report that). `None` when
/// it is absent or cannot be read.
fn configured<T: serde::de::DeserializeOwned>(config_path: &Path, key: &str) -> Option<T> {
    Figment::from(Toml::file(config_path))
        .merge(env_overrides())
        .extract_inner(key)
        .ok()
}

/// `server.pid_file` as the file at `config_path` sets it, if it can be read.
pub fn configured_pid_file(config_path: &Path) -> Option<PathBuf> {
    configured(config_path, "server.pid_file")
}

/// `server.listen` as the config at `config_path` sets it, if it can be read.
pub fn configured_listen(config_path: &Path) -> Option<SocketAddr> {
    configured(config_path, "server.listen")
}

/// `log.format` as the config at `config_path` sets it, read before
/// logging starts; text when it cannot be read (the full load then
/// reports why).
pub fn configured_log_format(config_path: &Path) -> LogFormat {
    configured(config_path, "log.format").unwrap_or_default()
}

/// Where a literal key or other soft problem deserves a warning at start-up.
#[derive(Debug, Clone, Default)]
pub struct Warnings(pub Vec<String>);

/// Reads `path`, applies `BALANCER_*` overrides, and validates.
pub fn load(path: &Path) -> Result<(Config, Warnings), ConfigError> {
    load_with(path, &|var| std::env::var(var).ok())
}

/// [`load`], with `env` resolving the variables that hold keys.
pub fn load_with(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Warnings), ConfigError> {
    if !path.is_file() {
        return Err(ConfigError::one(format!(
            "{}: config file not found",
            path.display()
        )));
    }
    let figment = Figment::from(Toml::file(path)).merge(env_overrides());
    from_figment(figment, env)
}

/// Validates TOML text with `env` resolving `api_key_env` / `client_keys_env`
/// names (no `BALANCER_*` overrides). Used by tests and the demo.
pub fn from_toml_str(
    toml: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Warnings), ConfigError> {
    from_figment(Figment::from(Toml::string(toml)), env)
}

/// `BALANCER_<SECTION>__<FIELD>` variables. Only names with `__` are
/// settings: `BALANCER_CONFIG` names the file, and a variable a config
/// names for a secret may well start with `BALANCER_` too (the shipped
/// config's `BALANCER_ADMIN_TOKEN`).
fn env_overrides() -> Env {
    Env::prefixed(ENV_PREFIX)
        .filter(|key| key.as_str().contains("__"))
        .split("__")
}

fn from_figment(
    figment: Figment,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Warnings), ConfigError> {
    let raw: RawConfig = figment.extract().map_err(|err| ConfigError {
        problems: err
            .into_iter()
            .map(|e| describe_figment_error(&e))
            .collect(),
    })?;
    validate(raw, env)
}

fn describe_figment_error(err: &figment::Error) -> String {
    let mut path = String::new();
    for segment in &err.path {
        if segment.chars().all(|c| c.is_ascii_digit()) {
            let _ = write!(path, "[{segment}]");
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(segment);
        }
    }
    let source = err
        .metadata
        .as_ref()
        .map(|m| format!(" (from {})", m.name))
        .unwrap_or_default();
    if path.is_empty() {
        format!("config: {}{source}", err.kind)
    } else {
        format!("{path}: {}{source}", err.kind)
    }
}

fn validate(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Warnings), ConfigError> {
    let mut problems = Vec::new();
    let mut warnings = Warnings::default();

    if raw.server.max_body_bytes == 0 {
        problems.push("server.max_body_bytes: must be greater than 0".to_owned());
    }
    for (field, value) in [
        ("server.request_timeout", raw.server.request_timeout),
        ("upstream.connect_timeout", raw.upstream.connect_timeout),
        (
            "upstream.first_byte_timeout",
            raw.upstream.first_byte_timeout,
        ),
    ] {
        if value.is_zero() {
            problems.push(format!("{field}: must be greater than 0"));
        }
    }

    validate_health(&raw.health, &mut problems);

    let mut client_keys = Vec::new();
    for (i, var) in raw.auth.client_keys_env.iter().enumerate() {
        match env(var).filter(|v| !v.trim().is_empty()) {
            Some(value) => client_keys.push(ClientKey::new(SecretString::from(value))),
            None => problems.push(format!(
                "auth.client_keys_env[{i}]: environment variable {var} is not set or empty"
            )),
        }
    }

    let clients = validate_clients(raw.clients, env, &mut problems);
    let store = validate_store(raw.store, &mut problems);
    let admin = validate_admin(raw.admin, &raw.server, env, &mut problems);
    let cluster = raw.cluster.and_then(|c| validate_cluster(c, &mut problems));

    if raw.nodes.is_empty() {
        problems.push("nodes: at least one [[nodes]] entry is required".to_owned());
    }
    let mut nodes = Vec::with_capacity(raw.nodes.len());
    for (i, node) in raw.nodes.into_iter().enumerate() {
        if let Some(node) = validate_node(i, node, env, &mut problems, &mut warnings) {
            if nodes.iter().any(|n: &NodeConfig| n.name == node.name) {
                problems.push(format!(
                    "nodes[{i}].name: duplicate node name \"{}\"",
                    node.name
                ));
            }
            nodes.push(node);
        }
    }

    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    Ok((
        Config {
            server: raw.server,
            upstream: raw.upstream,
            accounting: raw.accounting,
            queue: raw.queue,
            retry: raw.retry,
            health: raw.health,
            client_keys,
            clients,
            store,
            admin,
            log: raw.log,
            cluster,
            nodes,
        },
        warnings,
    ))
}

fn validate_cluster(raw: RawCluster, problems: &mut Vec<String>) -> Option<ClusterSettings> {
    let scheme_ok = raw.redis_url.starts_with("redis://");
    if raw.redis_url.starts_with("rediss://") {
        problems.push(
            "cluster.redis_url: TLS to Redis (rediss://) is not supported yet; use redis:// on a private network"
                .to_owned(),
        );
    } else if !scheme_ok {
        problems.push("cluster.redis_url: must start with redis://".to_owned());
    }
    if raw.key_prefix.is_empty() || raw.key_prefix.contains(char::is_whitespace) {
        problems.push("cluster.key_prefix: must be non-empty, without spaces".to_owned());
    }
    if raw.timeout.is_zero() {
        problems.push("cluster.timeout: must be greater than 0".to_owned());
    }
    scheme_ok.then(|| ClusterSettings {
        redis_url: SecretString::from(raw.redis_url),
        on_redis_error: raw.on_redis_error,
        key_prefix: raw.key_prefix,
        timeout: raw.timeout,
    })
}

fn validate_clients(
    raw: Vec<RawClient>,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Vec<ClientConfig> {
    let mut clients: Vec<ClientConfig> = Vec::with_capacity(raw.len());
    // Every entry's name and key, valid or not, so a duplicate is named
    // even when its first occurrence has problems of its own.
    let mut names: Vec<String> = Vec::new();
    let mut hashes: Vec<[u8; 32]> = Vec::new();
    for (i, client) in raw.into_iter().enumerate() {
        let before = problems.len();
        let at = |field: &str| format!("clients[{i}].{field}");
        let name = client.name.trim();
        if name.is_empty() {
            problems.push(format!("{}: must not be empty", at("name")));
        } else if names.iter().any(|n| n == name) {
            problems.push(format!("{}: duplicate client name \"{name}\"", at("name")));
        }
        names.push(name.to_owned());
        let key = match env(&client.key_env).filter(|v| !v.trim().is_empty()) {
            Some(value) => Some(ClientKey::new(SecretString::from(value.trim().to_owned()))),
            None => {
                problems.push(format!(
                    "{}: environment variable {} is not set or empty",
                    at("key_env"),
                    client.key_env
                ));
                None
            }
        };
        if let Some(key) = &key {
            let hash = key.hash();
            if hashes.contains(&hash) {
                problems.push(format!("{}: the same key as another client", at("key_env")));
            }
            hashes.push(hash);
        }
        let limits =
            ClientLimits::from_parts(client.rpm, client.tpm, client.burst, client.rate_per_second)
                .map_err(|found| {
                    for (field, message) in found {
                        problems.push(format!("{}: {message}", at(field)));
                    }
                })
                .ok();
        if let Some(message) = client.models.as_deref().and_then(models_problem) {
            problems.push(format!("{}: {message}", at("models")));
        }
        if problems.len() > before {
            continue;
        }
        if let (Some(key), Some(limits)) = (key, limits) {
            clients.push(ClientConfig {
                name: Arc::from(name),
                key,
                limits,
                models: client.models,
                enabled: client.enabled,
            });
        }
    }
    clients
}

fn validate_store(raw: RawStore, problems: &mut Vec<String>) -> StoreSettings {
    let url = raw.url.trim();
    let known = ["sqlite:", "postgres://", "postgresql://"];
    if !known.iter().any(|scheme| url.starts_with(scheme)) {
        // The URL may hold a password: name the field, not the value.
        problems.push(
            "store.url: must start with sqlite:// (embedded) or postgres:// (shared)".to_owned(),
        );
    }
    for (field, value) in [
        ("store.cache_ttl", raw.cache_ttl),
        ("store.usage_flush_interval", raw.usage_flush_interval),
    ] {
        if value.is_zero() {
            problems.push(format!("{field}: must be greater than 0"));
        }
    }
    StoreSettings {
        url: SecretString::from(url.to_owned()),
        cache_ttl: raw.cache_ttl,
        usage_flush_interval: raw.usage_flush_interval,
    }
}

fn validate_admin(
    raw: RawAdmin,
    server: &ServerSettings,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> AdminSettings {
    if raw.listen == server.listen && raw.listen.port() != 0 {
        problems.push(format!(
            "admin.listen: {} is server.listen too; the admin API needs its own",
            raw.listen
        ));
    }
    let token = raw.token_env.and_then(|var| {
        match env(&var)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
        {
            Some(value) if value.len() < 16 => {
                problems.push(format!(
                    "admin.token_env: the token in {var} is shorter than 16 characters"
                ));
                None
            }
            Some(value) => Some(ClientKey::new(SecretString::from(value))),
            None => {
                problems.push(format!(
                    "admin.token_env: environment variable {var} is not set or empty"
                ));
                None
            }
        }
    });
    AdminSettings {
        listen: raw.listen,
        token,
    }
}

fn validate_health(health: &HealthSettings, problems: &mut Vec<String>) {
    for (field, value) in [
        ("health.interval", health.interval),
        ("health.timeout", health.timeout),
        ("health.eject_backoff", health.eject_backoff),
        ("health.eject_backoff_max", health.eject_backoff_max),
        (
            "health.quota_exhausted_cooldown",
            health.quota_exhausted_cooldown,
        ),
    ] {
        if value.is_zero() {
            problems.push(format!("{field}: must be greater than 0"));
        }
    }
    for (field, value) in [
        ("health.unhealthy_after", health.unhealthy_after as usize),
        ("health.healthy_after", health.healthy_after as usize),
        ("health.eject_after", health.eject_after as usize),
        ("health.max_concurrent_probes", health.max_concurrent_probes),
    ] {
        if value == 0 {
            problems.push(format!("{field}: must be greater than 0"));
        }
    }
    if !health.path.starts_with('/') {
        problems.push(format!(
            "health.path: must start with '/', found \"{}\"",
            health.path
        ));
    }
    if health.eject_backoff_max < health.eject_backoff {
        problems.push(
            "health.eject_backoff_max: must not be less than health.eject_backoff".to_owned(),
        );
    }
}

fn validate_node(
    i: usize,
    raw: RawNode,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
    warnings: &mut Warnings,
) -> Option<NodeConfig> {
    let before = problems.len();
    let at = |field: &str| format!("nodes[{i}].{field}");

    let name = raw.name.trim();
    if name.is_empty() {
        problems.push(format!("{}: must not be empty", at("name")));
    }

    let url = raw.url.trim_end_matches('/');
    match reqwest::Url::parse(url) {
        Ok(parsed) if !matches!(parsed.scheme(), "http" | "https") => problems.push(format!(
            "{}: scheme must be http or https, found \"{}\"",
            at("url"),
            parsed.scheme()
        )),
        Ok(parsed) if !parsed.username().is_empty() || parsed.password().is_some() => problems
            .push(format!(
                "{}: must not carry credentials; use api_key_env or api_key_file",
                at("url")
            )),
        Ok(parsed) if parsed.query().is_some() || parsed.fragment().is_some() => {
            problems.push(format!("{}: must not have a query or fragment", at("url")))
        }
        Ok(_) => {}
        Err(err) => problems.push(format!("{}: not a valid URL ({err})", at("url"))),
    }

    let key = read_node_key(i, &raw, env, problems, warnings);

    if let Some(models) = &raw.models {
        if models.is_empty() {
            problems.push(format!(
                "{}: must not be empty; leave it out to serve any model",
                at("models")
            ));
        }
        if models.iter().any(|m| m.trim().is_empty()) {
            problems.push(format!("{}: model names must not be empty", at("models")));
        }
    }

    let mut limit = |field: &str, value: Option<u64>| match value {
        Some(0) => {
            problems.push(format!("{}: must be greater than 0", at(field)));
            None
        }
        other => other.and_then(NonZeroU64::new),
    };
    let quota = Quota {
        rpm: limit("rpm", raw.rpm),
        tpm: limit("tpm", raw.tpm),
        bpm: limit("bpm", raw.bpm),
        max_concurrency: limit("max_concurrency", raw.max_concurrency),
    };

    if let Some(ca) = &raw.ca_file
        && !ca.is_file()
    {
        problems.push(format!(
            "{}: file {} not found",
            at("ca_file"),
            ca.display()
        ));
    }

    if problems.len() > before {
        return None;
    }
    Some(NodeConfig {
        name: Arc::from(name),
        url: Arc::from(url),
        key: key?,
        models: raw.models,
        quota,
        ca_file: raw.ca_file,
        key_file: raw.api_key_file,
    })
}

fn read_node_key(
    i: usize,
    raw: &RawNode,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
    warnings: &mut Warnings,
) -> Option<NodeKey> {
    let sources = [
        raw.api_key_env.is_some(),
        raw.api_key_file.is_some(),
        raw.api_key.is_some(),
    ];
    match sources.iter().filter(|s| **s).count() {
        1 => {}
        0 => {
            problems.push(format!(
                "nodes[{i}]: needs one of api_key_env, api_key_file or api_key"
            ));
            return None;
        }
        _ => {
            problems.push(format!(
                "nodes[{i}]: give only one of api_key_env, api_key_file or api_key"
            ));
            return None;
        }
    }
    let (field, secret): (&str, Result<SecretString, String>) = if let Some(var) = &raw.api_key_env
    {
        let value = env(var).map(SecretString::from);
        let missing = format!("environment variable {var} is not set or empty");
        ("api_key_env", value.ok_or(missing))
    } else if let Some(path) = &raw.api_key_file {
        let value = std::fs::read_to_string(path)
            .map(|text| SecretString::from(text.trim().to_owned()))
            .map_err(|err| format!("cannot read {}: {}", path.display(), err.kind()));
        ("api_key_file", value)
    } else {
        warnings.0.push(format!(
            "nodes[{i}].api_key: a literal key in the config file; prefer api_key_env or api_key_file"
        ));
        let value = raw.api_key.clone().map(SecretString::from);
        ("api_key", value.ok_or_else(String::new))
    };
    let secret = match secret {
        Ok(secret) if secret.expose_secret().trim().is_empty() => {
            problems.push(format!("nodes[{i}].{field}: the key is empty"));
            return None;
        }
        Ok(secret) => secret,
        Err(why) => {
            problems.push(format!("nodes[{i}].{field}: {why}"));
            return None;
        }
    };
    match NodeKey::new(secret) {
        Ok(key) => Some(key),
        Err(why) => {
            problems.push(format!("nodes[{i}].{field}: {why}"));
            None
        }
    }
}

impl Config {
    /// The resolved configuration as TOML, every key shown as `[redacted]`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let s = &self.server;
        let _ = writeln!(out, "[server]");
        let _ = writeln!(out, "listen = \"{}\"", s.listen);
        let _ = writeln!(out, "max_body_bytes = {}", s.max_body_bytes);
        let _ = writeln!(out, "request_timeout = \"{}\"", human(s.request_timeout));
        let _ = writeln!(out, "shutdown_grace = \"{}\"", human(s.shutdown_grace));
        if let Some(pid_file) = &s.pid_file {
            let _ = writeln!(out, "pid_file = \"{}\"", pid_file.display());
        }
        let _ = writeln!(out, "watch_config = {}", s.watch_config);
        let _ = writeln!(out, "\n[upstream]");
        let _ = writeln!(
            out,
            "connect_timeout = \"{}\"",
            human(self.upstream.connect_timeout)
        );
        let _ = writeln!(
            out,
            "first_byte_timeout = \"{}\"",
            human(self.upstream.first_byte_timeout)
        );
        let _ = writeln!(out, "\n[accounting]");
        let _ = writeln!(
            out,
            "default_completion_tokens = {}",
            self.accounting.default_completion_tokens
        );
        let _ = writeln!(out, "\n[queue]");
        let _ = writeln!(out, "max_wait = \"{}\"", human(self.queue.max_wait));
        let _ = writeln!(out, "max_depth = {}", self.queue.max_depth);
        let _ = writeln!(out, "\n[retry]");
        let _ = writeln!(out, "attempts = {}", self.retry.attempts);
        let h = &self.health;
        let _ = writeln!(out, "\n[health]");
        let _ = writeln!(out, "enabled = {}", h.enabled);
        let _ = writeln!(out, "interval = \"{}\"", human(h.interval));
        let _ = writeln!(out, "path = \"{}\"", h.path);
        let _ = writeln!(out, "timeout = \"{}\"", human(h.timeout));
        let _ = writeln!(out, "unhealthy_after = {}", h.unhealthy_after);
        let _ = writeln!(out, "healthy_after = {}", h.healthy_after);
        let _ = writeln!(out, "max_concurrent_probes = {}", h.max_concurrent_probes);
        let _ = writeln!(out, "eject_after = {}", h.eject_after);
        let _ = writeln!(out, "eject_backoff = \"{}\"", human(h.eject_backoff));
        let _ = writeln!(
            out,
            "eject_backoff_max = \"{}\"",
            human(h.eject_backoff_max)
        );
        let _ = writeln!(
            out,
            "quota_exhausted_cooldown = \"{}\"",
            human(h.quota_exhausted_cooldown)
        );
        let _ = writeln!(out, "\n[store]");
        let url = crate::store::describe(self.store.url.expose_secret());
        let _ = writeln!(out, "url = \"{url}\"");
        let _ = writeln!(out, "cache_ttl = \"{}\"", human(self.store.cache_ttl));
        let _ = writeln!(
            out,
            "usage_flush_interval = \"{}\"",
            human(self.store.usage_flush_interval)
        );
        let _ = writeln!(out, "\n[admin]");
        let _ = writeln!(out, "listen = \"{}\"", self.admin.listen);
        let token = if self.admin.token.is_some() {
            "\"[redacted]\""
        } else {
            "none (admin API off)"
        };
        let _ = writeln!(out, "token = {token}");
        if let Some(cluster) = &self.cluster {
            let _ = writeln!(out, "\n[cluster]");
            let url = crate::store::describe(cluster.redis_url.expose_secret());
            let _ = writeln!(out, "redis_url = \"{url}\"");
            let _ = writeln!(
                out,
                "on_redis_error = \"{}\"",
                cluster.on_redis_error.as_str()
            );
            let _ = writeln!(out, "key_prefix = \"{}\"", cluster.key_prefix);
            let _ = writeln!(out, "timeout = \"{}\"", human(cluster.timeout));
        }
        let _ = writeln!(out, "\n[log]");
        let _ = writeln!(out, "format = \"{}\"", self.log.format.as_str());
        let _ = writeln!(out, "\n[auth]");
        let keys = vec!["\"[redacted]\""; self.client_keys.len()].join(", ");
        let _ = writeln!(out, "client_keys = [{keys}]");
        for client in &self.clients {
            let _ = writeln!(out, "\n[[clients]]");
            let _ = writeln!(out, "name = \"{}\"", client.name);
            let _ = writeln!(out, "key = \"[redacted]\"");
            let l = &client.limits;
            for (field, value) in [("rpm", l.rpm), ("tpm", l.tpm)] {
                if let Some(v) = value {
                    let _ = writeln!(out, "{field} = {v}");
                }
            }
            if let Some(b) = l.bucket {
                let _ = writeln!(out, "burst = {}", b.burst);
                let _ = writeln!(out, "rate_per_second = {}", b.rate_per_second);
            }
            if let Some(models) = &client.models {
                let list: Vec<String> = models.iter().map(|m| format!("\"{m}\"")).collect();
                let _ = writeln!(out, "models = [{}]", list.join(", "));
            }
            let _ = writeln!(out, "enabled = {}", client.enabled);
        }
        for node in &self.nodes {
            let _ = writeln!(out, "\n[[nodes]]");
            let _ = writeln!(out, "name = \"{}\"", node.name);
            let _ = writeln!(out, "url = \"{}\"", node.url);
            let _ = writeln!(out, "api_key = \"[redacted]\"");
            if let Some(models) = &node.models {
                let list: Vec<String> = models.iter().map(|m| format!("\"{m}\"")).collect();
                let _ = writeln!(out, "models = [{}]", list.join(", "));
            }
            let q = &node.quota;
            for (field, value) in [
                ("rpm", q.rpm),
                ("tpm", q.tpm),
                ("bpm", q.bpm),
                ("max_concurrency", q.max_concurrency),
            ] {
                if let Some(v) = value {
                    let _ = writeln!(out, "{field} = {v}");
                }
            }
            if let Some(ca) = &node.ca_file {
                let _ = writeln!(out, "ca_file = \"{}\"", ca.display());
            }
        }
        out
    }
}

fn human(d: Duration) -> String {
    humantime_serde::re::humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(var: &str) -> Option<String> {
        match var {
            "KEY_A" => Some("sk-a-secret".to_owned()),
            "APP_KEY" => Some("app-secret".to_owned()),
            _ => None,
        }
    }

    fn problems(toml: &str) -> Vec<String> {
        match from_toml_str(toml, &env) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems,
        }
    }

    const NODE: &str =
        "[[nodes]]\nname = \"a\"\nurl = \"http://127.0.0.1:9001/v1/\"\napi_key_env = \"KEY_A\"\n";

    #[test]
    fn a_cluster_section_is_validated_and_its_password_never_shown() {
        let toml = format!(
            "[cluster]\nredis_url = \"redis://:hunter2@10.0.0.5:6379/0\"\non_redis_error = \"reject\"\n{NODE}"
        );
        let (config, _) = from_toml_str(&toml, &env).unwrap();
        let cluster = config.cluster.as_ref().unwrap();
        assert_eq!(cluster.on_redis_error, OnRedisError::Reject);
        assert_eq!(cluster.timeout, DEFAULT_REDIS_TIMEOUT);
        let rendered = config.render();
        assert!(
            rendered.contains("redis_url = \"redis://10.0.0.5:6379/0\""),
            "{rendered}"
        );
        assert!(!rendered.contains("hunter2"));
        assert!(!format!("{config:?}").contains("hunter2"));

        let bad = format!("[cluster]\nredis_url = \"http://x\"\ntimeout = \"0s\"\n{NODE}");
        assert_eq!(
            problems(&bad),
            [
                "cluster.redis_url: must start with redis://",
                "cluster.timeout: must be greater than 0"
            ]
        );
        let typo =
            format!("[cluster]\nredis_url = \"redis://x\"\non_redis_error = \"ignore\"\n{NODE}");
        assert!(
            problems(&typo)[0].contains("on_redis_error"),
            "{:?}",
            problems(&typo)
        );
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment::Jail's closure returns figment::Error"
    )]
    fn only_section_field_variables_override_settings() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("Balancer.toml", NODE)?;
            // A secret the config names, not a setting.
            jail.set_env("BALANCER_ADMIN_TOKEN", "admin-token-0123456789");
            jail.set_env("BALANCER_QUEUE__MAX_WAIT", "2s");
            jail.set_env("BALANCER_LOG__FORMAT", "json");
            let (config, _) =
                load_with(Path::new("Balancer.toml"), &env).map_err(|e| e.problems.join("; "))?;
            assert_eq!(config.queue.max_wait, Duration::from_secs(2));
            assert_eq!(config.log.format, LogFormat::Json);
            assert_eq!(
                configured_log_format(Path::new("Balancer.toml")),
                LogFormat::Json
            );
            Ok(())
        });
    }

    #[test]
    fn a_minimal_config_takes_every_default() {
        let (config, warnings) = from_toml_str(NODE, &env).unwrap();
        assert!(warnings.0.is_empty());
        assert_eq!(config.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.queue.max_wait, DEFAULT_QUEUE_MAX_WAIT);
        assert_eq!(config.retry.attempts, DEFAULT_RETRY_ATTEMPTS);
        assert_eq!(&*config.nodes[0].url, "http://127.0.0.1:9001/v1");
        assert_eq!(config.nodes[0].key.expose(), "sk-a-secret");
        assert_eq!(config.nodes[0].quota, Quota::default());
    }

    #[test]
    fn durations_read_as_human_text() {
        let toml =
            format!("[queue]\nmax_wait = \"250ms\"\n[server]\nrequest_timeout = \"2m\"\n{NODE}");
        let (config, _) = from_toml_str(&toml, &env).unwrap();
        assert_eq!(config.queue.max_wait, Duration::from_millis(250));
        assert_eq!(config.server.request_timeout, Duration::from_secs(120));
    }

    #[test]
    fn a_zero_limit_names_node_and_field() {
        let toml = format!(
            "{NODE}\n[[nodes]]\nname = \"b\"\nurl = \"http://h/v1\"\napi_key = \"k\"\nrpm = 0\n"
        );
        assert_eq!(problems(&toml), ["nodes[1].rpm: must be greater than 0"]);
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_path() {
        let toml = format!("{NODE}colour = \"red\"\n");
        let p = problems(&toml);
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("nodes[0].colour: unknown field"), "{p:?}");

        let p = problems(&format!("[server]\nlisten_on = 1\n{NODE}"));
        assert!(p[0].starts_with("server.listen_on: unknown field"), "{p:?}");
    }

    #[test]
    fn duplicate_names_bad_urls_and_missing_keys_are_each_reported() {
        let toml = "[[nodes]]\nname = \"a\"\nurl = \"http://h/v1\"\napi_key_env = \"KEY_A\"\n\
                    [[nodes]]\nname = \"a\"\nurl = \"http://h/v1\"\napi_key_env = \"KEY_A\"\n\
                    [[nodes]]\nname = \"c\"\nurl = \"not a url\"\napi_key_env = \"NOPE\"\n";
        let p = problems(toml);
        assert!(
            p.contains(&"nodes[1].name: duplicate node name \"a\"".to_owned()),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.starts_with("nodes[2].url: not a valid URL")),
            "{p:?}"
        );
        assert!(
            p.contains(
                &"nodes[2].api_key_env: environment variable NOPE is not set or empty".to_owned()
            ),
            "{p:?}"
        );
    }

    #[test]
    fn a_node_needs_exactly_one_key_source() {
        let none = "[[nodes]]\nname = \"a\"\nurl = \"http://h/v1\"\n";
        assert_eq!(
            problems(none),
            ["nodes[0]: needs one of api_key_env, api_key_file or api_key"]
        );
        let two = "[[nodes]]\nname = \"a\"\nurl = \"http://h/v1\"\napi_key = \"x\"\napi_key_env = \"KEY_A\"\n";
        assert_eq!(
            problems(two),
            ["nodes[0]: give only one of api_key_env, api_key_file or api_key"]
        );
    }

    #[test]
    fn a_key_file_is_trimmed_and_a_literal_key_is_warned() {
        let dir = std::env::temp_dir().join(format!("balancer-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "  sk-from-file\n").unwrap();
        let toml = format!(
            "[[nodes]]\nname = \"f\"\nurl = \"http://h/v1\"\napi_key_file = \"{}\"\n\
             [[nodes]]\nname = \"l\"\nurl = \"http://h/v1\"\napi_key = \"sk-literal\"\n",
            file.display()
        );
        let (config, warnings) = from_toml_str(&toml, &env).unwrap();
        assert_eq!(config.nodes[0].key.expose(), "sk-from-file");
        assert_eq!(warnings.0.len(), 1);
        assert!(warnings.0[0].starts_with("nodes[1].api_key:"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn client_keys_must_be_set() {
        let toml = format!("[auth]\nclient_keys_env = [\"APP_KEY\", \"MISSING\"]\n{NODE}");
        assert_eq!(
            problems(&toml),
            ["auth.client_keys_env[1]: environment variable MISSING is not set or empty"]
        );
    }

    #[test]
    fn clients_are_validated_field_by_field() {
        let toml = format!(
            "{NODE}[[clients]]\nname = \"a\"\nkey_env = \"APP_KEY\"\nrpm = 0\nburst = 5\n\
             [[clients]]\nname = \"a\"\nkey_env = \"APP_KEY\"\nmodels = []\n\
             [[clients]]\nname = \"c\"\nkey_env = \"NOPE\"\n"
        );
        assert_eq!(
            problems(&toml),
            [
                "clients[0].rpm: must be greater than 0; leave it out for no limit",
                "clients[0].rate_per_second: burst needs rate_per_second too",
                "clients[1].name: duplicate client name \"a\"",
                "clients[1].key_env: the same key as another client",
                "clients[1].models: must list model names; leave it out to allow every model",
                "clients[2].key_env: environment variable NOPE is not set or empty",
            ]
        );
    }

    #[test]
    fn a_client_reads_its_key_and_limits() {
        let toml = format!(
            "{NODE}[[clients]]\nname = \"team\"\nkey_env = \"APP_KEY\"\nrpm = 60\nburst = 5\nrate_per_second = 0.5\nmodels = [\"gpt-4o-mini\"]\n"
        );
        let (config, _) = from_toml_str(&toml, &env).unwrap();
        let client = &config.clients[0];
        assert_eq!(client.key.hash(), hash_key(b"app-secret"));
        assert_eq!(client.limits.rpm.map(u64::from), Some(60));
        assert_eq!(
            client
                .limits
                .bucket
                .map(|b| (u64::from(b.burst), b.rate_per_second)),
            Some((5, 0.5))
        );
        assert!(client.enabled);
        assert!(!config.render().contains("app-secret"));
    }

    #[test]
    fn render_never_shows_a_key() {
        let toml = format!("[auth]\nclient_keys_env = [\"APP_KEY\"]\n{NODE}rpm = 10\n");
        let (config, _) = from_toml_str(&toml, &env).unwrap();
        let text = config.render();
        assert!(
            !text.contains("sk-a-secret") && !text.contains("app-secret"),
            "{text}"
        );
        assert!(text.contains("api_key = \"[redacted]\""));
        assert!(text.contains("rpm = 10"));
        assert!(!format!("{config:?}").contains("secret"));
    }
}
