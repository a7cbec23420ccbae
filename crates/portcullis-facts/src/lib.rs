//! What is known of a client certificate, in the forms policy compares against: thumbprints,
//! distinguished names (as API Management shows them, and normalised for comparison), serials,
//! validity, what verification found wrong, and which certificates today's CRLs revoke.
//!
//! No TLS library and no I/O: the TLS crate fills these from BoringSSL's view of a chain, and the
//! policy crate reads them without linking BoringSSL.
#![forbid(unsafe_code)]

use std::fmt;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use ahash::AHashSet;
use base64::Engine as _;

/// What verification found wrong with a certificate of a chain. The codes are the `X509_V_ERR_*`
/// values of the OpenSSL family's ABI (stable, shared by BoringSSL), kept for logs and for the
/// session-ticket encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum VerifyErrorKind {
    /// Past its not-after date.
    Expired,
    /// Before its not-before date.
    NotYetValid,
    /// Listed in a CRL of the configuration.
    Revoked,
    /// The issuer of a certificate of the chain is not among the trusted CAs.
    UnknownIssuer,
    /// A self-signed certificate that is not a trusted root.
    UntrustedSelfSigned,
    /// The chain is longer than the verifier allows.
    ChainTooLong,
    /// A signature in the chain does not verify.
    BadSignature,
    /// A certificate in the issuer position is not a CA.
    InvalidCa,
    /// The certificate is not for client authentication (extended key usage).
    InvalidPurpose,
    /// A certificate's validity dates cannot be read.
    BadValidity,
    /// Anything else, by its code.
    Other(i32),
}

impl VerifyErrorKind {
    /// The kind of an `X509_V_ERR_*` code.
    pub fn from_code(code: i32) -> VerifyErrorKind {
        use VerifyErrorKind::*;
        match code {
            10 => Expired,
            9 => NotYetValid,
            23 => Revoked,
            20 => UnknownIssuer,
            19 => UntrustedSelfSigned,
            22 => ChainTooLong,
            7 => BadSignature,
            24 => InvalidCa,
            26 => InvalidPurpose,
            13 => BadValidity,
            other => Other(other),
        }
    }

    /// The `X509_V_ERR_*` code of this kind.
    pub fn code(self) -> i32 {
        use VerifyErrorKind::*;
        match self {
            Expired => 10,
            NotYetValid => 9,
            Revoked => 23,
            UnknownIssuer => 20,
            UntrustedSelfSigned => 19,
            ChainTooLong => 22,
            BadSignature => 7,
            InvalidCa => 24,
            InvalidPurpose => 26,
            BadValidity => 13,
            Other(code) => code,
        }
    }

    /// The text logs show (OpenSSL's wording where it has one).
    pub fn description(self) -> &'static str {
        use VerifyErrorKind::*;
        match self {
            Expired => "certificate has expired",
            NotYetValid => "certificate is not yet valid",
            Revoked => "certificate revoked",
            UnknownIssuer => "unable to get local issuer certificate",
            UntrustedSelfSigned => "self signed certificate in certificate chain",
            ChainTooLong => "certificate chain too long",
            BadSignature => "certificate signature failure",
            InvalidCa => "invalid CA certificate",
            InvalidPurpose => "unsupported certificate purpose",
            BadValidity => "format error in certificate's notBefore or notAfter field",
            Other(18) => "self signed certificate",
            Other(2) => "unable to get issuer certificate",
            Other(21) => "unable to verify the first certificate",
            Other(_) => "certificate verification failed",
        }
    }
}

/// One problem found while verifying a client certificate chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VerifyError {
    /// Position in the chain: 0 is the client's own certificate.
    pub depth: u32,
    pub kind: VerifyErrorKind,
}

impl VerifyError {
    /// The certificate (or one of its issuers) is past its not-after date.
    pub fn is_expired(&self) -> bool {
        self.kind == VerifyErrorKind::Expired
    }

    /// The certificate (or one of its issuers) is before its not-before date.
    pub fn is_not_yet_valid(&self) -> bool {
        self.kind == VerifyErrorKind::NotYetValid
    }

