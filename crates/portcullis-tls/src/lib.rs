//! TLS for Portcullis: BoringSSL contexts, the handshake and the byte stream on monoio, and the
//! facts of client certificates.
//!
//! - [`TlsAcceptor`]: built from a `[[listener]]` (certificate, SNI entries, client certificate
//!   mode `off` / `request` / `require`, CA bundle, CRLs); runs handshakes.
//! - [`TlsStream`] / [`PlainStream`]: the [`Stream`] the proxy reads and writes, TLS over owned
//!   staging buffers so that io_uring can own the socket buffers.
//! - [`ClientCert`]: thumbprints, DNs, serial, SANs, validity and *every* verification error of a
//!   client certificate, computed once per connection (and found again for resumed sessions).
//! - [`RevocationSet`]: CRLs compiled into revoked (issuer, serial) pairs.
//! - [`ClientTls`]: a blocking TLS client for the control side (identity providers' keys).
//! - [`BoringCrypto`]: the signature math of JSON Web Tokens (RSA, ECDSA, Ed25519, HMAC), and
//!   the checks that refuse unsafe keys.
//!
//! It knows nothing of HTTP or policy: it says what a certificate is, never what it may do.

mod acceptor;
mod client;
mod facts;
mod jose;
mod pki;
mod stream;
mod tickets;
mod verify;

pub use acceptor::{HandshakeError, SessionInfo, TlsAcceptor, TlsFault};
pub use boring::ssl::SslSession;
pub use client::{ClientIdentity, ClientTls};
pub use facts::{client_cert_from_x509, dn_string, not_after_unix};
pub use jose::{BoringCrypto, public_key_der_from_pem, public_key_der_of};
pub use pki::{is_cert_revoked, load_ca_bundle, load_certificates, load_private_key, load_revocations};
pub use portcullis_facts::{
    ClientCert, RevocationId, RevocationSet, VerifyError, VerifyErrorKind, hex_upper, normalize_dn, now_unix,
    now_unix_ms,
};
pub use stream::{PlainStream, Readiness, Stream, TlsStream, is_canceled};
pub use tickets::TicketKeys;
pub use verify::ClientVerifier;
