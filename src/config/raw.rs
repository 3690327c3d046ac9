//! The raw form of `Balancer.toml`: what serde reads, field for field,
//! with every default in one place. Every table rejects unknown fields, so
//! a typo is an error naming its path, not a setting silently ignored.
//!
//! Nothing here is used past validation ([`super::validate`]): the rest of
//! the crate sees only the validated types of [`super`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use smart_default::SmartDefault;

use std::collections::BTreeMap;

use super::{Api, LogFormat, OnRedisError, TraceCompression};

/// 10 MiB: large enough for long chat histories and small file uploads.
pub(super) const DEFAULT_MAX_BODY_BYTES: usize = 10 * 1024 * 1024;
/// Long generations from reasoning models can take minutes.
pub(super) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
pub(super) const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Client connections open at once: far above what one gateway serves,
/// and lowered at start-up to what the open-file limit allows.
pub(super) const DEFAULT_MAX_CONNECTIONS: usize = 8192;
/// A client sends a request head in milliseconds; 30 s tolerates a slow
/// network and ends idle keep-alive connections.
pub(super) const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that reads nothing of its answer for a minute has gone.
pub(super) const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
pub(super) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub(super) const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(60);
/// What a request that names no `max_tokens` reserves for its completion.
pub(super) const DEFAULT_COMPLETION_TOKENS: u64 = 1024;
pub(super) const DEFAULT_QUEUE_MAX_WAIT: Duration = Duration::from_secs(5);
pub(super) const DEFAULT_QUEUE_MAX_DEPTH: usize = 1024;
/// One client may fill a quarter of the default queue.
pub(super) const DEFAULT_QUEUE_MAX_DEPTH_PER_CLIENT: usize = 256;
/// Request bodies held by requests in admission (waiting for budget or
/// a node) at once: 256 MiB, 25 bodies of the largest default size.
pub(super) const DEFAULT_QUEUE_MAX_BYTES: usize = 256 << 20;
pub(super) const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
/// Often enough to take a dead node out within seconds, rare enough to be
/// noise to the upstream (one `GET /models` per node).
pub(super) const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub(super) const DEFAULT_HEALTH_PATH: &str = "/models";
pub(super) const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
pub(super) const DEFAULT_UNHEALTHY_AFTER: u32 = 3;
pub(super) const DEFAULT_HEALTHY_AFTER: u32 = 2;
pub(super) const DEFAULT_MAX_CONCURRENT_PROBES: usize = 8;
/// Consecutive failed requests (connect error, timeout, 5xx) that eject a node.
pub(super) const DEFAULT_EJECT_AFTER: u32 = 3;
/// The first re-probe after an ejection; each further ejection in a row
/// doubles it, up to the maximum.
pub(super) const DEFAULT_EJECT_BACKOFF: Duration = Duration::from_secs(1);
pub(super) const DEFAULT_EJECT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long a node whose quota is exhausted (`insufficient_quota`) rests when
/// the upstream gives no reset time: billing quotas do not refill by the minute.
pub(super) const DEFAULT_QUOTA_EXHAUSTED_COOLDOWN: Duration = Duration::from_secs(3600);
/// A `Retry-After` past an hour is taken as an hour: a header (or a
/// hostile upstream) must not rest a node for a day.
pub(super) const DEFAULT_MAX_REST: Duration = Duration::from_secs(3600);
/// Embedded SQLite beside the config file: created and migrated at start-up.
pub(super) const DEFAULT_STORE_URL: &str = "sqlite://balancer.db";
/// How long a key lookup is cached. Changes made through this gateway's
/// admin API apply at once; this bounds how late another replica's arrive.
pub(super) const DEFAULT_CLIENT_CACHE_TTL: Duration = Duration::from_secs(5);
/// Usage is written in one batch this often, off the request path.
pub(super) const DEFAULT_USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// A record of an object with no expiry of its own lasts 30 days.
pub(super) const DEFAULT_OBJECT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long one call to Redis may take before it counts as unreachable: a
/// healthy Redis on the same network answers in about a millisecond.
pub(super) const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(250);

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    pub(super) upstream: RawUpstream,
    pub(super) accounting: RawAccounting,
    pub(super) queue: RawQueue,
    pub(super) retry: RawRetry,
    pub(super) health: RawHealth,
    pub(super) auth: RawAuth,
    pub(super) store: RawStore,
    pub(super) admin: RawAdmin,
    pub(super) log: RawLog,
    pub(super) status: RawStatus,
    pub(super) tracing: RawTracing,
    pub(super) cluster: Option<RawCluster>,
    pub(super) clients: Vec<RawClient>,
    pub(super) nodes: Vec<RawNode>,
    /// Per model, over the shipped list prices.
    pub(super) prices: BTreeMap<String, RawPrice>,
}

