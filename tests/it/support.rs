//! Test harness: start a gateway from TOML, talk to it, read `/status`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use balancer::config;
use balancer::server;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A gateway serving on 127.0.0.1 with an ephemeral port.
pub(crate) struct Gateway {
    pub addr: SocketAddr,
    /// The admin API's address, when the config sets `admin.token_env`.
    pub admin_addr: Option<SocketAddr>,
    /// The gateway's own directory (its SQLite store unless the config
    /// names another), removed with it.
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

/// The gateway key every test gateway with auth expects.
pub(crate) const CLIENT_KEY: &str = "sk-client-test";
/// The admin token of every test gateway with `admin.token_env = "TEST_ADMIN_TOKEN"`.
pub(crate) const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

impl Gateway {
    /// Starts a gateway from `toml` (which must not set `server.listen`),
    /// probes off unless it has a `[health]` table.
    pub(crate) async fn start(toml: &str) -> Self {
        Self::launch(toml, &[], false).await
    }

    /// Starts a gateway from the config file at `path`, reloading it (and
    /// its key files) when they change, as `balancer serve` does. Variables
    /// it names resolve through `env`; `TEST_CLIENT_KEY` is the client key.
    pub(crate) async fn start_file(path: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let lookup = lookup(env);
        let (config, _) =
            config::load_with(path, &|var| lookup(var)).unwrap_or_else(|e| panic!("{e}"));
        let source = balancer::reload::ConfigSource {
            path: path.to_owned(),
            env: lookup,
            outcome_file: None,
        };
        let gw = Self::serve(config, Some(source)).await;
        gw.until(|s| s["config"]["watching"] == true).await;
        gw
    }

    /// [`start_file`](Self::start_file) with `toml` written to a temporary
    /// file (kept for the gateway's life), for configs that name variables.
    pub(crate) async fn start_file_text(toml: &str, env: &[(&str, &str)]) -> Self {
        Self::launch(toml, env, true).await
    }

    async fn launch(toml: &str, env: &[(&str, &str)], watch: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Balancer.toml");
        std::fs::write(&path, without_probes(toml)).unwrap();
        let lookup = lookup(env);
        let (config, _) =
            config::load_with(&path, &|var| lookup(var)).unwrap_or_else(|e| panic!("{e}"));
        let source = watch.then(|| balancer::reload::ConfigSource {
            path: path.clone(),
            env: lookup,
            outcome_file: None,
        });
        let gw = Self::serve_in(config, source, dir).await;
        if watch {
            gw.until(|s| s["config"]["watching"] == true).await;
        }
        gw
    }

    async fn serve(config: config::Config, source: Option<balancer::reload::ConfigSource>) -> Self {
        Self::serve_in(config, source, tempfile::tempdir().unwrap()).await
    }

