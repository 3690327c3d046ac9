//! The `balancer` binary as operators run it: `serve` writes its pid file,
//! `balancer reload` (SIGHUP) reports what changed or why the new config was
//! rejected, `balancer stop` and SIGTERM drain requests in flight (streams
//! included) and exit 0.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use mock_upstreams::{MockConfig, MockUpstream};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::{chat, client, send_json};

const BINARY: &str = env!("CARGO_BIN_EXE_balancer");

/// A `balancer serve` child process; killed on drop if still running.
pub(crate) struct Served {
    child: Child,
    addr: SocketAddr,
    /// Every line it logged after saying it was listening.
    log: std::sync::mpsc::Receiver<String>,
}

impl Served {
    /// Starts `balancer --config <config> serve` and waits for it to listen.
    pub(crate) fn start(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BINARY)
            .arg("--config")
            .arg(config)
            .arg("serve")
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (found, listening) = std::sync::mpsc::channel();
        let (log_tx, log) = std::sync::mpsc::channel();
        // Keeps draining the log so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut found = Some(found);
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("balancer listening")
                    && let Some(tx) = found.take()
                {
                    let _ = tx.send(line);
                } else if found.is_none() {
                    let _ = log_tx.send(line);
                }
            }
        });
        let line = listening
            .recv_timeout(Duration::from_secs(30))
            .expect("the gateway never said it was listening");
        // Text (`listen=...`) or JSON (`"listen":"..."`).
        let addr = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(json) => json["listen"].as_str().and_then(|a| a.parse().ok()),
            Err(_) => line
                .split_whitespace()
                .find_map(|word| word.strip_prefix("listen="))
                .and_then(|a| a.parse().ok()),
        }
        .unwrap_or_else(|| panic!("no address in {line:?}"));
        Self { child, addr, log }
    }

    /// The next line it logs that contains `needle` (waits up to 10 s).
    pub(crate) fn logged(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .log
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line with {needle:?} within 10 s"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Every line it logs until (and with) the first that contains
    /// `needle` (waits up to 10 s).
    pub(crate) fn lines_until(&self, needle: &str) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .log
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line with {needle:?} within 10 s"));
            let found = line.contains(needle);
            lines.push(line);
            if found {
                return lines;
            }
        }
    }

    pub(crate) fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits (bounded) for the process to exit and returns whether it
    /// exited with status 0.
    async fn exited_ok(mut self) -> bool {
        let exited = crate::support::eventually(Duration::from_secs(30), async || {
            self.child.try_wait().unwrap()
        });
        exited.await.expect("the gateway did not exit").success()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `balancer --config <config> <command>`; returns (exit code, stdout, stderr).
async fn run(config: &Path, command: &str) -> (i32, String, String) {
    run_with(config, &[command]).await
}

/// Runs `balancer --config <config> <args...>`; returns (exit code, stdout, stderr).
async fn run_with(config: &Path, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(BINARY)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub(crate) fn write_config(dir: &Path, upstream: &str, extra: &str) -> PathBuf {
    let path = dir.join("Balancer.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nwatch_config = false\nshutdown_grace = \"30s\"\n\
         [health]\nenabled = false\n\
         [[nodes]]\nname = \"a\"\nurl = \"{upstream}\"\napi_key_env = \"NODE_KEY\"\n{extra}\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A mock upstream and `balancer serve` in front of it, its config in a
/// fresh directory with `extra` in the node's table.
struct Setup {
    upstream: MockUpstream,
    dir: tempfile::TempDir,
    config: PathBuf,
    served: Served,
}

async fn serve_in_front_of(mock: MockConfig, extra: &str) -> Setup {
    let upstream = MockUpstream::start("127.0.0.1:0".parse().unwrap(), mock)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &upstream.base_url(), extra);
    let served = Served::start(&config, &[("NODE_KEY", "sk-mock")]);
    Setup {
        upstream,
        dir,
        config,
        served,
    }
}

async fn chat_status(served: &Served) -> u16 {
    send_json(
        served.url("/v1/chat/completions"),
        None,
        chat("gpt-4o-mini", "hi", 5),
    )
    .await
    .status()
    .as_u16()
}

#[tokio::test]
async fn reload_reports_what_changed_or_why_not_and_stop_waits_for_the_exit() {
    let Setup {
        upstream,
        dir,
        config,
        served,
    } = serve_in_front_of(MockConfig::new("sk-mock"), "rpm = 50").await;
    let pid_file = dir.path().join("balancer.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, served.pid().as_raw());
    assert_eq!(chat_status(&served).await, 200);

    let (code, out, _) = run(&config, "reload").await;
    assert_eq!(
        (code, out.trim()),
        (0, "balancer: config reloaded (no node changed)")
    );

    write_config(dir.path(), &upstream.base_url(), "rpm = 70");
    let (code, out, _) = run(&config, "reload").await;
    assert_eq!(
        (code, out.trim()),
        (0, "balancer: config reloaded (changed: a (limits))")
    );

    write_config(dir.path(), &upstream.base_url(), "rpm = 0");
    let (code, _, err) = run(&config, "reload").await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("rejected the new config; the running config stays"),
        "{err}"
    );
    assert!(
        err.contains("nodes[0].rpm: must be greater than 0"),
        "{err}"
    );
    assert_eq!(
        chat_status(&served).await,
        200,
        "the old config keeps serving"
    );
    let status = client().get(served.url("/status")).send().await.unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.bytes().await.unwrap()).unwrap();
    assert_eq!(status["nodes"][0]["limits"]["rpm"]["limit"], 70);

    let (code, out, err) = run(&config, "stop").await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("balancer: gateway (pid {pid}) stopped"));
    assert!(served.exited_ok().await);
    assert!(!pid_file.exists(), "the pid file goes with the process");

    let (code, _, err) = run(&config, "reload").await;
    assert_eq!(code, 1);
    assert!(err.contains("no running gateway"), "{err}");
    upstream.stop().await;
}

#[tokio::test]
async fn sigterm_during_streaming_lets_every_stream_finish() {
    // Each stream takes about two seconds: 20 words, one every 100 ms.
    let mock = MockConfig::new("sk-mock")
        .stream_timing(Duration::from_millis(50), Duration::from_millis(100))
        .completion_words(20);
    // Named first: the fields not taken (the directory) live to the end.
    let setup = serve_in_front_of(mock, "").await;
    let Setup {
        upstream, served, ..
    } = setup;

    let http = client();
    let body = serde_json::json!({
        "model": "gpt-4o-mini", "stream": true, "max_tokens": 100,
        "messages": [{"role": "user", "content": "Tell me a story"}],
    })
    .to_string();
    let mut streams = Vec::new();
    for _ in 0..5 {
        let response = http
            .post(served.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        // The stream is under way before the signal.
        let first = stream.next().await.unwrap().unwrap();
        streams.push((first.to_vec(), stream));
    }

    kill(served.pid(), Signal::SIGTERM).unwrap();

    for (mut seen, mut stream) in streams {
        while let Some(chunk) = stream.next().await {
            seen.extend_from_slice(&chunk.unwrap());
        }
        let text = String::from_utf8(seen).unwrap();
        assert!(
            text.trim_end().ends_with("data: [DONE]"),
            "cut short: {text}"
        );
    }
    assert_eq!(upstream.stats().streams_completed(), 5);
    assert!(served.exited_ok().await, "a drained gateway exits 0");
    upstream.stop().await;
}

#[tokio::test]
async fn json_logs_give_one_line_per_request_with_what_it_used_and_never_a_key() {
    let setup = serve_in_front_of(
        MockConfig::new("sk-mock"),
        "models = [\"gpt-4o-mini\"]\n[log]\nformat = \"json\"",
    )
    .await;
    let Setup {
        upstream, served, ..
    } = setup;
    let body = chat("gpt-4o-mini", "hi", 5);
    let response = send_json(served.url("/v1/chat/completions"), None, body.clone()).await;
    assert_eq!(response.status(), 200);
    let received = response.bytes().await.unwrap().len() as u64;

    let line = served.logged("balancer::access");
    assert!(!line.contains("sk-mock"), "{line}");
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["level"], "INFO");
    assert_eq!(entry["message"], "request");
    assert_eq!(entry["path"], "/v1/chat/completions");
    assert_eq!(entry["node"], "a");
    assert_eq!(entry["model"], "gpt-4o-mini");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["end"], "complete");
    assert_eq!(entry["request_bytes"], body.len() as u64);
    assert_eq!(entry["response_bytes"], received);
    let (prompt, completion) = (
        upstream.stats().prompt_tokens(),
        upstream.stats().completion_tokens(),
    );
    assert_eq!(
        (
            entry["prompt_tokens"].as_u64(),
            entry["completion_tokens"].as_u64()
        ),
        (Some(prompt), Some(completion))
    );
    for timing in ["queue_ms", "upstream_ms", "first_byte_ms", "duration_ms"] {
        assert!(entry[timing].is_u64(), "{timing} in {line}");
    }

    // An answer the gateway gives itself has its line too.
    let unknown = send_json(
        served.url("/v1/chat/completions"),
        None,
        chat("no-such-model", "hi", 5),
    )
    .await;
    assert_eq!(unknown.status(), 404);
    let line = served.logged("balancer::access");
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (entry["status"].as_u64(), entry["code"].as_str()),
        (Some(404), Some("model_not_found"))
    );
    assert_eq!(entry["node"], "");
}

