//! The official OpenAI SDKs against the gateway: the Python `openai`
//! package (tests/sdk/python) and the npm `openai` package (tests/sdk/node)
//! each run their own test suite against a gateway in front of
//! mock-upstreams: chat, streaming with and without usage, embeddings, the
//! models list, the Responses API (plain and streamed, the node's tokens in
//! `/status` checked after each), and each SDK's own error class for our
//! 401, 404, 400 and 429 bodies, with the 429's `Retry-After` honoured.
//! The Python SDK's `AzureOpenAI` client runs its own suite against an
//! Azure deployment and an OpenAI-style node.
//!
//! Needs `pip install -r tests/sdk/python/requirements.txt` and
//! `npm ci --prefix tests/sdk/node` (CI does both).

use std::path::{Path, PathBuf};
use std::time::Duration;

use mock_upstreams::{MockConfig, MockUpstream};

use crate::metrics::Metrics;
use crate::support::{CLIENT_KEY, Gateway, node};

const LIMITED_KEY: &str = "sk-limited-sdk-key";

fn sdk_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(name)
}

/// A gateway in front of one mock serving both models; `CLIENT_KEY` has no
/// limits, `LIMITED_KEY` a bucket of 1 refilled every 2 s.
async fn gateway(upstream: &MockUpstream) -> Gateway {
    let toml = format!(
        "[queue]\nmax_wait = \"2s\"\n[auth]\nclient_keys_env = [\"TEST_CLIENT_KEY\"]\n\
         [[clients]]\nname = \"limited\"\nkey_env = \"LIMITED\"\nburst = 1\nrate_per_second = 0.5\n{}",
        node(
            "n",
            &upstream.base_url(),
            "sk-mock",
            "models = [\"gpt-4o-mini\", \"text-embedding-3-small\"]\ntpm = 1000000",
        )
    );
    Gateway::start_file_text(
        &toml,
        &[("TEST_CLIENT_KEY", CLIENT_KEY), ("LIMITED", LIMITED_KEY)],
    )
    .await
}

/// Runs an SDK's suite against `gw`; fails with its output unless it passes.
async fn run_suite(gw: &Gateway, dir: &Path, program: &str, args: &[&str]) {
    run_suite_with(gw, dir, program, args, &[]).await;
}

async fn run_suite_with(
    gw: &Gateway,
    dir: &Path,
    program: &str,
    args: &[&str],
    env: &[(&str, String)],
) {
    let embedding: Vec<f64> = mock_upstreams::EMBEDDING
        .iter()
        .map(|f| f64::from(*f))
        .collect();
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir(dir)
        .env("BALANCER_BASE_URL", gw.url("/v1"))
        .env("BALANCER_KEY", CLIENT_KEY)
        .env("BALANCER_LIMITED_KEY", LIMITED_KEY)
        .env(
            "BALANCER_EMBEDDING",
            serde_json::to_string(&embedding).unwrap(),
        )
        // Loopback only, whatever the machine's proxy settings.
        .env("NO_PROXY", "127.0.0.1")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("AZURE_OPENAI_API_KEY")
        .env_remove("AZURE_OPENAI_ENDPOINT")
        .env_remove("OPENAI_API_VERSION")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within 120 s"))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    println!("{stdout}{stderr}");
}

/// Every token the SDK's requests used upstream was counted by the gateway.
async fn tokens_match(gw: &Gateway, upstream: &MockUpstream) {
    gw.settled_status().await;
    let m = Metrics::scrape(gw).await;
    let counted: f64 = ["gpt-4o-mini", "text-embedding-3-small"]
        .iter()
        .flat_map(|model| ["prompt", "completion"].map(|kind| (*model, kind)))
        .map(|(model, kind)| {
            m.value(
                "balancer_tokens_total",
                &[("node", "n"), ("model", model), ("kind", kind)],
            )
        })
        .sum();
    let stats = upstream.stats();
    assert_eq!(
        counted,
        (stats.prompt_tokens() + stats.completion_tokens()) as f64
    );
}

async fn mock() -> MockUpstream {
    MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockConfig::new("sk-mock"))
        .await
        .unwrap()
}