    pub fn is_revoked(&self) -> bool {
        self.kind == VerifyErrorKind::Revoked
    }

    /// The text for logs.
    pub fn description(&self) -> &'static str {
        self.kind.description()
    }
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {}, depth {})", self.description(), self.kind.code(), self.depth)
    }
}

/// How a CRL entry names a certificate: its issuer's name (DER) and its serial (magnitude bytes).
pub type RevocationId = (Box<[u8]>, Box<[u8]>);

/// Facts of a client certificate, in the forms policy compares against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// SHA-1 over the DER: APIM's thumbprint.
    pub sha1: [u8; 20],
    pub sha256: [u8; 32],
    /// `sha1` as upper-case hex, as APIM writes it.
    pub thumbprint: String,
    pub thumbprint_sha256: String,
    /// Subject DN, most specific first: `CN=device1, O=Contoso, C=US`.
    pub subject: String,
    pub issuer: String,
    /// `subject` and `issuer` in the form distinguished names are compared in ([`normalize_dn`]).
    pub subject_normalized: String,
    pub issuer_normalized: String,
    /// The first CN of the subject.
    pub common_name: Option<String>,
    /// Serial number as upper-case hex without leading zeros (`0` for zero).
    pub serial: String,
    /// The serial's magnitude bytes, for revocation lookups.
    pub serial_bytes: Box<[u8]>,
    /// DER of the issuer name, for revocation lookups.
    pub issuer_der: Box<[u8]>,
    /// SHA-1 of the issuing CA certificate, when verification found it.
    pub issuer_sha1: Option<[u8; 20]>,
    /// (issuer name DER, serial) of each CA certificate the chain was verified through, issuer
    /// first: revocation of an intermediate is checked per request against today's CRLs too.
    pub ca_ids: Vec<RevocationId>,
    pub dns_names: Vec<String>,
    /// Validity, in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// Every problem verification found, in the order found; empty when the chain is valid.
    pub verify_errors: Vec<VerifyError>,
    /// The certificate itself (DER), for backends that read it (see [`ClientCert::pem`]).
    pub der: Box<[u8]>,
    /// URI subject alternative names (SPIFFE IDs and the like).
    pub uris: Vec<String>,
    /// The subject as RFC 2253 writes it (`CN=device1,O=Contoso,C=US`), as Envoy's
    /// `X-Forwarded-Client-Cert` carries it.
    pub subject_rfc2253: String,
}

/// What a certificate says (or verification found) that cannot be derived from the rest: the
/// input of [`ClientCert::new`].
#[derive(Debug)]
pub struct CertFields {
    pub sha1: [u8; 20],
    pub sha256: [u8; 32],
    pub subject: String,
    pub issuer: String,
    pub common_name: Option<String>,
    pub serial_bytes: Box<[u8]>,
    pub issuer_der: Box<[u8]>,
    pub issuer_sha1: Option<[u8; 20]>,
    pub ca_ids: Vec<RevocationId>,
    pub dns_names: Vec<String>,
    pub not_before: i64,
    pub not_after: i64,
    pub verify_errors: Vec<VerifyError>,
    pub der: Box<[u8]>,
    pub uris: Vec<String>,
    pub subject_rfc2253: String,
}

impl ClientCert {
    /// The facts of a certificate, with the derived forms (hex, normalised names) computed once.
    pub fn new(f: CertFields) -> ClientCert {
        ClientCert {
            thumbprint: hex_upper(&f.sha1),
            thumbprint_sha256: hex_upper(&f.sha256),
            sha1: f.sha1,
            sha256: f.sha256,
            subject_normalized: normalize_dn(&f.subject),
            issuer_normalized: normalize_dn(&f.issuer),
            subject: f.subject,
            issuer: f.issuer,
            common_name: f.common_name,
            serial: serial_hex(&f.serial_bytes),
            serial_bytes: f.serial_bytes,
            issuer_der: f.issuer_der,
            issuer_sha1: f.issuer_sha1,
            ca_ids: f.ca_ids,
            dns_names: f.dns_names,
            not_before: f.not_before,
            not_after: f.not_after,
            verify_errors: f.verify_errors,
            der: f.der,
            uris: f.uris,
            subject_rfc2253: f.subject_rfc2253,
        }
    }

