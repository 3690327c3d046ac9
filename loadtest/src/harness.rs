//! Starting the mocks and the gateway for a scenario, reading their
//! counters, and the transactions the scenarios send.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use goose::prelude::*;
use mock_upstreams::StatsReport;
use serde_json::{Value, json};

use crate::bodies::{PerUser, Workload};
use crate::drive::{self, Clock};
use crate::procs::Child;

/// The gateway key the load test's clients present.
pub(crate) const CLIENT_KEY: &str = "sk-loadtest-client";
const CLIENT_KEY_ENV: &str = "LOADTEST_CLIENT_KEY";
const MOCK_KEY_PREFIX: &str = "sk-loadtest-node-";
pub(crate) const CHAT_PATH: &str = "/v1/chat/completions";
/// Fixed `created` for the mocks, so streams compare byte for byte.
pub(crate) const CREATED: u64 = 1_700_000_000;

/// Mock upstreams in a child process.
pub(crate) struct Mocks {
    child: Child,
    /// `http://127.0.0.1:<port>/v1`, one per mock.
    pub urls: Vec<String>,
    pub keys: Vec<String>,
    /// They play Azure OpenAI (`--upstream azure`): nodes point at their
    /// endpoint as Azure deployments.
    pub azure: bool,
}

impl Mocks {
    /// Starts `nodes` mocks on free ports with the given extra options
    /// (`--rpm 100,150,200`, `--words 20`, …).
    pub(crate) async fn start(nodes: u16, options: &[String]) -> anyhow::Result<Self> {
        let mut args: Vec<String> = [
            "mocks",
            "--nodes",
            &nodes.to_string(),
            "--base-port",
            "0",
            "--key-prefix",
            MOCK_KEY_PREFIX,
            "--created",
            &CREATED.to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend_from_slice(options);
        let (child, urls) = Child::spawn("mock upstreams", &args, &[], usize::from(nodes)).await?;
        let keys = (0..nodes)
            .map(|i| mock_upstreams::cli::key(MOCK_KEY_PREFIX, i))
            .collect();
        let azure = options
            .windows(2)
            .any(|pair| pair[0] == "--upstream" && pair[1] == "azure");
        Ok(Self {
            child,
            urls,
            keys,
            azure,
        })
    }

    /// `http://127.0.0.1:<port>` of mock `i`.
    pub(crate) fn origin(&self, i: usize) -> &str {
        self.urls[i].trim_end_matches("/v1")
    }

    pub(crate) async fn stats(&self) -> anyhow::Result<Vec<StatsReport>> {
        let mut all = Vec::with_capacity(self.urls.len());
        for i in 0..self.urls.len() {
            let url = format!("{}/_stats", self.origin(i));
            all.push(reqwest::get(&url).await?.json().await?);
        }
        Ok(all)
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.child.stop().await
    }
}

/// One gateway node's quota line(s), by node index.
pub(crate) type NodeQuota<'a> = &'a dyn Fn(usize) -> String;

/// The gateway in a child process, in front of `mocks`.
pub(crate) struct Gateway {
    child: Child,
    /// `http://127.0.0.1:<port>`
    pub origin: String,
    /// The config file it runs (and reloads) from.
    pub config: std::path::PathBuf,
}

impl Gateway {
    pub(crate) async fn start(
        mocks: &Mocks,
        dir: &Path,
        scenario: &str,
        extra: &str,
        quota: NodeQuota<'_>,
    ) -> anyhow::Result<Self> {
        Self::start_with_env(mocks, dir, scenario, extra, quota, &[]).await
    }

    /// As [`Gateway::start`], with `env` set for the gateway as well (the
    /// keys of clients that `extra` declares).
    pub(crate) async fn start_with_env(
        mocks: &Mocks,
        dir: &Path,
        scenario: &str,
        extra: &str,
        quota: NodeQuota<'_>,
        extra_env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join(format!("{scenario}-gateway.toml"));
        let all: Vec<usize> = (0..mocks.urls.len()).collect();
        std::fs::write(&config, gateway_toml(mocks, scenario, extra, quota, &all))
            .with_context(|| format!("writing {}", config.display()))?;
        let mut env: Vec<(String, String)> =
            vec![(CLIENT_KEY_ENV.to_owned(), CLIENT_KEY.to_owned())];
        for (i, key) in mocks.keys.iter().enumerate() {
            env.push((node_key_env(i), key.clone()));
        }
        env.extend_from_slice(extra_env);
        // Quiet by default; LOADTEST_GATEWAY_LOG=info measures the gateway
        // with its per-request access log on (written to stderr).
        let log = std::env::var("LOADTEST_GATEWAY_LOG").unwrap_or_else(|_| "warn".to_owned());
        env.push(("RUST_LOG".to_owned(), log));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let args = vec![
            "gateway".to_owned(),
            "--config".to_owned(),
            config.to_string_lossy().into_owned(),
        ];
        let (child, addrs) = Child::spawn("gateway", &args, &env, 1).await?;
        let origin = format!("http://{}", addrs[0]);
        Ok(Self {
            child,
            origin,
            config,
        })
    }

