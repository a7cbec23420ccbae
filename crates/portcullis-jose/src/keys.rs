//! Verification keys: what a key may verify (fixed when it is loaded), JWK and JWK Set parsing
//! (RFC 7517, RFC 7518 §6, RFC 8037), and the seam to the crypto library that does the math.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::alg::{Alg, AlgSet, Curve};
use crate::b64;
use crate::json::Json;

/// The math of one key, done by a crypto library (BoringSSL, in the TLS crate).
pub trait Verify: Send + Sync + fmt::Debug {
    /// Whether `signature` is `alg`'s signature (or MAC) of `input` under this key. Only called
    /// with an algorithm the key's [`AlgSet`] allows.
    fn verify(&self, alg: Alg, input: &[u8], signature: &[u8]) -> bool;
}

/// A key's parameters, decoded, for a crypto library to turn into a [`Verify`].
#[derive(Debug, Clone, Copy)]
pub enum Material<'a> {
    Rsa {
        n: &'a [u8],
        e: &'a [u8],
    },
    Ec {
        curve: Curve,
        x: &'a [u8],
        y: &'a [u8],
    },
    Ed25519 {
        x: &'a [u8],
    },
    /// An HMAC secret.
    Secret(&'a [u8]),
    /// A DER `SubjectPublicKeyInfo` (from a PEM file or a certificate): the library says what
    /// kind of key it is.
    Spki(&'a [u8]),
}

/// What kind of key the crypto library made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Rsa { bits: u32 },
    Ec(Curve),
    Ed25519,
    Secret { len: usize },
}

/// Makes keys. The library refuses keys that are unsafe to verify with (RSA under 2048 bits, a
/// public exponent that is not odd and at least 3, a modulus with the ROCA fingerprint, a point
/// off its curve, an empty secret).
pub trait Crypto: Send + Sync + fmt::Debug {
    fn key(&self, material: &Material<'_>) -> Result<(KeyType, Arc<dyn Verify>), String>;

    /// The DER `SubjectPublicKeyInfo` of a PEM file's public key (a `PUBLIC KEY` block, or a
    /// certificate's key).
    fn public_key_der_from_pem(&self, pem: &[u8]) -> Result<Vec<u8>, String>;
}

/// A key that verifies token signatures, with the algorithms it may verify.
#[derive(Clone)]
pub struct Key {
    kid: Option<Box<str>>,
    algs: AlgSet,
    verifier: Arc<dyn Verify>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key").field("kid", &self.kid).field("algs", &self.algs).finish_non_exhaustive()
    }
}

/// Why a key was not loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// Not a key for verifying signatures (`use` is not `sig`, `key_ops` lacks `verify`, or its
    /// `alg` is not a JWS algorithm): left out of a key set, an error when configured alone.
    NotForSignatures(String),
    /// A signature key that cannot be used: the text says why.
    Invalid(String),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::NotForSignatures(why) | KeyError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for KeyError {}

fn invalid(why: impl Into<String>) -> KeyError {
    KeyError::Invalid(why.into())
}

impl Key {
    /// A key from its parameters. `declared` is the algorithm the key's source names (a JWK's
    /// `alg`), which must fit the key; without it the key's type decides: an EC key its curve's
    /// one algorithm, Ed25519 EdDSA, RSA the RS and PS families, a secret every HS algorithm whose
    /// hash is no longer than the secret (RFC 7518 §3.2).
    pub fn from_material(
        crypto: &dyn Crypto,
        material: &Material<'_>,
        kid: Option<&str>,
        declared: Option<&str>,
    ) -> Result<Key, KeyError> {
        let (kind, verifier) = crypto.key(material).map_err(KeyError::Invalid)?;
        let algs = algs_for(kind, declared)?;
        Ok(Key { kid: kid.map(Into::into), algs, verifier })
    }