    /// Serialises the facts that cannot be derived from others (for session tickets, which
    /// carry them so that a resumed session knows its certificate without keeping it).
    pub fn encode(&self, out: &mut Vec<u8>) {
        fn bytes(out: &mut Vec<u8>, b: &[u8]) {
            out.extend_from_slice(&(b.len().min(u16::MAX as usize) as u16).to_be_bytes());
            out.extend_from_slice(&b[..b.len().min(u16::MAX as usize)]);
        }
        out.push(3); // format version
        out.extend_from_slice(&self.sha1);
        out.extend_from_slice(&self.sha256);
        bytes(out, self.subject.as_bytes());
        bytes(out, self.issuer.as_bytes());
        match &self.common_name {
            Some(cn) => {
                out.push(1);
                bytes(out, cn.as_bytes());
            }
            None => out.push(0),
        }
        bytes(out, &self.serial_bytes);
        bytes(out, &self.issuer_der);
        match &self.issuer_sha1 {
            Some(s) => {
                out.push(1);
                out.extend_from_slice(s);
            }
            None => out.push(0),
        }
        out.push(self.ca_ids.len().min(u8::MAX as usize) as u8);
        for (issuer, serial) in self.ca_ids.iter().take(u8::MAX as usize) {
            bytes(out, issuer);
            bytes(out, serial);
        }
        out.extend_from_slice(&(self.dns_names.len().min(u16::MAX as usize) as u16).to_be_bytes());
        for name in self.dns_names.iter().take(u16::MAX as usize) {
            bytes(out, name.as_bytes());
        }
        out.extend_from_slice(&self.not_before.to_be_bytes());
        out.extend_from_slice(&self.not_after.to_be_bytes());
        out.extend_from_slice(&(self.verify_errors.len().min(u16::MAX as usize) as u16).to_be_bytes());
        for e in self.verify_errors.iter().take(u16::MAX as usize) {
            out.extend_from_slice(&e.depth.to_be_bytes());
            out.extend_from_slice(&e.kind.code().to_be_bytes());
        }
        // Version 3: the certificate, its URIs and the RFC 2253 subject (for forwarding).
        bytes(out, &self.der);
        out.extend_from_slice(&(self.uris.len().min(u16::MAX as usize) as u16).to_be_bytes());
        for uri in self.uris.iter().take(u16::MAX as usize) {
            bytes(out, uri.as_bytes());
        }
        bytes(out, self.subject_rfc2253.as_bytes());
    }