    /// Replaces the config file (a new file renamed over it, as editors do)
    /// with one that has only the `nodes` given, by mock index.
    pub(crate) fn rewrite_config(
        &self,
        mocks: &Mocks,
        scenario: &str,
        extra: &str,
        quota: NodeQuota<'_>,
        nodes: &[usize],
    ) -> anyhow::Result<()> {
        let tmp = self.config.with_extension("toml.new");
        std::fs::write(&tmp, gateway_toml(mocks, scenario, extra, quota, nodes))?;
        std::fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    /// Sends the gateway SIGHUP (it is our own child).
    pub(crate) fn hangup(&self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)?;
        Ok(())
    }

    pub(crate) async fn status(&self) -> anyhow::Result<Value> {
        Ok(reqwest::get(format!("{}/status", self.origin))
            .await?
            .json()
            .await?)
    }

    /// Waits up to `wait` for every node's requests in flight, reserved
    /// tokens and the queue to reach 0; returns what did not.
    pub(crate) async fn settle(&self, wait: Duration) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + wait;
        loop {
            let status = self.status().await?;
            let mut left = Vec::new();
            for node in status["nodes"].as_array().into_iter().flatten() {
                for field in ["in_flight", "reserved_tokens"] {
                    let n = node[field].as_u64().unwrap_or(0);
                    if n > 0 {
                        left.push(format!("node {} {field} {n}", node["name"]));
                    }
                }
            }
            for field in ["depth", "budget_waiting", "held_bytes"] {
                let n = status["queue"][field].as_u64().unwrap_or(0);
                if n > 0 {
                    left.push(format!("queue {field} {n}"));
                }
            }
            // Budgets, where `/status` shows them: nothing held in flight.
            for budget in status["budgets"].as_array().into_iter().flatten() {
                let held = budget["in_flight_usd"].as_f64().unwrap_or(0.0);
                if held > 0.0 {
                    left.push(format!("budget {} in flight ${held}", budget["name"]));
                }
            }
            if left.is_empty() || Instant::now() > deadline {
                return Ok(left);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) fn cpu_time(&self) -> Duration {
        self.child.cpu_time()
    }

    /// (peak, current) resident memory in bytes.
    pub(crate) fn memory(&self) -> (u64, u64) {
        self.child.memory()
    }

    /// Resident memory once the gateway has been idle for [`SETTLE`]:
    /// after a burst it gives the allocator's freed pages back at its
    /// first quiet second (`balancer::memory`).
    pub(crate) async fn settled_memory(&self) -> u64 {
        tokio::time::sleep(SETTLE).await;
        self.child.memory().1
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.child.stop().await
    }
}

/// Long enough for a busy second and a quiet one of the gateway's own
/// sampling to pass after a run.
pub(crate) const SETTLE: Duration = Duration::from_millis(2500);

fn node_key_env(i: usize) -> String {
    format!("LOADTEST_NODE_{i}_KEY")
}

pub(crate) fn node_name(i: usize) -> String {
    char::from(b'a' + (i % 26) as u8).to_string()
}

fn gateway_toml(
    mocks: &Mocks,
    scenario: &str,
    extra: &str,
    quota: NodeQuota<'_>,
    nodes: &[usize],
) -> String {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\npid_file = \"{scenario}-gateway.pid\"\n\n[store]\nurl = \"sqlite://{scenario}-gateway.db\"\n\n[auth]\nclient_keys_env = [\"{CLIENT_KEY_ENV}\"]\n\n{extra}\n"
    );
    for (i, url) in mocks.urls.iter().enumerate() {
        if !nodes.contains(&i) {
            continue;
        }
        // An Azure mock's deployment is named for the model it serves.
        let (url, dialect) = if mocks.azure {
            (
                mocks.origin(i),
                "api = \"azure\"\napi_version = \"2024-10-21\"\ndeployments = { \"gpt-4o-mini\" = \"gpt-4o-mini\" }\n",
            )
        } else {
            (url.as_str(), "")
        };
        toml.push_str(&format!(
            "[[nodes]]\nname = \"{}\"\nurl = \"{url}\"\napi_key_env = \"{}\"\n{dialect}{}\n\n",
            node_name(i),
            node_key_env(i),
            quota(i)
        ));
    }
    toml
}

/// A small chat request, as an SDK would send it.
pub(crate) fn chat_body(stream: bool) -> Bytes {
    let mut body = json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write one sentence about load balancing."},
        ],
        "max_tokens": 64,
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    Bytes::from(body.to_string())
}

