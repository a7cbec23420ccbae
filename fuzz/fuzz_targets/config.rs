//! The configuration as `portcullis check` takes it: TOML text, then the model (kept past its
//! errors), then the compiled snapshot of what was sound (files it names are read if they
//! exist; in the fuzzer they mostly do not).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_server::Snapshot;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = std::path::Path::new("fuzz.toml");
    let (config, mut errors) = portcullis_config::parse_partial(path, text);
    if let Some(config) = config {
        let keys = portcullis_tls::TicketKeys::generate();
        // No identity providers: nothing is fetched while fuzzing.
        let counters = std::sync::Arc::new(portcullis_policy::Counters::with_capacity(64));
        if let Err(e) = Snapshot::compile(&config, &keys, 0, Vec::new(), counters) {
            errors.extend(e);
        }
    }
    errors.sort();
    errors.dedup();
    let _ = errors.to_string();
});
