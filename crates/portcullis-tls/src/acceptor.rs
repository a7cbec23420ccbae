//! Server-side TLS contexts built from a `[[listener]]`, and the handshake.

use std::fmt;
use std::io;
use std::sync::{Arc, OnceLock};

use boring::error::ErrorStack;
use boring::ex_data::Index;
use boring::hash::{Hasher, MessageDigest};
use boring::ssl::{
    ErrorCode, NameType, SniError, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslRef,
    SslSessionCacheMode, SslStream, SslVerifyMode, SslVersion,
};
use boring::x509::X509;
use boring_sys as ffi;
use bytes::BytesMut;
use foreign_types::{ForeignType, ForeignTypeRef};
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use portcullis_config::{CertKey, ClientAuth, ClientCertMode, ConfigErrors, Listener, TlsVersion};

use portcullis_facts::{ClientCert, now_unix};

use crate::facts::unix_time;
use portcullis_facts::RevocationSet;

use crate::pki::{load_ca_bundle, load_certificates, load_private_key, load_revocations};
use crate::stream::{Staging, TlsStream, Wire};
use crate::tickets::{TicketKeys, ticket_facts_index};
use crate::verify::ClientVerifier;

/// TLS 1.2 suites: forward-secret AEADs only (TLS 1.3's are fixed by BoringSSL).
const TLS12_CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

/// How one site (a listener's default, or an SNI entry) treats client certificates.
#[derive(Debug)]
struct SiteAuth {
    /// 0 for the listener's own site, i + 1 for its i-th SNI entry.
    site: usize,
    mode: ClientCertMode,
    verifier: Option<Arc<ClientVerifier>>,
}

impl SiteAuth {
    fn verify_mode(&self) -> SslVerifyMode {
        match self.mode {
            ClientCertMode::Off => SslVerifyMode::NONE,
            ClientCertMode::Request => SslVerifyMode::PEER,
            ClientCertMode::Require => SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        }
    }
}

struct SniSite {
    /// Lower-case names; `*.example.com` matches one label.
    hostnames: Vec<String>,
    ctx: SslContext,
    auth: Arc<SiteAuth>,
}

/// Whether `name` is one of `patterns` (lower-case; `*.example.com` covers one label).
fn hostname_matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|h| match h.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => h.eq_ignore_ascii_case(name),
    })
}

impl SniSite {
    fn matches(&self, name: &str) -> bool {
        hostname_matches(&self.hostnames, name)
    }
}

fn auth_index() -> Index<Ssl, Arc<SiteAuth>> {
    static INDEX: OnceLock<Index<Ssl, Arc<SiteAuth>>> = OnceLock::new();
    *INDEX.get_or_init(|| {
        Ssl::new_ex_index().unwrap_or_else(|e| panic!("cannot allocate an SSL ex_data index: {e}"))
    })
}

/// Set when the client's chain did not parse (the handshake's refusal then says so).
fn unreadable_index() -> Index<Ssl, ()> {
    static INDEX: OnceLock<Index<Ssl, ()>> = OnceLock::new();
    *INDEX.get_or_init(|| {
        Ssl::new_ex_index().unwrap_or_else(|e| panic!("cannot allocate an SSL ex_data index: {e}"))
    })
}

pub(crate) fn facts_index() -> Index<Ssl, Arc<ClientCert>> {
    static INDEX: OnceLock<Index<Ssl, Arc<ClientCert>>> = OnceLock::new();
    *INDEX.get_or_init(|| {
        Ssl::new_ex_index().unwrap_or_else(|e| panic!("cannot allocate an SSL ex_data index: {e}"))
    })
}

/// What a completed handshake established.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// The client certificate's facts, when one was presented.
    pub client_cert: Option<Arc<ClientCert>>,
    pub client_mode: ClientCertMode,
    pub server_name: Option<String>,
    /// The site the connection was accepted for: 0, the listener's own; i + 1, its i-th SNI
    /// entry (see [`TlsAcceptor::site_for_host`]).
    pub site: usize,
    pub resumed: bool,
    pub version: &'static str,
}

