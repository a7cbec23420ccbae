//! JWT claims (RFC 7519): the claims set as read once, the registered claims' checks, and the
//! required-claim rules of API Management's `validate-jwt`.

use crate::b64;
use crate::json::Json;

/// Why a claims set is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimsError {
    /// The payload is not a JSON object.
    NotAnObject,
    /// A registered claim has the wrong JSON type (or an impossible value): named.
    WrongType(&'static str),
}

/// A token's claims set, with the registered claims read once.
#[derive(Debug, Clone)]
pub struct Claims {
    json: Json,
    exp: Option<f64>,
    nbf: Option<f64>,
}

/// A NumericDate (RFC 7519 §2): a finite number of seconds.
fn numeric_date(json: &Json, name: &'static str) -> Result<Option<f64>, ClaimsError> {
    match json.get(name) {
        None => Ok(None),
        Some(Json::Number(n)) if n.value().is_finite() => Ok(Some(n.value())),
        Some(_) => Err(ClaimsError::WrongType(name)),
    }
}

impl Claims {
    /// Reads a JWS payload as a claims set. `iss` must be a string, `aud` a string or an array
    /// of strings, `exp`, `nbf` and `iat` numbers, `sub` and `jti` strings.
    pub fn parse(payload: &[u8]) -> Result<Claims, ClaimsError> {
        let json = Json::parse(payload).map_err(|_| ClaimsError::NotAnObject)?;
        if json.as_object().is_none() {
            return Err(ClaimsError::NotAnObject);
        }
        for name in ["iss", "sub", "jti"] {
            if json.get(name).is_some_and(|v| v.as_str().is_none()) {
                return Err(ClaimsError::WrongType(name));
            }
        }
        match json.get("aud") {
            None | Some(Json::String(_)) => {}
            Some(Json::Array(items)) if items.iter().all(|i| i.as_str().is_some()) => {}
            Some(_) => return Err(ClaimsError::WrongType("aud")),
        }
        numeric_date(&json, "iat")?;
        let exp = numeric_date(&json, "exp")?;
        let nbf = numeric_date(&json, "nbf")?;
        Ok(Claims { json, exp, nbf })
    }

    /// The claim `name`.
    pub fn get(&self, name: &str) -> Option<&Json> {
        self.json.get(name)
    }

    pub fn exp(&self) -> Option<f64> {
        self.exp
    }

    pub fn nbf(&self) -> Option<f64> {
        self.nbf
    }

    pub fn issuer(&self) -> Option<&str> {
        self.json.get("iss").and_then(Json::as_str)
    }

    /// Whether an `aud` value is one of `allowed`.
    pub fn audience_in(&self, allowed: &[String]) -> bool {
        match self.json.get("aud") {
            Some(Json::String(a)) => allowed.iter().any(|x| x == &**a),
            Some(Json::Array(items)) => {
                items.iter().filter_map(Json::as_str).any(|a| allowed.iter().any(|x| x == a))
            }
            _ => false,
        }
    }

    /// Whether `now` is before `exp` (RFC 7519 §4.1.4), allowing `skew` seconds.
    pub fn expired(&self, now: i64, skew: i64) -> bool {
        self.exp.is_some_and(|exp| now as f64 >= exp + skew as f64)
    }

    /// Whether `now` is before `nbf` (RFC 7519 §4.1.5), allowing `skew` seconds.
    pub fn not_yet_valid(&self, now: i64, skew: i64) -> bool {
        self.nbf.is_some_and(|nbf| (now as f64) < nbf - skew as f64)
    }

    /// The SHA-256 thumbprint of the certificate the token is bound to (RFC 8705 §3.1:
    /// `cnf.x5t#S256`, base64url), if it carries a well-formed one.
    pub fn certificate_binding(&self) -> Option<[u8; 32]> {
        let thumbprint = self.json.get("cnf")?.get("x5t#S256")?.as_str()?;
        b64::decode(thumbprint.as_bytes()).ok()?.try_into().ok()
    }
}

/// How a required claim's values must match (`match` in API Management).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// The claim holds every listed value.
    All,
    /// The claim holds at least one listed value.
    Any,
}

/// A claim the token must carry, with values it must hold.
#[derive(Debug, Clone)]
pub struct ClaimRule {
    pub name: String,
    /// Empty: the claim must only be present.
    pub values: Vec<String>,
    pub matching: Match,
    /// Splits a string claim into several values (`scope` is space-separated).
    pub separator: Option<String>,
}

/// One value of a claim, for comparison with configured (text) values: strings as they are,
/// numbers and booleans by value.
fn value_matches(claim: &Json, wanted: &str) -> bool {
    match claim {
        Json::String(s) => &**s == wanted,
        Json::Number(n) => wanted.trim().parse::<f64>().is_ok_and(|w| w == n.value()),
        Json::Bool(b) => wanted == if *b { "true" } else { "false" },
        _ => false,
    }
}

