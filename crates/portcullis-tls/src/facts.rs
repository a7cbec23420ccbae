//! What the proxy knows about a client certificate: computed once, when the handshake verifies
//! it, and shared by every request on the connection (and on resumed connections).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use boring::asn1::Asn1TimeRef;
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::x509::{X509NameRef, X509Ref};
use boring_sys as ffi;
use foreign_types::ForeignTypeRef;

/// One problem found while verifying a client certificate chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VerifyError {
    /// Position in the chain: 0 is the client's own certificate.
    pub depth: u32,
    /// The `X509_V_ERR_*` code.
    pub code: i32,
}

impl VerifyError {
    pub const CERT_REVOKED: i32 = ffi::X509_V_ERR_CERT_REVOKED;

    /// The certificate (or one of its issuers) is past its not-after date.
    pub fn is_expired(&self) -> bool {
        self.code == ffi::X509_V_ERR_CERT_HAS_EXPIRED
    }

    /// The certificate (or one of its issuers) is before its not-before date.
    pub fn is_not_yet_valid(&self) -> bool {
        self.code == ffi::X509_V_ERR_CERT_NOT_YET_VALID
    }

    pub fn is_revoked(&self) -> bool {
        self.code == ffi::X509_V_ERR_CERT_REVOKED
    }

    /// OpenSSL's text for the code, for logs.
    pub fn description(&self) -> &'static str {
        // SAFETY: the code came from BoringSSL's own verifier or is one of its constants;
        // X509_verify_cert_error_string returns a static string for any value.
        let e = unsafe { boring::x509::X509VerifyError::from_raw(self.code) };
        match e {
            Ok(()) => "ok",
            Err(e) => e.error_string(),
        }
    }
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {}, depth {})", self.description(), self.code, self.depth)
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
}

impl ClientCert {
    /// Computes the facts of `leaf`. `cas` are the CA certificates verification built the chain
    /// through, the issuer of `leaf` first (empty when no chain was found).
    pub fn from_x509(leaf: &X509Ref, cas: &[&X509Ref], verify_errors: Vec<VerifyError>) -> ClientCert {
        let sha1: [u8; 20] = digest(leaf, MessageDigest::sha1());
        let sha256: [u8; 32] = digest(leaf, MessageDigest::sha256());
        let serial_bytes: Box<[u8]> =
            leaf.serial_number().to_bn().map(|bn| bn.to_vec().into_boxed_slice()).unwrap_or_default();
        let common_name = leaf
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .next()
            .and_then(|e| e.data().as_utf8().ok())
            .map(|s| s.to_string());
        let dns_names = leaf
            .subject_alt_names()
            .map(|names| names.iter().filter_map(|n| n.dnsname().map(str::to_owned)).collect())
            .unwrap_or_default();
        let subject = dn_string(leaf.subject_name());
        let issuer = dn_string(leaf.issuer_name());
        ClientCert {
            thumbprint: hex_upper(&sha1),
            thumbprint_sha256: hex_upper(&sha256),
            sha1,
            sha256,
            subject_normalized: normalize_dn(&subject),
            issuer_normalized: normalize_dn(&issuer),
            subject,
            issuer,
            common_name,
            serial: serial_hex(&serial_bytes),
            serial_bytes,
            issuer_der: leaf.issuer_name().to_der().map(Vec::into_boxed_slice).unwrap_or_default(),
            issuer_sha1: cas.first().map(|i| digest(i, MessageDigest::sha1())),
            ca_ids: cas.iter().filter_map(|ca| revocation_id(ca)).collect(),
            dns_names,
            not_before: unix_time(leaf.not_before()),
            not_after: unix_time(leaf.not_after()),
            verify_errors,
        }
    }