/// `[prices."model"]` (and `[nodes.prices."model"]`): US dollars per
/// million tokens, per image and per second of audio. A field left out is 0.
#[derive(Debug, Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPrice {
    pub(super) input: f64,
    /// Left out: the input price.
    pub(super) cached_input: Option<f64>,
    pub(super) output: f64,
    pub(super) image: f64,
    pub(super) audio_second: f64,
}

/// `[server]`
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    #[default(SocketAddr::from(([127, 0, 0, 1], 8080)))]
    pub(super) listen: SocketAddr,
    #[default(DEFAULT_MAX_BODY_BYTES)]
    pub(super) max_body_bytes: usize,
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_REQUEST_TIMEOUT)]
    pub(super) request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_SHUTDOWN_GRACE)]
    pub(super) shutdown_grace: Duration,
    pub(super) pid_file: Option<PathBuf>,
    #[default(true)]
    pub(super) watch_config: bool,
    #[default(DEFAULT_MAX_CONNECTIONS)]
    pub(super) max_connections: usize,
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_HEADER_READ_TIMEOUT)]
    pub(super) header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_WRITE_TIMEOUT)]
    pub(super) write_timeout: Duration,
    /// Absent: `header_read_timeout`.
    #[serde(with = "humantime_serde::option")]
    pub(super) body_read_timeout: Option<Duration>,
    pub(super) realtime_ephemeral_keys: bool,
}

/// `[upstream]`
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_CONNECT_TIMEOUT)]
    pub(super) connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_FIRST_BYTE_TIMEOUT)]
    pub(super) first_byte_timeout: Duration,
}

/// `[accounting]`
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAccounting {
    #[default(DEFAULT_COMPLETION_TOKENS)]
    pub(super) default_completion_tokens: u64,
    /// Per model, over the default.
    pub(super) default_completion_tokens_by_model: BTreeMap<String, u64>,
}

/// `[queue]`
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawQueue {
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_QUEUE_MAX_WAIT)]
    pub(super) max_wait: Duration,
    #[default(DEFAULT_QUEUE_MAX_DEPTH)]
    pub(super) max_depth: usize,
    #[default(DEFAULT_QUEUE_MAX_DEPTH_PER_CLIENT)]
    pub(super) max_depth_per_client: usize,
    #[default(DEFAULT_QUEUE_MAX_BYTES)]
    pub(super) max_bytes: usize,
    pub(super) reserve: RawReserve,
}

/// `[queue.reserve]`: the share of each node's quota a class keeps from
/// the classes below it.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawReserve {
    pub(super) high: f64,
    pub(super) normal: f64,
    pub(super) low: f64,
}

/// `[retry]`
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRetry {
    #[default(DEFAULT_RETRY_ATTEMPTS)]
    pub(super) attempts: u32,
}

/// `[health]`
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHealth {
    #[default(true)]
    pub(super) enabled: bool,
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_HEALTH_INTERVAL)]
    pub(super) interval: Duration,
    #[default(DEFAULT_HEALTH_PATH.to_owned())]
    pub(super) path: String,
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_HEALTH_TIMEOUT)]
    pub(super) timeout: Duration,
    #[default(DEFAULT_UNHEALTHY_AFTER)]
    pub(super) unhealthy_after: u32,
    #[default(DEFAULT_HEALTHY_AFTER)]
    pub(super) healthy_after: u32,
    #[default(DEFAULT_MAX_CONCURRENT_PROBES)]
    pub(super) max_concurrent_probes: usize,
    #[default(DEFAULT_EJECT_AFTER)]
    pub(super) eject_after: u32,
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_EJECT_BACKOFF)]
    pub(super) eject_backoff: Duration,
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_EJECT_BACKOFF_MAX)]
    pub(super) eject_backoff_max: Duration,
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_QUOTA_EXHAUSTED_COOLDOWN)]
    pub(super) quota_exhausted_cooldown: Duration,
    /// The longest rest an upstream's answer can ask for.
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_MAX_REST)]
    pub(super) max_rest: Duration,
}

