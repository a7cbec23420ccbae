//! `validate_jwt`: API Management's `validate-jwt`, with keys from the configuration and from
//! OpenID Connect providers, a per-worker cache of verified tokens, and certificate-bound tokens
//! (RFC 8705).

use std::rc::Rc;
use std::sync::Arc;

use ahash::{AHashMap, RandomState};
use bytes::{Bytes, BytesMut};
use portcullis_config::{ConfigErrors, Loc, SigningKeySource, TokenSource, ValidateJwt};
use portcullis_jose::{
    ClaimRule, Claims, Crypto, Jws, JwsError, Key, KeySet, Match, Material, Origin, RemoteKeys, b64,
};

use crate::facts::{Facts, HeaderList, RequestState};
use crate::policy::{PolicySet, Response, json_response};
use crate::template::{Context, Template};

/// Verified tokens kept per worker before the oldest make room.
const CACHE_CAPACITY: usize = 8192;
/// How long a verified token without `exp` stays cached (its claims are checked on every request
/// anyway; only the signature check is saved).
const CACHE_TTL_WITHOUT_EXP: i64 = 300;
/// Keys tried for one token (a token without `kid` is tried with every key of its algorithm).
const MAX_ATTEMPTS: usize = 16;

/// A token whose signature verified, with its claims read.
#[derive(Debug)]
pub(crate) struct Verified {
    pub(crate) claims: Claims,
    /// The key set whose key verified it: the verdict holds while that set is current.
    keyset: u64,
    /// The issuer of the provider whose key verified it (none for a key of the configuration).
    issuer: Option<Arc<String>>,
}

struct Cached {
    token: Box<[u8]>,
    verified: Rc<Verified>,
    until: i64,
}

/// A worker's verified tokens, keyed by a hash of the token (the token itself is compared on a
/// hit). Bounded; full, it lets go of expired entries first, then of a few others.
pub struct TokenCache {
    map: AHashMap<u64, Cached>,
    hasher: RandomState,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("entries", &self.map.len()).finish()
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache { map: AHashMap::new(), hasher: RandomState::new() }
    }
}

impl TokenCache {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn get(&self, token: &[u8], now: i64) -> Option<&Rc<Verified>> {
        let entry = self.map.get(&self.hasher.hash_one(token))?;
        (entry.until > now && *entry.token == *token).then_some(&entry.verified)
    }

    fn put(&mut self, token: &[u8], verified: Rc<Verified>, until: i64, now: i64) {
        if self.map.len() >= CACHE_CAPACITY {
            self.map.retain(|_, e| e.until > now);
            // Still full: a sixteenth goes, not all (a burst of new tokens does not empty it).
            if self.map.len() >= CACHE_CAPACITY {
                let drop: Vec<u64> = self.map.keys().take(CACHE_CAPACITY / 16).copied().collect();
                for k in drop {
                    self.map.remove(&k);
                }
            }
        }
        self.map.insert(self.hasher.hash_one(token), Cached { token: token.into(), verified, until });
    }
}

/// Why a token was refused; each has its message (unless the step sets one for all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    NotPresent,
    TooLarge,
    Malformed,
    Unsigned,
    Algorithm,
    ForbiddenHeader,
    Encrypted,
    NoKey,
    KeysUnavailable,
    Signature,
    ClaimType,
    NoExpiration,
    Expired,
    NotYetValid,
    Audience,
    Issuer,
    /// A required claim (by index) is missing or holds no allowed value.
    Claim(usize),
    Binding,
}

const FAILURES: [Failure; 17] = [
    Failure::NotPresent,
    Failure::TooLarge,
    Failure::Malformed,
    Failure::Unsigned,
    Failure::Algorithm,
    Failure::ForbiddenHeader,
    Failure::Encrypted,
    Failure::NoKey,
    Failure::KeysUnavailable,
    Failure::Signature,
    Failure::ClaimType,
    Failure::NoExpiration,
    Failure::Expired,
    Failure::NotYetValid,
    Failure::Audience,
    Failure::Issuer,
    Failure::Binding,
];

impl Failure {
    fn index(self) -> usize {
        FAILURES.iter().position(|f| *f == self).unwrap_or(0)
    }

