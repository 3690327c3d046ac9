//! Controlling a running gateway from the command line: the pid file that
//! `serve` writes, and the `reload` and `stop` commands that use it.
//!
//! - `serve` writes its pid to the pid file at start and removes it at exit
//!   ([`PidFile`]); a pid file naming a live process stops a second gateway
//!   from starting with the same file.
//! - `balancer reload` sends SIGHUP and waits (bounded) for the gateway to
//!   write the outcome of that reload, then prints it: what changed, or the
//!   validation problems, which left the running config in force.
//! - `balancer stop` sends SIGTERM and waits for the process to exit; the
//!   gateway drains requests in flight (streams included) for up to
//!   `server.shutdown_grace` first.
//! - `balancer healthcheck` asks the gateway's `/healthz` (a container's
//!   health check: the runtime image has no shell and no curl).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::reload::outcome_file_for;

/// How long `balancer reload` waits for the gateway's answer: a reload
/// reads a few small files and builds HTTP clients.
const RELOAD_ANSWER_WAIT: Duration = Duration::from_secs(10);
/// How often the commands look again at the outcome file or the process.
const POLL: Duration = Duration::from_millis(20);

/// Why a command could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no running gateway: cannot read pid file {path}: {why}")]
    NoPidFile {
        path: PathBuf,
        why: std::io::ErrorKind,
    },
    #[error("pid file {path} does not hold a process id")]
    BadPidFile { path: PathBuf },
    #[error("no running gateway: process {pid} from {path} is gone (stale pid file)")]
    NotRunning { pid: i32, path: PathBuf },
    #[error("another gateway (pid {pid}) is running with pid file {path}")]
    AlreadyRunning { pid: i32, path: PathBuf },
    #[error("cannot signal process {pid}: {errno}")]
    Signal { pid: i32, errno: Errno },
    #[error("the gateway (pid {pid}) did not answer the reload within {} s", RELOAD_ANSWER_WAIT.as_secs())]
    NoAnswer { pid: i32 },
    #[error(
        "the gateway (pid {pid}) rejected the new config; the running config stays:\n{problems}"
    )]
    Rejected { pid: i32, problems: String },
    #[error("the gateway (pid {pid}) is still running after {} s", .waited.as_secs())]
    StillRunning { pid: i32, waited: Duration },
    #[error("cannot write pid file {path}: {why}")]
    Write { path: PathBuf, why: std::io::Error },
}

/// How long `balancer healthcheck` waits for `/healthz`.
const HEALTHCHECK_WAIT: Duration = Duration::from_secs(3);

/// The `/healthz` URL of a gateway listening on `listen`: an unspecified
/// address (`0.0.0.0`, `::`) is reached on loopback.
pub fn healthz_url(listen: std::net::SocketAddr) -> String {
    let host = match listen.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        std::net::IpAddr::V4(ip) => ip.to_string(),
    };
    format!("http://{host}:{}/healthz", listen.port())
}

/// Whether `url` answers 200 within 3 s; the error says why not.
pub async fn healthcheck(url: &str) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(HEALTHCHECK_WAIT)
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("{url} answered {}", response.status()))
    }
}

/// The pid file of a running `serve`; removed when dropped (if it still
/// holds this process's pid).
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes this process's pid to `path`, unless a live process holds it.
    pub fn create(path: &Path) -> Result<Self, ControlError> {
        if let Ok(pid) = read_pid(path)
            && is_alive(pid)
            && pid.as_raw() != std::process::id() as i32
        {
            return Err(ControlError::AlreadyRunning {
                pid: pid.as_raw(),
                path: path.to_owned(),
            });
        }
        std::fs::write(path, format!("{}\n", std::process::id())).map_err(|why| {
            ControlError::Write {
                path: path.to_owned(),
                why,
            }
        })?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if read_pid(&self.path).is_ok_and(|pid| pid.as_raw() == std::process::id() as i32) {
            let _ = std::fs::remove_file(&self.path);
        }
        let _ = std::fs::remove_file(outcome_file_for(&self.path));
    }
}

