//! What Redis sends back, and the Redis URL of the configuration: any bytes either need more,
//! are refused, or give a reply no longer than the input, the same when read from the reply's
//! bytes alone; deep nesting is refused, never followed down the stack.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis_server::resp::{next_reply, reply_len};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(len)) = reply_len(data) {
        assert!(len <= data.len());
        assert_eq!(reply_len(&data[..len]), Ok(Some(len)), "the reply alone reads the same");
        let mut buf = BytesMut::from(data);
        let first = next_reply(&mut buf);
        // The codec decodes what the bounds let through, to the same length.
        if let Ok(Some(_)) = first {
            assert_eq!(buf.len(), data.len() - len);
        }
    } else {
        let _ = next_reply(&mut BytesMut::from(data));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = portcullis_config::parse_redis_url(text);
    }
});
