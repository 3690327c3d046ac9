//! The admin tests' kit: a store of either backend, a gateway on it, and
//! calls to its admin API.

use mock_upstreams::{MockConfig, MockUpstream};
use reqwest::Method;
use serde_json::{Value, json};

use crate::pg;
use crate::support::{ADMIN_TOKEN, Gateway, client, node};

#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// A store for one test: a SQLite file in a directory the test owns, or a
/// fresh PostgreSQL database. Outlives the gateways started on it.
pub(crate) struct TestStore {
    url: String,
    dir: Option<tempfile::TempDir>,
}

impl TestStore {
    pub(crate) async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}/clients.db", dir.path().display());
                Self {
                    url,
                    dir: Some(dir),
                }
            }
            Backend::Postgres => Self {
                url: pg::fresh_database().await,
                dir: None,
            },
        }
    }

    /// Everything the store holds, as text: every row of every table, and
    /// for SQLite the raw bytes of its files too.
    pub(crate) async fn dump(&self) -> String {
        let mut out = String::new();
        if let Some(dir) = &self.dir {
            for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
                out.push_str(&String::from_utf8_lossy(
                    &std::fs::read(entry.path()).unwrap(),
                ));
            }
            return out;
        }
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&self.url)
            .await
            .unwrap();
        for table in ["clients", "client_usage"] {
            let rows = sqlx::query(&format!("SELECT t::text FROM {table} t"))
                .fetch_all(&mut conn)
                .await
                .unwrap();
            for row in rows {
                out.push_str(&sqlx::Row::get::<String, _>(&row, 0));
                out.push('\n');
            }
        }
        out
    }
}

pub(crate) async fn mock() -> MockUpstream {
    MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockConfig::new("sk-mock"))
        .await
        .unwrap()
}

/// A gateway on `store` with the admin API on, in front of `upstream`.
pub(crate) async fn gateway(store: &TestStore, upstream: &MockUpstream, extra: &str) -> Gateway {
    gateway_on(store, "", upstream, extra).await
}

/// [`gateway`] with more `[store]` settings.
pub(crate) async fn gateway_on(
    store: &TestStore,
    store_settings: &str,
    upstream: &MockUpstream,
    extra: &str,
) -> Gateway {
    let toml = format!(
        "[store]\nurl = \"{}\"\n{store_settings}\n[admin]\ntoken_env = \"TEST_ADMIN_TOKEN\"\n[queue]\nmax_wait = \"1s\"\n{extra}{}",
        store.url,
        node("n", &upstream.base_url(), "sk-mock", "")
    );
    Gateway::start_file_text(&toml, &[("TEAM_A", "sk-declared-team-a-key")]).await
}

/// Calls the admin API with the admin token: status and JSON body.
pub(crate) async fn admin(
    gw: &Gateway,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    admin_with(gw, Some(ADMIN_TOKEN), method, path, body).await
}

pub(crate) async fn admin_with(
    gw: &Gateway,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = client().request(method, gw.admin_url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Creates a client; its JSON (with `key`).
pub(crate) async fn create(gw: &Gateway, body: Value) -> Value {
    let (status, client) = admin(gw, Method::POST, "/admin/clients", Some(body)).await;
    assert_eq!(status, 201, "{client}");
    client
}

pub(crate) fn key(client: &Value) -> &str {
    client["key"].as_str().unwrap()
}

pub(crate) fn id(client: &Value) -> String {
    client["id"].as_str().unwrap().to_owned()
}

/// The error code of an answer.
pub(crate) fn code(answer: &(u16, Value)) -> (u16, &str) {
    (answer.0, answer.1["error"]["code"].as_str().unwrap_or(""))
}

/// Waits (bounded, 5 s) until `ready` holds: another replica's change
/// arrives when its cache entry expires, an event it cannot signal here.
pub(crate) async fn eventually<F, Fut>(ready: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let within = std::time::Duration::from_secs(5);
    let held = crate::support::eventually(within, async || ready().await.then_some(())).await;
    assert!(held.is_some(), "not within 5 s");
}

/// `answer` is a 400 that names `field` (as `param` and first in the
/// message).
pub(crate) fn refused_naming(answer: &(u16, Value), body: &Value, field: &str) {
    assert_eq!(code(answer), (400, "invalid_value"), "{body}: {}", answer.1);
    assert_eq!(answer.1["error"]["param"], field, "{body}: {}", answer.1);
    let message = answer.1["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("{field}: ")),
        "{body}: {message}"
    );
}

/// Every operation on a client id nobody has is 404 `client_not_found`.
pub(crate) async fn no_such_client_is_found(gw: &crate::support::Gateway) {
    for (method, path) in [
        (Method::GET, "/admin/clients/cl_nobody"),
        (Method::PATCH, "/admin/clients/cl_nobody"),
        (Method::DELETE, "/admin/clients/cl_nobody"),
        (Method::POST, "/admin/clients/cl_nobody/rotate"),
        (Method::GET, "/admin/clients/cl_nobody/usage"),
    ] {
        let body = (method == Method::PATCH).then(|| json!({}));
        let answer = admin(gw, method.clone(), path, body).await;
        assert_eq!(code(&answer), (404, "client_not_found"), "{method} {path}");
    }
}