/// `[auth]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAuth {
    pub(super) client_keys_env: Vec<String>,
}

/// `[store]`
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStore {
    #[default(DEFAULT_STORE_URL.to_owned())]
    pub(super) url: String,
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_CLIENT_CACHE_TTL)]
    pub(super) cache_ttl: Duration,
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_USAGE_FLUSH_INTERVAL)]
    pub(super) usage_flush_interval: Duration,
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_OBJECT_TTL)]
    pub(super) object_ttl: Duration,
}

/// `[admin]`
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    #[default(SocketAddr::from(([127, 0, 0, 1], 8081)))]
    pub(super) listen: SocketAddr,
    pub(super) token_env: Option<String>,
}

/// `[status]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStatus {
    pub(super) public: bool,
}

/// `[log]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub(super) format: LogFormat,
}

/// How often finished spans are sent in one batch (OpenTelemetry's own
/// default).
pub(super) const DEFAULT_TRACE_EXPORT_INTERVAL: Duration = Duration::from_secs(5);

/// `[tracing]`: OpenTelemetry traces, off unless an endpoint is set.
#[derive(Debug, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTracing {
    pub(super) otlp_endpoint: Option<String>,
    #[default("balancer".to_owned())]
    pub(super) service_name: String,
    #[serde(with = "humantime_serde")]
    #[default(DEFAULT_TRACE_EXPORT_INTERVAL)]
    pub(super) export_interval: Duration,
    /// Header name -> the environment variable holding its value.
    pub(super) headers_env: BTreeMap<String, String>,
    /// Whether exports are gzip-compressed.
    pub(super) compression: TraceCompression,
    pub(super) ca_file: Option<PathBuf>,
}

/// `[cluster]`: limits shared with other replicas through Redis.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) redis_url: String,
    #[serde(default)]
    pub(super) on_redis_error: OnRedisError,
    #[serde(default = "default_key_prefix")]
    pub(super) key_prefix: String,
    #[serde(default = "default_redis_timeout", with = "humantime_serde")]
    pub(super) timeout: Duration,
    #[serde(default)]
    pub(super) ca_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) client_key_file: Option<PathBuf>,
}

fn default_key_prefix() -> String {
    "balancer".to_owned()
}

fn default_redis_timeout() -> Duration {
    DEFAULT_REDIS_TIMEOUT
}

/// `[[clients]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    pub(super) name: String,
    pub(super) key_env: String,
    pub(super) rpm: Option<u64>,
    pub(super) tpm: Option<u64>,
    pub(super) burst: Option<u64>,
    pub(super) rate_per_second: Option<f64>,
    pub(super) max_concurrency: Option<u64>,
    pub(super) priority: Option<String>,
    pub(super) weight: Option<f64>,
    pub(super) models: Option<Vec<String>>,
    #[serde(default = "enabled_by_default")]
    pub(super) enabled: bool,
    pub(super) budget_usd: Option<f64>,
    pub(super) budget_period: Option<String>,
    pub(super) max_tier: Option<u32>,
}

fn enabled_by_default() -> bool {
    true
}

/// `[[nodes]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub(super) name: String,
    pub(super) url: String,
    pub(super) api_key_env: Option<String>,
    pub(super) api_key_file: Option<PathBuf>,
    pub(super) api_key: Option<String>,
    pub(super) models: Option<Vec<String>>,
    pub(super) rpm: Option<u64>,
    pub(super) tpm: Option<u64>,
    pub(super) bpm: Option<u64>,
    pub(super) max_concurrency: Option<u64>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) organization: Option<String>,
    pub(super) project: Option<String>,
    #[serde(default)]
    pub(super) api: Api,
    pub(super) api_version: Option<String>,
    pub(super) deployments: Option<BTreeMap<String, String>>,
    pub(super) model_names: Option<BTreeMap<String, String>>,
    #[serde(default, with = "humantime_serde")]
    pub(super) window: Option<Duration>,
    pub(super) default_completion_tokens: Option<u64>,
    #[serde(default)]
    pub(super) tier: u32,
    #[serde(default)]
    pub(super) provisioned: bool,
    pub(super) utilization_high: Option<f64>,
    pub(super) price_multiplier: Option<f64>,
    #[serde(default)]
    pub(super) prices: BTreeMap<String, RawPrice>,
}
