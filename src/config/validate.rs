//! From the raw form to the validated [`Config`]: every problem found is
//! collected (one line each, starting with the field's path), so a broken
//! file is reported whole, not one typo per run.
//!
//! A message names the field, the variable or the file at fault, never the
//! value of a secret field (a key, a token, a URL that may hold a
//! password).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::num::{NonZeroU32, NonZeroUsize};

use axum::http::{HeaderName, HeaderValue};
use figment::Figment;
use secrecy::SecretString;

use super::entries::{validate_clients, validate_node};
use super::raw::{RawAdmin, RawCluster, RawConfig, RawHealth, RawNode, RawServer, RawStore};
use super::{
    AccountingSettings, AdminSettings, ClientConfig, ClusterSettings, Config, ConfigError,
    HealthSettings, LogSettings, NodeConfig, QueueSettings, RetrySettings, ServerSettings,
    StoreSettings, TracingSettings, UpstreamSettings, Warnings,
};
use crate::keys::ClientKey;
use crate::limits::Reserves;
use crate::money::PriceTable;

/// Extracts the raw form from `figment` and validates it.
pub(super) fn from_figment(
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
    let secret = err
        .path
        .last()
        .is_some_and(|field| SECRET_FIELDS.contains(&field.as_str()));
    let what = if secret {
        "not a valid value (not shown: the field holds a secret)".to_owned()
    } else {
        without_source_lines(&err.kind.to_string())
    };
    if path.is_empty() {
        format!("config: {what}{source}")
    } else {
        format!("{path}: {what}{source}")
    }
}

/// Fields whose values are secrets (or may hold one, like a URL with a
/// password): an error about them never quotes the value.
const SECRET_FIELDS: &[&str] = &["api_key", "redis_url", "url", "token"];

/// A TOML parse error without the lines of the file it quotes: the line at
/// fault may be a key (`api_key = "sk-...` with its quote missing). What
/// is left names the line and column and what was expected there.
fn without_source_lines(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.contains('|'))
        .collect::<Vec<_>>()
        .join(": ")
}

fn validate(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Warnings), ConfigError> {
    let mut problems = Vec::new();
    let mut warnings = Warnings::default();

    let server = server(raw.server, &mut problems);
    let upstream = upstream(&raw.upstream, &mut problems);
    let health = health(raw.health, &mut problems);
    let client_keys = client_keys(&raw.auth.client_keys_env, env, &mut problems);
    let clients = validate_clients(raw.clients, env, &mut problems);
    let store = validate_store(raw.store, &mut problems);
    let admin = validate_admin(raw.admin, server.listen, env, &mut problems);
    let cluster = raw.cluster.and_then(|c| validate_cluster(c, &mut problems));
    let reserves = reserves(&raw.queue.reserve, &mut problems);
    if raw.queue.max_bytes < server.max_body_bytes.get() {
        problems.push(format!(
            "queue.max_bytes: must be at least server.max_body_bytes ({}), or a body the gateway accepts could never be admitted",
            server.max_body_bytes
        ));
    }
    let tracing = validate_tracing(raw.tracing, env, &mut problems);

    let nodes = validate_nodes(raw.nodes, env, &mut problems, &mut warnings);

    let prices = PriceTable::defaults().overridden(super::entries::prices(
        "prices",
        &raw.prices,
        &mut problems,
    ));
    unpriced_budgets(&clients, &nodes, &prices, &mut problems);
    let shared_store = {
        use secrecy::ExposeSecret;
        store.url.expose_secret().starts_with("postgres")
    };
    if shared_store && cluster.is_none() && clients.iter().any(|c| c.budget.is_some()) {
        warnings.0.push(
            "cluster: clients have budgets and the store is shared (PostgreSQL), but there is no [cluster]: each replica holds budgets against its own count, so replicas together can spend up to one budget each; add [cluster] (Redis) to share them".to_owned(),
        );
    }

    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    Ok((
        Config {
            server,
            upstream,
            accounting: AccountingSettings {
                default_completion_tokens: raw.accounting.default_completion_tokens,
                default_completion_tokens_by_model: raw
                    .accounting
                    .default_completion_tokens_by_model,
            },
            queue: QueueSettings {
                max_wait: raw.queue.max_wait,
                max_depth: raw.queue.max_depth,
                max_depth_per_client: raw.queue.max_depth_per_client,
                max_bytes: raw.queue.max_bytes,
                reserves,
            },
            retry: RetrySettings {
                attempts: raw.retry.attempts,
            },
            health,
            client_keys,
            clients,
            store,
            admin,
            log: LogSettings {
                format: raw.log.format,
            },
            status_public: raw.status.public,
            tracing,
            cluster,
            nodes,
            prices,
        },
        warnings,
    ))
}

