//! The token verifier against public vectors: Wycheproof's JWS, JWK and raw-signature tests and
//! the RFC 7520 examples (tests/data/jose, see ORIGIN). Every vector marked invalid must be
//! refused; every one marked valid must verify.

use std::path::PathBuf;

use portcullis_jose::{Alg, Crypto, Json, Jws, Key, KeySet, Material, Origin};
use portcullis_tls::BoringCrypto;
use serde_json::Value;

fn data(path: &str) -> Value {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/jose").join(path);
    serde_json::from_slice(&std::fs::read(&file).expect("vector file")).expect("vector JSON")
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

/// A key set from a Wycheproof group's JWK or JWK Set (`public` when the group has one).
fn key_set(jwk: &Value) -> Result<KeySet, String> {
    let text = if jwk.get("keys").is_some() { jwk.to_string() } else { format!("{{\"keys\":[{jwk}]}}") };
    KeySet::from_jwks(&BoringCrypto, text.as_bytes(), Origin::Local).map(|(set, _)| set)
}

/// Whether `token` verifies under `set`: a compact JWS whose signature a candidate key verifies.
fn verifies(set: &KeySet, token: &str) -> bool {
    let Ok(jws) = Jws::parse(token.as_bytes(), 64 * 1024) else { return false };
    set.candidates(jws.kid.as_deref(), jws.alg).any(|k| jws.verified_by(k)) && jws.payload().is_ok()
}

const JWS_FILE: &str = "wycheproof/json_web_signature_test.json";

/// Vectors marked valid that the verifier refuses, and why:
/// - 346 and 350: RFC 7520's Figure 20 signs with PS384 under a key whose JWK Wycheproof gives
///   `"alg": "PS256"`; a key's `alg` is fixed when it is loaded (RFC 7517 §4.4), as the same
///   file's ps512 group expects when it marks PS256 and PS384 tokens under a PS512 key invalid.
/// - 372 and 373 ("InvalidCharacterInserted…"): a `?` in the header or payload is not base64url.
const REFUSED_VALID: [(&str, u64); 4] = [(JWS_FILE, 346), (JWS_FILE, 350), (JWS_FILE, 372), (JWS_FILE, 373)];

/// Vectors marked invalid that are byte for byte the valid vector 357 ("invalidBase64Padding",
/// "invalidBase64PaddingInPayload": the padding they were written with is not in the file); the
/// test checks that they are that token.
const SAME_AS_357: [(&str, u64); 2] = [(JWS_FILE, 367), (JWS_FILE, 370)];
const TOKEN_357: &str =
    "eyJraWQiOiJoczI1Ni1rZXkiLCJhbGciOiJIUzI1NiJ9.VGVzdA.c1LROH7eNQwUT8KMVEO52VC3WZ9e_AnDWbZ7aMmowV8";

fn run_jws_file(file: &str) -> (usize, usize) {
    let doc = data(file);
    let (mut valid, mut invalid) = (0, 0);
    for group in doc["testGroups"].as_array().expect("groups") {
        let jwk = group.get("public").filter(|p| !p.is_null()).or_else(|| group.get("private")).expect("key");
        let set = key_set(jwk);
        for test in group["tests"].as_array().expect("tests") {
            let id = &test["tcId"];
            let comment = test["comment"].as_str().unwrap_or("");
            // JSON serialization is not accepted: such a "jws" is an object, refused as a token.
            let token = match &test["jws"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let ok = set.as_ref().is_ok_and(|s| verifies(s, &token));
            match test["result"].as_str() {
                Some("valid") if REFUSED_VALID.contains(&(file, id.as_u64().unwrap_or(0))) => {
                    assert!(!ok, "{file} tcId {id} ({comment}) is listed as refused but verifies");
                }
                Some("valid") => {
                    assert!(
                        ok,
                        "{file} tcId {id} ({comment}) is valid but was refused: {:?}",
                        set.as_ref().err()
                    );
                    valid += 1;
                }
                Some("invalid") if SAME_AS_357.contains(&(file, id.as_u64().unwrap_or(0))) => {
                    assert_eq!(token, TOKEN_357, "{file} tcId {id} is no longer vector 357");
                }
                Some("invalid") => {
                    assert!(!ok, "{file} tcId {id} ({comment}) is invalid but was accepted");
                    invalid += 1;
                }
                _ => {}
            }
        }
    }
    (valid, invalid)
}

#[test]
fn wycheproof_json_web_signatures() {
    let (valid, invalid) = run_jws_file("wycheproof/json_web_signature_test.json");
    assert!(valid > 30 && invalid > 300, "{valid} valid, {invalid} invalid vectors ran");
}

#[test]
fn wycheproof_json_web_keys() {
    let (valid, invalid) = run_jws_file("wycheproof/json_web_key_test.json");
    assert!(valid >= 4 && invalid >= 20, "{valid} valid, {invalid} invalid vectors ran");
}

/// The primitives under JWS, through the same keys: raw ECDSA P-256 (r‖s), RSA PKCS #1 v1.5 and
/// RSA-PSS with SHA-256.
#[test]
fn wycheproof_raw_signatures() {
    for (file, alg) in [
        ("wycheproof/ecdsa_secp256r1_sha256_p1363_test.json", Alg::ES256),
        ("wycheproof/rsa_signature_2048_sha256_test.json", Alg::RS256),
        ("wycheproof/rsa_pss_2048_sha256_mgf1_32_test.json", Alg::PS256),
    ] {
        let doc = data(file);
        let mut ran = 0;
        for group in doc["testGroups"].as_array().expect("groups") {
            let der = hex(group["publicKeyDer"].as_str().expect("der"));
            let key = Key::from_material(&BoringCrypto, &Material::Spki(&der), None, Some(alg.name()));
            for test in group["tests"].as_array().expect("tests") {
                let (msg, sig) =
                    (hex(test["msg"].as_str().expect("msg")), hex(test["sig"].as_str().expect("sig")));
                let ok = key.as_ref().is_ok_and(|k| k.verify(alg, &msg, &sig));
                let id = &test["tcId"];
                match test["result"].as_str() {
                    Some("valid") => {
                        assert!(ok, "{file} tcId {id} is valid but was refused ({:?})", key.as_ref().err())
                    }
                    Some("invalid") => assert!(!ok, "{file} tcId {id} is invalid but was accepted"),
                    _ => {}
                }
                ran += 1;
            }
        }
        assert!(ran > 100, "{file}: {ran} vectors");
    }
}

/// The public half of an RFC 7520 key (the examples give private keys).
fn public_jwk(key: &Value) -> Value {
    let mut public = key.clone();
    if let Some(map) = public.as_object_mut()
        && map.get("kty").and_then(Value::as_str) != Some("oct")
    {
        for private in ["d", "p", "q", "dp", "dq", "qi"] {
            map.remove(private);
        }
    }
    public
}

#[test]
fn rfc7520_compact_examples() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/jose/rfc7520/jws");
    let mut verified = 0;
    for name in [
        "4_1.rsa_v15_signature.json",
        "4_2.rsa-pss_signature.json",
        "4_3.ecdsa_signature.json",
        "4_4.hmac-sha2_integrity_protection.json",
    ] {
        let case: Value =
            serde_json::from_slice(&std::fs::read(dir.join(name)).expect("file")).expect("json");
        let set = key_set(&public_jwk(&case["input"]["key"])).unwrap_or_else(|e| panic!("{name}: {e}"));
        let compact = case["output"]["compact"].as_str().expect("compact");
        assert!(verifies(&set, compact), "{name} does not verify");
        // One flipped bit of the signature, or the payload, and it does not.
        let mut bytes = compact.as_bytes().to_vec();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        assert!(
            !verifies(&set, std::str::from_utf8(&bytes).expect("ascii")),
            "{name}: a changed signature verifies"
        );
        let dot = compact.find('.').expect("dot");
        let tampered =
            format!("{}.{}{}", &compact[..dot], "SXQ", &compact[compact.rfind('.').expect("dot")..]);
        assert!(!verifies(&set, &tampered), "{name}: another payload verifies");
        verified += 1;
    }
    // Detached content (§4.5): the compact form has an empty payload; JWTs never detach it, and
    // the signature does not cover an empty one.
    let case: Value = serde_json::from_slice(
        &std::fs::read(dir.join("4_5.signature_with_detached_content.json")).expect("file"),
    )
    .expect("json");
    let set = key_set(&public_jwk(&case["input"]["key"])).expect("key");
    assert!(!verifies(&set, case["output"]["compact"].as_str().expect("compact")));
    assert_eq!(verified, 4);
}

/// Keys that must not load, whatever a JWK Set says.
#[test]
fn unsafe_keys_are_refused() {
    let crypto: &dyn Crypto = &BoringCrypto;
    let set = |jwks: &str, origin| KeySet::from_jwks(crypto, jwks.as_bytes(), origin).map(|_| ());
    // A secret in a published set.
    let secret =
        r#"{"keys":[{"kty":"oct","k":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8","alg":"HS256"}]}"#;
    assert!(set(secret, Origin::Local).is_ok());
    assert!(set(secret, Origin::Published).unwrap_err().contains("HMAC secret"));
    // Private parameters.
    let private = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"04N0xi21hshyvBp7I167sbE_bXqyqkAPfefdklMO7wY","y":"UI8exy-C06a7DUnjIdENkxeFtHM4-l_41LqEw9nVgmw","d":"yy49oPcINGK2ps0LmtxpB6UTEOiITghHBif6wDqmJ3c"}]}"#;
    assert!(set(private, Origin::Local).unwrap_err().contains("private parameter"));
    // Not JSON, no keys, only encryption keys.
    assert!(set("{", Origin::Local).is_err());
    assert!(set(r#"{"keys":[]}"#, Origin::Local).is_err());
    assert!(set(r#"{"keys":[{"kty":"RSA","use":"enc","n":"AQAB","e":"AQAB"}]}"#, Origin::Local).is_err());
    // An Ed25519 key loads and fixes EdDSA; an X25519 one does not.
    let ed = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"ed"}]}"#;
    let (ed_set, _) = KeySet::from_jwks(crypto, ed.as_bytes(), Origin::Published).expect("ed25519");
    assert!(ed_set.keys()[0].algs().contains(Alg::EdDSA) && !ed_set.keys()[0].algs().contains(Alg::ES256));
    assert!(set(&ed.replace("Ed25519", "X25519"), Origin::Local).is_err());
    // A JSON value that is no JWK Set.
    assert!(Json::parse(b"{\"keys\":1}").is_ok() && set("{\"keys\":1}", Origin::Local).is_err());
}

/// RFC 8037 §A.4: the Ed25519 example signature verifies, and a changed one does not.
#[test]
fn rfc8037_ed25519_example() {
    let jwks =
        r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
    let (set, _) = KeySet::from_jwks(&BoringCrypto, jwks.as_bytes(), Origin::Local).expect("key");
    let token = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";
    assert!(verifies(&set, token));
    assert!(!verifies(&set, &token.replace(".hgy", ".hgz")));
}