impl ClaimRule {
    /// Whether `claims` satisfy the rule. A claim of a type that cannot hold the values (an
    /// object, null) fails.
    pub fn satisfied_by(&self, claims: &Claims) -> bool {
        let Some(claim) = claims.get(&self.name) else { return false };
        if matches!(claim, Json::Null | Json::Object(_)) {
            return false;
        }
        if let Json::Array(items) = claim
            && items.iter().any(|i| matches!(i, Json::Null | Json::Object(_) | Json::Array(_)))
        {
            return false;
        }
        if self.values.is_empty() {
            return true;
        }
        let holds = |wanted: &String| match (claim, &self.separator) {
            (Json::String(s), Some(sep)) if !sep.is_empty() => {
                s.split(sep.as_str()).filter(|p| !p.is_empty()).any(|p| p == wanted)
            }
            (Json::Array(items), sep) => items.iter().any(|item| match (item, sep) {
                (Json::String(s), Some(sep)) if !sep.is_empty() => {
                    s.split(sep.as_str()).filter(|p| !p.is_empty()).any(|p| p == wanted)
                }
                _ => value_matches(item, wanted),
            }),
            _ => value_matches(claim, wanted),
        };
        match self.matching {
            Match::All => self.values.iter().all(holds),
            Match::Any => self.values.iter().any(holds),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(text: &str) -> Claims {
        Claims::parse(text.as_bytes()).expect("claims")
    }

    fn rule(name: &str, values: &[&str], matching: Match, separator: Option<&str>) -> ClaimRule {
        ClaimRule {
            name: name.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
            matching,
            separator: separator.map(Into::into),
        }
    }

    #[test]
    fn registered_claims_have_their_types() {
        assert_eq!(Claims::parse(b"[1]").err(), Some(ClaimsError::NotAnObject));
        assert_eq!(Claims::parse(b"foo").err(), Some(ClaimsError::NotAnObject));
        assert_eq!(Claims::parse(br#"{"exp":"1"}"#).err(), Some(ClaimsError::WrongType("exp")));
        assert_eq!(Claims::parse(br#"{"nbf":true}"#).err(), Some(ClaimsError::WrongType("nbf")));
        assert_eq!(Claims::parse(br#"{"iss":1}"#).err(), Some(ClaimsError::WrongType("iss")));
        assert_eq!(Claims::parse(br#"{"aud":[1]}"#).err(), Some(ClaimsError::WrongType("aud")));
        assert_eq!(Claims::parse(br#"{"aud":{}}"#).err(), Some(ClaimsError::WrongType("aud")));
        assert_eq!(Claims::parse(br#"{"exp":1e999}"#).err(), Some(ClaimsError::WrongType("exp")));
        let c = claims(r#"{"exp":100.5,"nbf":50,"aud":["a","b"],"iss":"i"}"#);
        assert!(!c.expired(100, 0) && c.expired(101, 0) && !c.expired(101, 1));
        assert!(c.not_yet_valid(49, 0) && !c.not_yet_valid(50, 0) && !c.not_yet_valid(45, 5));
        assert!(c.audience_in(&["b".into()]) && !c.audience_in(&["c".into()]));
        assert_eq!(c.issuer(), Some("i"));
        assert!(claims(r#"{"aud":"a"}"#).audience_in(&["a".into()]));
        assert!(!claims("{}").audience_in(&["a".into()]));
    }

    #[test]
    fn required_claims_as_api_management_matches_them() {
        let c = claims(
            r#"{"appidacr":"2","azpacr":2,"scope":"read  write","roles":["a","b"],"ok":true,"o":{},"n":null}"#,
        );
        assert!(rule("appidacr", &["2"], Match::All, None).satisfied_by(&c));
        assert!(!rule("appidacr", &["1"], Match::All, None).satisfied_by(&c));
        assert!(rule("azpacr", &["2"], Match::All, None).satisfied_by(&c), "numbers by value");
        assert!(rule("azpacr", &["2.0"], Match::All, None).satisfied_by(&c));
        assert!(!rule("azpacr", &["two"], Match::All, None).satisfied_by(&c));
        assert!(rule("scope", &["write"], Match::Any, Some(" ")).satisfied_by(&c));
        assert!(rule("scope", &["read", "write"], Match::All, Some(" ")).satisfied_by(&c));
        assert!(!rule("scope", &["read", "admin"], Match::All, Some(" ")).satisfied_by(&c));
        assert!(rule("scope", &["read", "admin"], Match::Any, Some(" ")).satisfied_by(&c));
        assert!(!rule("scope", &["write"], Match::All, None).satisfied_by(&c), "no separator: whole value");
        assert!(rule("roles", &["a", "b"], Match::All, None).satisfied_by(&c));
        assert!(!rule("roles", &["a", "c"], Match::All, None).satisfied_by(&c));
        assert!(rule("roles", &["c", "b"], Match::Any, None).satisfied_by(&c));
        assert!(rule("ok", &["true"], Match::All, None).satisfied_by(&c));
        assert!(!rule("ok", &["True"], Match::All, None).satisfied_by(&c));
        assert!(rule("ok", &[], Match::All, None).satisfied_by(&c), "presence only");
        assert!(!rule("missing", &[], Match::All, None).satisfied_by(&c));
        assert!(!rule("o", &[], Match::All, None).satisfied_by(&c), "an object cannot hold values");
        assert!(!rule("n", &[], Match::All, None).satisfied_by(&c));
    }

    #[test]
    fn certificate_binding() {
        let thumb = b64::encode(&[7u8; 32]);
        let c = claims(&format!(r#"{{"cnf":{{"x5t#S256":"{thumb}"}}}}"#));
        assert_eq!(c.certificate_binding(), Some([7u8; 32]));
        assert_eq!(claims(r#"{"cnf":{"x5t#S256":"AAAA"}}"#).certificate_binding(), None);
        assert_eq!(claims(r#"{"cnf":"x"}"#).certificate_binding(), None);
    }
}
