//! The `balancer` binary: args → config → validate → tracing → state →
//! serve → shutdown.

use std::path::PathBuf;
use std::process::ExitCode;

use balancer::config::{self, CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH};
use balancer::{demo, server, state::AppState};
use clap::{Parser, Subcommand};

/// An OpenAI-compatible gateway that spreads load over keyed upstream nodes
/// without exceeding their quotas.
#[derive(Debug, Parser)]
#[command(name = "balancer", version)]
struct Cli {
    /// The config file.
    #[arg(long, global = true, env = CONFIG_PATH_ENV, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Validate the config and print it resolved, every key redacted.
    Check,
    /// Start three mock upstreams in-process and the gateway in front of them.
    Demo,
}

/// Exit status for a configuration the gateway refuses.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Check => check(&cli.config),
        Command::Serve => runtime.block_on(serve(&cli.config)),
        Command::Demo => runtime.block_on(async {
            match demo::run(&cli.config).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(demo::DemoError::Config(err)) => config_failure(&cli.config, &err),
                Err(err) => {
                    eprintln!("balancer demo: {err}");
                    ExitCode::FAILURE
                }
            }
        }),
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

fn config_failure(path: &std::path::Path, err: &config::ConfigError) -> ExitCode {
    eprintln!("balancer: invalid config {}:", path.display());
    for problem in &err.problems {
        eprintln!("  {problem}");
    }
    ExitCode::from(EXIT_CONFIG)
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load(path) {
        Ok((config, warnings)) => {
            for warning in &warnings.0 {
                eprintln!("warning: {warning}");
            }
            println!("# {} is valid\n", path.display());
            print!("{}", config.render());
            ExitCode::SUCCESS
        }
        Err(err) => config_failure(path, &err),
    }
}

async fn serve(path: &std::path::Path) -> ExitCode {
    let (config, warnings) = match config::load(path) {
        Ok(loaded) => loaded,
        Err(err) => return config_failure(path, &err),
    };
    for warning in &warnings.0 {
        tracing::warn!("{warning}");
    }
    if config.client_keys.is_empty() {
        tracing::warn!(
            "no client keys configured (auth.client_keys_env): the gateway is open to anyone who can reach it"
        );
    }
    let listen = config.server.listen;
    let listener = match server::bind(listen) {
        Ok(l) => l,
        Err(err) => {
            eprintln!("balancer: cannot listen on {listen}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let nodes = config.nodes.len();
    let state = match AppState::new(config) {
        Ok(state) => state,
        Err(err) => {
            eprintln!("balancer: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing::info!(%listen, nodes, "balancer listening");
    match server::serve(listener, state, server::shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("balancer: {err}");
            ExitCode::FAILURE
        }
    }
}