    /// The inverse of [`encode`](Self::encode); `None` for anything malformed.
    pub fn decode(input: &[u8]) -> Option<ClientCert> {
        struct R<'a>(&'a [u8]);
        impl<'a> R<'a> {
            fn take(&mut self, n: usize) -> Option<&'a [u8]> {
                if self.0.len() < n {
                    return None;
                }
                let (a, b) = self.0.split_at(n);
                self.0 = b;
                Some(a)
            }
            fn u8(&mut self) -> Option<u8> {
                Some(self.take(1)?[0])
            }
            fn u16(&mut self) -> Option<usize> {
                Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?) as usize)
            }
            fn bytes(&mut self) -> Option<&'a [u8]> {
                let n = self.u16()?;
                self.take(n)
            }
            fn string(&mut self) -> Option<String> {
                String::from_utf8(self.bytes()?.to_vec()).ok()
            }
            fn i64(&mut self) -> Option<i64> {
                Some(i64::from_be_bytes(self.take(8)?.try_into().ok()?))
            }
        }
        let mut r = R(input);
        let version = r.u8()?;
        if version != 2 && version != 3 {
            return None;
        }
        let sha1: [u8; 20] = r.take(20)?.try_into().ok()?;
        let sha256: [u8; 32] = r.take(32)?.try_into().ok()?;
        let subject = r.string()?;
        let issuer = r.string()?;
        let common_name = match r.u8()? {
            0 => None,
            _ => Some(r.string()?),
        };
        let serial_bytes: Box<[u8]> = r.bytes()?.into();
        let issuer_der: Box<[u8]> = r.bytes()?.into();
        let issuer_sha1 = match r.u8()? {
            0 => None,
            _ => Some(r.take(20)?.try_into().ok()?),
        };
        let n = r.u8()?;
        let mut ca_ids = Vec::with_capacity(n as usize);
        for _ in 0..n {
            ca_ids.push((r.bytes()?.into(), r.bytes()?.into()));
        }
        let n = r.u16()?;
        let mut dns_names = Vec::with_capacity(n);
        for _ in 0..n {
            dns_names.push(r.string()?);
        }
        let not_before = r.i64()?;
        let not_after = r.i64()?;
        let n = r.u16()?;
        let mut verify_errors = Vec::with_capacity(n);
        for _ in 0..n {
            let depth = u32::from_be_bytes(r.take(4)?.try_into().ok()?);
            let code = i32::from_be_bytes(r.take(4)?.try_into().ok()?);
            verify_errors.push(VerifyError { depth, kind: VerifyErrorKind::from_code(code) });
        }
        // A version 2 ticket (from before an upgrade) has no certificate to forward.
        let (mut der, mut uris, mut subject_rfc2253): (Box<[u8]>, Vec<String>, String) = Default::default();
        if version == 3 {
            der = r.bytes()?.into();
            let n = r.u16()?;
            uris = Vec::with_capacity(n);
            for _ in 0..n {
                uris.push(r.string()?);
            }
            subject_rfc2253 = r.string()?;
        }
        if !r.0.is_empty() {
            return None;
        }
        Some(ClientCert::new(CertFields {
            sha1,
            sha256,
            subject,
            issuer,
            common_name,
            serial_bytes,
            issuer_der,
            issuer_sha1,
            ca_ids,
            dns_names,
            not_before,
            not_after,
            verify_errors,
            der,
            uris,
            subject_rfc2253,
        }))
    }

    /// The certificate in PEM (64-character lines, a final newline); empty when it is not known
    /// (a session resumed from a ticket older than the certificate's forwarding).
    pub fn pem(&self) -> String {
        if self.der.is_empty() {
            return String::new();
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.der);
        let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
        out
    }

    /// [`pem`](Self::pem), percent-encoded as a URI component (what nginx's
    /// `$ssl_client_escaped_cert` holds).
    pub fn pem_urlencoded(&self) -> String {
        percent_encoded(self.pem().as_bytes())
    }

    /// The DER in standard base64 on one line (the `X-ARR-ClientCert` header ASP.NET reads).
    pub fn der_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.der)
    }

    /// An `X-Forwarded-Client-Cert` element as Envoy writes it:
    /// `Hash=<SHA-256, hex>;Subject="<RFC 2253>";URI=<each URI SAN>;DNS=<each DNS SAN>`.
    pub fn xfcc(&self) -> String {
        let mut out = String::with_capacity(128);
        out.push_str("Hash=");
        for b in self.sha256 {
            let _ = write!(out, "{b:02x}");
        }
        out.push_str(";Subject=");
        xfcc_value(&mut out, &self.subject_rfc2253, true);
        for uri in &self.uris {
            out.push_str(";URI=");
            xfcc_value(&mut out, uri, false);
        }
        for dns in &self.dns_names {
            out.push_str(";DNS=");
            xfcc_value(&mut out, dns, false);
        }
        out
    }

    /// Whether verification found nothing wrong.
    pub fn is_valid(&self) -> bool {
        self.verify_errors.is_empty()
    }

    /// The verify errors as one line for logs and headers: `certificate has expired (depth 0); …`.
    pub fn verify_summary(&self) -> String {
        let mut s = String::new();
        let _ = self.write_verify_summary(&mut s);
        s
    }

    /// [`verify_summary`](Self::verify_summary) written into `out` (no allocation of its own).
    pub fn write_verify_summary(&self, out: &mut impl fmt::Write) -> fmt::Result {
        for (i, e) in self.verify_errors.iter().enumerate() {
            if i > 0 {
                out.write_str("; ")?;
            }
            write!(out, "{} (depth {})", e.description(), e.depth)?;
        }
        Ok(())
    }
}

