//! Upstream HTTP/1.1 connections held by the request that uses them, for
//! nodes reached over plain `http://` (a sidecar, a local model server, an
//! in-cluster proxy, the mocks).
//!
//! A pooled HTTP client (reqwest, hyper-util's) runs each connection in a
//! task of its own: every read from the upstream wakes that task, which
//! hands the bytes to the requesting task through a channel and wakes it in
//! turn. Here the task that sends a request polls the connection itself,
//! from the request until the last byte of the answer's body (the body
//! polls the connection as it is read), and then puts it back in the node's
//! idle list: one task and one wake-up per read. `https://` nodes keep
//! reqwest (TLS; the network's round trip dwarfs a wake-up).
//!
//! Invariants:
//! - a connection is in one place at a time: carrying one request, or idle
//!   in its node's list;
//! - it goes back to the list only when its answer was read to the end; a
//!   body dropped before (the client left, a timeout) closes it, so no
//!   request ever reads a leftover of another's answer;
//! - an idle connection the node closed is noticed when it is taken and
//!   dropped; a request it could not carry is sent again on another, and
//!   only a request that was not written is ever sent again;
//! - a node's connections outlive a config reload while its URL stays;
//! - at most [`MAX_IDLE`] idle connections per node, none kept past
//!   [`IDLE_TIMEOUT`]; the list's lock is never held across an await, nor
//!   while a connection is closed;
//! - hyper's read buffer is [`READ_BUFFER`] bytes, fixed: a slow stream
//!   holds no more than that for its upstream side.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, Method, Request, Uri, Version, header};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;

use crate::upstream::Failure;

/// Idle connections kept per node.
pub(crate) const MAX_IDLE: usize = 256;
/// How long an idle connection is kept (reqwest's default, as before).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// hyper's read buffer per connection: an SSE event or a chunk of a
/// larger answer fits; hyper's own default starts at 8 KiB and grows.
const READ_BUFFER: usize = 4096;

type Connection = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// One connection: its sending half and the connection itself, which
/// whoever holds it must poll.
struct Held {
    sender: http1::SendRequest<Full<Bytes>>,
    connection: Connection,
    /// The connection's future has completed: it must not be polled again,
    /// nor the connection reused.
    ended: bool,
}

impl Held {
    /// Polls the connection once (it reads, writes, hands body bytes on);
    /// notes when it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.ended && Pin::new(&mut self.connection).poll(cx).is_ready() {
            self.ended = true;
        }
    }

    /// Whether an idle connection can carry another request: not ended,
    /// and nothing from the node (a close, stray bytes) in the meantime.
    fn is_reusable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop()));
        !self.ended && !self.sender.is_closed()
    }
}

struct Idle {
    held: Held,
    since: Instant,
}

/// A node's connections: where to connect, and the idle ones.
pub(crate) struct Connections {
    /// `host:port`, as connected to.
    authority: String,
    /// The `Host` header.
    host: HeaderValue,
    /// `upstream.connect_timeout` in milliseconds (a reload may change it).
    connect_timeout_ms: AtomicU64,
    /// Oldest first; taken from the end.
    idle: Mutex<Vec<Idle>>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("authority", &self.authority)
            .field("idle", &self.idle.lock().len())
            .finish()
    }
}

/// Why a request was not answered on a connection.
enum Unanswered {
    /// Not written: it may go on another connection.
    Unsent(Box<Request<Full<Bytes>>>),
    Failed(Failure),
}

impl Connections {
    /// Connections to an `http://` base URL; `None` for any other scheme.
    pub(crate) fn for_url(base: &reqwest::Url, connect_timeout: Duration) -> Option<Arc<Self>> {
        if base.scheme() != "http" {
            return None;
        }
        let host = base.host_str()?;
        let port = base.port_or_known_default()?;
        // `Host` names the port only where the URL does.
        let host_header = match base.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        Some(Arc::new(Connections {
            authority: format!("{host}:{port}"),
            host: HeaderValue::from_str(&host_header).ok()?,
            connect_timeout_ms: AtomicU64::new(millis(connect_timeout)),
            idle: Mutex::new(Vec::new()),
        }))
    }

    /// Sets the connect timeout (a reloaded `upstream.connect_timeout`).
    pub(crate) fn set_connect_timeout(&self, timeout: Duration) {
        self.connect_timeout_ms
            .store(millis(timeout), Ordering::Relaxed);
    }

    /// How many connections are idle now.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }

    /// Sends one request and waits for the answer's head; the answer's
    /// body drives the connection while it is read and gives it back when
    /// read to the end.
    pub(crate) async fn send(
        self: &Arc<Self>,
        method: Method,
        url: &reqwest::Url,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<reqwest::Response, Failure> {
        let target = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        let uri = Uri::try_from(target).map_err(|_| Failure::Connect)?;
        headers.insert(header::HOST, self.host.clone());
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = headers;
        loop {
            let (held, reused) = match self.take_idle() {
                Some(held) => (held, true),
                None => (self.connect().await?, false),
            };
            match exchange(held, request).await {
                Ok((response, held)) => return Ok(self.answer(response, held)),
                Err(Unanswered::Unsent(unsent)) if reused => request = *unsent,
                // A fresh connection that could not take the request:
                // nothing reached the node.
                Err(Unanswered::Unsent(_)) => return Err(Failure::Connect),
                Err(Unanswered::Failed(failure)) => return Err(failure),
            }
        }
    }

    /// The newest idle connection that can still carry a request; the
    /// ones that cannot are closed. Each is looked at (and closed) after
    /// the list's lock is released.
    fn take_idle(&self) -> Option<Held> {
        loop {
            let mut idle = self.idle.lock().pop()?;
            if idle.since.elapsed() < IDLE_TIMEOUT && idle.held.is_reusable() {
                return Some(idle.held);
            }
        }
    }

    /// Puts a connection whose answer was read whole back in the list,
    /// closing the ones past [`IDLE_TIMEOUT`] (at the front) and any beyond
    /// [`MAX_IDLE`].
    fn give_back(&self, held: Held) {
        let now = Instant::now();
        let mut list = self.idle.lock();
        let expired = list
            .iter()
            .take_while(|idle| now.duration_since(idle.since) >= IDLE_TIMEOUT)
            .count();
        let closed: Vec<Idle> = list.drain(..expired).collect();
        let refused = if list.len() < MAX_IDLE {
            list.push(Idle { held, since: now });
            None
        } else {
            Some(held)
        };
        drop(list);
        drop((closed, refused));
    }

    async fn connect(&self) -> Result<Held, Failure> {
        let timeout = Duration::from_millis(self.connect_timeout_ms.load(Ordering::Relaxed));
        let stream = tokio::time::timeout(timeout, TcpStream::connect(self.authority.as_str()))
            .await
            .map_err(|_| Failure::Connect)?
            .map_err(|_| Failure::Connect)?;
        stream.set_nodelay(true).map_err(|_| Failure::Connect)?;
        let (sender, connection) = http1::Builder::new()
            .read_buf_exact_size(Some(READ_BUFFER))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|_| Failure::Connect)?;
        Ok(Held {
            sender,
            connection,
            ended: false,
        })
    }

    fn answer(
        self: &Arc<Self>,
        response: hyper::Response<Incoming>,
        held: Held,
    ) -> reqwest::Response {
        let (parts, body) = response.into_parts();
        let body = DrivenBody {
            body,
            held: Some(held),
            complete: false,
            home: Arc::clone(self),
        };
        reqwest::Response::from(hyper::Response::from_parts(
            parts,
            reqwest::Body::wrap(body),
        ))
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Writes `request` on `held` and reads the answer's head, polling the
/// connection throughout.
async fn exchange(
    mut held: Held,
    request: Request<Full<Bytes>>,
) -> Result<(hyper::Response<Incoming>, Held), Unanswered> {
    let ready = poll_fn(|cx| {
        held.drive(cx);
        if held.ended {
            return Poll::Ready(false);
        }
        held.sender.poll_ready(cx).map(|r| r.is_ok())
    })
    .await;
    if !ready {
        return Err(Unanswered::Unsent(Box::new(request)));
    }
    let mut answer = std::pin::pin!(held.sender.try_send_request(request));
    let answered = poll_fn(|cx| {
        held.drive(cx);
        // The connection answers (or fails) the request before it ends.
        answer.as_mut().poll(cx)
    })
    .await;
    match answered {
        Ok(response) => Ok((response, held)),
        Err(mut err) => match err.take_message() {
            Some(request) => Err(Unanswered::Unsent(Box::new(request))),
            None => Err(Unanswered::Failed(Failure::Broken)),
        },
    }
}

/// An answer's body that polls its connection as it is read, and gives the
/// connection back to its node when the body was read to the end.
struct DrivenBody {
    body: Incoming,
    /// `None` once given back.
    held: Option<Held>,
    /// The body's end was read.
    complete: bool,
    home: Arc<Connections>,
}

impl Body for DrivenBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        // The body first (it asks the connection for more), then the
        // connection (which reads and hands the bytes over), then the body
        // again: one poll of the task per read.
        for _ in 0..2 {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(frame) => {
                    if frame.is_none() {
                        this.complete = true;
                    }
                    return Poll::Ready(frame);
                }
                Poll::Pending => match &mut this.held {
                    Some(held) if !held.ended => held.drive(cx),
                    _ => return Poll::Pending,
                },
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for DrivenBody {
    fn drop(&mut self) {
        if let Some(held) = self.held.take()
            && (self.complete || self.body.is_end_stream())
            && !held.ended
        {
            self.home.give_back(held);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::StreamExt;
    use http_body_util::StreamBody;
    use tokio::sync::{Notify, mpsc};

    use super::*;

    /// A node that counts the connections it accepts, reports each one's
    /// end, and closes its idle ones when told. `/whole` answers `hello`
    /// with a length; `/stream` sends one chunk and then nothing, for ever.
    struct Node {
        url: reqwest::Url,
        accepted: Arc<AtomicUsize>,
        ended: mpsc::UnboundedReceiver<()>,
        close_idle: Arc<Notify>,
    }

    async fn node() -> Node {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let close_idle = Arc::new(Notify::new());
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let (count, close) = (Arc::clone(&accepted), Arc::clone(&close_idle));
        let tasks = crate::tasks::Tasks::new();
        tasks.clone().run(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let (ended_tx, close) = (ended_tx.clone(), Arc::clone(&close));
                tasks.run(async move {
                    let service =
                        hyper::service::service_fn(|request: Request<Incoming>| async move {
                            let body = match request.uri().path() {
                                "/stream" => http_body_util::Either::Left(StreamBody::new(
                                    futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(
                                        Bytes::from_static(b"data: 1\n\n"),
                                    ))])
                                    .chain(futures_util::stream::pending()),
                                )),
                                _ => http_body_util::Either::Right(Full::new(Bytes::from_static(
                                    b"hello",
                                ))),
                            };
                            Ok::<_, Infallible>(hyper::Response::new(body))
                        });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    let mut connection = std::pin::pin!(connection);
                    tokio::select! {
                        _ = connection.as_mut() => {}
                        () = close.notified() => {
                            connection.as_mut().graceful_shutdown();
                            let _ = connection.await;
                        }
                    }
                    let _ = ended_tx.send(());
                });
            }
        });
        Node {
            url: reqwest::Url::parse(&url).unwrap(),
            accepted,
            ended,
            close_idle,
        }
    }

