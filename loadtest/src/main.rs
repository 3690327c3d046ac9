//! `cargo run -p loadtest --release -- <scenario>`: self-contained load
//! tests for balancer, driven by goose.
//!
//! Each scenario starts the mock upstreams and the gateway as child
//! processes ([`procs`]), runs its load straight at a mock and through the
//! gateway in the same run, prints a summary (requests/s; average, p50,
//! p95, p99; status codes; the per-node split from the mocks' `/_stats`),
//! writes goose's HTML reports to `--report-dir`, stops its children, and
//! exits 0 only if the scenario held (no failed request, no upstream 429,
//! every stream complete and byte-identical…). `--smoke` shrinks a scenario
//! to seconds for CI.
//!
//! Scenarios: `throughput`, `reload`, `saturation`, `streaming`, `soak`,
//! `fairness`, `client-latency`.

mod bodies;
mod client_latency;
mod drive;
mod fairness;
mod harness;
mod nginx;
mod paced;
mod procs;
mod reload;
mod saturation;
mod soak;
mod streaming;
mod throughput;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "loadtest")]
struct Cli {
    /// Where goose's HTML reports and the generated gateway configs go.
    #[arg(long, global = true, default_value = "target/loadtest")]
    report_dir: PathBuf,
    /// A run of seconds, not minutes: what CI runs.
    #[arg(long, global = true)]
    smoke: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Requests/s, latency and CPU per request, gateway against direct.
    Throughput(throughput::ThroughputArgs),
    /// A node removed by a config reload, then an invalid config rejected,
    /// under 50 clients: no request may fail.
    Reload(reload::ReloadArgs),
    /// Nodes at 100, 150 and 200 rpm under 20,000 requests at 1,000
    /// connections: served, queued, refused, and upstream 429s (must be 0).
    Saturation(saturation::SaturationArgs),
    /// Concurrent streams with spaced events: completion, byte identity,
    /// time to first event, gateway memory.
    Streaming(streaming::StreamingArgs),
    /// Ten minutes of mixed traffic with upstream faults, client aborts and
    /// a reload every minute: nothing lost, nothing left reserved.
    Soak(soak::SoakArgs),
    /// Clients sharing a saturated pool: one floods, one keeps a steady
    /// stream (weights 1:1, then 3:1), then a high client among low ones:
    /// shares of served tokens and queue waits.
    Fairness(fairness::FairnessArgs),
    /// One upstream round trip at a low rate through reqwest, hyper-util's
    /// pooled client and a hyper connection in the requesting task.
    ClientLatency(client_latency::ClientLatencyArgs),
    /// (internal) the gateway child process.
    #[command(hide = true)]
    Gateway {
        #[arg(long)]
        config: PathBuf,
    },
    /// (internal) the mock upstreams child process.
    #[command(hide = true)]
    Mocks(mock_upstreams::cli::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("loadtest: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    // Children (and goose's users) end with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("loadtest: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command `cli` names, to its end: whether it passed.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Gateway { config } => {
            init_child_tracing();
            procs::run_gateway(&config).await.map(|()| true)
        }
        Command::Mocks(args) => {
            let code = mock_upstreams::cli::run_until(args, procs::stdin_closed()).await;
            Ok(code == ExitCode::SUCCESS)
        }
        Command::Throughput(mut args) => {
            prepare();
            if cli.smoke {
                args.requests = 200;
                args.concurrency = 10;
                args.duration = None;
                args.rate = 50;
                args.rate_time = Duration::from_secs(1);
            }
            throughput::run(&args, &cli.report_dir).await
        }
        Command::Saturation(mut args) => {
            prepare();
            if cli.smoke {
                args.smoke();
            }
            saturation::run(&args, &cli.report_dir).await
        }
        Command::Streaming(mut args) => {
            prepare();
            if cli.smoke {
                args.smoke();
            }
            streaming::run(&args, &cli.report_dir).await
        }
        Command::Soak(mut args) => {
            prepare();
            if cli.smoke {
                args.smoke();
            }
            soak::run(&args, &cli.report_dir).await
        }
        Command::ClientLatency(mut args) => {
            if cli.smoke {
                args.smoke();
            }
            client_latency::run(&args).await
        }
        Command::Fairness(mut args) => {
            prepare();
            if cli.smoke {
                args.smoke();
            }
            fairness::run(&args, &cli.report_dir).await
        }
        Command::Reload(mut args) => {
            prepare();
            if cli.smoke {
                args.smoke();
            }
            reload::run(&args, &cli.report_dir).await
        }
    }
}

fn prepare() {
    let files = procs::raise_open_files();
    if files < 4096 {
        eprintln!("loadtest: only {files} open files allowed; large runs may fail to connect");
    }
}

fn init_child_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
