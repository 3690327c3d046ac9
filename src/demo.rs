//! `balancer demo`: three mock upstreams in-process and the gateway in
//! front of them, from the root `Balancer.toml`.
//!
//! Key variables that are not set get demo values, shared by the mocks
//! (which check them) and the gateway (which injects them), so the demo
//! runs on a fresh machine with no set-up. Only nodes on the loopback
//! address get a mock; a node pointing elsewhere is used as configured.

use std::net::SocketAddr;
use std::path::Path;

use mock_upstreams::{MockConfig, MockUpstream};

use crate::config::{self, Config, ConfigError};
use crate::server;

/// The gateway key the demo uses when `APP_GATEWAY_KEY` (or whichever
/// variable `auth.client_keys_env` names) is not set. Public by design.
pub const DEMO_CLIENT_KEY: &str = "sk-balancer-demo";

/// Runs the demo until SIGINT or SIGTERM.
pub async fn run(config_path: &Path) -> Result<(), DemoError> {
    let mut defaulted = Vec::new();
    let resolve = |var: &str| {
        std::env::var(var)
            .ok()
            .or_else(|| Some(format!("sk-demo-{}", var.to_lowercase())))
    };
    let (config, warnings) = config::load_with(config_path, &resolve)?;
    for var in &config_client_vars(config_path) {
        if std::env::var(var).is_err() {
            defaulted.push(var.clone());
        }
    }
    for warning in &warnings.0 {
        tracing::warn!("{warning}");
    }

    let mut mocks = Vec::new();
    for node in &config.nodes {
        let Some(addr) = loopback_addr(&node.url) else {
            tracing::info!(node = %node.name, "not a loopback URL; no mock started");
            continue;
        };
        // The mock enforces the node's own quota, as the real service would.
        let mut mock = MockConfig::new(node.key.expose())
            .stream_timing(
                std::time::Duration::from_millis(20),
                std::time::Duration::from_millis(20),
            )
            .quota(node.quota.rpm.map(u64::from), node.quota.tpm.map(u64::from));
        if let Some(models) = &node.models {
            mock.models = models.clone();
        }
        let started = MockUpstream::start(addr, mock).await.map_err(|e| {
            DemoError::Bind(format!("mock for node '{}' on {addr}: {e}", node.name))
        })?;
        println!(
            "mock upstream for node '{}' on {}",
            node.name,
            started.base_url()
        );
        mocks.push(started);
    }

    let listen = config.server.listen;
    let listener = server::bind(listen).map_err(|e| DemoError::Bind(format!("{listen}: {e}")))?;
    let key_hint = client_key_hint(&config, &defaulted);
    let model = config
        .nodes
        .iter()
        .find_map(|n| n.models.as_ref().and_then(|m| m.first().cloned()))
        .unwrap_or_else(|| "gpt-4o-mini".to_owned());
    let admin = server::bind_admin(&config).map_err(|e| DemoError::Bind(e.to_string()))?;
    let admin_hint = admin
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .zip(admin_token_hint(config_path));
    let base_dir = config_path.parent().unwrap_or(Path::new("."));
    let state = server::start(config, base_dir)
        .await
        .map_err(|e| DemoError::Start(e.to_string()))?;
    print_examples(listen, &model, &key_hint);
    if let Some((addr, token)) = admin_hint {
        println!(
            "Admin API (docs/openapi.yaml): make a client with its own key and limits\n  \
             curl http://{addr}/admin/clients -H \"Authorization: Bearer {token}\" \\\n    \
             -H \"Content-Type: application/json\" -d '{{\"name\":\"team-a\",\"rpm\":60}}'\n"
        );
    }
    server::serve_all(listener, admin, state, server::shutdown_signal())
        .await
        .map_err(|e| DemoError::Start(e.to_string()))?;
    for mock in mocks {
        mock.stop().await;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen: {0}")]
    Bind(String),
    #[error("cannot start: {0}")]
    Start(String),
}

#[derive(serde::Deserialize, Default)]
struct Auth {
    #[serde(default)]
    client_keys_env: Vec<String>,
}

#[derive(serde::Deserialize, Default)]
struct Admin {
    token_env: Option<String>,
}

/// The parts of the file that name key variables.
#[derive(serde::Deserialize, Default)]
struct KeyVars {
    #[serde(default)]
    auth: Auth,
    #[serde(default)]
    admin: Admin,
}

fn key_vars(path: &Path) -> KeyVars {
    use figment::providers::{Format, Toml};
    figment::Figment::from(Toml::file(path))
        .extract::<KeyVars>()
        .unwrap_or_default()
}

/// The variable names in `auth.client_keys_env`, read from the file.
fn config_client_vars(path: &Path) -> Vec<String> {
    key_vars(path).auth.client_keys_env
}

/// How to present the admin token in the printed examples, if the admin
/// API is on.
fn admin_token_hint(path: &Path) -> Option<String> {
    let var = key_vars(path).admin.token_env?;
    Some(if std::env::var(&var).is_ok() {
        format!("${var}")
    } else {
        // The demo made the value up; showing it is how the user learns it.
        format!("sk-demo-{}", var.to_lowercase())
    })
}

fn client_key_hint(config: &Config, defaulted: &[String]) -> String {
    if config.client_keys.is_empty() {
        return "anything".to_owned();
    }
    match defaulted.first() {
        // The demo made the value up; showing it is how the user learns it.
        Some(var) => format!("sk-demo-{}", var.to_lowercase()),
        None => "$APP_GATEWAY_KEY".to_owned(),
    }
}

fn loopback_addr(url: &str) -> Option<SocketAddr> {
    let url = reqwest::Url::parse(url).ok()?;
    let host = url.host_str()?;
    let ip = match host {
        "localhost" => std::net::IpAddr::from([127, 0, 0, 1]),
        other => other.trim_matches(['[', ']']).parse().ok()?,
    };
    (ip.is_loopback() && url.scheme() == "http")
        .then(|| SocketAddr::new(ip, url.port_or_known_default().unwrap_or(80)))
}

fn print_examples(listen: SocketAddr, model: &str, key: &str) {
    println!(
        r#"
balancer is listening on http://{listen}/v1 (Ctrl-C stops it)

Try it with curl:
  curl http://{listen}/v1/chat/completions \
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \
    -d '{{"model":"{model}","messages":[{{"role":"user","content":"Hello!"}}]}}'

Or with the OpenAI SDK for Python (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="http://{listen}/v1", api_key="{key}")
  reply = client.chat.completions.create(
      model="{model}", messages=[{{"role": "user", "content": "Hello!"}}])
  print(reply.choices[0].message.content)

Live node usage: curl http://{listen}/status
"#
    );
}
