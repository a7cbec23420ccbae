//! Tokens as `validate_jwt` reads them: the compact form split, the header read and checked,
//! the signature tried against keys of every kind (BoringSSL does the math), and the claims read.
//! Whatever the input, nothing panics; and a token no key of the set signed never verifies.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use portcullis_jose::{Claims, Jws, Key, KeySet, Material};
use portcullis_tls::BoringCrypto;

/// One public key of each kind, made afresh for the run (so no seed or mutation carries a
/// signature they verify).
static KEYS: LazyLock<KeySet> = LazyLock::new(|| {
    let spki = |pkey: boring::pkey::PKey<boring::pkey::Private>| pkey.public_key_to_der().expect("der");
    let group = boring::ec::EcGroup::from_curve_name(boring::nid::Nid::X9_62_PRIME256V1).expect("group");
    let ec = boring::pkey::PKey::from_ec_key(boring::ec::EcKey::generate(&group).expect("ec")).expect("pkey");
    let ed = boring::pkey::PKey::generate(boring::pkey::Id::ED25519).expect("ed25519");
    let rsa = boring::pkey::PKey::from_rsa(boring::rsa::Rsa::generate(2048).expect("rsa")).expect("pkey");
    let public: Vec<Key> = [spki(ec), spki(ed), spki(rsa)]
        .iter()
        .map(|der| Key::from_material(&BoringCrypto, &Material::Spki(der), None, None).expect("key"))
        .collect();
    KeySet::new(public).expect("set")
});

/// A random HMAC secret, alone in its set.
static SECRET: LazyLock<KeySet> = LazyLock::new(|| {
    let mut secret = [0u8; 32];
    boring::rand::rand_bytes(&mut secret).expect("rand");
    let key = Key::from_material(&BoringCrypto, &Material::Secret(&secret), None, None).expect("secret");
    KeySet::new(vec![key]).expect("set")
});

fuzz_target!(|data: &[u8]| {
    let Ok(jws) = Jws::parse(data, 16 * 1024) else { return };
    let verified = [&*KEYS, &*SECRET]
        .iter()
        .any(|set| set.candidates(jws.kid.as_deref(), jws.alg).any(|k| jws.verified_by(k)));
    // The fuzzer cannot forge these keys' signatures.
    assert!(!verified, "a token verified under a key whose private half the fuzzer does not have");
    if let Ok(payload) = jws.payload()
        && let Ok(claims) = Claims::parse(&payload)
    {
        let _ = (claims.expired(1_800_000_000, 0), claims.not_yet_valid(1_800_000_000, 30));
        let _ = (claims.issuer(), claims.audience_in(&["a".to_owned()]), claims.certificate_binding());
    }
});
