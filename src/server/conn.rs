//! Client connections: the accept loop, the limits that keep idle or
//! stalled clients from holding the gateway, and graceful shutdown.
//!
//! - **`server.max_connections`** connections at most are open at once;
//!   past that the loop stops accepting (newcomers wait in the kernel's
//!   backlog) until one closes. File descriptors stay below the process
//!   limit, so the gateway can always open its upstream connections.
//! - **`server.header_read_timeout`**: a client has this long to send a
//!   request head, counted from when its connection opens or, on a
//!   kept-alive connection, from the end of the previous answer; it is
//!   therefore also the idle keep-alive timeout. An idle or trickling
//!   connection is closed.
//! - **`server.write_timeout`**: a write to the client that makes no
//!   progress for this long closes the connection; for an HTTP/1 answer
//!   the proxy also sets the request's own deadline
//!   ([`WriteDeadline`]), so a client that stops reading a stream is cut
//!   at `server.request_timeout`. Closing the connection drops the answer,
//!   which settles its reservation and frees its node's slot.
//!
//! On shutdown the loop stops accepting and every connection finishes its
//! requests (hyper's graceful shutdown) for up to `server.shutdown_grace`;
//! whatever is still open then is closed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// What a client connection may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    pub(crate) max_connections: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub(crate) shutdown_grace: Duration,
}

/// An HTTP/1 connection's deadline for writing the answer in progress,
/// set by the proxy from the request's `server.request_timeout`. Found in
/// the request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct WriteDeadline {
    opened: Instant,
    /// Milliseconds after `opened`; 0 for none.
    at_ms: Arc<AtomicU64>,
}