    /// A key of a crypto library's making, with the algorithms it may verify.
    pub fn new(kid: Option<&str>, algs: AlgSet, verifier: Arc<dyn Verify>) -> Key {
        Key { kid: kid.map(Into::into), algs, verifier }
    }

    /// Reads a JWK (RFC 7517 §4): `kty` RSA, EC, OKP (Ed25519) or oct.
    pub fn from_jwk(crypto: &dyn Crypto, jwk: &Json) -> Result<Key, KeyError> {
        let Some(members) = jwk.as_object() else { return Err(invalid("a JWK is a JSON object")) };
        let text = |name: &str| -> Result<Option<&str>, KeyError> {
            match jwk.get(name) {
                None => Ok(None),
                Some(Json::String(s)) => Ok(Some(s)),
                Some(other) => {
                    Err(invalid(format!("JWK member \"{name}\" is a {}, not a string", other.type_name())))
                }
            }
        };
        let kty = text("kty")?.ok_or_else(|| invalid("JWK has no \"kty\""))?;
        let kid = text("kid")?;
        let alg = text("alg")?;
        if let Some(usage) = text("use")?
            && usage != "sig"
        {
            return Err(KeyError::NotForSignatures(format!("JWK \"use\" is \"{usage}\"")));
        }
        if let Some(ops) = jwk.get("key_ops") {
            let Some(ops) = ops.as_array() else { return Err(invalid("JWK \"key_ops\" is not an array")) };
            let mut seen: Vec<&str> = Vec::new();
            for op in ops {
                let Some(op) = op.as_str() else { return Err(invalid("JWK \"key_ops\" holds a non-string")) };
                if seen.contains(&op) {
                    return Err(invalid(format!("JWK \"key_ops\" lists \"{op}\" twice")));
                }
                seen.push(op);
            }
            if !seen.contains(&"verify") {
                return Err(KeyError::NotForSignatures("JWK \"key_ops\" does not include \"verify\"".into()));
            }
        }
        if let Some(a) = alg
            && Alg::from_name(a).is_none()
            && a != "ES521"
        {
            return Err(KeyError::NotForSignatures(format!("JWK \"alg\" \"{a}\" is not a JWS algorithm")));
        }
        // A published key set carries public keys only: private parameters there mean a leak,
        // or the wrong file.
        const PRIVATE: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "oth"];
        if kty != "oct"
            && let Some((name, _)) = members.iter().find(|(n, _)| PRIVATE.contains(&&**n))
        {
            return Err(invalid(format!(
                "JWK carries the private parameter \"{name}\"; give the public key only"
            )));
        }
        let field = |name: &str| -> Result<Vec<u8>, KeyError> {
            let value = text(name)?.ok_or_else(|| invalid(format!("{kty} JWK has no \"{name}\"")))?;
            b64::decode(value.as_bytes()).map_err(|_| invalid(format!("JWK \"{name}\" is not base64url")))
        };
        let (n, e, x, y, k);
        let material = match kty {
            "RSA" => {
                n = field("n")?;
                e = field("e")?;
                Material::Rsa { n: &n, e: &e }
            }
            "EC" => {
                let crv = text("crv")?.ok_or_else(|| invalid("EC JWK has no \"crv\""))?;
                let curve = Curve::from_name(crv)
                    .ok_or_else(|| invalid(format!("EC curve \"{crv}\" is not supported")))?;
                x = field("x")?;
                y = field("y")?;
                // Full-length coordinates (RFC 7518 §6.2.1.2).
                if x.len() != curve.coordinate_len() || y.len() != curve.coordinate_len() {
                    return Err(invalid(format!(
                        "EC JWK coordinates are not {} bytes",
                        curve.coordinate_len()
                    )));
                }
                Material::Ec { curve, x: &x, y: &y }
            }
            "OKP" => {
                let crv = text("crv")?.ok_or_else(|| invalid("OKP JWK has no \"crv\""))?;
                if crv != "Ed25519" {
                    return Err(invalid(format!("OKP curve \"{crv}\" is not supported (Ed25519 is)")));
                }
                x = field("x")?;
                Material::Ed25519 { x: &x }
            }
            "oct" => {
                k = field("k")?;
                Material::Secret(&k)
            }
            other => {
                return Err(KeyError::NotForSignatures(format!("JWK \"kty\" \"{other}\" is not supported")));
            }
        };
        Key::from_material(crypto, &material, kid, alg)
    }

    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    pub fn algs(&self) -> AlgSet {
        self.algs
    }

    /// Whether the key is an HMAC secret.
    pub fn is_secret(&self) -> bool {
        self.algs.iter().any(|a| matches!(a, Alg::HS256 | Alg::HS384 | Alg::HS512))
    }

    /// Whether this key may verify `alg` and `signature` is its signature of `input`.
    pub fn verify(&self, alg: Alg, input: &[u8], signature: &[u8]) -> bool {
        self.algs.contains(alg) && self.verifier.verify(alg, input, signature)
    }
}

