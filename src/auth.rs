//! Client authentication: the gateway key a client presents.
//!
//! A key comes as `Authorization: Bearer <key>` (what the OpenAI SDKs send)
//! or `api-key: <key>` (the Azure style). It is either a client's key,
//! found by its SHA-256 in the [`Directory`], or one of `auth.client_keys_env`,
//! compared in constant time with every one. With neither configured the
//! gateway is open (warned at start-up).

use std::sync::Arc;

use axum::http::{HeaderMap, header};

use crate::clients::{Client, Directory};
use crate::config::ClientKey;
use crate::error::GatewayError;

/// Who is calling: a client with its own limits, or `None` for a plain
/// gateway key (or an open gateway).
pub fn identify(
    clients: &Directory,
    keys: &[ClientKey],
    headers: &HeaderMap,
) -> Result<Option<Arc<Client>>, GatewayError> {
    if clients.is_empty() && keys.is_empty() {
        return Ok(None);
    }
    let presented = presented(headers).ok_or(GatewayError::InvalidApiKey)?;
    if let Some(client) = clients.find(presented) {
        if !client.enabled {
            return Err(GatewayError::InvalidApiKey);
        }
        return Ok(Some(Arc::clone(client)));
    }
    check(keys, presented).map(|()| None)
}

fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .or_else(|| headers.get("api-key").map(|v| v.as_bytes()))
        .map(<[u8]>::trim_ascii)
}

fn check(keys: &[ClientKey], presented: &[u8]) -> Result<(), GatewayError> {
    // Compare with every key so the time taken does not say which matched.
    let matched = keys
        .iter()
        .fold(false, |found, key| key.matches(presented) | found);
    if matched {
        Ok(())
    } else {
        Err(GatewayError::InvalidApiKey)
    }
}
