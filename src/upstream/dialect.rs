//! The API's two dialects, OpenAI's and Azure OpenAI's, on both sides of
//! the gateway.
//!
//! **Clients** may call either way: `/v1/{operation}` (the OpenAI SDKs),
//! or as Azure's clients do, `/openai/deployments/{name}/{operation}?api-version=...`
//! (the deployment name is taken as the model) and `/openai/v1/{operation}`.
//! [`Operation::of`] reads any of them into one form; an Azure-style
//! client's `api-version` is its own and is not passed on.
//!
//! **Nodes** are sent what their dialect wants ([`url`], [`key_header`]):
//! - OpenAI-style: `{url}/{operation}` with `Authorization: Bearer <key>`;
//! - Azure, classic (`api_version` set):
//!   `{endpoint}/openai/deployments/{deployment}/{operation}?api-version=...`
//!   for the deployment operations, `{endpoint}/openai/{operation}?api-version=...`
//!   for the others (files, batches, responses), with `api-key: <key>`;
//! - Azure, v1 surface: `{endpoint}/openai/v1/{operation}`, the deployment
//!   named as the body's `model`.
//!
//! Where a node's name for a model is not the client's (a deployment, an
//! OpenAI-style `model_names` entry), only the body's `model` value is
//! rewritten ([`body_for`]); every other byte is relayed as sent.

use std::borrow::Cow;

use axum::http::{HeaderName, HeaderValue, header};
use bytes::{Bytes, BytesMut};

use super::Endpoint;
use crate::config::NodeApi;
use crate::error::GatewayError;
use crate::request::{ModelInBody, RequestInfo};

/// Operations an Azure deployment serves at
/// `/openai/deployments/{deployment}/{operation}`.
const DEPLOYMENT_OPERATIONS: &[&str] = &[
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/audio/speech",
    "/audio/transcriptions",
    "/audio/translations",
    "/images/generations",
    "/images/edits",
    "/images/variations",
];

/// The `api-key` header Azure nodes take (and Azure-style clients send).
pub(crate) const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// What a client asked for, in either dialect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation<'a> {
    /// Below `/v1`: `/chat/completions`, `/files/file-abc/content`.
    pub path: &'a str,
    /// The client's query, less an Azure `api-version`.
    pub query: Option<Cow<'a, str>>,
    /// The model an Azure-style path names (its deployment).
    pub model: Option<&'a str>,
}

impl<'a> Operation<'a> {
    /// Reads a request's path and query. Refuses dot segments and encoded
    /// separators ([`crate::request::check_path`]).
    pub fn of(path: &'a str, query: Option<&'a str>) -> Result<Self, GatewayError> {
        crate::request::check_path(path)?;
        let Some(azure) = path.strip_prefix("/openai") else {
            return Ok(Self {
                path: below_v1(path).unwrap_or(path),
                query: query.filter(|q| !q.is_empty()).map(Cow::Borrowed),
                model: None,
            });
        };
        let (path, model) = if let Some(rest) = azure.strip_prefix("/deployments/") {
            let (name, operation) = rest.split_once('/').unwrap_or((rest, ""));
            if name.is_empty() || operation.is_empty() {
                return Err(GatewayError::UnknownUrl(path.to_owned()));
            }
            crate::request::check_model_name(name)?;
            (&rest[name.len()..], Some(name))
        } else if let Some(rest) = below_v1(azure) {
            (rest, None)
        } else if azure.starts_with("/v1") {
            // `/openai/v1x/...` is no `/v1` path: never `{base}/v1x/...`.
            return Err(GatewayError::UnknownUrl(path.to_owned()));
        } else {
            (azure, None)
        };
        // An Azure-style client's api-version is its own, not the node's.
        Ok(Self {
            path,
            query: query.and_then(without_api_version),
            model,
        })
    }
}

/// A query without its `api-version` parameters; `None` if nothing is left.
fn without_api_version(query: &str) -> Option<Cow<'_, str>> {
    if !query.split('&').any(is_api_version) {
        return (!query.is_empty()).then_some(Cow::Borrowed(query));
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !is_api_version(p)).collect();
    (!kept.is_empty()).then(|| Cow::Owned(kept.join("&")))
}