#[tokio::test]
async fn healthcheck_exits_0_while_the_gateway_answers_and_1_when_it_does_not() {
    let setup = serve_in_front_of(MockConfig::new("sk-mock"), "").await;
    let Setup { config, served, .. } = setup;
    let healthz = served.url("/healthz");
    let (code, _, err) = run_with(&config, &["healthcheck", "--url", &healthz]).await;
    assert_eq!(code, 0, "{err}");
    drop(served);
    let (code, _, err) = run_with(&config, &["healthcheck", "--url", &healthz]).await;
    assert_eq!(code, 1);
    assert!(err.starts_with("balancer healthcheck: http://"), "{err}");
}

#[tokio::test]
async fn check_prints_each_azure_deployments_url_and_never_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("Balancer.toml");
    std::fs::write(
        &config,
        "[[nodes]]\nname = \"east\"\napi = \"azure\"\nurl = \"https://contoso-east.openai.azure.com\"\n\
         api_version = \"2024-10-21\"\napi_key = \"az-secret-check-key\"\n\
         deployments = { \"gpt-4o-mini\" = \"mini-east\" }\n\
         [[nodes]]\nname = \"west\"\napi = \"azure\"\nurl = \"https://contoso-west.openai.azure.com\"\n\
         api_key = \"az-secret-check-key\"\ndeployments = { \"gpt-4o-mini\" = \"mini-west\" }\n",
    )
    .unwrap();
    let (code, out, err) = run(&config, "check").await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(
        "# gpt-4o-mini -> https://contoso-east.openai.azure.com/openai/deployments/mini-east/{operation}?api-version=2024-10-21"
    ), "{out}");
    assert!(out.contains(
        "# gpt-4o-mini -> https://contoso-west.openai.azure.com/openai/v1/{operation} (model \"mini-west\")"
    ), "{out}");
    assert!(out.contains("window = \"10s\""), "{out}");
    assert!(!out.contains("az-secret-check-key") && !err.contains("az-secret-check-key"));
}

