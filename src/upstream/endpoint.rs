//! How a node is reached, built from its config once per snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use tokio_rustls::rustls::ClientConfig;

use super::connections::{self, Connections};
use super::headers::{ORGANIZATION, PROJECT};
use crate::config::{NodeApi, NodeConfig};
use crate::keys::NodeKey;

/// How a node is reached: where, in which dialect, with which key and
/// identity, under which names for its models, over which connections.
#[derive(Debug)]
pub struct Endpoint {
    /// Base URL without a trailing slash.
    pub url: Arc<str>,
    /// The same, parsed once: a request only sets its path and query.
    pub(super) base: reqwest::Url,
    pub key: NodeKey,
    /// The node's own `OpenAI-Organization` / `OpenAI-Project`, if set.
    pub(super) identity: Vec<(HeaderName, HeaderValue)>,
    /// The dialect it speaks.
    pub dialect: NodeApi,
    /// Its names for the models it serves, where not the client's.
    model_names: BTreeMap<String, String>,
    /// Its connections, held by the requests (and probes) they carry.
    pub(crate) connections: Arc<Connections>,
    /// Its name as the `x-balancer-node` value of the answers it gives.
    pub name_header: HeaderValue,
}

/// The TLS settings `https://` nodes without a `ca_file` share, built
/// once per snapshot when one needs them.
#[derive(Debug, Default)]
pub(crate) struct SharedTls(Option<Arc<ClientConfig>>);

impl Endpoint {
    /// Every fallible step of reaching `node`: header values, URL, TLS
    /// settings (trusting its `ca_file`'s contents, `ca_pem`, besides the
    /// system's), and new connections.
    pub(crate) fn build(
        node: &NodeConfig,
        ca_pem: Option<&[u8]>,
        connect_timeout: Duration,
        shared: &mut SharedTls,
    ) -> Result<Self, String> {
        let named = |problem: String| format!("node '{}': {problem}", node.name);
        let name_header = HeaderValue::from_str(&node.name)
            .map_err(|_| named("name is not a valid header value".to_owned()))?;
        let base = reqwest::Url::parse(&node.url).map_err(|e| named(format!("url: {e}")))?;
        let tls = match (base.scheme(), ca_pem) {
            ("https", Some(pem)) => Some(connections::tls_config(Some(pem)).map_err(named)?),
            ("https", None) => {
                if shared.0.is_none() {
                    shared.0 = Some(connections::tls_config(None)?);
                }
                shared.0.clone()
            }
            _ => None,
        };
        let connections = Connections::for_url(&base, connect_timeout, tls)
            .ok_or_else(|| named("url: not an http:// or https:// URL with a host".to_owned()))?;
        Ok(Self {
            url: Arc::clone(&node.url),
            base,
            key: node.key.clone(),
            identity: identity_headers(node)?,
            dialect: node.api.clone(),
            model_names: node.upstream_names.clone(),
            connections,
            name_header,
        })
    }

    /// The node's name for `model`: its deployment (Azure), its
    /// `model_names` entry, else the client's.
    pub fn upstream_name<'m>(&'m self, model: &'m str) -> &'m str {
        self.model_names.get(model).map_or(model, String::as_str)
    }

    /// The same endpoint over `connections` (kept from an earlier snapshot).
    pub(crate) fn over(self, connections: Arc<Connections>) -> Self {
        Self {
            connections,
            ..self
        }
    }
}

/// The organisation and project headers a node sends, if configured.
fn identity_headers(node: &NodeConfig) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut headers = Vec::new();
    for (name, value) in [(ORGANIZATION, &node.organization), (PROJECT, &node.project)] {
        if let Some(value) = value {
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("node '{}': {name} is not a valid header value", node.name))?;
            headers.push((name, value));
        }
    }
    Ok(headers)
}