/// `path` below a whole `/v1` segment (`/v1` itself is `""`), if it is
/// under one: `/v1x/...` is not.
fn below_v1(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1")?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

fn is_api_version(pair: &str) -> bool {
    pair == "api-version" || pair.starts_with("api-version=")
}

/// The URL `operation` goes to on `node`, for `model` (the client's name).
pub(crate) fn url(node: &Endpoint, operation: &Operation<'_>, model: Option<&str>) -> reqwest::Url {
    // The base was parsed once; setting path and query skips host parsing.
    let mut url = node.base.clone();
    let base = node.base.path().trim_end_matches('/');
    match &node.dialect {
        NodeApi::OpenAi => {
            url.set_path(&[base, operation.path].concat());
            url.set_query(operation.query.as_deref());
        }
        NodeApi::Azure { api_version: None } => {
            url.set_path(&[base, "/openai/v1", operation.path].concat());
            url.set_query(operation.query.as_deref());
        }
        NodeApi::Azure {
            api_version: Some(version),
        } => {
            let deployment = model
                .filter(|_| DEPLOYMENT_OPERATIONS.contains(&operation.path))
                .map(|m| node.upstream_name(m));
            match deployment {
                Some(deployment) => url
                    .set_path(&[base, "/openai/deployments/", deployment, operation.path].concat()),
                None => url.set_path(&[base, "/openai", operation.path].concat()),
            }
            let query = match &operation.query {
                Some(query) => format!("{query}&api-version={version}"),
                None => format!("api-version={version}"),
            };
            url.set_query(Some(&query));
        }
    }
    url
}

/// A probe's URL: `GET {health.path}` in the node's dialect.
pub(crate) fn probe_url(node: &Endpoint, path: &str) -> reqwest::Url {
    let operation = Operation {
        path,
        query: None,
        model: None,
    };
    url(node, &operation, None)
}

/// The header that carries the node's key.
pub(crate) fn key_header(node: &Endpoint) -> (HeaderName, &HeaderValue) {
    match node.dialect {
        NodeApi::OpenAi => (header::AUTHORIZATION, node.key.authorization()),
        NodeApi::Azure { .. } => (API_KEY, node.key.api_key()),
    }
}

/// Whether `node` reads the model from the body for `operation` (not from
/// a deployment path).
fn model_from_body(node: &Endpoint, operation: &Operation<'_>) -> bool {
    match &node.dialect {
        NodeApi::OpenAi | NodeApi::Azure { api_version: None } => true,
        NodeApi::Azure {
            api_version: Some(_),
        } => !DEPLOYMENT_OPERATIONS.contains(&operation.path),
    }
}

/// The body `node` gets: as the client sent it, but for the `model` value
/// where the node's name for the model differs (or an Azure-style client
/// named it in the path only). Only JSON bodies are rewritten.
pub(crate) fn body_for(
    node: &Endpoint,
    operation: &Operation<'_>,
    info: &RequestInfo,
    body: &Bytes,
) -> Bytes {
    let Some(model) = info.model.as_deref() else {
        return body.clone();
    };
    if !model_from_body(node, operation) {
        return body.clone();
    }
    let wanted = node.upstream_name(model);
    match &info.model_in_body {
        ModelInBody::NotJson | ModelInBody::Nested => body.clone(),
        ModelInBody::At(span) if body.get(span.clone()) == Some(wanted.as_bytes()) => body.clone(),
        ModelInBody::At(span) => splice(body, span.start, span.end, &json_string_inner(wanted)),
        ModelInBody::Absent => {
            with_field(body, "model", &format!("\"{}\"", json_string_inner(wanted)))
        }
        ModelInBody::Escaped => reserialised(body, wanted),
    }
}

/// A JSON object `body` with `"name": value` added first (`value` is JSON
/// text); the caller knows the object has no such key.
pub(crate) fn with_field(body: &Bytes, name: &str, value: &str) -> Bytes {
    // `{` is the first byte that is not white space: insert after it.
    let at = body.iter().position(|b| *b == b'{').map_or(0, |i| i + 1);
    let comma = if body[at..]
        .iter()
        .any(|b| !b.is_ascii_whitespace() && *b != b'}')
    {
        ","
    } else {
        ""
    };
    splice(body, at, at, &format!("\"{name}\":{value}{comma}"))
}

/// `text` as the inside of a JSON string.
fn json_string_inner(text: &str) -> String {
    let quoted = serde_json::Value::from(text).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

fn splice(body: &[u8], start: usize, end: usize, with: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + with.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(with.as_bytes());
    out.extend_from_slice(&body[end..]);
    out.freeze()
}

/// The rare body whose `model` was written with escapes: parsed and
/// written again with the node's name (other bytes may change form).
fn reserialised(body: &Bytes, model: &str) -> Bytes {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(mut value) => {
            value["model"] = serde_json::Value::from(model);
            Bytes::from(value.to_string())
        }
        Err(_) => body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_style_paths_read_as_the_same_operation() {
        let op = Operation::of(
            "/openai/deployments/mini-east/chat/completions",
            Some("api-version=2024-10-21"),
        )
        .unwrap();
        assert_eq!(op.path, "/chat/completions");
        assert_eq!(op.model, Some("mini-east"));
        assert_eq!(op.query, None);
        let op = Operation::of("/openai/v1/embeddings", Some("x=1&api-version=v1&y=2")).unwrap();
        assert_eq!((op.path, op.model), ("/embeddings", None));
        assert_eq!(op.query.as_deref(), Some("x=1&y=2"));
        let op = Operation::of("/v1/files/file-1/content", None).unwrap();
        assert_eq!(op.path, "/files/file-1/content");
        assert!(Operation::of("/openai/deployments//chat/completions", None).is_err());
        assert!(Operation::of("/openai/deployments/a%2Fb/chat/completions", None).is_err());
    }

    #[test]
    fn only_the_model_value_is_rewritten() {
        let body = br#"{ "model" : "gpt-4o-mini", "messages":[{"role":"user","content":"model"}]}"#;
        let start = body.windows(11).position(|w| w == b"gpt-4o-mini").unwrap();
        let out = splice(body, start, start + 11, "mini-east");
        assert_eq!(
            &out[..],
            br#"{ "model" : "mini-east", "messages":[{"role":"user","content":"model"}]}"#
        );
        assert_eq!(json_string_inner("a\"b"), "a\\\"b");
    }
}
