//! Who may call: `[[product]]`, `[[subscription]]`, `[[openid]]` and the `validate_jwt` step.

use std::collections::HashMap;
use std::time::Duration;

use toml::de::DeValue;

use crate::error::{ConfigErrors, Loc};
use crate::load::{flag, is_token, required, steps};
use crate::model::*;
use crate::reader::{Reader, Value, get, join};

/// Why `key` cannot be a subscription key, if it cannot: keys travel in headers and query
/// strings, so they are 1 to 256 URL-safe characters (letters, digits, `-._~`).
pub fn subscription_key_problem(key: &[u8]) -> Option<&'static str> {
    if key.is_empty() || key.len() > 256 {
        return Some("a subscription key has 1 to 256 characters");
    }
    // A fold without early exit over a table: a million files' keys are checked at load.
    if key.iter().fold(false, |bad, &b| bad | !KEY_CHARS[usize::from(b)]) {
        return Some("a subscription key has only letters, digits and -._~");
    }
    None
}

/// The characters of a subscription key (URL-unreserved).
static KEY_CHARS: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_' || c == b'~';
        b += 1;
    }
    t
};

pub(crate) fn product(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<Product> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["name", "apis", "subscription_required", "inbound", "outbound"]);
    let name = required(r, t, v, field, "name").and_then(|n| r.non_empty_string(n, &join(field, "name")));
    let apis = get(t, "apis").map(|a| r.strings(a, &join(field, "apis"))).unwrap_or_default();
    let subscription_required = flag(r, t, field, "subscription_required", true);
    let inbound = get(t, "inbound").map(|s| steps(r, s, &join(field, "inbound"))).unwrap_or_default();
    let outbound = get(t, "outbound").map(|s| steps(r, s, &join(field, "outbound"))).unwrap_or_default();
    Some(Product {
        name: name?,
        apis,
        subscription_required,
        inbound,
        outbound,
        loc: r.loc(&v.span(), field),
    })
}

fn key(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<Located<String>> {
    let k = r.string(v, field)?;
    if let Some(problem) = subscription_key_problem(k.value.as_bytes()) {
        r.errors.push(k.loc.error(problem));
        return None;
    }
    Some(k)
}

pub(crate) fn subscription(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<Subscription> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["id", "product", "scope", "primary_key", "secondary_key", "state"]);
    let id = required(r, t, v, field, "id").and_then(|n| r.non_empty_string(n, &join(field, "id")));
    if let Some(id) = &id
        && (id.value.len() > 256 || id.value.bytes().any(|b| b.is_ascii_control() || b == b','))
    {
        r.errors.push(
            id.loc.error("a subscription id has at most 256 characters, no control characters or commas"),
        );
    }
    let scope = match (get(t, "product"), get(t, "scope")) {
        (Some(p), None) => r
            .non_empty_string(p, &join(field, "product"))
            .map(|p| Located::new(SubscriptionScope::Product(p.value), p.loc)),
        (None, Some(s)) => scope(r, s, &join(field, "scope")),
        (Some(_), Some(_)) => {
            r.error(&v.span(), &join(field, "scope"), "give `product` or `scope`, not both");
            None
        }
        (None, None) => {
            r.error(&v.span(), &join(field, "product"), "missing field `product` (or `scope`)");
            None
        }
    };
    let primary_key =
        required(r, t, v, field, "primary_key").and_then(|k| key(r, k, &join(field, "primary_key")));
    let secondary_key = get(t, "secondary_key").and_then(|k| key(r, k, &join(field, "secondary_key")));
    let state = match get(t, "state") {
        Some(s) => r.choice(s, &join(field, "state"), &SubscriptionState::NAMES)?,
        None => SubscriptionState::Active,
    };
    Some(Subscription {
        id: id?,
        scope: scope?,
        primary_key: primary_key?,
        secondary_key,
        state,
        loc: r.loc(&v.span(), field),
    })
}

