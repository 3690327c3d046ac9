//! Configuration: the `Balancer.toml` contract, its defaults, and validation.
//!
//! Loading happens in two steps. [`load`] merges the TOML file with
//! `BALANCER_*` environment overrides (figment; `__` separates levels) into
//! the raw serde structs of [`raw`], which reject unknown fields and hold
//! every default. [`validate`] then turns the raw form into a [`Config`]
//! that cannot hold an invalid state: every limit is non-zero, every URL
//! parses, every key was read. The rest of the crate sees only the
//! validated types below; [`render`] prints one back as TOML.
//!
//! Invariants:
//! - A key is a [`secrecy`] type from the moment it is read (env var, file or
//!   literal; see [`crate::keys`]). Nothing here implements `Serialize`;
//!   [`Config::render`] prints keys as `[redacted]`.
//! - Every validation message starts with the field path, e.g.
//!   `nodes[1].rpm: must be greater than 0`, and never quotes the value of
//!   a secret field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::SecretString;
use serde::Deserialize;

use crate::keys::{ClientKey, NodeKey};
use crate::limits::{ClientLimits, Quota, Reserves, Share};
use crate::money::{Budget, NodePricing, PriceTable};

mod entries;
mod node;
mod raw;
mod render;
mod validate;

pub const DEFAULT_CONFIG_PATH: &str = "./Balancer.toml";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The pid file's name when `server.pid_file` is not set; it sits beside the
/// config file, so `balancer reload --config X` finds the gateway started
/// with `--config X`.
pub const DEFAULT_PID_FILE: &str = "balancer.pid";
/// The environment variable that names the config file (a path, not an override).
pub const CONFIG_PATH_ENV: &str = "BALANCER_CONFIG";
const ENV_PREFIX: &str = "BALANCER_";

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
    /// `[status] public`: whether `/status` and `/metrics` show clients,
    /// budgets and node URLs without the admin token.
    pub status_public: bool,
    /// OpenTelemetry traces; start-up only.
    pub tracing: TracingSettings,
    /// Shared limits; `None` keeps them in this process. Start-up only.
    pub cluster: Option<ClusterSettings>,
    /// At least one.
    pub nodes: Vec<NodeConfig>,
    /// The shipped list prices with `[prices]` over them.
    pub prices: PriceTable,
}

/// `[server]`
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: NonZeroUsize,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Where `serve` writes its pid for `balancer reload` and `balancer
    /// stop`; relative paths are beside the config file. Read at start-up.
    pub pid_file: Option<PathBuf>,
    /// Reload by itself when the config file or a key file changes.
    pub watch_config: bool,
    /// Client connections open at once; start-up only.
    pub max_connections: NonZeroUsize,
    /// How long a client may take to send a request head (also the idle
    /// keep-alive timeout); start-up only.
    pub header_read_timeout: Duration,
    /// How long a write to a client may make no progress; start-up only.
    pub write_timeout: Duration,
    /// How long a request body may stall (no byte arriving) before the
    /// request is answered 408 and its connection closed.
    pub body_read_timeout: Duration,
    /// Whether `realtime/client_secrets` (and the beta session endpoints)
    /// may mint ephemeral upstream keys for clients.
    pub realtime_ephemeral_keys: bool,
}

/// `[upstream]`
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
}

/// `[accounting]`
#[derive(Debug, Clone)]
pub struct AccountingSettings {
    pub default_completion_tokens: u64,
    /// Per model, over the default.
    pub default_completion_tokens_by_model: BTreeMap<String, u64>,
}

/// `[tracing]`
#[derive(Debug, Clone)]
pub struct TracingSettings {
    /// The OTLP/gRPC endpoint spans go to (`http://collector:4317`);
    /// `None`: no traces.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of every span.
    pub service_name: String,
    /// Finished spans are sent in one batch this often (and at shutdown).
    pub export_interval: Duration,
    /// gRPC metadata sent with every export (a vendor's API key): names
    /// lowercase, values read from the environment and kept secret.
    pub headers: Vec<(String, SecretString)>,
    /// A CA (PEM) trusted for an `https://` endpoint besides the system's.
    pub ca_file: Option<PathBuf>,
    pub compression: TraceCompression,
}

