//! The stored-object tests' kit: a pool of three mocks behind a gateway
//! with two clients, requests through it, multipart forms.

use mock_upstreams::{MockConfig, MockUpstream};
use serde_json::Value;

use crate::support::{Gateway, client, node};

pub(crate) const OTHER_KEY: &str = "sk-objects-other-client";

/// Three mocks (node `a` alone serves `whisper-1`), behind a gateway
/// where `CLIENT_KEY` and a client `other` hold keys.
pub(crate) struct Pool {
    pub(crate) mocks: Vec<MockUpstream>,
    pub(crate) gw: Gateway,
    pub(crate) toml: String,
}

pub(crate) fn pool_toml(mocks: &[MockUpstream], only: &[usize]) -> String {
    let mut toml = "[auth]\nclient_keys_env = [\"TEST_CLIENT_KEY\"]\n[[clients]]\nname = \"other\"\nkey_env = \"OTHER\"\n".to_owned();
    for (i, mock) in mocks.iter().enumerate().filter(|(i, _)| only.contains(i)) {
        let name = ["a", "b", "c"][i];
        let models = if i == 0 {
            "models = [\"gpt-4o-mini\", \"whisper-1\"]"
        } else {
            "models = [\"gpt-4o-mini\"]"
        };
        toml.push_str(&node(
            name,
            &mock.base_url(),
            &format!("sk-mock-{name}"),
            models,
        ));
    }
    toml
}

impl Pool {
    pub(crate) async fn start() -> Self {
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
        let toml = pool_toml(&mocks, &[0, 1, 2]);
        let gw = Gateway::start_file_text(&toml, &[("OTHER", OTHER_KEY)]).await;
        Self { mocks, gw, toml }
    }

    /// Requests every mock has seen.
    pub(crate) fn upstream_requests(&self) -> u64 {
        self.mocks.iter().map(|m| m.stats().report().requests).sum()
    }

    /// Requests through this pool's gateway.
    pub(crate) fn at(&self) -> At<'_> {
        At(&self.gw)
    }
}

/// Requests through one gateway.
pub(crate) struct At<'g>(pub(crate) &'g Gateway);

impl At<'_> {
    pub(crate) async fn send(
        &self,
        key: &str,
        method: &str,
        path: &str,
        body: Option<(String, Vec<u8>)>,
    ) -> (u16, String, Value) {
        let mut request = client()
            .request(method.parse().unwrap(), self.0.url(path))
            .header("authorization", format!("Bearer {key}"));
        if let Some((content_type, body)) = body {
            request = request.header("content-type", content_type).body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let node = response
            .headers()
            .get("x-balancer-node")
            .map_or_else(String::new, |v| v.to_str().unwrap().to_owned());
        let bytes = response.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, node, body)
    }

    pub(crate) async fn post_json(
        &self,
        key: &str,
        path: &str,
        body: Value,
    ) -> (u16, String, Value) {
        self.send(
            key,
            "POST",
            path,
            Some(("application/json".to_owned(), body.to_string().into_bytes())),
        )
        .await
    }

    /// Uploads a file; its id and the node that holds it.
    pub(crate) async fn upload(&self, key: &str, name: &str, content: &str) -> (String, String) {
        let body = form(&[
            ("purpose", None, b"batch"),
            ("file", Some(name), content.as_bytes()),
        ]);
        let (status, node, file) = self.send(key, "POST", "/v1/files", Some(body)).await;
        assert_eq!(status, 200, "{file}");
        (file["id"].as_str().unwrap().to_owned(), node)
    }
}

/// A multipart form: (name, filename, value) per field.
pub(crate) fn form(fields: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let mut body = Vec::new();
    for (name, filename, value) in fields {
        body.extend_from_slice(b"--bOuNdArY\r\n");
        let disposition = match filename {
            Some(file) => format!(
                "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ),
            None => format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n"),
        };
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--bOuNdArY--\r\n");
    ("multipart/form-data; boundary=bOuNdArY".to_owned(), body)
}

pub(crate) const BATCH_INPUT: &str = "{\"custom_id\":\"r1\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}}\n";