/// Upper-case hex, as APIM shows thumbprints.
pub fn hex_upper(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// A serial number's magnitude bytes as upper-case hex without leading zeros (`0` for none).
pub fn serial_hex(bytes: &[u8]) -> String {
    let hex = hex_upper(bytes);
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() { "0".to_owned() } else { trimmed.to_owned() }
}

/// Now, in seconds since the epoch.
pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A distinguished name in comparable form: attributes split on unquoted `,` (or `;`), each
/// trimmed, the attribute type upper-cased and its usual synonyms folded (`ST` → `S`,
/// `EMAILADDRESS` → `E`, `2.5.4.3` → `CN`…), the value lower-cased, joined with `,`.
/// `CN=Device 1,  o=Contoso` and `CN=device 1, O=contoso` compare equal; order still matters.
pub fn normalize_dn(dn: &str) -> String {
    let mut out = String::with_capacity(dn.len());
    let mut attributes = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = dn.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                current.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            '\\' if !quoted => {
                if let Some(n) = chars.next() {
                    current.push(n);
                }
            }
            ',' | ';' if !quoted => attributes.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    attributes.push(current);
    for (i, attribute) in attributes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let (kind, value) = attribute.split_once('=').unwrap_or(("", attribute));
        let kind = kind.trim().to_ascii_uppercase();
        let kind = kind.strip_prefix("OID.").unwrap_or(&kind);
        let kind = match kind {
            "ST" | "2.5.4.8" => "S",
            "EMAILADDRESS" | "EMAIL" | "1.2.840.113549.1.9.1" => "E",
            "2.5.4.3" => "CN",
            "2.5.4.10" => "O",
            "2.5.4.11" => "OU",
            "2.5.4.6" => "C",
            "2.5.4.7" => "L",
            "GN" | "GIVENNAME" => "G",
            "SURNAME" => "SN",
            k => k,
        };
        out.push_str(kind);
        out.push('=');
        out.push_str(&value.trim().to_lowercase());
    }
    out
}

/// Appends a DN attribute value, quoted (RFC 4514 style, `"` doubled) when it holds a character
/// that would make the string ambiguous.
pub fn push_dn_value(s: &mut String, value: &str) {
    let needs_quotes = value.is_empty()
        || value.starts_with(' ')
        || value.ends_with(' ')
        || value.contains([',', '+', '=', '"', '\n', '\r', '<', '>', '#', ';']);
    if !needs_quotes {
        s.push_str(value);
        return;
    }
    s.push('"');
    for c in value.chars() {
        if c == '"' {
            s.push('"');
        }
        s.push(c);
    }
    s.push('"');
}

/// Revoked serial numbers (magnitude bytes) of one issuer.
type Serials = AHashSet<Box<[u8]>>;

/// Revoked certificates, as (issuer name DER, serial) pairs compiled from CRLs.
///
/// The handshake checks the client chain against it, and the server checks it again on every
/// request, so that a CRL loaded by a reload applies to connections that were already open.
#[derive(Debug, Default)]
pub struct RevocationSet {
    /// Per issuer (name DER), its revoked serials. A handful of issuers at most: comparing their
    /// names beats hashing a 70-byte DER on every lookup.
    by_issuer: Vec<(Box<[u8]>, Serials)>,
    /// Per issuer, the highest CRL number loaded (RFC 5280 §5.2.3), to refuse going back.
    numbers: Vec<CrlNumber>,
    crls: usize,
    entries: usize,
}

/// The CRL number of an issuer's CRL: its name (DER, and as text for messages), the number
/// (big-endian magnitude, without leading zeros) and the file it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlNumber {
    pub issuer_der: Box<[u8]>,
    pub issuer: String,
    pub number: Box<[u8]>,
    pub source: String,
}

/// Compares two big-endian magnitudes.
fn cmp_magnitude(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let strip = |x: &[u8]| {
        let start = x.iter().position(|&b| b != 0).unwrap_or(x.len());
        x[start..].to_vec()
    };
    let (a, b) = (strip(a), strip(b));
    a.len().cmp(&b.len()).then_with(|| a.cmp(&b))
}

