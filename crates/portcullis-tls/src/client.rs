//! A blocking TLS client for the control side (fetching identity providers' keys): the
//! provider's certificate is verified against the configured CAs, or the system's store, and
//! its name checked. Never used on a worker's loop.

use std::net::TcpStream;

use boring::ssl::{SslConnector, SslMethod, SslStream, SslVersion};
use boring::x509::store::X509StoreBuilder;
use portcullis_config::Located;

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
}
