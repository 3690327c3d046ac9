//! `mock-upstreams --nodes 3 --base-port 9001 [--key-prefix sk-mock-]`:
//! runs N mocks on consecutive ports until Ctrl-C. Mock i's key is
//! `<key-prefix><i>` (a, b, c… for i = 0, 1, 2…).

use std::net::SocketAddr;

use mock_upstreams::{MockConfig, MockUpstream};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let nodes: u16 = arg(&args, "--nodes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let base: u16 = arg(&args, "--base-port")
        .and_then(|v| v.parse().ok())
        .unwrap_or(9001);
    let prefix = arg(&args, "--key-prefix").unwrap_or_else(|| "sk-mock-".to_owned());
    let mut running = Vec::new();
    for i in 0..nodes {
        let key = format!("{prefix}{}", char::from(b'a' + (i % 26) as u8));
        let addr = SocketAddr::from(([127, 0, 0, 1], base + i));
        match MockUpstream::start(addr, MockConfig::new(key)).await {
            Ok(mock) => {
                println!("mock {i} listening on {}", mock.base_url());
                running.push(mock);
            }
            Err(err) => {
                eprintln!("cannot listen on {addr}: {err}");
                return std::process::ExitCode::from(1);
            }
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    for mock in running {
        mock.stop().await;
    }
    std::process::ExitCode::SUCCESS
}
