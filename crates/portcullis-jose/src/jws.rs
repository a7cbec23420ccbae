//! JWS compact serialization (RFC 7515 §7.1): `header.payload.signature`, each part base64url.
//! The header decides nothing by itself: its `alg` must be one the verifying key allows, and the
//! parameters that would let a token choose its own key (`jku`, `jwk`, `x5u`, `x5c`) or change
//! how it is processed (`crit`, `b64`, `zip`) are refused.

use std::fmt;

use crate::alg::Alg;
use crate::b64;
use crate::json::Json;
use crate::keys::Key;

/// Why a token is not a JWS this verifier accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwsError {
    /// Larger than the configured limit.
    TooLarge,
    /// Not three base64url parts with a JSON object for a header; the text says what.
    Malformed(&'static str),
    /// `alg` is `none`.
    Unsigned,
    /// `alg` names no signature algorithm this verifier knows.
    UnknownAlgorithm,
    /// Five parts, or an `enc` header: an encrypted token (JWE), not supported.
    Encrypted,
    /// A header parameter the verifier refuses (named).
    ForbiddenHeader(&'static str),
}

impl fmt::Display for JwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwsError::TooLarge => f.write_str("token too large"),
            JwsError::Malformed(what) => write!(f, "malformed token: {what}"),
            JwsError::Unsigned => f.write_str("unsigned token (alg none)"),
            JwsError::UnknownAlgorithm => f.write_str("unknown algorithm"),
            JwsError::Encrypted => f.write_str("encrypted token (JWE)"),
            JwsError::ForbiddenHeader(name) => write!(f, "header parameter \"{name}\" is not accepted"),
        }
    }
}

impl std::error::Error for JwsError {}

/// Header parameters refused outright: a token may not pick its own key or processing rules.
const FORBIDDEN: [&str; 7] = ["crit", "jku", "jwk", "x5u", "x5c", "b64", "zip"];

/// A token split and its header read; nothing verified yet.
#[derive(Debug)]
pub struct Jws<'t> {
    pub alg: Alg,
    pub kid: Option<String>,
    signing_input: &'t [u8],
    payload: &'t [u8],
    signature: Vec<u8>,
}

fn is_b64url(part: &[u8]) -> bool {
    part.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl<'t> Jws<'t> {
    /// Splits a compact token and reads its header. `max_len` bounds the whole token.
    pub fn parse(token: &'t [u8], max_len: usize) -> Result<Jws<'t>, JwsError> {
        if token.len() > max_len {
            return Err(JwsError::TooLarge);
        }
        let dots: Vec<usize> =
            token.iter().enumerate().filter(|(_, b)| **b == b'.').map(|(i, _)| i).collect();
        let (first, second) = match dots[..] {
            [a, b] => (a, b),
            [_, _, _, _] => return Err(JwsError::Encrypted),
            _ => return Err(JwsError::Malformed("not three parts")),
        };
        let (header, payload, signature) = (&token[..first], &token[first + 1..second], &token[second + 1..]);
        if header.is_empty() {
            return Err(JwsError::Malformed("empty header"));
        }
        if !is_b64url(header) || !is_b64url(payload) || !is_b64url(signature) {
            return Err(JwsError::Malformed("a part is not base64url"));
        }
        let header_json = b64::decode(header).map_err(|_| JwsError::Malformed("header is not base64url"))?;
        let header_json = Json::parse(&header_json).map_err(|_| JwsError::Malformed("header is not JSON"))?;
        if header_json.as_object().is_none() {
            return Err(JwsError::Malformed("header is not a JSON object"));
        }
        if header_json.get("enc").is_some() {
            return Err(JwsError::Encrypted);
        }
        if let Some(name) = FORBIDDEN.iter().find(|n| header_json.get(n).is_some()) {
            return Err(JwsError::ForbiddenHeader(name));
        }
        let alg = match header_json.get("alg") {
            Some(Json::String(a)) if &**a == "none" => return Err(JwsError::Unsigned),
            Some(Json::String(a)) => Alg::from_name(a).ok_or(JwsError::UnknownAlgorithm)?,
            Some(_) => return Err(JwsError::Malformed("\"alg\" is not a string")),
            None => return Err(JwsError::Malformed("no \"alg\"")),
        };
        let kid = match header_json.get("kid") {
            None => None,
            Some(Json::String(k)) => Some(k.to_string()),
            Some(_) => return Err(JwsError::Malformed("\"kid\" is not a string")),
        };
        if signature.is_empty() {
            return Err(JwsError::Malformed("no signature"));
        }
        let signature =
            b64::decode(signature).map_err(|_| JwsError::Malformed("signature is not base64url"))?;
        Ok(Jws { alg, kid, signing_input: &token[..second], payload, signature })
    }

    /// Whether `key` verifies the signature (and may verify this algorithm).
    pub fn verified_by(&self, key: &Key) -> bool {
        key.verify(self.alg, self.signing_input, &self.signature)
    }

    /// The payload, decoded.
    pub fn payload(&self) -> Result<Vec<u8>, JwsError> {
        b64::decode(self.payload).map_err(|_| JwsError::Malformed("payload is not base64url"))
    }
}
