//! Streaming find-and-replace: for any replacements and any way the body is cut into pieces, the
//! result is what replacing in the whole body at once gives.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use portcullis_http::{Replacer, replace_all};

fuzz_target!(|data: &[u8]| {
    // Layout: a byte with the number of pairs (1–3) and the piece size; then each pair as a
    // length byte and its bytes, twice; the rest is the body.
    let Some((&control, mut rest)) = data.split_first() else { return };
    let pairs_count = usize::from(control % 3) + 1;
    let step = usize::from(control >> 2).max(1);
    let take = |rest: &mut &[u8]| -> Option<Bytes> {
        let (&len, tail) = rest.split_first()?;
        let len = usize::from(len % 16).min(tail.len());
        let (piece, tail) = tail.split_at(len);
        *rest = tail;
        Some(Bytes::copy_from_slice(piece))
    };
    let mut pairs = Vec::new();
    for _ in 0..pairs_count {
        let (Some(from), Some(to)) = (take(&mut rest), take(&mut rest)) else { return };
        pairs.push((from, to));
    }
    let body = rest;
    let mut r = Replacer::new(&pairs);
    let mut out = BytesMut::new();
    for piece in body.chunks(step) {
        r.feed(piece, &mut out);
    }
    r.finish(&mut out);
    assert_eq!(out.as_ref(), replace_all(body, &pairs).as_slice());
});
