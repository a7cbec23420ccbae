//! A TLS client: the peer's certificate is verified against the configured CAs, or the system's
//! store, and its name checked. Blocking, for the control side (fetching identity providers'
//! keys), or over a worker's monoio socket (the connection that shares rate-limit counts).

use std::net::TcpStream;

use boring::ssl::{ErrorCode, SslConnector, SslMethod, SslStream, SslVersion};
use boring::x509::store::X509StoreBuilder;
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use portcullis_config::Located;

use crate::acceptor::SessionInfo;
use crate::stream::{Staging, TlsStream, Wire};

/// The system's CA bundle on Debian and its derivatives (also read by BoringSSL's defaults on
/// others, through `SSL_CTX_set_default_verify_paths`).
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Trust for outgoing TLS: the CAs of `ca`, or the system's when it is empty.
#[derive(Clone)]
pub struct ClientTls {
    connector: SslConnector,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ClientTls {
    pub fn new(ca: &[Located<std::path::PathBuf>]) -> Result<ClientTls, String> {
        let mut builder = SslConnector::builder(SslMethod::tls()).map_err(|e| e.to_string())?;
        builder.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(|e| e.to_string())?;
        if ca.is_empty() {
            builder.set_default_verify_paths().map_err(|e| e.to_string())?;
            if std::path::Path::new(SYSTEM_BUNDLE).exists() {
                builder.set_ca_file(SYSTEM_BUNDLE).map_err(|e| format!("{SYSTEM_BUNDLE}: {e}"))?;
            }
        } else {
            let certs = crate::pki::load_ca_bundle(ca).map_err(|e| e.to_string())?;
            let mut store = X509StoreBuilder::new().map_err(|e| e.to_string())?;
            for cert in certs {
                store.add_cert(cert).map_err(|e| e.to_string())?;
            }
            // Only these: the store the connector started with (the system's) is replaced.
            builder.set_cert_store(store.build());
        }
        Ok(ClientTls { connector: builder.build() })
    }

    /// Runs a handshake with `host` over `tcp` (whose timeouts bound it): SNI, chain and name
    /// verified.
    pub fn connect(&self, host: &str, tcp: TcpStream) -> Result<SslStream<TcpStream>, String> {
        let config = self.connector.configure().map_err(|e| e.to_string())?;
        config.connect(host, tcp).map_err(|e| format!("TLS handshake with {host} failed: {e}"))
    }

    /// Runs a handshake with `host` over a monoio socket (the caller bounds it in time): SNI,
    /// chain and name verified.
    pub async fn connect_async<S: AsyncReadRent + AsyncWriteRent>(
        &self,
        host: &str,
        mut io: S,
    ) -> Result<TlsStream<S>, String> {
        let failed = |e: &dyn std::fmt::Display| format!("TLS handshake with {host} failed: {e}");
        let ssl = self.connector.configure().and_then(|c| c.into_ssl(host)).map_err(|e| failed(&e))?;
        let mut ssl = SslStream::new(ssl, Staging::default()).map_err(|e| failed(&e))?;
        loop {
            match ssl.connect() {
                Ok(()) => break,
                Err(e) if e.code() == ErrorCode::WANT_READ => {
                    let mut wire = Wire { ssl: &mut ssl, io: &mut io };
                    wire.flush().await.map_err(|e| failed(&e))?;
                    if wire.fill().await.map_err(|e| failed(&e))? == 0 {
                        return Err(failed(&"the server closed the connection"));
                    }
                }
                Err(e) => {
                    let _ = Wire { ssl: &mut ssl, io: &mut io }.flush().await;
                    let verify = ssl.ssl().verify_result();
                    return Err(match verify {
                        Err(v) => failed(&format!("certificate: {v}")),
                        Ok(()) => failed(&e),
                    });
                }
            }
        }
        Wire { ssl: &mut ssl, io: &mut io }.flush().await.map_err(|e| failed(&e))?;
        let info = SessionInfo {
            client_cert: None,
            client_mode: portcullis_config::ClientCertMode::Off,
            server_name: Some(host.to_owned()),
            site: 0,
            resumed: false,
            version: ssl.ssl().version_str(),
        };
        Ok(TlsStream { ssl, io, info })
    }
}