/// The Python that has the `openai` package.
fn python() -> String {
    let python = std::env::var("BALANCER_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let check = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output();
    assert!(
        check.is_ok_and(|o| o.status.success()),
        "{python} cannot import openai: pip install -r tests/sdk/python/requirements.txt"
    );
    python
}

#[tokio::test]
async fn the_official_python_sdk_works_against_the_gateway() {
    let dir = sdk_dir("python");
    let python = python();
    let upstream = mock().await;
    let gw = gateway(&upstream).await;
    run_suite(&gw, &dir, &python, &["test_openai_sdk.py"]).await;
    tokens_match(&gw, &upstream).await;
    upstream.stop().await;
}

#[tokio::test]
async fn the_official_node_sdk_works_against_the_gateway() {
    let dir = sdk_dir("node");
    assert!(
        dir.join("node_modules/openai/package.json").is_file(),
        "the openai npm package is not installed: npm ci --prefix tests/sdk/node"
    );
    let upstream = mock().await;
    let gw = gateway(&upstream).await;
    run_suite(&gw, &dir, "node", &["--test", "--test-concurrency=1"]).await;
    tokens_match(&gw, &upstream).await;
    upstream.stop().await;
}

/// An app written for Azure OpenAI (`AzureOpenAI(azure_endpoint=...)`)
/// points at the gateway unchanged, whether an Azure deployment or an
/// OpenAI-style node serves it.
#[tokio::test]
async fn the_python_azure_client_works_against_azure_and_openai_nodes() {
    let python = python();
    let azure = MockUpstream::start(
        "127.0.0.1:0".parse().unwrap(),
        MockConfig::new("az-key")
            .azure()
            .models(&["chat-east", "embed-east"]),
    )
    .await
    .unwrap();
    let openai = mock().await;
    let nodes = [
        node(
            "az",
            &format!("http://{}", azure.addr()),
            "az-key",
            "api = \"azure\"\napi_version = \"2024-10-21\"\ntpm = 1000000\n\
             deployments = { \"gpt-4o-mini\" = \"chat-east\", \"text-embedding-3-small\" = \"embed-east\" }",
        ),
        node(
            "oa",
            &openai.base_url(),
            "sk-mock",
            "models = [\"gpt-4o-mini\", \"text-embedding-3-small\"]\ntpm = 1000000",
        ),
    ];
    let embedding: Vec<f64> = mock_upstreams::EMBEDDING
        .iter()
        .map(|f| f64::from(*f))
        .collect();
    for (node, upstream) in nodes.iter().zip([&azure, &openai]) {
        let toml = format!("[auth]\nclient_keys_env = [\"TEST_CLIENT_KEY\"]\n{node}");
        let gw = Gateway::start_file_text(&toml, &[("TEST_CLIENT_KEY", CLIENT_KEY)]).await;
        let env = [
            ("BALANCER_ENDPOINT", gw.url("")),
            (
                "BALANCER_EMBEDDING",
                serde_json::to_string(&embedding).unwrap(),
            ),
        ];
        run_suite_with(
            &gw,
            &sdk_dir("python"),
            &python,
            &["test_azure_sdk.py"],
            &env,
        )
        .await;
        let stats = upstream.stats().report();
        assert_eq!((stats.served, stats.unauthorized), (3, 0));
    }
}

/// Stored objects with the Python SDK over three nodes and two replicas
/// sharing PostgreSQL (tests/sdk/python/test_objects_sdk.py).
#[tokio::test]
async fn the_python_sdk_keeps_stored_objects_on_their_nodes() {
    let python = python();
    let mut mocks = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let models: &[&str] = if i == 0 {
            &["gpt-4o-mini", "whisper-1"]
        } else {
            &["gpt-4o-mini"]
        };
        let config = MockConfig::new(format!("sk-mock-{name}")).models(models);
        mocks.push(
            MockUpstream::start("127.0.0.1:0".parse().unwrap(), config)
                .await
                .unwrap(),
        );
    }
    let nodes: String = mocks
        .iter()
        .zip(["a", "b", "c"])
        .map(|(mock, name)| {
            let models = if name == "a" {
                "models = [\"gpt-4o-mini\", \"whisper-1\"]"
            } else {
                "models = [\"gpt-4o-mini\"]"
            };
            node(name, &mock.base_url(), &format!("sk-mock-{name}"), models)
        })
        .collect();
    let other_key = "sk-objects-sdk-other";
    let toml = format!(
        "[store]\nurl = \"{}\"\n[health]\ninterval = \"200ms\"\nunhealthy_after = 1\n\
         [auth]\nclient_keys_env = [\"TEST_CLIENT_KEY\"]\n\
         [[clients]]\nname = \"other\"\nkey_env = \"OTHER\"\n{nodes}",
        crate::pg::fresh_database().await
    );
    let env = [("TEST_CLIENT_KEY", CLIENT_KEY), ("OTHER", other_key)];
    let first = Gateway::start_file_text(&toml, &env).await;
    let second = Gateway::start_file_text(&toml, &env).await;
    // A file stored on node `c`, which then goes out of rotation.
    let on_c = crate::support::eventually(Duration::from_secs(10), async || {
        let (content_type, body) = upload_form();
        let response = crate::support::client()
            .post(first.url("/v1/files"))
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let node = response.headers()["x-balancer-node"]
            .to_str()
            .unwrap()
            .to_owned();
        let file: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        (node == "c").then(|| file["id"].as_str().unwrap().to_owned())
    })
    .await
    .expect("a file on node c");
    mocks.pop().unwrap().stop().await;
    for gw in [&first, &second] {
        gw.until(|s| crate::support::node_status(s, "c")["healthy"] == false)
            .await;
    }
    let env = [
        ("BALANCER_REPLICA_URL", second.url("/v1")),
        ("BALANCER_OTHER_KEY", other_key.to_owned()),
        ("BALANCER_UNAVAILABLE_FILE", on_c),
    ];
    run_suite_with(
        &first,
        &sdk_dir("python"),
        &python,
        &["test_objects_sdk.py"],
        &env,
    )
    .await;
    let served: Vec<u64> = mocks.iter().map(|m| m.stats().report().served).collect();
    assert!(
        served.iter().all(|n| *n > 0),
        "both remaining nodes served: {served:?}"
    );
}

/// A one-file multipart upload body.
fn upload_form() -> (String, Vec<u8>) {
    let body = "--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
        --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.jsonl\"\r\n\
        Content-Type: application/octet-stream\r\n\r\n{}\r\n--XyZ--\r\n";
    (
        "multipart/form-data; boundary=XyZ".to_owned(),
        body.as_bytes().to_vec(),
    )
}
