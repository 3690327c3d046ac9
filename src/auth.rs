//! Client authentication: the gateway key a client presents.
//!
//! A key comes as `Authorization: Bearer <key>` (what the OpenAI SDKs send)
//! or `api-key: <key>` (the Azure style). It is compared in constant time
//! with every configured key. With no key configured the gateway is open
//! (warned at start-up).

use axum::http::{HeaderMap, header};

use crate::config::ClientKey;
use crate::error::GatewayError;

pub fn check(keys: &[ClientKey], headers: &HeaderMap) -> Result<(), GatewayError> {
    if keys.is_empty() {
        return Ok(());
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .or_else(|| headers.get("api-key").map(|v| v.as_bytes()))
        .map(<[u8]>::trim_ascii)
        .ok_or(GatewayError::InvalidApiKey)?;
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
