//! Loading certificates, keys, CA bundles and CRLs from files, with errors located in the
//! configuration that named them.

use std::ffi::c_long;
use std::path::PathBuf;
use std::ptr;

use boring::bn::BigNum;
use boring::pkey::{PKey, Private};
use boring::x509::{X509, X509NameRef, X509Ref};
use boring_sys as ffi;
use foreign_types::{ForeignType, ForeignTypeRef};
use portcullis_config::{ConfigError, ConfigErrors, Located};

use portcullis_facts::{RevocationSet, now_unix};

use crate::facts::{dn_string, revocation_id, unix_time};

fn read(path: &Located<PathBuf>) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(&path.value)
        .map_err(|e| path.loc.error(format!("cannot read {}: {e}", path.value.display())))
}

/// Every certificate in a PEM (or single DER) file.
pub fn load_certificates(path: &Located<PathBuf>) -> Result<Vec<X509>, ConfigError> {
    let data = read(path)?;
    let certs = if data.windows(11).any(|w| w == b"-----BEGIN ") {
        X509::stack_from_pem(&data).map_err(|e| {
            path.loc.error(format!("{}: not a PEM certificate file: {e}", path.value.display()))
        })?
    } else {
        vec![
            X509::from_der(&data)
                .map_err(|e| path.loc.error(format!("{}: not a certificate: {e}", path.value.display())))?,
        ]
    };
    if certs.is_empty() {
        return Err(path.loc.error(format!("{}: no certificate in the file", path.value.display())));
    }
    Ok(certs)
}

/// A PEM private key.
pub fn load_private_key(path: &Located<PathBuf>) -> Result<PKey<Private>, ConfigError> {
    let data = read(path)?;
    PKey::private_key_from_pem(&data).or_else(|_| PKey::private_key_from_der(&data)).map_err(|e| {
        if is_rsa_pss_key(&data) {
            path.loc.error(format!(
                "{}: an RSA-PSS key (OID 1.2.840.113549.1.1.10), which BoringSSL cannot load; issue the certificate for an RSA (rsaEncryption) or ECDSA key instead — RSA-PSS signatures are still used with RSA keys in TLS 1.3",
                path.value.display()
            ))
        } else {
            path.loc.error(format!("{}: not a private key (PEM or DER): {e}", path.value.display()))
        }
    })
}

/// Whether a key file (PEM or DER) holds a key whose algorithm is RSASSA-PSS.
fn is_rsa_pss_key(data: &[u8]) -> bool {
    const RSA_PSS_OID: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
    let has_oid = |der: &[u8]| der.windows(RSA_PSS_OID.len()).take(64).any(|w| w == RSA_PSS_OID);
    if has_oid(data) {
        return true;
    }
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    boring::base64::decode_block(&body).is_ok_and(|der| has_oid(&der))
}

