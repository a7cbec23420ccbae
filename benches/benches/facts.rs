//! Computing a client certificate's facts (thumbprints, DNs, serial, SANs, validity): done once
//! per connection, at the end of the handshake.
#![allow(missing_docs, clippy::unwrap_used, reason = "bench harness")]

use std::hint::black_box;

use boring::x509::X509;
use criterion::{Criterion, criterion_group, criterion_main};
use portcullis_testkit::Pki;

fn facts(c: &mut Criterion) {
    let pki = Pki::generate();
    let leaf = X509::from_pem(pki.client.cert_pem.as_bytes()).unwrap();
    let issuer = X509::from_pem(pki.intermediate.cert_pem.as_bytes()).unwrap();
    c.bench_function("client_cert_facts", |b| {
        b.iter(|| black_box(portcullis_tls::client_cert_from_x509(black_box(&leaf), &[&*issuer], Vec::new())))
    });
}

criterion_group!(benches, facts);
criterion_main!(benches);
