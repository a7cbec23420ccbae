//! Client certificate facts from BoringSSL's view of a certificate: what `portcullis-facts`
//! holds, filled in here (digests, names, serials, validity).

use boring::asn1::Asn1TimeRef;
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::x509::{X509NameRef, X509Ref};
use boring_sys as ffi;
use foreign_types::ForeignTypeRef;
use portcullis_facts::{CertFields, ClientCert, RevocationId, VerifyError, push_dn_value};

/// Computes the facts of `leaf`. `cas` are the CA certificates verification built the chain
/// through, the issuer of `leaf` first (empty when no chain was found).
pub fn client_cert_from_x509(
    leaf: &X509Ref,
    cas: &[&X509Ref],
    verify_errors: Vec<VerifyError>,
) -> ClientCert {
    let serial_bytes: Box<[u8]> =
        leaf.serial_number().to_bn().map(|bn| bn.to_vec().into_boxed_slice()).unwrap_or_default();
    let common_name = leaf
        .subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().as_utf8().ok())
        .map(|s| s.to_string());
    let sans = leaf.subject_alt_names();
    let dns_names = sans
        .as_ref()
        .map(|names| names.iter().filter_map(|n| n.dnsname().map(str::to_owned)).collect())
        .unwrap_or_default();
    let uris = sans
        .as_ref()
        .map(|names| names.iter().filter_map(|n| n.uri().map(str::to_owned)).collect())
        .unwrap_or_default();
    ClientCert::new(CertFields {
        sha1: digest(leaf, MessageDigest::sha1()),
        sha256: digest(leaf, MessageDigest::sha256()),
        subject: dn_string(leaf.subject_name()),
        issuer: dn_string(leaf.issuer_name()),
        common_name,
        serial_bytes,
        issuer_der: leaf.issuer_name().to_der().map(Vec::into_boxed_slice).unwrap_or_default(),
        issuer_sha1: cas.first().map(|i| digest(i, MessageDigest::sha1())),
        ca_ids: cas.iter().filter_map(|ca| revocation_id(ca)).collect(),
        dns_names,
        not_before: unix_time(leaf.not_before()),
        not_after: unix_time(leaf.not_after()),
        verify_errors,
        der: leaf.to_der().map(Vec::into_boxed_slice).unwrap_or_default(),
        uris,
        subject_rfc2253: leaf.subject_name().print_ex(ffi::XN_FLAG_RFC2253).unwrap_or_default(),
    })
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

/// Seconds since the epoch of an ASN.1 time (0 if it cannot be converted).
/// When a certificate expires, in Unix seconds.
pub fn not_after_unix(cert: &boring::x509::X509Ref) -> i64 {
    unix_time(cert.not_after())
}

pub(crate) fn unix_time(t: &Asn1TimeRef) -> i64 {
    let mut out: i64 = 0;
    // SAFETY: `t` is a valid ASN1_TIME for the duration of the call and `out` a valid i64.
    let ok = unsafe { ffi::ASN1_TIME_to_posix(t.as_ptr(), &mut out) };
    if ok == 1 { out } else { 0 }
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

#[cfg(test)]
mod tests {
    use portcullis_facts::VerifyErrorKind;

    #[test]
    fn verify_error_codes_are_boringssl_s() {
        use boring_sys as ffi;
        for (code, kind) in [
            (ffi::X509_V_ERR_CERT_HAS_EXPIRED, VerifyErrorKind::Expired),
            (ffi::X509_V_ERR_CERT_NOT_YET_VALID, VerifyErrorKind::NotYetValid),
            (ffi::X509_V_ERR_CERT_REVOKED, VerifyErrorKind::Revoked),
            (ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY, VerifyErrorKind::UnknownIssuer),
            (ffi::X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN, VerifyErrorKind::UntrustedSelfSigned),
            (ffi::X509_V_ERR_CERT_CHAIN_TOO_LONG, VerifyErrorKind::ChainTooLong),
            (ffi::X509_V_ERR_CERT_SIGNATURE_FAILURE, VerifyErrorKind::BadSignature),
            (ffi::X509_V_ERR_INVALID_CA, VerifyErrorKind::InvalidCa),
            (ffi::X509_V_ERR_INVALID_PURPOSE, VerifyErrorKind::InvalidPurpose),
            (ffi::X509_V_ERR_ERROR_IN_CERT_NOT_BEFORE_FIELD, VerifyErrorKind::BadValidity),
        ] {
            assert_eq!(VerifyErrorKind::from_code(code), kind, "{code}");
        }
    }
}
