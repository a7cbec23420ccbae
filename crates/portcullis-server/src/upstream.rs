//! The client side towards backends: a connection taken from the worker's pool or opened, the
//! response heads read from it, and what can go wrong before one arrives. It owns no client
//! connection's state — buffers are the caller's — so that the same client can carry requests
//! of the proxy's own (auth callouts, key fetches) as well as forwarded ones.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::net::TcpStream;
use monoio::time::{Instant, timeout};
use portcullis_http::forward::BodyMode;
use portcullis_http::{
    ChunkedDecoder, ChunkedOutput, Decoded, HeadError, HeadScanner, Limits, Reaction, ResponseHead, Side,
};
use portcullis_tls::{ClientTls, PlainStream, Stream, TlsStream};

use crate::pool::Pool;
use crate::relay::RelayError;
use crate::stats::PoolEvent;
use crate::timer::Timer;

/// A connection the proxy opened: to a backend, a service it calls, Redis. Plain TCP or TLS,
/// behind the one [`Stream`] interface.
pub(crate) enum BackendStream {
    Plain(PlainStream<TcpStream>),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream for BackendStream {
    async fn read_buf(&mut self, dst: &mut BytesMut) -> io::Result<usize> {
        match self {
            BackendStream::Plain(s) => s.read_buf(dst).await,
            BackendStream::Tls(s) => s.read_buf(dst).await,
        }
    }

    async fn write_all_buf(&mut self, src: &mut BytesMut) -> io::Result<()> {
        match self {
            BackendStream::Plain(s) => s.write_all_buf(src).await,
            BackendStream::Tls(s) => s.write_all_buf(src).await,
        }
    }

    async fn close(&mut self) -> io::Result<()> {
        match self {
            BackendStream::Plain(s) => s.close().await,
            BackendStream::Tls(s) => s.close().await,
        }
    }

    async fn finish(&mut self) -> io::Result<()> {
        match self {
            BackendStream::Plain(s) => s.finish().await,
            BackendStream::Tls(s) => s.finish().await,
        }
    }

    async fn read_buf_cancelable(
        &mut self,
        dst: &mut BytesMut,
        cancel: monoio::io::CancelHandle,
    ) -> io::Result<usize> {
        match self {
            BackendStream::Plain(s) => s.read_buf_cancelable(dst, cancel).await,
            BackendStream::Tls(s) => s.read_buf_cancelable(dst, cancel).await,
        }
    }

    async fn wait_readable(&mut self) -> io::Result<()> {
        match self {
            BackendStream::Plain(s) => s.wait_readable().await,
            BackendStream::Tls(s) => s.wait_readable().await,
        }
    }

    async fn read_raw(&mut self, dst: &mut BytesMut) -> io::Result<usize> {
        match self {
            BackendStream::Plain(s) => s.read_raw(dst).await,
            BackendStream::Tls(s) => s.read_raw(dst).await,
        }
    }

    fn shrink(&mut self) {
        match self {
            BackendStream::Plain(s) => s.shrink(),
            BackendStream::Tls(s) => s.shrink(),
        }
    }

    fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BackendStream::Plain(s) => s.peek(buf),
            BackendStream::Tls(s) => s.peek(buf),
        }
    }
}

/// TLS towards a target: the client context (trust, the proxy's own certificate), the name sent
/// and checked, and an id of what the context was made from.
pub(crate) struct UpstreamTls {
    pub(crate) client: ClientTls,
    pub(crate) server_name: String,
    /// A digest of the files and settings the context was made from: pooled connections and
    /// sessions are kept under it, so a certificate rotated on reload opens new ones.
    pub(crate) id: u64,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls").field("server_name", &self.server_name).field("id", &self.id).finish()
    }
}

/// What a pooled connection was made for: a connection is reused only for a request that would
/// have made the same one. The address and the name it is reached by (the `Host` for plain
/// backends), and for TLS the id of its context (trust, client certificate, server name).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) addr: SocketAddr,
    pub(crate) authority: Bytes,
    /// [`UpstreamTls::id`]; 0 for plain TCP.
    pub(crate) tls: u64,
}