impl WriteDeadline {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            at_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Writes of this answer must be done by `at`.
    pub(crate) fn until(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.opened).as_millis();
        let ms = u64::try_from(ms).unwrap_or(u64::MAX).max(1);
        self.at_ms.store(ms, Ordering::Relaxed);
    }

    fn clear(&self) {
        self.at_ms.store(0, Ordering::Relaxed);
    }

    fn get(&self) -> Option<Instant> {
        match self.at_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.opened + Duration::from_millis(ms)),
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown`
/// resolves, then drains for up to the grace period.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut sniffing = auto::Builder::new(TokioExecutor::new());
    sniffing
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let http1 = Arc::new(sniffing.clone().http1_only());
    let sniffing = Arc::new(sniffing);
    let graceful = GracefulShutdown::new();
    // Stops the connections still waiting for their first bytes.
    let stopping = CancellationToken::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Dropped (aborting what is left) when this function returns.
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&slots).acquire_owned() => permit,
        };
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(err) => {
                backoff_after(&err).await;
                continue;
            }
        };
        // Nagle would hold back small writes (an SSE event) for tens of ms.
        let _ = tcp.set_nodelay(true);
        let deadline = WriteDeadline::new();
        let mut guarded = Guarded::new(tcp, &limits, deadline.clone());
        let service = TowerToHyperService::new(Marked {
            router: router.clone(),
            deadline,
        });
        let (http1, sniffing) = (Arc::clone(&http1), Arc::clone(&sniffing));
        let (watcher, stopping) = (graceful.watcher(), stopping.clone());
        connections.spawn(async move {
            let protocol = tokio::select! {
                () = stopping.cancelled() => return,
                protocol = guarded.protocol() => protocol,
            };
            let builder = match protocol {
                Protocol::Http1 => &http1,
                Protocol::Unknown => &sniffing,
                Protocol::Closed => return,
            };
            let connection = builder.serve_connection(TokioIo::new(guarded), service);
            let _ = watcher.watch(connection.into_owned()).await;
            drop(permit);
        });
    }
    drop(listener);
    stopping.cancel();
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(
                grace_s = limits.shutdown_grace.as_secs(),
                "shutdown grace elapsed; closing open connections"
            );
        }
    }
    Ok(())
}

/// After a failed accept: out of file descriptors (or another resource)
/// is waited out briefly rather than spun on; a connection reset before
/// it was accepted is nothing.
async fn backoff_after(err: &io::Error) {
    if !matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        tracing::warn!(error = %err, "accept failed; pausing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The router, with each HTTP/1 request given its connection's
/// [`WriteDeadline`] (cleared: the previous answer's is done).
#[derive(Clone)]
struct Marked {
    router: Router,
    deadline: WriteDeadline,
}

impl tower_service::Service<axum::http::Request<hyper::body::Incoming>> for Marked {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future =
        <Router as tower_service::Service<axum::http::Request<hyper::body::Incoming>>>::Future;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: axum::http::Request<hyper::body::Incoming>) -> Self::Future {
        // HTTP/2 multiplexes: one stream's deadline is not the connection's.
        if request.version() < axum::http::Version::HTTP_2 {
            self.deadline.clear();
            request.extensions_mut().insert(self.deadline.clone());
        }
        self.router.call(request)
    }
}

/// What a client's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// Perhaps HTTP/2 (prior knowledge): hyper-util tells.
    Unknown,
    Closed,
}

/// A client socket whose writes may not stall for longer than the write
/// timeout, nor past the answer's deadline, and which must deliver its
/// first request head within the header-read timeout (hyper's own timer
/// starts only once it knows the protocol, so a silent or trickling
/// connection is bounded here until the first answer begins).
struct Guarded {
    io: TcpStream,
    write_timeout: Duration,
    deadline: WriteDeadline,
    /// Armed while a write waits for the client to read.
    stall: Option<Pin<Box<Sleep>>>,
    /// Until the first write: when reading must have produced a request.
    first_request_by: Option<Pin<Box<Sleep>>>,
}

impl Guarded {
    fn new(io: TcpStream, limits: &ConnLimits, deadline: WriteDeadline) -> Self {
        Self {
            io,
            write_timeout: limits.write_timeout,
            deadline,
            stall: None,
            first_request_by: Some(Box::pin(tokio::time::sleep(limits.header_read_timeout))),
        }
    }

    /// Which protocol the client speaks, from its first bytes (peeked,
    /// so hyper reads them whole): HTTP/1 unless they could begin HTTP/2's
    /// preface; unknown when they could, for hyper-util to read on.
    /// Knowing spares the connection hyper-util's sniff, which hands hyper
    /// its first 24 bytes apart and so makes hyper's read buffer grow from
    /// 8 to 16 KiB on every HTTP/1 connection. Closed: nothing came before
    /// `server.header_read_timeout`, or the client left.
    async fn protocol(&mut self) -> Protocol {
        const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let mut first = [0_u8; 3];
        let by = self
            .first_request_by
            .as_ref()
            .map_or_else(Instant::now, |by| by.deadline());
        match tokio::time::timeout_at(by, self.io.peek(&mut first)).await {
            Ok(Ok(0) | Err(_)) | Err(_) => Protocol::Closed,
            Ok(Ok(n)) if H2_PREFACE.starts_with(&first[..n]) => Protocol::Unknown,
            Ok(Ok(_)) => Protocol::Http1,
        }
    }

    /// A write is pending: fails it once the client has not read for too
    /// long, else keeps waiting (the timer wakes the connection).
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = Instant::now() + self.write_timeout;
        let until = self.deadline.get().map_or(limit, |d| d.min(limit));
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
        ready!(stall.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading",
        )))
    }

    fn progressed<T>(&mut self, result: io::Result<T>) -> Poll<io::Result<T>> {
        self.stall = None;
        // An answer is being written: a request came; hyper times the next.
        self.first_request_by = None;
        Poll::Ready(result)
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if read.is_pending()
            && let Some(by) = &mut self.first_request_by
        {
            ready!(by.as_mut().poll(cx));
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request within server.header_read_timeout",
            )));
        }
        read
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Ready(result) => self.progressed(result),
            Poll::Pending => self.stalled(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => self.progressed(result),
            Poll::Pending => self.stalled(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(result) => self.progressed(result),
            Poll::Pending => self.stalled(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
