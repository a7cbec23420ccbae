//! Value templates from configuration: parsed, and rendered against a request without a
//! client certificate and with a few headers.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis_config::Loc;
use portcullis_policy::{Context, Facts, HeaderList, PolicySet, RequestState, Template};

struct Headers;

impl HeaderList for Headers {
    fn count(&self) -> usize {
        2
    }
    fn name(&self, i: usize) -> &[u8] {
        [&b"Host"[..], b"X-Custom"][i % 2]
    }
    fn value(&self, i: usize) -> &[u8] {
        [&b"example.com"[..], b"v\xff"][i % 2]
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(template) = Template::parse(text, &Loc::builtin("fuzz")) else { return };
    let facts = Facts {
        client_cert: None,
        client_addr: "127.0.0.1:9".parse().expect("address"),
        client_ip: "127.0.0.1",
        request_id: "0123456789abcdef",
        now: 1_800_000_000,
        now_ms: 1_800_000_000_000,
        query: b"a=1&b",
        route: Default::default(),
        method: b"GET",
        path: b"/",
    };
    let (state, set) = (RequestState::default(), PolicySet::default());
    let mut out = BytesMut::new();
    let rendered =
        template.render(&Context { facts: &facts, state: &state, set: &set, headers: &Headers }, &mut out);
    // Whatever the template, a rendered value is safe in a header: no CR, LF or NUL.
    assert!(!rendered || !out.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0));
});