/// Where upstream connections go and how they are kept: a configured backend's, or a service
/// the proxy calls on its own account (an auth callout, an identity provider).
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) key: PoolKey,
    /// For a server named by a host name: its address as last resolved (the control side
    /// resolves it again now and then); connections go there. `None`: `key.addr`, an address
    /// literal.
    pub(crate) resolved: Option<Arc<arc_swap::ArcSwap<SocketAddr>>>,
    pub(crate) tls: Option<Arc<UpstreamTls>>,
    /// For connecting, the TLS handshake included.
    pub(crate) connect_timeout: Duration,
    /// How long an idle connection is kept in the pool.
    pub(crate) idle_timeout: Duration,
    /// Idle connections kept per worker.
    pub(crate) max_idle: usize,
    /// Connection events, for `/metrics` (none for the proxy's own tests' targets).
    pub(crate) counters: Option<Arc<crate::stats::PoolCounters>>,
}

impl Target {
    /// Where connections go now: the address last resolved, or `key.addr`.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.resolved.as_ref().map_or(self.key.addr, |r| **r.load())
    }
}

/// A connection to a backend, for one exchange at a time.
pub(crate) struct Upstream {
    pub(crate) stream: BackendStream,
    /// It came from the pool: the backend may have closed it just now, so a failure before any
    /// response byte may be retried on a fresh one.
    pub(crate) reused: bool,
}

/// How far reading a response head has come (kept across the interim responses of one
/// exchange).
#[derive(Debug, Default)]
pub(crate) struct HeadProgress {
    scanner: HeadScanner,
    /// Some byte of a response arrived: a close from now on is a broken response, not a stale
    /// connection.
    received: bool,
    /// Interim responses read so far.
    interim: u32,
}

/// A whole response to a request of the proxy's own: its head, and its body decoded.
#[derive(Debug, Default)]
pub(crate) struct Fetched {
    pub(crate) head: ResponseHead,
    pub(crate) body: BytesMut,
}

