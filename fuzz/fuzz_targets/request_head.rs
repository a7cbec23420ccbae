//! The request side as a client drives it: bytes arrive in pieces, the scanner finds the end
//! of the head, the parser takes it apart, and the path is normalised for routing.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis_http::{HeadScanner, Limits, RequestHead, normalize_path};

fuzz_target!(|data: &[u8]| {
    // The first byte chooses where the input is split into two reads.
    let Some((&split, data)) = data.split_first() else { return };
    let cut = if data.is_empty() { 0 } else { split as usize % (data.len() + 1) };
    let limits = Limits { max_head_size: 8 * 1024, max_headers: 64 };
    let mut scanner = HeadScanner::default();
    let mut buf = BytesMut::new();
    let mut head = RequestHead::default();
    for piece in [&data[..cut], &data[cut..]] {
        buf.extend_from_slice(piece);
        // Several requests may follow each other on one connection.
        loop {
            match scanner.scan(&mut buf, limits.max_head_size) {
                Ok(Some(len)) => {
                    scanner.reset();
                    // A head that does not parse ends the connection (its bytes stay unparsed).
                    if head.parse(&mut buf, len, &limits).is_err() {
                        return;
                    }
                    {
                        let _ = (head.method(), head.target(), head.path(), head.path_only(), head.host());
                        let _ = (head.framing(), head.keep_alive(), head.expect_continue());
                        for (name, value, _) in head.fields() {
                            let _ = (name.len(), value.len());
                        }
                        let _ = head.header(b"content-type");
                        let _ = normalize_path(head.path());
                    }
                    head.clear();
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = e.reaction();
                    return;
                }
            }
        }
    }
});
