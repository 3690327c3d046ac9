//! `balancer check`: a validated [`Config`] printed back as TOML, every
//! default filled in and every secret shown as `[redacted]` (a URL that
//! may hold a password, without its credentials).

use std::fmt::{Display, Write as _};
use std::time::Duration;

use secrecy::ExposeSecret;

use super::{ClientConfig, Config, NodeApi, NodeConfig};
use crate::keys::redacted_url;
use crate::money::PriceTable;

/// TOML text, a table and a field at a time.
#[derive(Default)]
struct Toml(String);

impl Toml {
    fn table(&mut self, header: &str) {
        if !self.0.is_empty() {
            self.0.push('\n');
        }
        let _ = writeln!(self.0, "{header}");
    }

    /// `name = value`, the value written as it is (numbers, booleans).
    fn bare(&mut self, name: &str, value: impl Display) {
        let _ = writeln!(self.0, "{name} = {value}");
    }

    fn text(&mut self, name: &str, value: impl Display) {
        let _ = writeln!(self.0, "{name} = \"{value}\"");
    }

    fn duration(&mut self, name: &str, value: Duration) {
        self.text(name, humantime::format_duration(value));
    }

    fn map(&mut self, name: &str, entries: &std::collections::BTreeMap<String, String>) {
        let pairs: Vec<String> = entries
            .iter()
            .map(|(k, v)| format!("\"{k}\" = \"{v}\""))
            .collect();
        self.bare(name, format!("{{ {} }}", pairs.join(", ")));
    }

    fn comment(&mut self, text: &str) {
        let _ = writeln!(self.0, "# {text}");
    }

    fn list(&mut self, name: &str, items: &[String]) {
        let quoted: Vec<String> = items.iter().map(|m| format!("\"{m}\"")).collect();
        self.bare(name, format!("[{}]", quoted.join(", ")));
    }

    fn limits(&mut self, limits: &[(&str, Option<std::num::NonZeroU64>)]) {
        for (name, value) in limits {
            if let Some(v) = value {
                self.bare(name, v);
            }
        }
    }
}

impl Config {
    /// The resolved configuration as TOML, every key shown as `[redacted]`.
    pub fn render(&self) -> String {
        let mut out = Toml::default();
        self.render_settings(&mut out);
        self.render_services(&mut out);
        for client in &self.clients {
            render_client(&mut out, client);
        }
        for node in &self.nodes {
            render_node(&mut out, node);
        }
        render_prices(&mut out, "prices", &self.prices);
        out.0
    }

    /// The request path's settings: server, upstream, accounting, queue,
    /// retry, health.
    fn render_settings(&self, out: &mut Toml) {
        let s = &self.server;
        out.table("[server]");
        out.text("listen", s.listen);
        out.bare("max_body_bytes", s.max_body_bytes);
        out.duration("request_timeout", s.request_timeout);
        out.duration("shutdown_grace", s.shutdown_grace);
        if let Some(pid_file) = &s.pid_file {
            out.text("pid_file", pid_file.display());
        }
        out.bare("watch_config", s.watch_config);
        out.bare("max_connections", s.max_connections);
        out.duration("header_read_timeout", s.header_read_timeout);
        out.duration("write_timeout", s.write_timeout);
        out.duration("body_read_timeout", s.body_read_timeout);
        out.bare("realtime_ephemeral_keys", s.realtime_ephemeral_keys);
        out.table("[upstream]");
        out.duration("connect_timeout", self.upstream.connect_timeout);
        out.duration("first_byte_timeout", self.upstream.first_byte_timeout);
        out.table("[accounting]");
        out.bare(
            "default_completion_tokens",
            self.accounting.default_completion_tokens,
        );
        let by_model = &self.accounting.default_completion_tokens_by_model;
        if !by_model.is_empty() {
            let pairs: Vec<String> = by_model
                .iter()
                .map(|(m, t)| format!("\"{m}\" = {t}"))
                .collect();
            out.bare(
                "default_completion_tokens_by_model",
                format!("{{ {} }}", pairs.join(", ")),
            );
        }
        out.table("[queue]");
        out.duration("max_wait", self.queue.max_wait);
        out.bare("max_depth", self.queue.max_depth);
        out.bare("max_depth_per_client", self.queue.max_depth_per_client);
        out.bare("max_bytes", self.queue.max_bytes);
        let r = self.queue.reserves;
        if r != crate::limits::Reserves::default() {
            out.table("[queue.reserve]");
            out.bare("high", r.high);
            out.bare("normal", r.normal);
            out.bare("low", r.low);
        }
        out.table("[retry]");
        out.bare("attempts", self.retry.attempts);
        let h = &self.health;
        out.table("[health]");
        out.bare("enabled", h.enabled);
        out.duration("interval", h.interval);
        out.text("path", &h.path);
        out.duration("timeout", h.timeout);
        out.bare("unhealthy_after", h.unhealthy_after);
        out.bare("healthy_after", h.healthy_after);
        out.bare("max_concurrent_probes", h.max_concurrent_probes);
        out.bare("eject_after", h.eject_after);
        out.duration("eject_backoff", h.eject_backoff);
        out.duration("eject_backoff_max", h.eject_backoff_max);
        out.duration("quota_exhausted_cooldown", h.quota_exhausted_cooldown);
        out.duration("max_rest", h.max_rest);
    }