impl Upstream {
    /// A pooled connection to `target` that has nothing to say, or a new one.
    pub(crate) async fn checkout(pool: &RefCell<Pool>, target: &Target) -> Result<Upstream, UpstreamError> {
        loop {
            let Some(stream) = pool.borrow_mut().take(&target.key) else {
                break;
            };
            // Every time, however short the idle spell (one non-blocking syscall): a close or a
            // stray byte can arrive a microsecond after the last response, and a request sent on
            // such a connection either fails where it cannot be retried (POST) or reads the stray
            // bytes as its answer, and its own answer then as the next request's.
            if idle_connection_is_clean(&stream) {
                count(pool, target, PoolEvent::Reused);
                return Ok(Upstream { stream, reused: true });
            }
            count(pool, target, PoolEvent::Stale);
            tracing::debug!(addr = %target.key.addr, "pooled connection closed or sent unsolicited bytes; discarded");
        }
        let deadline = Instant::now() + target.connect_timeout;
        let addr = target.addr();
        let tcp = match timeout(target.connect_timeout, TcpStream::connect_addr(addr)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                count(pool, target, PoolEvent::Failed);
                return Err(UpstreamError::Connect(e));
            }
            Err(_) => {
                count(pool, target, PoolEvent::Failed);
                return Err(UpstreamError::ConnectTimeout);
            }
        };
        let _ = tcp.set_nodelay(true);
        count(pool, target, PoolEvent::Opened);
        let Some(tls) = &target.tls else {
            pool.borrow_mut().opened += 1;
            return Ok(Upstream { stream: BackendStream::Plain(PlainStream::new(tcp)), reused: false });
        };
        let session = pool.borrow().session(&target.key, Arc::as_ptr(tls) as usize);
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, tls.client.connect_resuming(&tls.server_name, tcp, session.as_ref())).await {
            Ok(Ok(stream)) => {
                if stream.info().resumed {
                    count(pool, target, PoolEvent::Resumed);
                }
                let mut pool = pool.borrow_mut();
                pool.opened += 1;
                pool.resumed += u64::from(stream.info().resumed);
                Ok(Upstream { stream: BackendStream::Tls(Box::new(stream)), reused: false })
            }
            Ok(Err(e)) => {
                count(pool, target, PoolEvent::Failed);
                // A session the server will not take is not offered again.
                pool.borrow_mut().forget_session(&target.key);
                Err(UpstreamError::Handshake(e))
            }
            Err(_) => {
                count(pool, target, PoolEvent::Failed);
                Err(UpstreamError::ConnectTimeout)
            }
        }
    }

    /// Done with the connection: the TLS session the server granted on it is kept for the next
    /// connection to `target`, and the connection goes back to the pool when `reusable`.
    pub(crate) fn finish(mut self, pool: &RefCell<Pool>, target: &Target, reusable: bool) {
        if let (BackendStream::Tls(s), Some(tls)) = (&mut self.stream, &target.tls)
            && let Some(session) = s.take_session()
        {
            pool.borrow_mut().keep_session(&target.key, Arc::as_ptr(tls) as usize, session);
        }
        if reusable {
            pool.borrow_mut().put(target, self.stream);
        }
    }

    /// Sends what `out` holds (a request head, and a body if any) by `deadline`. A connection
    /// that fails here has answered nothing: `Lost`, which a caller may retry if it was reused.
    pub(crate) async fn send(
        &mut self,
        out: &mut BytesMut,
        timer: &mut Timer,
        deadline: Instant,
    ) -> Result<(), UpstreamError> {
        let written = timer.until(deadline, pin!(self.stream.write_all_buf(out))).await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.lost(e)),
            Err(_) => Err(UpstreamError::Timeout),
        }
    }

    /// The connection failed before any response byte. On a new TLS connection, a TLS error
    /// then is the end of the handshake: in TLS 1.3 a server refuses the client's certificate
    /// only after the client has finished, with an alert that the first read finds.
    fn lost(&self, e: io::Error) -> UpstreamError {
        if !self.reused
            && matches!(self.stream, BackendStream::Tls(_))
            && e.kind() == io::ErrorKind::InvalidData
        {
            return UpstreamError::Handshake(format!("TLS handshake failed: the backend sent {e}"));
        }
        UpstreamError::Lost(e)
    }

    /// Reads the next response head (interim or final) into `head`, from `buf` and then the
    /// connection, by `deadline`. A `101` is refused: the proxy does not switch protocols. More
    /// than [`MAX_INTERIM_RESPONSES`] interim responses are refused too: a backend that only
    /// ever says "wait" is bounded by count as well as by the deadline.
    pub(crate) async fn read_head(
        &mut self,
        buf: &mut BytesMut,
        head: &mut ResponseHead,
        progress: &mut HeadProgress,
        timer: &mut Timer,
        deadline: Instant,
    ) -> Result<(), UpstreamError> {
        loop {
            match progress.scanner.scan(buf, RESPONSE_LIMITS.max_head_size) {
                Ok(Some(len)) => {
                    progress.scanner.reset();
                    head.parse(buf, len, &RESPONSE_LIMITS).map_err(UpstreamError::BadResponse)?;
                    if head.status() == 101 {
                        return Err(UpstreamError::BadResponse(HeadError::Malformed(
                            "101 Switching Protocols",
                        )));
                    }
                    if head.is_informational() {
                        progress.interim += 1;
                        if progress.interim > MAX_INTERIM_RESPONSES {
                            return Err(UpstreamError::BadResponse(HeadError::Malformed(
                                "too many interim responses",
                            )));
                        }
                    }
                    return Ok(());
                }
                Ok(None) => {}
                Err(e) => return Err(UpstreamError::BadResponse(e)),
            }
            let read = timer.until(deadline, pin!(self.stream.read_buf(buf))).await;
            match read {
                Err(_) => return Err(UpstreamError::Timeout),
                Ok(Ok(0)) if !progress.received => {
                    return Err(UpstreamError::Lost(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed before responding",
                    )));
                }
                Ok(Ok(0)) => {
                    return Err(UpstreamError::BadResponse(HeadError::Malformed(
                        "closed in the middle of the head",
                    )));
                }
                Ok(Ok(_)) => progress.received = true,
                Ok(Err(e)) if !progress.received => return Err(self.lost(e)),
                Ok(Err(e)) => {
                    return Err(UpstreamError::BadResponse(HeadError::Malformed(
                        if e.kind() == io::ErrorKind::ConnectionReset {
                            "reset in the middle of the head"
                        } else {
                            "read error in the middle of the head"
                        },
                    )));
                }
            }
        }
    }

    /// One request of the proxy's own (an auth callout, a key fetch) to `target`: `request`
    /// (head and body, written by the caller) sent on a pooled or new connection, the final
    /// response read into `into` with interim responses skipped, its body decoded and bounded by
    /// `max_body` bytes, everything by `response_timeout`. The connection goes back to the pool
    /// when the response left it reusable. A stale pooled connection is replaced once, as for
    /// forwarded requests, when the request is `repeatable` (else the failure stands: the
    /// service may have acted on it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn fetch(
        pool: &RefCell<Pool>,
        target: &Target,
        (request, repeatable): (&Bytes, bool),
        into: &mut Fetched,
        max_body: usize,
        timer: &mut Timer,
        response_timeout: Duration,
    ) -> Result<(), UpstreamError> {
        let deadline = Instant::now() + response_timeout;
        let mut buf = BytesMut::with_capacity(4096);
        let mut up = loop {
            let mut up = Upstream::checkout(pool, target).await?;
            let mut out = BytesMut::from(&request[..]);
            buf.clear();
            let mut progress = HeadProgress::default();
            let result = async {
                up.send(&mut out, timer, deadline).await?;
                loop {
                    up.read_head(&mut buf, &mut into.head, &mut progress, timer, deadline).await?;
                    if !into.head.is_informational() {
                        return Ok(());
                    }
                }
            }
            .await;
            match result {
                Ok(()) => break up,
                Err(UpstreamError::Lost(_)) if up.reused && repeatable => continue,
                Err(e) => return Err(e),
            }
        };
        let (mode, _) = portcullis_http::forward::response_body(&into.head, false, false);
        into.body.clear();
        let reusable = up.read_body(mode, &mut buf, &mut into.body, max_body, timer, deadline).await?;
        up.finish(pool, target, reusable && into.head.keep_alive() && buf.is_empty());
        Ok(())
    }

    /// Reads a response body as `mode` frames it into `body` (decoded), after what `buf` already
    /// holds. Returns whether the connection is at a message boundary (reusable).
    async fn read_body(
        &mut self,
        mode: BodyMode,
        buf: &mut BytesMut,
        body: &mut BytesMut,
        max_body: usize,
        timer: &mut Timer,
        deadline: Instant,
    ) -> Result<bool, UpstreamError> {
        let too_large = || UpstreamError::BadResponse(HeadError::Malformed("response body too large"));
        let mut chunked = match mode {
            BodyMode::None => return Ok(true),
            BodyMode::Length(n) if n > max_body as u64 => return Err(too_large()),
            BodyMode::Chunked(_) => Some(ChunkedDecoder::new(ChunkedOutput::DataOnly)),
            _ => None,
        };
        loop {
            match (&mode, chunked.as_mut()) {
                (BodyMode::Length(n), _) if buf.len() as u64 >= *n => {
                    body.extend_from_slice(&buf.split_to(*n as usize));
                    return Ok(true);
                }
                (_, Some(decoder)) => {
                    let done = decoder
                        .decode(buf, body)
                        .map_err(|e| UpstreamError::BadResponse(HeadError::Malformed(e.0)))?;
                    if body.len() > max_body {
                        return Err(too_large());
                    }
                    if done == Decoded::Done {
                        return Ok(true);
                    }
                }
                (BodyMode::UntilClose { .. }, None) if buf.len() > max_body => return Err(too_large()),
                _ => {}
            }
            let read = timer.until(deadline, pin!(self.stream.read_buf(buf))).await;
            match read {
                Err(_) => return Err(UpstreamError::Timeout),
                Ok(Ok(0)) if matches!(mode, BodyMode::UntilClose { .. }) => {
                    body.extend_from_slice(buf);
                    buf.clear();
                    return Ok(false);
                }
                Ok(Ok(0)) => {
                    return Err(UpstreamError::BadResponse(HeadError::Malformed(
                        "closed in the middle of the body",
                    )));
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) => {
                    return Err(UpstreamError::BadResponse(HeadError::Malformed(
                        "read error in the middle of the body",
                    )));
                }
            }
        }
    }
}

