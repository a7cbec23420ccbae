//! A real HTTP/1.1 backend on 127.0.0.1, one thread per connection, written independently of
//! the proxy's own HTTP code so that the two check each other.
//!
//! What it does depends on the path:
//! - `/slow/<ms>`: waits, then echoes;
//! - `/silent`: reads the request and never answers;
//! - `/bytes/<n>`: `n` bytes with `Content-Length`;
//! - `/chunked/<n>`: `n` bytes, chunked;
//! - `/close`: echoes, then closes (`Connection: close`);
//! - `/then-close`: echoes as if keeping the connection, then closes it anyway (as a backend's
//!   idle timeout would, just after);
//! - `/then-408`: echoes as if keeping the connection, then sends an unsolicited `408` and
//!   closes (as some servers do when their idle timeout fires);
//! - `/next-gets-408`: echoes; the next request on the connection, whatever it is, gets `408`
//!   and a close (the idle timeout firing just as that request arrives);
//! - `/upload`: streams the request body through SHA-256 and answers `bytes=<n> sha256=<hex>`;
//! - `/status/<code>`: that status;
//! - `/early-hints`: a `103 Early Hints` (with a `Link` field), then the echo;
//! - `/garbage`, `/switch` (101), `/gzip` (`Transfer-Encoding: gzip`), `/conn-cl`
//!   (`Connection: Content-Length`): responses a proxy must refuse to relay;
//! - `/reset`: closes without answering; `/early-close`: closes as soon as the head is read,
//!   without reading the body; `/early-413`: answers 413 as soon as the head is read, then
//!   closes without reading the body;
//! - anything else: echoes the request head it received as the body.
//!
//! Every response carries `X-Backend-Conn: <n>` (which connection served it) and
//! `X-Powered-By: test-backend`.
//!
//! [`Backend::start_tls`] serves the same over TLS (rustls, not the proxy's BoringSSL), asking
//! for a client certificate from a given CA when told to, and counts resumed handshakes; the
//! echo then starts with `tls-client: <CN>` naming the certificate the client presented.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, StreamOwned};

use crate::pki::Identity;

/// What a server that times out an idle connection may say before closing it.
const UNSOLICITED_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