/// Why a handshake did not complete.
#[derive(Debug)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The socket failed.
    Io(io::Error),
    /// The client went away mid-handshake.
    Closed,
    /// The client certificate was refused (`require` mode); the text says why.
    CertificateRejected(String),
    /// Anything else TLS refused, classified by BoringSSL's reason code; `detail` is its text.
    Protocol { fault: TlsFault, detail: String },
    /// The proxy could not set the connection up (out of memory, say).
    Internal(String),
}

/// What a client got wrong in a handshake, from BoringSSL's reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsFault {
    /// No cipher suite both sides accept.
    NoSharedCipher,
    /// No key-exchange group both sides accept.
    NoSharedGroup,
    /// A protocol version the listener does not accept (below `tls_min_version`, say).
    UnsupportedVersion,
    /// Not TLS at all: plain HTTP, or bytes that are no TLS record.
    NotTls,
    /// Anything else.
    Other,
}

impl TlsFault {
    fn of(e: &boring::ssl::Error) -> TlsFault {
        let lib_ssl = ffi::ERR_LIB_SSL.0 as std::ffi::c_int;
        let Some(stack) = e.ssl_error() else { return TlsFault::Other };
        for err in stack.errors() {
            if err.library_code() != lib_ssl {
                continue;
            }
            return match err.reason_code() {
                ffi::SSL_R_NO_SHARED_CIPHER => TlsFault::NoSharedCipher,
                ffi::SSL_R_NO_SHARED_GROUP => TlsFault::NoSharedGroup,
                ffi::SSL_R_UNSUPPORTED_PROTOCOL => TlsFault::UnsupportedVersion,
                ffi::SSL_R_HTTP_REQUEST
                | ffi::SSL_R_HTTPS_PROXY_REQUEST
                | ffi::SSL_R_WRONG_VERSION_NUMBER => TlsFault::NotTls,
                _ => continue,
            };
        }
        TlsFault::Other
    }
}

impl fmt::Display for TlsFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFault::NoSharedCipher => "no shared cipher suite",
            TlsFault::NoSharedGroup => "no shared key-exchange group",
            TlsFault::UnsupportedVersion => "unsupported TLS version",
            TlsFault::NotTls => "not TLS",
            TlsFault::Other => "refused",
        })
    }
}

/// Whether BoringSSL's error stack holds `reason` from library `lib`.
fn has_reason(stack: &ErrorStack, lib: std::ffi::c_int, reason: std::ffi::c_int) -> bool {
    stack.errors().iter().any(|e| e.library_code() == lib && e.reason_code() == reason)
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "i/o error during handshake: {e}"),
            HandshakeError::Closed => f.write_str("client closed the connection during the handshake"),
            HandshakeError::CertificateRejected(why) => write!(f, "client certificate rejected: {why}"),
            HandshakeError::Protocol { fault, detail } => write!(f, "handshake failed: {fault} ({detail})"),
            HandshakeError::Internal(why) => write!(f, "cannot set up the connection: {why}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

/// Accepts TLS connections for one listener: its certificate, its SNI entries, its client
/// certificate modes and trust.
#[derive(Clone)]
pub struct TlsAcceptor {
    ctx: SslContext,
    default_auth: Arc<SiteAuth>,
    /// The revocation sets of the listener and its SNI entries.
    revoked: Vec<Arc<RevocationSet>>,
    /// Hostnames of the SNI entries, in the order the SNI callback tries them.
    site_hostnames: Arc<Vec<Vec<String>>>,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor").field("client_mode", &self.default_auth.mode).finish_non_exhaustive()
    }
}

/// Trust material of one site, loaded from its files.
struct Trust {
    cas: Vec<X509>,
    auth: Arc<SiteAuth>,
}

