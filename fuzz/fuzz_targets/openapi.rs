//! The OpenAPI reader on any text: an error with a position, or operations — never a panic,
//! and bounded work (aliases and deep nesting are refused before the document is built).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(doc) = portcullis_config::openapi::read(text) {
        for op in &doc.operations {
            assert!(op.path.starts_with('/'));
            assert!(op.line >= 1);
        }
    }
});
