//! Client authentication: the gateway key a client presents.
//!
//! A key comes as `Authorization: Bearer <key>` (what the OpenAI SDKs send)
//! or `api-key: <key>` (the Azure style). It is one of `auth.client_keys_env`
//! (compared in constant time with every one), a declared client's key
//! (found by its SHA-256 in the snapshot's [`Directory`](crate::clients::Directory)),
//! or a stored client's (through the [`Registry`]'s cache). With none of
//! them configured, the admin API off and no client in the store, the
//! gateway is open (warned at start-up): see [`is_open`].

use std::sync::Arc;

use axum::http::{HeaderMap, header};

use crate::clients::{Client, Registry};
use crate::config::Config;
use crate::error::GatewayError;
use crate::keys::{ClientKey, hash_key};
use crate::snapshot::Live;

/// Who is calling: a client with its own limits, or `None` for a plain
/// gateway key (or an open gateway).
pub(crate) async fn identify(
    live: &Live,
    registry: &Registry,
    headers: &HeaderMap,
) -> Result<Option<Arc<Client>>, GatewayError> {
    if is_open(live, registry) {
        return Ok(None);
    }
    let keys = &live.config.client_keys;
    let presented = presented(headers).ok_or(GatewayError::InvalidApiKey)?;
    if matches_any(keys, presented) {
        return Ok(None);
    }
    let hash = hash_key(presented);
    if let Some(client) = live.clients.find(&hash) {
        return if client.enabled {
            Ok(Some(Arc::clone(client)))
        } else {
            Err(GatewayError::InvalidApiKey)
        };
    }
    if !registry.any_stored() {
        return Err(GatewayError::InvalidApiKey);
    }
    match registry.find(&hash).await {
        Ok(Some(client)) => Ok(Some(client)),
        Ok(None) => Err(GatewayError::InvalidApiKey),
        Err(err) => {
            tracing::error!(error = %err, "cannot look up a client key");
            Err(GatewayError::StoreUnavailable)
        }
    }
}

/// Whether the gateway lets anyone in: no key in the config, no client
/// declared, the admin API off (with it on, clients are managed, so keys
/// are required even before the first is made) and no client stored.
pub(crate) fn is_open(live: &Live, registry: &Registry) -> bool {
    config_is_open(&live.config, registry)
}

/// Whether `config` would let anyone in (see [`is_open`]).
pub(crate) fn config_is_open(config: &Config, registry: &Registry) -> bool {
    config.client_keys.is_empty()
        && config.clients.is_empty()
        && config.admin.token.is_none()
        && !registry.any_stored()
}

fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .or_else(|| headers.get("api-key").map(|v| v.as_bytes()))
        .map(<[u8]>::trim_ascii)
}

fn matches_any(keys: &[ClientKey], presented: &[u8]) -> bool {
    // Compare with every key so the time taken does not say which matched.
    keys.iter()
        .fold(false, |found, key| key.matches(presented) | found)
}