fn load_trust(site: usize, client: &ClientAuth, errors: &mut ConfigErrors) -> Option<Trust> {
    if client.mode.value == ClientCertMode::Off {
        return Some(Trust {
            cas: Vec::new(),
            auth: Arc::new(SiteAuth { site, mode: ClientCertMode::Off, verifier: None }),
        });
    }
    let cas = match load_ca_bundle(&client.client_ca) {
        Ok(c) => c,
        Err(e) => {
            errors.extend(e);
            // The CRLs cannot be checked against CAs that did not load; that they can be read
            // is still worth knowing in the same pass.
            for crl in &client.crl {
                if let Err(e) = std::fs::read(&crl.value) {
                    errors.push(crl.loc.error(format!("cannot read {}: {e}", crl.value.display())));
                }
            }
            return None;
        }
    };
    let revoked = match load_revocations(&client.crl, &cas) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            errors.extend(e);
            return None;
        }
    };
    match ClientVerifier::new(&cas, revoked) {
        Ok(v) => Some(Trust {
            cas,
            auth: Arc::new(SiteAuth { site, mode: client.mode.value, verifier: Some(Arc::new(v)) }),
        }),
        Err(e) => {
            errors.push(client.mode.loc.error(format!("cannot build the CA store: {e}")));
            None
        }
    }
}

/// A session-id context that ties resumable sessions to the trust they were verified under.
fn session_id_context(site: usize, trust: &Trust) -> [u8; 32] {
    let mut out = [0u8; 32];
    if let Ok(mut h) = Hasher::new(MessageDigest::sha256()) {
        let _ = h.update(&(site as u64).to_le_bytes());
        let _ = h.update(&[trust.auth.mode as u8]);
        for ca in &trust.cas {
            if let Ok(d) = ca.digest(MessageDigest::sha256()) {
                let _ = h.update(&d);
            }
        }
        if let Ok(d) = h.finish() {
            out.copy_from_slice(&d[..32]);
        }
    }
    out
}

/// A context that keeps certificates as DER buffers (`TLS_with_buffers_method`): BoringSSL then
/// never parses a client's chain into X509 objects. Our verifier does, and only when its cache
/// has not seen the chain (see `verify`).
fn buffers_context() -> Result<SslContextBuilder, String> {
    // SAFETY: no X509-based function is called on these contexts or their connections (the
    // `boring` wrappers that would be assert it), only the buffer-based ones.
    SslContextBuilder::new(unsafe { SslMethod::tls_with_buffer() }).map_err(|e| e.to_string())
}

/// One reference to a CRYPTO_BUFFER, released on drop.
struct Buffer(*mut ffi::CRYPTO_BUFFER);

impl Buffer {
    fn new(der: &[u8]) -> Option<Buffer> {
        // SAFETY: copies `der` into a new buffer (no pool).
        let p = unsafe { ffi::CRYPTO_BUFFER_new(der.as_ptr(), der.len(), std::ptr::null_mut()) };
        (!p.is_null()).then_some(Buffer(p))
    }

    /// One buffer per DER encoding, or an error.
    fn all(ders: impl IntoIterator<Item = Result<Vec<u8>, ErrorStack>>) -> Result<Vec<Buffer>, String> {
        ders.into_iter()
            .map(|der| {
                Buffer::new(&der.map_err(|e| e.to_string())?).ok_or_else(|| "out of memory".to_owned())
            })
            .collect()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: the reference `new` got.
        unsafe { ffi::CRYPTO_BUFFER_free(self.0) }
    }
}

