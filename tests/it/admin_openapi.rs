//! The admin API's published document, against the router.

use reqwest::Method;
use serde_json::json;

use crate::admin_support::{Backend, TestStore, admin, code, gateway, mock};

/// The published document and the router agree: every path and method in
/// `docs/openapi.yaml` is served (a made-up client id gets
/// `client_not_found`, never `unknown_url` or 405).
#[tokio::test]
async fn every_operation_in_the_openapi_document_is_served() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml")).unwrap();
    let store = TestStore::new(Backend::Sqlite).await;
    let upstream = mock().await;
    let gw = gateway(&store, &upstream, "").await;
    let mut operations = 0;
    let mut path: Option<String> = None;
    for line in doc.lines() {
        if let Some(p) = line.strip_prefix("  /").and_then(|p| p.strip_suffix(':')) {
            path = Some(format!("/{p}").replace("{id}", "cl_made_up"));
            continue;
        }
        if !line.starts_with("    ") || line.starts_with("     ") {
            continue;
        }
        let Some(method) = ["get", "post", "patch", "delete"]
            .into_iter()
            .find(|m| line.trim_end() == format!("    {m}:"))
        else {
            continue;
        };
        let path = path.as_deref().unwrap();
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let body = matches!(method, Method::POST | Method::PATCH).then(|| json!({}));
        let answer = admin(&gw, method.clone(), path, body).await;
        let (status, code) = code(&answer);
        assert!(
            status != 405 && code != "unknown_url",
            "{method} {path}: {status} {code}"
        );
        operations += 1;
    }
    assert_eq!(operations, 10, "operations found in the document");
    upstream.stop().await;
}
