//! An https upstream with a private CA, trusted through the node's `ca_file`.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::support::{FAST, Gateway, chat, client, node, post, private_ca};

/// Serves one canned JSON answer per TLS connection and reports what it got.
async fn tls_upstream(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> (u16, tokio::sync::mpsc::Receiver<String>) {
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (seen, received) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && tls.read(&mut byte).await.unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_string();
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            let mut body = vec![0u8; length];
            tls.read_exact(&mut body).await.unwrap();
            let answer = r#"{"id":"tls","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
            tls.write_all(response.as_bytes()).await.unwrap();
            tls.shutdown().await.ok();
            let _ = seen.send(head).await;
        }
    });
    (port, received)
}

#[tokio::test]
async fn an_https_upstream_with_a_private_ca_is_trusted_through_ca_file() {
    let ca = private_ca();
    let (ca_pem, cert, key) = (
        ca.ca_pem,
        CertificateDer::from(ca.cert_der),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ca.key_der)),
    );
    let dir = std::env::temp_dir().join(format!("balancer-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let (port, mut received) = tls_upstream(cert, key).await;
    let url = format!("https://localhost:{port}/v1");

    let trusted = Gateway::start(&format!(
        "{FAST}{}",
        node(
            "tls",
            &url,
            "sk-tls",
            &format!("ca_file = \"{}\"", ca_file.display())
        )
    ))
    .await;
    let response = post(
        &client(),
        &trusted,
        "/v1/chat/completions",
        chat("gpt-4", "hi", 5),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().contains("\"tls\""));
    let head = received.recv().await.unwrap();
    assert!(
        head.starts_with("POST /v1/chat/completions HTTP/1.1"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("authorization: bearer sk-tls"),
        "{head}"
    );

    // Without the CA the certificate is refused, so no answer came back.
    let untrusted = Gateway::start(&format!(
        "[retry]\nattempts = 0\n{FAST}{}",
        node("tls", &url, "sk-tls", "")
    ))
    .await;
    let response = post(
        &client(),
        &untrusted,
        "/v1/chat/completions",
        chat("gpt-4", "hi", 5),
    )
    .await;
    assert_eq!(response.status(), 502);
    std::fs::remove_dir_all(dir).ok();
}