    /// What the client is told (never anything of the token itself).
    fn message(self) -> &'static str {
        match self {
            Failure::NotPresent => "JWT not present.",
            Failure::TooLarge => "JWT is too large.",
            Failure::Malformed => "JWT is malformed.",
            Failure::Unsigned => "JWT is not signed.",
            Failure::Algorithm => "JWT algorithm is not allowed.",
            Failure::ForbiddenHeader => "JWT header is not accepted.",
            Failure::Encrypted => "JWT is encrypted; only signed tokens are accepted.",
            Failure::NoKey => "JWT signing key not found.",
            Failure::KeysUnavailable => "JWT signing keys are not available.",
            Failure::Signature => "JWT signature is invalid.",
            Failure::ClaimType => "JWT claims are malformed.",
            Failure::NoExpiration => "JWT has no expiration time.",
            Failure::Expired => "JWT has expired.",
            Failure::NotYetValid => "JWT is not yet valid.",
            Failure::Audience => "JWT audience is not allowed.",
            Failure::Issuer => "JWT issuer is not allowed.",
            Failure::Claim(_) => "JWT is missing a required claim.",
            Failure::Binding => "JWT is not bound to the client certificate.",
        }
    }

    /// Why, for the log and the access record.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Failure::NotPresent => "jwt not present",
            Failure::TooLarge => "jwt too large",
            Failure::Malformed => "jwt malformed",
            Failure::Unsigned => "jwt unsigned",
            Failure::Algorithm => "jwt algorithm not allowed",
            Failure::ForbiddenHeader => "jwt header refused",
            Failure::Encrypted => "jwt encrypted",
            Failure::NoKey => "jwt signing key not found",
            Failure::KeysUnavailable => "jwt signing keys not available",
            Failure::Signature => "jwt signature invalid",
            Failure::ClaimType => "jwt claim of the wrong type",
            Failure::NoExpiration => "jwt without expiration",
            Failure::Expired => "jwt expired",
            Failure::NotYetValid => "jwt not yet valid",
            Failure::Audience => "jwt audience not allowed",
            Failure::Issuer => "jwt issuer not allowed",
            Failure::Claim(_) => "jwt required claim missing",
            Failure::Binding => "jwt not bound to the client certificate",
        }
    }
}

#[derive(Debug)]
enum Source {
    Header { name: Bytes, scheme: Option<Bytes> },
    Query(Bytes),
    Value(Template),
}

/// A compiled `validate_jwt` step.
#[derive(Debug)]
pub(crate) struct JwtStep {
    source: Source,
    keys: Option<Arc<KeySet>>,
    pub(crate) providers: Vec<Arc<RemoteKeys>>,
    audiences: Vec<String>,
    issuers: Vec<String>,
    rules: Vec<ClaimRule>,
    skew: i64,
    require_exp: bool,
    binding: bool,
    max_size: usize,
    /// By failure; one entry when the step sets its own message.
    responses: Vec<Response>,
    claim_responses: Vec<Response>,
}

/// What a step decided.
pub(crate) enum Outcome {
    Valid(Rc<Verified>),
    /// No key of the current sets has the token's `kid`: the providers' keys should be fetched
    /// again first.
    WaitForKeys,
    Refused(Failure),
}

/// What compiling a step needs from outside.
pub(crate) struct KeyInputs<'a> {
    pub(crate) crypto: Option<&'a dyn Crypto>,
    /// `[certificates]` entries' public keys (DER `SubjectPublicKeyInfo`).
    pub(crate) certificate_keys: &'a std::collections::HashMap<String, Vec<u8>>,
    /// `[[openid]]` providers by name.
    pub(crate) providers: &'a [(String, Arc<RemoteKeys>)],
}

fn www_authenticate(status: u16, failure: Failure) -> Option<(Bytes, Template)> {
    // RFC 6750 §3: a request without a token gets no error code; one with a bad token,
    // invalid_token. Only a 401 carries the challenge.
    if status != 401 {
        return None;
    }
    let value = if failure == Failure::NotPresent { "Bearer" } else { "Bearer error=\"invalid_token\"" };
    let template =
        Template::parse(&value.replace('{', "{{").replace('}', "}}"), &Loc::builtin("validate_jwt"));
    template.ok().map(|t| (Bytes::from_static(b"WWW-Authenticate"), t))
}