/// `tracing.compression`: how exports are compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceCompression {
    #[default]
    None,
    Gzip,
}

impl TraceCompression {
    pub fn as_str(self) -> &'static str {
        match self {
            TraceCompression::None => "none",
            TraceCompression::Gzip => "gzip",
        }
    }
}

/// `[queue]`
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub max_wait: Duration,
    /// 0 refuses every request that would have to wait.
    pub max_depth: usize,
    /// Requests of one client (or of the shared group) waiting at once,
    /// for a node or for budget.
    pub max_depth_per_client: usize,
    /// Request body bytes held by requests in admission at once; never
    /// below `server.max_body_bytes`.
    pub max_bytes: usize,
    /// What each class keeps of every node's quota from the classes below.
    pub reserves: Reserves,
}

/// `[retry]`
#[derive(Debug, Clone)]
pub struct RetrySettings {
    /// Further attempts after the first; 0 never retries.
    pub attempts: u32,
}

/// `[health]`: active probes and passive ejection.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// Active probes; passive health (real traffic) always applies.
    pub enabled: bool,
    pub interval: Duration,
    /// Probed as `GET {node url}{path}` with the node's key; starts with `/`.
    pub path: String,
    pub timeout: Duration,
    pub unhealthy_after: NonZeroU32,
    pub healthy_after: NonZeroU32,
    pub max_concurrent_probes: NonZeroUsize,
    pub eject_after: NonZeroU32,
    pub eject_backoff: Duration,
    /// Never less than `eject_backoff`.
    pub eject_backoff_max: Duration,
    pub quota_exhausted_cooldown: Duration,
    /// The longest rest an upstream's 429 (`Retry-After`, `retry-after-ms`,
    /// its resets) puts a node to.
    pub max_rest: Duration,
}

impl Default for HealthSettings {
    /// The defaults of `[health]`, as an empty table gives them.
    fn default() -> Self {
        validate::health(raw::RawHealth::default(), &mut Vec::new())
    }
}

/// `[store]`: where clients and their usage are kept.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// `sqlite://<path>` or `postgres://...`; secret, as it may hold a password.
    pub url: SecretString,
    pub cache_ttl: Duration,
    pub usage_flush_interval: Duration,
    /// How long an object record lasts when its object gives no expiry of
    /// its own (a vector store, an assistant, a thread...).
    pub object_ttl: Duration,
}

/// `[admin]`: the admin API's listener and bearer token.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// From `admin.token_env`; `None` turns the admin API off. Compared in
    /// constant time, like a client key.
    pub token: Option<ClientKey>,
}

/// `[log]`: how log lines are written; the level comes from `RUST_LOG`.
/// Read at start-up only.
#[derive(Debug, Clone, Copy, Default)]
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

/// `[cluster]`, validated. Read at start-up only.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// `redis://...` or `rediss://...` (TLS); secret, as it may hold a
    /// password.
    pub redis_url: SecretString,
    /// With `rediss://`: the CA (PEM) Redis's certificate is checked
    /// against instead of the system's roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// With `rediss://`: the certificate and key (PEM) this gateway shows
    /// a Redis that asks for one (`tls-auth-clients yes`); both or neither.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub on_redis_error: OnRedisError,
    /// Namespaces the keys, so gateways of different teams can share a Redis.
    pub key_prefix: String,
    pub timeout: Duration,
}

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

