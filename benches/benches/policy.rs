//! Policy: thumbprint-set lookups at a million entries, compiling a million-line list, and a
//! whole inbound evaluation.
#![allow(missing_docs, clippy::unwrap_used, reason = "bench harness")]

mod support;

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use boring::x509::X509;
use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use portcullis_config::{Loc, Located};
use portcullis_policy::{Facts, HeaderEdits, HeaderList, Inputs, RequestState, ThumbprintSet, Verdict};
use portcullis_testkit::Pki;
use support::{Fields, LISTENER};

/// A million distinct SHA-1 thumbprints (the first eight bytes count up, the rest are noise).
fn million_line_list(extra: &str) -> Vec<u8> {
    let mut text = Vec::with_capacity(42 * 1_000_001);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..1_000_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.extend_from_slice(format!("{:016X}{:016X}{:08X}\n", i, x, x >> 32).as_bytes());
    }
    text.extend_from_slice(extra.as_bytes());
    text.push(b'\n');
    text
}

fn thumbprint_set(c: &mut Criterion) {
    let text = million_line_list("0123456789ABCDEF0123456789ABCDEF01234567");
    let loc = Loc::builtin("thumbprints.bench");
    c.bench_function("thumbprint_list_compile_1M_lines", |b| {
        b.iter(|| black_box(ThumbprintSet::parse(&text, Path::new("bench.sha1"), &loc).unwrap().len()))
    });
    let set = ThumbprintSet::parse(&text, Path::new("bench.sha1"), &loc).unwrap();
    assert_eq!(set.len(), 1_000_001);
    let mut hit = [0u8; 20];
    hit.copy_from_slice(&[
        0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, 0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, 0x01,
        0x23, 0x45, 0x67,
    ]);
    let mut miss = hit;
    miss[19] ^= 1;
    c.bench_function("thumbprint_lookup_1M_hit", |b| {
        b.iter(|| black_box(set.contains_sha1(black_box(&hit))))
    });
    c.bench_function("thumbprint_lookup_1M_miss", |b| {
        b.iter(|| black_box(set.contains_sha1(black_box(&miss))))
    });
    // Lookups spread over the whole set (each one likely a cache miss).
    let keys: Vec<[u8; 20]> = text
        .split(|&b| b == b'\n')
        .step_by(997)
        .filter(|l| l.len() == 40)
        .map(|l| {
            let mut k = [0u8; 20];
            for (i, pair) in l.chunks(2).enumerate() {
                k[i] = u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap();
            }
            k
        })
        .collect();
    let mut i = 0;
    c.bench_function("thumbprint_lookup_1M_spread", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(set.contains_sha1(&keys[i]))
        })
    });
}

fn evaluation(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("portcullis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = Pki::generate();
    let list = dir.join("allowed.sha1");
    std::fs::write(&list, million_line_list(&pki.client.thumbprint())).unwrap();
    let config_text = format!(
        r#"{LISTENER}
[thumbprints]
allowed = "{}"
[[api]]
name = "a"
path = "/"
backend = "app"
  [[api.inbound]]
  validate_client_certificate = {{ identities = [ {{ issuer_subject = "CN=Nobody" }}, {{ thumbprint_in = "allowed" }} ] }}
  [[api.inbound]]
  set_header = {{ name = "X-Client-Cert-Subject", value = "{{client_cert.subject}}" }}
  [[api.inbound]]
  set_header = {{ name = "X-Client-Cert-Thumbprint", value = "{{client_cert.thumbprint}}" }}
  [[api.inbound]]
  set_header = {{ name = "X-Request-Id", value = "{{request.id}}", action = "skip" }}
  [[api.inbound]]
  set_header = {{ name = "X-Debug", action = "delete" }}
"#,
        list.display()
    );
    // A real CRL (it revokes another client), so the revocation lookup is done, not skipped.
    let leaf = X509::from_pem(pki.client.cert_pem.as_bytes()).unwrap();
    let issuer = X509::from_pem(pki.intermediate.cert_pem.as_bytes()).unwrap();
    let paths = pki.write(&dir).unwrap();
    let crl = Located::new(paths.crl.clone(), Loc::builtin("crl"));
    let revoked = Arc::new(portcullis_tls::load_revocations(&[crl], std::slice::from_ref(&issuer)).unwrap());
    assert_eq!(revoked.len(), 1);
    let policies = support::compile(&config_text, &Inputs { revoked, ..Inputs::default() });
    let cert = Arc::new(portcullis_tls::client_cert_from_x509(&leaf, &[&*issuer], Vec::new()));
    let fields = Fields(vec![
        (Bytes::from_static(b"Host"), Bytes::from_static(b"api.example.com")),
        (Bytes::from_static(b"Accept"), Bytes::from_static(b"application/json")),
        (Bytes::from_static(b"User-Agent"), Bytes::from_static(b"okhttp/4.12.0")),
        (Bytes::from_static(b"X-Debug"), Bytes::from_static(b"1")),
    ]);
    let policy = policies.apis[0].select(b"GET", b"/items").unwrap();
    let facts = Facts {
        client_cert: Some(&cert),
        client_addr: "10.1.2.3:50000".parse().unwrap(),
        client_ip: "10.1.2.3",
        request_id: "0123456789abcdef",
        now: portcullis_tls::now_unix(),
        now_ms: portcullis_tls::now_unix() as u64 * 1000,
        query: b"",
        route: Default::default(),
        method: b"GET",
        path: b"/",
    };
    let mut edits = HeaderEdits::default();
    let mut state = RequestState::default();
    // What is timed is the allow path: every step runs and the request goes on.
    edits.reset(fields.count());
    assert!(matches!(policies.inbound(policy, &facts, &fields, &mut state, &mut edits), Verdict::Continue));
    assert_eq!(edits.added().count(), 3);
    assert!(edits.is_removed(3), "X-Debug deleted");
    c.bench_function("policy_inbound_5_steps", |b| {
        b.iter_batched_ref(
            || (),
            |_| {
                black_box(support::inbound(
                    &policies,
                    policy,
                    black_box(&facts),
                    &fields,
                    &mut state,
                    &mut edits,
                ))
            },
            BatchSize::SmallInput,
        )
    });
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = thumbprint_set, evaluation
}
criterion_main!(benches);