/// The algorithms a key of `kind` may verify, given the one its source declares.
fn algs_for(kind: KeyType, declared: Option<&str>) -> Result<AlgSet, KeyError> {
    let declared_alg = declared.map(|d| (d, Alg::from_name(d)));
    let mismatch = |what: &str| invalid(format!("\"alg\" {} does not fit {what}", declared.unwrap_or("-")));
    match kind {
        KeyType::Ec(curve) => match declared_alg {
            None => Ok(AlgSet::one(curve.alg())),
            Some((_, Some(a))) if a == curve.alg() => Ok(AlgSet::one(a)),
            // RFC 7520's examples name P-521 keys "ES521" (the JWS algorithm is ES512).
            Some(("ES521", None)) if curve == Curve::P521 => Ok(AlgSet::one(Alg::ES512)),
            _ => Err(mismatch(&format!("a {curve:?} key"))),
        },
        KeyType::Ed25519 => match declared_alg {
            None | Some((_, Some(Alg::EdDSA))) => Ok(AlgSet::one(Alg::EdDSA)),
            _ => Err(mismatch("an Ed25519 key")),
        },
        KeyType::Rsa { .. } => match declared_alg {
            None => Ok(AlgSet::RSA),
            Some((_, Some(a))) if AlgSet::RSA.contains(a) => Ok(AlgSet::one(a)),
            _ => Err(mismatch("an RSA key")),
        },
        KeyType::Secret { len } => {
            let fits = |a: Alg| a.hash().is_some_and(|h| len >= h.output_len());
            match declared_alg {
                None => {
                    let set = AlgSet::of(&[Alg::HS256, Alg::HS384, Alg::HS512]);
                    let algs: Vec<Alg> = set.iter().filter(|a| fits(*a)).collect();
                    if algs.is_empty() {
                        return Err(invalid(format!(
                            "an HMAC secret of {len} bytes is too short (HS256 needs 32)"
                        )));
                    }
                    Ok(AlgSet::of(&algs))
                }
                Some((_, Some(a @ (Alg::HS256 | Alg::HS384 | Alg::HS512)))) => {
                    if !fits(a) {
                        return Err(invalid(format!(
                            "an HMAC secret of {len} bytes is too short for {a} (RFC 7518 §3.2: at least {})",
                            a.hash().map_or(0, |h| h.output_len())
                        )));
                    }
                    Ok(AlgSet::one(a))
                }
                _ => Err(mismatch("an HMAC secret")),
            }
        }
    }
}

/// Where a key set comes from: a published set may not hold secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A file or a value of the configuration.
    Local,
    /// An identity provider's `jwks_uri`.
    Published,
}

static NEXT_SET: AtomicU64 = AtomicU64::new(1);

/// Most keys a published set may hold (identity providers publish a handful; more is a mistake or
/// an attempt to make every token cost many signature checks).
pub const MAX_PUBLISHED_KEYS: usize = 100;

