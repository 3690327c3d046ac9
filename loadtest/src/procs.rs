//! The mocks and the gateway run as child processes of the load test (this
//! same binary, re-run with a hidden subcommand), so each one's CPU time and
//! memory are its own and the load generator's cost is never counted
//! against the gateway.
//!
//! A child prints one `… listening on <address>` line per server once it
//! listens, and stops gracefully when its stdin closes: [`Child::stop`]
//! closes it, and so does the load test's own exit, whatever the path, so a
//! child never outlives the run. A child still running when its handle is
//! dropped is killed (by its own handle, never by a looked-up PID).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{ChildStdin, Command};

/// How long a child may take to start listening, and to stop.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

pub(crate) struct Child {
    name: &'static str,
    process: tokio::process::Child,
    stdin: Option<ChildStdin>,
    pid: u32,
}

impl Child {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Re-runs this binary with `args` and waits until it has printed
    /// `listeners` lines ending in `listening on <address>`; returns the
    /// addresses.
    pub(crate) async fn spawn(
        name: &'static str,
        args: &[String],
        env: &[(&str, &str)],
        listeners: usize,
    ) -> anyhow::Result<(Self, Vec<String>)> {
        let exe = std::env::current_exe().context("finding the loadtest binary")?;
        let mut command = Command::new(exe);
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut process = command
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        let pid = process.id().context("child has no pid")?;
        let stdout = process.stdout.take().context("child stdout")?;
        let stdin = process.stdin.take();
        let mut lines = BufReader::new(stdout).lines();
        let mut addresses = Vec::with_capacity(listeners);
        let read = async {
            while addresses.len() < listeners {
                let Some(line) = lines.next_line().await? else {
                    bail!("the {name} exited before listening");
                };
                if let Some((_, addr)) = line.split_once("listening on ") {
                    addresses.push(addr.trim().to_owned());
                }
            }
            Ok(())
        };
        tokio::time::timeout(START_TIMEOUT, read)
            .await
            .with_context(|| format!("the {name} did not listen within {START_TIMEOUT:?}"))??;
        // Keep draining its stdout so it never blocks on a full pipe.
        #[expect(
            clippy::disallowed_methods,
            reason = "drains a child's output; ends when the child (killed on drop) closes it"
        )]
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((
            Self {
                name,
                process,
                stdin,
                pid,
            },
            addresses,
        ))
    }

    /// CPU time used by all of the child's threads so far.
    pub(crate) fn cpu_time(&self) -> Duration {
        cpu_time_of(self.pid)
    }

    /// Peak resident memory (`VmHWM`) and current (`VmRSS`), in bytes.
    pub(crate) fn memory(&self) -> (u64, u64) {
        memory_of(self.pid)
    }

    /// Closes the child's stdin (its stop signal) and waits for it to exit.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        match tokio::time::timeout(STOP_TIMEOUT, self.process.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("the {} exited with {status}", self.name);
                }
                Ok(())
            }
            Err(_) => {
                self.process.kill().await?;
                bail!("the {} did not stop within {STOP_TIMEOUT:?}", self.name)
            }
        }
    }
}

/// CPU time used by all of process `pid`'s threads so far (from
/// `/proc/<pid>/task/*/schedstat`, nanosecond resolution).
pub(crate) fn cpu_time_of(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// Process `pid`'s peak resident memory (`VmHWM`) and current (`VmRSS`),
/// in bytes.
pub(crate) fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Resolves when this process's stdin closes: a child's stop signal.
pub(crate) async fn stdin_closed() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Raises this process's open-file limit as far as it may go: thousands of
/// streams need a socket each on the client, and two on the gateway. The
/// children inherit it.
pub(crate) fn raise_open_files() -> u64 {
    const WANT: u64 = 65_536;
    if rlimit::setrlimit(rlimit::Resource::NOFILE, WANT, WANT).is_ok() {
        return WANT;
    }
    rlimit::increase_nofile_limit(WANT).unwrap_or(0)
}

/// The `gateway` child: runs exactly what `balancer serve` runs (pid file,
/// reload on file change and SIGHUP) until stdin closes.
pub(crate) async fn run_gateway(config: &Path) -> anyhow::Result<()> {
    let listening = |addr, _nodes, _pid_file: &Path| println!("gateway listening on {addr}");
    balancer::server::run(config, stdin_closed(), listening)
        .await
        .map_err(|e| anyhow::anyhow!("gateway: {e}"))
}