/// All the CA certificates of a `client_ca` list, each checked to be within its validity.
pub fn load_ca_bundle(paths: &[Located<PathBuf>]) -> Result<Vec<X509>, ConfigErrors> {
    let mut errors = ConfigErrors::default();
    let mut cas = Vec::new();
    let now = now_unix();
    for path in paths {
        match load_certificates(path) {
            Ok(certs) => {
                for cert in certs {
                    // SAFETY: `cert` is a live X509; X509_check_ca only reads its extensions.
                    let is_ca = unsafe { ffi::X509_check_ca(cert.as_ptr()) } != 0;
                    if !is_ca {
                        errors.push(path.loc.error(format!(
                            "{}: \"{}\" is not a CA certificate (no basicConstraints CA:TRUE); client_ca takes the CAs that issue client certificates, not a client's own certificate",
                            path.value.display(),
                            dn_string(cert.subject_name())
                        )));
                        continue;
                    }
                    if unix_time(cert.not_after()) < now {
                        tracing::warn!(
                            file = %path.value.display(),
                            subject = %dn_string(cert.subject_name()),
                            "CA certificate has expired; certificates it issued will not verify"
                        );
                    }
                    cas.push(cert);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    errors.into_result(cas)
}

/// Whether `cert` itself is listed in `set` (the chain check at the handshake).
pub fn is_cert_revoked(set: &RevocationSet, cert: &X509Ref) -> bool {
    !set.is_empty() && revocation_id(cert).is_some_and(|(issuer, serial)| set.is_revoked(&issuer, &serial))
}

/// Loads CRLs (PEM, several per file allowed, or DER) into a [`RevocationSet`]. Each must be
/// issued by one of `cas` and carry a valid signature from it; a CRL past its nextUpdate is
/// loaded with a warning.
pub fn load_revocations(paths: &[Located<PathBuf>], cas: &[X509]) -> Result<RevocationSet, ConfigErrors> {
    let mut set = RevocationSet::default();
    let mut errors = ConfigErrors::default();
    for path in paths {
        let data = match read(path) {
            Ok(d) => d,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let crls = match parse_crls(&data) {
            Ok(c) if !c.is_empty() => c,
            Ok(_) => {
                errors.push(path.loc.error(format!("{}: no CRL in the file", path.value.display())));
                continue;
            }
            Err(msg) => {
                errors.push(path.loc.error(format!("{}: {msg}", path.value.display())));
                continue;
            }
        };
        let source = path.value.display().to_string();
        for crl in crls {
            if let Err(msg) = add_crl(&mut set, &crl, cas, &source) {
                errors.push(path.loc.error(format!("{}: {msg}", path.value.display())));
            }
        }
    }
    errors.into_result(set)
}

fn add_crl(set: &mut RevocationSet, crl: &Crl, cas: &[X509], source: &str) -> Result<(), String> {
    let issuer = crl.issuer();
    let ca = cas.iter().find(|ca| ca.subject_name().try_cmp(issuer).is_ok_and(|o| o.is_eq())).ok_or_else(
        || format!("CRL issuer \"{}\" is not one of the client_ca certificates", dn_string(issuer)),
    )?;
    let key = ca.public_key().map_err(|e| format!("issuer key unusable: {e}"))?;
    // SAFETY: both pointers are valid for the call; X509_CRL_verify only reads them.
    if unsafe { ffi::X509_CRL_verify(crl.0, key.as_ptr()) } != 1 {
        return Err(format!("CRL signature does not verify against \"{}\"", dn_string(ca.subject_name())));
    }
    if let Some(next) = crl.next_update()
        && next < now_unix()
    {
        tracing::warn!(issuer = %dn_string(issuer), "CRL is past its nextUpdate; loading it anyway, publish a fresh one");
    }
    let issuer_der = ca.subject_name().to_der().map_err(|e| e.to_string())?.into_boxed_slice();
    set.insert_crl(&issuer_der, crl.revoked_serials());
    if let Some(number) = crl.number() {
        set.note_crl_number(&issuer_der, &dn_string(issuer), &number, source);
    }
    Ok(())
}

/// An owned `X509_CRL` (boring has no safe CRL type).
struct Crl(*mut ffi::X509_CRL);

impl Drop for Crl {
    fn drop(&mut self) {
        // SAFETY: we own the pointer, which came from PEM_read_bio_X509_CRL or d2i_X509_CRL.
        unsafe { ffi::X509_CRL_free(self.0) }
    }
}

impl Crl {
    fn issuer(&self) -> &X509NameRef {
        // SAFETY: the issuer name lives as long as the CRL, which `self` keeps alive.
        unsafe { X509NameRef::from_ptr(ffi::X509_CRL_get_issuer(self.0)) }
    }

    /// The CRL number extension (RFC 5280 §5.2.3), as big-endian magnitude bytes.
    fn number(&self) -> Option<Vec<u8>> {
        // SAFETY: X509_CRL_get_ext_d2i returns a new ASN1_INTEGER (or null) that we own and free;
        // ASN1_INTEGER_to_BN with a null BIGNUM returns a new one, which BigNum takes over.
        unsafe {
            let n = ffi::X509_CRL_get_ext_d2i(self.0, ffi::NID_crl_number, ptr::null_mut(), ptr::null_mut())
                as *mut ffi::ASN1_INTEGER;
            if n.is_null() {
                return None;
            }
            let bn = ffi::ASN1_INTEGER_to_BN(n, ptr::null_mut());
            ffi::ASN1_INTEGER_free(n);
            if bn.is_null() {
                return None;
            }
            Some(BigNum::from_ptr(bn).to_vec())
        }
    }

    fn next_update(&self) -> Option<i64> {
        // SAFETY: reading a field of a valid CRL.
        let t = unsafe { ffi::X509_CRL_get0_nextUpdate(self.0) };
        if t.is_null() {
            return None;
        }
        let mut out = 0i64;
        // SAFETY: `t` is a valid ASN1_TIME owned by the CRL.
        (unsafe { ffi::ASN1_TIME_to_posix(t, &mut out) } == 1).then_some(out)
    }

    fn revoked_serials(&self) -> Vec<Box<[u8]>> {
        let mut out = Vec::new();
        // SAFETY: the stack and its entries are owned by the CRL and valid while it lives; each
        // serial is converted into a BIGNUM that we own and free.
        unsafe {
            let stack = ffi::X509_CRL_get_REVOKED(self.0);
            if stack.is_null() {
                return out;
            }
            let n = ffi::OPENSSL_sk_num(stack.cast());
            for i in 0..n {
                let revoked = ffi::OPENSSL_sk_value(stack.cast(), i).cast::<ffi::X509_REVOKED>();
                if revoked.is_null() {
                    continue;
                }
                let serial = ffi::X509_REVOKED_get0_serialNumber(revoked);
                let bn = ffi::ASN1_INTEGER_to_BN(serial, ptr::null_mut());
                if bn.is_null() {
                    continue;
                }
                let bn = BigNum::from_ptr(bn);
                out.push(bn.to_vec().into_boxed_slice());
            }
        }
        out
    }
}

fn parse_crls(data: &[u8]) -> Result<Vec<Crl>, String> {
    let mut out = Vec::new();
    if data.windows(11).any(|w| w == b"-----BEGIN ") {
        // SAFETY: the BIO reads from `data`, which outlives it; every CRL returned is owned by a
        // `Crl`; the BIO is freed before returning; the error queue is cleared of the expected
        // end-of-input error.
        unsafe {
            let bio = ffi::BIO_new_mem_buf(data.as_ptr().cast(), data.len() as _);
            if bio.is_null() {
                return Err("out of memory".to_owned());
            }
            loop {
                let crl = ffi::PEM_read_bio_X509_CRL(bio, ptr::null_mut(), None, ptr::null_mut());
                if crl.is_null() {
                    break;
                }
                out.push(Crl(crl));
            }
            ffi::BIO_free(bio);
            ffi::ERR_clear_error();
        }
        if out.is_empty() {
            return Err("no PEM CRL (\"-----BEGIN X509 CRL-----\") in the file".to_owned());
        }
    } else {
        let mut p = data.as_ptr();
        // SAFETY: d2i reads at most `len` bytes from `p`, which points into `data`.
        let crl = unsafe { ffi::d2i_X509_CRL(ptr::null_mut(), &mut p, data.len() as c_long) };
        if crl.is_null() {
            // SAFETY: clearing the thread's error queue has no preconditions.
            unsafe { ffi::ERR_clear_error() };
            return Err("not a CRL (neither PEM nor DER)".to_owned());
        }
        out.push(Crl(crl));
    }
    Ok(out)
}