/// The gateway's own answers outside the proxy (an unknown path, a method
/// a path does not take, the admin API refusing a token) are counted in
/// `/metrics` and logged as access lines, like every other answer.
#[tokio::test]
async fn unknown_paths_methods_and_admin_refusals_are_counted_and_logged() {
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken_env = \"ADMIN_TOKEN\"\n[log]\nformat = \"json\"\n"
    );
    let upstream = MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockConfig::new("sk-mock"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &upstream.base_url(), &extra);
    let served = Served::start(
        &config,
        &[
            ("NODE_KEY", "sk-mock"),
            ("ADMIN_TOKEN", crate::support::ADMIN_TOKEN),
        ],
    );
    let http = client();
    let not_found = http.get(served.url("/nowhere")).send().await.unwrap();
    assert_eq!(not_found.status(), 404);
    let not_allowed = http.post(served.url("/healthz")).send().await.unwrap();
    assert_eq!(not_allowed.status(), 405);
    let admin = format!("http://127.0.0.1:{admin_port}/admin/clients");
    let refused = crate::support::eventually(Duration::from_secs(10), async || {
        http.get(&admin)
            .bearer_auth("not-the-token")
            .send()
            .await
            .ok()
    })
    .await
    .unwrap();
    assert_eq!(refused.status(), 401);

    let mut logged = Vec::new();
    for _ in 0..3 {
        let line = served.logged("balancer::access");
        let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
        logged.push((
            entry["status"].as_u64().unwrap(),
            entry["code"].as_str().unwrap_or("").to_owned(),
            entry["path"].as_str().unwrap_or("").to_owned(),
        ));
    }
    logged.sort();
    assert_eq!(
        logged,
        [
            (
                401,
                "invalid_admin_token".to_owned(),
                "/admin/clients".to_owned()
            ),
            (404, "unknown_url".to_owned(), "/nowhere".to_owned()),
            (405, "method_not_allowed".to_owned(), "/healthz".to_owned()),
        ]
    );
    let scrape = http.get(served.url("/metrics")).send().await.unwrap();
    let scrape = scrape.text().await.unwrap();
    for code in ["401", "404", "405"] {
        let sample = format!("balancer_requests_total{{node=\"\",model=\"\",code=\"{code}\"}} 1");
        assert!(scrape.contains(&sample), "{code}: {scrape}");
    }
}
