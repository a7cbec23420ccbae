//! A TLS client: the peer's certificate is verified against the configured CAs, or the system's
//! store, and its name checked; optionally with a client certificate of the proxy's own (mutual
//! TLS to backends) and sessions kept for resumption. Blocking, for the control side (fetching
//! identity providers' keys), or over a worker's monoio socket (backends, Redis).

use std::net::TcpStream;
use std::sync::OnceLock;

use boring::ex_data::Index;
use boring::ssl::{
    ErrorCode, Ssl, SslConnector, SslMethod, SslSession, SslSessionCacheMode, SslStream, SslVersion,
};
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
    /// The peer's name is checked against its certificate (and the chain verified).
    verify: bool,
}

/// The proxy's own certificate for mutual TLS: the chain (leaf first) and its key.
#[derive(Debug, Clone, Copy)]
pub struct ClientIdentity<'a> {
    pub cert: &'a Located<std::path::PathBuf>,
    pub key: &'a Located<std::path::PathBuf>,
}

/// Where a connection keeps the session a server granted it (a TLS 1.3 ticket comes after the
/// handshake), until [`TlsStream::take_session`] takes it.
fn session_index() -> Index<Ssl, Option<SslSession>> {
    static INDEX: OnceLock<Index<Ssl, Option<SslSession>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("an ex_data index"))
}

impl<S> TlsStream<S> {
    /// The latest session the server granted on this connection, for resuming the next one.
    pub fn take_session(&mut self) -> Option<SslSession> {
        self.ssl.ssl_mut().ex_data_mut(session_index()).and_then(Option::take)
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ClientTls {
    pub fn new(ca: &[Located<std::path::PathBuf>]) -> Result<ClientTls, String> {
        ClientTls::with(ca, None, true)
    }

    /// Trust from `ca` (the system's when empty), the proxy's own certificate when `identity` is
    /// given, and the peer's chain and name verified unless `verify` is false. Sessions the
    /// servers grant are kept for [`ClientTls::connect_resuming`].
    pub fn with(
        ca: &[Located<std::path::PathBuf>],
        identity: Option<ClientIdentity<'_>>,
        verify: bool,
    ) -> Result<ClientTls, String> {
        let mut builder = SslConnector::builder(SslMethod::tls()).map_err(|e| e.to_string())?;
        if let Some(id) = identity {
            let chain = crate::pki::load_certificates(id.cert).map_err(|e| e.to_string())?;
            let key = crate::pki::load_private_key(id.key).map_err(|e| e.to_string())?;
            builder.set_certificate(&chain[0]).map_err(|e| e.to_string())?;
            for c in chain.into_iter().skip(1) {
                builder.add_extra_chain_cert(c).map_err(|e| e.to_string())?;
            }
            builder.set_private_key(&key).map_err(|e| e.to_string())?;
            builder.check_private_key().map_err(|_| {
                format!("{}: the key does not belong to the certificate", id.key.value.display())
            })?;
        }
        if !verify {
            builder.set_verify(boring::ssl::SslVerifyMode::NONE);
        }
        builder.set_session_cache_mode(SslSessionCacheMode::CLIENT);
        let index = session_index();
        builder.set_new_session_callback(move |ssl, session| ssl.set_ex_data(index, Some(session)));
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
        Ok(ClientTls { connector: builder.build(), verify })
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
        io: S,
    ) -> Result<TlsStream<S>, String> {
        self.connect_resuming(host, io, None).await
    }

    /// As [`ClientTls::connect_async`], offering `session` (one taken from an earlier connection
    /// made with this client) for resumption; [`SessionInfo::resumed`] says whether the server
    /// took it.
    pub async fn connect_resuming<S: AsyncReadRent + AsyncWriteRent>(
        &self,
        host: &str,
        mut io: S,
        session: Option<&SslSession>,
    ) -> Result<TlsStream<S>, String> {
        let failed = |e: &dyn std::fmt::Display| format!("TLS handshake with {host} failed: {e}");
        let mut ssl = self
            .connector
            .configure()
            .and_then(|c| c.verify_hostname(self.verify).into_ssl(host))
            .map_err(|e| failed(&e))?;
        if let Some(session) = session {
            // SAFETY: sessions offered here come from connections of this client's context
            // (the caller keeps them with the client they were made by).
            unsafe { ssl.set_session(session) }.map_err(|e| failed(&e))?;
        }
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
            resumed: ssl.ssl().session_reused(),
            version: ssl.ssl().version_str(),
        };
        Ok(TlsStream { ssl, io, info })
    }
}
