//! A blocking TLS client on rustls: a different TLS stack from the proxy's, so the proxy is not
//! only ever tested against itself.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore, StreamOwned};

use crate::pki::{Identity, Pki};

/// How long any client read or write may block in a test.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A client configuration: which CA it trusts, which certificate (if any) it presents, which
/// name it asks for. Sessions are cached inside it, so a second connection may resume.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

/// TLS versions a client may offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    Both,
    Tls12,
    Tls13,
}

impl TlsClient {
    /// Trusts the PKI's root, presents `identity` (if any), asks for `localhost`.
    pub fn new(pki: &Pki, identity: Option<&Identity>) -> TlsClient {
        TlsClient::with(pki, identity, Versions::Both)
    }

    pub fn with(pki: &Pki, identity: Option<&Identity>, versions: Versions) -> TlsClient {
        let identity = identity.map(|id| (id.chain_pem.as_str(), id.key_pem.as_str()));
        TlsClient::from_pem(&pki.root.cert_pem, identity, versions, "localhost")
    }

    /// A client from PEM text: the root it trusts, the (certificate chain, key) it presents,
    /// and the server name it asks for (a DNS name or an IP address).
    pub fn from_pem(
        root_pem: &str,
        identity: Option<(&str, &str)>,
        versions: Versions,
        server_name: &str,
    ) -> TlsClient {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        let root =
            CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap_or_else(|e| panic!("root: {e}"));
        roots.add(root).unwrap_or_else(|e| panic!("root store: {e}"));
        let protocols: &[&rustls::SupportedProtocolVersion] = match versions {
            Versions::Both => &[&rustls::version::TLS13, &rustls::version::TLS12],
            Versions::Tls12 => &[&rustls::version::TLS12],
            Versions::Tls13 => &[&rustls::version::TLS13],
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(protocols)
            .unwrap_or_else(|e| panic!("protocol versions: {e}"))
            .with_root_certificates(roots);
        let config = match identity {
            Some((chain_pem, key_pem)) => {
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                        .collect::<Result<_, _>>()
                        .unwrap_or_else(|e| panic!("client chain: {e}"));
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                    .unwrap_or_else(|e| panic!("client key: {e}"));
                builder.with_client_auth_cert(chain, key).unwrap_or_else(|e| panic!("client auth: {e}"))
            }
            None => builder.with_no_client_auth(),
        };
        TlsClient {
            config: Arc::new(config),
            server_name: ServerName::try_from(server_name.to_owned()).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    /// The same client asking for another server name (SNI).
    pub fn sni(mut self, name: &str) -> TlsClient {
        self.server_name =
            ServerName::try_from(name.to_owned()).unwrap_or_else(|e| panic!("server name: {e}"));
        self
    }

    /// Connects and completes the client side of the handshake.
    pub fn connect(&self, addr: SocketAddr) -> io::Result<Conn> {
        self.connect_after(addr, b"")
    }

    /// Connects, sends `preamble` in clear (a PROXY protocol header, as a balancer would), then
    /// completes the handshake.
    pub fn connect_after(&self, addr: SocketAddr, preamble: &[u8]) -> io::Result<Conn> {
        let mut tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        tcp.set_read_timeout(Some(IO_TIMEOUT))?;
        tcp.set_write_timeout(Some(IO_TIMEOUT))?;
        tcp.set_nodelay(true)?;
        tcp.write_all(preamble)?;
        let conn =
            ClientConnection::new(self.config.clone(), self.server_name.clone()).map_err(io::Error::other)?;
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        let host = match &self.server_name {
            ServerName::DnsName(d) => d.as_ref().to_owned(),
            ServerName::IpAddress(ip) => match std::net::IpAddr::from(*ip) {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            },
            other => format!("{other:?}"),
        };
        Ok(Conn { tls, leftover: Vec::new(), host })
    }

    /// Connects, sends one request, reads its response.
    pub fn get(&self, addr: SocketAddr, path: &str) -> io::Result<Response> {
        let mut c = self.connect(addr)?;
        c.request("GET", path, &[], b"")
    }
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).count()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// For the echo backend: the value of a header as the backend received it.
    pub fn echoed_header(&self, name: &str) -> Option<String> {
        let text = self.text();
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    }

    pub fn echoed_header_count(&self, name: &str) -> usize {
        self.text()
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .count()
    }
}

/// An established TLS connection.
pub struct Conn {
    tls: StreamOwned<ClientConnection, TcpStream>,
    leftover: Vec<u8>,
    /// Sent as `Host` by [`Conn::request`]: the name the connection was made for.
    host: String,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}

impl Conn {
    /// Whether this connection resumed an earlier session.
    pub fn resumed(&self) -> bool {
        self.tls.conn.handshake_kind() == Some(HandshakeKind::Resumed)
    }

    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.tls.conn.protocol_version()
    }

    /// Sends raw bytes.
    pub fn send(&mut self, raw: &[u8]) -> io::Result<()> {
        self.tls.write_all(raw)?;
        self.tls.flush()
    }

    /// Sends a request with `Host` set to the name the connection was made for, the given
    /// headers, and a `Content-Length` body when it is not empty.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        for (n, v) in headers {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        if !body.is_empty() {
            raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        raw.push_str("\r\n");
        let mut bytes = raw.into_bytes();
        bytes.extend_from_slice(body);
        self.send(&bytes)?;
        self.read_response(method == "HEAD")
    }

    fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        match self.tls.read(&mut chunk) {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.leftover.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reads one raw line (without its CRLF).
    pub fn read_line(&mut self) -> io::Result<String> {
        self.line()
    }

    fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.leftover.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.leftover[..i]).into_owned();
                self.leftover.drain(..i + 2);
                return Ok(line);
            }
            if !self.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a complete line",
                ));
            }
        }
    }

    fn exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.leftover.len() < n {
            if !self.fill()? {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a body"));
            }
        }
        Ok(self.leftover.drain(..n).collect())
    }

    /// Reads one response (skipping 1xx ones).
    pub fn read_response(&mut self, head_request: bool) -> io::Result<Response> {
        loop {
            let status_line = self.line()?;
            let status: u16 =
                status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {status_line:?}"))
                })?;
            let mut headers = Vec::new();
            loop {
                let line = self.line()?;
                if line.is_empty() {
                    break;
                }
                if let Some((n, v)) = line.split_once(':') {
                    headers.push((n.trim().to_owned(), v.trim().to_owned()));
                }
            }
            if (100..200).contains(&status) {
                continue;
            }
            let mut response = Response { status, headers, body: Vec::new() };
            if head_request || status == 204 || status == 304 {
                return Ok(response);
            }
            if response.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
                loop {
                    let size_line = self.line()?;
                    let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| {
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("bad chunk size {size_line:?}"),
                            )
                        })?;
                    if size == 0 {
                        while !self.line()?.is_empty() {}
                        break;
                    }
                    let data = self.exact(size)?;
                    response.body.extend_from_slice(&data);
                    if !self.line()?.is_empty() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "chunk data not followed by CRLF",
                        ));
                    }
                }
            } else if let Some(len) = response.header("content-length").and_then(|v| v.parse::<usize>().ok())
            {
                response.body = self.exact(len)?;
            } else {
                while self.fill()? {}
                response.body = std::mem::take(&mut self.leftover);
            }
            return Ok(response);
        }
    }

    /// Reads until the server closes; returns what arrived. An error here (a TLS alert, say)
    /// is returned as such.
    pub fn read_to_close(&mut self) -> io::Result<Vec<u8>> {
        while self.fill()? {}
        Ok(std::mem::take(&mut self.leftover))
    }

    /// Ends our side with close_notify and reads whatever the server still sends until it closes.
    pub fn finish(&mut self) -> io::Result<Vec<u8>> {
        self.tls.conn.send_close_notify();
        self.tls.flush()?;
        self.read_to_close()
    }

    /// Ends our side with close_notify, then reads to the end: whether the server answered with
    /// close_notify of its own (`false`: the connection just ended). Data still arriving is an
    /// error.
    pub fn exchange_close_notify(&mut self) -> io::Result<bool> {
        self.tls.conn.send_close_notify();
        self.tls.flush()?;
        let mut chunk = [0u8; 1024];
        match self.tls.read(&mut chunk) {
            Ok(0) => Ok(true),
            Ok(n) => Err(io::Error::other(format!("{n} bytes after close_notify"))),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reads a body of `len` bytes in pieces, calling `f` with each; keeps memory flat for huge
    /// bodies.
    pub fn read_body_streaming(&mut self, mut len: usize, mut f: impl FnMut(&[u8])) -> io::Result<()> {
        if !self.leftover.is_empty() {
            let n = self.leftover.len().min(len);
            f(&self.leftover[..n]);
            self.leftover.drain(..n);
            len -= n;
        }
        let mut chunk = vec![0u8; 64 * 1024];
        while len > 0 {
            let n = self.tls.read(&mut chunk[..len.min(64 * 1024)])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            f(&chunk[..n]);
            len -= n;
        }
        Ok(())
    }

    /// Writes without waiting for anything.
    pub fn write_raw(&mut self, raw: &[u8]) -> io::Result<()> {
        self.tls.write_all(raw)
    }

    /// Closes the TLS session cleanly.
    pub fn close(mut self) {
        self.tls.conn.send_close_notify();
        let _ = self.tls.flush();
    }
}