/// What a transaction sends: one body every time, or a body made fresh
/// for each request by each user's own generator.
pub(crate) enum Body {
    Fixed(Bytes),
    Varied(PerUser),
}

impl Body {
    /// Fresh bodies of `workload`.
    pub(crate) fn varied(workload: Workload) -> Self {
        Body::Varied(PerUser::new(workload))
    }
}

impl From<Bytes> for Body {
    fn from(body: Bytes) -> Self {
        Body::Fixed(body)
    }
}

/// Sends one chat request and reads the answer to its end. With
/// `accept_429`, a 429 counts as an answered request (the saturation
/// scenario expects them); any other non-2xx is a failure.
pub(crate) fn chat_transaction(
    key: Arc<str>,
    body: impl Into<Body>,
    clock: Arc<Clock>,
    accept_429: bool,
) -> TransactionFunction {
    let source = Arc::new(body.into());
    Arc::new(move |user| {
        let (key, clock) = (Arc::clone(&key), Arc::clone(&clock));
        let body = match &*source {
            Body::Fixed(bytes) => bytes.clone(),
            Body::Varied(generators) => generators.next(user.weighted_users_index, false),
        };
        Box::pin(async move {
            clock.started(Instant::now());
            let mut goose = drive::post(user, CHAT_PATH, &key, &body).await?;
            let outcome = match goose.response {
                Ok(response) => {
                    let status = response.status().as_u16();
                    match response.bytes().await {
                        Ok(_) if accept_429 && status == 429 => Ok(true),
                        Ok(_) => Ok(false),
                        Err(e) => Err(e.to_string()),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            clock.ended(Instant::now());
            match outcome {
                Ok(true) => user.set_success(&mut goose.request),
                Ok(false) => Ok(()),
                Err(e) => user.set_failure(&e, &mut goose.request, None, None),
            }
        })
    })
}

/// Formats bytes as MB.
pub(crate) fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_000_000.0)
}

/// Formats microseconds as milliseconds.
pub(crate) fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

/// Served requests per node between two `/_stats` readings, as a line.
pub(crate) fn per_node_line(before: &[StatsReport], after: &[StatsReport]) -> String {
    let served: Vec<u64> = after
        .iter()
        .zip(before)
        .map(|(a, b)| a.served - b.served)
        .collect();
    let total: u64 = served.iter().sum::<u64>().max(1);
    served
        .iter()
        .enumerate()
        .map(|(i, n)| {
            format!(
                "{} {n} ({:.1}%)",
                node_name(i),
                *n as f64 * 100.0 / total as f64
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A pass/miss verdict line for a target.
pub(crate) fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// A `redis-server` on a free port on 127.0.0.1, for the gateway's shared
/// limits; nothing written to disk, killed when dropped.
pub(crate) struct Redis {
    _process: tokio::process::Child,
    pub url: String,
}

impl Redis {
    pub(crate) async fn start() -> anyhow::Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut process = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?;
        let stdout = process.stdout.take().context("redis-server stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = async {
            while let Some(line) = lines.next_line().await? {
                if line.contains("Ready to accept connections") {
                    return Ok::<bool, std::io::Error>(true);
                }
            }
            Ok(false)
        };
        let ready = tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .context("redis-server did not get ready in 10 s")??;
        anyhow::ensure!(ready, "redis-server exited before it was ready");
        // Keep draining its log so it never blocks on a full pipe.
        #[expect(
            clippy::disallowed_methods,
            reason = "drains a child's output; ends when the child (killed on drop) closes it"
        )]
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            _process: process,
            url: format!("redis://127.0.0.1:{port}"),
        })
    }
}
