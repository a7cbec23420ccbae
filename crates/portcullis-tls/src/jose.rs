//! The signature math of JSON Web Tokens on BoringSSL: RSA PKCS #1 v1.5 and PSS, ECDSA with the
//! raw `r‖s` signatures JWS uses, Ed25519, and HMAC; and the checks that refuse keys unsafe to
//! verify with.

use std::sync::Arc;

use boring::bn::{BigNum, BigNumRef};
use boring::ec::{EcGroup, EcKey};
use boring::ecdsa::EcdsaSig;
use boring::hash::{MessageDigest, hash};
use boring::hmac::Hmac;
use boring::nid::Nid;
use boring::pkey::{Id, PKey, Public};
use boring::rsa::{Padding, Rsa};
use boring::sign::{RsaPssSaltlen, Verifier};
use portcullis_jose::{Alg, Crypto, Curve, Hash, KeyType, Material, Verify};

/// Smallest RSA modulus accepted (NIST SP 800-131A; Wycheproof refuses 1024-bit keys).
const MIN_RSA_BITS: i32 = 2048;
/// Largest: a bigger modulus would make each verification a denial of service.
const MAX_RSA_BITS: i32 = 8192;

/// Makes token-verification keys with BoringSSL.
#[derive(Debug, Default, Clone, Copy)]
pub struct BoringCrypto;

fn digest(h: Hash) -> MessageDigest {
    match h {
        Hash::Sha256 => MessageDigest::sha256(),
        Hash::Sha384 => MessageDigest::sha384(),
        Hash::Sha512 => MessageDigest::sha512(),
    }
}

#[derive(Debug)]
struct RsaKey {
    pkey: PKey<Public>,
    size: usize,
}

#[derive(Debug)]
struct EcdsaKey {
    key: EcKey<Public>,
    curve: Curve,
}

#[derive(Debug)]
struct Ed25519Key(PKey<Public>);

struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Verify for RsaKey {
    fn verify(&self, alg: Alg, input: &[u8], signature: &[u8]) -> bool {
        let Some(h) = alg.hash() else { return false };
        if signature.len() != self.size {
            return false;
        }
        let md = digest(h);
        let Ok(mut v) = Verifier::new(md, &self.pkey) else { return false };
        if matches!(alg, Alg::PS256 | Alg::PS384 | Alg::PS512) {
            // RFC 7518 §3.5: MGF1 with the same hash, a salt as long as the hash.
            if v.set_rsa_padding(Padding::PKCS1_PSS).is_err()
                || v.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH).is_err()
                || v.set_rsa_mgf1_md(md).is_err()
            {
                return false;
            }
        }
        v.verify_oneshot(signature, input).unwrap_or(false)
    }
}

impl Verify for EcdsaKey {
    fn verify(&self, alg: Alg, input: &[u8], signature: &[u8]) -> bool {
        let n = self.curve.coordinate_len();
        // Exactly r‖s, each of the curve's length (RFC 7518 §3.4); never DER.
        if alg != self.curve.alg() || signature.len() != 2 * n {
            return false;
        }
        let Some(h) = alg.hash() else { return false };
        let (r, s) = signature.split_at(n);
        let (Ok(r), Ok(s)) = (BigNum::from_slice(r), BigNum::from_slice(s)) else { return false };
        let Ok(sig) = EcdsaSig::from_private_components(r, s) else { return false };
        let Ok(d) = hash(digest(h), input) else { return false };
        sig.verify(&d, &self.key).unwrap_or(false)
    }
}

impl Verify for Ed25519Key {
    fn verify(&self, alg: Alg, input: &[u8], signature: &[u8]) -> bool {
        if alg != Alg::EdDSA || signature.len() != 64 {
            return false;
        }
        let Ok(mut v) = Verifier::new_without_digest(&self.0) else { return false };
        v.verify_oneshot(signature, input).unwrap_or(false)
    }
}

impl Verify for Secret {
    fn verify(&self, alg: Alg, input: &[u8], signature: &[u8]) -> bool {
        let Some(h) = alg.hash() else { return false };
        if signature.len() != h.output_len() {
            return false;
        }
        let Ok(mut mac) = Hmac::init(&self.0, &digest(h)) else { return false };
        if mac.update(input).is_err() {
            return false;
        }
        let Ok(expected) = mac.finalize() else { return false };
        boring::memcmp::eq(&expected, signature)
    }
}