fn upstream(raw: &super::raw::RawUpstream, problems: &mut Vec<String>) -> UpstreamSettings {
    UpstreamSettings {
        connect_timeout: positive("upstream.connect_timeout", raw.connect_timeout, problems),
        first_byte_timeout: positive(
            "upstream.first_byte_timeout",
            raw.first_byte_timeout,
            problems,
        ),
    }
}

fn validate_tracing(
    raw: super::raw::RawTracing,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> TracingSettings {
    let endpoint = raw.otlp_endpoint.map(|e| e.trim().to_owned());
    let headers = tracing_headers(&raw.headers_env, endpoint.is_some(), env, problems);
    let https = endpoint.as_deref().is_some_and(|e| {
        e.get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
    });
    if let Some(ca) = &raw.ca_file {
        if !https {
            problems.push(
                "tracing.ca_file: only an https:// tracing.otlp_endpoint uses a CA file".to_owned(),
            );
        } else if !ca.is_file() {
            problems.push(format!("tracing.ca_file: file {} not found", ca.display()));
        }
    }
    if let Some(endpoint) = &endpoint
        && reqwest::Url::parse(endpoint).map_or(true, |u| {
            !matches!(u.scheme(), "http" | "https") || u.host().is_none()
        })
    {
        problems.push(
            "tracing.otlp_endpoint: must be an http:// or https:// URL, e.g. http://collector:4317"
                .to_owned(),
        );
    }
    if raw.service_name.trim().is_empty() {
        problems.push("tracing.service_name: must not be empty".to_owned());
    }
    TracingSettings {
        otlp_endpoint: endpoint,
        service_name: raw.service_name,
        export_interval: positive("tracing.export_interval", raw.export_interval, problems),
        headers,
        ca_file: raw.ca_file,
        compression: raw.compression,
    }
}

/// `[tracing] headers_env`: each header's value from its environment
/// variable. A problem names the header and the variable, never a value.
fn tracing_headers(
    headers_env: &BTreeMap<String, String>,
    exporting: bool,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Vec<(String, SecretString)> {
    if !headers_env.is_empty() && !exporting {
        problems.push("tracing.headers_env: set without tracing.otlp_endpoint".to_owned());
        return Vec::new();
    }
    let mut headers = Vec::with_capacity(headers_env.len());
    for (name, var) in headers_env {
        let at = format!("tracing.headers_env.{name}");
        let lowercase = !name.bytes().any(|b| b.is_ascii_uppercase());
        if !lowercase || HeaderName::from_bytes(name.as_bytes()).is_err() || name.ends_with("-bin")
        {
            problems.push(format!(
                "{at}: not a gRPC header name (lowercase letters, digits and - _ .)"
            ));
            continue;
        }
        match env(var)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
        {
            None => problems.push(format!(
                "{at}: environment variable {var} is not set or empty"
            )),
            Some(value) if HeaderValue::from_str(&value).is_err() => problems.push(format!(
                "{at}: the value of {var} is not a valid header value (visible ASCII)"
            )),
            Some(value) => headers.push((name.clone(), SecretString::from(value))),
        }
    }
    headers
}

/// `[queue.reserve]`, checked.
fn reserves(r: &super::raw::RawReserve, problems: &mut Vec<String>) -> Reserves {
    Reserves {
        high: r.high,
        normal: r.normal,
        low: r.low,
    }
    .checked()
    .unwrap_or_else(|found| {
        for (field, message) in found {
            problems.push(format!("queue.reserve.{field}: {message}"));
        }
        Reserves::default()
    })
}

/// A client with a budget and a list of models must be able to price
/// each of them (on the table or on some node): its requests for an
/// unpriced model would all be refused. (A client without a list finds
/// out per request: 400 `model_not_priced`.)
fn unpriced_budgets(
    clients: &[ClientConfig],
    nodes: &[NodeConfig],
    prices: &PriceTable,
    problems: &mut Vec<String>,
) {
    for (i, client) in clients.iter().enumerate() {
        let (Some(_), Some(models)) = (client.budget, &client.models) else {
            continue;
        };
        for model in models {
            let priced = prices.find(model).is_some()
                || nodes.iter().any(|n| n.pricing.own.find(model).is_some());
            if !priced {
                problems.push(format!(
                    "clients[{i}].models: \"{model}\" has no price and the client has a budget; add [prices.\"{model}\"]"
                ));
            }
        }
    }
}

/// `value`, with a problem noted under `field` when it is zero.
fn positive(
    field: &str,
    value: std::time::Duration,
    problems: &mut Vec<String>,
) -> std::time::Duration {
    if value.is_zero() {
        problems.push(format!("{field}: must be greater than 0"));
    }
    value
}

/// A count that must not be zero; 1 stands in (with a problem noted) so
/// validation can go on and report everything.
fn count_u32(field: &str, value: u32, problems: &mut Vec<String>) -> NonZeroU32 {
    NonZeroU32::new(value).unwrap_or_else(|| {
        problems.push(format!("{field}: must be greater than 0"));
        NonZeroU32::MIN
    })
}

/// `[[nodes]]`: at least one, each valid, names unique.
fn validate_nodes(
    raw: Vec<RawNode>,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
    warnings: &mut Warnings,
) -> Vec<NodeConfig> {
    if raw.is_empty() {
        problems.push("nodes: at least one [[nodes]] entry is required".to_owned());
    }
    let mut nodes = Vec::with_capacity(raw.len());
    for (i, node) in raw.into_iter().enumerate() {
        if let Some(node) = validate_node(i, node, env, problems, warnings) {
            if nodes.iter().any(|n: &NodeConfig| n.name == node.name) {
                problems.push(format!(
                    "nodes[{i}].name: duplicate node name \"{}\"",
                    node.name
                ));
            }
            nodes.push(node);
        }
    }
    nodes
}

fn server(raw: RawServer, problems: &mut Vec<String>) -> ServerSettings {
    let max_body_bytes = NonZeroUsize::new(raw.max_body_bytes).unwrap_or_else(|| {
        problems.push("server.max_body_bytes: must be greater than 0".to_owned());
        NonZeroUsize::MIN
    });
    ServerSettings {
        listen: raw.listen,
        max_body_bytes,
        request_timeout: positive("server.request_timeout", raw.request_timeout, problems),
        shutdown_grace: raw.shutdown_grace,
        pid_file: raw.pid_file,
        watch_config: raw.watch_config,
        max_connections: NonZeroUsize::new(raw.max_connections).unwrap_or_else(|| {
            problems.push("server.max_connections: must be greater than 0".to_owned());
            NonZeroUsize::MIN
        }),
        header_read_timeout: positive(
            "server.header_read_timeout",
            raw.header_read_timeout,
            problems,
        ),
        write_timeout: positive("server.write_timeout", raw.write_timeout, problems),
        body_read_timeout: positive(
            "server.body_read_timeout",
            raw.body_read_timeout.unwrap_or(raw.header_read_timeout),
            problems,
        ),
        realtime_ephemeral_keys: raw.realtime_ephemeral_keys,
    }
}

pub(super) fn health(raw: RawHealth, problems: &mut Vec<String>) -> HealthSettings {
    let settings = HealthSettings {
        enabled: raw.enabled,
        interval: positive("health.interval", raw.interval, problems),
        timeout: positive("health.timeout", raw.timeout, problems),
        eject_backoff: positive("health.eject_backoff", raw.eject_backoff, problems),
        eject_backoff_max: positive("health.eject_backoff_max", raw.eject_backoff_max, problems),
        quota_exhausted_cooldown: positive(
            "health.quota_exhausted_cooldown",
            raw.quota_exhausted_cooldown,
            problems,
        ),
        max_rest: positive("health.max_rest", raw.max_rest, problems),
        unhealthy_after: count_u32("health.unhealthy_after", raw.unhealthy_after, problems),
        healthy_after: count_u32("health.healthy_after", raw.healthy_after, problems),
        eject_after: count_u32("health.eject_after", raw.eject_after, problems),
        max_concurrent_probes: NonZeroUsize::new(raw.max_concurrent_probes).unwrap_or_else(|| {
            problems.push("health.max_concurrent_probes: must be greater than 0".to_owned());
            NonZeroUsize::MIN
        }),
        path: raw.path,
    };
    if !settings.path.starts_with('/') {
        problems.push(format!(
            "health.path: must start with '/', found \"{}\"",
            settings.path
        ));
    }
    if settings.eject_backoff_max < settings.eject_backoff {
        problems.push(
            "health.eject_backoff_max: must not be less than health.eject_backoff".to_owned(),
        );
    }
    settings
}

fn client_keys(
    vars: &[String],
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Vec<ClientKey> {
    let mut keys = Vec::new();
    for (i, var) in vars.iter().enumerate() {
        match env(var).filter(|v| !v.trim().is_empty()) {
            Some(value) => keys.push(ClientKey::new(SecretString::from(value))),
            None => problems.push(format!(
                "auth.client_keys_env[{i}]: environment variable {var} is not set or empty"
            )),
        }
    }
    keys
}

fn validate_cluster(raw: RawCluster, problems: &mut Vec<String>) -> Option<ClusterSettings> {
    let tls = raw.redis_url.starts_with("rediss://");
    let scheme_ok = tls || raw.redis_url.starts_with("redis://");
    if !scheme_ok {
        problems
            .push("cluster.redis_url: must start with redis:// (or rediss:// for TLS)".to_owned());
    }
    let files = [
        ("cluster.ca_file", &raw.ca_file),
        ("cluster.client_cert_file", &raw.client_cert_file),
        ("cluster.client_key_file", &raw.client_key_file),
    ];
    for (field, file) in files {
        let Some(file) = file else { continue };
        if !tls {
            problems.push(format!(
                "{field}: only a rediss:// cluster.redis_url uses it"
            ));
        } else if !file.is_file() {
            problems.push(format!("{field}: file {} not found", file.display()));
        }
    }
    let client_cert = match (raw.client_cert_file, raw.client_key_file) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            problems.push(
                "cluster.client_cert_file: needs cluster.client_key_file, and the other way round"
                    .to_owned(),
            );
            None
        }
    };
    if raw.key_prefix.is_empty() || raw.key_prefix.contains(char::is_whitespace) {
        problems.push("cluster.key_prefix: must be non-empty, without spaces".to_owned());
    }
    if raw.timeout.is_zero() {
        problems.push("cluster.timeout: must be greater than 0".to_owned());
    }
    scheme_ok.then(|| ClusterSettings {
        redis_url: SecretString::from(raw.redis_url),
        ca_file: raw.ca_file,
        client_cert,
        on_redis_error: raw.on_redis_error,
        key_prefix: raw.key_prefix,
        timeout: raw.timeout,
    })
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
        object_ttl: raw.object_ttl,
    }
}

fn validate_admin(
    raw: RawAdmin,
    server_listen: std::net::SocketAddr,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> AdminSettings {
    if raw.listen == server_listen && raw.listen.port() != 0 {
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

#[cfg(test)]
mod tests;