/// The names of the accepted CAs, as DER, for the CertificateRequest: all of them, or an error.
fn set_client_ca_names(b: &mut SslContextBuilder, cas: &[X509]) -> Result<(), String> {
    let names = Buffer::all(cas.iter().map(|ca| ca.subject_name().to_der()))?;
    // SAFETY: a new, empty stack; each buffer pushed is owned by the stack from then on (its
    // `Buffer` is forgotten), and the stack by the context once given to it. On a failed push the
    // stack and what it holds are freed here.
    unsafe {
        let stack = ffi::OPENSSL_sk_new_null();
        if stack.is_null() {
            return Err("out of memory".to_owned());
        }
        for name in names {
            if ffi::OPENSSL_sk_push(stack, name.0.cast()) == 0 {
                for i in 0..ffi::OPENSSL_sk_num(stack) {
                    ffi::CRYPTO_BUFFER_free(ffi::OPENSSL_sk_value(stack, i).cast());
                }
                ffi::OPENSSL_sk_free(stack);
                return Err("out of memory".to_owned());
            }
            std::mem::forget(name);
        }
        ffi::SSL_CTX_set0_client_CAs(b.as_ptr(), stack.cast());
    }
    Ok(())
}

/// A context holding one certificate chain, its key, and the CA names sent to clients.
fn site_context(
    cert: &CertKey,
    trust: &Trust,
    sid_ctx: &[u8],
    min: TlsVersion,
    errors: &mut ConfigErrors,
) -> Option<SslContextBuilder> {
    let built = (|| -> Result<SslContextBuilder, String> {
        let chain = load_certificates(&cert.cert).map_err(|e| e.message)?;
        let key = load_private_key(&cert.key).map_err(|e| e.message)?;
        let mut b = buffers_context()?;
        let min = match min {
            TlsVersion::Tls12 => SslVersion::TLS1_2,
            TlsVersion::Tls13 => SslVersion::TLS1_3,
        };
        b.set_min_proto_version(Some(min)).map_err(|e| e.to_string())?;
        b.set_max_proto_version(Some(SslVersion::TLS1_3)).map_err(|e| e.to_string())?;
        b.set_cipher_list(TLS12_CIPHERS).map_err(|e| e.to_string())?;
        // TLS 1.3: AES-128-GCM-SHA256 first, by the server's choice (every TLS 1.3 client must
        // support it, RFC 8446 §9.1), then ChaCha20 and AES-256 at the client's choice. A SHA-256
        // key schedule runs on the SHA extensions of current CPUs; SHA-384 does not, and costs a
        // resumed handshake about a tenth of its time. P-256 ECDHE matches 128-bit security anyway.
        let suites: [u16; 3] = [0x1301, 0x1303, 0x1302];
        let flags: [u32; 3] = [0, ffi::SSL_CIPHER_FLAG_EQUAL_PREFERENCE_WITH_NEXT as u32, 0];
        // SAFETY: `b` is a live SSL_CTX; both arrays hold `suites.len()` elements.
        if unsafe {
            ffi::SSL_CTX_set1_tls13_ciphers(b.as_ptr(), suites.as_ptr(), flags.as_ptr(), suites.len())
        } != 1
        {
            return Err("cannot set the TLS 1.3 cipher suites".to_owned());
        }
        b.set_options(SslOptions::CIPHER_SERVER_PREFERENCE | SslOptions::NO_RENEGOTIATION);
        let leaf = &chain[0];
        if unix_time(leaf.not_after()) < now_unix() {
            tracing::warn!(file = %cert.cert.value.display(), "server certificate has expired");
        }
        let buffers = Buffer::all(chain.iter().map(|c| c.to_der()))?;
        let raw: Vec<*mut ffi::CRYPTO_BUFFER> = buffers.iter().map(|b| b.0).collect();
        // SAFETY: `b` is a live SSL_CTX; `raw` holds `raw.len()` live buffers, which the context
        // takes references of; `key` is a live EVP_PKEY.
        let set = unsafe {
            ffi::SSL_CTX_set_chain_and_key(
                b.as_ptr(),
                raw.as_ptr(),
                raw.len(),
                key.as_ptr(),
                std::ptr::null(),
            )
        };
        if set != 1 {
            let e = ErrorStack::get();
            return Err(
                if has_reason(&e, ffi::ERR_LIB_X509.0 as std::ffi::c_int, ffi::X509_R_KEY_VALUES_MISMATCH) {
                    format!(
                        "the key in {} does not match the certificate in {}",
                        cert.key.value.display(),
                        cert.cert.value.display()
                    )
                } else {
                    format!("{}: {e}", cert.key.value.display())
                },
            );
        }
        b.set_session_id_context(sid_ctx).map_err(|e| e.to_string())?;
        if !trust.cas.is_empty() {
            set_client_ca_names(&mut b, &trust.cas)?;
        }
        Ok(b)
    })();
    match built {
        Ok(b) => Some(b),
        Err(msg) => {
            errors.push(cert.loc.error(msg));
            None
        }
    }
}

