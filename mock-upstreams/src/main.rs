//! `mock-upstreams --nodes 3 --base-port 9001 [--rpm 100,150,200] …`: runs
//! N mocks until Ctrl-C or SIGTERM. See [`mock_upstreams::cli`].

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    mock_upstreams::cli::run(mock_upstreams::cli::Args::parse()).await
}