    /// What the gateway talks to beside the nodes: store, admin API,
    /// Redis; and how it logs and who may call it.
    fn render_services(&self, out: &mut Toml) {
        out.table("[store]");
        out.text("url", redacted_url(self.store.url.expose_secret()));
        out.duration("cache_ttl", self.store.cache_ttl);
        out.duration("usage_flush_interval", self.store.usage_flush_interval);
        out.duration("object_ttl", self.store.object_ttl);
        out.table("[status]");
        out.bare("public", self.status_public);
        out.table("[admin]");
        out.text("listen", self.admin.listen);
        match self.admin.token {
            Some(_) => out.text("token", "[redacted]"),
            None => out.bare("token", "none (admin API off)"),
        }
        if let Some(cluster) = &self.cluster {
            out.table("[cluster]");
            out.text("redis_url", redacted_url(cluster.redis_url.expose_secret()));
            out.text("on_redis_error", cluster.on_redis_error.as_str());
            out.text("key_prefix", &cluster.key_prefix);
            out.duration("timeout", cluster.timeout);
            if let Some(ca) = &cluster.ca_file {
                out.text("ca_file", ca.display());
            }
            if let Some((cert, key)) = &cluster.client_cert {
                out.text("client_cert_file", cert.display());
                out.text("client_key_file", key.display());
            }
        }
        let tracing = &self.tracing;
        out.table("[tracing]");
        match &tracing.otlp_endpoint {
            Some(endpoint) => out.text("otlp_endpoint", redacted_url(endpoint)),
            None => out.bare("otlp_endpoint", "none (no traces)"),
        }
        out.text("service_name", &tracing.service_name);
        out.duration("export_interval", tracing.export_interval);
        out.text("compression", tracing.compression.as_str());
        if let Some(ca) = &tracing.ca_file {
            out.text("ca_file", ca.display());
        }
        if !tracing.headers.is_empty() {
            out.table("[tracing.headers]");
            for (name, _) in &tracing.headers {
                out.text(name, "[redacted]");
            }
        }
        out.table("[log]");
        out.text("format", self.log.format.as_str());
        out.table("[auth]");
        let keys = vec!["\"[redacted]\""; self.client_keys.len()].join(", ");
        out.bare("client_keys", format!("[{keys}]"));
    }
}

fn render_client(out: &mut Toml, client: &ClientConfig) {
    out.table("[[clients]]");
    out.text("name", &client.name);
    out.text("key", "[redacted]");
    let l = &client.limits;
    out.limits(&[("rpm", l.rpm), ("tpm", l.tpm)]);
    if let Some(b) = l.bucket {
        out.bare("burst", b.burst);
        out.bare("rate_per_second", b.rate_per_second);
    }
    out.limits(&[("max_concurrency", l.max_concurrency)]);
    out.text("priority", client.share.priority.as_str());
    out.bare("weight", client.share.weight);
    if let Some(models) = &client.models {
        out.list("models", models);
    }
    out.bare("enabled", client.enabled);
    if let Some(budget) = client.budget {
        out.bare("budget_usd", budget.limit.usd());
        out.text("budget_period", budget.period.as_str());
    }
    if let Some(tier) = client.max_tier {
        out.bare("max_tier", tier);
    }
}

/// Each model's price, one table each (`[{at}."model"]`).
fn render_prices(out: &mut Toml, at: &str, prices: &PriceTable) {
    for (model, price) in prices.iter() {
        out.table(&format!("[{at}.\"{model}\"]"));
        out.bare("input", price.input);
        out.bare("cached_input", price.cached_input);
        out.bare("output", price.output);
        out.bare("image", price.image);
        out.bare("audio_second", price.audio_second);
    }
}

fn render_node(out: &mut Toml, node: &NodeConfig) {
    out.table("[[nodes]]");
    out.text("name", &node.name);
    out.text("url", &node.url);
    out.text("api_key", "[redacted]");
    match &node.api {
        NodeApi::OpenAi => {
            out.text("api", "openai");
            if let Some(models) = &node.models {
                out.list("models", models);
            }
            if !node.upstream_names.is_empty() {
                out.map("model_names", &node.upstream_names);
            }
        }
        NodeApi::Azure { api_version } => {
            out.text("api", "azure");
            if let Some(version) = api_version {
                out.text("api_version", version);
            }
            out.map("deployments", &node.upstream_names);
            for (model, deployment) in &node.upstream_names {
                let url = match api_version {
                    Some(v) => format!(
                        "{}/openai/deployments/{deployment}/{{operation}}?api-version={v}",
                        node.url
                    ),
                    None => format!(
                        "{}/openai/v1/{{operation}} (model \"{deployment}\")",
                        node.url
                    ),
                };
                out.comment(&format!("{model} -> {url}"));
            }
        }
    }
    out.duration("window", node.window);
    if let Some(tokens) = node.default_completion_tokens {
        out.bare("default_completion_tokens", tokens);
    }
    out.bare("tier", node.tier);
    if let Some(high) = node.utilization_high {
        out.bare("provisioned", true);
        out.bare("utilization_high", high);
    }
    let q = &node.quota;
    out.limits(&[
        ("rpm", q.rpm),
        ("tpm", q.tpm),
        ("bpm", q.bpm),
        ("max_concurrency", q.max_concurrency),
    ]);
    if let Some(ca) = &node.ca_file {
        out.text("ca_file", ca.display());
    }
    for (field, value) in [
        ("organization", &node.organization),
        ("project", &node.project),
    ] {
        if let Some(value) = value {
            out.text(field, value);
        }
    }
    out.bare("price_multiplier", node.pricing.multiplier);
    render_prices(out, "nodes.prices", &node.pricing.own);
}
