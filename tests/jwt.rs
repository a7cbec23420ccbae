//! `validate_jwt` on real connections: tokens signed in the test (ring), keys from files, from the
//! configuration and from an OpenID provider served over HTTPS by the test kit.

use std::time::{Duration, Instant};

use portcullis_testkit::idp::{Idp, SigningKey, free_port, now};
use portcullis_testkit::{Identity, Response, TestProxy};
use serde_json::{Value, json};

use crate::common::Env;

const ISSUER: &str = "https://login.example.com/tenant/v2.0";
const AUDIENCE: &str = "api://todo";

/// Claims that pass the usual step, with `changes` merged in (`null` removes a claim).
fn claims(changes: Value) -> Value {
    let mut c = json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "exp": now() + 600, "nbf": now() - 10,
        "appidacr": "2", "appid": "app-1", "scope": "read ManagementApi",
    });
    if let (Some(c), Some(changes)) = (c.as_object_mut(), changes.as_object()) {
        for (k, v) in changes {
            if v.is_null() {
                c.remove(k);
            } else {
                c.insert(k.clone(), v.clone());
            }
        }
    }
    c
}

/// A proxy whose API validates tokens with `step` (the inline table's members after the keys),
/// keyed by `keys` (an `issuer_signing_keys` or `openid` member), and passes `sub` on.
fn proxy(env: &Env, keys: &str, step: &str, extra: &str) -> TestProxy {
    let members = if step.is_empty() { keys.to_owned() } else { format!("{keys}, {step}") };
    env.proxy(
        "request",
        &format!(
            r#"
{extra}
[[api]]
name = "todo"
path = "/"
backend = "app"
  [[api.inbound]]
  validate_jwt = {{ {members} }}
  [[api.inbound]]
  set_header = {{ name = "X-Jwt-Sub", value = "{{jwt.claim.sub}}" }}
  [[api.inbound]]
  set_header = {{ name = "X-Jwt-Roles", value = "{{jwt.claim.roles}}" }}
"#
        ),
    )
}

const USUAL: &str = r#"audiences = ["api://todo"], issuers = ["https://login.example.com/tenant/v2.0"]"#;