    /// Serialises the facts that cannot be derived from others (for session tickets, which
    /// carry them so that a resumed session knows its certificate without keeping it).
    pub fn encode(&self, out: &mut Vec<u8>) {
        fn bytes(out: &mut Vec<u8>, b: &[u8]) {
            out.extend_from_slice(&(b.len().min(u16::MAX as usize) as u16).to_be_bytes());
            out.extend_from_slice(&b[..b.len().min(u16::MAX as usize)]);
        }
        out.push(2); // format version
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
            out.extend_from_slice(&e.code.to_be_bytes());
        }
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
        if r.u8()? != 2 {
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
            verify_errors.push(VerifyError { depth, code });
        }
        if !r.0.is_empty() {
            return None;
        }
        Some(ClientCert {
            thumbprint: hex_upper(&sha1),
            thumbprint_sha256: hex_upper(&sha256),
            sha1,
            sha256,
            subject_normalized: normalize_dn(&subject),
            issuer_normalized: normalize_dn(&issuer),
            subject,
            issuer,
            common_name,
            serial: serial_hex(&serial_bytes),
            serial_bytes,
            issuer_der,
            issuer_sha1,
            ca_ids,
            dns_names,
            not_before,
            not_after,
            verify_errors,
        })
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

/// The [`RevocationId`] of a certificate.
pub(crate) fn revocation_id(cert: &X509Ref) -> Option<RevocationId> {
    let issuer = cert.issuer_name().to_der().ok()?;
    let serial = cert.serial_number().to_bn().ok()?;
    Some((issuer.into_boxed_slice(), serial.to_vec().into_boxed_slice()))
}

fn digest<const N: usize>(cert: &X509Ref, md: MessageDigest) -> [u8; N] {
    let mut out = [0u8; N];
    if let Ok(d) = cert.digest(md) {
        let n = d.len().min(N);
        out[..n].copy_from_slice(&d[..n]);
    }
    out
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

fn serial_hex(bytes: &[u8]) -> String {
    let hex = hex_upper(bytes);
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() { "0".to_owned() } else { trimmed.to_owned() }
}

/// Seconds since the epoch of an ASN.1 time (0 if it cannot be converted).
pub(crate) fn unix_time(t: &Asn1TimeRef) -> i64 {
    let mut out: i64 = 0;
    // SAFETY: `t` is a valid ASN1_TIME for the duration of the call and `out` a valid i64.
    let ok = unsafe { ffi::ASN1_TIME_to_posix(t.as_ptr(), &mut out) };
    if ok == 1 { out } else { 0 }
}

/// Now, in seconds since the epoch.
pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The short attribute names APIM (.NET) uses in distinguished names.
fn attribute_name(nid: Nid) -> Option<&'static str> {
    Some(match nid {
        Nid::COMMONNAME => "CN",
        Nid::ORGANIZATIONNAME => "O",
        Nid::ORGANIZATIONALUNITNAME => "OU",
        Nid::COUNTRYNAME => "C",
        Nid::LOCALITYNAME => "L",
        Nid::STATEORPROVINCENAME => "S",
        Nid::STREETADDRESS => "STREET",
        Nid::PKCS9_EMAILADDRESS => "E",
        Nid::DOMAINCOMPONENT => "DC",
        Nid::SERIALNUMBER => "SERIALNUMBER",
        Nid::TITLE => "T",
        Nid::GIVENNAME => "G",
        Nid::SURNAME => "SN",
        Nid::INITIALS => "I",
        _ => return None,
    })
}

/// A distinguished name as APIM shows it: most specific attribute first, `, ` between
/// attributes, values quoted when they hold a character that would make the string ambiguous.
pub fn dn_string(name: &X509NameRef) -> String {
    let entries: Vec<_> = name.entries().collect();
    let mut s = String::new();
    for (i, entry) in entries.iter().rev().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let object = entry.object();
        match attribute_name(object.nid()) {
            Some(short) => s.push_str(short),
            None => match object.nid().short_name() {
                Ok(short) if object.nid() != Nid::UNDEF => s.push_str(short),
                _ => {
                    s.push_str("OID.");
                    s.push_str(&object.to_string());
                }
            },
        }
        s.push('=');
        let value = entry.data().as_utf8().map(|v| v.to_string()).unwrap_or_default();
        push_dn_value(&mut s, &value);
    }
    s
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

fn push_dn_value(s: &mut String, value: &str) {
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
            verify_errors: vec![VerifyError { depth: 0, code: 10 }, VerifyError { depth: 1, code: 23 }],
        };
        let mut out = Vec::new();
        c.encode(&mut out);
        assert_eq!(ClientCert::decode(&out), Some(c));
        for cut in 0..out.len() {
            assert_eq!(ClientCert::decode(&out[..cut]), None, "truncated at {cut}");
        }
        out.push(0);
        assert_eq!(ClientCert::decode(&out), None, "trailing bytes");
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
}
