//! Serving: binding the listener, running everything `balancer serve` runs,
//! and stopping gracefully.
//!
//! The gateway listens on `server.listen`, the admin API (when a token is
//! configured) on `admin.listen`. On shutdown both stop accepting, requests
//! in flight (streams included) run to their end for up to
//! `server.shutdown_grace`, and then the server returns whatever is still
//! open. Background tasks (probes, watcher) stop after that, the usage
//! writer last of all writing what the drained requests used, and the pid
//! file goes last.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::config::{self, ConfigError};
use crate::control::{ControlError, PidFile};
use crate::reload::{self, ConfigSource};
use crate::state::{AppState, StartError};
use crate::{admin, app};

/// Why `balancer serve` could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid config: {0}")]
    Config(ConfigError),
    /// The config is valid but cannot be put to use: the store cannot be
    /// opened, or an HTTP client or CA bundle cannot be built.
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("cannot listen on {addr}: {err}")]
    Listen {
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error("cannot listen for SIGHUP: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    PidFile(#[from] ControlError),
    #[error("serving failed: {0}")]
    Serve(std::io::Error),
}

/// Everything `balancer serve` does: loads and validates the config at
/// `path`, listens, writes the pid file, reloads on SIGHUP and (unless
/// `server.watch_config = false`) on file changes, and serves until
/// `shutdown` resolves. `listening` hears the bound address, the node count
/// and the pid file once all is in place.
pub async fn run(
    path: &Path,
    shutdown: impl Future<Output = ()> + Send + 'static,
    listening: impl FnOnce(SocketAddr, usize, &Path),
) -> Result<(), RunError> {
    let (config, warnings) = config::load(path).map_err(RunError::Config)?;
    for warning in &warnings.0 {
        tracing::warn!("{warning}");
    }
    let addr = config.server.listen;
    let listener = bind(addr).map_err(|err| RunError::Listen { addr, err })?;
    // The bound address: port 0 in the config picks a free one.
    let addr = listener.local_addr().unwrap_or(addr);
    let admin_listener = bind_admin(&config)?;
    let nodes = config.nodes.len();
    let pid_path = config::pid_file_for(path, config.server.pid_file.as_deref());
    let watch = config.server.watch_config;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let state = AppState::start(config, base_dir).await?;
    warn_if_open(&state);
    // SIGHUP is taken over before the pid file announces this process, so
    // `balancer reload` can never kill a gateway that is still starting.
    let hangups = reload::listen_for_sighup().map_err(RunError::Signal)?;
    let pid_file = PidFile::create(&pid_path)?;
    let source = ConfigSource::from_process(path.to_owned(), pid_file.path());
    if watch {
        let (s, src) = (Arc::clone(&state), source.clone());
        state.spawn(|cancel| reload::watch(s, src, cancel));
    }
    let (s, src) = (Arc::clone(&state), source);
    state.spawn(|cancel| reload::on_sighup(s, src, hangups, cancel));
    listening(addr, nodes, pid_file.path());
    let served = serve_all(listener, admin_listener, state, shutdown).await;
    drop(pid_file);
    served.map_err(RunError::Serve)
}

/// Binds the admin API's listener, or says why there is none.
pub fn bind_admin(config: &config::Config) -> Result<Option<TcpListener>, RunError> {
    if config.admin.token.is_none() {
        tracing::info!(
            "admin API off: set admin.token_env to a variable holding the admin token to turn it on"
        );
        return Ok(None);
    }
    let addr = config.admin.listen;
    let listener = bind(addr).map_err(|err| RunError::Listen { addr, err })?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(admin = %bound, "admin API listening");
    Ok(Some(listener))
}

fn warn_if_open(state: &AppState) {
    if crate::auth::is_open(&state.live(), &state.clients) {
        tracing::warn!(
            "no client keys configured (auth.client_keys_env, [[clients]], admin API): the gateway is open to anyone who can reach it"
        );
    }
}

/// Serves the gateway (and the admin API, if it listens) until `shutdown`,
/// drains, then stops the background tasks: the usage writer writes what
/// the drained requests used before this returns.
pub async fn serve_all(
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stopping = tokio_util::sync::CancellationToken::new();
    let admin = admin_listener.map(|listener| {
        let router = admin::router(Arc::clone(&state));
        let stopped = stopping.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await
        })
    });
    let signal = stopping.clone();
    let served = serve(listener, Arc::clone(&state), async move {
        shutdown.await;
        signal.cancel();
    })
    .await;
    stopping.cancel();
    if let Some(admin) = admin {
        // Admin requests are short; one still open after the gateway's
        // grace is cut.
        let grace = state.live().config.server.shutdown_grace;
        if tokio::time::timeout(grace, admin).await.is_err() {
            tracing::warn!("admin API still busy after the shutdown grace; closing it");
        }
    }
    state.stop_tasks().await;
    state.clients.store().close().await;
    served
}

/// Room for connection bursts (a load test opens 1,000 at once); the kernel
/// caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` with a large accept backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves until `shutdown` resolves, then drains for up to the configured
/// grace period.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.live().config.server.shutdown_grace;
    let stopping = tokio_util::sync::CancellationToken::new();
    let signal = stopping.clone();
    tokio::spawn(async move {
        shutdown.await;
        signal.cancel();
    });
    // Nagle would hold back small writes (an SSE event) for tens of ms.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let draining = stopping.clone();
    let server = axum::serve(listener, app::router(state))
        .with_graceful_shutdown(async move { draining.cancelled().await });
    tokio::select! {
        result = server => result,
        () = async {
            stopping.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(grace_s = grace.as_secs(), "shutdown grace elapsed; closing open connections");
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received; draining");
}
