//! One client connection: handshake, then request after request — read the head, route, run
//! policy, forward to the backend, relay the response.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::net::TcpStream;
use monoio::time::{Instant, timeout, timeout_at};
use portcullis_config::ClientCertMode;
use portcullis_http::{
    ChunkedDecoder, ChunkedError, ChunkedOutput, Decoded, Framing, HeadError, HeadScanner, Limits,
    RequestHead, ResponseHead, Version, write,
};
use portcullis_policy::{ApiPolicy, Facts, HeaderEdits, HeaderList, Response, Verdict};
use portcullis_tls::{PlainStream, SessionInfo, Stream};

use crate::snapshot::{Backend, Route, Snapshot, forwarded_path, strip_port};
use crate::timer::Timer;
use crate::worker::Worker;

/// Added to every request forwarded (RFC 9110 §7.6.3).
const VIA: &[u8] = b"1.1 portcullis";

/// How long an idle client connection keeps its buffers before giving them back.
const SHRINK_AFTER: Duration = Duration::from_secs(2);
/// Longest a write to a client may block (a client that does not read is dropped).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Interim (1xx) responses accepted before the final one.
const MAX_INTERIM_RESPONSES: u32 = 16;
/// How long a backend that stopped taking a request body gets to show the answer it sent.
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(1);
/// After a response to a request that was not read whole, how long (and how much) to keep
/// reading and dropping the client's bytes before closing.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// Limits for backend response heads: backends are trusted more than clients, not blindly.
const RESPONSE_LIMITS: Limits = Limits { max_head_size: 64 * 1024, max_headers: 256 };

/// The id of the request a connection is serving, for the log line should it panic.
pub(crate) type CurrentRequest = Rc<Cell<Option<[u8; 16]>>>;

pub(crate) async fn serve(
    worker: Rc<Worker>,
    tcp: TcpStream,
    peer: SocketAddr,
    listener: usize,
    current: CurrentRequest,
) {
    let snap = worker.snapshot();
    let Some(acceptor) = snap.listeners.get(listener).cloned() else { return };
    let handshake_timeout = snap.server.handshake_timeout;
    let access_log = snap.server.access_log;
    drop(snap);
    let tls = match timeout(handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            match &e {
                portcullis_tls::HandshakeError::CertificateRejected(_) => {
                    tracing::info!(%peer, error = %e, "TLS handshake refused");
                    if access_log {
                        tracing::info!(target: "portcullis::access", id = "-", %peer, status = "-", refused = %e);
                    }
                }
                _ => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            }
            return;
        }
        Err(_) => {
            tracing::info!(%peer, timeout_ms = handshake_timeout.as_millis() as u64, "TLS handshake timed out");
            if access_log {
                tracing::info!(target: "portcullis::access", id = "-", %peer, status = "-", refused = "TLS handshake timed out");
            }
            return;
        }
    };
    let info = tls.info().clone();
    let mut conn = Conn {
        worker,
        peer,
        peer_ip: Rc::from(peer.ip().to_string()),
        client: tls,
        info,
        rbuf: BytesMut::new(),
        out: BytesMut::new(),
        ubuf: BytesMut::new(),
        scanner: HeadScanner::default(),
        head: RequestHead::default(),
        resp: ResponseHead::default(),
        edits: HeaderEdits::default(),
        path: Vec::new(),
        unread_input: false,
        interim_sent: false,
        connection_refused: false,
        current,
        acceptor,
        idle_timer: Timer::new(),
        io_timer: Timer::new(),
        canceller: monoio::io::Canceller::new(),
    };
    conn.run().await;
}

/// Why reading a request head stopped short.
enum HeadFailure {
    Invalid(HeadError),
    Timeout,
}

/// Why relaying a body stopped short, and on which side.
#[derive(Debug)]
enum RelayError {
    SourceIo(io::Error),
    SourceTimeout,
    SourceClosed,
    SourceFraming(ChunkedError),
    /// More than `server.max_body_size`.
    SourceTooLarge,
    Destination(io::Error),
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayError::SourceIo(e) => write!(f, "read failed: {e}"),
            RelayError::SourceTimeout => f.write_str("read timed out"),
            RelayError::SourceClosed => f.write_str("closed before the end of the body"),
            RelayError::SourceFraming(e) => write!(f, "{e}"),
            RelayError::SourceTooLarge => f.write_str("body larger than server.max_body_size"),
            RelayError::Destination(e) => write!(f, "write failed: {e}"),
        }
    }
}

/// How a body is delimited on the way in and re-delimited on the way out.
#[derive(Debug, Clone, Copy)]
enum BodyMode {
    None,
    Length(u64),
    Chunked(ChunkedOutput),
    /// Until the source closes; `chunk` re-frames it as chunked for the destination.
    UntilClose {
        chunk: bool,
    },
}

/// Why a backend exchange failed before a response head arrived.
#[derive(Debug)]
enum UpstreamError {
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

/// The fields of a request as policy sees them: identity headers the client sent are invisible.
struct RequestFields<'a> {
    head: &'a RequestHead,
    identity: &'a [Bytes],
}

/// Whether `name` is one of the identity headers, or folds to one the way CGI and WSGI fold
/// names (`_` read as `-`, any case): `X_Client_Cert_Subject` is `X-Client-Cert-Subject` to them.
fn is_identity(identity: &[Bytes], name: &[u8]) -> bool {
    identity.iter().any(|n| {
        n.len() == name.len()
            && n.iter().zip(name).all(|(&a, &b)| a.eq_ignore_ascii_case(&b) || (a == b'-' && b == b'_'))
    })
}