fn scope(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<Located<SubscriptionScope>> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["api", "all_apis", "product"]);
    let loc = r.loc(&v.span(), field);
    let chosen = match (get(t, "api"), get(t, "all_apis"), get(t, "product")) {
        (Some(a), None, None) => SubscriptionScope::Api(r.non_empty_string(a, &join(field, "api"))?.value),
        (None, Some(all), None) => {
            if !r.boolean(all, &join(field, "all_apis"))? {
                r.error(&all.span(), &join(field, "all_apis"), "`all_apis` can only be true");
                return None;
            }
            SubscriptionScope::AllApis
        }
        (None, None, Some(p)) => {
            SubscriptionScope::Product(r.non_empty_string(p, &join(field, "product"))?.value)
        }
        _ => {
            r.error(
                &v.span(),
                field,
                "a scope is one of { api = \"…\" }, { all_apis = true }, { product = \"…\" }",
            );
            return None;
        }
    };
    Some(Located::new(chosen, loc))
}

fn duration_or(
    r: &mut Reader,
    t: &toml::de::DeTable<'_>,
    field: &str,
    key: &str,
    default: Duration,
) -> Duration {
    match get(t, key) {
        Some(d) => {
            let f = join(field, key);
            match r.duration(d, &f) {
                Some(x) if x.is_zero() => {
                    r.error(&d.span(), &f, "must be greater than zero");
                    default
                }
                Some(x) => x,
                None => default,
            }
        }
        None => default,
    }
}

pub(crate) fn openid(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<OpenId> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["name", "url", "ca", "refresh", "min_refetch", "refetch_wait", "timeout"]);
    let name = required(r, t, v, field, "name").and_then(|n| r.non_empty_string(n, &join(field, "name")));
    let url = required(r, t, v, field, "url").and_then(|u| r.non_empty_string(u, &join(field, "url")));
    if let Some(u) = &url
        && let Err(why) = https_url(&u.value)
    {
        r.errors.push(u.loc.error(why));
    }
    let ca = get(t, "ca").map(|c| r.paths(c, &join(field, "ca"))).unwrap_or_default();
    // Bounds that keep a typo from hammering a provider, or a request from waiting for ever.
    let bounded = |r: &mut Reader, key: &str, default: u64, min: u64, max: u64| {
        let d = duration_or(r, t, field, key, Duration::from_secs(default));
        if d < Duration::from_secs(min) || d > Duration::from_secs(max) {
            if let Some(v) = get(t, key) {
                r.error(&v.span(), &join(field, key), format!("must be between {min} s and {max} s"));
            }
            return Duration::from_secs(default);
        }
        d
    };
    let refresh = bounded(r, "refresh", 3600, 1, 7 * 86_400);
    let min_refetch = bounded(r, "min_refetch", 300, 1, 86_400);
    let refetch_wait = bounded(r, "refetch_wait", 2, 0, 30);
    let timeout = bounded(r, "timeout", 10, 1, 60);
    Some(OpenId {
        name: name?,
        url: url?,
        ca,
        refresh,
        min_refetch,
        refetch_wait,
        timeout,
        loc: r.loc(&v.span(), field),
    })
}