/// One upstream deployment and its quota.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: Arc<str>,
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:9001/v1`.
    pub url: Arc<str>,
    pub key: NodeKey,
    /// `None` serves any model; never an empty list.
    pub models: Option<Vec<String>>,
    pub quota: Quota,
    pub ca_file: Option<PathBuf>,
    /// Where the key was read from, when from a file: reload watches it.
    pub key_file: Option<PathBuf>,
    /// Sent as `OpenAI-Organization` / `OpenAI-Project` (a client's own
    /// are never passed on): which organisation and project the key bills.
    pub organization: Option<String>,
    pub project: Option<String>,
    /// Which API the node speaks.
    pub api: NodeApi,
    /// The upstream's name for a model, where it is not the client's (an
    /// Azure deployment, or an OpenAI-style `model_names` entry).
    pub upstream_names: BTreeMap<String, String>,
    /// Besides the minute, the node's per-minute limits hold pro rata
    /// within every rolling span this long (60 s: the minute alone).
    pub window: Duration,
    /// Completion tokens reserved for a request that names no
    /// `max_tokens`, over `[accounting]`'s.
    pub default_completion_tokens: Option<u64>,
    /// Its own prices and multiplier.
    pub pricing: NodePricing,
    /// Filled in order: a request goes to the lowest tier with a node that
    /// has headroom (0, the default, first; at most [`MAX_TIER`]).
    pub tier: u32,
    /// A provisioned deployment (`nodes[].provisioned`): the reading of its
    /// utilisation header (percent) at or above which it is held. `None`:
    /// not provisioned.
    pub utilization_high: Option<f64>,
}

/// `nodes[].utilization_high` when not set.
pub const DEFAULT_UTILIZATION_HIGH: f64 = 95.0;

/// The highest `nodes[].tier`.
pub const MAX_TIER: u32 = 7;

/// `nodes[].api`, as written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    #[default]
    #[serde(rename = "openai")]
    OpenAi,
    Azure,
}

/// The API a node speaks, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeApi {
    /// `{url}/chat/completions`, `Authorization: Bearer <key>`.
    OpenAi,
    /// Azure OpenAI: `api-key: <key>`; `url` is the resource endpoint.
    Azure {
        /// Classic deployment paths with `?api-version=`; `None` is the v1
        /// surface (`{url}/openai/v1/...`, the deployment as `model`).
        api_version: Option<String>,
    },
}

/// A client declared in the config: its own gateway key and limits.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: Arc<str>,
    pub key: ClientKey,
    pub limits: ClientLimits,
    /// Its class and weight when the pool is saturated.
    pub share: Share,
    /// `None` may use every model; never an empty list.
    pub models: Option<Vec<String>>,
    pub enabled: bool,
    /// What it may spend per period.
    pub budget: Option<Budget>,
    /// The highest tier its requests may use (`None`: any).
    pub max_tier: Option<u32>,
}

/// What is wrong with a client's `models` list, if anything.
pub fn models_problem(models: &[String]) -> Option<&'static str> {
    (models.is_empty() || models.iter().any(|m| m.trim().is_empty()))
        .then_some("must list model names; leave it out to allow every model")
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

/// Where a literal key or other soft problem deserves a warning at start-up.
#[derive(Debug, Clone, Default)]
pub struct Warnings(pub Vec<String>);

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
    validate::from_figment(figment, env)
}

/// Validates TOML text with `env` resolving `api_key_env` / `client_keys_env`
/// names (no `BALANCER_*` overrides). Used by tests and the demo.
pub fn from_toml_str(
    toml: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Warnings), ConfigError> {
    validate::from_figment(Figment::from(Toml::string(toml)), env)
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

/// The pid file of the gateway started with the config at `config_path`:
/// `server.pid_file` (relative to the config's directory), else
/// `balancer.pid` beside it.
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

/// `server.listen` as the config at `config_path` sets it, else the default.
pub fn configured_listen(config_path: &Path) -> SocketAddr {
    configured(config_path, "server.listen").unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080)))
}

/// `log.format` as the config at `config_path` sets it, read before
/// logging starts; text when it cannot be read (the full load then
/// reports why).
pub fn configured_log_format(config_path: &Path) -> LogFormat {
    configured(config_path, "log.format").unwrap_or_default()
}

/// What the config tests share: a node, the variables they set, and the
/// problems a TOML text has.
#[cfg(test)]
mod testing {
    pub(super) fn env(var: &str) -> Option<String> {
        match var {
            "KEY_A" => Some("sk-a-secret".to_owned()),
            "APP_KEY" => Some("app-secret".to_owned()),
            _ => None,
        }
    }

    pub(super) fn problems(toml: &str) -> Vec<String> {
        match super::from_toml_str(toml, &env) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems,
        }
    }

    pub(super) const NODE: &str =
        "[[nodes]]\nname = \"a\"\nurl = \"http://127.0.0.1:9001/v1/\"\napi_key_env = \"KEY_A\"\n";
}

#[cfg(test)]
mod tests {
    use super::testing::{NODE, env, problems};
    use super::*;

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
    fn the_pid_file_sits_beside_the_config_unless_placed() {
        let config = Path::new("/etc/balancer/Balancer.toml");
        assert_eq!(
            pid_file_for(config, None),
            Path::new("/etc/balancer/balancer.pid")
        );
        assert_eq!(
            pid_file_for(config, Some(Path::new("run/b.pid"))),
            Path::new("/etc/balancer/run/b.pid")
        );
        assert_eq!(
            pid_file_for(Path::new("Balancer.toml"), None),
            Path::new("./balancer.pid")
        );
    }

    #[test]
    fn tracing_headers_are_read_from_the_environment_and_checked_by_name() {
        let with = |extra: &str| {
            problems(&format!(
                "{NODE}[tracing]\notlp_endpoint = \"https://collector:4317\"\n{extra}"
            ))
        };
        assert_eq!(
            with("[tracing.headers_env]\nx-api-key = \"KEY_A\"\n"),
            Vec::<String>::new()
        );
        assert_eq!(
            with("[tracing.headers_env]\nx-api-key = \"UNSET\"\n"),
            ["tracing.headers_env.x-api-key: environment variable UNSET is not set or empty"]
        );
        assert_eq!(
            with("[tracing.headers_env]\nX-Api-Key = \"KEY_A\"\n"),
            [
                "tracing.headers_env.X-Api-Key: not a gRPC header name (lowercase letters, digits and - _ .)"
            ]
        );
        assert_eq!(
            problems(&format!(
                "{NODE}[tracing.headers_env]\nx-api-key = \"KEY_A\"\n"
            )),
            ["tracing.headers_env: set without tracing.otlp_endpoint"]
        );
        let (config, _) = from_toml_str(
            &format!("{NODE}[tracing]\notlp_endpoint = \"https://c:4317\"\n[tracing.headers_env]\nx-api-key = \"KEY_A\"\n"),
            &env,
        )
        .unwrap();
        assert_eq!(config.tracing.headers.len(), 1);
        assert_eq!(config.tracing.headers[0].0, "x-api-key");
        assert!(!format!("{:?}", config.tracing).contains("sk-a-secret"));
        let rendered = config.render();
        assert!(
            rendered.contains("[tracing.headers]\nx-api-key = \"[redacted]\""),
            "{rendered}"
        );
        assert!(!rendered.contains("sk-a-secret"));
    }

    #[test]
    fn a_tracing_header_value_that_cannot_be_sent_is_named_without_its_value() {
        let env = |var: &str| (var == "BAD").then(|| "line\nbreak-secret".to_owned());
        let problems = from_toml_str(
            &format!("{NODE}[tracing]\notlp_endpoint = \"https://c:4317\"\n[tracing.headers_env]\nx-api-key = \"BAD\"\n"),
            &|var| env(var).or_else(|| testing::env(var)),
        )
        .unwrap_err()
        .problems;
        assert_eq!(
            problems,
            [
                "tracing.headers_env.x-api-key: the value of BAD is not a valid header value (visible ASCII)"
            ]
        );
        assert!(!problems[0].contains("secret"));
    }

    #[test]
    fn a_tracing_ca_file_needs_an_https_endpoint_and_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let with = |endpoint: &str, file: &Path| {
            problems(&format!(
                "{NODE}[tracing]\notlp_endpoint = \"{endpoint}\"\nca_file = \"{}\"\n",
                file.display()
            ))
        };
        assert_eq!(with("https://c:4317", &ca), Vec::<String>::new());
        assert_eq!(
            with("http://c:4317", &ca),
            ["tracing.ca_file: only an https:// tracing.otlp_endpoint uses a CA file"]
        );
        let missing = dir.path().join("missing.pem");
        assert_eq!(
            with("https://c:4317", &missing),
            [format!(
                "tracing.ca_file: file {} not found",
                missing.display()
            )]
        );
    }
}
