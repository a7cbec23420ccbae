//! JSON Web Tokens, read strictly: a JSON reader that refuses duplicate members and lone
//! surrogates, strict base64url, JWK and JWK Set parsing with each key's algorithms fixed when it
//! is loaded, JWS compact parsing that refuses `none`, `crit` and the header parameters that let
//! a token choose its key, JWT claims with the registered claims' types checked, and API
//! Management's required-claim rules.
//!
//! What it does not do: the signature math (a [`Crypto`] implementation does it; the TLS crate's,
//! on BoringSSL, is the one the proxy uses), I/O (the server fetches identity providers' keys and
//! publishes them through [`RemoteKeys`]), or JWE (encrypted tokens are refused).
#![forbid(unsafe_code)]

mod alg;
pub mod b64;
mod json;
mod jws;
mod jwt;
mod keys;
mod remote;

pub use alg::{Alg, AlgSet, Curve, Hash};
pub use json::{Json, JsonError, MAX_DEPTH, Number};
pub use jws::{Jws, JwsError};
pub use jwt::{ClaimRule, Claims, ClaimsError, Match};
pub use keys::{Crypto, Key, KeyError, KeySet, KeyType, MAX_PUBLISHED_KEYS, Material, Origin, Verify};
pub use remote::RemoteKeys;