/// A magnitude as decimal text, for messages (numbers past 128 bits show as hex).
pub fn magnitude_text(m: &[u8]) -> String {
    let start = m.iter().position(|&b| b != 0).unwrap_or(m.len());
    let m = &m[start..];
    if m.len() > 16 {
        return format!("0x{}", hex_upper(m));
    }
    let mut v: u128 = 0;
    for &b in m {
        v = (v << 8) | u128::from(b);
    }
    v.to_string()
}

impl RevocationSet {
    /// Whether the certificate with this issuer (name DER) and serial (magnitude bytes) is revoked.
    pub fn is_revoked(&self, issuer_der: &[u8], serial: &[u8]) -> bool {
        self.by_issuer.iter().any(|(issuer, serials)| &issuer[..] == issuer_der && serials.contains(serial))
    }

    /// Whether the client certificate, or a CA certificate its chain was verified through, is
    /// revoked. Checked with the facts kept for the connection, so it holds for open and resumed
    /// connections after a reload brings new CRLs.
    pub fn revokes(&self, cert: &ClientCert) -> bool {
        !self.by_issuer.is_empty()
            && (self.is_revoked(&cert.issuer_der, &cert.serial_bytes)
                || cert.ca_ids.iter().any(|(issuer, serial)| self.is_revoked(issuer, serial)))
    }

    /// Adds one CRL's entries: the serials `issuer_der` revokes.
    pub fn insert_crl(&mut self, issuer_der: &[u8], serials: impl IntoIterator<Item = Box<[u8]>>) {
        let mine = Self::serials_of(&mut self.by_issuer, issuer_der);
        for serial in serials {
            if mine.insert(serial) {
                self.entries += 1;
            }
        }
        self.crls += 1;
    }

    /// Notes the CRL number of a CRL of `issuer_der`, read from `source` (kept: the highest
    /// seen, with its file).
    pub fn note_crl_number(&mut self, issuer_der: &[u8], issuer: &str, number: &[u8], source: &str) {
        match self.numbers.iter_mut().find(|n| &n.issuer_der[..] == issuer_der) {
            Some(n) if cmp_magnitude(number, &n.number).is_gt() => {
                n.number = number.into();
                source.clone_into(&mut n.source);
            }
            Some(_) => {}
            None => self.numbers.push(CrlNumber {
                issuer_der: issuer_der.into(),
                issuer: issuer.to_owned(),
                number: number.into(),
                source: source.to_owned(),
            }),
        }
    }

    /// The CRLs of this set that are older (a lower CRL number) than what `previous` had for the
    /// same issuer: loading them would un-revoke certificates. Each as (new, previous).
    pub fn older_than<'a>(&'a self, previous: &'a RevocationSet) -> Vec<(&'a CrlNumber, &'a CrlNumber)> {
        self.numbers
            .iter()
            .filter_map(|n| {
                let old = previous.numbers.iter().find(|o| o.issuer_der == n.issuer_der)?;
                cmp_magnitude(&n.number, &old.number).is_lt().then_some((n, old))
            })
            .collect()
    }

    /// Adds every entry of `other` (CRLs of other listeners, say): entries are keyed by issuer,
    /// so sets from different CAs never collide.
    pub fn merge(&mut self, other: &RevocationSet) {
        for (issuer, serials) in &other.by_issuer {
            let mine = Self::serials_of(&mut self.by_issuer, issuer);
            for serial in serials {
                if mine.insert(serial.clone()) {
                    self.entries += 1;
                }
            }
        }
        self.crls += other.crls;
        for n in &other.numbers {
            self.note_crl_number(&n.issuer_der, &n.issuer, &n.number, &n.source);
        }
    }

    fn serials_of<'a>(by_issuer: &'a mut Vec<(Box<[u8]>, Serials)>, issuer: &[u8]) -> &'a mut Serials {
        let i = match by_issuer.iter().position(|(i, _)| &i[..] == issuer) {
            Some(i) => i,
            None => {
                by_issuer.push((issuer.into(), AHashSet::new()));
                by_issuer.len() - 1
            }
        };
        &mut by_issuer[i].1
    }

    /// Number of CRLs loaded.
    pub fn crl_count(&self) -> usize {
        self.crls
    }

    /// Number of revoked serials across all CRLs.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
}

