//! One client connection: handshake, then request after request. This room owns the
//! connection's life (the handshake, reading heads, idle waits, answers the proxy makes itself,
//! closing); [`exchange`] owns one request's way through routing, policy and the backend.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::net::TcpStream;
use monoio::time::{Instant, timeout, timeout_at};
use portcullis_http::{
    Framing, HeadError, HeadScanner, Reaction, RequestHead, ResponseHead, Version, proxy_protocol, write,
};
use portcullis_policy::{HeaderEdits, HeaderList, RequestState, Response};
use portcullis_tls::{SessionInfo, Stream};

use crate::snapshot::Route;
use crate::timer::Timer;
use crate::worker::Worker;

mod exchange;

/// How long an idle client connection keeps its buffers before giving them back.
const SHRINK_AFTER: Duration = Duration::from_secs(2);
/// Longest a write to a client may block (a client that does not read is dropped).
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a backend that stopped taking a request body gets to show the answer it sent.
pub(super) const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(1);
/// After a response to a request that was not read whole, how long (and how much) to keep
/// reading and dropping the client's bytes before closing. A client still sending a large body
/// (several hundred KiB in flight on a busy host) would otherwise get a reset that destroys the
/// response it has not read yet; the time bounds what a hostile sender can make us read.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 4 * 1024 * 1024;

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
    let access_log = snap.server.access_log.is_some();
    let log_refused = |peer: SocketAddr, why: &str| {
        worker.outbox.record(&worker.shared.access, refused_record(peer, why, None, None))
    };
    let mut tcp = tcp;
    let mut peer = peer;
    let mut first = BytesMut::new();
    if let Some(pp) = snap.proxy_protocol.get(listener).and_then(Option::as_ref) {
        let refused = |why: &dyn std::fmt::Display| {
            tracing::info!(%peer, error = %why, "connection refused: PROXY protocol");
            if access_log {
                log_refused(peer, &why.to_string());
            }
        };
        if let Some(from) = &pp.from
            && !from.contains(peer.ip())
        {
            refused(&"a PROXY protocol header from an address not in proxy_protocol_from");
            return;
        }
        match timeout(handshake_timeout, read_proxy_header(&mut tcp, &mut first)).await {
            Ok(Ok(proxy_protocol::Header::Proxied { source, .. })) => peer = source,
            Ok(Ok(proxy_protocol::Header::Local)) => {}
            Ok(Err(e)) => return refused(&e),
            Err(_) => return refused(&"no PROXY protocol header in time"),
        }
    }
    drop(snap);
    let stats = worker.stats.clone();
    let handshake_started = std::time::Instant::now();
    let tls = match timeout(handshake_timeout, acceptor.accept_after(tcp, first)).await {
        Ok(Ok(tls)) => {
            stats.handshake_duration.observe(handshake_started.elapsed());
            if let Some(cert) = &tls.info().client_cert {
                stats.client_cert_seen(listener, cert.not_after);
            }
            crate::stats::WorkerStats::add(&stats.handshakes[usize::from(tls.info().resumed)]);
            crate::stats::WorkerStats::add(
                &stats.tls_versions[crate::stats::tls_version_index(tls.info().version)],
            );
            tls
        }
        Ok(Err(e)) => {
            crate::stats::WorkerStats::add(&stats.handshakes[2]);
            crate::stats::WorkerStats::add(&stats.handshake_failures[crate::stats::handshake_failure(&e)]);
            match &e {
                portcullis_tls::HandshakeError::CertificateRejected(_) => {
                    tracing::info!(%peer, error = %e, "TLS handshake refused");
                    if access_log {
                        log_refused(peer, &e.to_string());
                    }
                }
                // Refused by TLS (version, ciphers, not TLS at all): routine on an open port, so
                // debug in the log, but a line in the access log when there is one.
                portcullis_tls::HandshakeError::Protocol { .. } => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    if access_log {
                        log_refused(peer, &e.to_string());
                    }
                }
                _ => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            }
            return;
        }
        Err(_) => {
            crate::stats::WorkerStats::add(&stats.handshakes[2]);
            crate::stats::WorkerStats::add(
                &stats.handshake_failures[crate::stats::handshake_failure_named("timeout")],
            );
            tracing::info!(%peer, timeout_ms = handshake_timeout.as_millis() as u64, "TLS handshake timed out");
            if access_log {
                log_refused(peer, "TLS handshake timed out");
            }
            return;
        }
    };
    let info = tls.info().clone();
    let worker_local = worker.local.clone();
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
        state: RequestState::new(worker_local),
        path: Vec::new(),
        line: Vec::new(),
        unread_input: false,
        interim_sent: false,
        connection_refused: false,
        refusal: "-",
        log_fields: None,
        body_bytes: 0,
        bytes_in: 0,
        upstream: Upstreamed::default(),
        current,
        acceptor,
        idle_timer: Timer::new(),
        io_timer: Timer::new(),
        canceller: monoio::io::Canceller::new(),
    };
    conn.run().await;
}
/// Reads a PROXY protocol header from the start of the connection; what came after it stays in
/// `buf` for TLS.
async fn read_proxy_header(tcp: &mut TcpStream, buf: &mut BytesMut) -> io::Result<proxy_protocol::Header> {
    use monoio::io::AsyncReadRent;
    let mut chunk = Vec::with_capacity(1024);
    loop {
        match proxy_protocol::parse(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
            proxy_protocol::Parsed::Done { header, len } => {
                let _ = buf.split_to(len);
                return Ok(header);
            }
            proxy_protocol::Parsed::Partial => {}
        }
        chunk.clear();
        let (read, c) = tcp.read(chunk).await;
        chunk = c;
        match read? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before a PROXY protocol header",
                ));
            }
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Why reading a request head stopped short.
enum HeadFailure {
    Invalid(HeadError),
    Timeout,
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

/// The backend's answer to an exchange: its status, how long its head took, and which server of
/// the route's backend gave it.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Upstreamed {
    pub(super) status: u16,
    pub(super) micros: u64,
    pub(super) server: Option<usize>,
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
    /// What policy learnt of the current request (its subscription, its token).
    state: RequestState,
    path: Vec<u8>,
    /// The request's method and path, for outbound steps that write messages.
    line: Vec<u8>,
    /// The client may have sent bytes the proxy will not read (a body left unread): close with
    /// lingering.
    unread_input: bool,
    /// An interim response of the current exchange has gone to the client: the request can no
    /// longer be repeated on another connection.
    interim_sent: bool,
    /// The connection itself is no longer accepted (its certificate was revoked since the
    /// handshake): close after the response.
    connection_refused: bool,
    /// Bytes of request and response bodies relayed in this exchange (for bandwidth quotas).
    body_bytes: u64,
    /// Of which the request body's.
    bytes_in: u64,
    /// What the backend answered this exchange, for the access log.
    upstream: Upstreamed,
    /// Why the proxy answered this exchange itself (`-`: the backend answered), for the
    /// access log.
    refusal: &'static str,
    /// The access-log fields every request of the connection shares, made at its first record.
    log_fields: Option<Arc<crate::accesslog::ConnFields>>,
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
            // Between requests a panic belongs to no request.
            self.current.set(None);
            crate::stats::bump(&self.worker.stats.connections_idle, 1);
            let head = self.read_head().await;
            crate::stats::unbump(&self.worker.stats.connections_idle);
            match head {
                Ok(true) => {}
                Ok(false) => break,
                Err(failure) => {
                    let (status, message, why) = match &failure {
                        HeadFailure::Invalid(e) => {
                            tracing::info!(peer = %self.peer, error = %e, "request refused");
                            let Reaction::Respond(status, message) = e.reaction() else { break };
                            (status, message, e.to_string())
                        }
                        HeadFailure::Timeout => {
                            tracing::info!(peer = %self.peer, "request head not received in time");
                            (408, "Request timeout", "head not received in time".to_owned())
                        }
                    };
                    if self.worker.snapshot().server.access_log.is_some() {
                        let cert = self.info.client_cert.as_deref();
                        let sni = self.info.server_name.as_deref();
                        let mut record = refused_record(self.peer, &why, cert, sni);
                        record.status = status;
                        record.tls = self.info.version;
                        record.resumed = self.info.resumed;
                        self.worker.outbox.record(&self.worker.shared.access, record);
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
        (self.path, self.line) = (Vec::new(), Vec::new());
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

    /// Sends a response a policy step decided on (its headers are in `edits`).
    async fn respond_policy(&mut self, response: &Response) -> bool {
        let body = response.body_for(&self.state);
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
            write::content_length(out, body.len() as u64);
        }
        write::Connection::for_client(keep, self.head.version() == Version::Http10).write(out);
        write::end_head(out);
        if !self.head.is_head() && !bodiless {
            out.extend_from_slice(&body);
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
        &mut self,
        snap: &crate::snapshot::Snapshot,
        route: Option<(&Route, &portcullis_policy::ApiPolicy)>,
        status: u16,
        (started, log): (Instant, bool),
        id: &[u8; 16],
        refused: &str,
    ) {
        let now_ms = portcullis_tls::now_unix_ms();
        // What the request's `log_to_eventhub` steps wrote goes to their loggers (never waits).
        if self.state.has_logs() {
            for m in self.state.take_logs() {
                if let Some(producer) = snap.loggers.get(m.logger) {
                    if m.dropped {
                        self.worker.outbox.dropped(producer);
                        continue;
                    }
                    let message = portcullis_kafka::Message {
                        key: m.key,
                        partition: m.partition,
                        value: m.value,
                        timestamp_ms: now_ms as i64,
                    };
                    self.worker.outbox.message(producer, message);
                }
            }
        }
        self.worker.stats.request(status);
        if let Some((r, p)) = route {
            r.counters.request(self.worker.id, p.operation_slot(), status);
        }
        let elapsed = started.elapsed();
        self.worker.stats.request_duration.observe(elapsed);
        if !log {
            return;
        }
        use crate::accesslog::{ConnFields, Text};
        let info = &self.info;
        let fields = self.log_fields.get_or_insert_with(|| {
            let (sni, cert) = (info.server_name.as_deref(), info.client_cert.clone());
            Arc::new(ConnFields::new(self.peer, (info.version, info.resumed), sni, cert))
        });
        // Filled in place, in the batch it goes to the log thread in.
        let (worker, record) = (&self.worker, (now_ms, Some(*id), self.peer));
        worker.outbox.record_with(&worker.shared.access, record, |record| {
            record.status = status;
            record.micros = elapsed.as_micros() as u64;
            record.bytes_in = self.bytes_in;
            record.bytes_out = self.body_bytes.saturating_sub(self.bytes_in);
            record.upstream_status = self.upstream.status;
            record.upstream_micros = self.upstream.micros;
            record.conn = Some(Arc::clone(fields));
            record.put(Text::Method, self.head.method());
            // Without the query: it may carry a subscription key or a token.
            record.put(Text::Path, self.head.path_only());
            record.put(Text::UserAgent, self.head.header(b"user-agent").unwrap_or_default());
            if let Some((r, p)) = route {
                record.put(Text::Api, r.name.as_bytes());
                record.put(Text::Operation, p.operation().as_bytes());
            }
            record.put(Text::Refused, refused.as_bytes());
            if let Some(sub) = snap.policies.subscription_id(&self.state) {
                record.put(Text::Subscription, sub.as_bytes());
            }
            for (field, claim) in [(Text::JwtSub, "sub"), (Text::JwtAppid, "appid")] {
                if let Some(portcullis_jose::Json::String(v)) = self.state.token_claim(claim) {
                    record.put(field, v.as_bytes());
                }
            }
            if let Some(server) = route
                .and_then(|(r, _)| snap.backends.get(r.backend))
                .and_then(|b| b.servers.get(self.upstream.server?))
            {
                record.put(Text::Backend, server.name.as_bytes());
            }
        });
    }
}

/// The access-log record of a connection refused before a request (or of a head that was none),
/// with the client certificate and the server name when the handshake gave them.
fn refused_record(
    peer: SocketAddr,
    why: &str,
    cert: Option<&portcullis_facts::ClientCert>,
    sni: Option<&str>,
) -> crate::accesslog::Record {
    use crate::accesslog::Text;
    let mut record = crate::accesslog::Record::new(portcullis_tls::now_unix_ms(), None, peer);
    if let Some(cert) = cert {
        record.put(Text::ClientCert, cert.thumbprint.as_bytes());
        record.put(Text::ClientSubject, cert.subject.as_bytes());
    }
    record.put(Text::Refused, why.as_bytes());
    if let Some(sni) = sni {
        record.put(Text::Sni, sni.as_bytes());
    }
    record
}