    async fn get(connections: &Arc<Connections>, node: &Node, path: &str) -> reqwest::Response {
        let response = connections
            .send(
                Method::GET,
                &node.url.join(path).unwrap(),
                HeaderMap::new(),
                Bytes::new(),
            )
            .await
            .unwrap_or_else(|failure| panic!("{path}: {failure:?}"));
        assert_eq!(response.status(), 200);
        response
    }

    fn connections(node: &Node) -> Arc<Connections> {
        Connections::for_url(&node.url, Duration::from_secs(5)).unwrap()
    }

    #[tokio::test]
    async fn an_answer_read_to_the_end_gives_its_connection_to_the_next_request() {
        let node = node().await;
        let connections = connections(&node);
        for _ in 0..3 {
            let body = get(&connections, &node, "/whole")
                .await
                .bytes()
                .await
                .unwrap();
            assert_eq!(&body[..], b"hello");
            assert_eq!(connections.idle_count(), 1);
        }
        assert_eq!(node.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let mut node = node().await;
        let connections = connections(&node);
        let mut stream = get(&connections, &node, "/stream").await.bytes_stream();
        assert_eq!(&stream.next().await.unwrap().unwrap()[..], b"data: 1\n\n");
        drop(stream);
        assert_eq!(connections.idle_count(), 0);
        // The node sees the connection end, and the next request has a new one.
        node.ended.recv().await.unwrap();
        get(&connections, &node, "/whole")
            .await
            .bytes()
            .await
            .unwrap();
        assert_eq!(node.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_the_node_closed_is_not_used() {
        let mut node = node().await;
        let connections = connections(&node);
        get(&connections, &node, "/whole")
            .await
            .bytes()
            .await
            .unwrap();
        assert_eq!(connections.idle_count(), 1);
        node.close_idle.notify_waiters();
        node.ended.recv().await.unwrap();
        // Let the runtime's reactor see the close (a poll of its driver).
        tokio::task::yield_now().await;
        let body = get(&connections, &node, "/whole")
            .await
            .bytes()
            .await
            .unwrap();
        assert_eq!(&body[..], b"hello");
        assert_eq!(node.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(connections.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_node_that_refuses_connections_is_a_connect_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url =
            reqwest::Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        drop(listener);
        let connections = Connections::for_url(&url, Duration::from_secs(5)).unwrap();
        let sent = connections
            .send(Method::GET, &url, HeaderMap::new(), Bytes::new())
            .await;
        assert!(
            matches!(sent, Err(Failure::Connect)),
            "{:?}",
            sent.map(|r| r.status())
        );
    }

    #[test]
    fn only_plain_http_urls_get_held_connections() {
        let url = |u| reqwest::Url::parse(u).unwrap();
        let timeout = Duration::from_secs(1);
        let held = Connections::for_url(&url("http://10.0.0.1:8080/v1"), timeout).unwrap();
        assert_eq!(held.authority, "10.0.0.1:8080");
        assert_eq!(held.host, "10.0.0.1:8080");
        let default_port = Connections::for_url(&url("http://node.internal"), timeout).unwrap();
        assert_eq!(default_port.authority, "node.internal:80");
        assert_eq!(default_port.host, "node.internal");
        assert!(Connections::for_url(&url("https://api.openai.com/v1"), timeout).is_none());
    }
}
