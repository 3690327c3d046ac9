//! The `balancer` binary: args → config → validate → tracing → state →
//! serve → shutdown.

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use balancer::config::{self, CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH, LogFormat};
use balancer::control::{self, ControlError};
#[cfg(feature = "demo")]
use balancer::demo;
use balancer::server::{self, RunError};
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
    /// Make the running gateway re-read its config (and key files); prints
    /// what changed, or why the new config was rejected.
    Reload,
    /// Stop the running gateway gracefully and wait for it to exit.
    Stop {
        /// Give up waiting after this long (the gateway drains for up to
        /// `server.shutdown_grace`).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Exit 0 if the gateway's /healthz answers within 3 s, else 1 (for
    /// container health checks).
    Healthcheck {
        /// The URL to ask; by default /healthz on the config's server.listen.
        #[arg(long)]
        url: Option<String>,
    },
}

/// Exit status for a configuration the gateway refuses.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(config::configured_log_format(&cli.config));
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
        Command::Reload => match control::reload(&pid_file(&cli.config)) {
            Ok(summary) => {
                println!("balancer: config reloaded ({summary})");
                ExitCode::SUCCESS
            }
            Err(err @ ControlError::Rejected { .. }) => {
                eprintln!("balancer reload: {err}");
                ExitCode::from(EXIT_CONFIG)
            }
            Err(err) => {
                eprintln!("balancer reload: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Stop { timeout } => match control::stop(&pid_file(&cli.config), timeout) {
            Ok(pid) => {
                println!("balancer: gateway (pid {pid}) stopped");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("balancer stop: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Healthcheck { url } => {
            let url =
                url.unwrap_or_else(|| control::healthz_url(config::configured_listen(&cli.config)));
            match runtime.block_on(control::healthcheck(&url)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("balancer healthcheck: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        #[cfg(not(feature = "demo"))]
        Command::Demo => {
            eprintln!(
                "balancer demo: this build has no demo (built without the `demo` feature, as production images are); run `cargo run --release -- demo`"
            );
            ExitCode::FAILURE
        }
        #[cfg(feature = "demo")]
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

/// The pid file for the config at `path`, as `serve` would choose it.
fn pid_file(path: &std::path::Path) -> std::path::PathBuf {
    config::pid_file_for(path, config::configured_pid_file(path).as_deref())
}

/// Logs to stdout at the level `RUST_LOG` sets (info by default), as text
/// or one JSON object per line (`log.format`).
fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stdout().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
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
    let listening = |addr, nodes, pid_file: &std::path::Path| {
        tracing::info!(listen = %addr, nodes, pid_file = %pid_file.display(), "balancer listening");
    };
    match server::run(path, server::shutdown_signal(), listening).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(RunError::Config(err)) => config_failure(path, &err),
        Err(RunError::Start(err)) => {
            eprintln!("balancer: {err}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(err) => {
            eprintln!("balancer: {err}");
            ExitCode::FAILURE
        }
    }
}