/// A running test backend; stopped when dropped.
#[derive(Debug)]
pub struct Backend {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// TLS handshakes that resumed a session, and those that failed.
    resumed: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A connection the backend serves: TCP, or TLS over it.
pub(crate) trait Duplex: Read + Write {
    /// Ends the connection (TLS: close_notify first).
    fn close(&mut self);
}

impl Duplex for TcpStream {
    fn close(&mut self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Duplex for StreamOwned<ServerConnection, TcpStream> {
    fn close(&mut self) {
        self.conn.send_close_notify();
        let _ = self.flush();
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

impl Backend {
    pub fn start() -> Backend {
        Backend::start_with(None)
    }

    /// Over TLS with `server`'s certificate; with `client_ca` (PEM), a client certificate that
    /// chains to it is required.
    pub fn start_tls(server: &Identity, client_ca: Option<&str>) -> Backend {
        Backend::start_with(Some(server_config(server, client_ca)))
    }

    /// On `port` of 127.0.0.1 (a server that comes back where it was).
    pub fn start_on(port: u16) -> Backend {
        Backend::start_at(port, None)
    }

    fn start_with(tls: Option<Arc<ServerConfig>>) -> Backend {
        Backend::start_at(0, tls)
    }

    fn start_at(port: u16, tls: Option<Arc<ServerConfig>>) -> Backend {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("backend bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("backend addr: {e}"));
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let resumed = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, r, s) = (connections.clone(), requests.clone(), stop.clone());
        let (resumed2, refused2) = (resumed.clone(), refused.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let n = c.fetch_add(1, Ordering::AcqRel) + 1;
                let (r, tls) = (r.clone(), tls.clone());
                let (resumed, refused) = (resumed2.clone(), refused2.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
                    let _ = stream.set_nodelay(true);
                    let Some(config) = tls else {
                        let _ = serve(stream, n, &r, None);
                        return;
                    };
                    if let Some((tls, peer)) = handshake(config, stream, &resumed, &refused) {
                        let _ = serve(tls, n, &r, peer);
                    }
                });
            }
        });
        Backend { addr, connections, requests, resumed, refused, stop, thread: Some(thread) }
    }

    /// TLS handshakes that resumed a session.
    pub fn resumed(&self) -> usize {
        self.resumed.load(Ordering::Acquire)
    }

    /// TLS handshakes that failed (a client certificate missing or not trusted, say).
    pub fn refused_handshakes(&self) -> usize {
        self.refused.load(Ordering::Acquire)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Requests received whole (head and body) so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Acquire)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A rustls server configuration with `server`'s certificate; with `client_ca` (PEM), a client
/// certificate that chains to it is required.
pub(crate) fn server_config(server: &Identity, client_ca: Option<&str>) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(server.chain_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap();
    let builder =
        ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().unwrap();
    let config = match client_ca {
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
            builder.with_client_cert_verifier(verifier).with_single_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth().with_single_cert(chain, key).unwrap(),
    };
    Arc::new(config)
}

/// A server-side TLS handshake on `tcp`, counted in `resumed` or `refused`; the stream and the
/// common name of the client's certificate, if it sent one.
pub(crate) fn handshake(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    resumed: &AtomicUsize,
    refused: &AtomicUsize,
) -> Option<(StreamOwned<ServerConnection, TcpStream>, Option<String>)> {
    let mut tls = StreamOwned::new(ServerConnection::new(config).ok()?, tcp);
    while tls.conn.is_handshaking() {
        if tls.conn.complete_io(&mut tls.sock).is_err() {
            refused.fetch_add(1, Ordering::AcqRel);
            return None;
        }
    }
    if tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        resumed.fetch_add(1, Ordering::AcqRel);
    }
    let peer = tls.conn.peer_certificates().and_then(|c| c.first()).map(|c| common_name(c));
    Some((tls, peer))
}

/// The common name in a DER certificate (found by its OID, not parsed in full).
fn common_name(der: &[u8]) -> String {
    // id-at-commonName, then a string's tag and length.
    let oid = [0x06, 0x03, 0x55, 0x04, 0x03];
    // The issuer's name comes before the subject's: the last one is the subject's.
    der.windows(oid.len())
        .rposition(|w| w == oid)
        .and_then(|i| {
            let len = *der.get(i + oid.len() + 1)? as usize;
            let start = i + oid.len() + 2;
            der.get(start..start + len).map(|b| String::from_utf8_lossy(b).into_owned())
        })
        .unwrap_or_default()
}

/// Buffered reading of a byte stream.
pub(crate) struct Input<S> {
    pub(crate) stream: S,
    pub(crate) buf: Vec<u8>,
    pub(crate) pos: usize,
}

impl<S: Read> Input<S> {
    fn fill(&mut self) -> io::Result<bool> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// A line without its CRLF.
    fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.available().windows(2).position(|w| w == b"\r\n") {
                let line = self.available()[..i].to_vec();
                self.pos += i + 2;
                return Ok(line);
            }
            if !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Up to `max` bytes of what is there (reading if nothing is).
    fn some(&mut self, max: usize) -> io::Result<Vec<u8>> {
        if self.available().is_empty() && !self.fill()? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = self.available().len().min(max);
        let out = self.available()[..n].to_vec();
        self.pos += n;
        Ok(out)
    }
}

pub(crate) struct Request {
    pub(crate) path: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) head_text: String,
}

impl Request {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

pub(crate) fn read_request<S: Read>(input: &mut Input<S>) -> io::Result<Option<Request>> {
    let mut lines = Vec::new();
    loop {
        let line = match input.line() {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && lines.is_empty() => return Ok(None),
            Err(e) => return Err(e),
        };
        if line.is_empty() {
            if lines.is_empty() {
                continue;
            }
            break;
        }
        lines.push(String::from_utf8_lossy(&line).into_owned());
    }
    let path = lines[0].split(' ').nth(1).unwrap_or("").to_owned();
    let headers = lines[1..]
        .iter()
        .filter_map(|l| l.split_once(':').map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned())))
        .collect();
    let head_text = lines.join("\n") + "\n";
    Ok(Some(Request { path, headers, head_text }))
}

/// Reads the request body, handing each piece to `sink`.
pub(crate) fn read_body<S: Read>(
    input: &mut Input<S>,
    req: &Request,
    mut sink: impl FnMut(&[u8]),
) -> io::Result<()> {
    if req.header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        loop {
            let line = input.line()?;
            let size_text = String::from_utf8_lossy(&line);
            let size_text = size_text.split(';').next().unwrap_or("").trim().to_owned();
            let mut size =
                usize::from_str_radix(&size_text, 16).map_err(|_| io::Error::other("bad chunk size"))?;
            if size == 0 {
                while !input.line()?.is_empty() {}
                return Ok(());
            }
            while size > 0 {
                let piece = input.some(size)?;
                size -= piece.len();
                sink(&piece);
            }
            if !input.line()?.is_empty() {
                return Err(io::Error::other("chunk not followed by CRLF"));
            }
        }
    }
    let mut remaining: usize = req.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while remaining > 0 {
        let piece = input.some(remaining)?;
        remaining -= piece.len();
        sink(&piece);
    }
    Ok(())
}

fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