    /// Serves `config` as `balancer serve` does (store in `dir` unless the
    /// config names one elsewhere), the admin API on a free port.
    async fn serve_in(
        config: config::Config,
        source: Option<balancer::reload::ConfigSource>,
        dir: tempfile::TempDir,
    ) -> Self {
        let listener = server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = config
            .admin
            .token
            .is_some()
            .then(|| server::bind("127.0.0.1:0".parse().unwrap()).unwrap());
        let admin_addr = admin.as_ref().map(|l| l.local_addr().unwrap());
        let state = server::start(config, dir.path())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if let Some(source) = source {
            let watched = Arc::clone(&state);
            state
                .tasks
                .spawn(|cancel| balancer::reload::watch(watched, source, cancel));
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve_all(listener, admin, state, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            admin_addr,
            _dir: dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The config file a gateway started with [`start_file_text`](Self::start_file_text)
    /// runs (and reloads) from.
    pub(crate) fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("Balancer.toml")
    }

    /// A URL on the admin API.
    pub(crate) fn admin_url(&self, path: &str) -> String {
        let addr = self.admin_addr.expect("the config sets admin.token_env");
        format!("http://{addr}{path}")
    }

    /// `/status` once the config has been reloaded `attempts` times.
    pub(crate) async fn reloaded(&self, attempts: u64) -> Value {
        self.until(|s| s["config"]["last_reload"]["attempt"].as_u64() >= Some(attempts))
            .await
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `/status` as an operator sees it (with the admin token, for the
    /// gateways that have one: clients, budgets and node URLs).
    pub(crate) async fn status(&self) -> Value {
        let body = client()
            .get(self.url("/status"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    /// Waits (bounded, 10 s) until `/status` satisfies `ready`, and returns it.
    /// Gateway state changes as requests end, so tests await that event
    /// through `/status` rather than sleeping a guessed time.
    pub(crate) async fn until(&self, ready: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let found = eventually(Duration::from_secs(10), async || {
            let status = self.status().await;
            let done = ready(&status);
            last = status.clone();
            done.then_some(status)
        })
        .await;
        found.unwrap_or_else(|| panic!("condition not reached: {last}"))
    }

    /// `/status` once nothing is in flight or reserved on any node.
    pub(crate) async fn settled_status(&self) -> Value {
        self.until(|status| {
            status["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["in_flight"] == 0 && n["reserved_tokens"] == 0)
        })
        .await
    }

    /// Begins a graceful shutdown and waits for the server to return.
    pub(crate) async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Variables for a test config: `env`, plus `TEST_CLIENT_KEY` and
/// `TEST_ADMIN_TOKEN`.
fn lookup(env: &[(&str, &str)]) -> balancer::reload::EnvLookup {
    let vars: std::collections::HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .chain([
            ("TEST_CLIENT_KEY".to_owned(), CLIENT_KEY.to_owned()),
            ("TEST_ADMIN_TOKEN".to_owned(), ADMIN_TOKEN.to_owned()),
        ])
        .collect();
    Arc::new(move |var| vars.get(var).cloned())
}

/// `toml` with active probes off unless it has its own `[health]` table, so
/// tests that count the upstream's requests see only their own.
fn without_probes(toml: &str) -> String {
    if toml.contains("[health]") {
        toml.to_owned()
    } else {
        format!("[health]\nenabled = false\n{toml}")
    }
}

/// Sends a chat request (with the test client key) in the background, for
/// tests that must act while it waits; yields its status and the node that
/// served it (empty if none).
pub(crate) fn send_in_background(
    gw: &Gateway,
    body: String,
) -> tokio::task::JoinHandle<(u16, String)> {
    let url = gw.url("/v1/chat/completions");
    tokio::spawn(async move {
        let response = client()
            .post(url)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .body(body)
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap();
        let node = response
            .headers()
            .get("x-balancer-node")
            .map_or_else(String::new, |v| v.to_str().unwrap().to_owned());
        (response.status().as_u16(), node)
    })
}

/// A `[[nodes]]` table with a literal key.
pub(crate) fn node(name: &str, url: &str, key: &str, extra: &str) -> String {
    format!("[[nodes]]\nname = \"{name}\"\nurl = \"{url}\"\napi_key = \"{key}\"\n{extra}\n")
}

/// Settings that keep tests fast: short queue wait, one retry.
pub(crate) const FAST: &str = "[queue]\nmax_wait = \"2s\"\n[upstream]\nfirst_byte_timeout = \"2s\"\nconnect_timeout = \"1s\"\n";

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A chat request body.
pub(crate) fn chat(model: &str, text: &str, max_tokens: u64) -> String {
    serde_json::json!({
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    })
    .to_string()
}

/// A chat request with `key`: status, `Retry-After`, body.
pub(crate) async fn ask_as(
    gw: &Gateway,
    key: &str,
    model: &str,
    max_tokens: u64,
) -> (u16, Option<String>, Value) {
    let response = send_json(
        gw.url("/v1/chat/completions"),
        Some(key),
        chat(model, "hi", max_tokens),
    )
    .await;
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.bytes().await.unwrap();
    (
        status,
        retry,
        serde_json::from_slice(&body).unwrap_or_default(),
    )
}

/// POSTs a chat request body to the gateway with the test client key.
pub(crate) async fn say(gw: &Gateway, body: String) -> reqwest::Response {
    post(&client(), gw, "/v1/chat/completions", body).await
}

/// POSTs the JSON text `body` to `url`, with `key` as its bearer when
/// given: the request builder every test sends JSON with.
pub(crate) async fn send_json(
    url: impl reqwest::IntoUrl,
    key: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut request = client()
        .post(url)
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.body(body).send().await.unwrap()
}

/// GETs `url`'s text, with `key` as its bearer when given.
pub(crate) async fn get_text(url: impl reqwest::IntoUrl, key: Option<&str>) -> String {
    let mut request = client().get(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap().text().await.unwrap()
}

/// POSTs JSON to the gateway as the test client.
pub(crate) async fn post(
    client: &reqwest::Client,
    gw: &Gateway,
    path: &str,
    body: String,
) -> reqwest::Response {
    client
        .post(gw.url(path))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .body(body)
        .send()
        .await
        .unwrap()
}

/// A node's entry in `/status`.
pub(crate) fn node_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap()
}

/// An OpenAI-style chat answer with the given usage.
pub(crate) fn chat_answer(prompt: u64, completion: u64) -> Value {
    serde_json::json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    })
}

/// A port on 127.0.0.1 that refuses connections (bound, then closed).
pub(crate) fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// An upstream that answers every request with a small chat completion
/// (5 prompt and 2 completion tokens).
pub(crate) async fn chat_upstream() -> wiremock::MockServer {
    answering(wiremock::ResponseTemplate::new(200).set_body_json(chat_answer(5, 2))).await
}

/// An upstream whose `GET /v1/models` answers (so a probe of its key
/// passes), that answers POSTs whose body contains `trap` with `trapped`
/// and every other POST with a chat answer.
pub(crate) async fn trapped_upstream(
    trap: &str,
    trapped: wiremock::ResponseTemplate,
) -> wiremock::MockServer {
    use wiremock::matchers::{body_string_contains, method};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains(trap))
        .respond_with(trapped)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(chat_answer(5, 2)))
        .mount(&server)
        .await;
    probe_answers(&server).await;
    server
}

/// `server` answers `GET /v1/models` (a node's probe) with an empty list.
pub(crate) async fn probe_answers(server: &wiremock::MockServer) {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};
    Mock::given(method("GET"))
        .and(path("/v1/models"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"object": "list", "data": []})),
        )
        .mount(server)
        .await;
}

/// A wiremock upstream answering every POST with `template`.
pub(crate) async fn answering(template: wiremock::ResponseTemplate) -> wiremock::MockServer {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer};
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(template)
        .mount(&server)
        .await;
    server
}

/// A wiremock upstream answering every POST with a chat answer after `delay`.
pub(crate) async fn answering_upstream(delay: Duration) -> wiremock::MockServer {
    let answer = wiremock::ResponseTemplate::new(200).set_body_json(chat_answer(5, 2));
    answering(answer.set_delay(delay)).await
}

/// Polls `ready` every 10 ms until it yields a value, for at most
/// `within`: for state that changes when something ends elsewhere (a
/// request, a process, another replica's cache) and cannot be awaited
/// directly. `None` if it never did (the caller says what was awaited).
pub(crate) async fn eventually<T>(
    within: Duration,
    mut ready: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = ready().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What one of [`post_many`]'s requests got back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<u64>,
}

/// Posts `count` chat requests (`body(i)` for the `i`th, with the test
/// client key), `at_once` in flight at a time, each read to its end;
/// returns what each got, in the order they finished.
pub(crate) async fn post_many(
    gw: &Gateway,
    count: usize,
    at_once: usize,
    body: impl Fn(usize) -> String,
) -> Vec<Outcome> {
    use futures_util::StreamExt;
    let http = client();
    futures_util::stream::iter(0..count)
        .map(|i| {
            let (http, body) = (&http, body(i));
            async move {
                let response = post(http, gw, "/v1/chat/completions", body).await;
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
                let status = response.status().as_u16();
                response.bytes().await.unwrap();
                Outcome {
                    status,
                    retry_after,
                }
            }
        })
        .buffer_unordered(at_once)
        .collect()
        .await
}

/// How many of `outcomes` got each status.
pub(crate) fn tally(outcomes: &[Outcome]) -> std::collections::BTreeMap<u16, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for outcome in outcomes {
        *counts.entry(outcome.status).or_default() += 1;
    }
    counts
}

/// A wiremock server's base URL as a node's `url`.
pub(crate) fn v1(server: &wiremock::MockServer) -> String {
    format!("{}/v1", server.uri())
}

/// A private CA, and a certificate for `localhost` it signed with its key.
pub(crate) struct PrivateCa {
    pub(crate) ca_pem: String,
    pub(crate) cert_pem: String,
    pub(crate) cert_der: Vec<u8>,
    pub(crate) key_pem: String,
    /// PKCS#8.
    pub(crate) key_der: Vec<u8>,
    /// A client certificate the CA signed, and its key, in PEM.
    pub(crate) client_cert_pem: String,
    pub(crate) client_key_pem: String,
}

pub(crate) fn private_ca() -> PrivateCa {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    // Named apart (OpenSSL takes a certificate whose issuer is its own
    // subject for a self-signed one).
    let named = |names: Vec<String>, common_name: &str| {
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = named(Vec::new(), "balancer test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_params = named(vec!["localhost".to_owned()], "localhost");
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client_cert = named(vec!["gateway".to_owned()], "gateway")
        .signed_by(&client_key, &issuer)
        .unwrap();
    PrivateCa {
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
        ca_pem: ca_cert.pem(),
        cert_pem: server_cert.pem(),
        cert_der: server_cert.der().to_vec(),
        key_pem: server_key.serialize_pem(),
        key_der: server_key.serialize_der(),
    }
}
