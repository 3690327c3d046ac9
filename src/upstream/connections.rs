//! Upstream HTTP/1.1 connections held by the request that uses them,
//! over plain `http://` or TLS.
//!
//! A pooled HTTP client (reqwest, hyper-util's) runs each connection in a
//! task of its own: every read from the upstream wakes that task, which
//! hands the bytes to the requesting task through a channel and wakes it in
//! turn. Here the task that sends a request polls the connection itself,
//! from the request until the last byte of the answer's body (the body
//! polls the connection as it is read), and then puts it back in the node's
//! idle list: one task and one wake-up per read.
//!
//! `https://` connections are made with rustls and the platform's verifier,
//! as reqwest makes them (plus the node's `ca_file`, when it has one),
//! offering HTTP/1.1 by ALPN.
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
//! - a node's connections outlive a config reload while its URL and its
//!   `ca_file`'s certificates stay;
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
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::{self, ClientConfig};
use tokio_util::either::Either;

/// Why an attempt got no answer from the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Nothing reached the upstream: the request may be taken back in full.
    Connect,
    /// No response head within `first_byte_timeout`, or the connection broke
    /// after the request was sent.
    Timeout,
    Broken,
}

/// Idle connections kept per node.
pub(crate) const MAX_IDLE: usize = 256;
/// How long an idle connection is kept (reqwest's default, as before).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// hyper's read buffer per connection: an SSE event or a chunk of a
/// larger answer fits; hyper's own default starts at 8 KiB and grows.
const READ_BUFFER: usize = 4096;

type Stream = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;
type Connection = http1::Connection<TokioIo<Stream>, Full<Bytes>>;

/// The TLS settings of `https://` nodes: rustls with the platform's
/// verifier (the system's trust, as reqwest's), and the PEM CA bundle
/// `ca_pem` trusted besides, offering HTTP/1.1 by ALPN.
pub(crate) fn tls_config(ca_pem: Option<&[u8]>) -> Result<Arc<ClientConfig>, String> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let verifier = match ca_pem {
        None => rustls_platform_verifier::Verifier::new(Arc::clone(&provider)),
        Some(pem) => {
            let certs = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("ca_file is not PEM: {e}"))?;
            rustls_platform_verifier::Verifier::new_with_extra_roots(certs, Arc::clone(&provider))
        }
    }
    .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

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
    /// For an `https://` node: the connector and the name its certificate
    /// must bear.
    tls: Option<(TlsConnector, ServerName<'static>)>,
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
    /// Connections to a base URL: `http://`, or `https://` with `tls`
    /// (from [`tls_config`]); `None` for any other scheme.
    pub(crate) fn for_url(
        base: &reqwest::Url,
        connect_timeout: Duration,
        tls: Option<Arc<ClientConfig>>,
    ) -> Option<Arc<Self>> {
        let host = base.host_str()?;
        let port = base.port_or_known_default()?;
        let tls = match (base.scheme(), tls) {
            ("http", _) => None,
            ("https", Some(config)) => {
                // An IPv6 host is written in brackets.
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                let name = match bare.parse::<std::net::IpAddr>() {
                    Ok(ip) => ServerName::from(ip),
                    Err(_) => ServerName::try_from(bare.to_owned()).ok()?,
                };
                Some((TlsConnector::from(config), name))
            }
            _ => return None,
        };
        // `Host` names the port only where the URL does.
        let host_header = match base.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        Some(Arc::new(Connections {
            authority: format!("{host}:{port}"),
            host: HeaderValue::from_str(&host_header).ok()?,
            tls,
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

    /// A new connection, TLS included, within the connect timeout.
    async fn connect(&self) -> Result<Held, Failure> {
        let timeout = Duration::from_millis(self.connect_timeout_ms.load(Ordering::Relaxed));
        let stream = tokio::time::timeout(timeout, self.open())
            .await
            .map_err(|_| Failure::Connect)??;
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

    async fn open(&self) -> Result<Stream, Failure> {
        let tcp = TcpStream::connect(self.authority.as_str())
            .await
            .map_err(|_| Failure::Connect)?;
        tcp.set_nodelay(true).map_err(|_| Failure::Connect)?;
        match &self.tls {
            None => Ok(Either::Left(tcp)),
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), tcp).await.map_err(|err| {
                    tracing::debug!(error = %err, "TLS handshake with a node failed");
                    Failure::Connect
                })?;
                Ok(Either::Right(tls))
            }
        }
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

    /// GETs `path` and reads the answer whole.
    async fn get_whole(connections: &Arc<Connections>, node: &Node, path: &str) -> Bytes {
        get(connections, node, path).await.bytes().await.unwrap()
    }

    fn connections(node: &Node) -> Arc<Connections> {
        Connections::for_url(&node.url, Duration::from_secs(5), None).unwrap()
    }

    #[tokio::test]
    async fn an_answer_read_to_the_end_gives_its_connection_to_the_next_request() {
        let node = node().await;
        let connections = connections(&node);
        for _ in 0..3 {
            let body = get_whole(&connections, &node, "/whole").await;
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
        get_whole(&connections, &node, "/whole").await;
        assert_eq!(node.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_the_node_closed_is_not_used() {
        let mut node = node().await;
        let connections = connections(&node);
        get_whole(&connections, &node, "/whole").await;
        assert_eq!(connections.idle_count(), 1);
        node.close_idle.notify_waiters();
        node.ended.recv().await.unwrap();
        // Let the runtime's reactor see the close (a poll of its driver).
        tokio::task::yield_now().await;
        let body = get_whole(&connections, &node, "/whole").await;
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
        let connections = Connections::for_url(&url, Duration::from_secs(5), None).unwrap();
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
    fn http_urls_and_https_urls_with_tls_get_held_connections() {
        let url = |u| reqwest::Url::parse(u).unwrap();
        let timeout = Duration::from_secs(1);
        let held = Connections::for_url(&url("http://10.0.0.1:8080/v1"), timeout, None).unwrap();
        assert_eq!(held.authority, "10.0.0.1:8080");
        assert_eq!(held.host, "10.0.0.1:8080");
        let default_port =
            Connections::for_url(&url("http://node.internal"), timeout, None).unwrap();
        assert_eq!(default_port.authority, "node.internal:80");
        assert_eq!(default_port.host, "node.internal");
        let tls = tls_config(None).unwrap();
        let https = Connections::for_url(&url("https://api.openai.com/v1"), timeout, Some(tls));
        let https = https.unwrap();
        assert_eq!(https.authority, "api.openai.com:443");
        assert!(https.tls.is_some());
        assert!(Connections::for_url(&url("https://api.openai.com/v1"), timeout, None).is_none());
    }
}
