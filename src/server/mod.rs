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

use std::sync::Weak;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::clients::Registry;
use crate::config::{self, Config, ConfigError};
use crate::control::{ControlError, PidFile};
use crate::objects::Objects;
use crate::reload::{self, ConfigSource};
use crate::state::AppState;
use crate::store::{Store, StoreError};
use crate::tasks::Tasks;
use crate::{admin, app, ledger, probes};

pub(crate) mod conn;

/// How long start-up waits for Redis before serving with
/// `cluster.on_redis_error` in force.
const CLUSTER_CONNECT_WAIT: Duration = Duration::from_secs(3);

/// Why the state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The config is valid but cannot be put to use (an HTTP client or a CA
    /// bundle cannot be built).
    #[error("{0}")]
    Prepare(String),
}

/// Opens the client store (`base_dir` resolves a relative SQLite path),
/// builds the state and starts its background tasks: the shared limits'
/// connection, the queue's dispatcher, the health probes, the ledger
/// writer and the stored-clients refresh.
pub async fn start(config: Config, base_dir: &Path) -> Result<Arc<AppState>, StartError> {
    // The tokenizer tables the nodes' models need, built before the first
    // request (a node that serves any model names none: those load on use).
    let built = crate::tokens::Encoding::load_for(
        config
            .nodes
            .iter()
            .filter_map(|node| node.models.as_deref())
            .flatten()
            .map(String::as_str),
    );
    // What building them freed goes back to the system at once.
    if built {
        crate::memory::give_back();
    }
    let store = Store::open(&config.store.url, base_dir).await?;
    let (ledger, writer) = ledger::channel();
    let objects = Objects::new(
        store.clone(),
        config.store.cache_ttl,
        config.store.object_ttl,
    );
    let registry = Registry::new(store, config.store.cache_ttl, ledger).await?;
    let settings = config.store.clone();
    let tasks = Tasks::new();
    let state =
        AppState::new(config, registry, objects, tasks.clone()).map_err(StartError::Prepare)?;
    if let Some(shared) = &state.admission.shared {
        let shared = Arc::clone(shared);
        tasks.spawn(|cancel| shared.run(cancel));
    }
    let queue = Arc::clone(&state.admission.queue);
    tasks.spawn(|cancel| async move { queue.dispatch(cancel).await });
    let (weak, wake) = (Arc::downgrade(&state), Arc::clone(&state.kept.health_wake));
    tasks.spawn(|cancel| probes::run(weak, wake, cancel));
    let store = state.clients.store().clone();
    tasks.spawn(|cancel| writer.run(store, settings.usage_flush_interval, cancel));
    let weak = Arc::downgrade(&state);
    tasks.spawn(|cancel| refresh_clients(weak, settings.cache_ttl, cancel));
    let objects = Arc::clone(&state.objects);
    tasks.spawn(|cancel| purge_objects(objects, cancel));
    tasks.spawn(crate::memory::trim_when_quiet);
    if let Some(shared) = &state.admission.shared
        && !shared.connected(CLUSTER_CONNECT_WAIT).await
    {
        tracing::warn!(
            "redis not reachable at start-up; cluster.on_redis_error applies until it is"
        );
    }
    Ok(state)
}

/// Re-reads whether the store holds clients every `every`, so the first
/// client another replica makes closes this gateway too.
async fn refresh_clients(state: Weak<AppState>, every: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let Some(state) = state.upgrade() else { return };
        if let Err(err) = state.clients.refresh().await {
            tracing::warn!(error = %err, "cannot count the stored clients");
        }
    }
}

