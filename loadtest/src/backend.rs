//! A fixed-response HTTP/1.1 backend for benchmarks: keep-alive, pipelining, `Content-Length`
//! request bodies; answers every request with the same body, except `/echo`, which answers with
//! the request head it received (to check what a proxy forwards). Over TLS when given a
//! certificate, then requiring a client certificate from the given CA (a backend that admits
//! only the gateway).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// TLS for the backend: its certificate chain and key, and the CA clients must chain to.
#[derive(Debug, Clone)]
pub struct BackendTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

fn acceptor(tls: &BackendTls) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_file_iter(&tls.cert)
        .with_context(|| format!("reading {}", tls.cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key =
        PrivateKeyDer::from_pem_file(&tls.key).with_context(|| format!("reading {}", tls.key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&tls.client_ca)? {
        roots.add(ca?)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves forever on `addr` (loopback only), answering with `size` bytes; over TLS with `tls`.
pub fn serve(addr: SocketAddr, size: usize, tls: Option<BackendTls>) -> anyhow::Result<()> {
    anyhow::ensure!(addr.ip().is_loopback(), "the benchmark backend only listens on loopback addresses");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        // A Date, as every real origin sends (RFC 9110 §6.6.1): fixed, since no client reads
        // it, and without it a proxy that adds the missing field writes more than one that
        // does not.
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nDate: Wed, 02 Dec 2026 00:00:00 GMT\r\nContent-Type: application/octet-stream\r\nX-Powered-By: bench-backend\r\nContent-Length: {size}\r\n\r\n"
        )
        .into_bytes();
        response.extend((0..size).map(|i| b"abcdefghijklmnopqrstuvwxyz"[i % 26]));
        let response: &'static [u8] = Box::leak(response.into_boxed_slice());
        let acceptor = tls.as_ref().map(acceptor).transpose()?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    None => drop(connection(stream, response).await),
                    Some(a) => {
                        if let Ok(tls) = a.accept(stream).await {
                            let _ = connection(tls, response).await;
                        }
                    }
                }
            });
        }
    })
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    response: &'static [u8],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8192);
    let mut out = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        // Answer every complete request in the buffer, then write once.
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            let head_len = match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => break,
                Err(_) => return Ok(()),
            };
            let body: usize = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() < head_len + body {
                break;
            }
            if req.path == Some("/echo") {
                let head = &buf[..head_len];
                out.extend_from_slice(
                    format!(
                        "HTTP/1.1 200 OK\r\nDate: Wed, 02 Dec 2026 00:00:00 GMT\r\nX-Powered-By: bench-backend\r\nContent-Length: {}\r\n\r\n",
                        head.len()
                    )
                    .as_bytes(),
                );
                out.extend_from_slice(head);
            } else {
                out.extend_from_slice(response);
            }
            buf.drain(..head_len + body);
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
