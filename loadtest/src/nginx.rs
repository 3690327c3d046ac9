//! nginx as the reference plain proxy: the same load through it in the
//! same run, so the gateway's figures are also a ratio to a proxy with no
//! AI logic at all.
//!
//! The harness writes a config (one upstream: the mock the direct run
//! loads, with kept-alive connections; no buffering, so streams pass as
//! they come; no access log), starts `nginx` in the foreground as its own
//! child on a free port on 127.0.0.1, and stops it (SIGQUIT, then kill) by
//! its own handle. Without an `nginx` binary the comparison is skipped.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

/// A running nginx, killed when dropped.
pub(crate) struct Nginx {
    process: tokio::process::Child,
    pid: u32,
    /// `http://127.0.0.1:<port>`
    pub origin: String,
}

impl Nginx {
    /// Starts nginx in front of `upstream` (`http://127.0.0.1:<port>`),
    /// with its files under `dir`; `None` when nginx is not installed.
    pub(crate) async fn start(dir: &Path, upstream: &str) -> anyhow::Result<Option<Self>> {
        let Some(binary) = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            println!("  nginx is not installed (apt-get install nginx-light): no comparison");
            return Ok(None);
        };
        let prefix = std::path::absolute(dir.join("nginx"))?;
        std::fs::create_dir_all(prefix.join("tmp"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let upstream = upstream.trim_start_matches("http://");
        let config = prefix.join("nginx.conf");
        std::fs::write(&config, config_text(&prefix, port, upstream))?;
        let process = tokio::process::Command::new(binary)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&config)
            .arg("-g")
            .arg("daemon off;")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting nginx")?;
        let pid = process.id().context("nginx has no pid")?;
        let nginx = Self {
            process,
            pid,
            origin: format!("http://127.0.0.1:{port}"),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "nginx did not listen within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Some(nginx))
    }

    /// The processes nginx runs as: its master and the master's children
    /// (the workers).
    fn pids(&self) -> Vec<u32> {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children", pid = self.pid))
                .unwrap_or_default();
        std::iter::once(self.pid)
            .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
            .collect()
    }

    /// CPU time used so far by the master and its workers.
    pub(crate) fn cpu_time(&self) -> Duration {
        self.pids().into_iter().map(crate::procs::cpu_time_of).sum()
    }

    /// Resident memory of the master and its workers, summed, in bytes.
    pub(crate) fn memory(&self) -> u64 {
        self.pids()
            .into_iter()
            .map(|pid| crate::procs::memory_of(pid).1)
            .sum()
    }

    /// Asks nginx to finish (SIGQUIT) and waits; kills it after 10 s.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT)?;
        if tokio::time::timeout(Duration::from_secs(10), self.process.wait())
            .await
            .is_err()
        {
            self.process.kill().await?;
        }
        Ok(())
    }
}

fn config_text(prefix: &Path, port: u16, upstream: &str) -> String {
    let tmp = prefix.join("tmp");
    let tmp = tmp.display();
    format!(
        "worker_processes auto;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 16m;
    keepalive_requests 1000000;
    upstream mock {{
        server {upstream};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
",
        prefix = prefix.display()
    )
}