/// How often expired object records are deleted.
const OBJECT_PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Deletes expired object records now and every hour.
async fn purge_objects(objects: Arc<Objects>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(OBJECT_PURGE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        match objects.purge().await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "expired object records deleted"),
            Err(err) => tracing::warn!(error = %err, "cannot delete expired object records"),
        }
    }
}

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
    let state = start(config, base_dir).await?;
    warn_if_open(&state);
    // SIGHUP is taken over before the pid file announces this process, so
    // `balancer reload` can never kill a gateway that is still starting.
    let hangups = reload::listen_for_sighup().map_err(RunError::Signal)?;
    let pid_file = PidFile::create(&pid_path)?;
    let source = ConfigSource::from_process(path.to_owned(), pid_file.path());
    if watch {
        let (s, src) = (Arc::clone(&state), source.clone());
        state.tasks.spawn(|cancel| reload::watch(s, src, cancel));
    }
    let (s, src) = (Arc::clone(&state), source);
    state
        .tasks
        .spawn(|cancel| reload::on_sighup(s, src, hangups, cancel));
    listening(addr, nodes, pid_file.path());
    let served = serve_all(listener, admin_listener, state, shutdown).await;
    drop(pid_file);
    served.map_err(RunError::Serve)
}

/// Binds the admin API's listener, or says why there is none.
pub fn bind_admin(config: &Config) -> Result<Option<TcpListener>, RunError> {
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
    let stopping = CancellationToken::new();
    let admin = admin_listener.map(|listener| {
        let router = admin::router(Arc::clone(&state));
        let stopped = stopping.clone();
        state.tasks.run(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
            if let Err(err) = served {
                tracing::error!(error = %err, "admin API stopped");
            }
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
        let abort = admin.abort_handle();
        if tokio::time::timeout(grace, admin).await.is_err() {
            tracing::warn!("admin API still busy after the shutdown grace; closing it");
            abort.abort();
        }
    }
    state.tasks.stop().await;
    state.clients.store().close().await;
    if state.tracing.is_some() {
        // The last spans go out; the exporter's flush blocks its caller.
        let state = Arc::clone(&state);
        let flushed = tokio::task::spawn_blocking(move || {
            if let Some(tracing) = &state.tracing {
                tracing.shutdown();
            }
        });
        let _ = tokio::time::timeout(TRACE_FLUSH_LIMIT, flushed).await;
    }
    served
}

/// How long the last spans may take to leave at shutdown.
const TRACE_FLUSH_LIMIT: Duration = Duration::from_secs(5);

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
/// grace period, within the connection limits of `[server]`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let settings = state.live().config.server.clone();
    let limits = conn::ConnLimits {
        max_connections: connection_cap(settings.max_connections.get()),
        header_read_timeout: settings.header_read_timeout,
        write_timeout: settings.write_timeout,
        request_timeout: settings.request_timeout,
        shutdown_grace: settings.shutdown_grace,
    };
    conn::serve(listener, app::router(state), limits, shutdown).await
}

/// File descriptors kept for everything but client connections and
/// their upstream connections: the store, Redis, config and key files,
/// idle upstream connections.
const FD_RESERVE: u64 = 256;

/// `server.max_connections`, lowered (with a warning) to what the process's
/// open-file limit leaves room for: each client connection may hold an
/// upstream connection too, beside [`FD_RESERVE`]. The soft limit is first
/// raised to the hard one (as Go's runtime does; many systems start
/// processes at a soft 1,024).
fn connection_cap(configured: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return configured;
    };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        tracing::debug!(from = soft, to = hard, "raised the open-file limit");
        hard
    } else {
        soft
    };
    let room = connection_room(soft);
    if configured > room {
        tracing::warn!(
            configured,
            open_file_limit = soft,
            using = room,
            "server.max_connections is above what the open-file limit allows (two files per connection: the client's and the upstream's); lowered"
        );
    }
    configured.min(room)
}

/// Client connections an open-file limit of `files` has room for.
fn connection_room(files: u64) -> usize {
    let room = files.saturating_sub(FD_RESERVE) / 2;
    usize::try_from(room.max(16)).unwrap_or(usize::MAX)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_connection_counts_two_open_files() {
        // 20,000 files: 256 kept, the rest shared by a client connection
        // and its upstream connection.
        assert_eq!(connection_room(20_000), 9_872);
        // Debian's default soft limit, were it not raised.
        assert_eq!(connection_room(1_024), 384);
        assert_eq!(connection_room(100), 16);
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Started as many systems start a process: a soft limit below the
        // hard one (lowering it needs no privilege).
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(1_024), hard).unwrap();
        let cap = connection_cap(usize::MAX);
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, hard);
        assert_eq!(cap, connection_room(hard));
    }
}