impl JwtStep {
    pub(crate) fn compile(
        v: &ValidateJwt,
        loc: &Loc,
        inputs: &KeyInputs<'_>,
        errors: &mut ConfigErrors,
    ) -> Option<JwtStep> {
        let source = match &v.source {
            TokenSource::Header { name, scheme } => Source::Header {
                name: Bytes::from(name.to_ascii_lowercase().into_bytes()),
                scheme: scheme.as_ref().map(|s| Bytes::from(s.clone().into_bytes())),
            },
            TokenSource::Query(q) => Source::Query(Bytes::from(q.clone().into_bytes())),
            TokenSource::Value(t) => match Template::parse(&t.value, &t.loc) {
                Ok(t) => Source::Value(t),
                Err(e) => {
                    errors.push(e);
                    return None;
                }
            },
        };
        let mut keys = Vec::new();
        for key in &v.keys {
            match load_key(key, inputs) {
                Ok(mut k) => keys.append(&mut k),
                Err(message) => errors.push(key.loc.error(message)),
            }
        }
        let keys = if v.keys.is_empty() {
            None
        } else {
            match KeySet::new(keys) {
                Ok(set) => Some(Arc::new(set)),
                Err(message) => {
                    errors.push(loc.error(format!("issuer_signing_keys: {message}")));
                    None
                }
            }
        };
        let providers = v
            .openid
            .iter()
            .filter_map(|name| {
                inputs.providers.iter().find(|(n, _)| *n == name.value).map(|(_, p)| p.clone())
            })
            .collect();
        let rules: Vec<ClaimRule> = v
            .required_claims
            .iter()
            .map(|c| ClaimRule {
                name: c.name.clone(),
                values: c.values.clone(),
                matching: if c.match_all { Match::All } else { Match::Any },
                separator: c.separator.clone(),
            })
            .collect();
        let respond = |failure: Failure, message: &str| {
            let mut r = json_response(v.status, message);
            r.headers.extend(www_authenticate(v.status, failure));
            r
        };
        let (responses, claim_responses) = match &v.message {
            Some(m) => (vec![respond(Failure::Malformed, m), respond(Failure::NotPresent, m)], Vec::new()),
            None => (
                FAILURES.iter().map(|f| respond(*f, f.message())).collect(),
                rules
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        respond(
                            Failure::Claim(i),
                            &format!("JWT claim {} is missing or not allowed.", r.name),
                        )
                    })
                    .collect(),
            ),
        };
        Some(JwtStep {
            source,
            keys,
            providers,
            audiences: v.audiences.clone(),
            issuers: v.issuers.clone(),
            rules,
            skew: i64::try_from(v.clock_skew.as_secs()).unwrap_or(i64::MAX),
            require_exp: v.require_expiration_time,
            binding: v.require_certificate_binding,
            max_size: v.max_token_size,
            responses,
            claim_responses,
        })
    }

    /// The response for `failure`.
    pub(crate) fn response(&self, failure: Failure) -> &Response {
        if self.claim_responses.is_empty() && self.responses.len() == 2 {
            // One message for all; only the challenge differs for a missing token.
            return &self.responses[usize::from(failure == Failure::NotPresent)];
        }
        match failure {
            Failure::Claim(i) => &self.claim_responses[i],
            f => &self.responses[f.index()],
        }
    }

    /// Whether the key set `id` is one this step verifies with today.
    fn is_current(&self, id: u64) -> bool {
        self.keys.as_ref().is_some_and(|k| k.id() == id) || self.providers.iter().any(|p| p.keys_id() == id)
    }

    /// Runs the step: finds the token, verifies it (or finds it verified in the worker's
    /// cache), checks its claims.
    pub(crate) fn run(
        &self,
        index: usize,
        set: &PolicySet,
        facts: &Facts<'_>,
        headers: &dyn HeaderList,
        state: &mut RequestState,
    ) -> Outcome {
        let mut scratch = std::mem::take(&mut state.scratch);
        scratch.clear();
        let outcome = match self.token(&Context { facts, state, set, headers }, &mut scratch) {
            Err(f) => Outcome::Refused(f),
            Ok(range) => self.check(&scratch[range], index, facts, state),
        };
        state.scratch = scratch;
        outcome
    }

    /// Where the token is: copied into `scratch` (its bytes are returned as a range of it).
    fn token(&self, cx: &Context<'_>, scratch: &mut BytesMut) -> Result<std::ops::Range<usize>, Failure> {
        let (facts, headers) = (cx.facts, cx.headers);
        let value: &[u8] = match &self.source {
            Source::Header { name, scheme } => {
                let mut found = (0..headers.count()).filter(|&i| headers.name(i).eq_ignore_ascii_case(name));
                let Some(first) = found.next() else { return Err(Failure::NotPresent) };
                if found.next().is_some() {
                    return Err(Failure::Malformed);
                }
                let value = headers.value(first).trim_ascii();
                let (given, token) = match value.iter().position(|&b| b == b' ') {
                    Some(sp) => (Some(&value[..sp]), value[sp..].trim_ascii()),
                    None => (None, value),
                };
                if let Some(scheme) = scheme
                    && !given.is_some_and(|g| g.eq_ignore_ascii_case(scheme))
                {
                    return Err(Failure::NotPresent);
                }
                // A scheme with no credentials after it (`Bearer`) carries no token.
                if given.is_none() && token.eq_ignore_ascii_case(scheme.as_deref().unwrap_or(b"Bearer")) {
                    return Err(Failure::NotPresent);
                }
                token
            }
            Source::Query(name) => {
                let Some(raw) = query_value(facts.query, name) else { return Err(Failure::NotPresent) };
                percent_decode(raw, scratch).map_err(|()| Failure::Malformed)?;
                return if scratch.is_empty() { Err(Failure::NotPresent) } else { Ok(0..scratch.len()) };
            }
            Source::Value(template) => {
                if !template.render(cx, scratch) {
                    return Err(Failure::NotPresent);
                }
                let trimmed = scratch.trim_ascii().len();
                return if trimmed == 0 { Err(Failure::NotPresent) } else { Ok(0..scratch.len()) };
            }
        };
        if value.is_empty() {
            return Err(Failure::NotPresent);
        }
        scratch.extend_from_slice(value);
        Ok(0..scratch.len())
    }

    fn check(&self, token: &[u8], index: usize, facts: &Facts<'_>, state: &mut RequestState) -> Outcome {
        let token = token.trim_ascii();
        if token.len() > self.max_size {
            return Outcome::Refused(Failure::TooLarge);
        }
        let cached = {
            let local = state.local.borrow();
            let cache = &local.tokens;
            cache.get(token, facts.now).filter(|v| self.is_current(v.keyset)).cloned()
        };
        let verified = match cached {
            Some(v) => v,
            None => match self.verify(token, index, state) {
                Ok(v) => {
                    let until = v.claims.exp().map_or(facts.now.saturating_add(CACHE_TTL_WITHOUT_EXP), |e| {
                        (e as i64).saturating_add(self.skew)
                    });
                    let v = Rc::new(v);
                    state.local.borrow_mut().tokens.put(token, v.clone(), until, facts.now);
                    v
                }
                Err(outcome) => return outcome,
            },
        };
        match self.claims_hold(&verified, facts) {
            Ok(()) => Outcome::Valid(verified),
            Err(f) => Outcome::Refused(f),
        }
    }

    /// Checks the signature with the current keys.
    fn verify(&self, token: &[u8], index: usize, state: &RequestState) -> Result<Verified, Outcome> {
        let jws = Jws::parse(token, self.max_size).map_err(|e| {
            Outcome::Refused(match e {
                JwsError::TooLarge => Failure::TooLarge,
                JwsError::Malformed(_) => Failure::Malformed,
                JwsError::Unsigned => Failure::Unsigned,
                JwsError::UnknownAlgorithm => Failure::Algorithm,
                JwsError::Encrypted => Failure::Encrypted,
                JwsError::ForbiddenHeader(_) => Failure::ForbiddenHeader,
            })
        })?;
        let kid = jws.kid.as_deref();
        let provider_sets: Vec<_> = self.providers.iter().map(|p| (p.keys(), p.issuer())).collect();
        let sets = self
            .keys
            .iter()
            .map(|k| (&**k, None))
            .chain(provider_sets.iter().map(|(g, issuer)| (&***g, issuer.clone())));
        let mut attempts = 0;
        let mut named = false;
        for (set, issuer) in sets {
            for key in set.candidates(kid, jws.alg) {
                attempts += 1;
                if attempts > MAX_ATTEMPTS {
                    return Err(Outcome::Refused(Failure::Signature));
                }
                if jws.verified_by(key) {
                    let payload = jws.payload().map_err(|_| Outcome::Refused(Failure::Malformed))?;
                    let claims = Claims::parse(&payload).map_err(|_| Outcome::Refused(Failure::ClaimType))?;
                    return Ok(Verified { claims, keyset: set.id(), issuer });
                }
            }
            named |= kid.is_some_and(|k| set.has_kid(k));
        }
        if attempts > 0 {
            return Err(Outcome::Refused(Failure::Signature));
        }
        if named {
            // A key has the kid but does not verify this algorithm.
            return Err(Outcome::Refused(Failure::Algorithm));
        }
        // A kid no current key has: the providers may have rotated their keys, or their first
        // keys may be on their way. Once per request; a token without kid asks for nothing.
        let unloaded = self.providers.iter().any(|p| !p.is_loaded());
        if !self.providers.is_empty() && (kid.is_some() || unloaded) && state.answer(index).is_none() {
            return Err(Outcome::WaitForKeys);
        }
        let loaded = self.keys.is_some() || self.providers.iter().any(|p| p.is_loaded());
        Err(Outcome::Refused(if loaded { Failure::NoKey } else { Failure::KeysUnavailable }))
    }

    fn claims_hold(&self, verified: &Verified, facts: &Facts<'_>) -> Result<(), Failure> {
        let claims = &verified.claims;
        if claims.exp().is_none() && self.require_exp {
            return Err(Failure::NoExpiration);
        }
        if claims.expired(facts.now, self.skew) {
            return Err(Failure::Expired);
        }
        if claims.not_yet_valid(facts.now, self.skew) {
            return Err(Failure::NotYetValid);
        }
        if !self.audiences.is_empty() && !claims.audience_in(&self.audiences) {
            return Err(Failure::Audience);
        }
        if !self.issuers.is_empty() {
            if !claims.issuer().is_some_and(|i| self.issuers.iter().any(|x| x == i)) {
                return Err(Failure::Issuer);
            }
        } else if let Some(expected) = &verified.issuer {
            // No issuers configured: the issuer of the provider whose key verified the token (API
            // Management takes the issuer from the OpenID configuration).
            if claims.issuer() != Some(expected.as_str()) {
                return Err(Failure::Issuer);
            }
        } else if !self.providers.is_empty() && self.keys.is_none() {
            // Verified by a provider whose discovery document named no issuer.
            return Err(Failure::Issuer);
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.satisfied_by(claims) {
                return Err(Failure::Claim(i));
            }
        }
        // A certificate-bound token (RFC 8705 §3) is checked against this connection's certificate
        // whether or not the step requires binding; `require_certificate_binding` also refuses
        // tokens that are not bound.
        let claimed = claims.get("cnf").and_then(|c| c.get("x5t#S256")).is_some();
        if claimed || self.binding {
            let bound = claims.certificate_binding();
            if bound.is_none() || bound != facts.client_cert.map(|c| c.sha256) {
                return Err(Failure::Binding);
            }
        }
        Ok(())
    }
}