/// Counts connection event `event` for `target` on the worker that owns `pool`.
fn count(pool: &RefCell<Pool>, target: &Target, event: PoolEvent) {
    if let Some(c) = &target.counters {
        c.count(pool.borrow().worker, event);
    }
}

/// Interim (1xx) responses accepted before the final one.
pub(crate) const MAX_INTERIM_RESPONSES: u32 = 16;
/// Limits for backend response heads: backends are trusted more than clients, not blindly.
pub(crate) const RESPONSE_LIMITS: Limits = Limits { max_head_size: 64 * 1024, max_headers: 256 };

/// Why a backend exchange failed before a response head arrived.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    Connect(io::Error),
    ConnectTimeout,
    /// The TLS handshake failed: the backend's certificate was not trusted or not for its name,
    /// it refused the proxy's, or it does not speak TLS.
    Handshake(String),
    /// The connection failed or closed before any response byte: a stale pooled connection looks
    /// like this, and such a request may be sent again.
    Lost(io::Error),
    Timeout,
    BadResponse(HeadError),
    /// The request body could not be relayed; the response is already decided.
    RequestBody(RelayError),
}

impl UpstreamError {
    /// Whose fault it was: the backend's, or the client's when its request body failed.
    pub(crate) fn side(&self) -> Side {
        match self {
            UpstreamError::RequestBody(e) => e.side(),
            _ => Side::Backend,
        }
    }