/// Checks an `https://host[:port]/path` URL (no credentials, no fragment).
pub fn https_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(format!("\"{url}\" is not an https:// URL (keys are fetched over TLS only)"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty()
        || authority.contains('@')
        || url.contains('#')
        || url.bytes().any(|b| b <= b' ' || b >= 0x7f)
    {
        return Err(format!("\"{url}\" has no usable host, or characters a URL cannot hold"));
    }
    Ok(())
}

const JWT_KEYS: [&str; 17] = [
    "header_name",
    "query_parameter_name",
    "token_value",
    "require_scheme",
    "openid",
    "issuer_signing_keys",
    "audiences",
    "issuers",
    "required_claims",
    "clock_skew",
    "require_expiration_time",
    "require_signed_tokens",
    "require_certificate_binding",
    "max_token_size",
    "status",
    "message",
    "decryption_keys",
];

pub(crate) fn validate_jwt(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<ValidateJwt> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &JWT_KEYS);
    if let Some(d) = get(t, "decryption_keys") {
        r.error(
            &d.span(),
            &join(field, "decryption_keys"),
            "encrypted tokens (JWE) are not supported: validate_jwt takes signed tokens only",
        );
    }
    let scheme = get(t, "require_scheme").and_then(|s| r.non_empty_string(s, &join(field, "require_scheme")));
    if let Some(s) = &scheme
        && !is_token(&s.value)
    {
        r.errors.push(s.loc.error(format!("\"{}\" is not an authentication scheme", s.value)));
    }
    let header = get(t, "header_name").and_then(|h| r.non_empty_string(h, &join(field, "header_name")));
    if let Some(h) = &header
        && !is_token(&h.value)
    {
        r.errors.push(h.loc.error(format!("\"{}\" is not a valid header name", h.value)));
    }
    let query = get(t, "query_parameter_name")
        .and_then(|q| r.non_empty_string(q, &join(field, "query_parameter_name")));
    let value = get(t, "token_value").and_then(|q| r.non_empty_string(q, &join(field, "token_value")));
    let sources = usize::from(header.is_some()) + usize::from(query.is_some()) + usize::from(value.is_some());
    if sources > 1 {
        r.error(&v.span(), field, "give one of `header_name`, `query_parameter_name`, `token_value`");
    }
    if scheme.is_some() && (query.is_some() || value.is_some()) {
        r.error(&v.span(), &join(field, "require_scheme"), "`require_scheme` goes with `header_name` only");
    }
    let source = match (header, query, value) {
        (_, Some(q), _) => TokenSource::Query(q.value),
        (_, _, Some(v)) => TokenSource::Value(v),
        (h, _, _) => TokenSource::Header {
            name: h.map_or_else(|| "Authorization".to_owned(), |h| h.value),
            scheme: scheme.map(|s| s.value),
        },
    };
    let openid = get(t, "openid").map(|o| r.strings(o, &join(field, "openid"))).unwrap_or_default();
    let keys = match get(t, "issuer_signing_keys") {
        Some(list) => r
            .tables(list, &join(field, "issuer_signing_keys"))
            .into_iter()
            .filter_map(|(v, f)| signing_key(r, v, &f))
            .collect(),
        None => Vec::new(),
    };
    if openid.is_empty() && get(t, "issuer_signing_keys").is_none() {
        r.error(&v.span(), field, "validate_jwt needs keys: `openid` providers and/or `issuer_signing_keys`");
    }
    let values =
        |r: &mut Reader, key: &str| get(t, key).map(|a| r.strings(a, &join(field, key))).unwrap_or_default();
    let audiences = values(r, "audiences").into_iter().map(|a| a.value).collect();
    let issuers = values(r, "issuers").into_iter().map(|a| a.value).collect();
    let required_claims = match get(t, "required_claims") {
        Some(list) => r
            .tables(list, &join(field, "required_claims"))
            .into_iter()
            .filter_map(|(v, f)| required_claim(r, v, &f))
            .collect(),
        None => Vec::new(),
    };
    let clock_skew = match get(t, "clock_skew") {
        Some(d) => match r.duration(d, &join(field, "clock_skew")) {
            Some(x) if x > Duration::from_secs(86_400) => {
                r.error(
                    &d.span(),
                    &join(field, "clock_skew"),
                    "a clock skew of more than a day is a mistake",
                );
                Duration::ZERO
            }
            Some(x) => x,
            None => Duration::ZERO,
        },
        None => Duration::ZERO,
    };
    if let Some(s) = get(t, "require_signed_tokens")
        && r.boolean(s, &join(field, "require_signed_tokens")) == Some(false)
    {
        r.error(&s.span(), &join(field, "require_signed_tokens"), "unsigned tokens are never accepted");
    }
    let max_token_size = match get(t, "max_token_size") {
        Some(m) => {
            r.integer(m, &join(field, "max_token_size"), 64..(1 << 20) + 1).map_or(8192, |n| n as usize)
        }
        None => 8192,
    };
    let status = match get(t, "status") {
        Some(s) => r.integer(s, &join(field, "status"), 400..600).map(|n| n as u16)?,
        None => 401,
    };
    let message = get(t, "message").and_then(|m| r.string(m, &join(field, "message")));
    if let Some(m) = &message
        && m.value.chars().any(char::is_control)
    {
        r.errors.push(m.loc.error("a message cannot contain control characters"));
    }
    Some(ValidateJwt {
        source,
        openid,
        keys,
        audiences,
        issuers,
        required_claims,
        clock_skew,
        require_expiration_time: flag(r, t, field, "require_expiration_time", true),
        require_certificate_binding: flag(r, t, field, "require_certificate_binding", false),
        max_token_size,
        status,
        message: message.map(|m| m.value),
    })
}

