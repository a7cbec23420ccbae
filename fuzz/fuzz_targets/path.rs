//! The path normaliser: never panics, and what it returns is stable (normalising a normal
//! path changes nothing).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_http::normalize_path;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(normal)) = normalize_path(data) {
        match normalize_path(&normal) {
            Ok(None) => {}
            Ok(Some(again)) => assert_eq!(again, normal, "normalising is not idempotent"),
            Err(e) => panic!("a normalised path is refused: {e}"),
        }
    }
});
