//! Who is calling: token signature checks (what a token the worker has not seen costs), a cached
//! token through a whole `validate_jwt` step, subscription keys in a million-subscription set
//! (lookup, and loading the file), and a `send_request` answered from the worker's cache.
#![allow(missing_docs, clippy::unwrap_used, reason = "bench harness")]

mod support;

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use portcullis_jose::{Claims, Jws, KeySet, Origin};
use portcullis_policy::{Answer, Facts, HeaderEdits, HeaderList, Inputs, PolicySet, RequestState, Verdict};
use portcullis_testkit::idp::{SigningKey, jwks, now};
use portcullis_tls::BoringCrypto;
use serde_json::json;
use support::{Fields, LISTENER};

fn claims() -> serde_json::Value {
    json!({"iss": "https://login.example.com/tenant/v2.0", "aud": "api://todo", "sub": "user-1",
           "exp": now() + 3600, "nbf": now() - 10, "appidacr": "2", "appid": "1105ae9f-a1b2-4c3d-8e9f-0a1b2c3d4e5f",
           "scope": "read write ManagementApi", "tid": "72f988bf-86f1-41af-91ab-2d7cd011db47"})
}

/// What verifying a token the worker has not seen costs: split, header, signature, claims.
fn signatures(c: &mut Criterion) {
    for key in [SigningKey::es256("k"), SigningKey::rsa("k", 2048, false), SigningKey::ed25519("k")] {
        let (set, _) = KeySet::from_jwks(&BoringCrypto, jwks(&[&key]).as_bytes(), Origin::Local).unwrap();
        let token = key.token(&claims());
        c.bench_function(&format!("jwt_verify_{}", key.alg().to_lowercase()), |b| {
            b.iter(|| {
                let jws = Jws::parse(black_box(token.as_bytes()), 8192).unwrap();
                let ok = set.candidates(jws.kid.as_deref(), jws.alg).any(|k| jws.verified_by(k));
                black_box(ok && Claims::parse(&jws.payload().unwrap()).is_ok())
            })
        });
    }
}

fn compile(text: &str) -> PolicySet {
    support::compile(text, &Inputs { crypto: Some(Arc::new(BoringCrypto)), ..Inputs::default() })
}

fn facts() -> Facts<'static> {
    Facts {
        client_cert: None,
        client_addr: "10.1.2.3:50000".parse().unwrap(),
        client_ip: "10.1.2.3",
        request_id: "0123456789abcdef",
        now: now(),
        now_ms: now() as u64 * 1000,
        query: b"",
        route: Default::default(),
        method: b"GET",
        path: b"/",
    }
}

