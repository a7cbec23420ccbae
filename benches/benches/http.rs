//! Parsing a typical request head, decoding chunked bodies, and find-and-replace on a body.
#![allow(missing_docs, clippy::unwrap_used, reason = "bench harness")]

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use portcullis_http::{ChunkedDecoder, ChunkedOutput, HeadScanner, Limits, Replacer, RequestHead};

/// A typical API request head: about 400 bytes, nine fields.
const HEAD: &[u8] = b"GET /todo/devices/4f1c2a/telemetry?from=2026-11-01T00:00:00Z&limit=100 HTTP/1.1\r\n\
Host: api.example.com\r\n\
User-Agent: okhttp/4.12.0\r\n\
Accept: application/json\r\n\
Accept-Encoding: gzip\r\n\
Authorization: Bearer eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJzdWIiOiJkZXZpY2UifQ.c2ln\r\n\
Ocp-Apim-Subscription-Key: 0123456789abcdef0123456789abcdef\r\n\
X-Request-Id: 7d9c1e5a-0b3f-4c0e-9a57-2f1b8e6d4c3a\r\n\
Traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
Connection: keep-alive\r\n\r\n";

fn head(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_head");
    group.throughput(Throughput::Bytes(HEAD.len() as u64));
    let limits = Limits::default();
    let mut head = RequestHead::default();
    let mut scanner = HeadScanner::default();
    group.bench_function(format!("scan_and_parse_{}B", HEAD.len()), |b| {
        b.iter_batched_ref(
            || BytesMut::from(HEAD),
            |buf| {
                let len = scanner.scan(buf, limits.max_head_size).unwrap().unwrap();
                head.parse(buf, len, &limits).unwrap();
                black_box(head.path().len())
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn chunked(c: &mut Criterion) {
    let mut body = Vec::new();
    for _ in 0..64 {
        body.extend_from_slice(b"4000\r\n");
        body.extend(std::iter::repeat_n(b'x', 0x4000));
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let mut group = c.benchmark_group("chunked");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("reencode_1MiB_in_16KiB_chunks", |b| {
        let mut out = BytesMut::with_capacity(body.len() + 1024);
        b.iter_batched_ref(
            || BytesMut::from(&body[..]),
            |src| {
                out.clear();
                let mut d = ChunkedDecoder::new(ChunkedOutput::Reencode);
                black_box(d.decode(src, &mut out).unwrap())
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// `find_and_replace` on a 1 MiB JSON-like body read in 16 KiB pieces, with the backend's URL
/// every 300 bytes or so: what hiding the backend costs per byte.
fn replace(c: &mut Criterion) {
    let from = "http://backend.internal:8080";
    let mut body = Vec::with_capacity(1 << 20);
    while body.len() < (1 << 20) - 400 {
        body.extend_from_slice(
            format!("{{\"id\":{},\"self\":\"{from}/items/{}\",\"name\":\"", body.len(), body.len())
                .as_bytes(),
        );
        body.extend(std::iter::repeat_n(b'n', 220));
        body.extend_from_slice(b"\"},");
    }
    body.resize(1 << 20, b' ');
    let pairs =
        [(bytes::Bytes::from_static(from.as_bytes()), bytes::Bytes::from_static(b"https://api.example.com"))];
    let mut group = c.benchmark_group("find_and_replace");
    group.throughput(Throughput::Bytes(body.len() as u64));
    let mut out = BytesMut::with_capacity(body.len() + 1024);
    group.bench_function("1MiB_in_16KiB_pieces", |b| {
        b.iter(|| {
            out.clear();
            let mut r = Replacer::new(&pairs);
            for piece in body.chunks(16 * 1024) {
                r.feed(piece, &mut out);
            }
            r.finish(&mut out);
            black_box(out.len())
        })
    });
    group.finish();
}

criterion_group!(benches, head, chunked, replace);
criterion_main!(benches);