impl HeaderList for RequestFields<'_> {
    fn count(&self) -> usize {
        self.head.field_count()
    }

    fn name(&self, i: usize) -> &[u8] {
        let name = self.head.field(i).0;
        if is_identity(self.identity, name) { b"" } else { name }
    }

    fn value(&self, i: usize) -> &[u8] {
        let (name, value, _) = self.head.field(i);
        if is_identity(self.identity, name) { b"" } else { value }
    }
}

struct ResponseFields<'a>(&'a ResponseHead);

impl HeaderList for ResponseFields<'_> {
    fn count(&self) -> usize {
        self.0.field_count()
    }

    fn name(&self, i: usize) -> &[u8] {
        self.0.field(i).0
    }

    fn value(&self, i: usize) -> &[u8] {
        self.0.field(i).1
    }
}

/// Whether an idle pooled connection has nothing to say: a backend that closed it (EOF) or sent
/// bytes nobody asked for (a late 408, say) must not answer the next client's request.
fn idle_connection_is_clean(stream: &TcpStream) -> bool {
    use portcullis_tls::Readiness as _;
    matches!(stream.peek(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Methods that may be sent again when a connection fails before any answer (RFC 9110 §9.2.2).
fn is_idempotent(method: &[u8]) -> bool {
    matches!(method, b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE")
}

fn is_forwarding_header(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"x-forwarded-for") || name.eq_ignore_ascii_case(b"x-forwarded-proto")
}

struct Conn<S> {
    worker: Rc<Worker>,
    peer: SocketAddr,
    /// `peer`'s IP as text, for X-Forwarded-For and `{request.ip}` (formatted once).
    peer_ip: Rc<str>,
    client: S,
    info: SessionInfo,
    /// Bytes read from the client, not yet consumed.
    rbuf: BytesMut,
    /// Bytes being prepared for a write (to either side).
    out: BytesMut,
    /// Bytes read from the backend, not yet consumed.
    ubuf: BytesMut,
    scanner: HeadScanner,
    head: RequestHead,
    resp: ResponseHead,
    edits: HeaderEdits,
    path: Vec<u8>,
    /// The client may have sent bytes the proxy will not read (a body left unread): close with
    /// lingering.
    unread_input: bool,
    /// An interim response of the current exchange has gone to the client: the request can no
    /// longer be repeated on another connection.
    interim_sent: bool,
    /// The connection itself is no longer accepted (its certificate was revoked since the
    /// handshake): close after the response.
    connection_refused: bool,
    current: CurrentRequest,
    /// The TLS site (listener default or SNI entry) the client connected to, and the acceptor
    /// that knows its hostnames.
    acceptor: portcullis_tls::TlsAcceptor,
    /// When an idle connection gives back its buffers.
    idle_timer: Timer,
    /// Deadlines of reads and writes on either side (one at a time).
    io_timer: Timer,
    /// Cancels the read an idle connection waits with (kept: one allocation per connection).
    canceller: monoio::io::Canceller,
}

impl<S: Stream> Conn<S> {
    async fn run(&mut self) {
        loop {
            match self.read_head().await {
                Ok(true) => {}
                Ok(false) => break,
                Err(failure) => {
                    let (status, message, why) = match &failure {
                        HeadFailure::Invalid(e) => {
                            tracing::info!(peer = %self.peer, error = %e, "request refused");
                            (e.status(), e.client_message(), e.to_string())
                        }
                        HeadFailure::Timeout => {
                            tracing::info!(peer = %self.peer, "request head not received in time");
                            (408, "Request timeout", "head not received in time".to_owned())
                        }
                    };
                    if self.worker.snapshot().server.access_log {
                        tracing::info!(
                            target: "portcullis::access",
                            id = "-",
                            peer = %self.peer,
                            method = "-",
                            path = "-",
                            api = "-",
                            status,
                            client_cert = self.info.client_cert.as_ref().map_or("-", |c| c.thumbprint.as_str()),
                            refused = %why,
                        );
                    }
                    self.out.clear();
                    write::json_response(&mut self.out, status, message, write::Connection::Close, false);
                    let _ = self
                        .io_timer
                        .within(WRITE_TIMEOUT, pin!(self.client.write_all_buf(&mut self.out)))
                        .await;
                    self.close_lingering().await;
                    return;
                }
            }
            if !self.exchange().await {
                // Our decision, not the client's: it may be sending already (a pipelined
                // request, the next one while draining).
                self.unread_input = true;
                break;
            }
        }
        if self.unread_input {
            self.close_lingering().await;
        } else {
            // Nothing more to read or write: close_notify, then the socket's close sends the FIN.
            let _ = self.io_timer.within(Duration::from_secs(1), pin!(self.client.finish())).await;
        }
    }

    /// Closes after a response sent while the client may still be sending (a refused head, an
    /// unread body): our side ends first, then what keeps arriving is read and dropped for a
    /// moment, so that the kernel does not answer it with a reset that could destroy the
    /// response before the client has read it.
    async fn close_lingering(&mut self) {
        let _ = timeout(Duration::from_secs(1), self.client.close()).await;
        let deadline = Instant::now() + LINGER;
        let mut sink = BytesMut::new();
        let mut drained = 0;
        while drained < LINGER_BYTES {
            sink.clear();
            match timeout_at(deadline, self.client.read_raw(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => drained += n,
                _ => break,
            }
        }
    }

    /// Reads the next request head. `Ok(false)`: the connection is done (closed, idle too long,
    /// shutting down).
    async fn read_head(&mut self) -> Result<bool, HeadFailure> {
        let snap = self.worker.snapshot();
        let limits = snap.limits;
        let idle_timeout = snap.server.idle_timeout;
        let head_timeout = snap.server.head_timeout;
        drop(snap);
        // Set once a byte has come; the deadline itself is only read off the clock when a
        // head needs a second read (most arrive whole).
        let mut begun = false;
        let mut deadline: Option<Instant> = None;
        loop {
            match self.scanner.scan(&mut self.rbuf, limits.max_head_size) {
                Ok(Some(len)) => {
                    self.head.parse(&mut self.rbuf, len, &limits).map_err(HeadFailure::Invalid)?;
                    return Ok(true);
                }
                Ok(None) => {}
                Err(e) => return Err(HeadFailure::Invalid(e)),
            }
            // Idle until the first byte; after it (empty lines included, RFC 9112 §2.2) the head
            // is under its own deadline.
            let read = if self.rbuf.is_empty() && !begun {
                match self.wait_idle(idle_timeout, head_timeout).await {
                    Some(r) => r,
                    None => return Ok(false),
                }
            } else {
                let at = *deadline.get_or_insert_with(|| Instant::now() + head_timeout);
                match self.io_timer.until(at, pin!(self.client.read_buf(&mut self.rbuf))).await {
                    Ok(r) => r,
                    Err(_) => return Err(HeadFailure::Timeout),
                }
            };
            match read {
                Ok(0) => return Ok(false),
                Ok(_) => begun = true,
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "client read failed");
                    return Ok(false);
                }
            }
        }
    }

    /// Waits for the next request on an idle connection. `None`: give up on the connection (idle
    /// timeout, shutdown).
    ///
    /// For a while the connection stays hot: a read is pending with the connection's buffers, so
    /// the next request costs one read. If nothing comes, the read is cancelled (without losing
    /// what may have arrived meanwhile), the buffers are given back, and the connection waits
    /// for readability alone: an idle connection then holds no buffer at all.
    async fn wait_idle(
        &mut self,
        idle_timeout: Duration,
        head_timeout: Duration,
    ) -> Option<io::Result<usize>> {
        if self.worker.draining() {
            return None;
        }
        let started = Instant::now();
        let result = {
            let hot = self.client.read_buf_cancelable(&mut self.rbuf, self.canceller.handle());
            let mut hot = std::pin::pin!(hot);
            // In this order (no random pick per poll): data that arrived wins over the timer.
            let first = monoio::select! {
                biased;
                r = &mut hot => Some(r),
                _ = self.idle_timer.expiry(started + SHRINK_AFTER.min(idle_timeout)) => None,
                _ = self.worker.shutdown.wait() => return None,
            };
            match first {
                Some(r) => r,
                None => {
                    // A used canceller stays cancelled; the next wait gets a fresh one.
                    self.canceller = std::mem::take(&mut self.canceller).cancel();
                    hot.await
                }
            }
        };
        match result {
            Err(e) if portcullis_tls::is_canceled(&e) => {}
            other => return Some(other),
        }
        // Cold: no buffers while waiting (the heads share them, so they let go too).
        self.rbuf = BytesMut::new();
        self.out = BytesMut::new();
        self.ubuf = BytesMut::new();
        self.head.clear();
        self.resp.clear();
        self.edits = HeaderEdits::default();
        self.idle_timer.release();
        self.io_timer.release();
        self.client.shrink();
        let left = idle_timeout.saturating_sub(started.elapsed());
        let ready = monoio::select! {
            r = timeout(left, self.client.wait_readable()) => r,
            _ = self.worker.shutdown.wait() => return None,
        };
        match ready {
            // Readable: what arrives now is the start of a request, under the head's deadline.
            Ok(Ok(())) => {
                let read = monoio::select! {
                    r = timeout(head_timeout, self.client.read_buf(&mut self.rbuf)) => r,
                    _ = self.worker.shutdown.wait() => return None,
                };
                read.ok()
            }
            Ok(Err(e)) => Some(Err(e)),
            Err(_) => None,
        }
    }

    /// Whether the client connection stays open once this response is out.
    fn client_keeps_alive(&self) -> bool {
        self.head.keep_alive() && !self.worker.draining() && !self.connection_refused
    }

    /// Sends a response the proxy makes itself. Returns whether the connection stays open:
    /// only if the request had no body (an unread body would be taken for the next request).
    async fn respond_local(&mut self, status: u16, message: &str, body_consumed: bool) -> bool {
        let body_done = body_consumed || self.head.framing() == Framing::None;
        self.unread_input |= !body_done;
        let keep = self.client_keeps_alive() && body_done;
        self.out.clear();
        let connection = write::Connection::for_client(keep, self.head.version() == Version::Http10);
        write::json_response(&mut self.out, status, message, connection, self.head.is_head());
        let written =
            self.io_timer.within(WRITE_TIMEOUT, pin!(self.client.write_all_buf(&mut self.out))).await;
        if !matches!(written, Ok(Ok(()))) {
            return false;
        }
        keep
    }

    /// One request/response exchange. Returns whether to read another request.
    async fn exchange(&mut self) -> bool {
        let snap = self.worker.snapshot();
        let mut id = [0u8; 16];
        self.worker.next_request_id(&mut id);
        self.current.set(Some(id));
        #[cfg(feature = "fault-injection")]
        match self.head.header(b"x-portcullis-fault") {
            Some(b"panic") => panic!("fault injection: this connection panics"),
            Some(b"kill-worker") => self.worker.doomed.set(true),
            _ => {}
        }
        // Read only for the access log (a clock read per request is not free).
        let started = snap.server.access_log.then(Instant::now);
        let routed = snap.router.find(self.head.host(), self.head.path_only()).and_then(|route| {
            let rest = route.rest_of(self.head.path_only());
            Some((route, snap.policies.apis[route.api].select(self.head.method(), rest)?))
        });
        if let (Some(max), Framing::Length(n)) = (snap.server.max_body_size, self.head.framing())
            && n > max
        {
            tracing::info!(peer = %self.peer, length = n, max_body_size = max, "request body too large");
            self.access_log(None, 413, started, &id, "body larger than max_body_size");
            return self.respond_local(413, "Request body too large", false).await;
        }
        // What `require` established at the handshake holds on every request, as a policy step
        // would check it: a CRL loaded since (on an open keep-alive connection, or for a session
        // resumed from a ticket) or an expiry that passed ends the connection.
        if self.info.client_mode == ClientCertMode::Require
            && let Some(cert) = &self.info.client_cert
        {
            let why = if snap.policies.revokes(cert) {
                Some("client certificate revoked")
            } else if portcullis_tls::now_unix() > cert.not_after {
                Some("client certificate expired")
            } else {
                None
            };
            if let Some(reason) = why {
                tracing::info!(peer = %self.peer, reason, client_cert = %cert.thumbprint, "request refused: certificate no longer valid");
                self.access_log(None, 403, started, &id, reason);
                self.connection_refused = true;
                return self.respond_local(403, "Invalid client certificate", false).await;
            }
        }
        // The Host must belong to the TLS site the client connected to (RFC 9110 §15.5.20).
        if self.acceptor.has_sites()
            && let Some(host) = self.head.host()
            && self.acceptor.site_for_host(strip_port(host)) != self.info.site
        {
            tracing::info!(peer = %self.peer, host = %String::from_utf8_lossy(host), sni = ?self.info.server_name, "request for a host of another TLS site");
            self.access_log(None, 421, started, &id, "host of another TLS site");
            return self.respond_local(421, "Misdirected request", false).await;
        }
        let Some((route, policy)) = routed else {
            self.access_log(None, 404, started, &id, "no API or operation");
            return self.respond_local(404, "Resource not found", false).await;
        };
        let request_id = std::str::from_utf8(&id).unwrap_or("");
        let cert = self.info.client_cert.clone();
        let peer_ip = self.peer_ip.clone();
        let facts = Facts {
            client_cert: cert.as_deref(),
            client_addr: self.peer,
            client_ip: &peer_ip,
            request_id,
            now: portcullis_tls::now_unix(),
        };
        let identity = &snap.policies.identity_headers;
        self.edits.reset(self.head.field_count());
        let fields = RequestFields { head: &self.head, identity };
        if let Verdict::Respond { response, reason } =
            snap.policies.inbound(policy, &facts, &fields, &mut self.edits)
        {
            if response.status >= 400 {
                tracing::info!(
                    peer = %self.peer,
                    api = %route.name,
                    status = response.status,
                    reason,
                    client_cert = facts.client_cert.map_or("-", |c| c.thumbprint.as_str()),
                    "request refused by policy"
                );
            }
            self.access_log(Some(route), response.status, started, &id, reason);
            return self.respond_policy(response).await;
        }
        let backend = &snap.backends[route.backend];
        let (keep, status) = self.forward(&snap, route, policy, backend, &facts).await;
        self.access_log(Some(route), status, started, &id, "-");
        keep
    }

    /// Sends a response a policy step decided on (its headers are in `edits`).
    async fn respond_policy(&mut self, response: &Response) -> bool {
        self.unread_input |= self.head.framing() != Framing::None;
        let keep = self.client_keeps_alive() && self.head.framing() == Framing::None;
        let out = &mut self.out;
        out.clear();
        let reason = match &response.reason {
            Some(r) => &r[..],
            None => write::reason_phrase(response.status).as_bytes(),
        };
        write::status_line(out, Version::Http11, response.status, reason);
        write::date(out);
        if let Some(ct) = &response.content_type {
            write::header(out, b"Content-Type", ct);
        }
        for (name, value) in self.edits.added() {
            write::header(out, name, value);
        }
        // A 204 carries no length, a 304 not this one (it would be the representation's), and
        // neither has a body (the configuration refuses one).
        let bodiless = matches!(response.status, 204 | 304);
        if !bodiless {
            write::content_length(out, response.body.len() as u64);
        }
        write::Connection::for_client(keep, self.head.version() == Version::Http10).write(out);
        write::end_head(out);
        if !self.head.is_head() && !bodiless {
            out.extend_from_slice(&response.body);
        }
        let written =
            self.io_timer.within(WRITE_TIMEOUT, pin!(self.client.write_all_buf(&mut self.out))).await;
        if !matches!(written, Ok(Ok(()))) {
            return false;
        }
        keep
    }

    /// One access-log line; `refused` says why the proxy answered itself (`-` when it did not).
    fn access_log(
        &self,
        route: Option<&Route>,
        status: u16,
        started: Option<Instant>,
        id: &[u8; 16],
        refused: &str,
    ) {
        let Some(started) = started else { return };
        tracing::info!(
            target: "portcullis::access",
            id = std::str::from_utf8(id).unwrap_or(""),
            peer = %self.peer,
            method = %String::from_utf8_lossy(self.head.method()),
            path = %String::from_utf8_lossy(self.head.path()),
            api = route.map_or("-", |r| r.name.as_str()),
            status,
            micros = started.elapsed().as_micros() as u64,
            client_cert = self.info.client_cert.as_ref().map_or("-", |c| c.thumbprint.as_str()),
            refused,
        );
    }

    /// Writes the request head for the backend into `out`.
    fn write_upstream_head(
        &mut self,
        route: &Route,
        backend: &Backend,
        identity: &[Bytes],
        underscores: bool,
    ) {
        let out = &mut self.out;
        out.clear();
        forwarded_path(route, backend, self.head.path(), &mut self.path);
        write::request_line(out, self.head.method(), &self.path);
        let absolute = self.head.is_absolute_form();
        let mut host_written = false;
        for i in 0..self.head.field_count() {
            let (name, value, hop) = self.head.field(i);
            if hop
                || self.edits.is_removed(i)
                || is_identity(identity, name)
                || (!underscores && name.contains(&b'_'))
                || is_forwarding_header(name)
                || name.eq_ignore_ascii_case(b"content-length")
            {
                continue;
            }
            if name.eq_ignore_ascii_case(b"host") {
                if absolute {
                    continue;
                }
                host_written = true;
            }
            write::header(out, name, value);
        }
        if !host_written {
            write::header(out, b"Host", self.head.host().unwrap_or(&backend.authority));
        }
        for (name, value) in self.edits.added() {
            write::header(out, name, value);
        }
        write::header(out, b"X-Forwarded-For", self.peer_ip.as_bytes());
        write::header(out, b"X-Forwarded-Proto", b"https");
        write::header(out, b"Via", VIA);
        // Framing is written from what the parser decided, never copied: one value, one meaning.
        match self.head.framing() {
            Framing::Length(n) => write::content_length(out, n),
            Framing::Chunked => write::header(out, b"Transfer-Encoding", b"chunked"),
            Framing::None if self.head.declares_empty_body() => write::content_length(out, 0),
            Framing::None | Framing::UntilClose => {}
        }
        write::end_head(out);
    }

    /// Forwards the request and relays the response. Returns (keep client open, status sent).
    async fn forward(
        &mut self,
        snap: &Snapshot,
        route: &Route,
        policy: &ApiPolicy,
        backend: &Backend,
        facts: &Facts<'_>,
    ) -> (bool, u16) {
        let identity = &snap.policies.identity_headers;
        // A request that may be sent again (RFC 9110 §9.2.2) and has no body to lose is repeated
        // once if the pooled connection it went out on turns out dead after all (a close or a
        // 408 that arrived just after the check in `checkout`).
        let repeatable = self.head.framing() == Framing::None
            && is_idempotent(self.head.method())
            && !self.head.expect_continue();
        let mut attempt = 0;
        let mut answered_early = false;
        self.interim_sent = false;
        let mut upstream = loop {
            attempt += 1;
            let (up, reused) = match self.checkout(backend).await {
                Ok(c) => c,
                Err(e) => {
                    return self.upstream_failed(backend, e, false).await;
                }
            };
            let mut up = PlainStream::new(up);
            self.write_upstream_head(route, backend, identity, snap.server.allow_underscores_in_headers);
            if self.head.expect_continue() {
                let mut cont = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]);
                let written =
                    self.io_timer.within(WRITE_TIMEOUT, pin!(self.client.write_all_buf(&mut cont))).await;
                if !matches!(written, Ok(Ok(()))) {
                    return (false, 0);
                }
            }
            let body = match self.head.framing() {
                Framing::None | Framing::UntilClose => BodyMode::None,
                Framing::Length(n) => BodyMode::Length(n),
                Framing::Chunked => BodyMode::Chunked(ChunkedOutput::Reencode),
            };
            let timeouts = (snap.server.body_timeout, backend.response_timeout, snap.server.max_body_size);
            let sent = relay_body(
                body,
                (&mut self.client, &mut self.rbuf),
                &mut up,
                &mut self.out,
                timeouts,
                &mut self.io_timer,
                true,
            )
            .await;
            // Only a body read whole leaves the client connection in step with its requests.
            let body_whole = sent.is_ok();
            let result = match sent {
                Ok(()) => self.read_response_head(&mut up, backend.response_timeout).await,
                // The backend stopped taking the body: it may have answered already (a 413, a
                // 401 before the upload), and that answer is the client's.
                Err(RelayError::Destination(e)) => {
                    let wait = EARLY_ANSWER_WAIT.min(backend.response_timeout);
                    match self.read_response_head(&mut up, wait).await {
                        Ok(()) => {
                            tracing::debug!(backend = %backend.name, status = self.resp.status(), error = %e, "backend answered before taking the whole body");
                            answered_early = true;
                            Ok(())
                        }
                        Err(_) => Err(UpstreamError::Lost(e)),
                    }
                }
                Err(e) => Err(UpstreamError::RequestBody(e)),
            };
            let retry = reused && attempt == 1 && repeatable && !self.interim_sent;
            match result {
                // What a pooled connection says when the backend timed it out while it was idle
                // (an unsolicited 408, then close) is not the answer to this request.
                Ok(()) if retry && self.resp.status() == 408 => {
                    tracing::debug!(backend = %backend.name, "pooled connection answered 408; retrying");
                    continue;
                }
                Ok(()) => break up,
                // Closed, reset, or bytes that are no response: a pooled connection the backend
                // had given up on.
                Err(e @ (UpstreamError::Lost(_) | UpstreamError::BadResponse(_))) if retry => {
                    tracing::debug!(backend = %backend.name, error = %e, "pooled connection was stale; retrying");
                    continue;
                }
                Err(e) => return self.upstream_failed(backend, e, body_whole).await,
            }
        };

        let status = self.resp.status();
        let client_http10 = self.head.version() == Version::Http10;
        // After an early answer, the rest of the client's body is unread: the client connection
        // ends after the response (lingering), and the backend's is not reused.
        self.unread_input |= answered_early;
        let mut keep = self.client_keeps_alive() && !answered_early;
        let mode = match self.resp.framing(self.head.is_head()) {
            Framing::None => BodyMode::None,
            Framing::Length(n) => BodyMode::Length(n),
            Framing::Chunked if client_http10 => {
                keep = false;
                BodyMode::Chunked(ChunkedOutput::DataOnly)
            }
            Framing::Chunked => BodyMode::Chunked(ChunkedOutput::Reencode),
            Framing::UntilClose => {
                if client_http10 {
                    keep = false;
                }
                BodyMode::UntilClose { chunk: !client_http10 }
            }
        };
        self.edits.reset(self.resp.field_count());
        if policy.has_outbound() {
            snap.policies.outbound(policy, facts, &ResponseFields(&self.resp), &mut self.edits);
        }
        self.write_response_head(mode, keep, client_http10);
        let relayed = relay_body(
            mode,
            (&mut upstream, &mut self.ubuf),
            &mut self.client,
            &mut self.out,
            (backend.response_timeout, WRITE_TIMEOUT, None),
            &mut self.io_timer,
            false,
        )
        .await;
        match relayed {
            Ok(()) => {
                // Not after HEAD: a backend that wrongly sends a body would poison the next
                // response on the connection.
                let reusable = self.resp.keep_alive()
                    && !answered_early
                    && !matches!(mode, BodyMode::UntilClose { .. })
                    && self.ubuf.is_empty()
                    && !self.head.is_head();
                if reusable {
                    self.worker.pool.borrow_mut().put(backend.addr, upstream.into_inner(), backend.max_idle);
                }
                self.ubuf.clear();
                (keep, status)
            }
            Err(RelayError::Destination(e)) => {
                tracing::debug!(peer = %self.peer, error = %e, "client went away during the response");
                self.ubuf.clear();
                (false, status)
            }
            Err(e) => {
                tracing::warn!(backend = %backend.name, error = %e, "backend response body failed; response truncated");
                self.ubuf.clear();
                (false, status)
            }
        }
    }

    fn write_response_head(&mut self, mode: BodyMode, keep: bool, client_http10: bool) {
        let out = &mut self.out;
        out.clear();
        write::status_line(out, Version::Http11, self.resp.status(), self.resp.reason());
        // A recipient with a clock adds the Date an origin left out (RFC 9110 §6.6.1).
        if self.resp.header(b"date").is_none() {
            write::date(out);
        }
        for i in 0..self.resp.field_count() {
            let (name, value, hop) = self.resp.field(i);
            if hop || self.edits.is_removed(i) || name.eq_ignore_ascii_case(b"content-length") {
                continue;
            }
            write::header(out, name, value);
        }
        for (name, value) in self.edits.added() {
            write::header(out, name, value);
        }
        // Framing from the parsed head, as for requests.
        match mode {
            BodyMode::Length(n) => write::content_length(out, n),
            BodyMode::Chunked(ChunkedOutput::Reencode) | BodyMode::UntilClose { chunk: true } => {
                write::header(out, b"Transfer-Encoding", b"chunked");
            }
            BodyMode::None if self.head.is_head() || self.resp.status() == 304 => {
                // The length the body would have had (RFC 9110 §8.6).
                if let Some(n) = self.resp.content_length() {
                    write::content_length(out, n);
                }
            }
            // An empty body (`Content-Length: 0` from the backend) must still say so: a response
            // without a length is read until the connection closes (RFC 9112 §6.3). 1xx and 204
            // have no body by definition and must not carry the field (RFC 9110 §8.6).
            BodyMode::None if self.resp.status() != 204 && !self.resp.is_informational() => {
                write::content_length(out, 0);
            }
            _ => {}
        }
        write::Connection::for_client(keep, client_http10).write(out);
        write::end_head(out);
    }

    /// A pooled connection to the backend, or a new one.
    async fn checkout(&mut self, backend: &Backend) -> Result<(TcpStream, bool), UpstreamError> {
        loop {
            let Some(c) = self.worker.pool.borrow_mut().take(backend.addr, backend.idle_timeout) else {
                break;
            };
            // Every time, however short the idle spell (one non-blocking syscall): a close or a
            // stray byte can arrive a microsecond after the last response, and a request sent on
            // such a connection either fails where it cannot be retried (POST) or reads the stray
            // bytes as its answer, and its own answer then as the next request's.
            if idle_connection_is_clean(&c) {
                return Ok((c, true));
            }
            tracing::debug!(backend = %backend.name, "pooled connection closed or sent unsolicited bytes; discarded");
        }
        match timeout(backend.connect_timeout, TcpStream::connect_addr(backend.addr)).await {
            Ok(Ok(c)) => {
                let _ = c.set_nodelay(true);
                self.worker.pool.borrow_mut().opened += 1;
                Ok((c, false))
            }
            Ok(Err(e)) => Err(UpstreamError::Connect(e)),
            Err(_) => Err(UpstreamError::ConnectTimeout),
        }
    }

    /// Sends the interim response in `self.resp` on to the client (hop-by-hop fields dropped).
    /// A failure shows again, and is handled, when the final response is written.
    async fn forward_interim(&mut self) {
        let out = &mut self.out;
        out.clear();
        write::status_line(out, Version::Http11, self.resp.status(), self.resp.reason());
        for i in 0..self.resp.field_count() {
            let (name, value, hop) = self.resp.field(i);
            if !hop {
                write::header(out, name, value);
            }
        }
        write::end_head(out);
        let _ = self.io_timer.within(WRITE_TIMEOUT, pin!(self.client.write_all_buf(&mut self.out))).await;
    }

    /// Reads the backend's final response head into `self.resp` (interim ones forwarded or
    /// skipped).
    async fn read_response_head(
        &mut self,
        up: &mut PlainStream<TcpStream>,
        response_timeout: Duration,
    ) -> Result<(), UpstreamError> {
        let mut scanner = HeadScanner::default();
        let mut received = false;
        let mut interim = 0;
        self.ubuf.clear();
        // The whole head (interim responses included) within the timeout, not each read.
        let deadline = Instant::now() + response_timeout;
        loop {
            match scanner.scan(&mut self.ubuf, RESPONSE_LIMITS.max_head_size) {
                Ok(Some(len)) => {
                    self.resp
                        .parse(&mut self.ubuf, len, &RESPONSE_LIMITS)
                        .map_err(UpstreamError::BadResponse)?;
                    if self.resp.status() == 101 {
                        return Err(UpstreamError::BadResponse(HeadError::Malformed(
                            "101 Switching Protocols",
                        )));
                    }
                    if self.resp.is_informational() {
                        // A backend that only ever says "wait" is bounded by count as well as by
                        // the deadline: each interim response costs a parse and a client write.
                        interim += 1;
                        if interim > MAX_INTERIM_RESPONSES {
                            return Err(UpstreamError::BadResponse(HeadError::Malformed(
                                "too many interim responses",
                            )));
                        }
                        // Forwarded to an HTTP/1.1 client (RFC 9110 §15.2: 103 Early Hints, 102),
                        // but for 100 Continue, which the proxy answers itself.
                        if self.resp.status() != 100 && self.head.version() == Version::Http11 {
                            self.interim_sent = true;
                            self.forward_interim().await;
                        }
                        continue;
                    }
                    return Ok(());
                }
                Ok(None) => {}
                Err(e) => return Err(UpstreamError::BadResponse(e)),
            }
            match self.io_timer.until(deadline, pin!(up.read_buf(&mut self.ubuf))).await {
                Err(_) => return Err(UpstreamError::Timeout),
                Ok(Ok(0)) if !received => {
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
                Ok(Ok(_)) => received = true,
                Ok(Err(e)) if !received => return Err(UpstreamError::Lost(e)),
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

    /// Answers for a backend that failed; details go to the log only.
    async fn upstream_failed(
        &mut self,
        backend: &Backend,
        e: UpstreamError,
        body_consumed: bool,
    ) -> (bool, u16) {
        let (status, message) = match &e {
            UpstreamError::ConnectTimeout | UpstreamError::Timeout => (504, "Gateway timeout"),
            UpstreamError::RequestBody(RelayError::SourceTimeout) => (408, "Request timeout"),
            UpstreamError::RequestBody(RelayError::SourceFraming(_)) => (400, "Bad request"),
            UpstreamError::RequestBody(RelayError::SourceTooLarge) => (413, "Request body too large"),
            UpstreamError::RequestBody(RelayError::SourceClosed | RelayError::SourceIo(_)) => {
                tracing::debug!(peer = %self.peer, error = %e, "client went away while sending the body");
                return (false, 0);
            }
            _ => (502, "Bad gateway"),
        };
        match &e {
            UpstreamError::RequestBody(err) => {
                tracing::info!(peer = %self.peer, error = %err, status, "request body refused")
            }
            _ => {
                tracing::warn!(backend = %backend.name, addr = %backend.addr, error = %e, status, "backend failed")
            }
        }
        (self.respond_local(status, message, body_consumed).await, status)
    }
}

/// Moves one body from `src` to `dst`, re-delimiting it as `mode` says. `out` may already hold
/// bytes for `dst` (a head): they go out with the first piece of the body, in one write.
async fn relay_body<R: Stream, W: Stream>(
    mode: BodyMode,
    (src, sbuf): (&mut R, &mut BytesMut),
    dst: &mut W,
    out: &mut BytesMut,
    (read_timeout, write_timeout, max_len): (Duration, Duration, Option<u64>),
    timer: &mut Timer,
    watch_dst: bool,
) -> Result<(), RelayError> {
    /// Like `fill`, but gives up (a `Destination` error) when the backend refuses the body
    /// first: it closes, or sends an error response (RFC 9112 §9.5). Anything else it sends
    /// early (a 1xx, a response that streams while the body comes) is left where it is for
    /// later. Returns what was read (`None`: nothing yet, fill as usual) and whether to go on
    /// watching. The read is cancelled, not dropped, when the backend speaks: nothing of the
    /// client's bytes is lost.
    async fn fill_unless_refused<R: Stream, W: Stream>(
        src: &mut R,
        sbuf: &mut BytesMut,
        dst: &mut W,
        timer: &mut Timer,
        t: Duration,
    ) -> Result<(Option<usize>, bool), RelayError> {
        let canceller = monoio::io::Canceller::new();
        let mut read = pin!(src.read_buf_cancelable(sbuf, canceller.handle()));
        let raced = timer
            .within(
                t,
                pin!(async {
                    monoio::select! {
                        biased;
                        r = &mut read => Some(r),
                        _ = dst.wait_readable() => None,
                    }
                }),
            )
            .await;
        match raced {
            Ok(Some(Ok(n))) => Ok((Some(n), true)),
            Ok(Some(Err(e))) => Err(RelayError::SourceIo(e)),
            Err(_) => Err(RelayError::SourceTimeout),
            Ok(None) => {
                // "HTTP/1.1 413" is enough to tell an error response.
                let mut start = [0u8; 12];
                match dst.peek(&mut start) {
                    Ok(0) => {
                        return Err(RelayError::Destination(io::Error::other(
                            "closed before the whole body",
                        )));
                    }
                    Ok(n) if n >= 10 && start.starts_with(b"HTTP/1.") && matches!(start[9], b'4' | b'5') => {
                        return Err(RelayError::Destination(io::Error::other(
                            "answered with an error before the whole body",
                        )));
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(RelayError::Destination(e)),
                }
                let _ = canceller.cancel();
                match read.await {
                    Ok(n) => Ok((Some(n), false)),
                    Err(e) if portcullis_tls::is_canceled(&e) => Ok((None, false)),
                    Err(e) => Err(RelayError::SourceIo(e)),
                }
            }
        }
    }
    /// The next piece of a request body: watching `dst` for a refusal while `watching`, which
    /// ends once `dst` has said something else.
    async fn fill_body<R: Stream, W: Stream>(
        src: &mut R,
        sbuf: &mut BytesMut,
        dst: &mut W,
        timer: &mut Timer,
        t: Duration,
        watching: &mut bool,
    ) -> Result<usize, RelayError> {
        if *watching {
            let (n, still) = fill_unless_refused(src, sbuf, dst, timer, t).await?;
            *watching = still;
            if let Some(n) = n {
                return Ok(n);
            }
        }
        fill(src, sbuf, timer, t).await
    }
    async fn fill<R: Stream>(
        src: &mut R,
        sbuf: &mut BytesMut,
        timer: &mut Timer,
        t: Duration,
    ) -> Result<usize, RelayError> {
        match timer.within(t, pin!(src.read_buf(sbuf))).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(RelayError::SourceIo(e)),
            Err(_) => Err(RelayError::SourceTimeout),
        }
    }
    async fn flush<W: Stream>(
        dst: &mut W,
        out: &mut BytesMut,
        timer: &mut Timer,
        t: Duration,
    ) -> Result<(), RelayError> {
        match timer.within(t, pin!(dst.write_all_buf(out))).await {
            Ok(r) => r.map_err(RelayError::Destination),
            Err(_) => {
                Err(RelayError::Destination(io::Error::new(io::ErrorKind::TimedOut, "write timed out")))
            }
        }
    }
    // Watching `dst` while waiting for `src`, until it has said something that is no refusal.
    let mut watching = watch_dst;
    match mode {
        BodyMode::None => flush(dst, out, timer, write_timeout).await,
        BodyMode::Length(mut remaining) => loop {
            let take = (sbuf.len() as u64).min(remaining) as usize;
            out.extend_from_slice(&sbuf[..take]);
            let _ = sbuf.split_to(take);
            remaining -= take as u64;
            if remaining == 0 {
                return flush(dst, out, timer, write_timeout).await;
            }
            if !out.is_empty() {
                flush(dst, out, timer, write_timeout).await?;
            }
            if fill_body(src, sbuf, dst, timer, read_timeout, &mut watching).await? == 0 {
                return Err(RelayError::SourceClosed);
            }
        },
        BodyMode::Chunked(output) => {
            let mut decoder = ChunkedDecoder::new(output);
            loop {
                let progress = match decoder.decode(sbuf, out) {
                    Ok(p) => p,
                    Err(e) => {
                        if max_len.is_some() {
                            // A request body: nothing of it is worth sending on.
                            return Err(RelayError::SourceFraming(e));
                        }
                        // What was decoded before the fault goes out (the head with it, when
                        // nothing has been sent yet); the connection then ends where the body
                        // broke, never with a made-up end.
                        let _ = flush(dst, out, timer, write_timeout).await;
                        return Err(RelayError::SourceFraming(e));
                    }
                };
                if max_len.is_some_and(|max| decoder.announced_len() > max) {
                    return Err(RelayError::SourceTooLarge);
                }
                if progress == Decoded::Done {
                    return flush(dst, out, timer, write_timeout).await;
                }
                if !out.is_empty() {
                    flush(dst, out, timer, write_timeout).await?;
                }
                if fill_body(src, sbuf, dst, timer, read_timeout, &mut watching).await? == 0 {
                    return Err(RelayError::SourceClosed);
                }
            }
        }
        BodyMode::UntilClose { chunk } => loop {
            if !sbuf.is_empty() {
                if chunk {
                    write::chunk_header(out, sbuf.len());
                    out.extend_from_slice(sbuf);
                    out.extend_from_slice(b"\r\n");
                } else {
                    out.extend_from_slice(sbuf);
                }
                sbuf.clear();
            }
            flush(dst, out, timer, write_timeout).await?;
            if fill(src, sbuf, timer, read_timeout).await? == 0 {
                if chunk {
                    out.extend_from_slice(b"0\r\n\r\n");
                    flush(dst, out, timer, write_timeout).await?;
                }
                return Ok(());
            }
        },
    }
}
