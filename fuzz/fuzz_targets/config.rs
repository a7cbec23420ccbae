//! The configuration as `portcullis check` takes it: TOML text, then the model, then the
//! compiled snapshot (files it names are read if they exist; in the fuzzer they mostly do not).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_server::Snapshot;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = std::path::Path::new("fuzz.toml");
    match portcullis_config::parse(path, text) {
        Ok(config) => {
            let keys = portcullis_tls::TicketKeys::generate();
            if let Err(errors) = Snapshot::compile(&config, &keys, 0) {
                let _ = errors.to_string();
            }
        }
        Err(errors) => {
            let _ = errors.to_string();
        }
    }
});