    /// Why the proxy answered itself, for the access log's `refused` field.
    pub(crate) fn refusal(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "backend unreachable",
            UpstreamError::ConnectTimeout => "backend connect timed out",
            UpstreamError::Handshake(_) => "backend TLS handshake failed",
            UpstreamError::Lost(_) => "backend closed before responding",
            UpstreamError::Timeout => "backend response timed out",
            UpstreamError::BadResponse(_) => "invalid backend response",
            UpstreamError::RequestBody(RelayError::SourceTimeout) => "request body timed out",
            UpstreamError::RequestBody(RelayError::SourceFraming(_)) => "malformed request body",
            UpstreamError::RequestBody(RelayError::SourceTooLarge) => "body larger than max_body_size",
            UpstreamError::RequestBody(RelayError::Destination(_)) => "backend stopped reading the body",
            UpstreamError::RequestBody(_) => "client went away during the body",
        }
    }

    /// What the client is told. Backend details go to the log only.
    pub(crate) fn reaction(&self) -> Reaction {
        match self {
            UpstreamError::ConnectTimeout | UpstreamError::Timeout => {
                Reaction::Respond(504, "Gateway timeout")
            }
            UpstreamError::RequestBody(RelayError::SourceTimeout) => {
                Reaction::Respond(408, "Request timeout")
            }
            UpstreamError::RequestBody(RelayError::SourceFraming(_)) => Reaction::Respond(400, "Bad request"),
            UpstreamError::RequestBody(RelayError::SourceTooLarge) => {
                Reaction::Respond(413, "Request body too large")
            }
            // The client went away while sending the body: nobody to answer.
            UpstreamError::RequestBody(RelayError::SourceClosed | RelayError::SourceIo(_)) => Reaction::Close,
            _ => Reaction::Respond(502, "Bad gateway"),
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "connect failed: {e}"),
            UpstreamError::ConnectTimeout => f.write_str("connect timed out"),
            UpstreamError::Handshake(e) => f.write_str(e),
            UpstreamError::Lost(e) => write!(f, "connection lost before the response: {e}"),
            UpstreamError::Timeout => f.write_str("no response in time"),
            UpstreamError::BadResponse(e) => write!(f, "invalid response: {e}"),
            UpstreamError::RequestBody(e) => write!(f, "request body: {e}"),
        }
    }
}

