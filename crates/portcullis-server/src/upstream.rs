//! The client side towards backends: a connection taken from the worker's pool or opened, the
//! response heads read from it, and what can go wrong before one arrives. It owns no client
//! connection's state — buffers are the caller's — so that the same client can carry requests
//! of the proxy's own (auth callouts, key fetches) as well as forwarded ones.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;

use bytes::{Bytes, BytesMut};
use monoio::net::TcpStream;
use monoio::time::{Instant, timeout};
use portcullis_http::{HeadError, HeadScanner, Limits, Reaction, ResponseHead, Side};
use portcullis_tls::{PlainStream, Stream};

use crate::pool::Pool;
use crate::relay::RelayError;
use crate::snapshot::Backend;
use crate::timer::Timer;

/// A stream to a backend. Plain TCP today; a TLS stream takes this place for backends with
/// `tls`, behind the same [`Stream`] interface.
pub(crate) type BackendStream = PlainStream<TcpStream>;

/// What a pooled connection was made for: a connection is reused only for a request that would
/// have made the same one. The address and the name it is reached by (the `Host` for plain
/// backends; with TLS, the server name, and the client certificate and trust join the key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) addr: SocketAddr,
    pub(crate) authority: Bytes,
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
}

impl Upstream {
    /// A pooled connection to `backend` that has nothing to say, or a new one.
    pub(crate) async fn checkout(pool: &RefCell<Pool>, backend: &Backend) -> Result<Upstream, UpstreamError> {
        loop {
            let Some(stream) = pool.borrow_mut().take(&backend.pool_key, backend.idle_timeout) else {
                break;
            };
            // Every time, however short the idle spell (one non-blocking syscall): a close or a
            // stray byte can arrive a microsecond after the last response, and a request sent on
            // such a connection either fails where it cannot be retried (POST) or reads the stray
            // bytes as its answer, and its own answer then as the next request's.
            if idle_connection_is_clean(&stream) {
                return Ok(Upstream { stream, reused: true });
            }
            tracing::debug!(backend = %backend.name, "pooled connection closed or sent unsolicited bytes; discarded");
        }
        match timeout(backend.connect_timeout, TcpStream::connect_addr(backend.addr)).await {
            Ok(Ok(c)) => {
                let _ = c.set_nodelay(true);
                pool.borrow_mut().opened += 1;
                Ok(Upstream { stream: PlainStream::new(c), reused: false })
            }
            Ok(Err(e)) => Err(UpstreamError::Connect(e)),
            Err(_) => Err(UpstreamError::ConnectTimeout),
        }
    }

    /// Gives the connection back to the pool for `backend`.
    pub(crate) fn release(self, pool: &RefCell<Pool>, backend: &Backend) {
        pool.borrow_mut().put(&backend.pool_key, self.stream, backend.max_idle);
    }

    /// Reads the next response head (interim or final) into `head`, from `buf` and then the
    /// connection, by `deadline`. A `101` is refused: the proxy does not switch protocols.
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
                    return Ok(());
                }
                Ok(None) => {}
                Err(e) => return Err(UpstreamError::BadResponse(e)),
            }
            match timer.until(deadline, pin!(self.stream.read_buf(buf))).await {
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
                Ok(Err(e)) if !progress.received => return Err(UpstreamError::Lost(e)),
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
