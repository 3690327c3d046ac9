//! Keys and other secrets: the upstream keys the gateway sends, the
//! gateway keys clients present, the admin token, and URLs that may carry
//! a password. This module is the one place that handles them.
//!
//! Invariants:
//! - A secret is a [`secrecy`] type from the moment it is read; `Debug`
//!   prints `[redacted]`, and nothing here implements `Serialize`.
//! - A gateway key is kept and looked up only as its SHA-256
//!   ([`hash_key`]); people tell keys apart by a short [`key_prefix`].
//! - Presented keys are compared in constant time ([`ClientKey::matches`]).
//! - A URL is shown only without its credentials ([`redacted_url`]).

use std::fmt;
use std::sync::Arc;

use axum::http::HeaderValue;
use rand::Rng;
use rand::distr::Alphanumeric;
use secrecy::{ExposeSecret, SecretString};

/// An upstream key. Its header values (`Authorization: Bearer …` for
/// OpenAI-style nodes, `api-key: …` for Azure) are built once, marked
/// sensitive, so the request path neither formats nor exposes the secret.
#[derive(Clone)]
pub struct NodeKey {
    secret: Arc<SecretString>,
    authorization: HeaderValue,
    api_key: HeaderValue,
}

impl NodeKey {
    pub(crate) fn new(secret: SecretString) -> Result<Self, String> {
        let invalid = |_| "the key contains characters not allowed in a header".to_owned();
        let mut authorization =
            HeaderValue::try_from(format!("Bearer {}", secret.expose_secret())).map_err(invalid)?;
        authorization.set_sensitive(true);
        let mut api_key = HeaderValue::try_from(secret.expose_secret()).map_err(invalid)?;
        api_key.set_sensitive(true);
        Ok(Self {
            secret: Arc::new(secret),
            authorization,
            api_key,
        })
    }

    /// The `Authorization: Bearer …` value to send upstream.
    pub(crate) fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }

    /// The `api-key: …` value an Azure node gets instead.
    pub(crate) fn api_key(&self) -> &HeaderValue {
        &self.api_key
    }

    /// The key itself, for code that must compare it (tests, probes).
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }

    /// Whether two keys are the same key.
    pub(crate) fn same_as(&self, other: &NodeKey) -> bool {
        self.expose() == other.expose()
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A gateway key a client presents, or the admin token.
#[derive(Clone)]
pub struct ClientKey(Arc<SecretString>);

impl ClientKey {
    pub fn new(secret: SecretString) -> Self {
        Self(Arc::new(secret))
    }

    /// SHA-256 of the key: how a client is looked up and stored.
    pub fn hash(&self) -> [u8; 32] {
        hash_key(self.0.expose_secret().as_bytes())
    }

    /// What may be shown of the key ([`key_prefix`]).
    pub(crate) fn prefix(&self) -> String {
        key_prefix(self.0.expose_secret())
    }

    /// Constant-time comparison with a presented key.
    pub(crate) fn matches(&self, presented: &[u8]) -> bool {
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

/// What every key the gateway makes starts with, so one is recognisable.
const KEY_PREFIX: &str = "sk-bal-";
/// 40 alphanumerics: about 238 bits.
const KEY_RANDOM_CHARS: usize = 40;
/// Stored clients' ids start with this; declared ones with
/// [`CONFIG_ID_PREFIX`].
const STORED_ID_PREFIX: &str = "cl_";
/// The id of a client declared in the config is this and its name.
pub const CONFIG_ID_PREFIX: &str = "cfg_";

/// A new random id: a stored client's, or a replica's.
pub fn new_id() -> String {
    format!("{STORED_ID_PREFIX}{}", random_chars(16))
}

/// A new gateway key, shown once and stored only as its hash.
pub(crate) fn new_key() -> SecretString {
    SecretString::from(format!("{KEY_PREFIX}{}", random_chars(KEY_RANDOM_CHARS)))
}

/// What is shown of a key so people can tell keys apart: `sk-bal-` and 4
/// more characters of a generated key; of a shorter declared key, at most a
/// third of it.
pub fn key_prefix(key: &str) -> String {
    let shown = (KEY_PREFIX.len() + 4).min(key.chars().count() / 3);
    key.chars().take(shown).collect()
}

fn random_chars(n: usize) -> String {
    // `rand::rng()` is a CSPRNG seeded from the OS.
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// A database or Redis URL without its credentials or query, for logs,
/// errors and `balancer check`.
pub(crate) fn redacted_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) if scheme.starts_with("postgres") || scheme.starts_with("redis") => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            let host = host.split('?').next().unwrap_or(host);
            format!("{scheme}://{host}")
        }
        // Any other URL (a collector's): without its user and password.
        Some((scheme, rest)) => {
            let rest = rest.split('?').next().unwrap_or(rest);
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}{path}")
        }
        None => url.split('?').next().unwrap_or(url).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_shows_only_its_prefix() {
        let key = new_key();
        assert_eq!(
            key.expose_secret().len(),
            KEY_PREFIX.len() + KEY_RANDOM_CHARS
        );
        assert_eq!(key_prefix(key.expose_secret()).len(), KEY_PREFIX.len() + 4);
        assert_ne!(new_key().expose_secret(), key.expose_secret());
        // A short declared key shows a third of itself at most.
        assert_eq!(key_prefix("sk-team-a-key"), "sk-t");
    }

    #[test]
    fn a_collector_url_is_described_without_its_credentials() {
        assert_eq!(
            redacted_url("https://user:pa%40ss@collector.example:4317/v1?token=x"),
            "https://collector.example:4317/v1"
        );
        assert_eq!(
            redacted_url("http://collector:4317"),
            "http://collector:4317"
        );
    }

    #[test]
    fn a_postgres_url_is_described_without_its_credentials() {
        assert_eq!(
            redacted_url("postgres://app:s3cret@db.internal:5432/balancer?sslmode=require"),
            "postgres://db.internal:5432/balancer"
        );
        assert_eq!(
            redacted_url("sqlite://balancer.db?mode=rwc"),
            "sqlite://balancer.db"
        );
    }

    #[test]
    fn keys_never_show_in_debug() {
        let key = NodeKey::new(SecretString::from("sk-secret".to_owned())).unwrap();
        assert_eq!(format!("{key:?}"), "[redacted]");
        let client = ClientKey::new(SecretString::from("sk-client".to_owned()));
        assert_eq!(format!("{client:?}"), "[redacted]");
        assert!(client.matches(b"sk-client") && !client.matches(b"sk-clienT"));
    }
}