/// Serves requests on one connection; `peer`: the common name of the client's certificate.
fn serve<S: Duplex>(stream: S, conn: usize, requests: &AtomicUsize, peer: Option<String>) -> io::Result<()> {
    let mut input = Input { stream, buf: Vec::new(), pos: 0 };
    let mut timed_out = false;
    while let Some(req) = read_request(&mut input)? {
        if timed_out {
            input.stream.write_all(UNSOLICITED_408)?;
            input.stream.close();
            return Ok(());
        }
        timed_out = req.path == "/next-gets-408";
        if req.path == "/early-hints" {
            input.stream.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")?;
        }
        if req.path == "/early-413" {
            input.stream.write_all(
                b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large",
            )?;
            input.stream.close();
            return Ok(());
        }
        if req.path == "/early-close" || req.path == "/reset" {
            input.stream.close();
            return Ok(());
        }
        let mut body_len = 0usize;
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        read_body(&mut input, &req, |piece| {
            body_len += piece.len();
            hasher.update(piece);
        })?;
        requests.fetch_add(1, Ordering::AcqRel);
        let head_only = req.head_text.starts_with("HEAD ");
        let common = format!("X-Backend-Conn: {conn}\r\nX-Powered-By: test-backend\r\n");
        let path = req.path.clone();
        let mut close = false;
        if path == "/silent" {
            // Hold the connection without answering until the peer gives up.
            let mut sink = [0u8; 1024];
            while matches!(input.stream.read(&mut sink), Ok(n) if n > 0) {}
            return Ok(());
        } else if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
            write!(input.stream, "HTTP/1.1 200 OK\r\n{common}Content-Length: {n}\r\n\r\n")?;
            let mut sent = if head_only { n } else { 0 };
            while sent < n {
                let piece = pattern(sent, (n - sent).min(64 * 1024));
                input.stream.write_all(&piece)?;
                sent += piece.len();
            }
        } else if let Some(n) = path.strip_prefix("/chunked/").and_then(|n| n.parse::<usize>().ok()) {
            write!(input.stream, "HTTP/1.1 200 OK\r\n{common}Transfer-Encoding: chunked\r\n\r\n")?;
            let mut sent = 0;
            while sent < n {
                let piece = pattern(sent, (n - sent).min(8 * 1024 + 13));
                write!(input.stream, "{:x}\r\n", piece.len())?;
                input.stream.write_all(&piece)?;
                input.stream.write_all(b"\r\n")?;
                sent += piece.len();
            }
            input.stream.write_all(b"0\r\n\r\n")?;
        } else if let Some(code) = path.strip_prefix("/status/").and_then(|n| n.parse::<u16>().ok()) {
            let body = format!("status {code}");
            write!(
                input.stream,
                "HTTP/1.1 {code} Whatever\r\n{common}Content-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
        } else if path == "/garbage" {
            input.stream.write_all(b"HELLO THERE\r\n\r\n")?;
        } else if path == "/switch" {
            write!(
                input.stream,
                "HTTP/1.1 101 Switching Protocols\r\n{common}Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            )?;
        } else if path == "/gzip" {
            write!(
                input.stream,
                "HTTP/1.1 200 OK\r\n{common}Transfer-Encoding: gzip\r\n\r\nnot really gzip"
            )?;
            close = true;
        } else if path == "/conn-cl" {
            write!(
                input.stream,
                "HTTP/1.1 200 OK\r\n{common}Connection: Content-Length\r\nContent-Length: 5\r\n\r\nhello"
            )?;
        } else if path == "/upload" {
            let digest = hasher.finish();
            let body =
                format!("bytes={body_len} sha256={}", crate::pki::hex_upper(digest.as_ref()).to_lowercase());
            write!(input.stream, "HTTP/1.1 200 OK\r\n{common}Content-Length: {}\r\n\r\n{body}", body.len())?;
        } else {
            if let Some(ms) = path.strip_prefix("/slow/").and_then(|n| n.parse::<u64>().ok()) {
                std::thread::sleep(Duration::from_millis(ms));
            }
            close = path == "/close";
            let conn_header = if close { "Connection: close\r\n" } else { "" };
            let tls_client = peer.as_ref().map(|cn| format!("tls-client: {cn}\n")).unwrap_or_default();
            let body = format!("{tls_client}{}body-bytes: {body_len}\n", req.head_text);
            write!(
                input.stream,
                "HTTP/1.1 200 OK\r\n{common}{conn_header}Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
        }
        input.stream.flush()?;
        if path == "/then-close" || path == "/then-408" {
            std::thread::sleep(Duration::from_millis(50));
            if path == "/then-408" {
                let _ = input.stream.write_all(UNSOLICITED_408);
                let _ = input.stream.flush();
            }
            input.stream.close();
            return Ok(());
        }
        if close || req.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
            input.stream.close();
            return Ok(());
        }
    }
    Ok(())
}

/// The bytes `/bytes/<n>` and `/chunked/<n>` send, for comparison.
pub fn expected_pattern(len: usize) -> Vec<u8> {
    pattern(0, len)
}