/// Small primes of the ROCA fingerprint (Nemec et al., CCS 2017): a modulus made by the flawed
/// Infineon generator is, modulo each of them, a power of 65537.
const ROCA_PRIMES: [u32; 38] = [
    3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 101, 103,
    107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167,
];

/// Whether `n` has the ROCA fingerprint (its factors can be found).
fn has_roca_fingerprint(n: &BigNumRef) -> bool {
    ROCA_PRIMES.iter().all(|&p| {
        let Ok(residue) = n.mod_word(p) else { return false };
        // Is `residue` in the subgroup of Z_p* that 65537 generates?
        let g = 65537 % u64::from(p);
        let mut power = 1u64;
        for _ in 0..p {
            if power == residue {
                return true;
            }
            power = power * g % u64::from(p);
            if power == 1 {
                break;
            }
        }
        false
    })
}

fn check_rsa(n: &BigNumRef, e: &BigNumRef) -> Result<u32, String> {
    let bits = n.num_bits();
    if bits < MIN_RSA_BITS {
        return Err(format!("an RSA key of {bits} bits is too small (at least {MIN_RSA_BITS})"));
    }
    if bits > MAX_RSA_BITS {
        return Err(format!("an RSA key of {bits} bits is too large (at most {MAX_RSA_BITS})"));
    }
    // An odd exponent of at least 3 (e = 1 makes every "signature" its own message), at most
    // 33 bits as BoringSSL requires.
    if !e.is_odd() || e.num_bits() < 2 || e.num_bits() > 33 {
        return Err("the RSA public exponent must be odd, at least 3 and at most 33 bits".into());
    }
    if has_roca_fingerprint(n) {
        return Err("the RSA key has the ROCA fingerprint (CVE-2017-15361): its factors can be found".into());
    }
    Ok(bits as u32)
}

fn rsa_key(rsa: Rsa<Public>) -> Result<(KeyType, Arc<dyn Verify>), String> {
    let bits = check_rsa(rsa.n(), rsa.e())?;
    let size = rsa.size() as usize;
    let pkey = PKey::from_rsa(rsa).map_err(|e| format!("RSA key: {e}"))?;
    Ok((KeyType::Rsa { bits }, Arc::new(RsaKey { pkey, size })))
}

fn curve_nid(curve: Curve) -> Nid {
    match curve {
        Curve::P256 => Nid::X9_62_PRIME256V1,
        Curve::P384 => Nid::SECP384R1,
        Curve::P521 => Nid::SECP521R1,
    }
}

fn ec_key(key: EcKey<Public>, curve: Curve) -> Result<(KeyType, Arc<dyn Verify>), String> {
    key.check_key().map_err(|_| "the EC public key is not a point of its curve".to_owned())?;
    Ok((KeyType::Ec(curve), Arc::new(EcdsaKey { key, curve })))
}