/// Every byte outside RFC 3986's unreserved set as `%XX`.
fn percent_encoded(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3 / 2);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A value of an `X-Forwarded-Client-Cert` pair: in double quotes (with `"` and `\` escaped)
/// when `quoted` or when it holds a character that separates pairs or elements.
fn xfcc_value(out: &mut String, value: &str, quoted: bool) {
    if !quoted && !value.contains([',', ';', '=', '"', '\\']) {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_serials() {
        assert_eq!(hex_upper(&[0x0a, 0xff, 0x00]), "0AFF00");
        assert_eq!(serial_hex(&[0x00, 0x0a, 0xbc]), "ABC");
        assert_eq!(serial_hex(&[]), "0");
    }

    #[test]
    fn facts_survive_encoding() {
        let c = ClientCert {
            sha1: [1; 20],
            sha256: [2; 32],
            thumbprint: hex_upper(&[1; 20]),
            thumbprint_sha256: hex_upper(&[2; 32]),
            subject: "CN=dévice, O=\"A, B\"".to_owned(),
            issuer: "CN=CA".to_owned(),
            subject_normalized: normalize_dn("CN=dévice, O=\"A, B\""),
            issuer_normalized: normalize_dn("CN=CA"),
            common_name: Some("dévice".to_owned()),
            serial: "ABC".to_owned(),
            serial_bytes: vec![0x0a, 0xbc].into(),
            issuer_der: vec![0x30, 0x00].into(),
            issuer_sha1: Some([3; 20]),
            ca_ids: vec![(vec![0x30, 0x01].into(), vec![0x07].into())],
            dns_names: vec!["a.example".to_owned(), "b.example".to_owned()],
            not_before: -5,
            not_after: 1_900_000_000,
            verify_errors: vec![
                VerifyError { depth: 0, kind: VerifyErrorKind::Expired },
                VerifyError { depth: 1, kind: VerifyErrorKind::Revoked },
                VerifyError { depth: 2, kind: VerifyErrorKind::Other(99) },
            ],
            der: vec![0x30, 0x82, 0x01, 0x0a].into(),
            uris: vec!["spiffe://example.org/device/1".to_owned()],
            subject_rfc2253: "CN=dévice,O=A\\, B".to_owned(),
        };
        let mut out = Vec::new();
        c.encode(&mut out);
        assert_eq!(ClientCert::decode(&out).as_ref(), Some(&c));
        // A version 2 ticket (written before the certificate was kept) still reads, without it.
        let mut v2 = out.clone();
        v2[0] = 2;
        let tail = 2 + c.der.len() + 2 + (2 + c.uris[0].len()) + 2 + c.subject_rfc2253.len();
        v2.truncate(v2.len() - tail);
        let old = ClientCert::decode(&v2).expect("version 2");
        assert!(old.der.is_empty() && old.uris.is_empty() && old.thumbprint == c.thumbprint);
        for cut in 0..out.len() {
            assert_eq!(ClientCert::decode(&out[..cut]), None, "truncated at {cut}");
        }
        out.push(0);
        assert_eq!(ClientCert::decode(&out), None, "trailing bytes");
    }

    #[test]
    fn forwarding_forms() {
        let mut c = ClientCert::new(CertFields {
            sha1: [1; 20],
            sha256: [0xab; 32],
            subject: "CN=d".to_owned(),
            issuer: "CN=CA".to_owned(),
            common_name: None,
            serial_bytes: vec![1].into(),
            issuer_der: vec![].into(),
            issuer_sha1: None,
            ca_ids: vec![],
            dns_names: vec!["a.example".to_owned(), "odd;name".to_owned()],
            not_before: 0,
            not_after: 0,
            verify_errors: vec![],
            der: (0..=255u8).collect::<Vec<u8>>().into(),
            uris: vec!["spiffe://example.org/ns/a".to_owned()],
            subject_rfc2253: "CN=dev \"1\",O=A\\, B".to_owned(),
        });
        let pem = c.pem();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\nAAECAwQF"), "{pem}");
        assert!(pem.ends_with("\n-----END CERTIFICATE-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(pem.lines().count(), 2 + 256_usize.div_ceil(3) * 4 / 64 + 1);
        let encoded = c.pem_urlencoded();
        assert!(encoded.starts_with("-----BEGIN%20CERTIFICATE-----%0AAAECAwQF"), "{encoded}");
        assert!(!encoded.contains(['+', '/', '=', '\n', ' ']), "{encoded}");
        assert!(c.der_base64().starts_with("AAECAwQFBgcICQ") && c.der_base64().ends_with("/w=="));
        assert_eq!(
            c.xfcc(),
            format!(
                "Hash={};Subject=\"CN=dev \\\"1\\\",O=A\\\\, B\";URI=spiffe://example.org/ns/a;DNS=a.example;DNS=\"odd;name\"",
                "ab".repeat(32)
            )
        );
        c.der = Box::default();
        assert_eq!((c.pem(), c.der_base64()), (String::new(), String::new()));
    }

    #[test]
    fn dns_normalize() {
        assert_eq!(normalize_dn("CN=Device 1,  o=Contoso, ST=Wa"), "CN=device 1,O=contoso,S=wa");
        assert_eq!(normalize_dn("CN=device 1, O=contoso, S=wa"), normalize_dn("cn=DEVICE 1,O=Contoso,st=WA"));
        assert_eq!(normalize_dn("CN=\"Contoso, Ltd\", C=US"), "CN=contoso, ltd,C=us");
        assert_ne!(normalize_dn("CN=a, O=b"), normalize_dn("O=b, CN=a"));
    }

    #[test]
    fn dn_values_are_quoted_when_ambiguous() {
        let mut s = String::new();
        push_dn_value(&mut s, "Contoso, Ltd");
        assert_eq!(s, "\"Contoso, Ltd\"");
        let mut s = String::new();
        push_dn_value(&mut s, "say \"hi\"");
        assert_eq!(s, "\"say \"\"hi\"\"\"");
        let mut s = String::new();
        push_dn_value(&mut s, "plain");
        assert_eq!(s, "plain");
    }

    #[test]
    fn verify_error_kinds_keep_their_codes() {
        for code in -1..100 {
            assert_eq!(VerifyErrorKind::from_code(code).code(), code, "{code}");
        }
    }

    #[test]
    fn revocation_sets_merge_by_issuer() {
        let mut a = RevocationSet::default();
        a.insert_crl(b"issuer-a", [b"\x01".to_vec().into_boxed_slice()]);
        let mut b = RevocationSet::default();
        b.insert_crl(b"issuer-b", [b"\x01".to_vec().into_boxed_slice(), b"\x02".to_vec().into_boxed_slice()]);
        a.merge(&b);
        assert!(a.is_revoked(b"issuer-a", b"\x01"));
        assert!(a.is_revoked(b"issuer-b", b"\x02"));
        assert!(!a.is_revoked(b"issuer-a", b"\x02"));
        assert_eq!((a.len(), a.crl_count()), (3, 2));
    }

    #[test]
    fn an_older_crl_number_is_found() {
        let mut old = RevocationSet::default();
        old.note_crl_number(b"ca", "CN=CA", &[0x01, 0x00], "old.crl");
        let mut new = RevocationSet::default();
        new.note_crl_number(b"ca", "CN=CA", &[0x00, 0xff], "new.crl");
        let older = new.older_than(&old);
        assert_eq!(older.len(), 1);
        let (n, o) = older[0];
        assert_eq!(
            (n.issuer.as_str(), &n.number[..], n.source.as_str()),
            ("CN=CA", &[0x00, 0xff][..], "new.crl")
        );
        assert_eq!((&o.number[..], o.source.as_str()), (&[0x01, 0x00][..], "old.crl"));
        assert!(old.older_than(&new).is_empty());
        new.note_crl_number(b"ca", "CN=CA", &[0x01, 0x00], "newer.crl");
        assert!(new.older_than(&old).is_empty(), "the same number is no step back");
        assert_eq!(magnitude_text(&[0x01, 0x00]), "256");
    }
}
