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
//! - **HTTP/2 idle**: a connection that may speak HTTP/2 (hyper's own
//!   timers cover HTTP/1 only) is told GOAWAY once it has had no stream
//!   open for `server.header_read_timeout` (from the preface, or since its
//!   last stream ended), and is closed after as long again with none open:
//!   neither a preface-only client nor an idle multiplexed one holds a
//!   connection slot.
//! - **HTTP/2 streams** are served each in a task of their own (hyper's);
//!   every such task ends by `server.request_timeout` +
//!   `server.write_timeout`, so a client that stops reading (window 0, so
//!   its answer's body is never polled again) still frees its node's slot.
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::deadline::WriteDeadline;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use futures_util::future::Either;
use futures_util::task::AtomicWaker;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
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
    /// Bounds each HTTP/2 stream's task (with the write timeout).
    pub(crate) request_timeout: Duration,
    pub(crate) shutdown_grace: Duration,
}

/// Runs hyper's per-stream HTTP/2 tasks, each within `limit`: a stream
/// whose client stopped reading is never polled by hyper again, so only a
/// timer outside it can end it (dropping its answer, which settles the
/// reservation and frees the node's slot; h2 resets the stream).
#[derive(Clone, Copy)]
struct StreamExecutor {
    limit: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    #[expect(
        clippy::disallowed_methods,
        reason = "hyper's own per-stream tasks, each bounded by the request timeout and ended with its connection"
    )]
    fn execute(&self, stream: F) {
        tokio::spawn(tokio::time::timeout(self.limit, stream));
    }
}

/// The streams open on a connection that may speak HTTP/2, so it can be
/// closed when it has had none for a while.
#[derive(Debug, Default)]
struct OpenStreams {
    open: AtomicUsize,
    /// Bumped by every stream that opens: an idle spell it interrupts
    /// starts again.
    opened: AtomicU64,
    /// The connection's task, woken when the last stream ends.
    waker: AtomicWaker,
}

/// One open stream; closes it when dropped (with its answer's body).
struct StreamOpen(Arc<OpenStreams>);

impl OpenStreams {
    fn open(self: &Arc<Self>) -> StreamOpen {
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::AcqRel);
        StreamOpen(Arc::clone(self))
    }

    /// Resolves once no stream has been open for `spell`.
    async fn idle_for(&self, spell: Duration) {
        loop {
            std::future::poll_fn(|cx| {
                self.waker.register(cx.waker());
                if self.open.load(Ordering::Acquire) == 0 {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
            let opened = self.opened.load(Ordering::Relaxed);
            tokio::time::sleep(spell).await;
            if self.open.load(Ordering::Acquire) == 0
                && self.opened.load(Ordering::Relaxed) == opened
            {
                return;
            }
        }
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.waker.wake();
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
    let executor = StreamExecutor {
        limit: limits.request_timeout + limits.write_timeout,
    };
    let mut sniffing = auto::Builder::new(executor);
    sniffing
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    sniffing
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    let http1 = Arc::new(sniffing.clone().http1_only());
    let sniffing = Arc::new(sniffing);
    // Asks every connection to finish (GOAWAY, or close once idle).
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
        let (http1, sniffing) = (Arc::clone(&http1), Arc::clone(&sniffing));
        let (router, stopping) = (router.clone(), stopping.clone());
        connections.spawn(async move {
            let deadline = WriteDeadline::new();
            let mut guarded = Guarded::new(tcp, &limits, deadline.clone());
            let protocol = tokio::select! {
                () = stopping.cancelled() => return,
                protocol = guarded.protocol() => protocol,
            };
            let (builder, streams) = match protocol {
                Protocol::Http1 => (&http1, None),
                Protocol::Unknown => (&sniffing, Some(Arc::new(OpenStreams::default()))),
                Protocol::Closed => return,
            };
            let service = TowerToHyperService::new(Marked {
                router,
                deadline,
                streams: streams.clone(),
            });
            let connection = builder
                .serve_connection(TokioIo::new(guarded), service)
                .into_owned();
            drive(connection, streams, limits.header_read_timeout, &stopping).await;
            drop(permit);
        });
    }
    drop(listener);
    stopping.cancel();
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(limits.shutdown_grace, drained)
        .await
        .is_err()
    {
        tracing::warn!(
            grace_s = limits.shutdown_grace.as_secs(),
            "shutdown grace elapsed; closing open connections"
        );
    }
    Ok(())
}

/// Streams one HTTP/2 client may have open at once; more are refused by
/// h2 (`REFUSED_STREAM`), so one connection cannot take every node slot.
const MAX_STREAMS_PER_CONNECTION: u32 = 100;

/// A client connection as hyper-util serves it.
type Served =
    auto::Connection<'static, TokioIo<Guarded>, TowerToHyperService<Marked>, StreamExecutor>;

/// Serves `connection` to its end: finished gracefully when the server
/// stops, and (when it may speak HTTP/2) told GOAWAY after an idle spell
/// with no stream open, then closed after a second one.
async fn drive(
    connection: Served,
    streams: Option<Arc<OpenStreams>>,
    idle: Duration,
    stopping: &CancellationToken,
) {
    tokio::pin!(connection);
    let (mut finishing, mut told_away) = (false, false);
    loop {
        let idle_spell = async {
            match &streams {
                Some(streams) => streams.idle_for(idle).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = connection.as_mut() => return,
            () = stopping.cancelled(), if !finishing => {
                finishing = true;
                connection.as_mut().graceful_shutdown();
            }
            () = idle_spell => {
                if told_away {
                    return;
                }
                told_away = true;
                finishing = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
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
/// [`WriteDeadline`] (cleared: the previous answer's is done), and each
/// request on a connection that may speak HTTP/2 counted open until its
/// answer's body is dropped.
#[derive(Clone)]
struct Marked {
    router: Router,
    deadline: WriteDeadline,
    streams: Option<Arc<OpenStreams>>,
}

type RouterFuture =
    <Router as tower_service::Service<axum::http::Request<hyper::body::Incoming>>>::Future;

impl tower_service::Service<axum::http::Request<hyper::body::Incoming>> for Marked {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = Either<
        RouterFuture,
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: axum::http::Request<hyper::body::Incoming>) -> Self::Future {
        // HTTP/2 multiplexes: one stream's deadline is not the connection's.
        if request.version() < axum::http::Version::HTTP_2 {
            self.deadline.clear();
            request.extensions_mut().insert(self.deadline.clone());
        }
        let Some(streams) = &self.streams else {
            return Either::Left(self.router.call(request));
        };
        let open = streams.open();
        let answer = self.router.call(request);
        Either::Right(Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _open = &open;
                    frame
                }))
            }))
        }))
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