/// `SubjectPublicKeyInfo` of an Ed25519 key (RFC 8410 §4), before the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] =
    [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

impl Crypto for BoringCrypto {
    fn key(&self, material: &Material<'_>) -> Result<(KeyType, Arc<dyn Verify>), String> {
        match *material {
            Material::Rsa { n, e } => {
                let n = BigNum::from_slice(n).map_err(|e| e.to_string())?;
                let e = BigNum::from_slice(e).map_err(|e| e.to_string())?;
                // Checked before BoringSSL sees it (an exponent of 1 is refused there too), and
                // again, with the ROCA test, by `rsa_key`.
                if !e.is_odd() || e.num_bits() < 2 {
                    return Err("the RSA public exponent must be odd, at least 3 and at most 33 bits".into());
                }
                rsa_key(Rsa::from_public_components(n, e).map_err(|e| format!("RSA key: {e}"))?)
            }
            Material::Ec { curve, x, y } => {
                let group = EcGroup::from_curve_name(curve_nid(curve)).map_err(|e| e.to_string())?;
                let x = BigNum::from_slice(x).map_err(|e| e.to_string())?;
                let y = BigNum::from_slice(y).map_err(|e| e.to_string())?;
                let key = EcKey::from_public_key_affine_coordinates(&group, &x, &y)
                    .map_err(|_| "the EC public key is not a point of its curve".to_owned())?;
                ec_key(key, curve)
            }
            Material::Ed25519 { x } => {
                if x.len() != 32 {
                    return Err(format!("an Ed25519 key is 32 bytes, not {}", x.len()));
                }
                let mut der = ED25519_SPKI_PREFIX.to_vec();
                der.extend_from_slice(x);
                let pkey = PKey::public_key_from_der(&der).map_err(|e| format!("Ed25519 key: {e}"))?;
                Ok((KeyType::Ed25519, Arc::new(Ed25519Key(pkey))))
            }
            Material::Secret(k) => {
                if k.is_empty() {
                    return Err("an HMAC secret cannot be empty".into());
                }
                Ok((KeyType::Secret { len: k.len() }, Arc::new(Secret(k.to_vec()))))
            }
            Material::Spki(der) => {
                let pkey = PKey::public_key_from_der(der).map_err(|e| format!("not a public key: {e}"))?;
                match pkey.id() {
                    Id::RSA => rsa_key(pkey.rsa().map_err(|e| e.to_string())?),
                    Id::EC => {
                        let key = pkey.ec_key().map_err(|e| e.to_string())?;
                        let curve = match key.group().curve_name() {
                            Some(Nid::X9_62_PRIME256V1) => Curve::P256,
                            Some(Nid::SECP384R1) => Curve::P384,
                            Some(Nid::SECP521R1) => Curve::P521,
                            _ => return Err("the EC key is on a curve JWS does not use".into()),
                        };
                        ec_key(key, curve)
                    }
                    Id::ED25519 => Ok((KeyType::Ed25519, Arc::new(Ed25519Key(pkey)))),
                    _ => Err("the key is neither RSA, EC nor Ed25519".into()),
                }
            }
        }
    }

    fn public_key_der_from_pem(&self, pem: &[u8]) -> Result<Vec<u8>, String> {
        public_key_der_from_pem(pem)
    }
}

/// The `SubjectPublicKeyInfo` (DER) of a PEM file's public key: a `PUBLIC KEY` block, or the key
/// of the first certificate.
pub fn public_key_der_from_pem(pem: &[u8]) -> Result<Vec<u8>, String> {
    if let Ok(key) = PKey::public_key_from_pem(pem) {
        return key.public_key_to_der().map_err(|e| e.to_string());
    }
    let cert = boring::x509::X509::from_pem(pem)
        .map_err(|_| "neither a PUBLIC KEY nor a CERTIFICATE in PEM".to_owned())?;
    public_key_der_of(&cert)
}

/// The `SubjectPublicKeyInfo` (DER) of a certificate's key.
pub fn public_key_der_of(cert: &boring::x509::X509Ref) -> Result<Vec<u8>, String> {
    cert.public_key().and_then(|k| k.public_key_to_der()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roca_fingerprint() {
        // 65537^k mod (product of the primes) has the fingerprint by construction; 65537^k + 1
        // does not (modulo 3, it is 2 + 1 = 0, outside Z_3*).
        let mut m = BigNum::from_u32(1).expect("bn");
        let mut ctx = boring::bn::BigNumContext::new().expect("ctx");
        for p in ROCA_PRIMES {
            let mut next = BigNum::new().expect("bn");
            next.checked_mul(&m, &BigNum::from_u32(p).expect("bn"), &mut ctx).expect("mul");
            m = next;
        }
        let g = BigNum::from_u32(65537).expect("bn");
        let mut k = BigNum::new().expect("bn");
        k.mod_exp(&g, &BigNum::from_u32(12345).expect("bn"), &m, &mut ctx).expect("exp");
        assert!(has_roca_fingerprint(&k));
        let mut k1 = BigNum::new().expect("bn");
        k1.checked_add(&k, &BigNum::from_u32(1).expect("bn")).expect("add");
        assert!(!has_roca_fingerprint(&k1));
    }
}