fn read_pid(path: &Path) -> Result<Pid, ControlError> {
    let text = std::fs::read_to_string(path).map_err(|e| ControlError::NoPidFile {
        path: path.to_owned(),
        why: e.kind(),
    })?;
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|pid| *pid > 0)
        .map(Pid::from_raw)
        .ok_or_else(|| ControlError::BadPidFile {
            path: path.to_owned(),
        })
}

fn is_alive(pid: Pid) -> bool {
    // Signal 0 checks existence and permission without sending anything.
    if matches!(kill(pid, None), Err(Errno::ESRCH)) {
        return false;
    }
    // An exited process whose parent has not collected it yet still answers
    // signal 0; on Linux its state says so.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw()));
    !stat.is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// The running gateway's pid, checked alive.
fn running(pid_file: &Path) -> Result<Pid, ControlError> {
    let pid = read_pid(pid_file)?;
    if !is_alive(pid) {
        return Err(ControlError::NotRunning {
            pid: pid.as_raw(),
            path: pid_file.to_owned(),
        });
    }
    Ok(pid)
}

fn signal(pid: Pid, signal: Signal) -> Result<(), ControlError> {
    kill(pid, signal).map_err(|errno| ControlError::Signal {
        pid: pid.as_raw(),
        errno,
    })
}

/// Asks the gateway to reload and returns its summary of what changed.
pub fn reload(pid_file: &Path) -> Result<String, ControlError> {
    let pid = running(pid_file)?;
    let outcome_file = outcome_file_for(pid_file);
    let before = read_outcome(&outcome_file).map(|o| o.attempt);
    signal(pid, Signal::SIGHUP)?;
    let deadline = Instant::now() + RELOAD_ANSWER_WAIT;
    loop {
        if let Some(outcome) = read_outcome(&outcome_file)
            && outcome.pid == pid.as_raw()
            && Some(outcome.attempt) != before
        {
            return match (outcome.ok, outcome.summary, outcome.error) {
                (true, summary, _) => Ok(summary.unwrap_or_default()),
                (false, _, problems) => Err(ControlError::Rejected {
                    pid: pid.as_raw(),
                    problems: problems.unwrap_or_default(),
                }),
            };
        }
        if Instant::now() >= deadline || !is_alive(pid) {
            return Err(ControlError::NoAnswer { pid: pid.as_raw() });
        }
        std::thread::sleep(POLL);
    }
}

/// Stops the gateway gracefully and waits up to `wait` for it to exit.
pub fn stop(pid_file: &Path, wait: Duration) -> Result<i32, ControlError> {
    let pid = running(pid_file)?;
    signal(pid, Signal::SIGTERM)?;
    let deadline = Instant::now() + wait;
    while is_alive(pid) {
        if Instant::now() >= deadline {
            return Err(ControlError::StillRunning {
                pid: pid.as_raw(),
                waited: wait,
            });
        }
        std::thread::sleep(POLL);
    }
    Ok(pid.as_raw())
}

#[derive(serde::Deserialize)]
struct Outcome {
    pid: i32,
    attempt: u64,
    ok: bool,
    summary: Option<String>,
    error: Option<String>,
}

fn read_outcome(path: &Path) -> Option<Outcome> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_healthcheck_reaches_an_unspecified_listen_address_on_loopback() {
        let url = |addr: &str| healthz_url(addr.parse().unwrap());
        assert_eq!(url("0.0.0.0:8080"), "http://127.0.0.1:8080/healthz");
        assert_eq!(url("[::]:8080"), "http://[::1]:8080/healthz");
        assert_eq!(url("10.0.0.7:9000"), "http://10.0.0.7:9000/healthz");
        assert_eq!(url("[fe80::1]:80"), "http://[fe80::1]:80/healthz");
    }
}