/// Keys that verify a token: by `kid` when the token names one, else every key that may verify
/// its algorithm. Each set has an id of its own, so that a verdict reached with it can be told
/// apart from one reached with a set that replaced it.
#[derive(Debug)]
pub struct KeySet {
    id: u64,
    keys: Vec<Key>,
}

impl KeySet {
    /// A set of `keys`. Two keys with one `kid`, or secrets beside public keys, make the set
    /// ambiguous: refused.
    pub fn new(keys: Vec<Key>) -> Result<KeySet, String> {
        for (i, key) in keys.iter().enumerate() {
            if let Some(kid) = key.kid()
                && keys[..i].iter().any(|k| k.kid() == Some(kid))
            {
                return Err(format!("two keys have the kid \"{kid}\""));
            }
        }
        if keys.iter().any(Key::is_secret) && keys.iter().any(|k| !k.is_secret()) {
            return Err("a key set mixes HMAC secrets and public keys".into());
        }
        Ok(KeySet { id: NEXT_SET.fetch_add(1, Ordering::Relaxed), keys })
    }

    /// An empty set (a provider whose keys have not arrived).
    pub fn empty() -> KeySet {
        KeySet { id: NEXT_SET.fetch_add(1, Ordering::Relaxed), keys: Vec::new() }
    }

    /// Reads a JWK Set (RFC 7517 §5). Keys that are not for signatures are left out (their
    /// reasons are returned, for the log). A signature key that cannot be used refuses a set of
    /// the configuration; in a published set it is left out too (one odd key must not take the
    /// provider's others down), as long as keys remain. A published set holds no secrets and at
    /// most [`MAX_PUBLISHED_KEYS`] keys.
    pub fn from_jwks(
        crypto: &dyn Crypto,
        text: &[u8],
        origin: Origin,
    ) -> Result<(KeySet, Vec<String>), String> {
        let doc = Json::parse(text).map_err(|e| format!("not a JWK Set: {e}"))?;
        let Some(list) = doc.get("keys") else { return Err("not a JWK Set: no \"keys\" member".into()) };
        let Some(list) = list.as_array() else {
            return Err("not a JWK Set: \"keys\" is not an array".into());
        };
        if origin == Origin::Published && list.len() > MAX_PUBLISHED_KEYS {
            return Err(format!(
                "the JWK Set has {} keys; at most {MAX_PUBLISHED_KEYS} are taken",
                list.len()
            ));
        }
        let mut keys = Vec::with_capacity(list.len());
        let mut skipped = Vec::new();
        for (i, jwk) in list.iter().enumerate() {
            match Key::from_jwk(crypto, jwk) {
                Ok(key) => {
                    if origin == Origin::Published && key.is_secret() {
                        return Err(format!("key {i}: a published key set holds an HMAC secret"));
                    }
                    keys.push(key);
                }
                Err(KeyError::NotForSignatures(why)) => skipped.push(format!("key {i} left out: {why}")),
                Err(KeyError::Invalid(why)) if origin == Origin::Published => {
                    skipped.push(format!("key {i} left out: {why}"));
                }
                Err(KeyError::Invalid(why)) => return Err(format!("key {i}: {why}")),
            }
        }
        if keys.is_empty() {
            return Err("the JWK Set has no key for verifying signatures".into());
        }
        Ok((KeySet::new(keys)?, skipped))
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// Whether a key of the set has `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid() == Some(kid))
    }

    /// The keys that may verify a token with `kid` and `alg`: those with that `kid` and those
    /// without one (a `kid` is a hint, RFC 7515 §4.1.4); every key for `alg` when the token
    /// names none.
    pub fn candidates<'s>(&'s self, kid: Option<&'s str>, alg: Alg) -> impl Iterator<Item = &'s Key> + 's {
        self.keys
            .iter()
            .filter(move |k| k.algs.contains(alg) && (kid.is_none() || k.kid().is_none() || k.kid() == kid))
    }
}