/// Loads one of `issuer_signing_keys` (a JWK Set file may hold several).
fn load_key(key: &portcullis_config::SigningKey, inputs: &KeyInputs<'_>) -> Result<Vec<Key>, String> {
    let crypto = inputs.crypto.ok_or("no crypto library to load keys with")?;
    let one = |material: Material<'_>| {
        Key::from_material(crypto, &material, key.kid.as_deref(), key.alg.as_deref())
            .map(|k| vec![k])
            .map_err(|e| e.to_string())
    };
    match &key.source {
        SigningKeySource::Pem(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let der = crypto.public_key_der_from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
            one(Material::Spki(&der))
        }
        SigningKeySource::Certificate(name) => {
            let der = inputs
                .certificate_keys
                .get(name)
                .ok_or_else(|| format!("no certificate named \"{name}\" in [certificates]"))?;
            one(Material::Spki(der))
        }
        SigningKeySource::Jwks(path) => {
            let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let (set, _) = KeySet::from_jwks(crypto, &text, Origin::Local)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(set.keys().to_vec())
        }
        SigningKeySource::Rsa { n, e } => {
            let n = b64::decode(n.as_bytes()).map_err(|_| "`n` is not base64url".to_owned())?;
            let e = b64::decode(e.as_bytes()).map_err(|_| "`e` is not base64url".to_owned())?;
            one(Material::Rsa { n: &n, e: &e })
        }
        SigningKeySource::Secret(text) => {
            let secret = b64::decode_standard(text.as_bytes())
                .map_err(|_| "`secret_base64` is not base64".to_owned())?;
            one(Material::Secret(&secret))
        }
    }
}

/// The raw value of query parameter `name` (first occurrence).
pub(crate) fn query_value<'q>(query: &'q [u8], name: &[u8]) -> Option<&'q [u8]> {
    query.split(|&b| b == b'&').find_map(|pair| {
        let (n, v) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &b""[..]),
        };
        (n == name).then_some(v)
    })
}

/// Percent-decodes a query value (`+` is a space in forms, kept as is here: tokens and keys have
/// none).
pub(crate) fn percent_decode(raw: &[u8], out: &mut BytesMut) -> Result<(), ()> {
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or(())?;
            let digit = |b: u8| (b as char).to_digit(16).ok_or(());
            out.extend_from_slice(&[(digit(hex[0])? * 16 + digit(hex[1])?) as u8]);
            i += 3;
        } else {
            out.extend_from_slice(&raw[i..=i]);
            i += 1;
        }
    }
    Ok(())
}