/// The TLS alert that says why `facts` were refused.
fn alert_for(facts: &ClientCert) -> std::ffi::c_int {
    match facts.verify_errors.first() {
        Some(e) if e.is_revoked() => ffi::SSL_AD_CERTIFICATE_REVOKED,
        Some(e) if e.is_expired() || e.is_not_yet_valid() => ffi::SSL_AD_CERTIFICATE_EXPIRED,
        Some(e)
            if matches!(
                e.kind.code(),
                ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
                    | ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
                    | ffi::X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
                    | ffi::X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
                    | ffi::X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
            ) =>
        {
            ffi::SSL_AD_UNKNOWN_CA
        }
        _ => ffi::SSL_AD_BAD_CERTIFICATE,
    }
}

impl TlsAcceptor {
    /// Loads every file the listener names and builds its contexts; reports all problems.
    pub fn build(listener: &Listener, keys: &TicketKeys) -> Result<TlsAcceptor, ConfigErrors> {
        let mut errors = ConfigErrors::default();
        let default_trust = load_trust(0, &listener.client, &mut errors);
        let mut sites = Vec::new();
        let mut revoked = Vec::new();
        for (i, sni) in listener.sni.iter().enumerate() {
            let Some(trust) = load_trust(i + 1, &sni.client, &mut errors) else {
                // Its certificate and key are still loaded, so that their errors show in this pass.
                let off = Trust {
                    cas: Vec::new(),
                    auth: Arc::new(SiteAuth { site: i + 1, mode: ClientCertMode::Off, verifier: None }),
                };
                let _ = site_context(&sni.certificate, &off, &[0; 32], listener.tls_min_version, &mut errors);
                continue;
            };
            if let Some(v) = &trust.auth.verifier {
                revoked.push(v.revoked().clone());
            }
            let sid = session_id_context(i + 1, &trust);
            if let Some(mut b) =
                site_context(&sni.certificate, &trust, &sid, listener.tls_min_version, &mut errors)
            {
                install_verify(&mut b, &trust.auth);
                crate::tickets::share_keys(&mut b, keys);
                sites.push(SniSite {
                    hostnames: sni.hostnames.iter().map(|h| h.value.to_ascii_lowercase()).collect(),
                    ctx: b.build(),
                    auth: trust.auth,
                });
            }
        }
        let Some(default_trust) = default_trust else {
            // Still load the certificate and key, so that their errors are reported too.
            let off = Trust {
                cas: Vec::new(),
                auth: Arc::new(SiteAuth { site: 0, mode: ClientCertMode::Off, verifier: None }),
            };
            let _ =
                site_context(&listener.certificate, &off, &[0; 32], listener.tls_min_version, &mut errors);
            return Err(errors);
        };
        let sid = session_id_context(0, &default_trust);
        let Some(mut b) =
            site_context(&listener.certificate, &default_trust, &sid, listener.tls_min_version, &mut errors)
        else {
            return Err(errors);
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        if let Some(v) = &default_trust.auth.verifier {
            revoked.push(v.revoked().clone());
        }
        let site_hostnames = Arc::new(sites.iter().map(|s| s.hostnames.clone()).collect());
        configure_base(&mut b, listener, keys, default_trust.auth.clone(), sites)
            .map_err(|e| listener.loc.error(e))?;
        Ok(TlsAcceptor { ctx: b.build(), default_auth: default_trust.auth, revoked, site_hostnames })
    }

    /// The site a request for `host` (a `Host` value without its port) belongs to, by the same
    /// rules as SNI. A request whose site is not its connection's must be refused: otherwise a
    /// client could connect under a lenient site and ask for the host of a strict one.
    pub fn site_for_host(&self, host: &[u8]) -> usize {
        let Ok(host) = std::str::from_utf8(host) else { return 0 };
        self.site_hostnames.iter().position(|names| hostname_matches(names, host)).map_or(0, |i| i + 1)
    }

    /// Whether this listener has SNI entries (when it has none, every request is on site 0).
    pub fn has_sites(&self) -> bool {
        !self.site_hostnames.is_empty()
    }

    /// Revocation data of this listener (and its SNI entries), for per-request checks.
    pub fn revocation_sets(&self) -> &[Arc<RevocationSet>] {
        &self.revoked
    }

    /// The listener's own client-certificate mode (SNI entries may differ).
    pub fn client_mode(&self) -> ClientCertMode {
        self.default_auth.mode
    }

    /// Runs the server side of a handshake over `io`.
    pub async fn accept<S: AsyncReadRent + AsyncWriteRent>(
        &self,
        io: S,
    ) -> Result<TlsStream<S>, HandshakeError> {
        self.accept_after(io, BytesMut::new()).await
    }

    /// Runs the server side of a handshake over `io`, whose first bytes were already read into
    /// `read` (after a PROXY protocol header, say).
    pub async fn accept_after<S: AsyncReadRent + AsyncWriteRent>(
        &self,
        mut io: S,
        read: BytesMut,
    ) -> Result<TlsStream<S>, HandshakeError> {
        let mut ssl = Ssl::new(&self.ctx).map_err(|e| HandshakeError::Internal(e.to_string()))?;
        // The verification callback's trust (the SNI callback may move the connection elsewhere).
        ssl.set_ex_data(auth_index(), self.default_auth.clone());
        let staging = Staging { rx: read, tx: BytesMut::new() };
        let mut ssl = SslStream::new(ssl, staging).map_err(|e| HandshakeError::Internal(e.to_string()))?;
        loop {
            match ssl.accept() {
                Ok(()) => break,
                Err(e) if e.code() == ErrorCode::WANT_READ => {
                    let mut wire = Wire { ssl: &mut ssl, io: &mut io };
                    wire.flush().await?;
                    if wire.fill().await? == 0 {
                        return Err(HandshakeError::Closed);
                    }
                }
                Err(e) => {
                    // Send the alert that says why, then report it.
                    let _ = Wire { ssl: &mut ssl, io: &mut io }.flush().await;
                    if let Some(facts) = ssl.ssl().ex_data(facts_index())
                        && !facts.is_valid()
                    {
                        return Err(HandshakeError::CertificateRejected(format!(
                            "{} ({})",
                            facts.verify_summary(),
                            facts.subject
                        )));
                    }
                    if ssl.ssl().ex_data(unreadable_index()).is_some() {
                        return Err(HandshakeError::CertificateRejected(
                            "client certificate chain does not parse".to_owned(),
                        ));
                    }
                    if e.code() == ErrorCode::SYSCALL && e.io_error().is_none() {
                        return Err(HandshakeError::Closed);
                    }
                    if e.ssl_error().is_some_and(|stack| {
                        has_reason(
                            stack,
                            ffi::ERR_LIB_SSL.0 as std::ffi::c_int,
                            ffi::SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE,
                        )
                    }) {
                        return Err(HandshakeError::CertificateRejected(
                            "no client certificate presented".to_owned(),
                        ));
                    }
                    return Err(HandshakeError::Protocol { fault: TlsFault::of(&e), detail: describe(&e) });
                }
            }
        }
        // What the handshake still has to send (the session ticket) is not flushed here: it goes
        // out with the first response, or before the first wait for the client, whichever comes
        // first (every read flushes before it waits). One write instead of two.
        let info = match self.session_info(&ssl) {
            Ok(info) => info,
            Err(e) => {
                let _ = Wire { ssl: &mut ssl, io: &mut io }.flush().await;
                return Err(e);
            }
        };
        Ok(TlsStream { ssl, io, info })
    }

    fn session_info(&self, ssl: &SslStream<Staging>) -> Result<SessionInfo, HandshakeError> {
        let r = ssl.ssl();
        let auth = r.ex_data(auth_index()).cloned().unwrap_or_else(|| self.default_auth.clone());
        let resumed = r.session_reused();
        // A full handshake verified the certificate just now; a resumed one knows it from its
        // ticket, and must still pass today's CRLs and clock.
        let client_cert = if resumed {
            r.ex_data(ticket_facts_index()).cloned()
        } else {
            r.ex_data(facts_index()).cloned()
        };
        if auth.mode == ClientCertMode::Require {
            match &client_cert {
                Some(c) if !c.is_valid() => {
                    return Err(HandshakeError::CertificateRejected(format!(
                        "{} ({})",
                        c.verify_summary(),
                        c.subject
                    )));
                }
                Some(c) if resumed => {
                    let now = now_unix();
                    let revoked = auth.verifier.as_ref().is_some_and(|v| v.revoked().revokes(c));
                    if revoked || now < c.not_before || now > c.not_after {
                        let why =
                            if revoked { "certificate revoked" } else { "certificate outside its validity" };
                        return Err(HandshakeError::CertificateRejected(format!(
                            "{why} ({}) on a resumed session",
                            c.subject
                        )));
                    }
                }
                None => return Err(HandshakeError::CertificateRejected("no client certificate".to_owned())),
                Some(_) => {}
            }
        }
        Ok(SessionInfo {
            client_cert,
            client_mode: auth.mode,
            server_name: r.servername(NameType::HOST_NAME).map(str::to_owned),
            site: auth.site,
            resumed,
            version: r.version_str(),
        })
    }
}

fn describe(e: &boring::ssl::Error) -> String {
    match e.ssl_error() {
        Some(stack) => stack
            .errors()
            .iter()
            .map(|err| err.reason().unwrap_or("unknown").to_owned())
            .collect::<Vec<_>>()
            .join(", "),
        None => e.to_string(),
    }
}

/// Installs client certificate verification on a context, for `auth`'s mode. Connections carry
/// the site they are on in their `auth_index` data, which the SNI callback changes together with
/// the mode (`set_site`).
fn install_verify(b: &mut SslContextBuilder, auth: &SiteAuth) {
    // SAFETY: `b` is a live SSL_CTX; `verify_peer` has the signature BoringSSL expects.
    unsafe { ffi::SSL_CTX_set_custom_verify(b.as_ptr(), verify_mode_bits(auth), Some(verify_peer)) };
}

fn verify_mode_bits(auth: &SiteAuth) -> std::ffi::c_int {
    std::ffi::c_int::from(auth.verify_mode().bits())
}

/// Puts a connection on `auth`'s site: its verification mode and the trust its callback uses.
fn set_site(ssl: &mut SslRef, auth: Arc<SiteAuth>) {
    // SAFETY: `ssl` is a live SSL mid-handshake (before the client's certificate is read).
    unsafe { ffi::SSL_set_custom_verify(ssl.as_ptr(), verify_mode_bits(&auth), Some(verify_peer)) };
    ssl.set_ex_data(auth_index(), auth);
}

/// BoringSSL's custom verification callback: the client's chain, as DER, through the site's
/// verifier. Never panics (it runs inside BoringSSL).
unsafe extern "C" fn verify_peer(ssl: *mut ffi::SSL, out_alert: *mut u8) -> ffi::ssl_verify_result_t {
    let (ssl_verify_ok, ssl_verify_invalid) =
        (ffi::ssl_verify_result_t::ssl_verify_ok, ffi::ssl_verify_result_t::ssl_verify_invalid);
    // SAFETY: BoringSSL calls this with the live SSL whose handshake it is running.
    let ssl = unsafe { SslRef::from_ptr_mut(ssl) };
    let Some(auth) = ssl.ex_data(auth_index()).cloned() else { return ssl_verify_ok };
    let Some(verifier) = &auth.verifier else { return ssl_verify_ok };
    // SAFETY: the stack and its buffers belong to the SSL and outlive this call.
    let chain: Vec<&[u8]> = unsafe {
        let certs = ffi::SSL_get0_peer_certificates(ssl.as_ptr());
        if certs.is_null() {
            Vec::new()
        } else {
            (0..ffi::OPENSSL_sk_num(certs.cast()))
                .map(|i| {
                    let b = ffi::OPENSSL_sk_value(certs.cast(), i).cast::<ffi::CRYPTO_BUFFER>();
                    std::slice::from_raw_parts(ffi::CRYPTO_BUFFER_data(b), ffi::CRYPTO_BUFFER_len(b))
                })
                .collect()
        }
    };
    if chain.is_empty() {
        return ssl_verify_ok;
    }
    let require = auth.mode == ClientCertMode::Require;
    let Some(facts) = verifier.verify(&chain) else {
        // Not certificates we can read: nothing for policy to go on. Logged with the handshake's
        // outcome (the client may yet fail to prove it holds the key).
        ssl.set_ex_data(unreadable_index(), ());
        if require {
            // SAFETY: BoringSSL passes a valid pointer for the alert.
            unsafe { *out_alert = ffi::SSL_AD_BAD_CERTIFICATE as u8 };
            return ssl_verify_invalid;
        }
        return ssl_verify_ok;
    };
    let valid = facts.is_valid();
    let alert = alert_for(&facts);
    ssl.set_ex_data(facts_index(), facts);
    if require && !valid {
        // SAFETY: as above.
        unsafe { *out_alert = alert as u8 };
        ssl_verify_invalid
    } else {
        ssl_verify_ok
    }
}

/// Settings of the context a connection starts on: sessions, verification, SNI switching.
fn configure_base(
    b: &mut SslContextBuilder,
    listener: &Listener,
    keys: &TicketKeys,
    default_auth: Arc<SiteAuth>,
    sites: Vec<SniSite>,
) -> Result<(), String> {
    // Tickets only: a server-side session cache would be one more lock shared by all workers.
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    if listener.session_tickets {
        // Tickets carry the client certificate's facts (see `tickets`), so sessions keep only
        // the certificate's SHA-256, not the chain.
        crate::tickets::install(b, keys);
        // SAFETY: `b` is a live SSL_CTX.
        unsafe {
            ffi::SSL_CTX_set_retain_only_sha256_of_client_certs(b.as_ptr(), 1);
            // One ticket per handshake instead of two: half the sealing work (and bytes).
            ffi::SSL_CTX_set_num_tickets(b.as_ptr(), 1);
        }
    } else {
        b.set_options(SslOptions::NO_TICKET);
    }

    install_verify(b, &default_auth);

    if !sites.is_empty() {
        b.set_servername_callback(move |ssl, _alert| {
            let Some(name) = ssl.servername(NameType::HOST_NAME) else { return Ok(()) };
            let Some(site) = sites.iter().find(|s| s.matches(name)) else { return Ok(()) };
            ssl.set_ssl_context(&site.ctx).map_err(|_| SniError::ALERT_FATAL)?;
            set_site(ssl, site.auth.clone());
            Ok(())
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(names: &[&str]) -> SniSite {
        SniSite {
            hostnames: names.iter().map(|s| s.to_string()).collect(),
            ctx: buffers_context().expect("ctx").build(),
            auth: Arc::new(SiteAuth { site: 1, mode: ClientCertMode::Off, verifier: None }),
        }
    }

    #[test]
    fn sni_matching() {
        let s = site(&["api.example.com", "*.devices.example.com"]);
        assert!(s.matches("API.example.com"));
        assert!(s.matches("x.devices.example.com"));
        assert!(!s.matches("devices.example.com"));
        assert!(!s.matches("a.b.devices.example.com"));
        assert!(!s.matches("example.com"));
    }
}
