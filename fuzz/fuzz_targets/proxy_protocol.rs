//! The PROXY protocol header a balancer sends before TLS: any bytes either need more, are
//! refused, or give a header no longer than the input; and a header found in a prefix is found
//! the same in the whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_http::proxy_protocol::{Parsed, parse};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(Parsed::Done { header, len }) => {
            assert!(len <= data.len());
            assert_eq!(
                parse(&data[..len]),
                Ok(Parsed::Done { header, len }),
                "the header alone reads the same"
            );
        }
        Ok(Parsed::Partial) => {
            // Every prefix of a partial header is partial too.
            for cut in 0..data.len() {
                assert_eq!(parse(&data[..cut]), Ok(Parsed::Partial));
            }
        }
        Err(_) => {}
    }
});