/// Whether an idle pooled connection has nothing to say: a backend that closed it (EOF) or sent
/// bytes nobody asked for (a late 408, say) must not answer the next client's request.
pub(crate) fn idle_connection_is_clean(stream: &BackendStream) -> bool {
    matches!(stream.peek(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::mpsc;

    use super::*;

    /// A service on 127.0.0.1 that answers each request it reads with the next of `replies`,
    /// closing the connection after a reply that ends in `None`. Sends each request it read,
    /// tagged with the number of the connection it came on, to the returned channel.
    fn service(replies: Vec<(&'static [u8], bool)>) -> (SocketAddr, mpsc::Receiver<(usize, Vec<u8>)>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut replies = replies.into_iter();
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { return };
                loop {
                    let mut request = Vec::new();
                    let mut byte = [0u8; 1];
                    while !request.ends_with(b"\r\n\r\n") {
                        match conn.read(&mut byte) {
                            Ok(1) => request.push(byte[0]),
                            _ => break,
                        }
                    }
                    if request.is_empty() {
                        break;
                    }
                    let _ = tx.send((n, request));
                    let Some((reply, keep)) = replies.next() else { return };
                    let _ = conn.write_all(reply);
                    if !keep {
                        break;
                    }
                }
            }
        });
        (addr, rx)
    }

    fn target(addr: SocketAddr) -> Target {
        Target {
            key: PoolKey { addr, authority: Bytes::from_static(b"devauth.internal"), tls: 0 },
            resolved: None,
            tls: None,
            counters: None,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_idle: 4,
        }
    }

    fn run<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    const REQUEST: &[u8] = b"GET /check?deviceId=7 HTTP/1.1\r\nHost: devauth.internal\r\n\r\n";

    async fn fetch(pool: &RefCell<Pool>, target: &Target, into: &mut Fetched) -> Result<(), UpstreamError> {
        let request = Bytes::from_static(REQUEST);
        Upstream::fetch(pool, target, (&request, true), into, 64, &mut Timer::new(), Duration::from_secs(5))
            .await
    }

    #[test]
    fn fetches_from_a_target_that_is_no_backend_and_reuses_the_connection() {
        let (addr, requests) = service(vec![
            (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"ok\"\r\n1\r\n}\r\n0\r\n\r\n", true),
            (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno", true),
        ]);
        let pool = RefCell::new(Pool::default());
        let target = target(addr);
        let mut got = Fetched::default();
        run(async {
            fetch(&pool, &target, &mut got).await.expect("first");
            assert_eq!(got.head.status(), 200);
            assert_eq!(&got.body[..], b"{\"ok\"}");
            fetch(&pool, &target, &mut got).await.expect("second");
            assert_eq!(got.head.status(), 403);
            assert_eq!(&got.body[..], b"no");
        });
        assert_eq!(pool.borrow().opened, 1, "the second request reused the pooled connection");
        let seen: Vec<_> = requests.try_iter().collect();
        assert_eq!(seen, vec![(0, REQUEST.to_vec()), (0, REQUEST.to_vec())]);
    }

    #[test]
    fn a_connection_the_service_closed_is_replaced() {
        // The first reply says keep-alive, and the service closes anyway: the pooled connection
        // is found closed (or fails on use) and the request goes out on a new one.
        let (addr, requests) = service(vec![
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb", true),
        ]);
        let pool = RefCell::new(Pool::default());
        let target = target(addr);
        let mut got = Fetched::default();
        run(async {
            fetch(&pool, &target, &mut got).await.expect("first");
            monoio::time::sleep(Duration::from_millis(50)).await;
            fetch(&pool, &target, &mut got).await.expect("second");
            assert_eq!(&got.body[..], b"b");
        });
        assert_eq!(pool.borrow().opened, 2);
        assert_eq!(requests.try_iter().map(|(n, _)| n).collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn odd_answers_are_errors_and_the_connection_is_not_kept() {
        let interim: &'static [u8] = {
            let mut v = b"HTTP/1.1 102 Processing\r\n\r\n".repeat(MAX_INTERIM_RESPONSES as usize + 1);
            v.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
            v.leak()
        };
        let cases: [(&'static [u8], &str); 5] = [
            (interim, "too many interim responses"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 65\r\n\r\n", "response body too large"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "closed in the middle of the body"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid"),
            (b"HTTP/1.1 200 OK\r\n\r\n0123456789012345678901234567890123456789012345678901234567890123456789", "response body too large"),
        ];
        for (reply, expected) in cases {
            let (addr, _requests) = service(vec![(reply, false)]);
            let pool = RefCell::new(Pool::default());
            let target = target(addr);
            let mut got = Fetched::default();
            let err = run(fetch(&pool, &target, &mut got)).expect_err(expected);
            assert!(matches!(err, UpstreamError::BadResponse(_)), "{expected}: {err}");
            assert!(err.to_string().contains(expected), "{expected}: {err}");
            assert!(pool.borrow_mut().take(&target.key).is_none(), "{expected}: kept");
        }
    }

    #[test]
    fn a_service_that_does_not_answer_times_out_and_one_that_is_gone_is_unreachable() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pool = RefCell::new(Pool::default());
        let request = Bytes::from_static(REQUEST);
        let mut got = Fetched::default();
        let err = run(Upstream::fetch(
            &pool,
            &target(addr),
            (&request, true),
            &mut got,
            64,
            &mut Timer::new(),
            Duration::from_millis(100),
        ))
        .expect_err("silent service");
        assert!(matches!(err, UpstreamError::Timeout), "{err}");
        drop(listener);
        let err = run(fetch(&pool, &target(addr), &mut got)).expect_err("closed port");
        assert!(matches!(err, UpstreamError::Connect(_)), "{err}");
    }
}
