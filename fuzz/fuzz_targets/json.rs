//! The strict JSON reader under tokens and key sets: any input either is refused or reads to a
//! value whose compact form reads back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_jose::Json;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = Json::parse(data) else { return };
    let mut compact = Vec::new();
    value.write_compact(&mut compact);
    assert!(compact.is_ascii(), "compact JSON is ASCII");
    let again = Json::parse(&compact).expect("compact output reads back");
    assert_eq!(again, value, "compact output reads back to the same value");
});
