//! A real `redis-server` per test, on a free port on 127.0.0.1.
//!
//! Found through `BALANCER_TEST_REDIS_SERVER`, else `redis-server` on the
//! `PATH` (Debian's `redis-server` package). It stops by itself: a small
//! shell holds it and waits on a pipe from this process; when the handle
//! is dropped, or the test binary exits for any reason, the pipe closes and
//! the shell kills the server. Nothing is written to disk.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::PrivateCa;

pub(crate) struct RedisServer {
    pub port: u16,
    tls: bool,
    pid: i32,
    shell: Child,
    /// Closing it stops the server.
    stdin: Option<ChildStdin>,
}

impl RedisServer {
    /// A server on a free port.
    pub(crate) fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port)
    }

    /// A server on `port` (to bring one back where it was).
    pub(crate) fn start_on(port: u16) -> Self {
        Self::launch(port, &["--port".to_owned(), port.to_string()], false)
    }

    /// A server that speaks only TLS, with `ca`'s certificate for
    /// `localhost` (its files written to `dir`); clients need no
    /// certificate of their own.
    pub(crate) fn start_tls(ca: &PrivateCa, dir: &Path) -> Self {
        Self::start_tls_asking(ca, dir, false)
    }

    /// [`start_tls`](Self::start_tls), asking every client for a
    /// certificate `ca` signed when `client_certs`.
    pub(crate) fn start_tls_asking(ca: &PrivateCa, dir: &Path, client_certs: bool) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_string_lossy().into_owned()
        };
        let args = [
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            file("redis.crt", &ca.cert_pem),
            "--tls-key-file".to_owned(),
            file("redis.key", &ca.key_pem),
            "--tls-ca-cert-file".to_owned(),
            file("ca.crt", &ca.ca_pem),
            "--tls-auth-clients".to_owned(),
            if client_certs { "yes" } else { "no" }.to_owned(),
        ];
        Self::launch(port, &args, true)
    }

    fn launch(port: u16, listen: &[String], tls: bool) -> Self {
        let binary = std::env::var("BALANCER_TEST_REDIS_SERVER")
            .unwrap_or_else(|_| "redis-server".to_owned());
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(r#""$0" "$@" & echo "$!"; read _; kill -9 "$!" 2>/dev/null"#)
            .arg(&binary)
            .args(listen)
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--logfile", "/dev/stderr"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {binary}: {e} (apt-get install redis-server)")
            });
        let mut stdout = BufReader::new(shell.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let pid: i32 = line.trim().parse().unwrap();
        // Redis logs to stderr: wait for it to say it is ready.
        let log = BufReader::new(shell.stderr.take().unwrap());
        let (ready, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut ready = Some(ready);
            for line in log.lines().map_while(Result::ok) {
                if line.contains("Ready to accept connections")
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        wait.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{binary} did not get ready on port {port}"));
        let stdin = shell.stdin.take();
        Self {
            port,
            tls,
            pid,
            shell,
            stdin,
        }
    }

    /// `redis://127.0.0.1:port`, or `rediss://localhost:port` (the name
    /// its certificate is for) when it speaks TLS.
    pub(crate) fn url(&self) -> String {
        if self.tls {
            format!("rediss://localhost:{}", self.port)
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub(crate) fn kill(mut self) {
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let _ = self.shell.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