/// A token the worker has verified before: the whole step (find it, look it up, check its
/// claims), and the header it sets for the backend.
fn cached_token(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("portcullis-bench-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = SigningKey::es256("k1");
    std::fs::write(dir.join("k1.pub"), key.public_pem()).unwrap();
    let text = format!(
        r#"{LISTENER}
[[api]]
name = "todo"
path = "/"
backend = "app"
  [[api.inbound]]
  validate_jwt = {{ issuer_signing_keys = [ {{ pem = "{}", kid = "k1" }} ], require_scheme = "Bearer",
                   audiences = ["api://todo"], issuers = ["https://login.example.com/tenant/v2.0"],
                   required_claims = [ {{ name = "appidacr", values = ["2"] }},
                                       {{ name = "scope", match = "any", separator = " ", values = ["ManagementApi"] }} ] }}
"#,
        dir.join("k1.pub").display()
    );
    let set = compile(&text);
    let policy = set.apis[0].select(b"GET", b"/").unwrap();
    let token = key.token(&claims());
    let fields = Fields(vec![
        (Bytes::from_static(b"Host"), Bytes::from_static(b"api.example.com")),
        (Bytes::from_static(b"Authorization"), Bytes::from(format!("Bearer {token}"))),
        (Bytes::from_static(b"Accept"), Bytes::from_static(b"application/json")),
    ]);
    let facts = facts();
    let mut state = RequestState::default();
    let mut edits = HeaderEdits::default();
    edits.reset(fields.count());
    assert!(matches!(set.inbound(policy, &facts, &fields, &mut state, &mut edits), Verdict::Continue));
    c.bench_function("jwt_cached_validate_jwt_step", |b| {
        b.iter(|| {
            black_box(support::inbound(&set, policy, black_box(&facts), &fields, &mut state, &mut edits))
        })
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// A million subscriptions in a file: loading it, and finding a key (hit, miss).
fn subscriptions(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("portcullis-bench-subs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut file = String::with_capacity(100 * 1_000_000);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..1_000_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        file.push_str(&format!("sub-{i}, p{x:016x}{i:016x}, s{:016x}{i:016x}, active\n", x.rotate_left(17)));
    }
    file.push_str("bench-sub, 0123456789abcdef0123456789abcdef, , active\n");
    std::fs::write(dir.join("starter.keys"), &file).unwrap();
    let text = format!(
        r#"{LISTENER}
[subscriptions]
starter = "{}"
[[product]]
name = "starter"
apis = ["todo"]
[[api]]
name = "todo"
path = "/"
backend = "app"
subscription_required = true
"#,
        dir.join("starter.keys").display()
    );
    let mut group = c.benchmark_group("subscriptions");
    group.sample_size(10);
    group.bench_function("subscription_file_load_1M", |b| {
        b.iter(|| black_box(compile(&text).subscription_count()))
    });
    group.finish();
    let set = compile(&text);
    assert_eq!(set.subscription_count(), 1_000_001);
    let policy = set.apis[0].select(b"GET", b"/").unwrap();
    let facts = facts();
    let mut state = RequestState::default();
    let mut edits = HeaderEdits::default();
    for (name, key, expect_ok) in [
        ("subscription_lookup_1M_hit", "0123456789abcdef0123456789abcdef", true),
        ("subscription_lookup_1M_miss", "0123456789abcdef0123456789abcdeX", false),
    ] {
        let fields = Fields(vec![
            (Bytes::from_static(b"Host"), Bytes::from_static(b"api.example.com")),
            (Bytes::from_static(b"Ocp-Apim-Subscription-Key"), Bytes::from_static(key.as_bytes())),
        ]);
        edits.reset(fields.count());
        let v = set.inbound(policy, &facts, &fields, &mut state, &mut edits);
        assert_eq!(matches!(v, Verdict::Continue), expect_ok, "{name}");
        c.bench_function(name, |b| {
            b.iter(|| {
                black_box(support::inbound(&set, policy, black_box(&facts), &fields, &mut state, &mut edits))
            })
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device callout whose answer the worker has cached: the whole step (render the request, find
/// the answer, read two JSON fields into the header for the backend).
fn cached_callout(c: &mut Criterion) {
    let text = format!(
        r#"{LISTENER}
[[api]]
name = "devices"
path = "/"
backend = "app"
  [[api.inbound]]
  send_request = {{ name = "device", url = "https://devauth.internal/check?ip={{request.ip}}&deviceId={{header.X-Device}}",
                   cache_ttl = "60s", expect_status = [200],
                   set_headers = {{ "x-request-context-data" = "deviceId={{callout.device.json.deviceId}};certificateThumbprint={{callout.device.json.certificateThumbprint}}" }} }}
"#
    );
    let set = compile(&text);
    let policy = set.apis[0].select(b"GET", b"/").unwrap();
    let fields = Fields(vec![
        (Bytes::from_static(b"Host"), Bytes::from_static(b"api.example.com")),
        (Bytes::from_static(b"X-Device"), Bytes::from_static(b"dev-1")),
    ]);
    let facts = facts();
    let mut state = RequestState::default();
    let mut edits = HeaderEdits::default();
    edits.reset(fields.count());
    // The first request waits for the callout; its answer is then cached.
    let step = match set.inbound(policy, &facts, &fields, &mut state, &mut edits) {
        Verdict::Wait { step, .. } => step,
        v => panic!("expected a wait, got {v:?}"),
    };
    let body = r#"{"deviceId":"dev-1","certificateThumbprint":"EB92D7C4A1B2C3D4E5F60718293A4B5C6D7E8F90","owner":{"name":"contoso"}}"#;
    state.put(step, Answer::Response { status: 200, body: Bytes::from_static(body.as_bytes()) });
    assert!(matches!(
        set.inbound_from(policy, step, &facts, &fields, &mut state, &mut edits),
        Verdict::Continue
    ));
    assert!(
        support::inbound(&set, policy, &facts, &fields, &mut state, &mut edits),
        "answered from the cache"
    );
    assert_eq!(edits.added().count(), 1);
    c.bench_function("callout_cache_hit_send_request_step", |b| {
        b.iter(|| {
            black_box(support::inbound(&set, policy, black_box(&facts), &fields, &mut state, &mut edits))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = signatures, cached_token, subscriptions, cached_callout
}
criterion_main!(benches);
