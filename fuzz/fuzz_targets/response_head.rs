//! A backend's response head: scanned, parsed, and every accessor the proxy uses on it.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis_http::{HeadScanner, Limits, ResponseHead};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_head_size: 64 * 1024, max_headers: 256 };
    let mut scanner = HeadScanner::default();
    let mut buf = BytesMut::from(data);
    let mut head = ResponseHead::default();
    // Interim responses come before the final one on the same bytes.
    for _ in 0..32 {
        match scanner.scan(&mut buf, limits.max_head_size) {
            Ok(Some(len)) => {
                scanner.reset();
                if head.parse(&mut buf, len, &limits).is_err() {
                    return;
                }
                assert!((100..=599).contains(&head.status()));
                assert!(!head.reason().is_empty());
                let _ = (head.framing(false), head.framing(true), head.keep_alive(), head.content_length());
                for i in 0..head.field_count() {
                    let _ = head.field(i);
                }
                let _ = head.header(b"date");
                head.clear();
            }
            Ok(None) | Err(_) => return,
        }
    }
});