fn signing_key(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<SigningKey> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["pem", "certificate", "jwks", "n", "e", "secret_base64", "kid", "alg"]);
    let kinds = ["pem", "certificate", "jwks", "n", "secret_base64"];
    let given: Vec<&str> = kinds.iter().copied().filter(|k| get(t, k).is_some()).collect();
    if given.len() != 1 {
        r.error(
            &v.span(),
            field,
            "a key is one of { pem }, { certificate }, { jwks }, { n, e }, { secret_base64 }",
        );
        return None;
    }
    let kid = get(t, "kid").and_then(|k| r.non_empty_string(k, &join(field, "kid"))).map(|k| k.value);
    let alg = get(t, "alg").and_then(|k| r.non_empty_string(k, &join(field, "alg"))).map(|k| k.value);
    let source = match given[0] {
        "pem" => SigningKeySource::Pem(r.path(get(t, "pem")?, &join(field, "pem"))?.value),
        "jwks" => {
            if kid.is_some() || alg.is_some() {
                r.error(&v.span(), field, "a JWK Set names its keys' kid and alg itself");
            }
            SigningKeySource::Jwks(r.path(get(t, "jwks")?, &join(field, "jwks"))?.value)
        }
        "certificate" => SigningKeySource::Certificate(
            r.non_empty_string(get(t, "certificate")?, &join(field, "certificate"))?.value,
        ),
        "n" => {
            let n = r.non_empty_string(get(t, "n")?, &join(field, "n"))?.value;
            let e =
                required(r, t, v, field, "e").and_then(|e| r.non_empty_string(e, &join(field, "e")))?.value;
            SigningKeySource::Rsa { n, e }
        }
        _ => SigningKeySource::Secret(
            r.non_empty_string(get(t, "secret_base64")?, &join(field, "secret_base64"))?.value,
        ),
    };
    if matches!(given[0], "pem" | "certificate" | "secret_base64") && get(t, "e").is_some() {
        r.error(&v.span(), &join(field, "e"), "`e` goes with `n`");
    }
    Some(SigningKey { source, kid, alg, loc: r.loc(&v.span(), field) })
}

fn required_claim(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<RequiredClaim> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["name", "values", "match", "separator"]);
    let name = required(r, t, v, field, "name").and_then(|n| r.non_empty_string(n, &join(field, "name")));
    let values = match get(t, "values") {
        Some(list) => {
            // Numbers and booleans are taken as written (compared with the claim by value).
            if let DeValue::Array(items) = list.get_ref() {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.get_ref() {
                        DeValue::String(s) => out.push(s.to_string()),
                        DeValue::Integer(n) => out.push(n.to_string()),
                        DeValue::Boolean(b) => out.push(b.to_string()),
                        _ => r.error(
                            &item.span(),
                            &format!("{}[{i}]", join(field, "values")),
                            "expected a string",
                        ),
                    }
                }
                out
            } else {
                r.strings(list, &join(field, "values")).into_iter().map(|s| s.value).collect()
            }
        }
        None => Vec::new(),
    };
    let match_all = match get(t, "match") {
        Some(m) => r.choice(m, &join(field, "match"), &[("all", true), ("any", false)]).unwrap_or(true),
        None => true,
    };
    let separator = get(t, "separator").and_then(|s| r.string(s, &join(field, "separator"))).map(|s| s.value);
    if separator.as_deref() == Some("") {
        r.error(&v.span(), &join(field, "separator"), "an empty separator splits nothing");
    }
    Some(RequiredClaim { name: name?.value, values, match_all, separator, loc: r.loc(&v.span(), field) })
}