/// A PEM key file for `key` and the `issuer_signing_keys` member that names it.
fn pem_keys(env: &Env, key: &SigningKey) -> String {
    let path = env.dir().join(format!("{}.pub", key.kid));
    std::fs::write(&path, key.public_pem()).unwrap();
    format!(r#"issuer_signing_keys = [ {{ pem = "{}", kid = "{}" }} ]"#, path.display(), key.kid)
}

fn get(env: &Env, proxy: &TestProxy, path: &str, headers: &[(&str, &str)]) -> Response {
    env.client(None).connect(proxy.addr).unwrap().request("GET", path, headers, b"").unwrap()
}

/// A request with `token` from a client presenting `id`.
fn bearer_as(env: &Env, proxy: &TestProxy, id: Option<&Identity>, token: &str) -> Response {
    env.client(id)
        .connect(proxy.addr)
        .unwrap()
        .request("GET", "/", &[("Authorization", &format!("Bearer {token}"))], b"")
        .unwrap()
}

fn bearer(env: &Env, proxy: &TestProxy, token: &str) -> Response {
    get(env, proxy, "/", &[("Authorization", &format!("Bearer {token}"))])
}

/// A 401 with `message` and the challenge RFC 6750 §3 prescribes: no error code when there was
/// no token, `invalid_token` when there was one.
fn refused(r: &Response, message: &str) {
    assert_eq!((r.status, r.text()), (401, format!(r#"{{"statusCode":401,"message":"{message}"}}"#)));
    let challenge = if message == "JWT not present." { "Bearer" } else { r#"Bearer error="invalid_token""# };
    assert_eq!(r.header("WWW-Authenticate"), Some(challenge), "{message}");
}

#[test]
fn a_valid_token_passes_and_its_claims_reach_the_backend() {
    let env = Env::new();
    let key = SigningKey::es256("k1");
    let proxy = proxy(&env, &pem_keys(&env, &key), USUAL, "");
    let token = key.token(&claims(json!({"roles": ["admin", "reader"]})));
    let r = bearer(&env, &proxy, &token);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echoed_header("X-Jwt-Sub").as_deref(), Some("user-1"));
    assert_eq!(r.echoed_header("X-Jwt-Roles").as_deref(), Some(r#"["admin","reader"]"#));
    // The scheme is case-insensitive; the token is what follows it.
    let r = get(&env, &proxy, "/", &[("Authorization", &format!("bearer   {token}"))]);
    assert_eq!(r.status, 200);
    // A client's own claim headers never reach the backend.
    let r = get(
        &env,
        &proxy,
        "/",
        &[("Authorization", &format!("Bearer {token}")), ("X-Jwt-Sub", "admin"), ("X_Jwt_Sub", "admin")],
    );
    assert_eq!(r.echoed_header("X-Jwt-Sub").as_deref(), Some("user-1"));
    assert_eq!(r.echoed_header_count("X-Jwt-Sub"), 1);
}

#[test]
fn every_failure_has_its_status_and_message() {
    let env = Env::new();
    let key = SigningKey::es256("k1");
    let other = SigningKey::es256("k1");
    let proxy = proxy(
        &env,
        &pem_keys(&env, &key),
        &format!(
            r#"{USUAL}, required_claims = [ {{ name = "appidacr", values = ["2"] }},
                 {{ name = "appid", match = "any", values = ["app-1", "app-2"] }},
                 {{ name = "scope", match = "any", separator = " ", values = ["ManagementApi"] }} ]"#
        ),
        "",
    );
    refused(&get(&env, &proxy, "/", &[]), "JWT not present.");
    refused(&get(&env, &proxy, "/", &[("Authorization", "Bearer ")]), "JWT not present.");
    let good = key.token(&claims(json!({})));
    let cases: Vec<(String, &str)> = vec![
        (key.token(&claims(json!({"exp": now() - 1}))), "JWT has expired."),
        (key.token(&claims(json!({"nbf": now() + 300}))), "JWT is not yet valid."),
        (key.token(&claims(json!({"exp": null}))), "JWT has no expiration time."),
        (key.token(&claims(json!({"exp": "tomorrow"}))), "JWT claims are malformed."),
        (key.token(&claims(json!({"aud": "api://other"}))), "JWT audience is not allowed."),
        (key.token(&claims(json!({"aud": ["api://other", "api://todo"]}))), ""),
        (key.token(&claims(json!({"iss": "https://evil.example.com"}))), "JWT issuer is not allowed."),
        (key.token(&claims(json!({"appidacr": "1"}))), "JWT claim appidacr is missing or not allowed."),
        (key.token(&claims(json!({"appidacr": null}))), "JWT claim appidacr is missing or not allowed."),
        (key.token(&claims(json!({"appid": "app-3"}))), "JWT claim appid is missing or not allowed."),
        (key.token(&claims(json!({"scope": "read write"}))), "JWT claim scope is missing or not allowed."),
        (other.token(&claims(json!({}))), "JWT signature is invalid."),
        (SigningKey::es256("k9").token(&claims(json!({}))), "JWT signing key not found."),
        (SigningKey::hs256("k1", &[7; 32]).token(&claims(json!({}))), "JWT algorithm is not allowed."),
        (key.token_with(json!({"alg": "none"}), &claims(json!({}))), "JWT is not signed."),
        (key.token_with(json!({"alg": "ES256K"}), &claims(json!({}))), "JWT algorithm is not allowed."),
        (
            key.token_with(json!({"jku": "https://evil.example.com/keys"}), &claims(json!({}))),
            "JWT header is not accepted.",
        ),
        (key.token_with(json!({"crit": ["exp"]}), &claims(json!({}))), "JWT header is not accepted."),
        (
            key.token_with(json!({"x5u": "https://evil.example.com/cert"}), &claims(json!({}))),
            "JWT header is not accepted.",
        ),
        ("not-a-token".to_owned(), "JWT is malformed."),
        (format!("{good}=="), "JWT is malformed."),
        (good.rsplit_once('.').unwrap().0.to_owned(), "JWT is malformed."),
        ("a.b.c.d.e".to_owned(), "JWT is encrypted; only signed tokens are accepted."),
        (key.token(&claims(json!({"pad": "x".repeat(9000)}))), "JWT is too large."),
    ];
    for (token, message) in &cases {
        let r = bearer(&env, &proxy, token);
        if message.is_empty() {
            assert_eq!(r.status, 200, "{}", r.text());
        } else {
            refused(&r, message);
        }
    }
    // Duplicate members in the claims set: refused, whatever the last one says.
    let dup = {
        let header = portcullis_jose::b64::encode(br#"{"alg":"ES256","kid":"k1"}"#);
        let body = claims(json!({})).to_string().replacen('{', r#"{"aud":"api://other","#, 1);
        let input = format!("{header}.{}", portcullis_jose::b64::encode(body.as_bytes()));
        format!("{input}.{}", portcullis_jose::b64::encode(&key.sign_bytes(input.as_bytes())))
    };
    refused(&bearer(&env, &proxy, &dup), "JWT claims are malformed.");
    // A token never appears in what the client is told, nor does the backend see refusals.
    assert_eq!(env.backend.requests(), 1);
    // Without `require_scheme`, the token is whatever follows the scheme (API Management's
    // reading); `require_scheme` is tested with the token sources.
    assert_eq!(get(&env, &proxy, "/", &[("Authorization", &format!("Basic {good}"))]).status, 200);
}

#[test]
fn status_message_and_token_sources_are_configurable() {
    let env = Env::new();
    let key = SigningKey::es256("k1");
    let keys = pem_keys(&env, &key);
    let custom = proxy(
        &env,
        &keys,
        r#"status = 403, message = "Unauthorized. Access token is missing or invalid.""#,
        "",
    );
    let r = bearer(&env, &custom, &key.token(&claims(json!({"exp": now() - 5}))));
    assert_eq!(
        (r.status, r.text().as_str()),
        (403, r#"{"statusCode":403,"message":"Unauthorized. Access token is missing or invalid."}"#)
    );
    assert_eq!(r.header("WWW-Authenticate"), None, "the challenge goes with 401 only");
    let token = key.token(&claims(json!({})));
    // A query parameter.
    let query = proxy(&env, &keys, r#"query_parameter_name = "access_token""#, "");
    assert_eq!(get(&env, &query, &format!("/?access_token={token}"), &[]).status, 200);
    assert_eq!(get(&env, &query, "/", &[("Authorization", &format!("Bearer {token}"))]).status, 401);
    // A template, and a header with a required scheme.
    let value = proxy(&env, &keys, r#"token_value = "{header.x-token}""#, "");
    assert_eq!(get(&env, &value, "/", &[("X-Token", &token)]).status, 200);
    assert_eq!(get(&env, &value, "/", &[]).status, 401);
    let scheme = proxy(&env, &keys, r#"header_name = "X-Auth", require_scheme = "Token""#, "");
    assert_eq!(get(&env, &scheme, "/", &[("X-Auth", &format!("Token {token}"))]).status, 200);
    assert_eq!(get(&env, &scheme, "/", &[("X-Auth", &format!("Bearer {token}"))]).status, 401);
    assert_eq!(get(&env, &scheme, "/", &[("X-Auth", &token)]).status, 401);
    // Clock skew admits a token that expired a moment ago.
    let skew = proxy(&env, &keys, r#"clock_skew = "60s""#, "");
    assert_eq!(bearer(&env, &skew, &key.token(&claims(json!({"exp": now() - 5})))).status, 200);
    assert_eq!(bearer(&env, &skew, &key.token(&claims(json!({"exp": now() - 120})))).status, 401);
    // Tokens without exp, when the step allows them.
    let lax = proxy(&env, &keys, "require_expiration_time = false", "");
    assert_eq!(bearer(&env, &lax, &key.token(&claims(json!({"exp": null})))).status, 200);
}

#[test]
fn every_algorithm_with_its_key_kinds() {
    let env = Env::new();
    let rs = SigningKey::rsa("rs", 2048, false);
    let ps = SigningKey::rsa("ps", 2048, true);
    let ed = SigningKey::ed25519("ed");
    let es = SigningKey::es256("es");
    let secret = [42u8; 32];
    let hs = SigningKey::hs256("hs", &secret);
    let jwks = env.dir().join("keys.json");
    std::fs::write(&jwks, portcullis_testkit::idp::jwks(&[&ed, &es])).unwrap();
    let rsa_jwk = rs.jwk();
    let keys = format!(
        r#"issuer_signing_keys = [ {{ jwks = "{}" }}, {{ n = "{}", e = "{}", kid = "rs" }}, {{ pem = "{}", kid = "ps" }} ]"#,
        jwks.display(),
        rsa_jwk["n"].as_str().unwrap(),
        rsa_jwk["e"].as_str().unwrap(),
        {
            let p = env.dir().join("ps.pub");
            std::fs::write(&p, ps.public_pem()).unwrap();
            p.display().to_string()
        }
    );
    let asymmetric = proxy(&env, &keys, "", "");
    for key in [&rs, &ps, &ed, &es] {
        let r = bearer(&env, &asymmetric, &key.token(&claims(json!({}))));
        assert_eq!(r.status, 200, "{}: {}", key.alg(), r.text());
    }
    // An RS256 token under the EC key's kid: that key verifies ES256 only.
    refused(
        &bearer(&env, &asymmetric, &rs.token_with(json!({"kid": "es"}), &claims(json!({})))),
        "JWT algorithm is not allowed.",
    );
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, secret);
    let symmetric = proxy(
        &env,
        &format!(r#"issuer_signing_keys = [ {{ secret_base64 = "{b64}", kid = "hs" }} ]"#),
        "",
        "",
    );
    assert_eq!(bearer(&env, &symmetric, &hs.token(&claims(json!({})))).status, 200);
    assert_eq!(
        bearer(&env, &symmetric, &SigningKey::hs256("hs", &[1; 32]).token(&claims(json!({})))).status,
        401
    );
}

#[test]
fn a_reload_with_other_keys_refuses_tokens_verified_before() {
    let env = Env::new();
    let key = SigningKey::es256("k1");
    let mut proxy = proxy(&env, &pem_keys(&env, &key), "", "");
    let token = key.token(&claims(json!({})));
    assert_eq!(bearer(&env, &proxy, &token).status, 200);
    assert_eq!(bearer(&env, &proxy, &token).status, 200, "from the worker's cache");
    let next = SigningKey::es256("k1");
    let text = env.config(
        "request",
        &format!("[[api]]\nname = \"todo\"\npath = \"/\"\nbackend = \"app\"\n  [[api.inbound]]\n  validate_jwt = {{ {} }}\n", pem_keys(&env, &next)),
    );
    proxy.reload(&text).unwrap();
    refused(&bearer(&env, &proxy, &token), "JWT signature is invalid.");
    assert_eq!(bearer(&env, &proxy, &next.token(&claims(json!({})))).status, 200);
}

#[test]
fn certificate_bound_tokens() {
    let env = Env::new();
    let key = SigningKey::es256("k1");
    let proxy = proxy(&env, &pem_keys(&env, &key), "require_certificate_binding = true", "");
    let thumbprint =
        |der: &[u8]| portcullis_jose::b64::encode(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
    let bound = key.token(&claims(json!({"cnf": {"x5t#S256": thumbprint(&env.pki.client.cert_der)}})));
    let get_as = |id: Option<&Identity>, token: &str| bearer_as(&env, &proxy, id, token);
    assert_eq!(get_as(Some(&env.pki.client), &bound).status, 200);
    refused(&get_as(Some(&env.pki.client2), &bound), "JWT is not bound to the client certificate.");
    refused(&get_as(None, &bound), "JWT is not bound to the client certificate.");
    refused(
        &get_as(Some(&env.pki.client), &key.token(&claims(json!({})))),
        "JWT is not bound to the client certificate.",
    );
}

/// A proxy whose API takes tokens from the provider `idp` (issuer from its discovery document).
fn oidc_proxy(env: &Env, url: &str, provider: &str) -> TestProxy {
    let extra = format!(
        r#"
[[openid]]
name = "entra"
url = "{url}"
ca = ["{}"]
{provider}
"#,
        env.paths.root.display()
    );
    proxy(env, r#"openid = ["entra"]"#, r#"audiences = ["api://todo"]"#, &extra)
}

/// Polls until `check` holds (a provider's keys arrive off the data path); panics after 30 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < Duration::from_secs(30), "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn openid_keys_rotate_and_the_first_token_after_a_rotation_passes() {
    let env = Env::new();
    let old = SigningKey::es256("old");
    let idp = Idp::start(&env.pki.server, &[&old]);
    let proxy = oidc_proxy(&env, &idp.url(), "");
    let c = |extra: Value| {
        let mut c = claims(extra);
        c["iss"] = json!(idp.issuer());
        c
    };
    eventually("the first keys", || bearer(&env, &proxy, &old.token(&c(json!({})))).status == 200);
    // The issuer is the discovery document's: another is refused.
    refused(&bearer(&env, &proxy, &old.token(&claims(json!({})))), "JWT issuer is not allowed.");
    // The provider rotates: the first token signed with the new key waits for a refetch and passes.
    let new = SigningKey::rsa("new", 2048, false);
    idp.set_keys(&[&new]);
    let fetched = idp.jwks_fetches();
    let r = bearer(&env, &proxy, &new.token(&c(json!({}))));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(idp.jwks_fetches(), fetched + 1);
    // The old key is gone with the refetch, cached verdicts with it.
    refused(&bearer(&env, &proxy, &old.token(&c(json!({})))), "JWT signing key not found.");
}

#[test]
fn a_storm_of_unknown_kids_costs_one_fetch() {
    let env = Env::new();
    let key = SigningKey::es256("k1");
    let idp = Idp::start(&env.pki.server, &[&key]);
    let proxy = oidc_proxy(&env, &idp.url(), "");
    let mut c = claims(json!({}));
    c["iss"] = json!(idp.issuer());
    eventually("the first keys", || bearer(&env, &proxy, &key.token(&c)).status == 200);
    let before = idp.jwks_fetches();
    let mut conn = env.client(None).connect(proxy.addr).unwrap();
    for i in 0..1000 {
        let token = key.token_with(json!({"kid": format!("random-{i}")}), &c);
        let r = conn.request("GET", "/", &[("Authorization", &format!("Bearer {token}"))], b"").unwrap();
        assert_eq!(r.status, 401);
    }
    // One refetch was granted (the first unknown kid); min_refetch (5 min) holds back the rest.
    assert_eq!(idp.jwks_fetches(), before + 1);
    assert_eq!(bearer(&env, &proxy, &key.token(&c)).status, 200);
}

#[test]
fn a_provider_down_at_start_refuses_until_its_keys_arrive() {
    let env = Env::new();
    let port = free_port();
    let url = format!("https://localhost:{port}/tenant/.well-known/openid-configuration");
    let proxy = oidc_proxy(&env, &url, r#"refresh = "1s""#);
    let key = SigningKey::ed25519("k1");
    let mut c = claims(json!({}));
    c["iss"] = json!(format!("https://localhost:{port}/tenant"));
    let token = key.token(&c);
    refused(&bearer(&env, &proxy, &token), "JWT signing keys are not available.");
    let idp = Idp::start_on(port, &env.pki.server, &[&key]);
    eventually("keys from a provider that came up", || bearer(&env, &proxy, &token).status == 200);
    assert!(idp.jwks_fetches() >= 1);
}

#[test]
fn a_broken_key_set_keeps_the_last_good_keys() {
    let env = Env::new();
    let key = SigningKey::es256("k1");
    let idp = Idp::start(&env.pki.server, &[&key]);
    let proxy = oidc_proxy(&env, &idp.url(), r#"refresh = "1s""#);
    let mut c = claims(json!({}));
    c["iss"] = json!(idp.issuer());
    let token = key.token(&c);
    eventually("the first keys", || bearer(&env, &proxy, &token).status == 200);
    for broken in [r#"{"keys":[{"kty":"oct","k":"AAAA"}]}"#, "{", r#"{"keys":[]}"#] {
        idp.set_jwks_text(broken);
        let fetched = idp.jwks_fetches();
        eventually("a refresh", || idp.jwks_fetches() > fetched);
        assert_eq!(bearer(&env, &proxy, &token).status, 200, "after {broken}");
    }
}

/// Without `issuers`, a token must carry the issuer of the provider whose key verified it: one
/// provider's key cannot vouch for another's issuer.
#[test]
fn the_issuer_is_that_of_the_provider_that_signed() {
    let env = Env::new();
    let (ka, kb) = (SigningKey::es256("a"), SigningKey::es256("b"));
    let (a, b) = (Idp::start(&env.pki.server, &[&ka]), Idp::start(&env.pki.server, &[&kb]));
    let root = env.paths.root.display();
    let extra = format!(
        "[[openid]]\nname = \"a\"\nurl = \"{}\"\nca = [\"{root}\"]\n[[openid]]\nname = \"b\"\nurl = \"{}\"\nca = [\"{root}\"]\n",
        a.url(),
        b.url()
    );
    let proxy = proxy(&env, r#"openid = ["a", "b"]"#, r#"audiences = ["api://todo"]"#, &extra);
    let with_iss = |key: &SigningKey, iss: String| key.token(&claims(json!({"iss": iss})));
    eventually("both providers' keys", || {
        bearer(&env, &proxy, &with_iss(&ka, a.issuer())).status == 200
            && bearer(&env, &proxy, &with_iss(&kb, b.issuer())).status == 200
    });
    refused(&bearer(&env, &proxy, &with_iss(&ka, b.issuer())), "JWT issuer is not allowed.");
    refused(&bearer(&env, &proxy, &with_iss(&kb, a.issuer())), "JWT issuer is not allowed.");
}

/// A token bound to a certificate (RFC 8705) is checked against the connection's certificate
/// even where the step does not require bound tokens.
#[test]
fn a_bound_token_is_always_checked() {
    let env = Env::new();
    let key = SigningKey::es256("k1");
    let proxy = proxy(&env, &pem_keys(&env, &key), "", "");
    let thumbprint = portcullis_jose::b64::encode(
        ring::digest::digest(&ring::digest::SHA256, &env.pki.client.cert_der).as_ref(),
    );
    let bound = key.token(&claims(json!({"cnf": {"x5t#S256": thumbprint}})));
    let get_as = |id: Option<&Identity>, token: &str| bearer_as(&env, &proxy, id, token);
    assert_eq!(get_as(Some(&env.pki.client), &bound).status, 200);
    refused(&get_as(None, &bound), "JWT is not bound to the client certificate.");
    refused(
        &get_as(Some(&env.pki.client), &key.token(&claims(json!({"cnf": {"x5t#S256": "AAAA"}})))),
        "JWT is not bound to the client certificate.",
    );
    assert_eq!(
        get_as(None, &key.token(&claims(json!({})))).status,
        200,
        "an unbound token needs no certificate"
    );
}

/// A token without `kid` that no key verifies asks for no refetch; an odd key in a published
/// set is left out, and the provider's other keys serve.
#[test]
fn kidless_tokens_ask_for_nothing_and_odd_published_keys_are_left_out() {
    let env = Env::new();
    let good = SigningKey::es256("good");
    let idp = Idp::start(&env.pki.server, &[&good]);
    // Beside the good key: one off its curve, and an RSA key of 1024 bits.
    let mut odd = good.jwk();
    odd["kid"] = json!("odd");
    odd["y"] = json!(portcullis_jose::b64::encode(&[1u8; 32]));
    let small =
        json!({"kty": "RSA", "kid": "small", "n": portcullis_jose::b64::encode(&[0xc3; 128]), "e": "AQAB"});
    idp.set_jwks_text(&json!({"keys": [odd, small, good.jwk()]}).to_string());
    let proxy = oidc_proxy(&env, &idp.url(), "");
    let mut c = claims(json!({}));
    c["iss"] = json!(idp.issuer());
    eventually("the good key", || bearer(&env, &proxy, &good.token(&c)).status == 200);
    let fetched = idp.jwks_fetches();
    let stranger = SigningKey::es256("x");
    refused(
        &bearer(&env, &proxy, &stranger.token_with(json!({"kid": null}), &c)),
        "JWT signature is invalid.",
    );
    assert_eq!(idp.jwks_fetches(), fetched, "no refetch for a token without kid");
}

#[test]
fn the_access_log_names_the_tokens_subject_and_app_and_never_the_token() {
    let env = Env::new();
    let key = SigningKey::es256("k1");
    let extra = format!("[server]\n{}", crate::common::access_log_to(env.dir()));
    let proxy = proxy(&env, &pem_keys(&env, &key), USUAL, &extra);
    let token = key.token(&claims(json!({})));
    assert_eq!(bearer(&env, &proxy, &token).status, 200);
    let line = crate::common::access_line(env.dir(), &["\"status\":200"]).expect("a line");
    assert!(line.contains("\"jwt_sub\":\"user-1\"") && line.contains("\"jwt_appid\":\"app-1\""), "{line}");
    let expired = key.token(&claims(json!({"exp": now() - 600})));
    assert_eq!(bearer(&env, &proxy, &expired).status, 401);
    let line = crate::common::access_line(env.dir(), &["\"status\":401"]).expect("a line");
    assert!(line.contains("\"jwt_sub\":\"-\"") && line.contains("\"refused\":\"jwt expired\""), "{line}");
    let text = std::fs::read_to_string(env.dir().join("access.log")).unwrap();
    assert!(!text.contains(&token[..40]), "no token in the log: {text}");
}