/// Rules across sections: names that resolve, unique names and keys, at most one open product
/// per API.
pub(crate) fn cross_check(errors: &mut ConfigErrors, c: &Config) {
    let api_known = |name: &str| c.apis.iter().any(|a| a.name.value == name);
    let mut products: HashMap<&str, &Loc> = HashMap::new();
    let mut open_product_of: HashMap<&str, &str> = HashMap::new();
    for p in &c.products {
        if let Some(first) = products.insert(&p.name.value, &p.name.loc) {
            errors.push(p.name.loc.error(format!(
                "product \"{}\" is defined twice (first at line {})",
                p.name.value, first.line
            )));
        }
        let mut listed: Vec<&str> = Vec::new();
        for api in &p.apis {
            if !api_known(&api.value) {
                errors.push(
                    api.loc.error(format!("no API named \"{}\" (products list [[api]] names)", api.value)),
                );
            }
            if listed.contains(&api.value.as_str()) {
                errors.push(api.loc.error(format!("API \"{}\" is listed twice", api.value)));
            }
            listed.push(&api.value);
            if !p.subscription_required
                && let Some(other) = open_product_of.insert(&api.value, &p.name.value)
                && other != p.name.value
            {
                errors.push(api.loc.error(format!(
                    "API \"{}\" is already in the open product \"{other}\"; an API can be in one open product only",
                    api.value
                )));
            }
        }
    }
    let product_known = |name: &str| c.products.iter().any(|p| p.name.value == name);
    for f in &c.subscription_files {
        if !product_known(&f.name.value) {
            errors.push(f.name.loc.error(format!(
                "no product named \"{}\" ([subscriptions] lists files per [[product]])",
                f.name.value
            )));
        }
    }
    // Repeated ids and keys are found where subscriptions are compiled, files included.
    for s in &c.subscriptions {
        match &s.scope.value {
            SubscriptionScope::Product(p) if !product_known(p) => {
                errors.push(s.scope.loc.error(format!("no product named \"{p}\"")));
            }
            SubscriptionScope::Api(a) if !api_known(a) => {
                errors.push(s.scope.loc.error(format!("no API named \"{a}\"")))
            }
            _ => {}
        }
    }
    let mut providers: HashMap<&str, &Loc> = HashMap::new();
    for o in &c.openid {
        if let Some(first) = providers.insert(&o.name.value, &o.name.loc) {
            errors.push(o.name.loc.error(format!(
                "openid provider \"{}\" is defined twice (first at line {})",
                o.name.value, first.line
            )));
        }
    }
    let all_steps = c
        .inbound
        .iter()
        .chain(&c.outbound)
        .chain(c.products.iter().flat_map(|p| p.inbound.iter().chain(&p.outbound)))
        .chain(c.apis.iter().flat_map(|a| {
            a.inbound
                .iter()
                .chain(&a.outbound)
                .chain(a.operations.iter().flat_map(|o| o.inbound.iter().chain(&o.outbound)))
        }));
    for step in all_steps {
        let StepKind::ValidateJwt(j) = &step.kind else { continue };
        for name in &j.openid {
            if !providers.contains_key(name.value.as_str()) {
                errors.push(name.loc.error(format!("no [[openid]] provider named \"{}\"", name.value)));
            }
        }
        for key in &j.keys {
            if let SigningKeySource::Certificate(name) = &key.source
                && !c.certificates.iter().any(|cert| &cert.name.value == name)
            {
                errors.push(key.loc.error(format!("no certificate named \"{name}\" in [certificates]")));
            }
        }
    }
}
